"""The layer contract: data flows plans -> preprocessing -> training -> prediction, with shared primitives below.

Every ``import`` of every module is read (module level and inside functions alike, as import-linter counts
them), so a later stage imported lazily is caught too. import-linter itself is not in the package index this
project installs from offline, so the same contract is checked here with :mod:`ast`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: installed package -> folder (setup.cfg's package_dir)
PACKAGE_FOLDERS = {"cmcseg": "cmcseg", "cmcseg.plans": "plans", "cmcseg.preprocessing": "preprocessing",
                   "cmcseg.cli": "cli"}

#: what the plans, the preprocessed arrays and the checkpoint are read with: below every stage
CONTRACT = ("cmcseg.plans.plans", "cmcseg.plans.files")
PRIMITIVES = ("cmcseg.errors", "cmcseg.devices", "cmcseg.image_io", "cmcseg.serialization", "cmcseg.paths",
              "cmcseg.registry", "cmcseg.dataset", "cmcseg.parallel", "cmcseg.sliding_window", "cmcseg.checkpoint",
              "cmcseg.networks", "cmcseg.losses", "cmcseg.evaluation", "cmcseg.phantoms")
STAGES_ABOVE_PRIMITIVES = ("cmcseg.plans", "cmcseg.preprocessing", "cmcseg.training", "cmcseg.prediction",
                           "cmcseg.demo", "cmcseg.cli")

#: (importer prefix, forbidden prefixes): a later stage is never imported by an earlier one
RULES = [
    (PRIMITIVES, STAGES_ABOVE_PRIMITIVES),
    (("cmcseg.plans",), ("cmcseg.training", "cmcseg.prediction", "cmcseg.demo", "cmcseg.cli")),
    (("cmcseg.preprocessing",), ("cmcseg.plans", "cmcseg.training", "cmcseg.prediction", "cmcseg.demo",
                                 "cmcseg.cli")),
    (("cmcseg.training",), ("cmcseg.prediction", "cmcseg.demo", "cmcseg.cli")),
    (("cmcseg.prediction",), ("cmcseg.training", "cmcseg.demo", "cmcseg.cli")),
    (("cmcseg.demo",), ("cmcseg.cli",)),
]
#: imports the contract allows on purpose: (importer, imported prefix) -> why
EXCEPTIONS = {
    # the trainer class named by a checkpoint is looked up when a model is loaded (nnU-Net's predictor finds its
    # trainer class by name too); prediction's modules import no training code before that
    ("cmcseg.prediction.model", "cmcseg.training.registry"): "run-time lookup of the checkpoint's trainer class",
    ("cmcseg.prediction.model", "cmcseg.training.trainer"): "run-time lookup of the checkpoint's trainer class",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, source: str, modules: dict[str, Path]) -> set[str]:
    """Every cmcseg module that module ``name`` (its text ``source``) imports, relative imports resolved."""
    is_package = modules[name].name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:  # `from cmcseg import training` imports the module cmcseg.training
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
    return {m for m in found if m == "cmcseg" or m.startswith("cmcseg.")}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(modules: dict[str, Path], sources: dict[str, str] | None = None) -> list[str]:
    problems = []
    for name, path in modules.items():
        source = (sources or {}).get(name) or path.read_text()
        for imported in sorted(_imports(name, source, modules)):
            if _within(imported, CONTRACT):
                continue
            for importers, forbidden in RULES:
                if _within(name, importers) and _within(imported, forbidden) and not any(
                        name == a and _within(imported, (b,)) for a, b in EXCEPTIONS):
                    problems.append(f"{name} imports {imported}")
    return problems


def test_no_stage_imports_a_later_one() -> None:
    assert _violations(_modules()) == []


def test_the_contract_catches_a_later_stage_imported_inside_a_function() -> None:
    """Imports inside functions count, relative ones too: a prediction module importing training lazily fails,
    and so does a primitive that imports a stage."""
    modules = _modules()
    probe = "cmcseg.prediction._probe"
    modules[probe] = REPO / "cmcseg" / "prediction" / "_probe.py"
    sources = {probe: "def late():\n    from ..training import trainer\n    return trainer\n",
               "cmcseg.networks.cmc": "import cmcseg.preprocessing.storage\n"}
    assert _violations(modules, sources) == ["cmcseg.networks.cmc imports cmcseg.preprocessing.storage",
                                             "cmcseg.prediction._probe imports cmcseg.training.trainer"]


@pytest.mark.parametrize("importer, imported", sorted(EXCEPTIONS))
def test_every_exception_is_still_needed(importer: str, imported: str) -> None:
    """An exception no import uses any more is removed from the contract, not left to widen it."""
    modules = _modules()
    assert imported in _imports(importer, modules[importer].read_text(), modules)
