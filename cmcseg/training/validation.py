"""Validation: per-epoch pseudo-Dice on fixed patches, and the full sliding-window validation at the end.

* **Pseudo-Dice** (nnU-Net's online evaluation): each epoch the network predicts the same fixed
  validation patches; true/false positives and false negatives per foreground class are summed
  over all patches (and all DDP ranks) into one Dice per class, ``2 TP / (2 TP + FP + FN)``.
  It is cheap and comparable from epoch to epoch, not a case-level Dice. The counts
  (:func:`cmcseg.evaluation.patch_counts`) use nnU-Net's ``get_tp_fp_fn_tn``.
* **Full validation**: every validation case of the fold is predicted on its whole preprocessed
  array by :func:`cmcseg.sliding_window.predict_case` (nnU-Net's Gaussian-weighted windows, step 0.5, the
  predictor's own function), and Dice
  per class per case is computed with MONAI's ``compute_dice`` (:func:`cmcseg.evaluation.case_dice`). The result goes to
  ``validation/summary.json`` (atomically). It is on the preprocessed grid; the predictor
  (``cmcseg predict``) exports on the original grid.

Empty classes follow nnU-Net (and ``cmcseg evaluate``): a class absent from both the reference
and the prediction of a case has Dice NaN (``null`` in the JSON) and is left out of the means;
absent from the reference but predicted scores 0.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cmcseg.evaluation import case_dice, nanmean
from cmcseg.image_io import json_safe, write_json_atomic
from cmcseg.plans.plans import LabelInfo
from cmcseg.preprocessing.storage import load_case
from cmcseg.sliding_window import Predict, predict_case
from cmcseg.training.progress import DICE_PREFIX

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
SUMMARY_FILE = "summary.json"

#: probabilities ``(B, K, *spatial)`` from an input ``(B, C + M, *spatial)`` (:mod:`cmcseg.sliding_window`)
Predictor = Predict


@dataclass
class PseudoDice:
    """Sums TP/FP/FN over validation batches; :meth:`dice` turns them into one Dice per class."""

    num_foreground: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((3, self.num_foreground), dtype=np.float64)

    def add(self, counts: np.ndarray) -> None:
        """Add the ``(3, n_foreground)`` counts of one batch."""
        self.counts += counts

    def dice(self) -> list[float]:
        """``2 TP / (2 TP + FP + FN)`` per class; NaN for a class absent from both prediction and reference."""
        tp, fp, fn = self.counts
        denominator = 2 * tp + fp + fn
        return [float(2 * t / d) if d > 0 else math.nan for t, d in zip(tp, denominator)]


def pseudo_dice_metrics(counts: np.ndarray, labels: LabelInfo) -> dict[str, float]:
    """History entries ``dice/<class>`` and their mean ``pseudo_dice`` from summed TP/FP/FN; {} without counts."""
    if not np.asarray(counts).any():
        return {}
    accumulator = PseudoDice(len(labels.values))
    accumulator.add(np.asarray(counts))
    dice = accumulator.dice()
    metrics = {f"{DICE_PREFIX}{name}": d for name, d in zip(labels.names, dice)}
    metrics["pseudo_dice"] = nanmean(dice)
    return metrics


@dataclass
class BestTracker:
    """nnU-Net's choice of the best checkpoint: an EMA of the pseudo-Dice, ``ema = m ema + (1 - m) value``."""

    momentum: float = 0.9
    ema: float | None = None
    best: float | None = None

    def update(self, value: float) -> bool:
        """Fold in one epoch's pseudo-Dice (NaN is skipped); True when the EMA is a new best."""
        if math.isnan(value):
            return False
        self.ema = value if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * value
        if self.best is None or self.ema > self.best:
            self.best = self.ema
            return True
        return False

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        self.ema, self.best = state.get("ema"), state.get("best")


def validate_cases(predict: Predictor, folder: Path, case_ids: Sequence[str], patch_size: Sequence[int],
                   labels: LabelInfo, device: torch.device, step: float = 0.5,
                   sw_batch_size: int | None = None) -> dict[str, dict[str, float]]:
    """Dice per class for each case of ``case_ids`` (all must be labeled), by sliding-window prediction."""
    return validate_case_outputs(predict, ["prediction"], folder, case_ids, patch_size, labels, device, step,
                                 sw_batch_size)["prediction"]


def validate_case_outputs(predict: Predictor, names: Sequence[str], folder: Path, case_ids: Sequence[str],
                          patch_size: Sequence[int], labels: LabelInfo, device: torch.device, step: float = 0.5,
                          sw_batch_size: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Dice per class per case for each of several outputs that one predictor gives side by side.

    ``predict`` returns ``len(names)`` probability maps of K channels each, concatenated along channels
    (e.g. the fused prediction and every head alone). One sliding window serves them all: the Gaussian
    weighting is linear, so each output's part equals its own sliding window. The first name is logged.
    """
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    k = labels.num_classes
    for case_id in case_ids:
        data, seg, fov, _ = load_case(folder, case_id)
        if seg is None:
            log.warning("validation case %s has no label in %s; skipped", case_id, folder)
            continue
        with torch.no_grad():
            probabilities = predict_case(predict, data[:], fov[:], patch_size, device, step, sw_batch_size)
        if probabilities.shape[0] != k * len(names):
            raise ValueError(f"the predictor gave {probabilities.shape[0]} channels, expected {k} x {len(names)}")
        reference = seg[:]
        for index, name in enumerate(names):
            results[name][case_id] = case_dice(probabilities[index * k:(index + 1) * k], reference, labels)
        first = results[names[0]][case_id]
        log.info("validation %s: %s", case_id, ", ".join(f"{c} {v:.4f}" for c, v in first.items()))
    return results


def summarize(per_case: Mapping[str, Mapping[str, float]], labels: LabelInfo, **extra) -> dict:
    """The ``summary.json`` content: Dice per class per case, the mean per class and the foreground mean."""
    mean = {name: nanmean([case[name] for case in per_case.values()]) for name in labels.names}
    return {
        **extra,
        "metric": "Dice",
        "labels": dict(zip(labels.names, labels.values)),
        "num_cases": len(per_case),
        "mean": mean,
        "foreground_mean": nanmean(list(mean.values())),
        "per_case": {case_id: dict(values) for case_id, values in sorted(per_case.items())},
    }




def write_summary(summary: Mapping, output_folder: Path) -> Path:
    """Write ``<output>/validation/summary.json`` atomically (NaN as ``null``); returns its path."""
    path = Path(output_folder) / VALIDATION_DIR / SUMMARY_FILE
    write_json_atomic(json_safe(dict(summary)), path)
    return path
