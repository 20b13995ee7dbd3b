"""`cmcseg demo` end to end on the tiny phantom with a one-minute budget (slow: about a minute); no wall-clock
assertion (a busy machine would fail it at random): the budget arithmetic is tested on its own."""
from __future__ import annotations

import pytest
import torch

from cmcseg.cli.main import main as cli_main
from cmcseg.demo import DemoCMCTrainer, fit_epochs
from cmcseg.image_io import read_json
from cmcseg.training.registry import get_trainer_class


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_trainer_is_registered():
    assert get_trainer_class("demo") is DemoCMCTrainer


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    work = tmp_path / "demo"
    assert cli_main(["demo", "--size", "tiny", "--minutes", "1", "--work", str(work), "--device", "cpu",
                     "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert "class" in out and "Dice" in out and "chance" in out
    for name in ("myocardium", "LV", "RV"):
        assert name in out
    summary = read_json(work / "demo_summary.json")
    assert set(summary["dice"]) == {"myocardium", "LV", "RV"}
    assert summary["epochs_trained"] >= 1
    assert (work / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictions = work / "predictions" / "fold0_validation"
    for case_id in summary["validation_cases"]:
        assert (predictions / f"{case_id}.nii.gz").is_file()
    assert (predictions / "summary.json").is_file() and (predictions / "metrics.csv").is_file()
    model = work / "results" / "Dataset501_MSCMR" / "DemoCMCTrainer__3d_fullres__labeled0.2"
    assert (model / "plans.json").is_file() and (model / "dataset.json").is_file()  # a self-contained model folder
    # the budget reached the trainer (how long the machine took is for benchmarks, not for a test)
    config = read_json(model / "fold_0" / "training_config.json")
    assert 0 < config["hyperparameters"]["max_seconds"] < 60


def test_epochs_are_replanned_from_the_last_epoch_and_what_is_left():
    assert fit_epochs(300, elapsed_s=60, last_epoch_s=30, epochs_done=1) == 1 + 8
    assert fit_epochs(300, elapsed_s=200, last_epoch_s=60, epochs_done=3) == 3 + 1  # the machine slowed down
    assert fit_epochs(300, elapsed_s=290, last_epoch_s=30, epochs_done=5) == 5  # no room left: stop now
    assert fit_epochs(300, elapsed_s=400, last_epoch_s=30, epochs_done=5) == 5


def test_demo_threads_follow_the_load() -> None:
    """Every core on an idle machine; one thread once other work holds a core (two threads then ran 12x slower)."""
    from cmcseg.demo import threads_for_load

    assert threads_for_load(0.2, 2) == 2
    assert threads_for_load(1.5, 2) == 1
    assert threads_for_load(4.0, 8) == 1
    assert threads_for_load(0.0, 1) == 1
