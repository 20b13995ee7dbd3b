"""Evaluate predicted label maps against reference label maps, the way nnU-Net reports it.

Per case and per foreground class: Dice, IoU, HD95 and ASD (in mm), and the voxel counts
TP, FP, FN, TN, ``n_pred`` and ``n_ref`` of nnU-Net's ``compute_metrics``. The metrics come
from :mod:`monai.metrics`; the counts are plain voxel counts.

Conventions (where nnU-Net or MONAI leave a choice):

* **Pairing.** Files pair by case id, the file name without its image extension
  (``CASE.nii.gz`` -> ``CASE``); any extension SimpleITK reads is accepted and other files
  (``summary.json``, ``.npz``/``.pkl`` probabilities) are ignored. A reference without a
  prediction is an error naming every such case, unless ``allow_missing`` (CLI ``--chill``,
  as in nnU-Net), which evaluates the predicted cases only. Extra predictions are logged as
  a warning and skipped.
* **Grid.** Prediction and reference must share size, spacing, origin and direction
  (spacing to 1e-3 relative, origin to 1e-3 x the largest spacing in mm, direction to 1e-3); otherwise an
  error names the case and what differs.
* **Empty classes (as nnU-Net).** Dice and IoU are NaN when a class is absent from both the
  reference and the prediction, and such NaNs are left out of the means (nanmean). Absent
  from the reference only: Dice 0. MONAI computes Dice in float32, so it agrees with
  nnU-Net's float64 value to about 1e-7; the counts are exact integers.
* **Distances.** HD95 is MONAI's symmetric 95th-percentile Hausdorff distance (the larger of
  the two directed 95th percentiles); ASD is MONAI's *symmetric* average surface distance.
  Both are in mm (the image spacing is passed). Both are NaN when the class is absent from
  both sides and ``inf`` when it is absent from exactly one side (the distance to an empty
  surface is unbounded). Means of HD95 and ASD are taken over finite values only; the
  summary reports, per class, how many cases were left out (``n_both_empty``,
  ``n_one_side_empty``), so a mean is never silently poisoned nor silently flattered.
* **Means.** ``mean[class][metric]`` is the nanmean over cases (nnU-Net);
  ``foreground_mean[metric]`` is the mean over the foreground classes' means, NaN classes
  (a class absent everywhere) left out.
* **Probability maps.** Validation and the subset table score ``(K, *)`` probability maps on the
  preprocessed grid with the same rules: :func:`case_dice` (MONAI's ``compute_dice`` of the argmax),
  :func:`patch_counts` (nnU-Net's ``get_tp_fp_fn_tn``, summed over patches) and :func:`nanmean`.
* **Files.** ``metrics.csv`` (one row per case x class; NaN is an empty cell, ``inf`` is
  ``inf``) and ``summary.json`` (strict JSON: NaN and inf are written as ``null``), both
  written atomically.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from torch import Tensor
from tqdm import tqdm

from cmcseg.dataset import Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import atomic_path, case_id_of, json_safe, read_image, write_json_atomic
from cmcseg.parallel import process_pool
from cmcseg.plans.plans import LabelInfo

log = logging.getLogger(__name__)

METRICS = ("Dice", "IoU", "HD95", "ASD")
COUNTS = ("TP", "FP", "FN", "TN", "n_pred", "n_ref")
DISTANCE_METRICS = ("HD95", "ASD")
COLUMNS = ("case", "label", "name", *METRICS, *COUNTS, "reference_file", "prediction_file")
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
SUMMARY_VERSION = 1

#: Image extensions SimpleITK reads, longest first so ``.nii.gz`` wins over ``.gz``.
_SPACING_RTOL = 1e-3
_GRID_TOL = 1e-3


class EvaluationError(CmcsegError):
    """The reference and prediction folders cannot be evaluated as given."""


# ---------------------------------------------------------------------------------------------- pairing
def list_label_maps(folder: Path | str) -> dict[str, Path]:
    """Case id -> image file of every label map in ``folder`` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"folder {folder} does not exist. Fix: check the path.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = case_id_of(path)
        if case is None or not path.is_file():
            continue
        if case in found:
            raise EvaluationError(
                f"case {case} has two files in {folder}: {found[case].name} and {path.name}. "
                "Fix: keep one file per case."
            )
        found[case] = path
    return found


def pair_cases(reference_dir: Path | str, prediction_dir: Path | str,
               allow_missing: bool = False) -> list[tuple[str, Path, Path]]:
    """(case, reference, prediction) for every reference case, in case order.

    A reference without a prediction is an error naming the cases (or, with ``allow_missing``,
    a warning and the case is skipped); a prediction without a reference is a warning.
    """
    refs, preds = list_label_maps(reference_dir), list_label_maps(prediction_dir)
    if not refs:
        raise EvaluationError(f"no label maps found in the reference folder {reference_dir}. "
                              "Fix: point -r at a folder of images such as labelsTr.")
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%d prediction(s) without a reference are not evaluated: %s", len(extra), _few(extra))
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} reference case(s) have no prediction in {prediction_dir}: {_few(missing)}. "
            "Fix: predict those cases, or pass --chill to evaluate the predicted cases only."
        )
    if missing:
        log.warning("%d reference case(s) without a prediction are skipped: %s", len(missing), _few(missing))
    pairs = [(case, refs[case], preds[case]) for case in sorted(refs) if case in preds]
    if not pairs:
        raise EvaluationError(f"no case of {reference_dir} has a prediction in {prediction_dir}. "
                              "Fix: name predictions after the reference cases (CASE.nii.gz).")
    return pairs


def _few(items: Sequence[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ------------------------------------------------------------------------------------------- reading
def check_same_grid(reference: sitk.Image, prediction: sitk.Image, case: str = "") -> None:
    """Raise EvaluationError naming the case and what differs when the two images do not share a grid."""
    problems = []
    if reference.GetDimension() != prediction.GetDimension():
        problems.append(f"dimension {prediction.GetDimension()} vs {reference.GetDimension()}")
    elif reference.GetSize() != prediction.GetSize():
        problems.append(f"size {prediction.GetSize()} vs {reference.GetSize()}")
    else:
        spacing = np.asarray(reference.GetSpacing())
        if not np.allclose(prediction.GetSpacing(), spacing, rtol=_SPACING_RTOL, atol=_GRID_TOL):
            problems.append(f"spacing {prediction.GetSpacing()} vs {reference.GetSpacing()}")
        if not np.allclose(prediction.GetOrigin(), reference.GetOrigin(), rtol=0,
                           atol=_GRID_TOL * max(1.0, float(spacing.max()))):
            problems.append(f"origin {prediction.GetOrigin()} vs {reference.GetOrigin()}")
        if not np.allclose(prediction.GetDirection(), reference.GetDirection(), atol=_GRID_TOL):
            problems.append(f"direction {prediction.GetDirection()} vs {reference.GetDirection()}")
    if problems:
        raise EvaluationError(
            f"case {case}: the prediction is not on the reference grid (prediction vs reference: "
            f"{'; '.join(problems)}). Fix: write predictions on the reference image's grid "
            "(cmcseg predict does), or resample the prediction with nearest-neighbour interpolation."
        )


def read_label_map(path: Path | str, case: str = "") -> tuple[np.ndarray, sitk.Image]:
    """A label map as an integer array (SimpleITK's z, y, x order) and its image; errors name the case."""
    image = read_image(path, case)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"case {case}: {path} has {image.GetNumberOfComponentsPerPixel()} components per "
                              "voxel, not one label per voxel. Fix: write a single-channel integer label map.")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise EvaluationError(f"case {case}: {path} holds non-integer values (probabilities?). "
                                  "Fix: evaluate integer label maps (argmax of the probabilities).")
        array = rounded.astype(np.int64)
    return array, image


def spacing_of(image: sitk.Image) -> tuple[float, ...]:
    """Spacing in the array's axis order (SimpleITK gives x, y, z; arrays are z, y, x)."""
    return tuple(float(s) for s in reversed(image.GetSpacing()))


def foreground_values(*arrays: np.ndarray) -> list[int]:
    """Sorted non-zero values found in any of the arrays."""
    values: set[int] = set()
    for array in arrays:
        values.update(int(v) for v in np.unique(array))
    values.discard(0)
    return sorted(values)


# ------------------------------------------------------------------------------------------- metrics
def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The slices of the smallest box around ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    """A binary mask as the (batch 1, channel 1, *spatial) float tensor MONAI's metrics take."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def class_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Dice, IoU, HD95, ASD (mm) and the voxel counts of one class, from two boolean masks.

    The masks are cropped to the union of both (plus one voxel) before MONAI sees them: Dice
    and IoU only depend on that region, and MONAI crops the same way for the distances.
    """
    n_ref = int(np.count_nonzero(reference))
    n_pred = int(np.count_nonzero(prediction))
    tp = int(np.count_nonzero(reference & prediction))
    fp, fn = n_pred - tp, n_ref - tp
    row: dict[str, Any] = {"Dice": math.nan, "IoU": math.nan, "HD95": math.nan, "ASD": math.nan,
                           "TP": tp, "FP": fp, "FN": fn, "TN": int(reference.size) - tp - fp - fn,
                           "n_pred": n_pred, "n_ref": n_ref}
    if n_ref == 0 and n_pred == 0:
        return row
    from monai.metrics import (  # here, not at the top: importing monai costs 4-5 s that cmcseg predict never needs
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
    )

    box = _bounding_box(reference | prediction)
    y, y_pred = _as_batch(reference[box]), _as_batch(prediction[box])
    row["Dice"] = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    row["IoU"] = float(compute_iou(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    if n_ref == 0 or n_pred == 0:
        row["HD95"] = row["ASD"] = math.inf
        return row
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI's internal use of its own deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        row["HD95"] = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                       spacing=spacing)[0, 0])
        row["ASD"] = float(compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                                            spacing=spacing)[0, 0])
    return row


@dataclass
class _CaseOutcome:
    """What one case yields: its rows, the foreground values it holds, and its number of voxels."""

    rows: list[dict[str, Any]]
    values: list[int]
    num_voxels: int


def _evaluate_pair(case: str, reference_path: Path, prediction_path: Path,
                   labels: Sequence[int] | None) -> _CaseOutcome:
    """Read, check and score one case; ``labels=None`` scores the values found in this case."""
    reference, reference_image = read_label_map(reference_path, case)
    prediction, prediction_image = read_label_map(prediction_path, case)
    check_same_grid(reference_image, prediction_image, case)
    found = foreground_values(reference, prediction)
    if labels is not None:
        unexpected = sorted(set(found) - {int(v) for v in labels})
        if unexpected:
            log.warning("case %s: values %s are not among the evaluated labels %s (labels in original values?)",
                        case, unexpected, list(labels))
    spacing = spacing_of(reference_image)
    rows = []
    for label in (found if labels is None else labels):
        row = {"case": case, "label": int(label)}
        row.update(class_metrics(reference == label, prediction == label, spacing))
        row.update(reference_file=str(reference_path), prediction_file=str(prediction_path))
        rows.append(row)
    return _CaseOutcome(rows, found, int(reference.size))


def evaluate_case(reference_path: Path | str, prediction_path: Path | str,
                  labels: Sequence[int] | None = None, case: str | None = None) -> list[dict[str, Any]]:
    """One row per class (``labels``, or the non-zero values found in either file) with every metric.

    Raises EvaluationError naming the case when the two files are not on the same grid.
    """
    reference_path, prediction_path = Path(reference_path), Path(prediction_path)
    case = case or case_id_of(reference_path) or reference_path.name
    return _evaluate_pair(case, reference_path, prediction_path, labels).rows


def _absent_row(case: str, label: int, num_voxels: int, reference_path: str, prediction_path: str) -> dict:
    """The row of a class found in neither file of a case (all NaN, every voxel a true negative)."""
    return {"case": case, "label": label, "Dice": math.nan, "IoU": math.nan, "HD95": math.nan, "ASD": math.nan,
            "TP": 0, "FP": 0, "FN": 0, "TN": num_voxels, "n_pred": 0, "n_ref": 0,
            "reference_file": reference_path, "prediction_file": prediction_path}


# --------------------------------------------------------------------------------------------- summary
def _mean(values: Sequence[float] | np.ndarray, finite_only: bool = False) -> float:
    """Mean over non-NaN values (or finite values); NaN when there are none, without numpy's warning."""
    arr = np.asarray(values, dtype=float)
    keep = np.isfinite(arr) if finite_only else ~np.isnan(arr)
    return float(arr[keep].mean()) if keep.any() else math.nan


def summarize(per_case: pd.DataFrame, labels: Sequence[int], label_names: Mapping[int, str] | None = None) -> dict:
    """nnU-Net-style summary: ``mean`` per class, ``foreground_mean`` and ``metric_per_case``."""
    names = {int(v): str(n) for v, n in (label_names or {}).items()}
    means: dict[str, dict[str, float | int]] = {}
    for label in labels:
        rows = per_case[per_case["label"] == label]
        entry: dict[str, float | int] = {m: _mean(rows[m], finite_only=m in DISTANCE_METRICS) for m in METRICS}
        entry.update({c: _mean(rows[c]) for c in COUNTS})
        entry["n_cases"] = int(len(rows))
        entry["n_both_empty"] = int(((rows["n_ref"] == 0) & (rows["n_pred"] == 0)).sum())
        entry["n_one_side_empty"] = int(((rows["n_ref"] == 0) != (rows["n_pred"] == 0)).sum())
        means[str(label)] = entry
    foreground = {m: _mean([means[str(v)][m] for v in labels]) for m in (*METRICS, *COUNTS)}
    per_case_entries = []
    for case, rows in per_case.groupby("case", sort=True):
        per_case_entries.append({
            "case": case,
            "reference_file": rows["reference_file"].iloc[0],
            "prediction_file": rows["prediction_file"].iloc[0],
            "metrics": {str(int(r["label"])): {k: r[k] for k in (*METRICS, *COUNTS)} for _, r in rows.iterrows()},
        })
    return json_safe({
        "version": SUMMARY_VERSION,
        "num_cases": int(per_case["case"].nunique()),
        "labels": {str(v): names.get(int(v), str(v)) for v in labels},
        "units": {"HD95": "mm", "ASD": "mm"},
        "foreground_mean": foreground,
        "mean": means,
        "metric_per_case": per_case_entries,
    })




def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


@dataclass
class EvaluationResult:
    """Per-case metrics (one row per case x class) and the nnU-Net-style summary."""

    per_case: pd.DataFrame
    summary: dict
    labels: list[int] = field(default_factory=list)

    def write(self, out_dir: Path | str) -> tuple[Path, Path]:
        """Write ``metrics.csv`` and ``summary.json`` atomically into ``out_dir``; return both paths."""
        out_dir = Path(out_dir)
        csv_path, json_path = out_dir / METRICS_FILE, out_dir / SUMMARY_FILE
        with atomic_path(csv_path) as tmp:
            self.per_case.to_csv(tmp, index=False)
        write_json_atomic(self.summary, json_path)
        return csv_path, json_path

    def table(self) -> str:
        """A plain-text table: per class, mean Dice, IoU, HD95 and ASD, and the cases left out of the means."""
        header = ("label", "name", "Dice", "IoU", "HD95 mm", "ASD mm", "cases", "both empty", "one side empty")
        lines = [header]
        for key, entry in self.summary["mean"].items():
            lines.append((key, self.summary["labels"].get(key, key), _fmt(entry["Dice"]), _fmt(entry["IoU"]),
                          _fmt(entry["HD95"], 2), _fmt(entry["ASD"], 2), str(entry["n_cases"]),
                          str(entry["n_both_empty"]), str(entry["n_one_side_empty"])))
        fg = self.summary["foreground_mean"]
        lines.append(("fg", "foreground mean", _fmt(fg["Dice"]), _fmt(fg["IoU"]), _fmt(fg["HD95"], 2),
                      _fmt(fg["ASD"], 2), str(self.summary["num_cases"]), "", ""))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


# ------------------------------------------------------------------------------------------ folders
def dataset_labels(dataset_folder: Path | str) -> dict[int, str]:
    """Foreground label value -> name from a raw dataset's ``dataset.json`` (background excluded)."""
    dataset = Dataset.load(dataset_folder)
    return {int(v): str(k) for k, v in sorted(dataset.labels.items(), key=lambda kv: kv[1]) if int(v) != 0}


def _evaluate_in_worker(case: str, reference: Path, prediction: Path, labels: Sequence[int] | None) -> _CaseOutcome:
    """One case in a worker process, with torch limited to one thread so workers do not oversubscribe."""
    torch.set_num_threads(1)
    return _evaluate_pair(case, reference, prediction, labels)


def _evaluate_all(pairs: Sequence[tuple[str, Path, Path]], labels: Sequence[int] | None, num_workers: int,
                  progress: bool) -> list[_CaseOutcome]:
    """Score every pair, in worker processes when ``num_workers > 1``; results in pair order."""
    outcomes: dict[str, _CaseOutcome] = {}
    with tqdm(total=len(pairs), desc="evaluate", unit="case", disable=not progress) as bar:
        if num_workers <= 1 or len(pairs) <= 1:
            for case, ref, pred in pairs:
                outcomes[case] = _evaluate_pair(case, ref, pred, labels)
                bar.update()
        else:
            with process_pool(min(num_workers, len(pairs))) as pool:
                futures = {pool.submit(_evaluate_in_worker, case, ref, pred, labels): case
                           for case, ref, pred in pairs}
                try:
                    for future in as_completed(futures):
                        outcomes[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
    return [outcomes[case] for case, _, _ in pairs]


def evaluate_folders(reference_dir: Path | str, prediction_dir: Path | str, labels: Sequence[int] | None = None,
                     num_workers: int = 1, label_names: Mapping[int, str] | None = None,
                     allow_missing: bool = False, progress: bool = False) -> EvaluationResult:
    """Evaluate every reference case against the prediction of the same case id.

    ``labels``: the foreground values to score; None scores every non-zero value found in any
    reference or prediction. ``label_names`` (value -> name) only labels the output.
    """
    pairs = pair_cases(reference_dir, prediction_dir, allow_missing=allow_missing)
    wanted = None if labels is None else sorted({int(v) for v in labels} - {0})
    if wanted is not None and not wanted:
        raise EvaluationError("no foreground label to evaluate (only background was given). Fix: pass --labels 1 2")
    outcomes = _evaluate_all(pairs, wanted, num_workers, progress)
    if wanted is None:
        wanted = sorted({v for o in outcomes for v in o.values})
        if not wanted:
            raise EvaluationError(f"no foreground voxel in any reference of {reference_dir} or prediction of "
                                  f"{prediction_dir}, so no class to evaluate. Fix: pass --labels or -d.")
        log.info("evaluating the labels found in the files: %s", wanted)
    rows: list[dict] = []
    for (case, ref, pred), outcome in zip(pairs, outcomes):
        by_label = {r["label"]: r for r in outcome.rows}
        rows.extend(by_label.get(v) or _absent_row(case, v, outcome.num_voxels, str(ref), str(pred))
                    for v in wanted)
    names = {int(v): str(n) for v, n in (label_names or {}).items()}
    per_case = pd.DataFrame(rows)
    per_case["name"] = [names.get(int(v), str(v)) for v in per_case["label"]]
    per_case = per_case[list(COLUMNS)].sort_values(["case", "label"], kind="stable").reset_index(drop=True)
    return EvaluationResult(per_case, summarize(per_case, wanted, names), list(wanted))


# ------------------------------------------------ scores of probability maps (validation, subset tables)
def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN if there is none)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def case_dice(probabilities: Tensor, reference: np.ndarray, labels: LabelInfo) -> dict[str, float]:
    """Dice per foreground class of the argmax of ``(K, *)`` probabilities against a ``(1, *)`` label map."""
    prediction = probabilities.max(0, keepdim=True).indices[None]  # the argmax; argmax(0) is slower on CPU
    from monai.metrics import compute_dice  # see class_metrics: monai is imported only where a metric is computed

    target = torch.from_numpy(np.asarray(reference).astype(np.int64))[None]
    dice = compute_dice(prediction, target, include_background=True, ignore_empty=False,
                        num_classes=labels.num_classes, ignore_index=labels.ignore_label)[0]
    present = {value: bool((prediction == value).any() or (target == value).any()) for value in labels.values}
    return {name: float(dice[value]) if present[value] else math.nan
            for name, value in zip(labels.names, labels.values)}


def patch_counts(probabilities: Tensor, target: Tensor, labels: LabelInfo) -> np.ndarray:
    """``(3, n_foreground)`` TP, FP, FN summed over a batch, from probabilities and a ``(B, 1, *)`` label map."""
    prediction = probabilities.max(1, keepdim=True).indices  # the argmax; argmax(1) is slower on CPU
    target = target.to(prediction.device).long()
    mask = None
    if labels.ignore_label is not None:
        mask = (target != labels.ignore_label).float()
        target = torch.where(target == labels.ignore_label, torch.zeros_like(target), target)
    onehot = torch.zeros_like(probabilities, dtype=torch.float32).scatter_(1, prediction, 1.0)
    axes = [0] + list(range(2, probabilities.ndim))
    tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes, mask=mask)
    counts = torch.stack([tp, fp, fn]).detach().cpu().double().numpy()
    return counts[:, list(labels.values)]
