"""Phantom datasets: determinism, raw-layout validity, and the properties the phantoms exist for.

The MSCMR tests measure what a preprocessing bug would break: the sequences sit on different
grids whose headers are truthful (resampling by header aligns the anatomy; ignoring the headers
does not), and a requested rigid motion shows up as exactly that displacement of the anatomy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import zoom

from cmcseg.dataset import Dataset
from cmcseg.errors import CmcsegError
from cmcseg.phantoms import PHANTOMS, SIZES, RigidMotion, read_truth, synthesize, truth_label_file
from cmcseg.registry import KNOWN_DATASETS

KINDS = sorted(PHANTOMS)
LV = KNOWN_DATASETS["MSCMR"].labels["LV"]
BSSFP, LGE, T2 = 0, 1, 2
MOTION_MM = (9.0, -6.0, 8.0)


# ---------------------------------------------------------------------- helpers
def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def physical_centroid(image: sitk.Image, label: int) -> np.ndarray:
    """World position of the mean voxel index of ``label``, through the image header."""
    index = np.argwhere(sitk.GetArrayFromImage(image) == label)[:, ::-1].mean(axis=0)  # (x, y, z)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index]))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


def truth_image(folder: Path, case_id: str, channel: int, ending: str = ".nii.gz") -> sitk.Image:
    return sitk.ReadImage(str(truth_label_file(folder, case_id, channel, ending)))


def geometry(image: sitk.Image) -> tuple:
    return (image.GetSize(), np.round(image.GetSpacing(), 4).tolist(), np.round(image.GetOrigin(), 3).tolist(),
            np.round(image.GetDirection(), 5).tolist())


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Every phantom at the tiny size, seed 0."""
    root = tmp_path_factory.mktemp("phantoms")
    return {kind: synthesize(kind, root / kind, size="tiny", seed=0) for kind in KINDS}


@pytest.fixture(scope="module")
def mscmr_moved(tmp_path_factory) -> Path:
    """The tiny MSCMR phantom with the bSSFP anatomy translated by MOTION_MM (headers unchanged)."""
    root = tmp_path_factory.mktemp("moved")
    return synthesize("MSCMR", root / "MSCMR", size="tiny", seed=0, motion={"bSSFP": RigidMotion(MOTION_MM)})


# ---------------------------------------------------------------------- all phantoms
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_writes_identical_bytes(kind: str, tmp_path: Path) -> None:
    first = all_files(synthesize(kind, tmp_path / "a", cases=2, size="tiny", seed=7))
    second = all_files(synthesize(kind, tmp_path / "b", cases=2, size="tiny", seed=7))
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


@pytest.mark.parametrize("kind", KINDS)
def test_different_seed_gives_different_data(kind: str, tmp_path: Path) -> None:
    a = synthesize(kind, tmp_path / "a", cases=1, size="tiny", seed=0)
    b = synthesize(kind, tmp_path / "b", cases=1, size="tiny", seed=1)
    image_a, image_b = sorted((a / "imagesTr").iterdir())[0], sorted((b / "imagesTr").iterdir())[0]
    assert image_a.name == image_b.name
    array_a, array_b = read_array(image_a), read_array(image_b)
    assert array_a.shape != array_b.shape or not np.array_equal(array_a, array_b)
    case_a, = read_truth(a)["cases"].values()
    case_b, = read_truth(b)["cases"].values()
    assert case_a != case_b


@pytest.mark.parametrize("kind", KINDS)
def test_every_phantom_is_a_valid_raw_dataset(kind: str, tiny: dict[str, Path]) -> None:
    folder = tiny[kind]
    ds = Dataset.load(folder)
    meta = json.loads((folder / "dataset.json").read_text())
    assert ds.warnings == []
    assert meta["numTraining"] == len(ds.cases) >= 4
    assert ds.labeled_cases and ds.unlabeled_cases
    assert ds.reference_modality == KNOWN_DATASETS[kind].reference
    assert sorted(ds.labels.values()) == list(range(len(ds.labels)))
    assert meta["phantom"]["kind"] == kind
    truth = read_truth(folder)
    assert sorted(truth["cases"]) == sorted(c.case_id for c in ds.cases)
    for case in ds.cases:
        assert truth["cases"][case.case_id]["labeled"] == case.labeled
        for channel in case.channels:  # the exact label exists on every channel's own grid
            assert truth_label_file(folder, case.case_id, channel, ds.file_ending).is_file()
        if case.labeled:  # the training label is the truth on the reference channel's grid
            reference = ds.channel_index(ds.reference_modality) if not ds.unpaired else case.channels[0]
            truth_ref = truth_image(folder, case.case_id, reference, ds.file_ending)
            label = sitk.ReadImage(str(case.label))
            assert geometry(label) == geometry(truth_ref)
            assert np.array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(truth_ref))
    assert not list(folder.rglob(".tmp-*")), "atomic writes left temporary files"


def test_rerun_removes_files_of_an_earlier_larger_run(tmp_path: Path) -> None:
    folder = tmp_path / "TAO"
    synthesize("TAO", folder, cases=4, size="tiny")
    synthesize("TAO", folder, cases=2, size="tiny")
    ds = Dataset.load(folder)
    assert [c.case_id for c in ds.cases] == ["orbit001", "orbit002"]
    assert len(list((folder / "phantom_truth").glob("*.nii.gz"))) == 4  # 2 cases x 2 channels
    assert ds.unlabeled_cases  # with 2 cases the second loses its label ...
    assert not (folder / "labelsTr" / "orbit002.nii.gz").exists()  # ... and its old label file is gone


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(CmcsegError, match="refusing"):
        synthesize("TAO", folder, size="tiny")
    assert (folder / "notes.txt").read_text() == "precious"


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    assert SIZES == ("tiny", "small", "default")
    with pytest.raises(ValueError, match="unknown phantom"):
        synthesize("BRATS", tmp_path / "x", size="tiny")
    with pytest.raises(ValueError, match="size"):
        synthesize("MSCMR", tmp_path / "x", size="huge")
    with pytest.raises(ValueError, match="reference"):
        synthesize("MSCMR", tmp_path / "x", size="tiny", motion={"LGE": (1, 0, 0)})
    with pytest.raises(ValueError, match="unknown sequence"):
        synthesize("MSCMR", tmp_path / "x", size="tiny", motion={"FLAIR": (1, 0, 0)})
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- MSCMR
def test_mscmr_sequences_have_their_own_anisotropic_grids(tiny: dict[str, Path]) -> None:
    folder = tiny["MSCMR"]
    ds = Dataset.load(folder)
    assert ds.modalities == ["bSSFP", "LGE", "T2"]
    assert ds.original_label_values == {"background": 0, "myocardium": 200, "LV": 500, "RV": 600}
    rotated = 0
    for case in ds.cases:
        images = {ch: sitk.ReadImage(str(path)) for ch, path in case.images.items()}
        for a, b in ((BSSFP, LGE), (BSSFP, T2), (LGE, T2)):
            assert images[a].GetSize() != images[b].GetSize()
            assert images[a].GetSpacing() != images[b].GetSpacing()
            assert np.linalg.norm(np.subtract(images[a].GetOrigin(), images[b].GetOrigin())) > 1.0
        for image in images.values():
            spacing = image.GetSpacing()
            assert spacing[2] >= 2.5 * max(spacing[:2])  # thick slices
        assert images[LGE].GetSpacing()[2] < images[BSSFP].GetSpacing()[2] < 16
        assert images[T2].GetSpacing()[2] >= 15
        rotated += any(not np.allclose(im.GetDirection(), np.eye(3).ravel()) for im in images.values())
        if case.labeled:  # labels live on the LGE grid only
            label = sitk.ReadImage(str(case.label))
            assert geometry(label) == geometry(images[LGE])
            assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2, 3}
    assert rotated >= 1


def test_mscmr_sequence_contrasts(tiny: dict[str, Path]) -> None:
    """bSSFP: bright blood; LGE: dark myocardium; T2: myocardium brighter than blood (per sequence)."""
    folder = tiny["MSCMR"]
    case_id = "patient001"
    means = {}
    for channel in (BSSFP, LGE, T2):
        image = read_array(folder / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz")
        truth = sitk.GetArrayFromImage(truth_image(folder, case_id, channel))
        means[channel] = {label: image[truth == label].mean() for label in (1, 2)}  # myocardium, LV
    assert means[BSSFP][2] > 2 * means[BSSFP][1]
    assert means[LGE][2] > 2 * means[LGE][1]
    assert means[T2][1] > 1.2 * means[T2][2]


def test_mscmr_headers_tell_the_truth(tiny: dict[str, Path]) -> None:
    """Without motion, the LV centre measured through each sequence's header agrees within a voxel."""
    folder = tiny["MSCMR"]
    truth = read_truth(folder)
    for case_id, case in truth["cases"].items():
        reference = physical_centroid(truth_image(folder, case_id, LGE), LV)
        assert np.allclose(reference, case["anatomy"]["lv_centroid_mm"], atol=3.0)
        for channel in (BSSFP, T2):
            image = truth_image(folder, case_id, channel)
            offset = physical_centroid(image, LV) - reference
            spacing = image.GetSpacing()
            assert np.all(np.abs(offset[:2]) <= max(spacing[:2])), (case_id, channel, offset)
            assert abs(offset[2]) <= spacing[2] / 2, (case_id, channel, offset)


def test_mscmr_motion_displaces_the_anatomy_but_not_the_header(tiny: dict[str, Path], mscmr_moved: Path) -> None:
    still = tiny["MSCMR"]
    truth = read_truth(mscmr_moved)
    for case_id, case in truth["cases"].items():
        assert case["modalities"]["bSSFP"]["motion"]["translation_mm"] == list(MOTION_MM)
        assert case["modalities"]["T2"]["motion"] is None
        moved_image = truth_image(mscmr_moved, case_id, BSSFP)
        assert geometry(moved_image) == geometry(truth_image(still, case_id, BSSFP))
        reference = physical_centroid(truth_image(mscmr_moved, case_id, LGE), LV)
        offset = physical_centroid(moved_image, LV) - reference
        spacing = moved_image.GetSpacing()
        error = offset - np.asarray(MOTION_MM)
        assert np.all(np.abs(error[:2]) <= max(spacing[:2])), (case_id, offset)
        assert abs(error[2]) <= spacing[2] / 2, (case_id, offset)
        t2_offset = physical_centroid(truth_image(mscmr_moved, case_id, T2), LV) - reference
        assert np.linalg.norm(t2_offset) < np.linalg.norm(MOTION_MM) / 2
    # the reference sequence and the unmoved T2 are untouched, byte for byte
    for name in ("imagesTr/patient001_0001.nii.gz", "imagesTr/patient001_0002.nii.gz", "labelsTr/patient001.nii.gz"):
        assert (mscmr_moved / name).read_bytes() == (still / name).read_bytes()
    assert (mscmr_moved / "imagesTr/patient001_0000.nii.gz").read_bytes() != \
        (still / "imagesTr/patient001_0000.nii.gz").read_bytes()


def test_mscmr_rotation_about_the_heart_moves_the_lv_where_truth_json_says(tmp_path: Path) -> None:
    motion = {"T2": RigidMotion((0.0, 4.0, -3.0), (0.0, 0.0, 20.0)), "bSSFP": {"rotation_deg": (12.0, 0.0, 0.0)}}
    folder = synthesize("MSCMR", tmp_path / "MSCMR", cases=2, size="tiny", seed=3, motion=motion)
    for case_id, case in read_truth(folder)["cases"].items():
        for sequence, entry in case["modalities"].items():
            image = truth_image(folder, case_id, entry["channel"])
            error = physical_centroid(image, LV) - np.asarray(entry["lv_centroid_mm"])
            spacing = image.GetSpacing()
            assert np.all(np.abs(error[:2]) <= max(spacing[:2])) and abs(error[2]) <= spacing[2] / 2, \
                (case_id, sequence, error)
        assert case["modalities"]["T2"]["motion"]["center_mm"] == case["anatomy"]["heart_center_mm"]


def test_mscmr_resampling_by_header_aligns_and_ignoring_headers_does_not(tiny: dict[str, Path]) -> None:
    folder = tiny["MSCMR"]
    ds = Dataset.load(folder)
    by_header, naive = [], []
    for case in ds.labeled_cases:
        label = sitk.ReadImage(str(case.label))
        lv = sitk.GetArrayFromImage(label) == LV
        bssfp = truth_image(folder, case.case_id, BSSFP)
        resampled = sitk.Resample(bssfp, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        by_header.append(dice(sitk.GetArrayFromImage(resampled) == LV, lv))
        raw = sitk.GetArrayFromImage(bssfp)  # resized index-to-index, as if every grid were the same
        resized = zoom(raw, np.divide(lv.shape, raw.shape), order=0, grid_mode=True, mode="nearest")
        naive.append(dice(resized == LV, lv))
    assert np.mean(by_header) >= 0.8 and min(by_header) >= 0.7, by_header
    assert np.mean(naive) <= np.mean(by_header) - 0.15, (naive, by_header)


# ---------------------------------------------------------------------- AMOS
def test_amos_is_unpaired_ct_and_mri(tiny: dict[str, Path]) -> None:
    folder = tiny["AMOS"]
    ds = Dataset.load(folder)
    assert ds.unpaired and ds.modalities == ["CT", "MRI"]
    assert all(KNOWN_DATASETS["AMOS"].labels[name] == value for name, value in ds.original_label_values.items()
               if name != "background")
    ct = [c for c in ds.cases if int(c.case_id.split("_")[1]) < 500]
    mri = [c for c in ds.cases if int(c.case_id.split("_")[1]) >= 500]
    assert ct and mri and len(ct) + len(mri) == len(ds.cases)
    assert all(c.channels == [0] for c in ct) and all(c.channels == [1] for c in mri)
    assert any(not c.labeled for c in ct) and any(c.labeled for c in mri)
    liver, aorta = ds.labels["liver"], ds.labels["aorta"]
    for case in ct:
        hu = read_array(case.images[0])
        truth = sitk.GetArrayFromImage(truth_image(folder, case.case_id, 0))
        assert hu.min() <= -900 and hu.max() < 3072
        assert 40 < np.median(hu[truth == liver]) < 150
        assert np.median(hu[truth == aorta]) > np.median(hu[truth == liver]) + 50
        assert abs(np.median(hu[truth == 0][hu[truth == 0] > -500]) - 0) < 120  # fat and soft tissue
    for case in mri:
        assert read_array(case.images[1]).min() >= 0
    anatomies = [json.dumps(c["anatomy"], sort_keys=True) for c in read_truth(folder)["cases"].values()]
    assert len(set(anatomies)) == len(anatomies)  # every case is its own patient


# ---------------------------------------------------------------------- TAO
def test_tao_t1_and_t1c_share_one_grid(tiny: dict[str, Path]) -> None:
    folder = tiny["TAO"]
    ds = Dataset.load(folder)
    assert ds.modalities == ["T1", "T1c"] and ds.labels == KNOWN_DATASETS["TAO"].labels
    present = set()
    for case in ds.cases:
        t1, t1c = (sitk.ReadImage(str(case.images[ch])) for ch in (0, 1))
        assert geometry(t1) == geometry(t1c)
        if case.labeled:
            assert geometry(sitk.ReadImage(str(case.label))) == geometry(t1)
        truth = sitk.GetArrayFromImage(truth_image(folder, case.case_id, 0))
        present |= set(np.unique(truth).tolist())
        a1, a1c = sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(t1c)
        muscle, fat = truth == ds.labels["extraocular_muscle"], truth == ds.labels["orbital_fat"]
        assert a1c[muscle].mean() / a1c[fat].mean() > a1[muscle].mean() / a1[fat].mean()  # muscles enhance
    assert present == set(ds.labels.values())


# ---------------------------------------------------------------------- DELIVER
def test_deliver_pngs_conditions_and_classes(tiny: dict[str, Path]) -> None:
    folder = tiny["DELIVER"]
    ds = Dataset.load(folder)
    assert ds.file_ending == ".png" and ds.dimensionality == "2d"
    assert ds.modalities == ["RGB", "depth", "event", "lidar"]
    conditions = json.loads((folder / "dataset.json").read_text())["conditions"]
    assert sorted(conditions) == sorted(c.case_id for c in ds.cases)
    assert set(conditions.values()) == {"sun", "night", "fog", "rain"}
    expected = {0: (3, np.uint8), 1: (1, np.uint16), 2: (1, np.uint8), 3: (1, np.uint8)}  # RGB, depth, event, lidar
    brightness: dict[str, list[float]] = {}
    classes = set()
    for case in ds.cases:
        images = {ch: sitk.ReadImage(str(path)) for ch, path in case.images.items()}
        for channel, (components, dtype) in expected.items():
            image = images[channel]
            assert image.GetDimension() == 2 and image.GetSize() == images[0].GetSize()
            assert image.GetNumberOfComponentsPerPixel() == components
            assert sitk.GetArrayFromImage(image).dtype == dtype
        lidar = sitk.GetArrayFromImage(images[3])
        assert 0 < np.count_nonzero(lidar) < 0.2 * lidar.size  # sparse returns
        brightness.setdefault(conditions[case.case_id], []).append(float(sitk.GetArrayFromImage(images[0]).mean()))
        truth = sitk.GetArrayFromImage(truth_image(folder, case.case_id, 0, ".png"))
        classes |= set(np.unique(truth).tolist())
        if case.labeled:
            assert sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))).dtype == np.uint8
    assert max(brightness["night"]) < 0.5 * min(brightness["sun"])
    assert classes == set(ds.labels.values())
