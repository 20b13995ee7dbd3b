"""Phantom datasets: synthetic stand-ins for the datasets cmcseg was designed for.

Each phantom reproduces the properties that matter for the pipeline (anisotropic thick slices,
sequences on their own grids, unlabeled cases, unpaired modalities, 2D scenes under adverse
conditions) and writes the ground truth it was built from to ``phantom_truth/`` beside the raw
dataset, so tests can measure alignment and segmentation against the exact answer.

``synthesize("MSCMR", folder, size="tiny")`` writes a complete nnU-Net v2 raw dataset.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmcseg.phantoms.abdomen import write_amos
from cmcseg.phantoms.cardiac import write_mscmr
from cmcseg.phantoms.geometry import RigidMotion
from cmcseg.phantoms.orbit import write_tao
from cmcseg.phantoms.scenes import write_deliver
from cmcseg.phantoms.writing import TRUTH_FOLDER, read_truth, truth_label_file

logger = logging.getLogger(__name__)

#: phantom name -> writer ``(folder, *, cases, seed, size, name, **options) -> folder``
PHANTOMS: dict[str, Callable[..., Path]] = {
    "MSCMR": write_mscmr,
    "AMOS": write_amos,
    "TAO": write_tao,
    "DELIVER": write_deliver,
}
#: tiny: tests (seconds); small: the demo (well under a minute); default: realistic sizes
SIZES = ("tiny", "small", "default")

__all__ = ["PHANTOMS", "SIZES", "RigidMotion", "TRUTH_FOLDER", "read_truth", "synthesize", "truth_label_file"]


def synthesize(
    kind: str,
    folder: Path,
    cases: int | None = None,
    seed: int = 0,
    size: str = "small",
    name: str | None = None,
    **options: Any,
) -> Path:
    """Write phantom ``kind`` as a complete raw dataset in ``folder`` and return ``folder``.

    ``cases`` overrides the size's case count; the same ``seed`` writes byte-identical files.
    ``options`` go to the phantom's writer (e.g. ``motion={"bSSFP": (5, 0, 0)}`` for MSCMR).
    """
    writer = _writer_for(kind)
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; choose one of {SIZES}")
    if cases is not None and cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    canonical = next(k for k in PHANTOMS if k.lower() == kind.lower())
    logger.info("synthesising phantom %s (size %s, seed %d) into %s", canonical, size, seed, folder)
    return writer(Path(folder), cases=cases, seed=seed, size=size, name=name or canonical, **options)


def _writer_for(kind: str) -> Callable[..., Path]:
    for key, writer in PHANTOMS.items():
        if key.lower() == kind.lower():
            return writer
    raise ValueError(f"unknown phantom {kind!r}; choose one of {sorted(PHANTOMS)}")
