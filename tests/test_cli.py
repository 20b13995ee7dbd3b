"""The `cmcseg` command: help for every sub-command, both entry points, and the installed package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmcseg.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help_with_an_example(capsys):
    names = _subcommands()
    assert {"synth", "convert", "plan"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"cmcseg {name}" in out and "Example" in out, name


def test_console_script_and_python_m_agree():
    exe = Path(sys.executable).with_name("cmcseg")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    b = subprocess.run([sys.executable, "-m", "cmcseg", "--help"], capture_output=True, text=True, check=True)
    assert "synth" in a.stdout and (a.stdout.replace("cmcseg", "")
                                    == b.stdout.replace("__main__.py", "").replace("cmcseg", ""))


def test_expected_errors_are_one_clear_line_not_a_traceback(tmp_path: Path, capsys):
    code = main(["plan", "-d", "NoSuchData", "--raw", str(tmp_path), "--preprocessed", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "NoSuchData" in err and "Fix:" in err and "Traceback" not in err


@pytest.mark.slow
def test_installed_package_imports_from_outside_the_source_tree(tmp_path: Path):
    """A regular (non-editable) install maps the top-level folders into `cmcseg.*` and nothing else."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    top_level = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert "cmcseg" in top_level and not top_level & {"preprocessing", "plans", "cli", "tests", "benchmarks"}, top_level
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import cmcseg, cmcseg.plans.integrity, cmcseg.preprocessing.alignment, cmcseg.cli.main; "
            "print(cmcseg.__file__); print(cmcseg.plans.integrity.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    files = out.stdout.split()
    assert all(f.startswith(str(target)) for f in files), files


def test_cli_name_lists_match_the_library_registries():
    """synth and convert list their choices without importing the generators (fast --help); they must agree."""
    from cmcseg.cli import convert_cmd, plan_cmd, synth_cmd
    from cmcseg.phantoms import PHANTOMS, SIZES
    from cmcseg.plans.planner import PLANNERS
    from cmcseg.preprocessing.converters import CONVERTERS

    assert synth_cmd.KINDS == tuple(sorted(PHANTOMS)) and synth_cmd.SIZES == SIZES
    assert convert_cmd.FORMATS == tuple(sorted(CONVERTERS))
    assert plan_cmd.PLANNERS == tuple(PLANNERS)


def test_help_does_not_import_torch_or_the_generators():
    import subprocess
    import sys

    code = ("import sys\nfrom cmcseg.cli.main import build_parser\nbuild_parser()\n"
            "heavy = [m for m in ('torch', 'monai', 'transformers', 'scipy.ndimage', 'cmcseg.phantoms', "
            "'cmcseg.preprocessing.converters') if m in sys.modules]\nassert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_predict_path_does_not_import_monai_or_transformers():
    """cmcseg predict loads the trainer registry (the trainer class rebuilds the network) and the predictor;
    importing monai (all its submodules, transformers among them) took 4 s of a 15-s prediction, for nothing."""
    code = ("import sys\nimport cmcseg.training.registry, cmcseg.prediction.predictor, cmcseg.cli.predict_cmd\n"
            "heavy = [m for m in ('monai', 'transformers') if m in sys.modules]\nassert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
