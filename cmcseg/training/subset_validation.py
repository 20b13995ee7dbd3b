"""Evaluation across modality subsets: one score per non-empty subset of the trained modalities.

A model that segments from any subset is judged on every subset (15 for four modalities), each
validation case predicted from that subset alone. Two scores, as the two communities report them:

* ``miou`` (natural scenes: DELIVER, MCubeS): per class ``IoU = TP / (TP + FP + FN)`` with the
  counts summed over ALL cases of the subset (the dataset-level IoU of semantic-segmentation
  benchmarks), then the mean over the classes that occur (in the reference or the prediction);
* ``dice`` (medical data): per case and class the Dice of the argmax (MONAI's
  ``compute_dice`` through :func:`cmcseg.evaluation.case_dice`), then the mean over
  cases (NaN where a class is absent from both), then over classes.

Classes (:func:`scored_classes`): for ``miou`` every class, 0 included (in DELIVER class 0 is
Building, and a scene benchmark's mIoU averages all classes); for ``dice`` the foreground labels
(nnU-Net's convention). An ``ignore`` label is never scored. The table is written as ``subsets.csv``
(a row per subset, a column per class, the
mean last) and ``subsets.png`` (the same numbers as a heat map), both atomically.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cmcseg.evaluation import case_dice, nanmean, patch_counts
from cmcseg.image_io import atomic_path
from cmcseg.networks.any2seg import non_empty_subsets
from cmcseg.plans.plans import LabelInfo
from cmcseg.preprocessing.storage import load_case
from cmcseg.sliding_window import Predict as Predictor
from cmcseg.sliding_window import predict_case

log = logging.getLogger(__name__)

SUBSET_TABLE_CSV = "subsets.csv"
SUBSET_TABLE_PNG = "subsets.png"
METRICS = ("miou", "dice")


def is_scene_dataset(plans: Mapping) -> bool:
    """A dataset of 2D images (natural scenes: DELIVER, MCubeS), as opposed to 3D medical volumes (also when those
    are trained on their ``2d`` configuration)."""
    return str(plans.get("dimensionality", "3d")).lower() == "2d"


def subset_metric_for(plans: Mapping) -> str:
    """``miou`` for scene datasets, ``dice`` for medical volumes."""
    return "miou" if is_scene_dataset(plans) else "dice"


def scored_classes(plans: Mapping, metric: str) -> LabelInfo:
    """The classes the subset table scores: every class for ``miou``, the foreground for ``dice``."""
    return LabelInfo.every_class(plans) if metric == "miou" else LabelInfo.from_plans(plans)


def subset_name(subset: Sequence[int], modality_names: Sequence[str]) -> str:
    """``RGB+depth`` for the subset (0, 1) of modalities (RGB, depth, ...)."""
    return "+".join(modality_names[m] for m in subset)


class SubsetScores:
    """Accumulates one subset's per-case results; :meth:`scores` gives the per-class score and the mean."""

    def __init__(self, labels: LabelInfo, metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.labels, self.metric = labels, metric
        self.counts = np.zeros((3, len(labels.values)))
        self.per_case: list[dict[str, float]] = []

    def add(self, probabilities: torch.Tensor, reference: np.ndarray) -> None:
        """One case: ``probabilities (K, *spatial)``, ``reference (1, *spatial)``."""
        if self.metric == "miou":
            target = torch.from_numpy(np.asarray(reference).astype(np.int64))[None]
            self.counts += patch_counts(probabilities[None], target, self.labels)
        else:
            self.per_case.append(case_dice(probabilities, reference, self.labels))

    def scores(self) -> dict[str, float]:
        """Score per class name, NaN for a class absent everywhere."""
        if self.metric == "miou":
            tp, fp, fn = self.counts
            union = tp + fp + fn
            return {name: float(tp[i] / union[i]) if union[i] > 0 else math.nan
                    for i, name in enumerate(self.labels.names)}
        return {name: nanmean([case[name] for case in self.per_case]) for name in self.labels.names}


def _subset_groups(subsets: Sequence[tuple[int, ...]], num_classes: int, voxels: int,
                   max_bytes: float) -> list[list[tuple[int, ...]]]:
    """Subsets in groups whose stacked float32 probabilities of one case fit in ``max_bytes``."""
    size = max(1, int(max_bytes // max(1, 4 * num_classes * voxels)))
    return [list(subsets[i:i + size]) for i in range(0, len(subsets), size)]


def evaluate_subsets(predictor_for: Callable[[tuple[int, ...]], Predictor] | None, folder: Path,
                     case_ids: Sequence[str],
                     patch_size: Sequence[int], labels: LabelInfo, modality_names: Sequence[str],
                     device: torch.device, metric: str, step: float = 0.5, sw_batch_size: int | None = None,
                     joint_predictor_for: Callable[[Sequence[tuple[int, ...]]], Predictor] | None = None,
                     max_bytes: float = 2e9, subsets: Sequence[tuple[int, ...]] | None = None) -> pd.DataFrame:
    """The subset table: for each non-empty subset, every labeled case of ``case_ids`` predicted from it.

    ``predictor_for(subset)`` returns the probability function of the network restricted to
    that subset of modality indices. ``joint_predictor_for(subsets)``, given instead, returns one
    function whose output stacks the subsets' probabilities (``(B, S * K, ...)``, e.g.
    :class:`~cmcseg.networks.any2seg.SubsetProbabilities`), so that one sliding window per case
    (per group of subsets whose probabilities fit in ``max_bytes``) scores them all. Returns one
    row per subset with columns ``subset``, ``num_modalities``, one per class, and ``mean`` (the
    mean over classes that occur). ``subsets`` restricts the table to those (default: every one).
    """
    if (predictor_for is None) == (joint_predictor_for is None):
        raise ValueError("pass exactly one of predictor_for and joint_predictor_for")
    subsets = list(subsets) if subsets is not None else non_empty_subsets(len(modality_names))
    scores = {s: SubsetScores(labels, metric) for s in subsets}
    for case_id in case_ids:
        data, seg, fov, _ = load_case(folder, case_id)
        if seg is None:
            log.warning("subset evaluation: case %s has no label in %s; skipped", case_id, folder)
            continue
        data, seg, fov = data[:], seg[:], fov[:]
        if joint_predictor_for is None:
            assert predictor_for is not None, "a predictor per subset, or one for all subsets"
            for subset in subsets:
                with torch.no_grad():
                    probabilities = predict_case(predictor_for(subset), data, fov, patch_size, device, step,
                                                 sw_batch_size)
                scores[subset].add(probabilities, seg)
            continue
        for group in _subset_groups(subsets, labels.num_classes, int(np.prod(seg.shape)), max_bytes):
            with torch.no_grad():
                stacked = predict_case(joint_predictor_for(group), data, fov, patch_size, device, step,
                                       sw_batch_size)
            for subset, probabilities in zip(group, stacked.split(labels.num_classes, dim=0)):
                scores[subset].add(probabilities, seg)
    rows = []
    for subset in subsets:
        per_class = scores[subset].scores()
        rows.append({"subset": subset_name(subset, modality_names), "num_modalities": len(subset), **per_class,
                     "mean": nanmean(list(per_class.values()))})
        log.info("subset %-24s %s %.4f", rows[-1]["subset"], metric, rows[-1]["mean"])
    return pd.DataFrame(rows)


def write_subset_table(table: pd.DataFrame, folder: Path, metric: str, title: str = "") -> tuple[Path, Path]:
    """``subsets.csv`` and the heat map ``subsets.png`` in ``folder`` (atomic); returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    csv_path, png_path = folder / SUBSET_TABLE_CSV, folder / SUBSET_TABLE_PNG
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    columns = [c for c in table.columns if c not in ("subset", "num_modalities")]
    values = table[columns].to_numpy(dtype=float)
    fig = Figure(figsize=(1.1 * len(columns) + 3, 0.38 * len(table) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), table["subset"])
    for (i, j), value in np.ndenumerate(values):
        text = "n/a" if math.isnan(value) else f"{100 * value:.1f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="mIoU" if metric == "miou" else "Dice")
    ax.set_title(title or f"{'mIoU' if metric == 'miou' else 'Dice'} per modality subset")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return csv_path, png_path
