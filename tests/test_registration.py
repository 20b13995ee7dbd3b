"""Rigid registration: recovering a known transform across contrasts and spacings, verdicts, and transform files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cmcseg.dataset import Dataset, image_file, label_file, write_dataset_json
from cmcseg.image_io import write_image
from cmcseg.preprocessing.alignment import _index_to_physical, resample_to_reference
from cmcseg.preprocessing.case_loading import load_case_in_reference_space
from cmcseg.preprocessing.registration import (
    load_transforms,
    register_case,
    register_dataset,
    register_rigid,
    report_file,
    save_transforms,
    transform_file,
)

FIXED_SIZE, FIXED_SPACING = (128, 128, 20), (0.8, 0.8, 3.0)  # thick-slice MR, x y z
MOVING_SIZE, MOVING_SPACING = (72, 72, 16), (1.5, 1.5, 4.0)
#: the truth: maps reference points to moving points (8.2 mm at the centre, 5.4 degrees)
TRUTH = sitk.Euler3DTransform((0, 0, 0), np.radians(2.0), np.radians(-1.5), np.radians(5.0), (6.0, -5.0, 2.5))


def _grid(size, spacing) -> sitk.Image:
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(-(np.asarray(size) - 1) / 2 * np.asarray(spacing)))
    return img


def _points(grid: sitk.Image, anatomy: sitk.Transform | None) -> np.ndarray:
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1].reshape(-1, 3)
    p = _index_to_physical(grid, idx.astype(float))
    if anatomy is not None:
        p = np.asarray([anatomy.TransformPoint(tuple(q)) for q in p])
    return p.reshape(*size[::-1], 3)


def _ellipsoid(p: np.ndarray) -> np.ndarray:
    return (((p - (10, -5, 0)) / (25, 18, 14)) ** 2).sum(-1) <= 1


def _render(grid: sitk.Image, contrast: tuple[float, float, float], seed: int,
            anatomy: sitk.Transform | None = None) -> sitk.Image:
    """Body, ellipsoid and a textured box with MR-like contrast (body, ellipsoid, box) and noise."""
    p = _points(grid, anatomy)
    body = (((p / (48, 42, 60)) ** 2).sum(-1) <= 1)
    box = np.all(np.abs(p - (-20, 15, 5)) <= (10, 8, 12), -1)
    texture = 15 * (np.sin(p[..., 0] / 4) + np.cos(p[..., 1] / 5) + np.sin(p[..., 2] / 6))
    arr = contrast[0] * body + (contrast[1] - contrast[0]) * _ellipsoid(p) + (contrast[2] - contrast[0]) * box
    arr = arr + texture * body + np.random.default_rng(seed).normal(0, 5, arr.shape)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(grid)
    return out


def _label(grid: sitk.Image, anatomy: sitk.Transform | None = None) -> sitk.Image:
    out = sitk.GetImageFromArray(_ellipsoid(_points(grid, anatomy)).astype(np.uint8))
    out.CopyInformation(grid)
    return out


@pytest.fixture(scope="module")
def pair() -> dict:
    fixed_grid, moving_grid = _grid(FIXED_SIZE, FIXED_SPACING), _grid(MOVING_SIZE, MOVING_SPACING)
    inverse = TRUTH.GetInverse()
    return {
        "fixed": _render(fixed_grid, (100, 250, 60), seed=0),
        "fixed_label": _label(fixed_grid),
        "moving": _render(moving_grid, (150, 50, 300), seed=1, anatomy=inverse),  # inverted contrast
        "moving_label": _label(moving_grid, inverse),
    }


@pytest.fixture(scope="module")
def result(pair):
    return register_rigid(pair["moving"], pair["fixed"])


def _dice_after(pair: dict, transform: sitk.Transform | None) -> float:
    moved = resample_to_reference(pair["moving_label"], pair["fixed"], is_label=True, transform=transform)
    a, b = sitk.GetArrayFromImage(moved) > 0, sitk.GetArrayFromImage(pair["fixed_label"]) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_recovers_a_known_rigid_transform(pair, result):
    assert result.success, result.reason
    assert result.metric_after < result.metric_before
    assert result.iterations > 0 and result.stop_condition
    assert abs(result.rotation_deg - 5.4) < 1.0 and abs(result.translation_mm - 8.2) < 1.5
    structure = _points(pair["fixed"], None)[sitk.GetArrayFromImage(pair["fixed_label"]) > 0][::25]
    errors = [np.linalg.norm(np.subtract(result.transform.TransformPoint(tuple(p)), TRUTH.TransformPoint(tuple(p))))
              for p in structure]
    assert max(errors) < 1.5, max(errors)
    before, after = _dice_after(pair, None), _dice_after(pair, result.transform)
    assert after >= 0.9 and before < 0.8, (before, after)


def test_is_deterministic(pair, result):
    again = register_rigid(pair["moving"], pair["fixed"])
    assert again.transform.GetParameters() == result.transform.GetParameters()
    assert again.metric_after == result.metric_after


def test_noise_is_not_a_successful_registration(pair):
    noise = sitk.GetImageFromArray(np.random.default_rng(7).normal(100, 30, MOVING_SIZE[::-1]).astype(np.float32))
    noise.CopyInformation(pair["moving"])
    res = register_rigid(noise, pair["fixed"])
    assert not res.success
    assert "information" in res.reason or "failed" in res.reason


def test_implausible_correction_is_reported(pair):
    res = register_rigid(pair["moving"], pair["fixed"], max_translation_mm=3.0, max_rotation_deg=2.0)
    assert not res.success
    assert "translation" in res.reason and "rotation" in res.reason


def test_too_thin_image_is_reported(pair):
    thin = sitk.Image([40, 40, 2], sitk.sitkFloat32)
    thin.SetSpacing((2.0, 2.0, 30.0))
    res = register_rigid(thin, pair["fixed"])
    assert not res.success and "at least 4" in res.reason


def _write_dataset(folder: Path, pair: dict) -> Dataset:
    write_image(pair["fixed"], image_file(folder, "case00", 0))
    write_image(pair["moving"], image_file(folder, "case00", 1))
    write_image(pair["fixed_label"], label_file(folder, "case00"))
    write_dataset_json(folder, name=folder.name, channel_names=["T2", "LGE"], labels={"background": 0, "blob": 1},
                       num_training=1)
    return Dataset.load(folder)


def test_case_transforms_round_trip_and_align(pair, tmp_path):
    dataset = _write_dataset(tmp_path / "raw", pair)
    case = dataset.case("case00")
    results = register_case(dataset, case, reference_channel=0)
    assert list(results) == [1] and results[1].success
    folder = tmp_path / "registration"
    save_transforms(results, folder, "case00")
    assert transform_file(folder, "case00", 1).is_file()
    report = json.loads(report_file(folder, "case00").read_text())
    assert report["channels"]["1"]["success"] is True and report["channels"]["1"]["applied"] is True

    loaded = load_transforms(folder, "case00")
    point = (3.0, -7.0, 5.0)
    assert np.allclose(loaded[1].TransformPoint(point), results[1].transform.TransformPoint(point), atol=1e-6)
    aligned = load_case_in_reference_space(dataset, case, 0, loaded)
    expected = resample_to_reference(pair["moving"], pair["fixed"], transform=results[1].transform)
    assert np.allclose(aligned.data[1], sitk.GetArrayFromImage(expected), atol=1e-3)

    summary = register_dataset(dataset, 0, folder)  # already registered: kept
    assert summary == {"case00": {"success": True, "applied_channels": [1], "failed_channels": {}}}

    results[1].success = False  # a failed registration leaves no transform behind
    results[1].reason = "test"
    save_transforms(results, folder, "case00")
    assert not transform_file(folder, "case00", 1).exists() and load_transforms(folder, "case00") == {}
    assert register_dataset(dataset, 0, folder)["case00"]["success"] is False
