"""Cross-validation folds over patients, and the nested labeled subsets of ``--labeled FRACTION``.

Folds are drawn over the *labeled* patients (validation needs labels) with the exact rule of
scikit-learn's ``KFold(shuffle=True, random_state=seed)``, which nnU-Net uses, reimplemented with
numpy so that the folds are the same whether or not scikit-learn is installed. With one case
per patient and every case labeled, the folds equal nnU-Net's ``splits_final.json``.

Each fold stores:

* ``train``: labeled training cases; ``val``: labeled validation cases;
* ``unlabeled``: cases without a label, trained on without labels. A patient's unlabeled cases
  are left out of the folds that validate on that patient, so no patient is on both sides;
* ``labeled_order``: a seeded order of ``train``, patient by patient. The first
  ``max(1, round(fraction * n))`` cases of it are the labeled subset for ``--labeled
  fraction``, so smaller fractions are contained in larger ones.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cmcseg.dataset import Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_FOLDS = 5
DEFAULT_SEED = 12345


def kfold_indices(n: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Validation indices of each fold: ``sklearn.model_selection.KFold(n_folds, shuffle=True,
    random_state=seed)``, the split nnU-Net draws (``generate_crossval_split``), each block sorted."""
    from sklearn.model_selection import KFold  # scikit-learn comes with nnunetv2

    return [np.sort(val) for _, val in KFold(n_folds, shuffle=True, random_state=seed).split(np.arange(n))]


def patient_of_cases(dataset: Dataset, patients: Mapping[str, str] | None = None) -> dict[str, str]:
    """Patient of every training case: ``patients``, else dataset.json's ``"patients"``, else the case itself."""
    mapping = dict(patients if patients is not None else dataset.metadata.get("patients") or {})
    case_ids = [c.case_id for c in dataset.cases]
    unknown = sorted(set(mapping) - set(case_ids))
    if unknown:
        log.warning("the patient map names %d case(s) that are not training cases (ignored): %s",
                    len(unknown), ", ".join(unknown[:10]))
    return {cid: str(mapping.get(cid, cid)) for cid in case_ids}


def _group(case_ids: Sequence[str], patient_of: Mapping[str, str]) -> dict[str, list[str]]:
    """Sorted patient -> sorted cases."""
    out: dict[str, list[str]] = {}
    for cid in sorted(case_ids):
        out.setdefault(patient_of[cid], []).append(cid)
    return dict(sorted(out.items()))


def _labeled_order(train_by_patient: Mapping[str, list[str]], seed: int) -> list[str]:
    """A seeded permutation of the patients, each contributing its cases in sorted order."""
    patients = list(train_by_patient)
    order = np.random.RandomState(seed % 2 ** 32).permutation(len(patients))
    return [cid for i in order for cid in train_by_patient[patients[i]]]


def make_splits(
    dataset: Dataset,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
    patients: Mapping[str, str] | None = None,
) -> dict:
    """Folds over the labeled patients of a dataset (at most ``n_folds``, at least 2); the splits.json content."""
    patient_of = patient_of_cases(dataset, patients)
    labeled = [c.case_id for c in dataset.labeled_cases]
    unlabeled = [c.case_id for c in dataset.unlabeled_cases]
    by_patient = _group(labeled, patient_of)
    if len(labeled) < 2 or len(by_patient) < 2:
        raise CmcsegError(
            f"dataset {dataset.name} has {len(labeled)} labeled case(s) from {len(by_patient)} patient(s); "
            "cross-validation needs labeled cases from at least 2 patients. Fix: add labels (labelsTr/CASE"
            f"{dataset.file_ending}) for more cases, or check the \"patients\" map in dataset.json.")
    k = min(int(n_folds), len(by_patient))
    if k < 2:
        raise CmcsegError(f"n_folds={n_folds}: at least 2 folds are needed. Fix: pass n_folds >= 2.")
    if k < n_folds:
        log.warning("only %d labeled patients: %d folds instead of %d", len(by_patient), k, n_folds)
    patient_ids = list(by_patient)
    folds = []
    for fold, val_idx in enumerate(kfold_indices(len(patient_ids), k, seed)):
        val_patients = {patient_ids[i] for i in val_idx}
        train_by_patient = {p: cases for p, cases in by_patient.items() if p not in val_patients}
        folds.append({
            "fold": fold,
            "train": sorted(c for cases in train_by_patient.values() for c in cases),
            "val": sorted(c for p in val_patients for c in by_patient[p]),
            "unlabeled": sorted(c for c in unlabeled if patient_of[c] not in val_patients),
            "labeled_order": _labeled_order(train_by_patient, seed + 1 + fold),
        })
    return {"schema_version": SCHEMA_VERSION, "seed": int(seed), "n_folds": k,
            "grouping": "patient" if any(p != c for c, p in patient_of.items()) else "case", "folds": folds}


def _fold(splits: dict, fold: int) -> dict:
    if not 0 <= fold < len(splits["folds"]):
        raise CmcsegError(f"fold {fold} does not exist: splits.json has folds 0..{len(splits['folds']) - 1}. "
                          "Fix: pick one of those folds.")
    return splits["folds"][fold]


def labeled_subset(splits: dict, fold: int, fraction: float) -> list[str]:
    """The labeled training cases of ``fold`` at ``--labeled fraction``: the first max(1, round(fraction * n))
    cases of the fold's labeled order (rounding half up). Deterministic and nested across fractions."""
    if not 0 < fraction <= 1:
        raise CmcsegError(f"labeled fraction {fraction} must be in (0, 1]. Fix: pass e.g. --labeled 0.2.")
    order = _fold(splits, fold)["labeled_order"]
    return order[: max(1, math.floor(fraction * len(order) + 0.5))]


def describe_labeled_subset(splits: dict, fold: int, fraction: float) -> tuple[str, str | None]:
    """What ``--labeled fraction`` gives in ``fold``, for the log: (an info line, a warning or None).

    The warning says when the fraction asked for less than half a case (``fraction * n < 0.5``) and the
    subset was rounded up to the one case every run keeps labeled: that run is not at the fraction asked."""
    n = len(_fold(splits, fold)["labeled_order"])
    labeled = labeled_subset(splits, fold, fraction)
    k = len(labeled)
    shown = ", ".join(labeled[:10]) + (f", ... ({k - 10} more)" if k > 10 else "")
    rest = f"the other {n - k} train without labels" if k < n else "supervised: every training case keeps its label"
    info = (f"--labeled {fraction:g} keeps {k} of {n} training cases of fold {fold} labeled: {shown} "
            f"(effective fraction {k / n:.3g}); {rest}")
    warning = None
    if fraction * n < 0.5:
        warning = (f"--labeled {fraction:g} of {n} training cases is {fraction * n:.3g} case(s), which rounds to 0; "
                   f"at least one case keeps its label, so this run trains with 1 labeled case (effective fraction "
                   f"{1 / n:.3g}, not {fraction:g}). Pass --labeled {1 / n:.3g} or more to ask for that explicitly")
    return info, warning


def unlabeled_subset(splits: dict, fold: int, fraction: float) -> list[str]:
    """The cases ``fold`` trains on without labels at ``fraction``: true unlabeled cases plus the labeled
    training cases left out of :func:`labeled_subset`."""
    keep = set(labeled_subset(splits, fold, fraction))
    f = _fold(splits, fold)
    return sorted(f["unlabeled"] + [c for c in f["labeled_order"] if c not in keep])


def write_splits(splits: dict, path: Path | str) -> None:
    """Write splits.json atomically."""
    write_json_atomic(splits, path)


def load_splits(path: Path | str) -> dict:
    """Read splits.json, refusing a schema this version does not know."""
    splits = read_json(path)
    if not isinstance(splits, dict) or splits.get("schema_version") != SCHEMA_VERSION:
        found = splits.get("schema_version") if isinstance(splits, dict) else type(splits).__name__
        raise CmcsegError(f"{path}: splits schema_version {found!r}, expected {SCHEMA_VERSION}. "
                          "Fix: rerun `cmcseg plan` to write the folds again.")
    return splits
