"""The planner runs nnU-Net's rules: on co-registered data it must plan what nnU-Net plans (cmcseg.plans.planner)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cmcseg.dataset import Dataset, image_file, label_file, write_dataset_json
from cmcseg.errors import CmcsegError
from cmcseg.image_io import write_image
from cmcseg.plans import planner as planner_module
from cmcseg.plans.fingerprint import extract_fingerprint, summarize
from cmcseg.plans.planner import (
    PLANNERS,
    ResEncMPlanner,
    default_memory_gb,
    normalization_channel_name,
    patch_for_encoder,
    plan_experiment,
    write_plans,
)
from cmcseg.plans.plans import load_plans

PHANTOM = "Dataset931_PlanPhantom"
SHAPE = (32, 48, 48)  # numpy z, y, x
SPACING = (1.25, 1.25, 5.0)  # SimpleITK x, y, z
LABELS = {"background": 0, "outer": 1, "middle": 2, "core": 3}
FEW_SAMPLES = 24000  # nnU-Net samples 1e8 foreground voxels; both extractors get the same smaller budget
BUDGETS = (8.0, 0.25)  # nnU-Net's default, and one small enough to make its rule shrink the 3D patch


def _image(arr: np.ndarray, spacing=SPACING) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def write_phantom(folder: Path, n_cases: int = 12, channels=("T1", "T2"), seed: int = 0) -> Path:
    """Co-registered cases: noise inside a body box of varying size (zero outside, so cropping matters) and three
    nested labelled ellipsoids that are brighter in every channel."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    for i in range(n_cases):
        half = np.array([rng.integers(10, 15), rng.integers(16, 23), rng.integers(16, 23)])
        centre = np.array(SHAPE) // 2
        body = np.zeros(SHAPE, bool)
        body[tuple(slice(c - h, c + h) for c, h in zip(centre, half))] = True
        c = centre + rng.uniform(-2, 2, 3)
        r = ((z - c[0]) / 7) ** 2 + ((y - c[1]) / 11) ** 2 + ((x - c[2]) / 11) ** 2
        seg = np.zeros(SHAPE, np.uint8)
        for value, radius in ((1, 1.0), (2, 0.5), (3, 0.2)):
            seg[r < radius] = value
        for ch in range(len(channels)):
            arr = (rng.normal(100 + 50 * ch, 10, SHAPE) + 40 * (ch + 1) * seg) * body
            write_image(_image(arr.astype(np.float32)), image_file(folder, f"case{i:02d}", ch))
        write_image(_image(seg), label_file(folder, f"case{i:02d}"))
    write_dataset_json(folder, name=PHANTOM, channel_names=list(channels), labels=LABELS, num_training=n_cases)
    return folder


@pytest.fixture(scope="module")
def nnunet_run(tmp_path_factory):
    """The phantom, nnU-Net's own fingerprint and ResEnc-M plans for each budget, and cmcseg's fingerprint."""
    root = tmp_path_factory.mktemp("nnunet")
    folder = write_phantom(root / "raw" / PHANTOM)
    with pytest.MonkeyPatch.context() as mp:  # nnunetv2 >= 2.6 reads these variables when a path is used
        for var in ("raw", "preprocessed", "results"):
            mp.setenv(f"nnUNet_{var}", str(root / var))
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
            DatasetFingerprintExtractor,
        )
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
            nnUNetPlannerResEncM,
        )

        extractor = DatasetFingerprintExtractor(PHANTOM, num_processes=1)
        extractor.num_foreground_voxels_for_intensitystats = FEW_SAMPLES
        extractor.show_progress_bar = False
        nnunet_fingerprint = extractor.run(overwrite_existing=True)
        plans, planners = {}, {}
        for budget in BUDGETS:
            with warnings.catch_warnings():  # nnU-Net warns about a budget other than 8 GB: intended here
                warnings.simplefilter("ignore")
                planners[budget] = nnUNetPlannerResEncM(PHANTOM, gpu_memory_target_in_gb=budget,
                                                        plans_name=f"ResEncM_{budget}")
            plans[budget] = planners[budget].plan_experiment()
        planners["PlainConvUNet"] = ExperimentPlanner(PHANTOM)
    dataset = Dataset.load(folder)
    ours = extract_fingerprint(dataset, 0, num_workers=1, num_foreground_samples=FEW_SAMPLES, progress=False)
    return {"dataset": dataset, "fingerprint": ours, "nnunet_fingerprint": nnunet_fingerprint,
            "nnunet_plans": plans, "nnunet_planners": planners}


def test_fingerprint_equals_nnunet_on_coregistered_data(nnunet_run) -> None:
    ours, theirs = nnunet_run["fingerprint"], nnunet_run["nnunet_fingerprint"]
    assert ours["spacings"] == [list(s) for s in theirs["spacings"]]
    assert ours["shapes_after_crop"] == [list(s) for s in theirs["shapes_after_crop"]]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(theirs["median_relative_size_after_cropping"])
    assert ours["median_relative_size_after_cropping"] < 0.75  # so nnU-Net's mask-for-norm rule is exercised
    for c, stats in theirs["foreground_intensity_properties_per_channel"].items():
        assert ours["foreground_intensity_properties_per_channel"][str(c)] == pytest.approx(stats, rel=1e-6)


@pytest.mark.parametrize("topology, theirs", [("ResEncM", 8.0), ("PlainConvUNet", "PlainConvUNet")])
def test_planner_constants_are_nnunets(nnunet_run, topology: str, theirs) -> None:
    """cmcseg sets the constants nnU-Net's __init__ would set (that __init__ reads files): catch any drift."""
    planner = nnunet_run["nnunet_planners"][theirs]
    for name, value in PLANNERS[topology].NNUNET_ATTRIBUTES.items():
        assert getattr(planner, name) == value, name


@pytest.mark.parametrize("budget", BUDGETS)
def test_plans_equal_nnunets_under_the_same_budget(nnunet_run, budget: float) -> None:
    # nnU-Net's rule unchanged (cmcseg's default then fits the plan to its own estimate of the training step)
    plans = plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], memory_gb=budget, fit_memory=False)
    theirs = nnunet_run["nnunet_plans"][budget]
    assert plans["transpose_forward"] == list(theirs["transpose_forward"])
    assert plans["original_median_spacing_after_transp"] == theirs["original_median_spacing_after_transp"]
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}
    for name, cfg in plans["configurations"].items():
        ref = theirs["configurations"][name]
        assert cfg["spacing"] == pytest.approx(list(ref["spacing"]))
        assert cfg["patch_size"] == list(ref["patch_size"])
        assert cfg["batch_size"] == ref["batch_size"]
        assert cfg["normalization_schemes"] == ref["normalization_schemes"]
        assert cfg["use_mask_for_norm"] == ref["use_mask_for_norm"] == [True, True]
        assert cfg["architecture"]["network_class_name"] == ref["architecture"]["network_class_name"]
        assert (cfg["architecture"]["arch_kwargs"]["strides"]
                == [list(s) for s in ref["architecture"]["arch_kwargs"]["strides"]])
        assert cfg["batch_dice"] == ref["batch_dice"]
        # nnU-Net's VRAM estimate of the planned network stays within the budget
        arch = cfg["architecture"]
        estimate = ResEncMPlanner.static_estimate_VRAM_usage(
            cfg["patch_size"], 2, len(LABELS), arch["network_class_name"], arch["arch_kwargs"],
            arch["_kw_requires_import"])
        reference = ResEncMPlanner.NNUNET_ATTRIBUTES[f"UNet_reference_val_{name[:2]}"] * budget / 8
        assert estimate <= reference
    if budget < 1:
        assert np.prod(plans["configurations"]["3d_fullres"]["patch_size"]) < np.prod(SHAPE)


def test_nnunet_rule_shares_the_budget_among_modality_branches(nnunet_run) -> None:
    """Without the estimate, two modality branches are each planned with nnU-Net's rule at half the budget."""
    fp, ds = nnunet_run["fingerprint"], nnunet_run["dataset"]
    # a budget small enough that nnU-Net's rule, not its dataset-size cap, decides the patch
    shared = plan_experiment(fp, ds, ("3d_fullres",), memory_gb=0.5, branches=2, fit_memory=False)
    half = plan_experiment(fp, ds, ("3d_fullres",), memory_gb=0.25, fit_memory=False)
    whole = plan_experiment(fp, ds, ("3d_fullres",), memory_gb=0.5, fit_memory=False)
    assert shared["network_branches"] == 2 and shared["memory_rule"] == "nnU-Net, budget / branches"
    cfg, cfg_half, cfg_whole = (p["configurations"]["3d_fullres"] for p in (shared, half, whole))
    assert (cfg["patch_size"], cfg["batch_size"]) == (cfg_half["patch_size"], cfg_half["batch_size"])
    assert np.prod(cfg["patch_size"]) * cfg["batch_size"] < np.prod(cfg_whole["patch_size"]) * cfg_whole["batch_size"]


def test_plans_carry_the_contract(nnunet_run, tmp_path: Path) -> None:
    plans = plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], memory_gb=8, register="rigid")
    assert plans["schema_version"] == 1 and plans["plans_name"] == "cmcsegPlans"
    assert plans["dataset_name"] == PHANTOM and plans["labels"] == LABELS
    assert (plans["dimensionality"], plans["pairing"], plans["register"]) == ("3d", "paired", "rigid")
    assert (plans["reference_channel"], plans["reference_modality"]) == (0, "T1")
    assert plans["modalities"] == ["T1", "T2"] and plans["channels_per_modality"] == {"0": 1, "1": 1}
    assert plans["memory_budget_gb"] == 8.0 and plans["label_interpolation"] == "nearest"
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["data_identifier"] == "3d_fullres"
    assert cfg["resampling_fn_data"] == "resample_data_or_seg_to_shape"
    assert set(cfg["architecture"]) == {"network_class_name", "arch_kwargs", "_kw_requires_import"}
    write_plans(plans, tmp_path / "plans.json")
    assert load_plans(tmp_path / "plans.json") == plans
    with pytest.raises(CmcsegError, match="reference"):
        plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], memory_gb=8, reference_channel=1)
    plain = plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], ("3d_fullres",), 8,
                            topology="PlainConvUNet")
    assert plain["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("PlainConvUNet")


# ------------------------------------------------------------------------------------ rules on synthetic fingerprints
def _dataset_model(channel_names: dict[int, str]) -> Dataset:
    return Dataset(folder=Path("Dataset932_Synthetic"), name="Synthetic", channel_names=channel_names,
                   labels={"background": 0, "fg": 1}, file_ending=".nii.gz")


def _fingerprint(spacings, shapes, channels_per_modality: dict[int, int], relative_size: float = 1.0) -> dict:
    n_channels = sum(channels_per_modality.values())
    stats = {"mean": 1.0, "median": 1.0, "std": 1.0, "min": 0.0, "max": 2.0, "percentile_99_5": 2.0,
             "percentile_00_5": 0.0}
    return {"schema_version": 1, "spacings": [list(s) for s in spacings],
            "shapes_after_crop": [list(s) for s in shapes],
            "median_relative_size_after_cropping": relative_size, "reference_channel": 0, "reference_modality": "x",
            "channels_per_modality": {str(k): v for k, v in channels_per_modality.items()},
            "foreground_intensity_properties_per_channel": {str(c): stats for c in range(n_channels)}}


def test_strongly_anisotropic_data_uses_the_10th_percentile_of_the_coarse_axis() -> None:
    z_spacings = [3.0, 4.0, 5.0, 6.0, 8.0, 9.0, 10.0, 10.0, 10.0, 12.0]
    fp = _fingerprint([(z, 0.8, 0.8) for z in z_spacings], [(12, 96, 96)] * 10, {0: 1})
    plans = plan_experiment(fp, _dataset_model({0: "T2"}), ("3d_fullres",), memory_gb=8)
    spacing = plans["configurations"]["3d_fullres"]["spacing"]
    assert spacing[0] == pytest.approx(np.percentile(z_spacings, 10)) and spacing[0] < np.median(z_spacings)
    assert spacing[1:] == [0.8, 0.8] and plans["transpose_forward"] == [0, 1, 2]


def test_coarse_axis_is_transposed_first() -> None:
    fp = _fingerprint([(1.0, 1.0, 4.0)] * 4, [(48, 48, 16)] * 4, {0: 1})
    plans = plan_experiment(fp, _dataset_model({0: "T1"}), ("3d_fullres",), memory_gb=8)
    assert plans["transpose_forward"] == [2, 0, 1] and plans["transpose_backward"] == [1, 2, 0]
    assert plans["configurations"]["3d_fullres"]["spacing"][0] == 4.0


def test_normalisation_by_channel_name_and_rgb_components() -> None:
    fp = _fingerprint([(2.0, 1.0, 1.0)] * 4, [(40, 64, 64)] * 4, {0: 1, 1: 1, 2: 3}, relative_size=0.5)
    plans = plan_experiment(fp, _dataset_model({0: "CT", 1: "T1", 2: "RGB"}), ("2d",), memory_gb=0.5)
    cfg = plans["configurations"]["2d"]
    assert cfg["normalization_schemes"] == ["CTNormalization", "ZScoreNormalization"] + ["RGBTo01Normalization"] * 3
    # nnU-Net's rule: the nonzero mask is used where cropping removed a quarter or more, and the scheme allows it
    assert cfg["use_mask_for_norm"] == [False, True, False, False, False]
    assert cfg["architecture"]["arch_kwargs"]["conv_op"].endswith("Conv2d")


def test_single_slice_dataset_plans_only_2d(tmp_path: Path) -> None:
    folder = tmp_path / "Dataset933_Flat"
    rng = np.random.default_rng(1)
    for i in range(4):
        seg = np.zeros((64, 80), np.uint8)
        seg[20:40, 30:50] = 1
        for ch in range(2):
            img = sitk.GetImageFromArray((rng.normal(50, 5, seg.shape) + 30 * seg).astype(np.float32))
            img.SetSpacing((0.5, 0.5))
            write_image(img, image_file(folder, f"img{i}", ch))
        lab = sitk.GetImageFromArray(seg)
        lab.SetSpacing((0.5, 0.5))
        write_image(lab, label_file(folder, f"img{i}"))
    write_dataset_json(folder, name="Flat", channel_names=["RGBdepth", "NIR"], labels={"background": 0, "obj": 1},
                       num_training=4, dimensionality="2d")
    dataset = Dataset.load(folder)
    fp = extract_fingerprint(dataset, 0, num_workers=1, num_foreground_samples=1000, progress=False)
    assert fp["spacings"][0] == [999.0, 0.5, 0.5] and fp["shapes_after_crop"][0] == [1, 64, 80]
    summary = summarize(fp, "Flat")  # the 999 placeholder of the slice axis is not shown as a measurement
    assert "Spacing (y, x) mm: min 0.5x0.5" in summary and "999" not in summary and "Anisotropy of the median " \
        "spacing: 1.0" in summary
    plans = plan_experiment(fp, dataset, memory_gb=2)
    assert set(plans["configurations"]) == {"2d"} and plans["dimensionality"] == "2d"
    assert plans["configurations"]["2d"]["spacing"] == [0.5, 0.5]
    with pytest.raises(CmcsegError, match="-c 2d"):
        plan_experiment(fp, dataset, ("3d_fullres",), memory_gb=2)


def test_default_memory_budget_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(planner_module, "_system_ram_gb", lambda: 24.0)
    assert default_memory_gb() == planner_module.CPU_DEFAULT_MEMORY_GB == 4.0
    monkeypatch.setattr(planner_module, "_system_ram_gb", lambda: 8.0)
    assert default_memory_gb() == 2.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpu_gb, expected in ((80.0, 8.0), (6.0, 6.0)):
        props = type("Props", (), {"total_memory": gpu_gb * 1024 ** 3})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i, p=props: p)
        assert default_memory_gb() == pytest.approx(expected)


def test_unknown_topology_and_register_are_clear_errors(nnunet_run) -> None:
    assert set(PLANNERS) == {"ResEncM", "PlainConvUNet"}
    with pytest.raises(CmcsegError, match="topology"):
        plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], memory_gb=8, topology="ViT")
    with pytest.raises(CmcsegError, match="register"):
        plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], memory_gb=8, register="affine")


def test_rgb_is_scaled_to_0_1_only_when_it_is_8_bit() -> None:
    """nnU-Net's RGBTo01Normalization asserts values <= 255; 16-bit colour (MCubeS) is z-scored instead."""
    assert normalization_channel_name("RGB", 3, 255.0) == "rgb_to_0_1"
    assert normalization_channel_name("RGB", 3, None) == "rgb_to_0_1"
    assert normalization_channel_name("RGB", 3, 40000.0) == "RGB"             # -> ZScoreNormalization
    assert normalization_channel_name("RGB", 1, 200.0) == "RGB"               # one component is not colour


def test_patch_for_an_encoder_is_a_multiple_of_its_need_and_of_the_plans_strides() -> None:
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]  # total strides 4, 8, 8
    assert patch_for_encoder([20, 80, 72], strides, 16) == [32, 80, 80]
    assert patch_for_encoder([20, 80, 72], strides, 1) == [20, 80, 72]
    assert patch_for_encoder([5, 224, 192], [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]], 8) == [8, 224, 192]


def test_a_plan_for_a_vit_has_patches_it_can_read(nnunet_run) -> None:
    plans = plan_experiment(nnunet_run["fingerprint"], nnunet_run["dataset"], memory_gb=8, patch_multiple_of=16)
    assert plans["patch_multiple_of"] == 16
    for cfg in plans["configurations"].values():
        strides = cfg["architecture"]["arch_kwargs"]["strides"]
        for axis, size in enumerate(cfg["patch_size"]):
            assert size % 16 == 0 and size % int(np.prod([s[axis] for s in strides])) == 0
