"""Shared pytest fixtures (helpers live in tests/helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_tiny_dataset

from cmcseg.cli.main import main as cli_main
from cmcseg.paths import WorkRoots


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "Dataset900_Tiny", unlabeled=("case02",))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: tiny networks are overhead-bound, and on a busy 2-core machine two
    threads that wait for each other make each forward pass up to 25 times slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def planned(tmp_path_factory) -> WorkRoots:
    """The tiny MSCMR phantom, synthesised and planned (3d_fullres) once per session (trainer and fault tests)."""
    base = tmp_path_factory.mktemp("trainer_roots")
    roots = WorkRoots(base / "raw", base / "preprocessed", base / "results")
    flags = ["--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed), "--results", str(roots.results)]
    assert cli_main(["synth", "-d", "MSCMR", "--size", "tiny", *flags]) == 0
    assert cli_main(["plan", "-d", "MSCMR", "-c", "3d_fullres", "-np", "1", *flags]) == 0
    return roots
