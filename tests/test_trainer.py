"""Trainer tests: outputs of a short run, --continue, a SIGKILLed run, gradient of the unlabeled losses,
DDP under torchrun, and supervised training at --labeled 1.0.

The end-to-end tests train on the tiny MSCMR phantom, planned once per session, with
:class:`TinyCMCTrainer`: the real CMCTrainer with a smaller network and patch (a plan hook),
so that an iteration takes about a second on two CPU cores. Subprocesses load it as
``--trainer test_trainer:TinyCMCTrainer`` (this folder on PYTHONPATH).
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmcseg.checkpoint import CheckpointManager, load_checkpoint
from cmcseg.cli.main import main as cli_main
from cmcseg.errors import CmcsegError
from cmcseg.evaluation import case_dice
from cmcseg.losses import RampUp, class_thresholds
from cmcseg.paths import WorkRoots
from cmcseg.plans.memory import unlabeled_rows_for
from cmcseg.plans.plans import LabelInfo
from cmcseg.plans.splits import labeled_subset, load_splits
from cmcseg.training import ddp
from cmcseg.training import trainer as trainer_module
from cmcseg.training.cmc_trainer import CMCTrainer
from cmcseg.training.progress import MetricsHistory, epoch_means, loss_metrics, plot_progress, progress_figure
from cmcseg.training.registry import TRAINERS, get_trainer_class
from cmcseg.training.trainer import TrainingRequest, batch_composition, select_fold_cases

TESTS_DIR = Path(__file__).resolve().parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASET = "Dataset501_MSCMR"


class TinyCMCTrainer(CMCTrainer):
    """CMCTrainer on a tiny network and patch: same code paths, seconds per epoch."""

    num_workers = 0
    tiny_features = [4, 8, 8, 8]
    tiny_patch = [8, 24, 24]
    validate_each_modality = True  # the end-to-end tests check the per-modality scores too

    def configure_plans(self, plans: dict) -> dict:
        plans = copy.deepcopy(plans)
        config = plans["configurations"][self.configuration]
        arch = config["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = list(self.tiny_features[:arch["n_stages"]])
        arch["n_blocks_per_stage"] = [1] * arch["n_stages"]
        config["patch_size"] = list(self.tiny_patch)
        return plans


class TinyBranchesTrainer(TinyCMCTrainer):
    """The paper's network (a branch per modality, CSC between them) at the tiny size."""

    single_branch = False
    strong_drop_modality = 0.0


class ScaledTinyTrainer(TinyCMCTrainer):
    """A user's variant with its own network (an extra parameter), which prediction must build the same way."""

    @classmethod
    def build_network_architecture(cls, plans, configuration, options, deep_supervision):
        network = super().build_network_architecture(plans, configuration, options, deep_supervision)
        network.register_parameter("output_scale", torch.nn.Parameter(torch.full((1,), 2.0)))
        return network


class DumpingTinyCMCTrainer(TinyCMCTrainer):
    """Test-only: every DDP rank saves its final parameters, to compare the ranks."""

    def on_train_end(self) -> None:
        super().on_train_end()
        state = ddp.unwrap_model(self.network).state_dict()
        torch.save(state, self.output_folder / f"params_rank{self.dist.rank}.pt")


class RecordingTinyCMCTrainer(TinyCMCTrainer):
    """Test-only: remembers the ``labeled`` flags of every training batch."""

    def train_step(self, batch: dict) -> dict[str, float]:
        self.seen_labeled = getattr(self, "seen_labeled", []) + [batch["labeled"].clone()]
        return super().train_step(batch)


# ------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="session")
def planned_unpaired(planned: WorkRoots) -> WorkRoots:
    """The tiny AMOS phantom (CT and MRI from different patients), planned beside MSCMR."""
    flags = ["--raw", str(planned.raw), "--preprocessed", str(planned.preprocessed), "--results", str(planned.results)]
    assert cli_main(["synth", "-d", "AMOS", "--size", "tiny", *flags]) == 0
    assert cli_main(["plan", "-d", "AMOS", "-c", "3d_fullres", "-np", "1", *flags]) == 0
    return planned


def fresh_roots(planned: WorkRoots, tmp_path: Path) -> WorkRoots:
    """The planned data with a results root of this test's own."""
    return WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")


def request(roots: WorkRoots, fraction: float = 0.5, **kwargs) -> TrainingRequest:
    defaults = dict(num_epochs=2, iterations_per_epoch=2, val_iterations=1, device="cpu", num_workers=0)
    defaults.update(kwargs)
    return TrainingRequest("MSCMR", 0, fraction, roots=roots, **defaults)


def root_flags(roots: WorkRoots) -> list[str]:
    return ["--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed), "--results", str(roots.results)]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # see one_torch_thread
    return env


def assert_checkpoints_load(folder: Path) -> list[Path]:
    """Every checkpoint*.pt loads, and no unfinished temporary checkpoint is lying around."""
    checkpoints = sorted(folder.glob("checkpoint*.pt"))
    for path in checkpoints:
        assert "network" in load_checkpoint(path)
    assert not list(folder.glob(".tmp-checkpoint*")), "stray temporary checkpoint files"
    return checkpoints


def assert_same_optimizer_state(loaded: dict, saved: dict) -> None:
    assert loaded["state"].keys() == saved["state"].keys() and loaded["state"]
    for key, state in saved["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(loaded["state"][key][name].cpu(), value.cpu()), (key, name)
    for group_loaded, group_saved in zip(loaded["param_groups"], saved["param_groups"]):
        assert group_loaded["momentum"] == group_saved["momentum"]
        assert group_loaded["params"] == group_saved["params"]


# ------------------------------------------------------------------------------------------- fast unit tests
def test_batch_composition_keeps_the_labeled_batch_and_adds_unlabeled_rows_on_top():
    """The semi-supervised arm sees as many labeled rows as the supervised one (the plan's batch)."""
    assert batch_composition(4, True, 0.5, 1) == (4, 2)
    assert batch_composition(5, True, 1.0, 1) == (5, 5)
    assert batch_composition(1, True, 0.5, 1) == (1, 1)  # at least one unlabeled row
    assert batch_composition(2, False, 1.0, 1) == (2, 0)
    assert batch_composition(2, True, 0.0, 1) == (2, 0)
    # the planner budgets the rows the default trainer draws: 3 labeled + 2 unlabeled (round(1.5)), 2 + 1
    for labeled in (1, 2, 3, 4):
        assert batch_composition(labeled, True, CMCTrainer.unlabeled_batch_ratio, 1)[1] == unlabeled_rows_for(labeled)
    assert [unlabeled_rows_for(n) for n in (1, 2, 3, 4)] == [1, 1, 2, 2]


def test_select_fold_cases_supervised_at_full_fraction():
    splits = {"folds": [{"train": ["a", "b", "c"], "val": ["d"], "unlabeled": ["u"], "labeled_order": ["b", "a", "c"]}]}
    half = select_fold_cases(splits, 0, 0.5, unlabeled_when_fully_labeled=False)
    assert half.labeled == ["b", "a"] and sorted(half.unlabeled) == ["c", "u"] and half.validation == ["d"]
    full = select_fold_cases(splits, 0, 1.0, unlabeled_when_fully_labeled=False)
    assert full.labeled == ["b", "a", "c"] and full.unlabeled == []


def test_registry_names_and_module_paths():
    assert TRAINERS["cmc"] is CMCTrainer
    assert get_trainer_class("CMCTrainer") is CMCTrainer
    assert get_trainer_class("cmcseg.training.cmc_trainer:CMCTrainer") is CMCTrainer
    with pytest.raises(CmcsegError, match="unknown trainer"):
        get_trainer_class("nope")


def test_history_roundtrip_and_plot(tmp_path):
    history = MetricsHistory()
    history.append(0, {"loss/total": 1.0, "dice/LV": 0.1, "pseudo_dice": 0.1, "lr": 0.01, "epoch_time": 3.0})
    history.append(1, {"loss/total": 0.8, "loss/cac": 0.3, "dice/LV": 0.2, "pseudo_dice": 0.2, "lr": 0.005,
                       "epoch_time": 2.0})
    again = MetricsHistory()
    again.load_state_dict(history.state_dict())
    assert again.epochs == [0, 1] and math.isnan(again.values["loss/cac"][0])
    plot_progress(again, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".tmp-*"))


def test_progress_after_one_epoch_shows_every_series_in_its_panel():
    """Any2Seg's first epoch: total equals segmentation, and modalities_per_row is not a loss."""
    history = MetricsHistory()
    history.append(0, loss_metrics({"loss": 0.9, "segmentation": 0.9, "lscd": 0.0, "modalities_per_row": 2.5,
                                    "weight/lscd": 0.0}) | {"pseudo_dice": 0.3, "lr": 0.01, "epoch_time": 4.0})
    ax_loss, ax_weight, ax_dice, _, ax_lr, ax_time = progress_figure(history).axes
    labels = {ax: [line.get_label() for line in ax.lines] for ax in (ax_loss, ax_weight)}
    assert sorted(labels[ax_loss]) == ["lscd", "segmentation", "total"]
    assert "modalities_per_row" in labels[ax_weight]
    total = next(line for line in ax_loss.lines if line.get_label() == "total")
    segmentation = next(line for line in ax_loss.lines if line.get_label() == "segmentation")
    assert total.get_linewidth() > segmentation.get_linewidth()  # a band under the term, not hidden by it
    for ax in (ax_loss, ax_dice, ax_lr, ax_time):  # one epoch is one point: it needs a marker to show
        assert ax.lines and all(line.get_marker() not in (None, "", "None") for line in ax.lines)


def test_case_dice_is_nan_for_a_class_absent_from_both():
    labels = LabelInfo(("a", "b", "c"), (1, 2, 3), 4, None)
    reference = np.array([[[[0, 1, 1, 2]]]])
    probabilities = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 2, 2]]]), 4).permute(3, 0, 1, 2).float()
    dice = case_dice(probabilities, reference, labels)
    assert dice["a"] == pytest.approx(2 / 3) and dice["b"] == pytest.approx(2 / 3) and math.isnan(dice["c"])


def test_checkpoint_manager_cleans_stale_temporaries(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"network": {"w": torch.ones(2)}, "optimizer": {}}, "latest")
    (tmp_path / ".tmp-checkpoint_latest.pt-abc.pt").write_bytes(b"trunc")
    assert manager.resume_path() == tmp_path / "checkpoint_latest.pt"
    assert len(manager.remove_stale_temporaries()) == 1
    assert_checkpoints_load(tmp_path)


def test_a_validation_precision_a_cpu_cannot_use_is_refused_before_training(planned, tmp_path):
    """inference_precision is resolved when the trainer starts, not when the final validation runs hours later."""
    trainer = type("HalfValidation", (TinyCMCTrainer,), {"inference_precision": "float16"})(
        request(fresh_roots(planned, tmp_path)))
    try:
        with pytest.raises(CmcsegError, match="float16 is for GPUs.*--precision bfloat16 or float32"):
            trainer.initialize()
        assert trainer.current_epoch == 0 and not list(trainer.output_folder.glob("checkpoint_*.pt"))
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------- end-to-end
@pytest.mark.slow
def test_two_epoch_run_writes_outputs_and_continue_resumes(planned, tmp_path, monkeypatch):
    import cmcseg.training.validation as validation

    batch_sizes = []
    original = validation.predict_case

    def spy(*args, **kwargs):
        batch_sizes.append(args[6] if len(args) > 6 else kwargs.get("batch_size"))
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "predict_case", spy)
    roots = fresh_roots(planned, tmp_path)
    trainer = TinyCMCTrainer(request(roots))
    folder = trainer.run()
    # the final validation leaves the windows per pass to cmcseg.sliding_window.auto_window_batch, as predict does
    assert batch_sizes and set(batch_sizes) == {None}, batch_sizes
    # and computes in the precision cmcseg predict would use on this CPU, or the one a subclass sets
    conv, x = torch.nn.Conv3d(1, 1, 3), torch.randn(1, 1, 3, 3, 3)
    for precision, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        trainer.inference_precision = precision
        with trainer.inference_autocast():
            assert conv(x).dtype == dtype
    # training stays in float32 on a CPU unless cpu_bfloat16 asks, and the CPU computes bfloat16 natively
    assert not trainer.use_amp
    with trainer.autocast():
        assert conv(x).dtype == torch.float32
    trainer.cpu_bfloat16 = True
    for native in (False, True):
        monkeypatch.setattr(trainer_module, "cpu_computes_bfloat16", lambda native=native: native)
        assert trainer.use_amp == native
        with trainer.autocast():
            assert conv(x).dtype == (torch.bfloat16 if native else torch.float32)
    assert folder == roots.results / DATASET / "TinyCMCTrainer__3d_fullres__labeled0.5" / "fold_0"
    assert {p.name for p in assert_checkpoints_load(folder)} == {
        "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"}
    log_text = (folder / "log.txt").read_text()
    assert "epoch 1" in log_text and "pseudo-Dice" in log_text
    # a collapse is visible as it happens: every term's weight, each head's foreground mass, each head's Dice
    for needle in ("weight/pseudo_label", "weight/csc", "mass/all/RV", "mass/all/myocardium", "head reliability",
                   "head T2 alone", "CSC is off"):
        assert needle in log_text, needle
    assert (folder / "progress.png").read_bytes()[:8] == PNG_MAGIC
    with Image.open(folder / "progress.png") as image:
        image.verify()
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"myocardium", "LV", "RV"}
    assert summary["num_cases"] == len(summary["per_case"]) >= 1
    assert set(summary["per_head"]) == {"bSSFP", "LGE", "T2"}
    for head in summary["per_head"].values():
        assert set(head["per_case"]) == set(summary["per_case"]) and set(head["mean"]) == {"myocardium", "LV", "RV"}
    for per_class in summary["per_case"].values():
        assert set(per_class) == {"myocardium", "LV", "RV"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in per_class.values())  # None: class absent from both
    config = json.loads((folder / "training_config.json").read_text())
    assert config["labeled_ids"] == labeled_subset(load_splits(planned.preprocessed / DATASET / "splits.json"), 0, 0.5)
    assert config["labeled_batch_size"] == 4 and config["unlabeled_batch_size"] == 2  # the plan's batch, ratio 0.5
    assert len(config["plans_sha256"]) == 64

    final = torch.load(folder / "checkpoint_final.pt", weights_only=True)
    saved = torch.load(folder / "checkpoint_latest.pt", weights_only=True)  # written again at the end
    assert "optimizer" not in final and "rng" not in final and "extra" not in final  # final: weights + metadata
    assert all(torch.equal(final["network"][k], v) for k, v in saved["network"].items())
    size = {kind: (folder / f"checkpoint_{kind}.pt").stat().st_size for kind in ("final", "latest")}
    assert size["final"] < 0.5 * size["latest"]  # no optimizer momentum, no EMA teacher
    resumed = TinyCMCTrainer(request(roots, num_epochs=3, continue_training=True))
    resumed.initialize()
    assert resumed.current_epoch == 2 == saved["epoch"]
    assert_same_optimizer_state(resumed.optimizer.state_dict(), saved["optimizer"])
    resumed.run()
    assert resumed.history.epochs == [0, 1, 2]
    assert load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == 3
    assert "resumed from" in (folder / "log.txt").read_text()
    assert len(json.loads((folder / "training_config.json").read_text())["resumes"]) == 1


@pytest.mark.slow
def test_sigkilled_run_leaves_loadable_checkpoints_and_resumes(planned, tmp_path):
    roots = fresh_roots(planned, tmp_path)
    folder = roots.results / DATASET / "TinyCMCTrainer__3d_fullres__labeled0.5" / "fold_0"
    command = [sys.executable, "-m", "cmcseg", "train", "-d", "MSCMR", "-f", "0", "--labeled", "0.5",
               "--trainer", "test_trainer:TinyCMCTrainer", "--epochs", "3", "--iters-per-epoch", "10",
               "--val-iters", "1", "--device", "cpu", "-np", "0", *root_flags(roots)]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and process.poll() is None:
            log_file = folder / "log.txt"
            if (folder / "checkpoint_latest.pt").is_file() and log_file.is_file() \
                    and "epoch 1, learning rate" in log_file.read_text():
                break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (folder / "checkpoint_final.pt").exists()
    for path in folder.glob("checkpoint*.pt"):
        assert "network" in load_checkpoint(path)  # none truncated
    saved = torch.load(folder / "checkpoint_latest.pt", weights_only=True)

    resumed = TinyCMCTrainer(request(roots, num_epochs=3, iterations_per_epoch=10, continue_training=True))
    resumed.initialize()
    assert resumed.current_epoch == saved["epoch"] == 1
    assert_same_optimizer_state(resumed.optimizer.state_dict(), saved["optimizer"])
    resumed.run()
    assert resumed.history.epochs == [0, 1, 2]
    assert_checkpoints_load(folder)
    assert (folder / "validation" / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("term, trainer_class", [("csc", TinyBranchesTrainer), ("pseudo_label", TinyBranchesTrainer),
                                                 ("pseudo_label", TinyCMCTrainer), ("cac", TinyCMCTrainer)])
def test_unlabeled_losses_send_gradient_into_encoders(planned, tmp_path, term, trainer_class):
    """The public CMC code ran its unlabeled pass under no_grad; here each unlabeled term trains the encoders (every
    branch's, or the one network's)."""
    trainer = trainer_class(request(fresh_roots(planned, tmp_path)))
    trainer.initialize()
    try:
        trainer.supervised_weight = 0.0
        trainer.ramps = {name: RampUp(1.0 if name == term else 0.0, 0.0, "constant", "fraction")
                         for name in trainer.ramps}
        trainer.pseudo_label_thresholds = class_thresholds(0.0, trainer.labels.num_classes)  # every voxel counts
        batch = next(trainer.dataloader)
        batch["labeled"][:] = False  # an unlabeled-only batch
        for target in batch["target"]:
            target.fill_(-1)
        before = [p.detach().clone() for p in trainer.network.encoders.parameters()]
        output = trainer.train_step(batch)
        assert output["supervised"] == 0.0 and output[term] > 0
        for m, encoder in enumerate(trainer.network.encoders):
            grad = sum(float(p.grad.abs().sum()) for p in encoder.parameters() if p.grad is not None)
            assert grad > 0, f"no gradient from {term} into the encoder of modality {m}"
        after = list(trainer.network.encoders.parameters())
        assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after)), "the step changed nothing"
    finally:
        trainer.close()


@pytest.mark.slow
def test_unlabeled_every_second_step_runs_the_teacher_at_double_weight_then_the_labeled_rows_alone(planned, tmp_path):
    """``unlabeled_every = 2``: a step with the unlabeled rows and the teacher at twice the weight, then one that runs
    only the labeled rows (the cost of a supervised step) and no teacher."""
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path)))
    trainer.unlabeled_every = 2
    trainer.initialize()
    try:
        trainer.ramps = {name: RampUp(1.0 if name == "pseudo_label" else 0.0, 0.0, "constant", "fraction")
                         for name in trainer.ramps}
        teacher_rows: list[int] = []
        real_teacher = trainer.teacher_prediction
        trainer.teacher_prediction = lambda x: (teacher_rows.append(len(x)), real_teacher(x))[1]  # type: ignore
        student_rows: list[int] = []
        trainer.network.register_forward_pre_hook(lambda _m, args: student_rows.append(len(args[0])))
        batch = next(trainer.dataloader)
        labeled = int(batch["labeled"].sum())
        assert 0 < labeled < len(batch["labeled"])
        outputs = []
        for step in (0, 1, 2):
            trainer.global_step = step
            outputs.append(trainer.train_step(copy.deepcopy(batch)))
        assert [o["weight/pseudo_label"] for o in outputs] == [2.0, 0.0, 2.0]
        assert teacher_rows == [len(batch["labeled"]) - labeled] * 2
        assert student_rows == [len(batch["labeled"]), labeled, len(batch["labeled"])]
        means = epoch_means(outputs)  # the epoch's log: a weight over every step, a diagnostic over its own steps
        assert means["weight/pseudo_label"] == pytest.approx(4 / 3)
        assert "pseudo_label_kept" not in outputs[1]
        assert means["pseudo_label_kept"] == pytest.approx((outputs[0]["pseudo_label_kept"]
                                                            + outputs[2]["pseudo_label_kept"]) / 2)
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("floor, kept", [(0.0, 0.0), (0.5, 1.0)])
def test_a_class_learned_least_gets_a_lower_threshold_with_an_adaptive_floor(planned, tmp_path, floor, kept):
    """The teacher calls every unlabeled voxel the class learned least, at 0.6: below the fixed 0.8, so nothing is
    kept; with ``adaptive_threshold_floor = 0.5`` that class's threshold falls to 0.5 and every voxel is kept."""
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path)))
    trainer.unlabeled_every = 1
    trainer.adaptive_threshold_floor = floor
    trainer.copy_paste_box = 0.0  # no labeled content pasted in: the pseudo-label loss sees the kept voxels alone
    trainer.initialize()
    try:
        trainer.ramps = {name: RampUp(1.0 if name == "pseudo_label" else 0.0, 0.0, "constant", "fraction")
                         for name in trainer.ramps}
        network = trainer.inference_network()
        K = trainer.labels.num_classes
        network.head_reliability.fill_(0.9)
        network.head_reliability[:, K - 1] = 0.1  # the last class: a ninth of the best class's reliability

        def teacher(x: torch.Tensor) -> torch.Tensor:
            fused = torch.full((len(x), K, *x.shape[2:]), 0.4 / (K - 1))
            fused[:, K - 1] = 0.6
            return fused

        trainer.teacher_prediction = teacher  # type: ignore[method-assign]
        output = trainer.train_step(next(trainer.dataloader))
        assert float(output["pseudo_label_kept"]) == pytest.approx(kept)
        assert (float(output["pseudo_label"]) > 0) == (kept > 0)
    finally:
        trainer.close()


@pytest.mark.slow
def test_reliability_is_each_head_dice_per_class_on_the_labeled_rows_inside_its_fov(planned, tmp_path):
    """A known prediction against a known label map: the first update sets ``head_reliability`` to the Dice per
    class of the labeled row inside the head's field of view. The unlabeled row and the voxel out of view count for
    nothing, and a class present but never found gets the floor. (The phantom's 4 classes are all present here;
    a dataset with more would see the rest keep 1.)"""
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path)))
    trainer.initialize()
    try:
        network = trainer.inference_network()
        K, M = trainer.labels.num_classes, network.n_branches
        assert K >= 4
        target = torch.zeros(2, 1, 1, 2, 4, dtype=torch.long)
        target[0, 0, 0, 0] = torch.tensor([1, 1, 2, 2])
        target[0, 0, 0, 1] = torch.tensor([3, 0, 0, 0])
        predicted = torch.zeros(2, 1, 2, 4, dtype=torch.long)
        predicted[0, 0, 0] = torch.tensor([1, 2, 2, 2])
        predicted[0, 0, 1] = torch.tensor([0, 0, 0, 1])  # this 1 lies out of view
        predicted[1] = 1  # the unlabeled row, all wrong
        logits = torch.nn.functional.one_hot(predicted, K).permute(0, 4, 1, 2, 3).float() * 5.0
        fov = torch.ones(2, M, 1, 2, 4)
        fov[:, :, 0, 1, 3] = 0
        trainer.update_reliability([[logits]] * M, target, torch.tensor([True, False]), fov)
        # 2 TP / (2 TP + FP + FN): background 2, 1, 0; class 1: 1, 0, 1; class 2: 2, 1, 0; class 3: 0, 0, 1
        expected = torch.tensor([0.8, 2 / 3, 0.8, trainer.reliability_floor] + [1.0] * (K - 4))
        for m in range(M):
            torch.testing.assert_close(network.head_reliability[m].float(), expected)
        confusion = torch.zeros(K, K, dtype=torch.float64)  # [true, predicted] of the 7 labeled voxels in view
        for true, guess in ((1, 1), (1, 2), (2, 2), (2, 2), (3, 0), (0, 0), (0, 0)):
            confusion[true, guess] += 1
        torch.testing.assert_close(trainer.confusion_counts, confusion.expand(M, K, K))
    finally:
        trainer.close()


def test_unlabeled_every_that_is_not_a_step_count_is_a_clear_error(planned, tmp_path):
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path)))
    trainer.unlabeled_every = 0
    with pytest.raises(CmcsegError, match="unlabeled_every is 0.*Fix: set it to a whole number >= 1"):
        trainer.initialize()
    trainer.close()


@pytest.mark.slow
def test_a_train_step_makes_set_valued_pseudo_labels_from_the_confusion_or_from_groups(planned, tmp_path):
    """The labeled rows' confusion says half the voxels predicted as the last class (3 of the phantom's 4) are class
    2: with ``confusion_share = 0.3`` a 3 stands for {2, 3} (mean candidates per class 5 / 4); with
    ``confusable_classes = ((2, 3),)`` a 2 or a 3 stands for both (6 / 4). A teacher that calls every unlabeled voxel
    3 then teaches less than with hard labels (the student, still near uniform, already puts mass on both)."""
    outputs = {}
    for name, attributes in (("hard", {}), ("share", {"confusion_share": 0.3}),
                             ("groups", {"confusable_classes": ((2, 3),)})):
        trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path / name)))
        trainer.unlabeled_every = 1
        for key, value in attributes.items():
            setattr(trainer, key, value)
        trainer.initialize()
        try:
            trainer.ramps = {key: RampUp(1.0 if key == "pseudo_label" else 0.0, 0.0, "constant", "fraction")
                             for key in trainer.ramps}
            K = trainer.labels.num_classes
            assert K == 4
            confusion = torch.eye(K, dtype=torch.float64) * 100
            confusion[2, 3] = 100.0  # [true, predicted]
            trainer.confusion_counts = confusion.expand(trainer.inference_network().n_branches, K, K).clone()

            def teacher(x: torch.Tensor, k: int = K) -> torch.Tensor:
                fused = torch.full((len(x), k, *x.shape[2:]), 0.1 / (k - 1))
                fused[:, k - 1] = 0.9
                return fused

            trainer.teacher_prediction = teacher  # type: ignore[method-assign]
            torch.manual_seed(0)
            outputs[name] = trainer.train_step(next(trainer.dataloader))
        finally:
            trainer.close()
    assert "pseudo_label_candidates" not in outputs["hard"]
    assert float(outputs["share"]["pseudo_label_candidates"]) == pytest.approx(5 / 4)
    assert float(outputs["groups"]["pseudo_label_candidates"]) == pytest.approx(6 / 4)
    for name in ("share", "groups"):
        assert 0 < float(outputs[name]["pseudo_label"]) < float(outputs["hard"]["pseudo_label"])


def test_set_valued_pseudo_labels_and_merged_classes_together_are_a_clear_error(planned, tmp_path):
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path)))
    trainer.confusion_share, trainer.learned_reliability = 0.2, 0.5
    with pytest.raises(CmcsegError, match="and learned_reliability, cannot both be on.*Fix: set learned_reliab"):
        trainer.initialize()
    trainer.close()


def test_confusable_classes_outside_the_foreground_are_a_clear_error(planned, tmp_path):
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path)))
    trainer.confusable_classes = ((1, 9),)
    with pytest.raises(CmcsegError, match=r"confusable_classes \(\(1, 9\),\) names a class outside.*Fix: give"):
        trainer.initialize()
    trainer.close()


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_parameters(planned, tmp_path):
    roots = fresh_roots(planned, tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "cmcseg", "train", "-d", "MSCMR", "-f",
               "0", "--labeled", "0.5", "--trainer", "test_trainer:DumpingTinyCMCTrainer", "--epochs", "1",
               "--iters-per-epoch", "2", "--val-iters", "1", "--device", "cpu", "-np", "0", *root_flags(roots)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-4000:]
    folder = roots.results / DATASET / "DumpingTinyCMCTrainer__3d_fullres__labeled0.5" / "fold_0"
    rank0 = torch.load(folder / "params_rank0.pt")
    rank1 = torch.load(folder / "params_rank1.pt")
    final = load_checkpoint(folder / "checkpoint_final.pt")["network"]
    assert rank0.keys() == rank1.keys() == final.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ in {key}"
        assert torch.equal(rank0[key], final[key])
    config = json.loads((folder / "training_config.json").read_text())
    assert config["world_size"] == 2 and config["labeled_batch_size"] == 2 and config["unlabeled_batch_size"] == 1
    assert (folder / "validation" / "summary.json").is_file()
    assert "(2 processes)" in result.stdout


@pytest.mark.slow
def test_labeled_fraction_one_is_supervised(planned, tmp_path):
    trainer = RecordingTinyCMCTrainer(request(fresh_roots(planned, tmp_path), fraction=1.0, num_epochs=1))
    folder = trainer.run()
    splits = load_splits(planned.preprocessed / DATASET / "splits.json")
    assert folder.parent.name == "RecordingTinyCMCTrainer__3d_fullres__labeled1.0"
    assert trainer.cases.labeled == labeled_subset(splits, 0, 1.0)
    assert trainer.cases.unlabeled == [] and trainer.unlabeled_batch_size == 0
    assert len(trainer.seen_labeled) == 2 and all(bool(flags.all()) for flags in trainer.seen_labeled)
    config = json.loads((folder / "training_config.json").read_text())
    assert config["labeled_ids"] == labeled_subset(splits, 0, 1.0) and config["unlabeled_ids"] == []


def test_a_trainer_of_ones_own_builds_its_network_for_prediction_too(planned, tmp_path):
    """`--trainer module:Class` with its own build_network_architecture trains, and predicts with the same network;
    without --trainer, CMCTrainer's network does not fit the weights and the error names the fix."""
    roots = fresh_roots(planned, tmp_path)
    folder = ScaledTinyTrainer(request(roots, fraction=1.0, num_epochs=1)).run()
    assert "output_scale" in load_checkpoint(folder / "checkpoint_final.pt")["network"]
    images = tmp_path / "in"
    images.mkdir()
    case = sorted((planned.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    for path in (planned.raw / DATASET / "imagesTr").glob(f"{case}_*.nii.gz"):
        (images / path.name).write_bytes(path.read_bytes())
    command = [sys.executable, "-m", "cmcseg", "predict", "-i", str(images), "-m", str(folder.parent), "--no-tta",
               "--device", "cpu"]
    ours = subprocess.run([*command, "-o", str(tmp_path / "out"), "--trainer", "test_trainer:ScaledTinyTrainer"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert (tmp_path / "out" / f"{case}.nii.gz").is_file()
    plain = subprocess.run([*command, "-o", str(tmp_path / "plain")], env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode != 0
    assert "output_scale" in plain.stderr and "--trainer module:ScaledTinyTrainer" in plain.stderr
    wrong = subprocess.run([*command, "-o", str(tmp_path / "wrong"), "--trainer", "test_trainer:TinyCMCTrainer"],
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "was trained by ScaledTinyTrainer" in wrong.stderr


@pytest.mark.slow
def test_unpaired_dataset_trains_with_mean_teacher_that_reaches_the_encoders(planned_unpaired, tmp_path):
    """AMOS-like unpaired modalities: no CAC/CSC; a mean-teacher term per modality, with gradient."""
    roots = fresh_roots(planned_unpaired, tmp_path)
    trainer = TinyBranchesTrainer(TrainingRequest("AMOS", 0, 0.5, roots=roots, num_epochs=1, iterations_per_epoch=2,
                                             val_iterations=1, device="cpu", num_workers=0))
    trainer.initialize()
    try:
        assert not trainer.cross_modality and trainer.teacher is not None
        trainer.supervised_weight = 0.0
        trainer.ramps["mean_teacher"] = RampUp(0.1, 0.0, "constant", "fraction")  # past the warm-up
        batch = next(trainer.dataloader)
        batch["labeled"][:] = False
        for target in batch["target"]:
            target.fill_(-1)
        present = trainer.modality_presence(batch["data"])
        assert bool(present.any(dim=1).all()) and not bool(present.all()), "each row has exactly its own modality"
        output = trainer.train_step(batch)
        assert output["mean_teacher"] > 0 and "cac" not in output and "csc" not in output
        for m, encoder in enumerate(trainer.network.encoders):
            if bool(present[:, m].any()):
                assert sum(float(p.grad.abs().sum()) for p in encoder.parameters() if p.grad is not None) > 0
    finally:
        trainer.close()
    folder = TinyCMCTrainer(TrainingRequest("AMOS", 0, 0.5, roots=roots, num_epochs=1, iterations_per_epoch=2,
                                            val_iterations=1, device="cpu", num_workers=0)).run()
    final = load_checkpoint(folder / "checkpoint_latest.pt")  # the resumable one holds the teacher
    assert "teacher" in final["extra"] and "loss/mean_teacher" in final["history"]["values"]
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"spleen", "right_kidney", "left_kidney", "liver", "aorta"}


@pytest.mark.slow
def test_a_frozen_encoder_learns_nothing_until_its_iterations_are_over_then_at_its_scaled_rate(planned, tmp_path):
    """--freeze-encoder-iters 1 --encoder-lr-scale 0.25: the first step moves the decoder, not the encoder; later
    steps move both, the encoder at a quarter of the poly rate; training_config.json and the checkpoint record it."""
    trainer = TinyCMCTrainer(request(fresh_roots(planned, tmp_path), freeze_encoder=1, encoder_lr_scale=0.25))
    trainer.initialize()
    try:
        encoder = trainer.encoder_parameters()
        assert encoder and {id(p) for p in encoder} == {id(p) for p in trainer.network.encoders.parameters()}
        trainer.lr_scheduler.step(0)
        rates = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert rates[0.25] == pytest.approx(0.25 * rates[1.0]) and rates[1.0] == pytest.approx(trainer.initial_lr)

        def step() -> tuple[bool, bool]:
            before = [p.detach().clone() for p in trainer.network.parameters()]
            trainer.train_step(next(trainer.dataloader))
            trainer.global_step += 1
            moved = {id(p): not torch.equal(b, p.detach()) for b, p in zip(before, trainer.network.parameters())}
            return any(moved[id(p)] for p in encoder), any(v for k, v in moved.items() if k not in map(id, encoder))

        assert step() == (False, True), "during the freeze only the rest of the network learns"
        assert step() == (True, True), "after it the encoder learns too"
        config = json.loads((trainer.output_folder / "training_config.json").read_text())
        hyper = config["hyperparameters"]
        assert hyper["freeze_encoder"] == 1 and hyper["encoder_lr_scale"] == 0.25
    finally:
        trainer.close()


def test_encoder_options_and_the_weights_source_travel_in_the_checkpoint(tmp_path):
    """The encoder class's options reach the checkpoint's init (prediction rebuilds from it), and a weights file is
    recorded by name, size and SHA-256, not by path."""
    weights = tmp_path / "enc.pt"
    weights.write_bytes(b"0123456789")
    trainer = TinyCMCTrainer(TrainingRequest("MSCMR", 0, 0.2, roots=WorkRoots(tmp_path, tmp_path, tmp_path),
                                             encoder="swinunetr", encoder_options={"feature_size": 24},
                                             encoder_weights=weights))
    options = trainer.network_options()
    assert options["encoder"] == "swinunetr" and options["encoder_options"] == {"feature_size": 24}
    assert options["encoder_weights_source"] == {
        "file": "enc.pt", "bytes": 10, "sha256": "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"}
    with pytest.raises(CmcsegError, match="--encoder-lr-scale"):
        TinyCMCTrainer(TrainingRequest("MSCMR", 0, 0.2, encoder_lr_scale=0.0))


def test_each_modality_is_scored_alone_only_where_the_network_learned_to_read_one() -> None:
    """The default single network trained without modality drops skips the per-modality validation (M more passes per
    window for scores near zero); branch heads, modality drops and an explicit setting keep it."""
    from types import SimpleNamespace

    def scores(**attributes) -> bool:
        defaults = {"validate_each_modality": None, "single_branch": True, "strong_drop_modality": 0.0}
        return CMCTrainer.scores_each_modality(SimpleNamespace(**{**defaults, **attributes}))  # type: ignore[arg-type]

    assert CMCTrainer.validate_each_modality is None
    assert not scores()
    assert scores(single_branch=False)
    assert scores(strong_drop_modality=0.5)
    assert scores(validate_each_modality=True)
    assert not scores(single_branch=False, validate_each_modality=False)
