"""The layer contract (pyproject.toml [tool.importlinter]): data flows plans -> preprocessing -> training |
prediction, with shared primitives below; ``make test`` checks it with ``lint-imports`` (scripts/static_checks.sh).

These tests run the same contract on a copy of the installed layout and show that it catches a real violation:
a later stage imported lazily inside a function, and a primitive that imports a stage.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
#: installed package -> folder (setup.cfg's package_dir)
PACKAGE_FOLDERS = {"cmcseg": "cmcseg", "cmcseg/plans": "plans", "cmcseg/preprocessing": "preprocessing",
                   "cmcseg/cli": "cli"}

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (make test does)")


def _installed_tree(root: Path) -> Path:
    """The package as installed, under ``root``: real folders, every module a link to the repository's file."""
    for target, folder in PACKAGE_FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            link = root / target / path.relative_to(REPO / folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(path)
    return root


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400", "NO_COLOR": "1"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def _replace(root: Path, module: str, source: str) -> None:
    path = root / module
    path.unlink()
    path.write_text(source)


def test_the_package_keeps_its_layer_contract(tmp_path: Path) -> None:
    result = _lint(_installed_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_a_later_stage_imported_inside_a_function(tmp_path: Path) -> None:
    """Imports inside functions count, relative ones too: a prediction module importing training lazily fails,
    and so does a primitive that imports a stage."""
    root = _installed_tree(tmp_path)
    _replace(root, "cmcseg/prediction/revert.py",
             (REPO / "cmcseg/prediction/revert.py").read_text() + "\n\ndef _late():\n    from ..training import data\n"
             "    return data\n")
    _replace(root, "cmcseg/networks/__init__.py", "import cmcseg.preprocessing.storage\n")
    result = _lint(root)
    assert result.returncode != 0
    assert re.search(r"cmcseg\.prediction\.revert -> cmcseg\.training\.data", result.stdout), result.stdout
    assert re.search(r"cmcseg\.networks -> cmcseg\.preprocessing\.storage", result.stdout), result.stdout


def test_every_allowed_exception_is_still_needed(tmp_path: Path) -> None:
    """An ``ignore_imports`` line that no import uses any more is an error, not left to widen the contract:
    import-linter reports unmatched ignored imports."""
    root = _installed_tree(tmp_path)
    _replace(root, "cmcseg/prediction/model.py", "")
    result = _lint(root)
    assert result.returncode != 0
    assert "No matches for ignored import cmcseg.prediction.model -> cmcseg.training.registry" in result.stdout


def test_the_checked_tree_holds_every_module(tmp_path: Path) -> None:
    """The tree holds every module of the repository's package folders (a folder missing from the mapping would
    leave its imports unchecked)."""
    root = _installed_tree(tmp_path)
    modules = {p.relative_to(root) for p in root.rglob("*.py")}
    expected = sum(len(list((REPO / f).rglob("*.py"))) for f in PACKAGE_FOLDERS.values())
    assert len(modules) == expected
    assert Path("cmcseg/plans/plans.py") in modules and Path("cmcseg/cli/main.py") in modules
