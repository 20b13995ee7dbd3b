"""The raw dataset model, the work roots, and every bad input named in the foundation issue."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import ball_volume, write_tiny_dataset

from cmcseg.dataset import Dataset, image_file, label_file, nnunet_label_dict, write_dataset_json
from cmcseg.errors import DatasetError
from cmcseg.image_io import write_image
from cmcseg.paths import dataset_folder_for_new, find_dataset_folder, resolve_roots
from cmcseg.plans.integrity import verify_dataset


def _problems(excinfo) -> str:
    return "\n".join(str(p) for p in excinfo.value.problems)


# ----------------------------------------------------------------------------- reading
def test_reads_nnunet_v2_dataset_with_unlabeled_case(tiny_dataset: Path):
    ds = Dataset.load(tiny_dataset)
    assert ds.modalities == ["T1", "T2"]
    assert [c.case_id for c in ds.cases] == ["case00", "case01", "case02"]
    assert [c.case_id for c in ds.unlabeled_cases] == ["case02"]
    assert ds.cases[0].images[1].name == "case00_0001.nii.gz"
    assert ds.labels == {"background": 0, "blob": 1}


def test_reads_nnunet_v1_keys(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset901_V1", n_cases=2)
    meta = json.loads((folder / "dataset.json").read_text())
    v1 = {"name": "V1", "modality": meta["channel_names"], "labels": {"0": "background", "1": "blob"},
          "numTraining": 2, "tensorImageSize": "3D"}
    (folder / "dataset.json").write_text(json.dumps(v1))
    ds = Dataset.load(folder)
    assert ds.labels == {"background": 0, "blob": 1}
    assert ds.file_ending == ".nii.gz" and ds.num_channels == 2


def test_unpaired_dataset_holds_one_modality_per_case(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset902_Unp", n_cases=4, channels=("CT", "MRI"), pairing="unpaired")
    ds = Dataset.load(folder)
    assert ds.unpaired
    assert [c.channels for c in ds.cases] == [[0], [1], [0], [1]]


def test_unpaired_case_with_two_modalities_is_a_duplicate_id(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset903_Unp", n_cases=2, channels=("CT", "MRI"), pairing="unpaired")
    shutil.copy(image_file(folder, "case00", 0), image_file(folder, "case00", 1))
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    assert "case id appears 2 times" in _problems(e) and "case00" in _problems(e)


# ----------------------------------------------------------------------------- structural bad input
def test_missing_dataset_json(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset904_X", n_cases=1)
    (folder / "dataset.json").unlink()
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    msg = str(e.value)
    assert "dataset.json is missing" in msg and str(folder / "dataset.json") in msg and "channel_names" in msg


def test_malformed_dataset_json_names_line(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset905_X", n_cases=1)
    (folder / "dataset.json").write_text('{"channel_names": {"0": "T1"},\n "labels": }')
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    assert "not valid JSON" in str(e.value) and "line 2" in str(e.value)


def test_dataset_json_missing_keys_are_all_reported(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset906_X", n_cases=1)
    (folder / "dataset.json").write_text('{"numTraining": 1}')
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    msg = _problems(e)
    assert "channel_names" in msg and "'labels'" in msg and "file_ending" in msg


def test_missing_channel_file_names_expected_path(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset907_X", n_cases=2)
    image_file(folder, "case01", 1).unlink()
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    (p,) = e.value.problems
    assert p.case == "case01" and p.file.endswith("case01_0001.nii.gz") and "missing" in p.problem and p.fix


def test_label_without_images(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset908_X", n_cases=1)
    shutil.copy(label_file(folder, "case00"), label_file(folder, "ghost"))
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    (p,) = e.value.problems
    assert p.case == "ghost" and "label has no images" in p.problem


def test_case_id_twice_across_splits_and_letter_case(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset909_X", n_cases=1)
    (folder / "imagesTs").mkdir()
    for ch in (0, 1):
        shutil.copy(image_file(folder, "case00", ch), image_file(folder, "case00", ch, split="Ts"))
        shutil.copy(image_file(folder, "case00", ch), image_file(folder, "CASE00", ch))
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    msg = _problems(e)
    assert "in imagesTr and in imagesTs" in msg and "differ only in letter case" in msg


def test_all_structural_problems_collected_before_raising(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset910_X", n_cases=3)
    image_file(folder, "case00", 0).unlink()
    image_file(folder, "case02", 1).unlink()
    shutil.copy(label_file(folder, "case01"), label_file(folder, "orphan"))
    with pytest.raises(DatasetError) as e:
        Dataset.load(folder)
    assert {p.case for p in e.value.problems} == {"case00", "case02", "orphan"}


# ----------------------------------------------------------------------------- content bad input
def test_integrity_check_collects_every_content_problem(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset911_X", n_cases=5)
    # NaN in an image
    img = sitk.ReadImage(str(image_file(folder, "case00", 0)))
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3, 4] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    write_image(bad, image_file(folder, "case00", 0))
    # label value not declared
    lab = sitk.ReadImage(str(label_file(folder, "case01")))
    write_image(lab * 7, label_file(folder, "case01"))
    # non-integer label
    flab = sitk.Cast(sitk.ReadImage(str(label_file(folder, "case02"))), sitk.sitkFloat32) * 0.5
    write_image(flab, label_file(folder, "case02"))
    # corrupt (truncated) file
    raw = image_file(folder, "case03", 1).read_bytes()
    image_file(folder, "case03", 1).write_bytes(raw[: len(raw) // 3])
    # 2D image in a 3D dataset
    slice2d = sitk.ReadImage(str(image_file(folder, "case04", 0)))[:, :, 0]
    write_image(slice2d, image_file(folder, "case04", 0))

    report = verify_dataset(Dataset.load(folder), num_workers=1, progress=False)
    by_case = {p.case: p for p in report.errors}
    assert set(by_case) == {"case00", "case01", "case02", "case03", "case04"}
    assert "NaN" in by_case["case00"].problem and by_case["case00"].file.endswith("case00_0000.nii.gz")
    assert "[7]" in by_case["case01"].problem and "not declared" in by_case["case01"].problem
    assert "non-integer" in by_case["case02"].problem
    assert "corrupt" in by_case["case03"].problem and by_case["case03"].file.endswith("case03_0001.nii.gz")
    assert "2D image" in by_case["case04"].problem
    with pytest.raises(DatasetError) as e:
        report.raise_if_fatal()
    assert "5 problem(s)" in str(e.value)


def test_float_label_with_integer_values_is_accepted(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset912_X", n_cases=1)
    lab = sitk.Cast(sitk.ReadImage(str(label_file(folder, "case00"))), sitk.sitkFloat32)
    write_image(lab, label_file(folder, "case00"))
    report = verify_dataset(Dataset.load(folder), progress=False)
    assert report.ok, report.table()


def test_misaligned_modality_is_a_finding_not_an_error(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset913_X", n_cases=1)
    moved = sitk.ReadImage(str(image_file(folder, "case00", 1)))
    moved.SetOrigin((7.0, -5.0, 12.0))
    moved.SetSpacing((1.5, 1.5, 6.0))
    write_image(moved, image_file(folder, "case00", 1))
    report = verify_dataset(Dataset.load(folder), progress=False)
    assert report.ok
    (finding,) = [p for p in report.problems if p.severity == "finding"]
    assert finding.case == "case00" and "resampled into the reference space" in finding.problem


def test_resampling_findings_are_one_row_per_modality_pair_with_a_fix_and_a_verdict(tmp_path: Path):
    folder = write_tiny_dataset(tmp_path / "Dataset915_X", n_cases=3)
    for case_id in ("case00", "case02"):
        moved = sitk.ReadImage(str(image_file(folder, case_id, 1)))
        moved.SetSpacing((1.5, 1.5, 6.0))
        write_image(moved, image_file(folder, case_id, 1))
    report = verify_dataset(Dataset.load(folder), progress=False)
    (finding,) = [p for p in report.problems if p.severity == "finding"]
    assert "T2 is on another grid than T1 in 2 of 3 case(s)" in finding.problem and finding.fix
    assert report.verdict() == "verdict: 0 errors, 0 warnings, 1 finding in 3 case(s): ready to plan"
    assert all(p.fix for p in report.problems)


def test_all_single_slice_images_make_a_2d_dataset(tmp_path: Path):
    folder = tmp_path / "Dataset914_Flat"
    for i in range(2):
        seg = ball_volume(shape=(1, 24, 24))
        write_image(seg, label_file(folder, f"c{i}"))
        write_image(sitk.Cast(seg, sitk.sitkFloat32) * 100, image_file(folder, f"c{i}", 0))
    write_dataset_json(folder, name="Flat", channel_names=["MR"], labels={"background": 0, "blob": 1}, num_training=2)
    meta = json.loads((folder / "dataset.json").read_text())
    del meta["tensorImageSize"]
    (folder / "dataset.json").write_text(json.dumps(meta))
    report = verify_dataset(Dataset.load(folder), progress=False)
    assert report.ok and report.dimensionality == "2d"


def test_writes_are_atomic_on_failure(tmp_path: Path, monkeypatch):
    import os

    target = tmp_path / "out.nii.gz"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_image(ball_volume(), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- work roots and names
def test_roots_resolve_flag_then_cmcseg_then_nnunet_then_default(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"CMCSEG_RAW": "/a/raw", "nnUNet_raw": "/n/raw", "nnUNet_preprocessed": "/n/pre"}
    r = resolve_roots(raw="/flag/raw", environ=env)
    assert r.raw == Path("/flag/raw")
    r = resolve_roots(environ=env)
    assert r.raw == Path("/a/raw") and r.preprocessed == Path("/n/pre")
    assert r.results == tmp_path / "cmcseg_work" / "results"


def test_dataset_spec_by_name_id_or_folder(tmp_path: Path):
    (tmp_path / "Dataset501_MSCMR").mkdir()
    (tmp_path / "Dataset600_Other").mkdir()
    for spec in ("MSCMR", "mscmr", "501", "Dataset501_MSCMR"):
        assert find_dataset_folder(tmp_path, spec) == tmp_path / "Dataset501_MSCMR"
    assert find_dataset_folder(tmp_path, "AMOS") is None
    assert dataset_folder_for_new(tmp_path, "AMOS") == "Dataset503_AMOS"
    assert dataset_folder_for_new(tmp_path, "MyData") == "Dataset601_MyData"


def test_scene_labels_without_background_are_named_for_nnunet_without_changing_values() -> None:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    scene = {"asphalt": 0, "concrete": 1, "sky": 2, "ignore": 3}
    renamed = nnunet_label_dict(scene)
    assert renamed == {"background": 0, "concrete": 1, "sky": 2, "ignore": 3}
    assert LabelManager(renamed, None).num_segmentation_heads == 3 and LabelManager(renamed, None).ignore_label == 3
    cardiac = {"background": 0, "LV": 1}
    assert nnunet_label_dict(cardiac) == cardiac
