"""Test helpers: tiny raw datasets written on the fly, and the path of the shared real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmcseg.dataset import image_file, label_file, write_dataset_json
from cmcseg.image_io import write_image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """The path of a folder of ../shared/data, or skip the test when it is absent (a user's machine)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample data not available at {path} (only on developer and CI machines)")
    return path


def ball_volume(shape=(8, 24, 24), spacing=(1.0, 1.0, 4.0), radius_vox=6, value=1, dtype=np.uint8,
                origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A sphere-ish blob in a (z, y, x) array with SimpleITK (x, y, z) spacing."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]
    r = ((y - c[1]) ** 2 + (x - c[2]) ** 2) / radius_vox**2 + (z - c[0]) ** 2 / max(1, shape[0] / 3) ** 2
    arr = (r < 1).astype(dtype) * value
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write_tiny_dataset(folder: Path, n_cases: int = 3, channels=("T1", "T2"), labels=None, unlabeled=(),
                       pairing: str = "paired", rng_seed: int = 0) -> Path:
    """A small co-registered raw dataset: noise + a labelled blob, every channel on one grid."""
    labels = labels or {"background": 0, "blob": 1}
    rng = np.random.default_rng(rng_seed)
    for i in range(n_cases):
        cid = f"case{i:02d}"
        seg = ball_volume()
        seg_arr = sitk.GetArrayFromImage(seg)
        chans = range(len(channels)) if pairing == "paired" else [i % len(channels)]
        for ch in chans:
            arr = (rng.normal(100 + 50 * ch, 10, seg_arr.shape) + 80 * seg_arr).astype(np.float32)
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(seg)
            write_image(img, image_file(folder, cid, ch))
        if cid not in unlabeled:
            write_image(seg, label_file(folder, cid))
    write_dataset_json(folder, name=folder.name, channel_names=list(channels), labels=labels,
                       num_training=n_cases, pairing=pairing)
    return folder
