"""The raw-layout converters: every format from a tiny release written in its official layout.

Each fixture writes a few small images with known geometry and label values; the tests check
the cases, channels and labels written, that geometry is untouched (no resampling), that
label values are mapped and their originals recorded, that unlabeled and test cases go where
documented, that ``Dataset.load`` accepts the result, and that bad input is refused with
errors naming the file and the case.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import require_shared_data

from cmcseg.dataset import Dataset, image_file, label_file
from cmcseg.errors import CmcsegError, DatasetError
from cmcseg.preprocessing.converters import CONVERTERS, convert
from cmcseg.preprocessing.converters.pipeline import check_encodings_compatible

# ---------------------------------------------------------------------- fixture writers
_OBLIQUE = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 5.0), origin=(0.0, 0.0, 0.0),
            direction=None) -> Path:
    """Write a (z, y, x) array as an image with the given (x, y, z) geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _label_array(shape, values) -> np.ndarray:
    """A label array holding every value of ``values`` in its own band (the first is the background)."""
    array = np.full(shape, values[0], dtype=np.int16)
    flat = array.reshape(-1)
    for i, v in enumerate(values[1:], start=1):
        flat[i * 3: i * 3 + 3] = v
    return array


def _noise(shape, seed: int, dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(dtype)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(path))
    return path


def _header(path: Path) -> dict:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection(), "components": reader.GetNumberOfComponents()}


def _assert_same_geometry(a: Path, b: Path) -> None:
    ha, hb = _header(a), _header(b)
    assert ha["size"] == hb["size"]
    np.testing.assert_allclose(ha["spacing"], hb["spacing"], atol=1e-6)
    np.testing.assert_allclose(ha["origin"], hb["origin"], atol=1e-6)
    np.testing.assert_allclose(ha["direction"], hb["direction"], atol=1e-6)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _meta(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


_LGE_SHAPE, _C0_SHAPE = (3, 12, 10), (4, 8, 8)


def _mscmr_official(root: Path) -> Path:
    """Official tree: 3 patients x 3 sequences on different grids; LGE labels for 1-2, a C0 label for 3."""
    images = root / "C0LET2_nii45_for_challenge19" / "c0t2lge"
    grids = {"C0": (_C0_SHAPE, (1.5, 1.5, 8.0), (10.0, -5.0, 2.0), None),
             "LGE": (_LGE_SHAPE, (0.75, 0.75, 5.0), (-3.0, 4.0, 1.0), _OBLIQUE),
             "T2": (_C0_SHAPE, (1.4, 1.4, 12.0), (0.0, 0.0, 0.0), None)}
    for n in (1, 2, 3):
        for seq, (shape, spacing, origin, direction) in grids.items():
            _volume(images / f"patient{n}_{seq}.nii.gz", _noise(shape, n), spacing, origin, direction)
    _, spacing, origin, direction = grids["LGE"]
    for n in (1, 2):
        _volume(root / "C0LET2_nii45_for_challenge19" / "lgegt" / f"patient{n}_LGE_manual.nii.gz",
                _label_array(_LGE_SHAPE, [0, 200, 500, 600]), spacing, origin, direction)
    shape, spacing, origin, _ = grids["C0"]
    _volume(root / "C0LET2_nii45_for_challenge19" / "c0gt" / "patient3_C0_manual.nii.gz",
            _label_array(shape, [0, 200, 500, 600]), spacing, origin)
    return root


def _mscmr_cyclemix(root: Path) -> Path:
    """CycleMix copy: LGE only as subjectN_DE, labels 1 RV / 2 myo / 3 LV, a scribble-only train case."""
    for split, n in (("val", 1), ("TestSet", 3)):
        _volume(root / split / "images" / f"subject{n}_DE.nii.gz", _noise(_LGE_SHAPE, n), (0.7, 0.7, 5.0),
                (1.0, 2.0, 3.0))
        _volume(root / split / "labels" / f"subject{n}_DE_manual.nii.gz", _label_array(_LGE_SHAPE, [0, 1, 2, 3]),
                (0.7, 0.7, 5.0), (1.0, 2.0, 3.0))
    _volume(root / "train" / "images" / "subject2_DE.nii.gz", _noise(_LGE_SHAPE, 2), (0.7, 0.7, 5.0))
    _volume(root / "train" / "labels" / "subject2_DE_scribble.nii.gz", _label_array(_LGE_SHAPE, [0, 1, 4]),
            (0.7, 0.7, 5.0))
    return root


# ---------------------------------------------------------------------- MS-CMRSeg
def test_registry_of_formats_matches_the_cli() -> None:
    assert sorted(CONVERTERS) == ["amos", "deliver", "mcubes", "mscmr", "myops", "tao"]
    for converter in CONVERTERS.values():
        check_encodings_compatible(converter.label_encodings())


def test_mscmr_official_tree(tmp_path: Path) -> None:
    source = _mscmr_official(tmp_path / "src")
    out = tmp_path / "raw" / "Dataset501_MSCMR"
    report = convert("mscmr", source, out, "MSCMR")

    ds = Dataset.load(out)
    assert ds.modalities == ["bSSFP", "LGE", "T2"] and ds.reference_modality == "LGE"
    assert [c.case_id for c in ds.cases] == ["patient1", "patient2", "patient3"]
    assert [c.case_id for c in ds.labeled_cases] == ["patient1", "patient2"]
    assert [c.case_id for c in ds.unlabeled_cases] == ["patient3"]  # it has a C0 label only
    assert ds.original_label_values == {"background": 0, "myocardium": 200, "LV": 500, "RV": 600}
    assert report.label_encoding == "official" and report.num_labeled == 2 and report.num_unlabeled == 1
    assert any("bSSFP" in note and "not used" in note for note in report.notes)

    src = source / "C0LET2_nii45_for_challenge19"
    for ch, seq in enumerate(("C0", "LGE", "T2")):  # each sequence keeps its own grid, bytes untouched
        written = image_file(out, "patient1", ch)
        assert written.read_bytes() == (src / "c0t2lge" / f"patient1_{seq}.nii.gz").read_bytes()
    src_label = src / "lgegt" / "patient1_LGE_manual.nii.gz"
    _assert_same_geometry(label_file(out, "patient1"), src_label)
    mapped, original = _array(label_file(out, "patient1")), _array(src_label)
    for name, value in ds.labels.items():
        np.testing.assert_array_equal(mapped == value, original == ds.original_label_values[name])


def test_mscmr_cyclemix_copy_detects_encoding_and_writes_lge_only(tmp_path: Path) -> None:
    source = _mscmr_cyclemix(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("mscmr", source, out, "LGEONLY")

    ds = Dataset.load(out)
    assert ds.channel_names == {0: "LGE"} and report.absent_modalities == ("bSSFP", "T2")
    assert ds.original_label_values == {"background": 0, "myocardium": 2, "LV": 3, "RV": 1}
    assert [c.case_id for c in ds.unlabeled_cases] == ["subject2"]  # scribbles are not labels
    assert _meta(out)["official_split"] == {"subject1": "val", "subject2": "train", "subject3": "TestSet"}
    mapped = _array(label_file(out, "subject1"))
    original = _array(source / "val" / "labels" / "subject1_DE_manual.nii.gz")
    np.testing.assert_array_equal(mapped[original == 1], ds.labels["RV"])
    np.testing.assert_array_equal(mapped[original == 2], ds.labels["myocardium"])
    assert "LGE" in report.summary() and "bSSFP, T2" in report.summary()


def test_mscmr_explicit_encoding_rejects_values_of_the_other(tmp_path: Path) -> None:
    source = _mscmr_cyclemix(tmp_path / "src")
    with pytest.raises(DatasetError) as err:
        convert("mscmr", source, tmp_path / "out", "X", label_encoding="official")
    assert "subject1_DE_manual.nii.gz" in str(err.value) and "[1, 2, 3]" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_mscmr_files_in_different_encodings_are_refused(tmp_path: Path) -> None:
    source = _mscmr_cyclemix(tmp_path / "src")
    _volume(source / "TestSet" / "labels" / "subject3_DE_manual.nii.gz", _label_array(_LGE_SHAPE, [0, 200, 500]),
            (0.7, 0.7, 5.0), (1.0, 2.0, 3.0))
    with pytest.raises(DatasetError, match="different encodings"):
        convert("mscmr", source, tmp_path / "out", "X")


# ---------------------------------------------------------------------- MyoPS
def test_myops_release(tmp_path: Path) -> None:
    source = tmp_path / "MyoPS"
    for case in ("myops_training_101", "myops_training_102", "myops_test_201"):
        folder = "test20" if "test" in case else "train25"
        for i, seq in enumerate(("C0", "DE", "T2")):
            _volume(source / folder / f"{case}_{seq}.nii.gz", _noise(_LGE_SHAPE, i), (1.0, 1.0, 10.0), (5.0, 5.0, 5.0))
    gd = _volume(source / "train25_myops_gd" / "myops_training_101_gd.nii.gz",
                 _label_array(_LGE_SHAPE, [0, 200, 500, 600, 1220, 2221]), (1.0, 1.0, 10.0), (5.0, 5.0, 5.0))
    _volume(source / "MyoPS2020_EvaluateByYourself" / "test_data_gd" / "myops_test_201_gdencrypt.nii.gz",
            _label_array(_LGE_SHAPE, [0, 77]), (1.0, 1.0, 10.0))

    report = convert("myops", source, tmp_path / "out", "MYOPS")
    ds = Dataset.load(tmp_path / "out")
    assert ds.modalities == ["bSSFP", "LGE", "T2"]
    assert [c.case_id for c in ds.labeled_cases] == ["myops_training_101"]
    assert [c.case_id for c in ds.unlabeled_cases] == ["myops_training_102"]
    assert [c.case_id for c in ds.test_cases] == ["myops_test_201"] and not ds.test_cases[0].labeled
    assert ds.original_label_values["edema"] == 1220 and ds.original_label_values["scar"] == 2221
    assert sorted(np.unique(_array(label_file(tmp_path / "out", "myops_training_101"))).tolist()) == [0, 1, 2, 3, 4, 5]
    _assert_same_geometry(label_file(tmp_path / "out", "myops_training_101"), gd)
    assert any("gdencrypt" in n for n in report.notes)


def _myops_folder_case(root: Path, case: str, label: bool = True, sequences=("C0", "LGE", "T2")) -> None:
    """A case in per-case folder layout: ``CaseNNNN/CaseNNNN_{C0,LGE,T2}[_gd].nii.gz``, one grid."""
    for i, seq in enumerate(sequences):
        _volume(root / case / f"{case}_{seq}.nii.gz", _noise(_LGE_SHAPE, i), (0.75, 0.75, 12.0), (1.0, 2.0, 3.0))
    if label:
        _volume(root / case / f"{case}_gd.nii.gz", _label_array(_LGE_SHAPE, [0, 200, 500, 600, 1220, 2221]),
                (0.75, 0.75, 12.0), (1.0, 2.0, 3.0))


def test_myops_case_folders(tmp_path: Path) -> None:
    source = tmp_path / "myops_dev"
    _myops_folder_case(source / "labeled", "Case3026")
    _myops_folder_case(source / "unlabeled", "Case4001", label=False)
    out = tmp_path / "out"
    report = convert("myops", source, out, "MYOPSDEV")

    ds = Dataset.load(out)
    assert ds.modalities == ["bSSFP", "LGE", "T2"] and ds.reference_modality == "LGE"
    assert [c.case_id for c in ds.labeled_cases] == ["Case3026"]
    assert [c.case_id for c in ds.unlabeled_cases] == ["Case4001"] and not ds.test_cases
    assert report.num_training == 2 and report.num_labeled == 1
    assert ds.original_label_values == {"background": 0, "myocardium": 200, "LV": 500, "RV": 600,
                                        "edema": 1220, "scar": 2221}
    assert ds.labels == {"background": 0, "myocardium": 1, "LV": 2, "RV": 3, "edema": 4, "scar": 5}
    assert _meta(out)["official_split"] == {"Case3026": "labeled", "Case4001": "unlabeled"}
    for ch, seq in enumerate(("C0", "LGE", "T2")):  # LGE (not DE) is the LGE channel; bytes untouched
        written = image_file(out, "Case3026", ch)
        assert written.read_bytes() == (source / "labeled" / "Case3026" / f"Case3026_{seq}.nii.gz").read_bytes()
    src_label = source / "labeled" / "Case3026" / "Case3026_gd.nii.gz"
    _assert_same_geometry(label_file(out, "Case3026"), src_label)
    mapped, original = _array(label_file(out, "Case3026")), _array(src_label)
    for name, value in ds.labels.items():
        np.testing.assert_array_equal(mapped == value, original == ds.original_label_values[name])


def test_myops_case_folder_missing_a_sequence_is_named(tmp_path: Path) -> None:
    source = tmp_path / "myops_dev"
    _myops_folder_case(source / "labeled", "Case3026")
    _myops_folder_case(source / "unlabeled", "Case4001", label=False, sequences=("C0", "T2"))
    with pytest.raises(DatasetError) as err:
        convert("myops", source, tmp_path / "out", "MYOPSDEV")
    assert [(p.case, p.file) for p in err.value.problems] == [
        ("Case4001", str(source / "unlabeled" / "Case4001" / "Case4001_LGE.nii.gz"))]
    assert "LGE image is missing" in str(err.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- AMOS
def test_amos_is_unpaired_by_id(tmp_path: Path) -> None:
    source = tmp_path / "amos22"
    ct_grid, mr_grid = ((1.0, 1.0, 2.0), (0.0, 0.0, 0.0)), ((1.5, 1.5, 6.0), (-20.0, 3.0, 7.0))
    for folder, name, grid in (("imagesTr", "amos_0001", ct_grid), ("imagesTr", "amos_0507", mr_grid),
                               ("imagesTr", "amos_0010", ct_grid), ("imagesVa", "amos_0008", ct_grid),
                               ("imagesTs", "amos_0500", ct_grid), ("imagesTs", "amos_0520", mr_grid)):
        _volume(source / folder / f"{name}.nii.gz", _noise((4, 6, 6), 1), *grid)
    for folder, name, grid in (("labelsTr", "amos_0001", ct_grid), ("labelsTr", "amos_0507", mr_grid),
                               ("labelsVa", "amos_0008", ct_grid)):
        _volume(source / folder / f"{name}.nii.gz", _label_array((4, 6, 6), [0, 1, 6, 15]).astype(np.uint8), *grid)

    out = tmp_path / "out"
    convert("amos", source, out, "AMOS")
    ds = Dataset.load(out)
    assert ds.unpaired and ds.channel_names == {0: "CT", 1: "MRI"}
    assert {c.case_id: c.channels for c in ds.cases} == {
        "amos_0001": [0], "amos_0008": [0], "amos_0010": [0], "amos_0507": [1]}
    assert [c.case_id for c in ds.unlabeled_cases] == ["amos_0010"]
    assert {c.case_id: c.channels for c in ds.test_cases} == {"amos_0500": [0], "amos_0520": [1]}
    assert image_file(out, "amos_0507", 1).read_bytes() == (source / "imagesTr" / "amos_0507.nii.gz").read_bytes()
    np.testing.assert_array_equal(_array(label_file(out, "amos_0001")),
                                  _array(source / "labelsTr" / "amos_0001.nii.gz"))  # already consecutive

    convert("amos", source, out, "AMOS", overwrite=True, mri_first_id=500)
    assert {c.case_id: c.channels for c in Dataset.load(out).test_cases}["amos_0500"] == [1]


# ---------------------------------------------------------------------- TAO
def _tao_case(root: Path, case: str, label: bool = True, t1c: bool = True) -> None:
    _volume(root / case / "T1.nii.gz", _noise((5, 8, 8), 1), (0.5, 0.5, 2.0), (1.0, 1.0, 1.0))
    if t1c:
        _volume(root / case / "t1c.nii.gz", _noise((6, 10, 10), 2, np.float32), (0.4, 0.4, 1.5), (2.0, 0.0, 1.0))
    if label:
        _volume(root / case / "label.nii.gz", _label_array((5, 8, 8), [0, 1, 2, 3, 4]).astype(np.uint8),
                (0.5, 0.5, 2.0), (1.0, 1.0, 1.0))


def test_tao_layout(tmp_path: Path) -> None:
    source = tmp_path / "tao"
    _tao_case(source, "orbit01")
    _tao_case(source, "orbit02", label=False)
    (source / "notes").mkdir()
    report = convert("tao", source, tmp_path / "out", "TAO")
    ds = Dataset.load(tmp_path / "out")
    assert ds.modalities == ["T1", "T1c"] and ds.reference_modality == "T1"
    assert ([c.case_id for c in ds.labeled_cases] == ["orbit01"]
            and [c.case_id for c in ds.unlabeled_cases] == ["orbit02"])
    _assert_same_geometry(image_file(tmp_path / "out", "orbit01", 1), source / "orbit01" / "t1c.nii.gz")
    assert any("notes" in n for n in report.notes)


def test_paired_case_missing_a_modality_is_named(tmp_path: Path) -> None:
    source = tmp_path / "tao"
    _tao_case(source, "orbit01")
    _tao_case(source, "orbit02", t1c=False)
    _tao_case(source, "orbit03", t1c=False)
    with pytest.raises(DatasetError) as err:
        convert("tao", source, tmp_path / "out", "TAO")
    assert len(err.value.problems) == 2  # collected across cases
    assert {p.case for p in err.value.problems} == {"orbit02", "orbit03"}
    assert str(source / "orbit02" / "T1c.nii.gz") in str(err.value) and "T1c image is missing" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_label_off_its_image_grid_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "tao"
    _tao_case(source, "orbit01")
    _volume(source / "orbit01" / "label.nii.gz", np.zeros((5, 8, 9), np.uint8), (0.5, 0.5, 2.0))
    with pytest.raises(DatasetError, match=r"label size \[9, 8, 5\] differs from the T1 image size \[8, 8, 5\]"):
        convert("tao", source, tmp_path / "out", "TAO")


# ---------------------------------------------------------------------- DELIVER
def _deliver_sample(root: Path, condition: str, split: str, frame: str, semantic_red: list[int]) -> None:
    rel = Path(condition) / split / "MAP_1_point7"
    rgba = np.random.default_rng(0).integers(0, 255, (6, 8, 4)).astype(np.uint8)
    _png(root / "img" / rel / f"{frame}_rgb_front.png", rgba)
    _png(root / "depth" / rel / f"{frame}_depth_front.png", np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)
    _png(root / "event" / rel / f"{frame}_event_front.png", np.zeros((3, 4, 3), np.uint8))  # low resolution
    _png(root / "lidar" / rel / f"{frame}_lidar_front.png", np.ones((6, 8), np.uint8))
    red = np.zeros((6, 8), np.uint8)
    red.reshape(-1)[: len(semantic_red)] = semantic_red
    semantic = np.stack([red, np.full_like(red, 9), np.zeros_like(red)], axis=-1)
    _png(root / "semantic" / rel / f"{frame}_semantic_front.png", semantic)


def test_deliver_release(tmp_path: Path) -> None:
    source = tmp_path / "DELIVER"
    _deliver_sample(source, "cloud", "train", "000001", [1, 7, 25, 255])
    _deliver_sample(source, "fog", "val", "000002", [13, 13])
    _deliver_sample(source, "night", "test", "000003", [24])
    out = tmp_path / "out"
    convert("deliver", source, out, "DELIVER")

    ds = Dataset.load(out)
    assert ds.file_ending == ".png" and ds.dimensionality == "2d"
    assert ds.modalities == ["RGB", "depth", "event", "lidar"]
    cid = "cloud_MAP_1_point7_000001_front"
    assert [c.case_id for c in ds.labeled_cases] == [cid, "fog_MAP_1_point7_000002_front"]
    assert [c.case_id for c in ds.test_cases] == ["night_MAP_1_point7_000003_front"] and ds.test_cases[0].labeled
    meta = _meta(out)
    assert meta["conditions"] == {cid: "cloud", "fog_MAP_1_point7_000002_front": "fog",
                                  "night_MAP_1_point7_000003_front": "night"}
    assert ds.labels["ignore"] == 25 and ds.original_label_values["Building"] == 1

    rgb = sitk.ReadImage(str(image_file(out, cid, 0, ".png")))
    assert rgb.GetNumberOfComponentsPerPixel() == 3  # alpha dropped
    src_rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "img/cloud/train/MAP_1_point7/000001_rgb_front.png")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(rgb), src_rgb[..., :3])
    depth = image_file(out, cid, 1, ".png")
    assert depth.read_bytes() == (source / "depth/cloud/train/MAP_1_point7/000001_depth_front.png").read_bytes()
    assert _header(image_file(out, cid, 2, ".png"))["size"] == (4, 3)  # event keeps its own size

    label = _array(label_file(out, cid, ".png")).reshape(-1)
    assert label[:4].tolist() == [ds.labels["Building"], ds.labels["Road"], ds.labels["Truck"], ds.labels["ignore"]]
    assert label[4] == ds.labels["ignore"]  # red 0 = unlabelled


def test_deliver_unknown_label_value_names_file_and_values(tmp_path: Path) -> None:
    source = tmp_path / "DELIVER"
    _deliver_sample(source, "rain", "train", "000001", [26])
    _deliver_sample(source, "sun", "train", "000002", [30, 1])
    with pytest.raises(DatasetError) as err:
        convert("deliver", source, tmp_path / "out", "D")
    text = str(err.value)
    assert "000001_semantic_front.png" in text and "000002_semantic_front.png" in text
    assert "unknown label values [26]" in text and "unknown label values [30]" in text
    assert {p.case for p in err.value.problems} == {"rain_MAP_1_point7_000001_front", "sun_MAP_1_point7_000002_front"}


# ---------------------------------------------------------------------- MCubeS
def _mcubes(root: Path) -> Path:
    rng = np.random.default_rng(3)
    splits = {"train": ["outscene1208_2_0000000150"], "val": ["outscene1208_2_0000000180"],
              "test": ["outscene1208_2_0000000210"]}
    for split, names in splits.items():
        for name in names:
            _png(root / "polL_color" / f"{name}.png", rng.integers(0, 65535, (6, 7, 3)).astype(np.uint16))
            for folder in ("polL_aolp_sin", "polL_aolp_cos", "polL_dolp"):
                (root / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / folder / f"{name}.npy", rng.random((6, 7)).astype(np.float32))
            _png(root / "NIR_warped" / f"{name}.png", rng.integers(0, 255, (6, 7)).astype(np.uint8))
            gt = np.full((6, 7), 255, np.uint8)
            gt.reshape(-1)[:3] = [0, 5, 19]
            _png(root / "GT" / f"{name}.png", gt)
        (root / "list_folder").mkdir(exist_ok=True)
        (root / "list_folder" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_mcubes_release(tmp_path: Path) -> None:
    source = _mcubes(tmp_path / "multimodal_dataset")
    out = tmp_path / "out"
    convert("mcubes", source, out, "MCUBES")
    ds = Dataset.load(out)
    assert ds.file_ending == ".nii.gz" and ds.dimensionality == "2d"
    assert ds.modalities == ["RGB", "AoLP", "DoLP", "NIR"]
    assert len(ds.labeled_cases) == 2 and [c.case_id for c in ds.test_cases] == ["outscene1208_2_0000000210"]
    name = "outscene1208_2_0000000150"
    aolp = sitk.ReadImage(str(image_file(out, name, 1)))
    assert aolp.GetDimension() == 2 and aolp.GetNumberOfComponentsPerPixel() == 2
    stacked = np.stack([np.load(source / "polL_aolp_sin" / f"{name}.npy"),
                        np.load(source / "polL_aolp_cos" / f"{name}.npy")], axis=-1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(aolp), stacked)
    rgb = sitk.ReadImage(str(image_file(out, name, 0)))
    assert rgb.GetNumberOfComponentsPerPixel() == 3 and rgb.GetPixelID() == sitk.sitkVectorUInt16
    _assert_same_geometry(image_file(out, name, 0), source / "polL_color" / f"{name}.png")
    _assert_same_geometry(image_file(out, name, 2), source / "polL_color" / f"{name}.png")
    label = _array(label_file(out, name)).reshape(-1)
    assert label[:4].tolist() == [ds.labels["asphalt"], ds.labels["glass"], ds.labels["sky"], ds.labels["ignore"]]
    assert ds.original_label_values["ignore"] == 255 and ds.labels["ignore"] == 20


# ---------------------------------------------------------------------- bad input, folders
def test_missing_source_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(CmcsegError, match="does not exist"):
        convert("mscmr", tmp_path / "nope", tmp_path / "out", "X")
    with pytest.raises(CmcsegError, match="unknown source format"):
        convert("brats", tmp_path, tmp_path / "out", "X")
    with pytest.raises(CmcsegError, match="no option"):
        convert("tao", tmp_path, tmp_path / "out", "X", label_encoding="official")


def test_no_cases_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no 'mscmr' cases found"):
        convert("mscmr", tmp_path / "empty", tmp_path / "out", "X")


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path: Path) -> None:
    source = _mscmr_cyclemix(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale_0000.nii.gz").write_text("old")
    with pytest.raises(CmcsegError, match="not empty"):
        convert("mscmr", source, out, "X")
    assert (out / "stale_0000.nii.gz").exists()
    convert("mscmr", source, out, "X", overwrite=True)
    assert not (out / "stale_0000.nii.gz").exists()
    Dataset.load(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_output_inside_source_is_refused(tmp_path: Path) -> None:
    source = _mscmr_cyclemix(tmp_path / "src")
    with pytest.raises(CmcsegError, match="overlaps the source"):
        convert("mscmr", source, source / "raw", "X")


def test_unreadable_file_names_file_and_case_and_inputs_stay_untouched(tmp_path: Path) -> None:
    source = _mscmr_cyclemix(tmp_path / "src")
    broken = source / "TestSet" / "labels" / "subject3_DE_manual.nii.gz"
    broken.write_bytes(b"not a nifti")
    before = _digest(source)
    with pytest.raises(DatasetError) as err:
        convert("mscmr", source, tmp_path / "out", "X")
    assert [(p.case, p.file) for p in err.value.problems] == [("subject3", str(broken))]
    assert _digest(source) == before
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_mscmr_lge_copy(tmp_path: Path) -> None:
    source = require_shared_data("mscmr_lge")
    out = tmp_path / "Dataset501_MSCMR"
    report = convert("mscmr", source, out, "MSCMR")
    ds = Dataset.load(out)
    assert len(ds.cases) == 10 and len(ds.labeled_cases) == 10 and not ds.test_cases
    assert ds.channel_names == {0: "LGE"} and report.label_encoding == "cyclemix"
    assert ds.labels == {"background": 0, "myocardium": 1, "LV": 2, "RV": 3}
    assert ds.original_label_values == {"background": 0, "myocardium": 2, "LV": 3, "RV": 1}
    for case in ds.cases:
        split = _meta(out)["official_split"][case.case_id]
        src_image = source / split / "images" / f"{case.case_id}_DE.nii.gz"
        src_label = source / split / "labels" / f"{case.case_id}_DE_manual.nii.gz"
        _assert_same_geometry(case.images[0], src_image)
        _assert_same_geometry(case.label, src_label)
        assert sorted(np.unique(_array(case.label)).tolist()) == [0, 1, 2, 3]
    first = ds.cases[0]
    split = _meta(out)["official_split"][first.case_id]
    original = _array(source / split / "labels" / f"{first.case_id}_DE_manual.nii.gz")
    np.testing.assert_array_equal(_array(first.label) == ds.labels["RV"], original == 1)


@pytest.mark.realdata
def test_real_myops_dev_case_folders(tmp_path: Path) -> None:
    source = require_shared_data("myops_dev")
    out = tmp_path / "Dataset502_MYOPSDEV"
    report = convert("myops", source, out, "MYOPSDEV")
    ds = Dataset.load(out)
    assert len(ds.cases) == 45 and len(ds.labeled_cases) == 20 and not ds.test_cases
    assert report.num_training == 45 and report.num_labeled == 20
    assert [c.case_id for c in ds.labeled_cases] == [f"Case{n}" for n in range(3026, 3046)]
    assert [c.case_id for c in ds.unlabeled_cases] == [f"Case{n}" for n in range(4001, 4026)]
    assert ds.modalities == ["bSSFP", "LGE", "T2"] and ds.reference_modality == "LGE"
    assert ds.original_label_values == {"background": 0, "myocardium": 200, "LV": 500, "RV": 600,
                                        "edema": 1220, "scar": 2221}
    for case in ds.labeled_cases:
        src_label = source / "labeled" / case.case_id / f"{case.case_id}_gd.nii.gz"
        _assert_same_geometry(case.label, src_label)
        _assert_same_geometry(case.images[1], source / "labeled" / case.case_id / f"{case.case_id}_LGE.nii.gz")
        assert set(np.unique(_array(case.label)).tolist()) <= set(ds.labels.values())
    first = ds.labeled_cases[0]
    original = _array(source / "labeled" / first.case_id / f"{first.case_id}_gd.nii.gz")
    np.testing.assert_array_equal(_array(first.label) == ds.labels["scar"], original == 2221)
