"""Folds over patients and nested labeled subsets (cmcseg.plans.splits)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmcseg.dataset import Case, Dataset
from cmcseg.errors import CmcsegError
from cmcseg.plans.splits import (
    kfold_indices,
    labeled_subset,
    load_splits,
    make_splits,
    unlabeled_subset,
    write_splits,
)

FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)


def _dataset(n_labeled: int, n_unlabeled: int = 0, patients: dict | None = None) -> Dataset:
    """A Dataset model without files: splitting needs only case ids and which cases have labels."""
    cases = [Case(f"case{i:03d}", {0: Path(f"case{i:03d}_0000.nii.gz")},
                  Path(f"case{i:03d}.nii.gz") if i < n_labeled else None)
             for i in range(n_labeled + n_unlabeled)]
    return Dataset(folder=Path("Dataset999_Split"), name="Split", channel_names={0: "T1"},
                   labels={"background": 0, "fg": 1}, file_ending=".nii.gz", cases=cases,
                   metadata={"patients": patients} if patients else {})


def test_deterministic_and_seeded() -> None:
    ds = _dataset(23, 7)
    assert make_splits(ds, seed=3) == make_splits(ds, seed=3)
    assert make_splits(ds, seed=3)["folds"] != make_splits(ds, seed=4)["folds"]


def test_folds_partition_labeled_cases_and_keep_unlabeled_unlabeled() -> None:
    ds = _dataset(23, 7)
    splits = make_splits(ds)
    labeled = {c.case_id for c in ds.labeled_cases}
    unlabeled = {c.case_id for c in ds.unlabeled_cases}
    assert splits["n_folds"] == 5
    vals = [set(f["val"]) for f in splits["folds"]]
    assert set().union(*vals) == labeled and sum(map(len, vals)) == len(labeled)
    for f in splits["folds"]:
        assert set(f["train"]) | set(f["val"]) == labeled and not set(f["train"]) & set(f["val"])
        assert set(f["unlabeled"]) == unlabeled  # one case per patient: every fold trains on all of them
        assert sorted(f["labeled_order"]) == f["train"]
        for fraction in FRACTIONS:
            assert not set(labeled_subset(splits, f["fold"], fraction)) & unlabeled


def test_fractions_are_nested_and_never_empty() -> None:
    splits = make_splits(_dataset(17, 4))
    for f in splits["folds"]:
        subsets = [labeled_subset(splits, f["fold"], x) for x in FRACTIONS]
        assert all(len(s) >= 1 for s in subsets)
        for small, large in zip(subsets, subsets[1:]):
            assert large[: len(small)] == small
        assert subsets[-1] == f["labeled_order"]
        assert len(labeled_subset(splits, f["fold"], 0.2)) == max(1, round(0.2 * len(f["train"])))
        rest = unlabeled_subset(splits, f["fold"], 0.2)
        assert set(rest) == set(f["unlabeled"]) | (set(f["train"]) - set(subsets[2]))


def test_patients_are_never_split_across_train_and_val() -> None:
    # 30 cases of 9 patients; patients p0, p1 and p2 have labeled and unlabeled cases
    patients = {f"case{i:03d}": f"p{i % 9}" for i in range(30)}
    ds = _dataset(27, 3, patients)
    splits = make_splits(ds, seed=7)
    assert splits["grouping"] == "patient"
    for f in splits["folds"]:
        val_patients = {patients[c] for c in f["val"]}
        train_side = f["train"] + f["unlabeled"]
        assert not val_patients & {patients[c] for c in train_side}
        order = [patients[c] for c in f["labeled_order"]]
        runs = [p for i, p in enumerate(order) if i == 0 or order[i - 1] != p]
        assert len(runs) == len(set(runs))  # the labeled order lists each patient's cases together


def test_few_labeled_patients_limit_the_folds_and_too_few_fail() -> None:
    assert make_splits(_dataset(3, 10))["n_folds"] == 3
    with pytest.raises(CmcsegError, match="at least 2 patients"):
        make_splits(_dataset(1, 5))
    with pytest.raises(CmcsegError, match="at least 2 patients"):
        make_splits(_dataset(2), patients={"case000": "a", "case001": "a"})
    with pytest.raises(CmcsegError, match=r"\(0, 1\]"):
        labeled_subset(make_splits(_dataset(4)), 0, 0.0)


def test_matches_scikit_learn_and_nnunet_folds() -> None:
    """One case per patient, all labeled: the folds are nnU-Net's (sklearn KFold, seed 12345)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    for n, k in ((23, 5), (7, 3), (10, 5)):
        # the folds every dataset planned so far was split with: a RandomState shuffle, then consecutive blocks, the
        # first n % k one longer (what KFold did when splits.py drew them by hand); a KFold that draws otherwise
        # would silently move every user's folds
        order = np.arange(n)
        np.random.RandomState(99).shuffle(order)
        bounds = np.concatenate([[0], np.cumsum([n // k + (i < n % k) for i in range(k)])])
        expected = [sorted(order[lo:hi].tolist()) for lo, hi in zip(bounds[:-1], bounds[1:])]
        assert [v.tolist() for v in kfold_indices(n, k, 99)] == expected
    ds = _dataset(23)
    nnunet = generate_crossval_split(sorted(c.case_id for c in ds.cases), seed=12345, n_splits=5)
    ours = make_splits(ds)["folds"]
    assert [(f["train"], f["val"]) for f in ours] == [(list(s["train"]), list(s["val"])) for s in nnunet]


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    splits = make_splits(_dataset(12, 2))
    write_splits(splits, tmp_path / "splits.json")
    assert load_splits(tmp_path / "splits.json") == splits
    (tmp_path / "old.json").write_text("[]")
    with pytest.raises(CmcsegError, match="schema_version"):
        load_splits(tmp_path / "old.json")
