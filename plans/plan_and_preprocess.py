"""`cmcseg plan` as a library call: integrity check -> (registration) -> fingerprint -> plans -> splits ->
preprocessing.

Each stage writes its JSON contract into ``<preprocessed>/DatasetNNN_NAME/`` so the next
stage (or another machine) can start from it: ``fingerprint.json``, ``plans.json``,
``splits.json``, and one folder of arrays per configuration.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cmcseg import __version__
from cmcseg.dataset import Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import make_folder, read_json, write_json_atomic
from cmcseg.paths import WorkRoots, require_dataset_folder
from cmcseg.plans.files import DATASET_FILE, FINGERPRINT_FILE, SPLITS_FILE, plans_file_name
from cmcseg.plans.fingerprint import SCHEMA_VERSION as FINGERPRINT_SCHEMA
from cmcseg.plans.fingerprint import extract_fingerprint
from cmcseg.plans.integrity import IntegrityReport, verify_dataset
from cmcseg.plans.planner import plan_experiment
from cmcseg.plans.splits import load_splits, make_splits, write_splits
from cmcseg.preprocessing.case_loading import choose_reference_channel
from cmcseg.preprocessing.preprocessor import preprocess_dataset
from cmcseg.preprocessing.registration import register_dataset

log = logging.getLogger(__name__)

REGISTRATION_DIR = "registration"
#: folds need a labeled case to validate on and one to train on
MIN_LABELED_FOR_SPLITS = 2


@dataclass
class PlanOutcome:
    """What `cmcseg plan` produced, for the CLI to report."""

    dataset: Dataset
    integrity: IntegrityReport
    output_folder: Path | None = None
    fingerprint: dict | None = None
    plans: dict | None = None
    plans_file: Path | None = None
    splits: dict | None = None
    preprocessing: dict = field(default_factory=dict)  # configuration -> report
    registration: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


def plan_and_preprocess(
    dataset_spec: str,
    roots: WorkRoots,
    configurations: Sequence[str] | None = None,
    num_workers: int = 2,
    reference: str | None = None,
    register: str = "none",
    memory_gb: float | None = None,
    verify_only: bool = False,
    progress: bool = True,
    seed: int = 12345,
    accept_no_overlap: bool = False,
    fit_memory: bool = True,
    planner: str = "ResEncM",
    patch_multiple_of: int = 1,
) -> PlanOutcome:
    """Run every planning stage on one raw dataset; stop before any work if the integrity check fails.

    ``accept_no_overlap`` turns a modality that does not overlap the reference at all (an error: almost
    always a header error) into a warning; that modality's field of view is then empty in the case.
    ``fit_memory=False`` plans patch and batch by nnU-Net's rule alone (see :func:`plan_experiment`).
    ``planner`` (``-pl``) picks the network topology; a variant's plans and preprocessed data sit beside the
    default's under their own identifier, and the fingerprint and splits are shared."""
    raw_folder = require_dataset_folder(roots.raw, dataset_spec, "raw")
    dataset = Dataset.load(raw_folder)
    try:
        reference_channel = choose_reference_channel(dataset, reference)
    except CmcsegError:  # e.g. a label on no modality's grid: the integrity check reports it in full
        reference_channel = None
    timings: dict[str, float] = {}
    with _stage("integrity check", timings):
        integrity = verify_dataset(dataset, num_workers=num_workers, progress=progress,
                                   reference_channel=reference_channel, accept_no_overlap=accept_no_overlap)
    outcome = PlanOutcome(dataset, integrity, timings=timings)
    log.info("integrity check of %s: %s", dataset.name, integrity.verdict())
    integrity.raise_if_fatal()
    if verify_only:
        return outcome
    if reference_channel is None:  # the integrity check passed, so this now says what is wrong if anything is
        reference_channel = choose_reference_channel(dataset, reference)

    out = roots.preprocessed / raw_folder.name
    make_folder(out)
    outcome.output_folder = out
    shutil.copyfile(raw_folder / DATASET_FILE, out / f".{DATASET_FILE}.tmp")
    (out / f".{DATASET_FILE}.tmp").replace(out / DATASET_FILE)
    log.info("reference modality: %s", dataset.channel_names[reference_channel])

    transforms_folder = None
    if register == "rigid" and not dataset.unpaired:
        transforms_folder = out / REGISTRATION_DIR
        with _stage("registration", timings):
            outcome.registration = register_dataset(dataset, reference_channel, transforms_folder,
                                                    num_workers=num_workers, progress=progress)

    with _stage("fingerprint", timings):
        signature = _input_signature(dataset, reference_channel, register, transforms_folder)
        fingerprint = _reusable_fingerprint(out / FINGERPRINT_FILE, signature)
        if fingerprint is None:
            fingerprint = extract_fingerprint(dataset, reference_channel, num_workers=num_workers,
                                              transforms_folder=transforms_folder, progress=progress)
            fingerprint["input_signature"] = signature
            write_json_atomic(fingerprint, out / FINGERPRINT_FILE)
    outcome.fingerprint = fingerprint

    plans = plan_experiment(fingerprint, dataset, configurations=configurations or ("2d", "3d_fullres"),
                            memory_gb=memory_gb, reference_channel=reference_channel, register=register,
                            fit_memory=fit_memory, topology=planner, patch_multiple_of=patch_multiple_of)
    outcome.plans_file = out / plans_file_name(plans["plans_name"])
    write_json_atomic(plans, outcome.plans_file)
    outcome.plans = plans

    if len(dataset.labeled_cases) >= MIN_LABELED_FOR_SPLITS:
        outcome.splits = _keep_or_make_splits(dataset, out / SPLITS_FILE, seed)
    else:
        log.warning("%s has %d labeled case(s): no folds written (training needs at least %d labeled cases); "
                    "the fingerprint, plans and preprocessed data are complete", dataset.name,
                    len(dataset.labeled_cases), MIN_LABELED_FOR_SPLITS)

    for name in plans["configurations"]:
        with _stage(f"preprocessing {name}", timings):
            outcome.preprocessing[name] = preprocess_dataset(
                dataset, plans, name, out, num_workers=num_workers, transforms_folder=transforms_folder,
                progress=progress,
            )
    return outcome


def _input_signature(dataset: Dataset, reference_channel: int, register: str, transforms_folder: Path | None) -> str:
    """What the fingerprint depends on: every training file's name, size and modification time, the
    reference, the registration and the code version (cheap: no file is read)."""
    files = sorted(str(p) for c in dataset.cases for p in [*c.images.values(), *([c.label] if c.label else [])])
    if transforms_folder is not None and Path(transforms_folder).is_dir():
        files += sorted(str(p) for p in Path(transforms_folder).iterdir())
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = json.dumps([stats, reference_channel, register, FINGERPRINT_SCHEMA, __version__])
    return hashlib.sha256(key.encode()).hexdigest()


def _reusable_fingerprint(path: Path, signature: str) -> dict | None:
    """The existing fingerprint if it was made from exactly these inputs, else None."""
    if not path.is_file():
        return None
    try:
        existing = read_json(path)
    except (OSError, ValueError):
        return None
    if existing.get("input_signature") == signature:
        log.info("fingerprint: inputs unchanged, reusing %s", path)
        return existing
    return None


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    """Log how long a stage took and keep the figure for the outcome."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log.info("%s took %.1f s", name, timings[name])


def _keep_or_make_splits(dataset: Dataset, path: Path, seed: int) -> dict:
    """Splits are made once: an existing splits.json over the same cases is kept (a user may have edited it)."""
    fresh = make_splits(dataset, seed=seed)
    if path.is_file():
        existing = load_splits(path)
        if _cases_of(existing) == _cases_of(fresh):
            log.info("keeping existing %s", path)
            return existing
        log.warning("%s covers other cases than the dataset now holds: writing new splits", path)
    write_splits(fresh, path)
    return fresh


def _cases_of(splits: dict) -> set[str]:
    return {c for fold in splits["folds"] for key in ("train", "val", "unlabeled") for c in fold.get(key, [])}
