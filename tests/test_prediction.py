"""`cmcseg predict`: input naming, geometry round trip, known-output stub, TTA and fold ensembling, faults.

The model folders here are written with :func:`cmcseg.prediction.model.write_model_folder`: the
planned network of a small phantom-like dataset, made tiny, with random weights (or a stub whose
output is a known function of the input). No training is needed, so every test takes seconds.

The dataset (``Dataset950_Geo``) is built to be awkward: the reference modality has a rotated
direction matrix, an odd origin and its thick axis along x (so the plan transposes), a zero
border (so the preprocessor crops), and per-case spacings (so it resamples); the second modality
lies on another, smaller grid with identity direction.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import Tensor, nn

from cmcseg.cli.main import main as cli_main
from cmcseg.dataset import image_file, label_file, write_dataset_json
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json, write_image
from cmcseg.networks.cmc import build_cmc_network
from cmcseg.prediction.cases import find_input_cases
from cmcseg.prediction.model import (
    check_model_dataset,
    load_trained_model,
    write_model_folder,
)
from cmcseg.prediction.predictor import PredictionOptions, predict_cases, subset_plans
from cmcseg.prediction.revert import revert_case, write_segmentation
from cmcseg.sliding_window import (
    fold_ensemble,
    mirror_combinations,
    predict_case,
    with_mirroring,
)
from cmcseg.training.augmentation import configure_spatial_augmentation
from cmcseg.training.cmc_trainer import CMCTrainer

DATASET = "Dataset950_Geo"
CHANNELS = ("A", "B")
LABELS = {"background": 0, "blob": 1}
ORIGINAL = {"background": 0, "blob": 255}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ------------------------------------------------------------------------------------------- data
def rotation(ax: float, ay: float, az: float) -> tuple[float, ...]:
    """A direction matrix (row-major, 9 values) rotating by the given degrees about x, y and z."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


def reference_image(case: int, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """The reference modality (bright ellipsoid on a noisy background, zero border) and its label."""
    size = (7, 22, 26)  # x, y, z: the thick axis is x
    spacing = (4.0 * (1 + 0.08 * case), 1.6, 1.5 * (1 - 0.05 * case))
    z, y, x = np.meshgrid(*[np.arange(s) for s in size[::-1]], indexing="ij")
    centre = [s / 2 - 0.5 for s in size[::-1]]
    r = ((z - centre[0]) / 8.0) ** 2 + ((y - centre[1]) / 6.5) ** 2 + ((x - centre[2]) / 2.6) ** 2
    label = (r < 1).astype(np.uint8)
    array = np.where(label > 0, 200.0, 50.0) + rng.normal(0, 4, label.shape)
    array[:, :, 0] = 0  # a zero border along x: the preprocessor crops it
    array[:2] = 0  # and along z
    label[:2] = 0
    label[:, :, 0] = 0
    geometry = dict(spacing=spacing, origin=(-123.456 + case, 78.9, -31.7), direction=rotation(12, -7, 25))
    images = []
    for a in (array.astype(np.float32), label):
        image = sitk.GetImageFromArray(a)
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        images.append(image)
    return images[0], images[1]


def second_modality(reference: sitk.Image) -> sitk.Image:
    """The other modality on its own grid: identity direction, coarser spacing, a smaller extent around the centre."""
    centre = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in reference.GetSize()]))
    spacing, size = np.array([2.0, 2.0, 3.0]), np.array([10, 12, 8])
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(o) for o in centre - (size - 1) / 2 * spacing])
    moved = sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(moved * 0.5 + 10.0, sitk.sitkFloat32)


def write_geo_dataset(folder: Path, n_cases: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        cid = f"geo{i:02d}"
        ref, label = reference_image(i, rng)
        write_image(ref, image_file(folder, cid, 0))
        write_image(second_modality(ref), image_file(folder, cid, 1))
        write_image(label, label_file(folder, cid))
    write_dataset_json(folder, name="Geo", channel_names=list(CHANNELS), labels=LABELS, num_training=n_cases,
                       original_label_values=ORIGINAL, reference_modality="A")
    return folder


def tiny_plans(plans: dict) -> dict:
    """The planned network with 4..16 features and one block per stage (same patch and topology)."""
    plans = copy.deepcopy(plans)
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    n = arch["n_stages"]
    arch["features_per_stage"] = [min(4 * 2 ** i, 16) for i in range(n)]
    arch["n_blocks_per_stage"] = [1] * n
    return plans


@pytest.fixture(scope="session")
def geo(tmp_path_factory) -> dict:
    """The Geo dataset, planned (3d_fullres), with its raw folder, plans and dataset.json."""
    base = tmp_path_factory.mktemp("predict_roots")
    raw, pre = base / "raw", base / "preprocessed"
    write_geo_dataset(raw / DATASET)
    assert cli_main(["plan", "-d", DATASET, "-c", "3d_fullres", "-np", "1", "--raw", str(raw),
                     "--preprocessed", str(pre)]) == 0
    plans = read_json(pre / DATASET / "plans.json")
    return {"base": base, "raw": raw / DATASET, "images": raw / DATASET / "imagesTr", "plans": plans,
            "dataset_json": read_json(pre / DATASET / "dataset.json")}


def random_cmc_model(folder: Path, geo: dict, folds=(0,), plans: dict | None = None) -> Path:
    """A CMC model folder with random weights (one seed per fold)."""
    plans = tiny_plans(geo["plans"]) if plans is None else plans
    weights = {}
    for fold in folds:
        torch.manual_seed(100 + fold)
        weights[fold] = build_cmc_network(plans, "3d_fullres").state_dict()
    hyper = {"deep_supervision": True, "shared_decoder": False, "fusion": None, "channel_attention": None,
             "cac_weight": 1.0}
    return write_model_folder(folder, plans, geo["dataset_json"], weights, "CMCTrainer",
                              {"dataset": DATASET}, hyper)


@pytest.fixture(scope="session")
def cmc_model(geo, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results") / DATASET
    return random_cmc_model(results / "CMCTrainer__3d_fullres__labeled0.5", geo, folds=(0, 1))


# ------------------------------------------------------------------------------------- stub network
class StubThresholdTrainer(CMCTrainer):
    """Test-only trainer whose 'network' labels a voxel foreground where the reference channel is above its mean."""

    @classmethod
    def build_inference_network(cls, plans, configuration, options, weights) -> nn.Module:
        return ThresholdNetwork(int(plans["reference_channel"]))


class ThresholdNetwork(nn.Module):
    """Probabilities [1 - p, p] with p = (normalised reference channel > 0): a known function of the input."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel

    def forward(self, x: Tensor) -> Tensor:
        p = (x[:, self.channel:self.channel + 1] > 0).float()
        return torch.cat([1 - p, p], dim=1)




@pytest.fixture(scope="session")
def stub_model(geo, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stub_results") / DATASET / "StubThresholdTrainer__3d_fullres__labeled1.0"
    return write_model_folder(folder, geo["plans"], geo["dataset_json"], {0: {}}, "StubThresholdTrainer",
                              {"dataset": DATASET})


def copy_inputs(geo: dict, folder: Path, cases=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(geo["images"].iterdir()):
        if cases is None or path.name.rsplit("_", 1)[0] in cases:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def predict_args(inputs: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return ["predict", "-i", str(inputs), "-o", str(output), "-m", str(model), "--device", "cpu", *extra]


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Voxels within one voxel of the mask's boundary."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    dilated = sitk.GetArrayFromImage(sitk.BinaryDilate(image, [1, 1, 1]))
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(image, [1, 1, 1]))
    return dilated != eroded


# ============================================================================================ tests
def test_geometry_round_trip_and_inputs_unchanged(geo, cmc_model, tmp_path):
    inputs = copy_inputs(geo, tmp_path / "in")
    before = digest(inputs)
    assert geo["plans"]["transpose_forward"] != [0, 1, 2], "the dataset should make the plan transpose"
    assert cli_main(predict_args(inputs, tmp_path / "out", cmc_model, "--save-probabilities")) == 0
    assert digest(inputs) == before
    for i in range(3):
        ref = sitk.ReadImage(str(inputs / f"geo{i:02d}_0000.nii.gz"))
        out = sitk.ReadImage(str(tmp_path / "out" / f"geo{i:02d}.nii.gz"))
        assert out.GetSize() == ref.GetSize()
        assert out.GetSpacing() == ref.GetSpacing()
        assert out.GetOrigin() == ref.GetOrigin()
        assert out.GetDirection() == ref.GetDirection()
        npz = np.load(tmp_path / "out" / f"geo{i:02d}.npz")
        probabilities = npz["probabilities"]
        assert probabilities.shape == (2, *sitk.GetArrayViewFromImage(ref).shape)
        np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probabilities.argmax(0), sitk.GetArrayFromImage(out))
        np.testing.assert_allclose(npz["direction"], ref.GetDirection())


def test_known_stub_output_after_revert(geo, stub_model, tmp_path):
    inputs = copy_inputs(geo, tmp_path / "in")
    assert cli_main(predict_args(inputs, tmp_path / "out", stub_model, "--no-tta", "--original-labels")) == 0
    for i in range(3):
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs / f"geo{i:02d}_0000.nii.gz")))
        expected = raw > raw.mean()  # z-score > 0 on the original grid (the reference has no FOV mask)
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"geo{i:02d}.nii.gz")))
        assert set(np.unique(predicted)) <= {0, 255}  # original label values
        wrong = (predicted == 255) != expected
        assert not (wrong & ~boundary_band(expected)).any(), f"case {i}: errors away from the boundary"
        assert wrong.mean() < 0.03


def test_mirroring_and_fold_ensemble_equal_hand_computed_mean():
    torch.manual_seed(0)
    weights = [torch.randn(2, 3, 1, 1, 1) for _ in range(2)]

    def fold(w):  # not mirror-symmetric: a 1x1 conv plus a ramp along every axis
        def predict(x):
            ramp = torch.linspace(0, 1, x.shape[2])[:, None, None] + torch.linspace(0, 2, x.shape[3])[:, None] \
                + torch.linspace(0, 3, x.shape[4])
            return torch.softmax(torch.nn.functional.conv3d(x, w) + ramp, dim=1)
        return predict

    data = np.random.default_rng(1).normal(size=(2, 4, 6, 5)).astype(np.float32)
    fov = np.ones((1, 4, 6, 5), np.float32)
    x = torch.from_numpy(np.concatenate([data, fov]))[None]
    combos = [()] + mirror_combinations((0, 1, 2))
    assert len(combos) == 8
    by_hand = sum(torch.flip(fold(w)(torch.flip(x, c)), c) if c else fold(w)(x) for w in weights for c in combos)
    by_hand = (by_hand / (len(weights) * len(combos)))[0]
    for batched in (True, False):
        predict = with_mirroring(fold_ensemble([fold(w) for w in weights]), (0, 1, 2), batched=batched)
        # one window covers the case, so the Gaussian weights cancel
        got = predict_case(predict, data, fov, (4, 6, 5), torch.device("cpu"), step=0.5)
        torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=1e-5)


def test_fold_ensemble_is_the_mean_of_the_folds(geo, cmc_model, tmp_path):
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo01"})
    runs = {}
    for name, folds in (("f0", ["0"]), ("f1", ["1"]), ("both", ["0", "1"])):
        assert cli_main(predict_args(inputs, tmp_path / name, cmc_model, "-f", *folds, "--no-tta",
                                     "--save-probabilities")) == 0
        runs[name] = np.load(tmp_path / name / "geo01.npz")["probabilities"]
    np.testing.assert_allclose(runs["both"], (runs["f0"] + runs["f1"]) / 2, atol=2e-5)
    assert not np.allclose(runs["f0"], runs["f1"], atol=1e-3)  # the folds differ, so the mean means something


def test_corrupt_case_in_the_middle(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in")
    (inputs / "geo01_0001.nii.gz").write_bytes(b"this is not an image")
    code = cli_main(predict_args(inputs, tmp_path / "out", cmc_model, "--no-tta"))
    assert code != 0
    err = capsys.readouterr().err
    assert "geo01" in err and "geo01_0001.nii.gz" in err
    assert (tmp_path / "out" / "geo00.nii.gz").is_file() and (tmp_path / "out" / "geo02.nii.gz").is_file()
    assert not (tmp_path / "out" / "geo01.nii.gz").exists()
    assert not list((tmp_path / "out").glob(".tmp-*"))
    report = read_json(tmp_path / "out" / "prediction.json")
    assert report["written"] == ["geo00", "geo02"] and list(report["failed"]) == ["geo01"]


def test_truncated_gzip_is_an_error_not_zeros(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo00"})
    data = (inputs / "geo00_0000.nii.gz").read_bytes()
    (inputs / "geo00_0000.nii.gz").write_bytes(data[: len(data) // 2])
    assert cli_main(predict_args(inputs, tmp_path / "out", cmc_model, "--no-tta", "-np", "0")) == 1
    assert "truncated or corrupt" in capsys.readouterr().err


def test_continue_skips_finished_cases(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in")
    out = tmp_path / "out"
    assert cli_main(predict_args(inputs, out, cmc_model, "--no-tta")) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("geo*.nii.gz")}
    (out / "geo01.nii.gz").unlink()
    capsys.readouterr()
    assert cli_main(predict_args(inputs, out, cmc_model, "--no-tta", "--continue")) == 0
    assert "1 case(s) predicted, 2 already done, skipped" in capsys.readouterr().out
    assert (out / "geo01.nii.gz").is_file()
    for name in ("geo00.nii.gz", "geo02.nii.gz"):
        assert (out / name).stat().st_mtime_ns == stamps[name]


def test_refuses_model_of_another_dataset(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo00"})
    assert cli_main(predict_args(inputs, tmp_path / "out", cmc_model, "-d", "MSCMR")) == 2
    err = capsys.readouterr().err
    assert "trained on Dataset950_Geo, not on dataset 'MSCMR'" in err
    check_model_dataset(load_trained_model(cmc_model, [0]), "950")  # id, name and folder name all match
    check_model_dataset(load_trained_model(cmc_model, [0]), "geo")


def test_refuses_other_number_of_modalities(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo00"})
    (inputs / "geo00_0002.nii.gz").write_bytes((inputs / "geo00_0001.nii.gz").read_bytes())
    assert cli_main(predict_args(inputs, tmp_path / "out", cmc_model)) == 2
    err = capsys.readouterr().err
    assert "have 3 modalities" in err and "trained on 2" in err
    (inputs / "geo00_0002.nii.gz").unlink()
    (inputs / "geo00_0001.nii.gz").unlink()
    assert cli_main(predict_args(inputs, tmp_path / "out", cmc_model)) == 2
    assert "none of the 1 input case(s) has B (channel 0001" in capsys.readouterr().err


def test_missing_modality_names_case_and_modality(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo00", "geo01"})
    (inputs / "geo01_0001.nii.gz").unlink()
    assert cli_main(predict_args(inputs, tmp_path / "out", cmc_model, "--no-tta")) == 1
    err = capsys.readouterr().err
    assert "case geo01: modality B (channel 0001" in err and "geo01_0001.nii.gz" in err
    assert (tmp_path / "out" / "geo00.nii.gz").is_file()


def test_model_folder_resolution_from_dataset(geo, cmc_model, tmp_path, capsys):
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo00"})
    results = cmc_model.parent.parent
    base = ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", DATASET, "--results", str(results),
            "--device", "cpu", "--no-tta", "-f", "0"]
    assert cli_main(base) == 0
    second = results / DATASET / "Other__3d_fullres__labeled0.2"
    random_cmc_model(second, geo)
    try:
        assert cli_main(base) == 2
        err = capsys.readouterr().err
        assert "2 trained models" in err and "Other__3d_fullres__labeled0.2" in err and "-m" in err
    finally:
        shutil.rmtree(second)


def test_refuses_fold_trained_with_other_plans(geo, tmp_path):
    folder = random_cmc_model(tmp_path / DATASET / "CMCTrainer__3d_fullres__labeled1.0", geo)
    plans = read_json(folder / "plans.json")
    plans["configurations"]["3d_fullres"]["patch_size"][0] += 1
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CmcsegError, match="other plans"):
        load_trained_model(folder)


def test_native_mscmr_naming(tmp_path):
    names = {0: "bSSFP", 1: "LGE", 2: "T2"}
    meta = {"name": "MSCMR"}
    for case in ("patient1", "patient12"):
        for seq in ("C0", "LGE", "T2"):
            (tmp_path / "c0t2lge").mkdir(exist_ok=True)
            (tmp_path / "c0t2lge" / f"{case}_{seq}.nii.gz").write_bytes(b"")
    cases = find_input_cases(tmp_path, names, meta)
    assert [c.case_id for c in cases] == ["patient1", "patient12"]
    assert cases[0].images[0].name == "patient1_C0.nii.gz" and cases[0].images[1].name == "patient1_LGE.nii.gz"
    assert cases[0].naming == "native:mscmr"
    cyclemix = tmp_path / "cyclemix"
    (cyclemix / "TestSet" / "images").mkdir(parents=True)
    (cyclemix / "TestSet" / "images" / "subject3_DE.nii.gz").write_bytes(b"")
    lge_only = find_input_cases(cyclemix, {0: "LGE"}, {"name": "MSCMRLGE", "conversion": {"format": "mscmr"}})
    assert [(c.case_id, sorted(c.images)) for c in lge_only] == [("subject3", [0])]
    with pytest.raises(CmcsegError, match="no case found"):
        find_input_cases(tmp_path / "c0t2lge", {0: "CT"}, {"name": "Unknown"})


def test_nnunet_naming_any_format(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.mha", "b_0000.nrrd", "b_0001.nii", "readme.txt", ".hidden_0000.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = find_input_cases(tmp_path, {0: "x", 1: "y"})
    assert [(c.case_id, [p.name for p in c.files]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.mha"]), ("b", ["b_0000.nrrd", "b_0001.nii"])]


def test_two_dimensional_reference_written_as_2d(tmp_path):
    """A 2D reference (dimension 2) comes back as a 2D image with its own 2D header."""
    properties = {
        "case_id": "scene", "shape_before_cropping": [1, 6, 8], "bbox_used_for_cropping": [[0, 1], [1, 5], [0, 8]],
        "shape_after_cropping_and_before_resampling": [1, 4, 8], "transpose_backward": [0, 1, 2],
        "spacing_after_resampling": [1.0, 1.0, 1.0], "spacing_before_resampling": [1.0, 1.0, 1.0],
        "reference_geometry": {"size": [8, 6], "spacing": [0.5, 0.7], "origin": [3.0, -2.0],
                               "direction": [0.0, 1.0, 1.0, 0.0], "dimension": 2},
    }
    probabilities = np.zeros((3, 1, 4, 8), np.float32)
    probabilities[2] = 1.0
    config = {"resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1}}
    labels, full = revert_case(probabilities, properties, config, with_probabilities=True)
    assert labels.shape == (1, 6, 8) and full.shape == (3, 1, 6, 8)
    assert (labels[0, 1:5] == 2).all() and (labels[0, [0, 5]] == 0).all()
    assert (full[0, 0, 0] == 1).all()
    write_segmentation(labels, properties, tmp_path / "scene.png")
    assert sitk.ReadImage(str(tmp_path / "scene.png")).GetSize() == (8, 6)
    write_segmentation(labels, properties, tmp_path / "scene.mha")
    image = sitk.ReadImage(str(tmp_path / "scene.mha"))
    assert image.GetDimension() == 2 and image.GetSize() == (8, 6)
    assert image.GetSpacing() == (0.5, 0.7) and image.GetOrigin() == (3.0, -2.0)
    assert image.GetDirection() == (0.0, 1.0, 1.0, 0.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels[0])


def test_subset_plans_for_models_that_accept_missing_modalities(geo):
    plans = geo["plans"]
    sub = subset_plans(plans, "3d_fullres", [1])
    assert sub["channels_per_modality"] == {"1": 1}
    assert sub["reference_channel"] == 1
    assert len(sub["configurations"]["3d_fullres"]["normalization_schemes"]) == 1
    assert plans["channels_per_modality"] == {"0": 1, "1": 1}  # the model's plans are not modified


@pytest.mark.parametrize("patch_size", [(4, 128, 128), (32, 32, 32), (64, 48)])
def test_mirror_axes_of_an_old_checkpoint_follow_nnunet_rule(cmc_model, patch_size):
    """A checkpoint without recorded axes mirrors what nnU-Net's augmentation rule mirrored for its patch, without
    prediction importing the training stack to ask."""
    model = load_trained_model(cmc_model, [0])
    model.init.pop("mirror_axes", None)
    model.trainer_class = None
    model.plans = copy.deepcopy(model.plans)
    model.plans["configurations"][model.configuration]["patch_size"] = list(patch_size)
    assert model.mirror_axes == configure_spatial_augmentation(patch_size).mirror_axes


def test_api_predict_cases_reports_every_case(geo, cmc_model, tmp_path):
    model = load_trained_model(cmc_model, [0])
    assert model.mirror_axes == (0, 1, 2) and not model.accepts_missing_modalities
    cases = find_input_cases(copy_inputs(geo, tmp_path / "in"), model.channel_names)
    report = predict_cases(cases, tmp_path / "out", model,
                           PredictionOptions(tta=False, device="cpu", progress=False, num_workers=2))
    assert report.ok and report.written == ["geo00", "geo01", "geo02"]
    assert all(math.isfinite(s) for s in report.case_seconds.values())


def test_precision_bfloat16_computes_in_bfloat16_and_stays_close_to_float32(geo, cmc_model, tmp_path):
    """--precision: the networks really compute in bfloat16 (the probabilities differ from float32's, by little),
    and prediction.json says which precision ran."""
    inputs = copy_inputs(geo, tmp_path / "in", cases={"geo01"})
    probabilities = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert cli_main(predict_args(inputs, out, cmc_model, "-f", "0", "--no-tta", "--save-probabilities",
                                     "--precision", precision)) == 0
        assert read_json(out / "prediction.json")["settings"]["precision"] == precision
        probabilities[precision] = np.load(out / "geo01.npz")["probabilities"]
    difference = np.abs(probabilities["bfloat16"] - probabilities["float32"])
    assert difference.max() > 1e-4  # bfloat16 ran: its 8-bit mantissa shows
    assert difference.max() < 0.05
    assert (probabilities["bfloat16"].argmax(0) == probabilities["float32"].argmax(0)).mean() > 0.99


def test_save_heads_writes_each_head_and_the_fusion_follows_the_stored_reliability(geo, tmp_path):
    """--save-heads writes CASE_head-<modality> beside the fused segmentation; a head whose stored reliability is
    ~0 has (almost) no say in the fused one, which then equals the other head's where that head sees."""
    plans = tiny_plans(geo["plans"])
    torch.manual_seed(7)
    network = build_cmc_network(plans, "3d_fullres")
    weights = network.state_dict()
    weights["head_reliability"] = torch.tensor([[1.0, 1.0], [1e-4, 1e-4]])
    model = write_model_folder(tmp_path / "model" / "CMCTrainer__3d_fullres__labeled0.5", plans, geo["dataset_json"],
                               {0: weights}, "CMCTrainer", {"dataset": DATASET},
                               {"deep_supervision": True, "cac_weight": 0.0})
    inputs = copy_inputs(geo, tmp_path / "in", cases=["geo00"])
    assert cli_main(predict_args(inputs, tmp_path / "out", model, "--save-heads", "--no-tta")) == 0
    modalities = list(plans["modalities"])
    fused = sitk.ReadImage(str(tmp_path / "out" / "geo00.nii.gz"))
    heads = {m: sitk.ReadImage(str(tmp_path / "out" / f"geo00_head-{m}.nii.gz")) for m in modalities}
    for image in heads.values():
        assert image.GetSize() == fused.GetSize() and image.GetOrigin() == fused.GetOrigin()
    first = sitk.GetArrayFromImage(heads[modalities[0]])
    assert (sitk.GetArrayFromImage(fused) == first).mean() > 0.95
    report = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert report["settings"]["save_heads"] == modalities
