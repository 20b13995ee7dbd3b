"""``cmcseg demo``: the whole pipeline on an MSCMR phantom, on a CPU, within a time budget.

Steps, all under one work folder (``raw/``, ``preprocessed/``, ``results/``, ``predictions/``):

1. **synth**: the MSCMR phantom (bSSFP, LGE and T2 on their own, misaligned grids; some cases
   unlabeled), ``small`` by default;
2. **plan**: 3d_fullres with a small memory budget, so that patch and batch suit a CPU;
3. **train** fold 0 with ``--labeled 0.2`` with :class:`DemoCMCTrainer` (the CMC trainer with a
   small network). After its first epoch it fits the number of epochs to the time left, so the
   learning rate still decays to zero; the trainer's ``max_seconds`` is the hard stop;
4. **predict** the held-out cases of fold 0 from their raw images (``cmcseg predict``'s code path,
   mirroring TTA on), on the LGE grid;
5. **evaluate** them against their labels (``cmcseg evaluate``'s code), with a chance level per
   class: the Dice of a random labelling with the reference's class frequencies;
6. **look**: ``overlay.png`` shows one case's LGE slice, its reference and the prediction side by side.

:func:`run_demo` returns a :class:`DemoResult` that says where every output went.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cmcseg.errors import CmcsegError
from cmcseg.image_io import atomic_path, read_json, write_json_atomic
from cmcseg.paths import WorkRoots
from cmcseg.plans.files import DATASET_FILE, PLANS_FILE
from cmcseg.training.cmc_trainer import CMCTrainer
from cmcseg.training.registry import register_trainer

log = logging.getLogger(__name__)

DATASET = "MSCMR"
DATASET_FOLDER = "Dataset501_MSCMR"
FOLD = 0
LABELED_FRACTION = 0.2
CONFIGURATION = "3d_fullres"
#: nnU-Net's rule at this budget plans the demo's patch and batch ([8, 64, 64], 2 on the small phantom), which a
#: CPU trains in a fraction of a second per iteration. The demo trains its own small network (``demo_features``),
#: not the plan's, so the planner's estimate for the plan's network does not apply; the trainer logs its own.
MEMORY_GB = 0.5 / 3
#: seconds kept for the final validation, prediction, evaluation and the overlay after training, per phantom size
#: (measured on 2 idle cores, small: 6 s + 3 s + 0.5 s; the rest is headroom for a slower machine)
RESERVE_SECONDS = {"tiny": 15.0, "small": 30.0}
#: the demo's default time budget: with the ~2-minute install, `make demo` stays within 8 minutes
DEFAULT_MINUTES = 5.0
OVERLAY_FILE = "overlay.png"
SUMMARY_FILE = "demo_summary.json"
#: label colours of the overlay (myocardium, LV, RV, ...)
_COLOURS = ("#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd")


class DemoCMCTrainer(CMCTrainer):
    """CMCTrainer with a small network for a CPU demo, and an epoch count fitted to its time budget."""

    demo_features: tuple[int, ...] = (8, 16, 32, 64, 64, 64, 64)
    num_workers = 1  # augmentation in one worker process runs beside the network on a 2-core machine
    iterations_per_epoch = 25
    val_iterations = 2
    num_epochs = 1000

    def configure_plans(self, plans: dict) -> dict:
        """The planned network with fewer features and one block per stage (same patch, same topology)."""
        plans = copy.deepcopy(plans)
        arch = plans["configurations"][self.configuration]["architecture"]["arch_kwargs"]
        n = int(arch["n_stages"])
        arch["features_per_stage"] = [min(f, d) for f, d in zip(arch["features_per_stage"], self.demo_features)]
        arch["n_blocks_per_stage"] = [1] * n
        if "n_conv_per_stage_decoder" in arch:
            arch["n_conv_per_stage_decoder"] = [1] * (n - 1)
        return plans

    def on_train_start(self) -> None:
        super().on_train_start()
        self.adapt_threads(own_load=0.0)

    def adapt_threads(self, own_load: float) -> None:
        """Torch threads for the machine's load (see :func:`threads_for_load`); ``own_load`` is this run's share of
        the 1-minute load average."""
        threads = threads_for_load(os.getloadavg()[0] - own_load, os.cpu_count() or 1)
        if threads != torch.get_num_threads():
            log.info("demo: load average %.1f: %d torch thread(s) (was %d)", os.getloadavg()[0], threads,
                     torch.get_num_threads())
            torch.set_num_threads(threads)

    def on_epoch_end(self, train_outputs: list, val_outputs: list) -> None:
        """After every epoch of a budgeted run, re-plan the epochs that fit what is left of the budget at the last
        epoch's pace, so that the run ends on time even when the machine slows down (or speeds up) mid-run; and
        re-pick the torch threads for the load."""
        super().on_epoch_end(train_outputs, val_outputs)
        self.adapt_threads(own_load=float(torch.get_num_threads()))
        started = getattr(self, "_run_started", None)
        if self.max_seconds is None or started is None:
            return
        fitted = fit_epochs(self.max_seconds, time.monotonic() - started, self.history.last("epoch_time", 1.0),
                            self.current_epoch)
        if fitted != self.num_epochs:
            log.info("demo: the last epoch took %.1f s; %d epoch(s) in all fit the %.0f s budget (was %d)",
                     self.history.last("epoch_time", 1.0), fitted, self.max_seconds, self.num_epochs)
            self.num_epochs = fitted
            self.lr_scheduler.max_steps = fitted


def threads_for_load(other_load: float, cores: int) -> int:
    """Every core when the others leave them free; one thread as soon as other work holds about a core.

    Intra-op threads wait for each other at every operation, so on an oversubscribed CPU two threads ran a demo
    epoch 12x slower than idle (load 5 on 2 cores), where one thread was 1.5-2.8x faster than two.
    """
    return max(1, cores) if other_load < 1.0 else 1


def fit_epochs(budget_s: float, elapsed_s: float, last_epoch_s: float, epochs_done: int) -> int:
    """How many epochs in all fit ``budget_s``: those done, plus what is left of the budget at the last epoch's
    pace (never fewer than those done: then training stops now)."""
    left = int(max(0.0, budget_s - elapsed_s) / max(last_epoch_s, 1e-3))
    return epochs_done + left


register_trainer("demo", DemoCMCTrainer)


@dataclass
class DemoResult:
    """Where the demo's outputs went, the scores and the time of each step."""

    work: Path
    roots: WorkRoots
    model_folder: Path
    predictions: Path
    overlay: Path
    summary_file: Path
    validation_cases: list[str]
    dice: dict[str, float]
    chance: dict[str, float]
    epochs_trained: int
    timings: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def dice_table(self) -> str:
        """Per class: mean Dice over the held-out cases, the chance level and the margin."""
        rows = [("class", "Dice", "chance", "above chance")]
        for name, value in self.dice.items():
            chance = self.chance.get(name, math.nan)
            rows.append((name, _fmt(value), _fmt(chance), _fmt(value - chance)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

    def as_dict(self) -> dict:
        return {"work": str(self.work), "raw": str(self.roots.raw), "preprocessed": str(self.roots.preprocessed),
                "results": str(self.roots.results), "model_folder": str(self.model_folder),
                "predictions": str(self.predictions), "overlay": str(self.overlay),
                "validation_cases": self.validation_cases, "dice": self.dice, "chance": self.chance,
                "epochs_trained": self.epochs_trained, "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
                "failed": self.failed}


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    log.info("demo: %s", step)
    try:
        yield
    finally:
        timings[step] = time.perf_counter() - start
        log.info("demo: %s took %.1f s", step, timings[step])


# ------------------------------------------------------------------------------------------- steps
def synthesize_and_plan(roots: WorkRoots, size: str, workers: int) -> None:
    """The phantom raw dataset and its 3d_fullres plan and preprocessed arrays."""
    from cmcseg.phantoms import synthesize
    from cmcseg.plans.plan_and_preprocess import plan_and_preprocess

    synthesize(DATASET, roots.raw / DATASET_FOLDER, seed=0, size=size)
    plan_and_preprocess(DATASET, roots, configurations=[CONFIGURATION], num_workers=workers, memory_gb=MEMORY_GB,
                        fit_memory=False)


def train(roots: WorkRoots, max_seconds: float, device: str) -> Path:
    """Fold 0 at --labeled 0.2 with :class:`DemoCMCTrainer` within ``max_seconds``; returns the fold folder."""
    from cmcseg.training.trainer import TrainingRequest

    request = TrainingRequest(DATASET, FOLD, LABELED_FRACTION, configuration=CONFIGURATION, roots=roots,
                              device=device, max_seconds=max_seconds,
                              command=f"cmcseg demo (DemoCMCTrainer, fold {FOLD}, --labeled {LABELED_FRACTION})")
    return DemoCMCTrainer(request).run()


def predict_validation_cases(roots: WorkRoots, model_folder: Path, case_ids: Sequence[str], output: Path,
                             device: str):
    """The held-out cases, from their raw images, with ``cmcseg predict``'s code."""
    from cmcseg.dataset import Dataset
    from cmcseg.prediction.cases import InputCase
    from cmcseg.prediction.model import load_trained_model
    from cmcseg.prediction.predictor import PredictionOptions, predict_cases

    raw = Dataset.load(roots.raw / DATASET_FOLDER)
    cases = [InputCase(c.case_id, dict(c.images)) for c in raw.cases if c.case_id in set(case_ids)]
    model = load_trained_model(model_folder, [FOLD], "final")
    return predict_cases(cases, output, model, PredictionOptions(device=device))


def chance_dice(reference_files: Sequence[Path], labels: Mapping[int, str]) -> dict[str, float]:
    """Dice of a random labelling that keeps the reference's class frequencies: the class's voxel fraction."""
    counts = np.zeros(max(labels) + 1)
    total = 0
    for path in reference_files:
        array = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
        counts += np.bincount(array.ravel().astype(np.int64), minlength=len(counts))[:len(counts)]
        total += array.size
    return {name: float(counts[value] / total) for value, name in labels.items()}


def evaluate(roots: WorkRoots, predictions: Path, labels: Mapping[int, str]) -> dict[str, float]:
    """Mean Dice per class of the predictions against the raw labels (``cmcseg evaluate``'s code)."""
    from cmcseg.evaluation import evaluate_folders

    result = evaluate_folders(roots.raw / DATASET_FOLDER / "labelsTr", predictions, labels=sorted(labels),
                              label_names=labels, allow_missing=True)
    result.write(predictions)
    return {labels[int(k)]: float(v["Dice"]) for k, v in result.summary["mean"].items()}


def write_overlay(image_file: Path, reference_file: Path, prediction_file: Path, labels: Mapping[int, str],
                  path: Path, title: str) -> Path:
    """One slice (the one with most foreground in the reference): image | reference | prediction, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))).astype(np.float32)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_file)))
    z = int(np.argmax((reference > 0).reshape(reference.shape[0], -1).sum(1)))
    values = sorted(labels)
    colours = ListedColormap([_COLOURS[i % len(_COLOURS)] for i in range(len(values))])
    low, high = np.percentile(image[z], [1, 99])
    figure = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    panels = (("LGE image", None), ("reference", reference), ("prediction", prediction))
    for i, (name, label_map) in enumerate(panels):
        ax = figure.add_subplot(1, 3, i + 1)
        ax.imshow(image[z], cmap="gray", vmin=low, vmax=high)
        if label_map is not None:
            index = np.searchsorted(values, label_map[z])
            masked = np.ma.masked_where(label_map[z] == 0, index)
            ax.imshow(masked, cmap=colours, vmin=0, vmax=len(values) - 1, alpha=0.5, interpolation="nearest")
        ax.set_title(f"{name} (slice {z})")
        ax.axis("off")
    figure.legend(handles=[Patch(color=_COLOURS[i % len(_COLOURS)], label=labels[v]) for i, v in enumerate(values)],
                  loc="lower center", ncol=len(values))
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


# ------------------------------------------------------------------------------------------- the demo
def run_demo(work: Path | str, minutes: float = DEFAULT_MINUTES, size: str = "small", device: str = "auto",
             workers: int = 2) -> DemoResult:
    """Synth, plan, train (fold 0, --labeled 0.2), predict, evaluate and draw, all within ``minutes``."""
    started = time.perf_counter()
    work = Path(work).absolute()
    roots = WorkRoots(work / "raw", work / "preprocessed", work / "results")
    timings: dict[str, float] = {}
    with _timed(timings, "synth and plan"):
        synthesize_and_plan(roots, size, workers)
    budget = minutes * 60.0 - (time.perf_counter() - started) - RESERVE_SECONDS.get(size, 30.0)
    if budget < 10:
        raise CmcsegError(f"--minutes {minutes} leaves {budget:.0f} s for training after synthesis and planning. "
                          f"Fix: give the demo more minutes (e.g. --minutes {math.ceil(minutes + 2)}).")
    with _timed(timings, "train"):
        fold_folder = train(roots, budget, device)
    validation = read_json(fold_folder / "training_config.json")["validation_ids"]
    predictions = work / "predictions" / f"fold{FOLD}_validation"
    with _timed(timings, "predict"):
        report = predict_validation_cases(roots, fold_folder.parent, validation, predictions, device)
    dataset_json = read_json(roots.raw / DATASET_FOLDER / DATASET_FILE)
    labels = {int(v): str(k) for k, v in dataset_json["labels"].items() if int(v) != 0}
    references = [roots.raw / DATASET_FOLDER / "labelsTr" / f"{c}.nii.gz" for c in report.written]
    if not report.written:
        raise CmcsegError(f"the demo's prediction failed for every held-out case: {report.failed}")
    with _timed(timings, "evaluate and draw"):
        dice = evaluate(roots, predictions, labels)
        first = report.written[0]
        reference_channel = int(read_json(fold_folder.parent / PLANS_FILE)["reference_channel"])
        overlay = write_overlay(roots.raw / DATASET_FOLDER / "imagesTr" / f"{first}_{reference_channel:04d}.nii.gz",
                                references[0], predictions / f"{first}.nii.gz", labels, work / OVERLAY_FILE,
                                f"{first}: LGE, reference, cmcseg prediction (fold {FOLD}, --labeled "
                                f"{LABELED_FRACTION})")
    timings["total"] = time.perf_counter() - started
    summary = read_json(fold_folder / "validation" / "summary.json")
    result = DemoResult(work, roots, fold_folder.parent, predictions, overlay, work / SUMMARY_FILE, validation, dice,
                        chance_dice(references, labels), int(summary.get("epochs_trained", 0)), timings, report.failed)
    write_json_atomic(result.as_dict(), result.summary_file)
    return result
