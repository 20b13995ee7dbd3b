"""The fingerprint measures cases in the reference space: relations, FOV-only statistics, labels
(cmcseg.plans.fingerprint)."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmcseg.dataset import Dataset, image_file, label_file, write_dataset_json
from cmcseg.errors import CmcsegError
from cmcseg.image_io import write_image
from cmcseg.plans import fingerprint as fingerprint_module
from cmcseg.plans.fingerprint import (
    SAMPLED_FOREGROUND,
    SAMPLED_NONZERO,
    extract_fingerprint,
    load_fingerprint,
    write_fingerprint,
)

SHAPE = (16, 40, 40)  # numpy z, y, x
SPACING = (1.25, 1.25, 2.5)  # SimpleITK x, y, z
#: T2's origin shift per case in voxels (x, y): case 0 is on T1's grid, the others are misaligned
SHIFTS_VOX = [(0, 0), (4, 2), (8, 0), (4, 2), (0, 4), (8, 4)]
UNLABELED = ("case04", "case05")


def _image(arr: np.ndarray, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(origin)
    return img


def _blob_near_low_x_edge() -> np.ndarray:
    """A labelled box from x = 0 to 11: its low-x part lies outside T2's field of view when T2 is shifted +x."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:12, 12:28, 0:12] = 1
    return seg


def write_misaligned(folder: Path) -> Path:
    """T1 (labels on its grid) and T2 with a shifted origin. T2 reads ~500 everywhere it exists (600 on the blob),
    so a zero in its statistics can only come from outside its field of view. Unlabeled cases are 10000-bright."""
    rng = np.random.default_rng(0)
    seg = _blob_near_low_x_edge()
    for i, (sx, sy) in enumerate(SHIFTS_VOX):
        cid = f"case{i:02d}"
        bright = 100.0 if cid in UNLABELED else 1.0
        t1 = (rng.normal(100, 5, SHAPE) + 50 * seg) * bright
        write_image(_image(t1.astype(np.float32)), image_file(folder, cid, 0))
        shifted = np.roll(seg, (-sy, -sx), axis=(1, 2))  # the blob, in T2's own voxels
        shifted[:, :, SHAPE[2] - sx:] = 0
        t2 = (rng.normal(500, 5, SHAPE) + 100 * shifted) * bright
        write_image(_image(t2.astype(np.float32), origin=(sx * SPACING[0], sy * SPACING[1], 0.0)),
                    image_file(folder, cid, 1))
        if cid not in UNLABELED:
            write_image(_image(seg), label_file(folder, cid))
    write_dataset_json(folder, name="Misaligned", channel_names=["T1", "T2"], labels={"background": 0, "blob": 1},
                       num_training=len(SHIFTS_VOX))
    return folder


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory) -> tuple[Dataset, dict]:
    dataset = Dataset.load(write_misaligned(tmp_path_factory.mktemp("fp") / "Dataset941_Misaligned"))
    # two spawned workers: the per-case worker must be spawn-safe
    return dataset, extract_fingerprint(dataset, 0, num_workers=2, num_foreground_samples=30000, progress=False)


def test_relations_are_reported_with_the_known_shift(misaligned) -> None:
    _, fp = misaligned
    for i, (sx, sy) in enumerate(SHIFTS_VOX):
        info = fp["cases"][f"case{i:02d}"]
        rel = info["modalities"]["1"]["relation"]
        shift_mm = math.hypot(sx * SPACING[0], sy * SPACING[1])
        if shift_mm == 0:
            assert rel["kind"] == "same_grid"
            continue
        assert rel["kind"] == "misaligned"
        assert rel["centre_offset_mm"] == pytest.approx(shift_mm, abs=0.5)
        covered = (1 - sx / SHAPE[2]) * (1 - sy / SHAPE[1])
        assert rel["overlap_fraction"] == pytest.approx(covered, abs=0.05)
        assert info["modalities"]["1"]["origin"] == pytest.approx([sx * SPACING[0], sy * SPACING[1], 0.0])
        assert info["modalities"]["0"]["relation"]["kind"] == "same_grid"
        assert info["label_grid_channel"] == (None if f"case{i:02d}" in UNLABELED else 0)
        assert info["modalities"]["1"]["components"] == 1


def test_statistics_come_only_from_inside_each_field_of_view(misaligned) -> None:
    _, fp = misaligned
    t2 = fp["foreground_intensity_properties_per_channel"]["1"]
    assert t2["min"] > 400 and t2["percentile_00_5"] > 400  # no zero from outside T2's field of view
    assert t2["median"] == pytest.approx(600, abs=15)
    assert fp["intensity_sampling_per_channel"] == {"0": SAMPLED_FOREGROUND, "1": SAMPLED_FOREGROUND}


def test_unlabeled_cases_count_for_shapes_but_not_for_intensities(misaligned) -> None:
    _, fp = misaligned
    assert len(fp["spacings"]) == len(fp["shapes_after_crop"]) == len(SHIFTS_VOX)
    assert fp["spacings"][0] == [2.5, 1.25, 1.25] and fp["shapes_after_crop"][0] == list(SHAPE)
    assert [cid for cid, info in fp["cases"].items() if not info["labeled"]] == list(UNLABELED)
    assert fp["cases"]["case04"]["label_grid_channel"] is None
    for stats in fp["foreground_intensity_properties_per_channel"].values():
        assert stats["max"] < 1000  # the 10000-bright unlabeled cases contributed nothing


def test_summary_and_extensions(misaligned, tmp_path: Path) -> None:
    _, fp = misaligned
    assert (fp["schema_version"], fp["reference_channel"], fp["reference_modality"], fp["pairing"]) == \
        (1, 0, "T1", "paired")
    summary = fp["summary"]
    assert "6 training cases, 4 labeled, 2 unlabeled" in summary
    assert "median 2.5x1.25x1.25" in summary and "median 16x40x40" in summary
    max_offset = max(math.hypot(sx * SPACING[0], sy * SPACING[1]) for sx, sy in SHIFTS_VOX)
    assert "Misaligned modalities in 5 of 6 cases" in summary and f"max centre offset {max_offset:.1f} mm" in summary
    write_fingerprint(fp, tmp_path / "fingerprint.json")
    assert load_fingerprint(tmp_path / "fingerprint.json") == fp


def test_unpaired_modality_without_labels_is_sampled_in_its_nonzero_region(tmp_path: Path) -> None:
    folder = tmp_path / "Dataset942_Unpaired"
    rng = np.random.default_rng(3)
    seg = _blob_near_low_x_edge()
    for i in range(4):
        ch = i % 2  # CT cases 0, 2 are labeled; MR cases 1, 3 are not
        arr = np.zeros(SHAPE, np.float32)
        arr[2:14, 5:35, 5:35] = rng.normal(300 if ch else -50, 5, (12, 30, 30))
        write_image(_image(arr + 200 * seg * (ch == 0)), image_file(folder, f"case{i}", ch))
        if ch == 0:
            write_image(_image(seg), label_file(folder, f"case{i}"))
    write_dataset_json(folder, name="Unpaired", channel_names=["CT", "MR"], labels={"background": 0, "blob": 1},
                       num_training=4, pairing="unpaired")
    fp = extract_fingerprint(Dataset.load(folder), 0, num_workers=1, num_foreground_samples=5000, progress=False)
    assert fp["intensity_sampling_per_channel"] == {"0": SAMPLED_FOREGROUND, "1": SAMPLED_NONZERO}
    mr = fp["foreground_intensity_properties_per_channel"]["1"]
    assert mr["mean"] == pytest.approx(300, abs=2) and mr["min"] > 250  # nonzero region only, no padding zeros
    assert fp["foreground_intensity_properties_per_channel"]["0"]["median"] == pytest.approx(150, abs=10)
    assert fp["cases"]["case1"]["modalities"]["1"]["relation"] == {"kind": "unpaired"}
    assert set(fp["cases"]["case1"]["modalities"]) == {"1"}
    assert "MR (input channel 1, nonzero inside its field of view)" in fp["summary"] and "unpaired" in fp["summary"]


def test_a_worker_error_reaches_the_parent_with_the_file_named(tmp_path: Path) -> None:
    """Worker exceptions travel back pickled: an unreadable file must arrive as a picklable CmcsegError."""
    folder = tmp_path / "Dataset943_Broken"
    for i in range(2):
        write_image(_image(np.ones(SHAPE, np.float32)), image_file(folder, f"case{i}", 0))
    image_file(folder, "case1", 0).write_bytes(b"not an image")
    write_dataset_json(folder, name="Broken", channel_names=["T1"], labels={"background": 0, "blob": 1},
                       num_training=2)
    fingerprint_module._init_worker(Dataset.load(folder), {"reference_channel": 0, "samples_per_modality": {0: 10}})
    with pytest.raises(CmcsegError, match="case1_0000.nii.gz") as raised:
        fingerprint_module._analyze_in_worker("case1")
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)
