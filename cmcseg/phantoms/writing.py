"""Writing a phantom as a raw dataset, plus its ground truth, atomically and reproducibly.

Each phantom module yields :class:`PhantomCase` objects one at a time (so a large dataset never
sits in memory) and describes itself with a :class:`PhantomInfo`. :func:`write_phantom` turns
them into the nnU-Net v2 raw layout::

    folder/dataset.json                  written last: a crash leaves no dataset.json
    folder/imagesTr/CASE_XXXX<ending>    one file per channel the case has
    folder/labelsTr/CASE<ending>         only for labeled cases, on the reference grid
    folder/phantom_truth/truth.json      per case: anatomy, per modality geometry, motion, condition
    folder/phantom_truth/CASE_XXXX<ending>  the exact label map on channel XXXX's own grid

Every file goes through :func:`cmcseg.image_io.write_image` / ``write_json_atomic`` (temporary
name, then rename). SimpleITK writes gzip headers with a zero timestamp and PNG without time
chunks, so the same seed gives byte-identical files (a test checks it).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from cmcseg.dataset import image_file, label_file, write_dataset_json
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json, write_image, write_json_atomic

logger = logging.getLogger(__name__)

TRUTH_FOLDER = "phantom_truth"
TRUTH_JSON = "truth.json"
#: version of the truth.json layout, bumped when its keys change
TRUTH_VERSION = 1


@dataclass(frozen=True)
class PhantomInfo:
    """What a phantom's dataset.json declares."""

    kind: str
    channel_names: Mapping[int, str]
    labels: Mapping[str, int]
    reference_modality: str
    description: str
    file_ending: str = ".nii.gz"
    pairing: str = "paired"
    dimensionality: str = "3d"
    original_label_values: Mapping[str, int] | None = None


@dataclass
class PhantomCase:
    """One generated case: images per channel, the training label (None: unlabeled) and the truth.

    ``truth_labels`` holds the exact label map of each channel on that channel's own grid;
    ``truth`` is this case's JSON-ready entry for truth.json; ``condition`` (e.g. "night") is
    recorded in dataset.json as well.
    """

    case_id: str
    images: dict[int, sitk.Image]
    label: sitk.Image | None
    truth_labels: dict[int, sitk.Image]
    truth: dict[str, Any] = field(default_factory=dict)
    condition: str | None = None


def case_rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent random stream for (seed, stream...): one per case and purpose.

    Separate streams keep the anatomy of case 3 the same whatever the case count, and keep an
    option such as motion from changing the anatomy.
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([int(seed), *(int(s) for s in stream)])


def unlabeled_indices(count: int) -> set[int]:
    """Which cases lose their label: every third (index 2, 5, ...), and at least one when count >= 2."""
    chosen = {i for i in range(count) if i % 3 == 2}
    if not chosen and count >= 2:
        chosen = {count - 1}
    return chosen


def to_int16(array: np.ndarray) -> np.ndarray:
    """Round and clip to int16 (the usual storage type of MR and CT)."""
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def write_phantom(
    folder: Path | str,
    info: PhantomInfo,
    cases: Iterable[PhantomCase],
    count: int,
    *,
    name: str,
    seed: int,
    size: str,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``count`` cases from ``cases`` and the dataset's JSON files into ``folder``; return it."""
    folder = Path(folder)
    _check_target(folder)
    started = time.perf_counter()
    written: set[Path] = set()
    truth_cases: dict[str, Any] = {}
    conditions: dict[str, str] = {}
    num_labeled = 0
    ending = info.file_ending
    progress = tqdm(cases, total=count, desc=f"synth {info.kind}", unit="case", leave=False)
    for case in progress:
        written |= _write_case(folder, case, info)
        truth_cases[case.case_id] = case.truth
        num_labeled += case.label is not None
        if case.condition is not None:
            conditions[case.case_id] = case.condition
    truth = {
        "version": TRUTH_VERSION, "phantom": info.kind, "seed": seed, "size": size,
        "options": dict(options or {}), "cases": truth_cases,
    }
    truth_path = folder / TRUTH_FOLDER / TRUTH_JSON
    write_json_atomic(truth, truth_path)
    written.add(truth_path)
    _remove_stale(folder, written, ending)
    extra: dict[str, Any] = {"phantom": {
        "kind": info.kind, "seed": seed, "size": size, "truth": f"{TRUTH_FOLDER}/{TRUTH_JSON}",
    }}
    if conditions:
        extra["conditions"] = conditions
    write_dataset_json(
        folder, name=name, channel_names=dict(info.channel_names), labels=dict(info.labels),
        num_training=len(truth_cases), file_ending=ending, pairing=info.pairing,
        original_label_values=info.original_label_values, dimensionality=info.dimensionality,
        reference_modality=info.reference_modality, description=info.description, extra=extra,
    )
    logger.info("phantom %s: wrote %d cases (%d labeled) to %s in %.1f s", info.kind, len(truth_cases),
                num_labeled, folder, time.perf_counter() - started)
    return folder


def _write_case(folder: Path, case: PhantomCase, info: PhantomInfo) -> set[Path]:
    """Write one case's images, label and truth label maps; return the paths written."""
    ending = info.file_ending
    paths: set[Path] = set()
    for channel, image in sorted(case.images.items()):
        path = image_file(folder, case.case_id, channel, ending)
        write_image(image, path)
        paths.add(path)
    if case.label is not None:
        path = label_file(folder, case.case_id, ending)
        write_image(case.label, path)
        paths.add(path)
    for channel, image in sorted(case.truth_labels.items()):
        path = truth_label_file(folder, case.case_id, channel, ending)
        write_image(image, path)
        paths.add(path)
    return paths


def truth_label_file(folder: Path | str, case_id: str, channel: int, file_ending: str = ".nii.gz") -> Path:
    """Where the exact label map of ``case_id`` on channel ``channel``'s grid lives."""
    return Path(folder) / TRUTH_FOLDER / f"{case_id}_{channel:04d}{file_ending}"


def read_truth(folder: Path | str) -> dict[str, Any]:
    """The phantom's truth.json (anatomy, geometry, motion and condition per case)."""
    return read_json(Path(folder) / TRUTH_FOLDER / TRUTH_JSON)


def _is_phantom_folder(folder: Path) -> bool:
    """A folder a phantom wrote before (possibly interrupted before dataset.json)."""
    if (folder / TRUTH_FOLDER).is_dir():
        return True
    djson = folder / "dataset.json"
    try:
        return djson.is_file() and "phantom" in read_json(djson)
    except ValueError:
        return False


def _check_target(folder: Path) -> None:
    """Refuse to write into a folder that holds something other than a phantom."""
    if folder.exists() and not folder.is_dir():
        raise CmcsegError(f"cannot write a phantom to {folder}: it is a file. Fix: choose another --name or --raw.")
    if folder.is_dir() and any(folder.iterdir()) and not _is_phantom_folder(folder):
        raise CmcsegError(
            f"{folder} already holds files that a phantom did not write; refusing to overwrite them. "
            "Fix: choose another --name (or --raw), or remove the folder."
        )


def _remove_stale(folder: Path, written: set[Path], ending: str) -> None:
    """Remove files an earlier phantom run left behind (more cases, or a label now absent)."""
    for sub in ("imagesTr", "labelsTr", TRUTH_FOLDER):
        directory = folder / sub
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            stale = path.is_file() and path not in written and (path.name.endswith(ending) or path.suffix == ".json")
            if stale:
                logger.info("removing %s left by an earlier phantom run", path)
                path.unlink()
