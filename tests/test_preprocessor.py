"""Preprocessing a tiny misaligned two-modality dataset: outputs, normalisation, FOV, labels, incremental runs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

import cmcseg.image_io
from cmcseg.dataset import Dataset, image_file, label_file, write_dataset_json
from cmcseg.image_io import write_image
from cmcseg.preprocessing.preprocessor import (
    PreprocessingError,
    case_content_hash,
    load_case,
    preprocess_case,
    preprocess_dataset,
)
from cmcseg.preprocessing.storage import case_files, list_cases, properties_to_json, read_array

REF_SIZE, REF_SPACING = (48, 40, 12), (1.0, 1.0, 3.0)  # x, y, z
MOV_SIZE, MOV_SPACING, MOV_SHIFT = (18, 24, 10), (2.0, 2.0, 3.6), (14.0, -3.0, 2.0)
TARGET_SPACING = [3.0, 1.5, 1.5]  # z, y, x


def _points(size, spacing, origin) -> np.ndarray:
    """(z, y, x, 3) physical points of an axis-aligned grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1]
    return np.asarray(origin) + idx * np.asarray(spacing)


def _scene(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Body, a labelled ellipsoid (1) and a labelled box (2), in physical coordinates (mm)."""
    body = (((p - (24, 20, 18)) / (22, 18, 30)) ** 2).sum(-1) <= 1
    ell = (((p - (20, 18, 18)) / (8, 7, 9)) ** 2).sum(-1) <= 1
    box = np.all(np.abs(p - (34, 26, 16)) <= (4, 4, 6), -1)
    label = np.where(box, 2, np.where(ell, 1, 0)).astype(np.uint8)
    return body, label


def _image(arr: np.ndarray, spacing, origin) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _write_case(folder: Path, cid: str, seed: int, labeled: bool) -> None:
    rng = np.random.default_rng(seed)
    ref_origin = (0.0, 0.0, 0.0)
    body, label = _scene(_points(REF_SIZE, REF_SPACING, ref_origin))
    t2 = 200.0 * body + 150.0 * (label == 1) - 80.0 * (label == 2) + rng.normal(0, 10, body.shape) * body
    write_image(_image(t2.astype(np.float32), REF_SPACING, ref_origin), image_file(folder, cid, 0))
    mov_origin = tuple(np.add(ref_origin, MOV_SHIFT))
    body_m, label_m = _scene(_points(MOV_SIZE, MOV_SPACING, mov_origin))
    adc = 1000.0 * body_m - 600.0 * (label_m == 1) + 300.0 * (label_m == 2) + rng.normal(0, 30, body_m.shape)
    write_image(_image(adc.astype(np.float32), MOV_SPACING, mov_origin), image_file(folder, cid, 1))
    if labeled:
        write_image(_image(label, REF_SPACING, ref_origin), label_file(folder, cid))


def _write_dataset(folder: Path, labeled=("case00", "case01"), unlabeled=("case02",)) -> Dataset:
    for i, cid in enumerate([*labeled, *unlabeled]):
        _write_case(folder, cid, seed=i, labeled=cid in labeled)
    write_dataset_json(folder, name=folder.name, channel_names=["T2", "ADC"],
                       labels={"background": 0, "ellipsoid": 1, "box": 2}, num_training=len(labeled) + len(unlabeled))
    return Dataset.load(folder)


def _plans() -> dict:
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": 0.0, "max": 1.0, "percentile_99_5": 1.0,
             "percentile_00_5": 0.0}
    return {
        "schema_version": 1, "dataset_name": "Dataset901_Misaligned",
        "labels": {"background": 0, "ellipsoid": 1, "box": 2}, "pairing": "paired",
        "reference_channel": 0, "reference_modality": "T2", "modalities": ["T2", "ADC"],
        "channels_per_modality": {"0": 1, "1": 1}, "register": "none", "label_interpolation": "nearest",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": dict(stats), "1": dict(stats)},
        "configurations": {"3d_fullres": {
            "data_identifier": "3d_fullres", "spacing": TARGET_SPACING, "patch_size": [8, 24, 24], "batch_size": 2,
            "median_image_size_in_voxels": [12, 27, 32],
            "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization"],
            "use_mask_for_norm": [False, False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {}, "batch_dice": True}},
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Dataset, dict, Path, object]:
    """The dataset preprocessed once, with two spawned workers."""
    root = tmp_path_factory.mktemp("prep")
    dataset = _write_dataset(root / "raw" / "Dataset901_Misaligned")
    plans = _plans()
    out = root / "preprocessed" / "Dataset901_Misaligned"
    report = preprocess_dataset(dataset, plans, "3d_fullres", out, num_workers=2, progress=False)
    return dataset, plans, out, report


def test_writes_four_files_per_case_and_none_partial(prepared):
    dataset, _, out, report = prepared
    folder = out / "3d_fullres"
    assert sorted(report.processed) == ["case00", "case01", "case02"] and not report.skipped
    assert list_cases(folder) == ["case00", "case01", "case02"]
    for cid in ("case00", "case01"):
        assert all(p.is_file() for p in case_files(folder, cid).values())
    files = case_files(folder, "case02")
    assert files["data"].is_file() and files["fov"].is_file() and files["properties"].is_file()
    assert not files["seg"].exists(), "an unlabeled case has no seg file"
    assert not list(folder.glob(".tmp-*"))


def test_arrays_have_planned_shape_dtype_and_properties(prepared):
    _, _, out, _ = prepared
    data, seg, fov, props = load_case(out / "3d_fullres", "case00")
    assert data.dtype == np.float32 and seg.dtype == np.int8 and fov.dtype == np.uint8
    assert data.shape[0] == 2 and fov.shape[0] == 2 and seg.shape[0] == 1
    assert data.shape[1:] == seg.shape[1:] == fov.shape[1:] == tuple(props["shape_after_resampling"])
    expected = np.round(np.multiply(props["shape_after_cropping_and_before_resampling"],
                                    props["spacing_before_resampling"]) / TARGET_SPACING).astype(int)
    assert list(data.shape[1:]) == expected.tolist()
    assert props["spacing_after_resampling"] == TARGET_SPACING
    assert props["spacing"] == [3.0, 1.0, 1.0]  # reference spacing, numpy order
    assert props["reference_geometry"]["size"] == list(REF_SIZE)
    assert props["reference_geometry"]["spacing"] == list(REF_SPACING)
    assert props["shape_before_cropping"] == list(REF_SIZE[::-1])
    assert props["modality_relations"]["1"]["kind"] == "misaligned"
    assert props["labeled"] is True and len(props["content_hash"]) == 64
    for key in ("bbox_used_for_cropping", "transpose_forward", "transpose_backward", "class_locations"):
        assert key in props
    # written with LZ4, not nnU-Net's LZ4HC (9x the write time for 8 % smaller files; storage.py)
    assert read_array(case_files(out / "3d_fullres", "case00")["data"]).schunk.cparams.codec == blosc2.Codec.LZ4


def test_data_is_normalised_inside_each_fov(prepared):
    _, _, out, _ = prepared
    data, _, fov, _ = load_case(out / "3d_fullres", "case01")
    data, fov = data[:], fov[:]
    for c in range(2):
        inside = data[c][fov[c] == 1]
        assert abs(inside.mean()) < 0.1 and abs(inside.std() - 1) < 0.1, (c, inside.mean(), inside.std())


def test_fov_marks_the_outside_of_the_shifted_modality(prepared):
    _, _, out, _ = prepared
    data, _, fov, props = load_case(out / "3d_fullres", "case00")
    data, fov = data[:], fov[:]
    assert fov[0].all(), "the reference modality covers its own grid"
    outside = fov[1] == 0
    assert 0.2 < outside.mean() < 0.9, outside.mean()
    assert np.all(data[1][outside] == 0)
    # the moving image starts 14 mm to the right of the reference: the first x columns are outside
    assert np.all(fov[1][..., :2] == 0) and fov[1][..., -5:].any()
    assert props["fov_fraction"]["0"] == 1.0 and props["fov_fraction"]["1"] < 1.0


def test_labels_and_class_locations_survive_resampling(prepared):
    dataset, _, out, _ = prepared
    _, seg, _, props = load_case(out / "3d_fullres", "case00")
    seg = seg[:]
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.case("case00").label)))
    for value in (1, 2):
        before = (raw == value).sum() * np.prod(REF_SPACING)
        after = (seg == value).sum() * np.prod(TARGET_SPACING)
        assert abs(after - before) / before < 0.15, (value, before, after)
        locs = np.asarray(props["class_locations"][str(value)])
        assert len(locs) > 0 and locs.shape[1] == 4
        assert np.all(seg[tuple(locs.T)] == value)
    assert set(np.unique(seg)) <= {-1, 0, 1, 2}


def test_second_run_skips_and_a_changed_file_is_redone(prepared, tmp_path):
    dataset, plans, out, _ = prepared
    again = preprocess_dataset(dataset, plans, "3d_fullres", out, num_workers=1, progress=False)
    assert again.processed == [] and sorted(again.skipped) == ["case00", "case01", "case02"]
    assert "3 cases unchanged, skipped" in again.summary()

    _write_case(dataset.folder, "case01", seed=99, labeled=True)  # new bytes for case01 only
    third = preprocess_dataset(dataset, plans, "3d_fullres", out, num_workers=1, progress=False)
    assert third.processed == ["case01"] and sorted(third.skipped) == ["case00", "case02"]

    changed = copy.deepcopy(plans)
    changed["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = [1, 2, 3]  # irrelevant to the arrays
    assert case_content_hash(dataset.case("case00"), changed, "3d_fullres") == \
        case_content_hash(dataset.case("case00"), plans, "3d_fullres")
    changed["configurations"]["3d_fullres"]["spacing"] = [3.0, 2.0, 2.0]
    assert case_content_hash(dataset.case("case00"), changed, "3d_fullres") != \
        case_content_hash(dataset.case("case00"), plans, "3d_fullres")


def test_corrupt_file_is_named_after_the_other_cases_are_done(tmp_path):
    dataset = _write_dataset(tmp_path / "raw" / "Dataset902_Corrupt", labeled=("case00",), unlabeled=("case01",))
    bad = image_file(dataset.folder, "case01", 1)
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    out = tmp_path / "pre"
    with pytest.raises(PreprocessingError) as info:
        preprocess_dataset(dataset, _plans(), "3d_fullres", out, num_workers=1, progress=False)
    message = str(info.value)
    assert "case01" in message and bad.name in message
    assert info.value.report.processed == ["case00"]
    assert case_files(out / "3d_fullres", "case00")["properties"].is_file()
    assert not case_files(out / "3d_fullres", "case01")["data"].exists()


def test_killed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    dataset = _write_dataset(tmp_path / "raw" / "Dataset903_Killed", labeled=("case00",), unlabeled=())

    def fail(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(cmcseg.image_io.os, "replace", fail)
    out = tmp_path / "pre"
    with pytest.raises(PreprocessingError, match="simulated crash"):
        preprocess_dataset(dataset, _plans(), "3d_fullres", out, num_workers=1, progress=False)
    folder = out / "3d_fullres"
    assert not any(p.exists() for p in case_files(folder, "case00").values())
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob("*.b2nd"))
    monkeypatch.undo()
    report = preprocess_dataset(dataset, _plans(), "3d_fullres", out, num_workers=1, progress=False)
    assert report.processed == ["case00"]


def test_preprocess_case_is_pure_and_transposes(tmp_path):
    dataset = _write_dataset(tmp_path / "raw" / "Dataset904_Pure", labeled=("case00",), unlabeled=())
    plans = _plans()
    a = preprocess_case(dataset, dataset.case("case00"), plans, "3d_fullres")
    b = preprocess_case(dataset, dataset.case("case00"), plans, "3d_fullres")
    assert np.array_equal(a.data, b.data) and np.array_equal(a.seg, b.seg)
    assert a.properties["class_locations"] == b.properties["class_locations"]
    plans_t = copy.deepcopy(plans)
    plans_t["transpose_forward"], plans_t["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    plans_t["configurations"]["3d_fullres"]["spacing"] = [TARGET_SPACING[i] for i in (2, 0, 1)]
    t = preprocess_case(dataset, dataset.case("case00"), plans_t, "3d_fullres")
    assert t.properties["shape_before_cropping"] == [a.properties["shape_before_cropping"][i] for i in (2, 0, 1)]
    assert t.seg.shape[1:] == tuple(a.seg.shape[1:][i] for i in (2, 0, 1))
    assert np.array_equal(np.transpose(a.seg[0], (2, 0, 1)) > 0, t.seg[0] > 0)


def test_properties_json_is_compact_for_class_locations():
    text = properties_to_json({"a": 1, "class_locations": {"1": [[0, 1, 2, 3], [0, 4, 5, 6]], "2": []}})
    assert '"1": [[0,1,2,3],[0,4,5,6]]' in text
    assert json.loads(text)["class_locations"]["2"] == []


def _rgb_depth_dataset(folder: Path) -> Dataset:
    """2D: an RGB photo (vector pixels) and a depth map on a shifted, coarser grid."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :48]
    disc = ((yy - 20) ** 2 + (xx - 22) ** 2) < 100
    for cid in ("img00", "img01"):
        rgb = np.stack([disc * 200 + rng.integers(0, 40, disc.shape), 120 - disc * 60 + rng.integers(0, 40, disc.shape),
                        rng.integers(0, 255, disc.shape)], -1).astype(np.uint8)
        photo = sitk.GetImageFromArray(rgb, isVector=True)
        write_image(photo, image_file(folder, cid, 0, ".nrrd"))
        depth = sitk.GetImageFromArray((disc[::2, ::2] * 5.0 + 10 + rng.normal(0, 0.1, (20, 24))).astype(np.float32))
        depth.SetSpacing((2.0, 2.0))
        depth.SetOrigin((6.0, 0.0))
        write_image(depth, image_file(folder, cid, 1, ".nrrd"))
        write_image(sitk.GetImageFromArray(disc.astype(np.uint8)), label_file(folder, cid, ".nrrd"))
    write_dataset_json(folder, name=folder.name, channel_names=["RGB", "depth"], labels={"background": 0, "disc": 1},
                       num_training=2, file_ending=".nrrd", dimensionality="2d")
    return Dataset.load(folder)


def test_2d_rgb_modality_gives_three_channels(tmp_path):
    dataset = _rgb_depth_dataset(tmp_path / "raw" / "Dataset905_RGBD")
    plans = _plans()
    plans.update(modalities=["RGB", "depth"], reference_modality="RGB", channels_per_modality={"0": 3, "1": 1},
                 labels={"background": 0, "disc": 1})
    plans["foreground_intensity_properties_per_channel"] = {str(c): {} for c in range(4)}
    cfg = plans["configurations"].pop("3d_fullres")
    cfg.update(data_identifier="2d", spacing=[1.0, 1.0], patch_size=[32, 32],
               normalization_schemes=["RGBTo01Normalization"] * 3 + ["ZScoreNormalization"],
               use_mask_for_norm=[False] * 4)
    plans["configurations"]["2d"] = cfg
    preprocess_dataset(dataset, plans, "2d", tmp_path / "pre", num_workers=1, progress=False)
    data, seg, fov, props = load_case(tmp_path / "pre" / "2d", "img00")
    assert data.shape[0] == 4 and fov.shape[0] == 2 and data.shape[1] == 1 and seg.shape[1] == 1
    data, fov = data[:], fov[:]
    assert 0.0 <= data[:3].min() and data[:3].max() <= 1.0
    assert fov[0].all() and not fov[1].all() and np.all(data[3][fov[1] == 0] == 0)
    assert props["reference_geometry"]["dimension"] == 2 and props["reference_geometry"]["size"] == [48, 40]
    assert props["channels_per_modality"] == {"0": 3, "1": 1}


def test_rigid_registration_runs_before_preprocessing(tmp_path):
    dataset = _write_dataset(tmp_path / "raw" / "Dataset906_Rigid", labeled=("case00",), unlabeled=())
    plans = _plans()
    plans["register"] = "rigid"
    out = tmp_path / "pre"
    preprocess_dataset(dataset, plans, "3d_fullres", out, num_workers=1, progress=False)
    report = json.loads((out / "registration" / "case00_registration.json").read_text())
    applied = sorted(int(k) for k, c in report["channels"].items() if c["applied"])
    _, _, _, props = load_case(out / "3d_fullres", "case00")
    assert props["registered_channels"] == applied
    again = preprocess_dataset(dataset, plans, "3d_fullres", out, num_workers=1, progress=False)
    assert again.skipped == ["case00"]


def test_unpaired_case_has_zero_channels_and_empty_fov_for_absent_modalities(tmp_path):
    folder = tmp_path / "raw" / "Dataset907_Unpaired"
    _write_case(folder, "pair", seed=5, labeled=True)
    image_file(folder, "pair", 1).rename(image_file(folder, "mr00", 1))  # another patient's modality 1
    write_dataset_json(folder, name=folder.name, channel_names=["CT", "MR"], pairing="unpaired",
                       labels={"background": 0, "ellipsoid": 1, "box": 2}, num_training=2)
    dataset = Dataset.load(folder)
    plans = _plans()
    plans["pairing"] = "unpaired"
    preprocess_dataset(dataset, plans, "3d_fullres", tmp_path / "pre", num_workers=1, progress=False)
    data, seg, fov, props = load_case(tmp_path / "pre" / "3d_fullres", "mr00")
    assert seg is None and props["labeled"] is False and props["reference_channel"] == 1
    assert not fov[0].any() and fov[1].all() and not data[0].any()
    data, seg, fov, props = load_case(tmp_path / "pre" / "3d_fullres", "pair")
    assert fov[0].all() and not fov[1].any() and props["reference_channel"] == 0
