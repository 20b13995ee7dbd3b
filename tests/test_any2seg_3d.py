"""The any-subset model in 3D: Any2Seg's fusion on nnU-Net's residual U-Net (``--trainer any2seg -c 3d_fullres``).

Network tests run the U-Net built from the tiny MSCMR phantom's plan (planned once per session,
``conftest.planned``); the end-to-end test trains it for two iterations, checks the subset table
and predicts cases that lack different modalities.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from test_trainer import TinyCMCTrainer

from cmcseg.checkpoint import load_checkpoint
from cmcseg.cli.main import main as cli_main
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json
from cmcseg.networks.any2seg import Any2SegProbabilities, Any2SegUNet, SubsetProbabilities
from cmcseg.networks.any2seg_fusion import ModalityAgnosticFusion
from cmcseg.paths import WorkRoots
from cmcseg.plans.plans import plan_channels_per_modality, plan_configuration, plan_num_classes
from cmcseg.training.any2seg_trainer import Any2SegTrainer
from cmcseg.training.trainer import TrainingRequest

DATASET = "Dataset501_MSCMR"
MODALITIES = ("bSSFP", "LGE", "T2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


class TinyAny2Seg3DTrainer(Any2SegTrainer):
    """Any2SegTrainer on the tiny network and patch of the CMC trainer tests (same plan hook)."""

    num_workers = 0
    tiny_features = TinyCMCTrainer.tiny_features
    tiny_patch = TinyCMCTrainer.tiny_patch
    configure_plans = TinyCMCTrainer.configure_plans


def flags(roots: WorkRoots) -> list[str]:
    return ["--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed), "--results", str(roots.results)]


@pytest.fixture(scope="module")
def tiny_plans(planned: WorkRoots) -> dict:
    """The tiny phantom's plans with the tiny network of the trainer tests."""
    plans = read_json(planned.preprocessed / DATASET / "plans.json")
    trainer = TinyAny2Seg3DTrainer.__new__(TinyAny2Seg3DTrainer)
    trainer.configuration = "3d_fullres"
    return trainer.configure_plans(plans)


@pytest.fixture(scope="module")
def unet(tiny_plans: dict) -> Any2SegUNet:
    torch.manual_seed(0)
    return Any2SegUNet(plan_configuration(tiny_plans, "3d_fullres"), plan_channels_per_modality(tiny_plans),
                       plan_num_classes(tiny_plans), deep_supervision=False).eval()


def pipeline_input(b: int = 2, shape=(8, 24, 24), seed: int = 0) -> torch.Tensor:
    """``(B, 3 + 3, *shape)``: three single-channel modalities, then three FOV masks (all in view)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(b, 3, *shape, generator=g), torch.ones(b, 3, *shape)], dim=1)


def test_unet_sees_each_modality_with_its_fov_and_absent_ones_change_nothing(unet: Any2SegUNet) -> None:
    x = pipeline_input()
    images = unet.split_input(x, [1, 1, 1])
    assert images.shape == (2, 3, 2, 8, 24, 24)  # each modality: its channel + its FOV mask
    assert torch.equal(images[:, 1, 0], x[:, 1]) and torch.equal(images[:, 1, 1], x[:, 4])
    present = torch.tensor([[True, False, True], [False, True, False]])
    garbage = images.clone()
    garbage[0, 1] = 1e6
    garbage[1, 0] = float("nan")
    with torch.no_grad():
        out = unet(images, present).logits
        assert torch.allclose(out, unet(garbage, present).logits)
        # per-sample masks equal running each sample alone
        for i in range(2):
            assert torch.allclose(out[i:i + 1], unet(images[i:i + 1], present[i:i + 1]).logits, atol=1e-5)


def test_unet_with_one_modality_is_the_plain_unet_on_it(unet: Any2SegUNet) -> None:
    """One present modality: MFF gives its own features, so the output is encoder + decoder on that image."""
    images = unet.split_input(pipeline_input(b=1), [1, 1, 1])
    with torch.no_grad():
        alone = unet(images, torch.tensor([False, False, True])).logits
        plain = unet.decoder(unet.encoder(images[:, 2]))
    assert torch.allclose(alone, plain, atol=1e-5)


def test_deep_supervision_outputs_follow_the_encoder_scales(tiny_plans: dict) -> None:
    net = Any2SegUNet(plan_configuration(tiny_plans, "3d_fullres"), [1, 1, 1], 4, deep_supervision=True)
    images = net.split_input(pipeline_input(b=1), [1, 1, 1])
    outputs = net(images).logits
    scales = net.deep_supervision_scales()
    assert isinstance(outputs, list) and len(outputs) == len(scales)
    for out, scale in zip(outputs, scales):
        assert list(out.shape[2:]) == [round(s * n) for s, n in zip(scale, (8, 24, 24))]
    net.set_deep_supervision(False)
    assert isinstance(net(images).logits, torch.Tensor)


def test_subset_probabilities_equal_each_subset_alone_in_3d(unet: Any2SegUNet) -> None:
    x = pipeline_input(b=1)
    x[:, 3 + 2, :, :12] = 0  # T2 out of view in half the window: presence follows the FOV
    subsets = [(0,), (2,), (0, 1), (0, 1, 2)]
    with torch.no_grad():
        joint = SubsetProbabilities(unet, [1, 1, 1], subsets)(x)
        for i, subset in enumerate(subsets):
            alone = Any2SegProbabilities(unet, [1, 1, 1], subset)(x)
            assert torch.allclose(joint[:, 4 * i:4 * (i + 1)], alone, atol=1e-5)


def test_early_fusion_is_one_encoder_pass_on_the_present_channels_and_their_fov_masks(tiny_plans: dict) -> None:
    """fusion_stage="input": the output is encoder + decoder on the pipeline input with the absent modalities'
    images and FOV masks set to 0, whatever the absent images hold; the subset scoring still matches."""
    torch.manual_seed(0)
    net = Any2SegUNet(plan_configuration(tiny_plans, "3d_fullres"), [1, 1, 1], 4, deep_supervision=False,
                      fusion_stage="input").eval()
    x = pipeline_input()
    images = net.split_input(x, [1, 1, 1])
    present = torch.tensor([[True, False, True], [False, True, False]])
    expected_input = x.clone()
    for row, mask in enumerate(present):
        for m in torch.nonzero(~mask).flatten().tolist():
            expected_input[row, m] = 0.0      # image channel
            expected_input[row, 3 + m] = 0.0  # FOV mask
    garbage = images.clone()
    garbage[0, 1] = float("nan")
    garbage[1, 2] = 1e6
    with torch.no_grad():
        out = net(images, present).logits
        assert torch.allclose(out, net.decoder(net.encoder(expected_input)), atol=1e-5)
        assert torch.allclose(out, net(garbage, present).logits)
        joint = SubsetProbabilities(net, [1, 1, 1], [(1,), (0, 2)])(x)
        for i, subset in enumerate([(1,), (0, 2)]):
            assert torch.allclose(joint[:, 4 * i:4 * (i + 1)], Any2SegProbabilities(net, [1, 1, 1], subset)(x),
                                  atol=1e-5)
    assert net.encoder.in_channels == 6 and net.encoder.fov_channels == 3


def test_a_mit_backbone_is_refused_for_a_3d_configuration(planned: WorkRoots, tmp_path: Path) -> None:
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")
    trainer = TinyAny2Seg3DTrainer(TrainingRequest("MSCMR", 0, 1.0, roots=roots, configuration="3d_fullres",
                                                   device="cpu", num_workers=0, backbone="mit_b0"))
    with pytest.raises(CmcsegError, match="2D SegFormer backbone.*3D patch"):
        trainer.initialize()


def test_3d_training_writes_the_subset_table_and_predict_writes_every_partial_case(planned: WorkRoots,
                                                                                     tmp_path: Path) -> None:
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")
    trainer = "test_any2seg_3d:TinyAny2Seg3DTrainer"
    assert cli_main(["train", "-d", "MSCMR", "-f", "0", "-c", "3d_fullres", "--labeled", "0.5", "--trainer",
                     trainer, "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "-np", "0",
                     "--device", "cpu", *flags(roots)]) == 0
    fold = roots.results / DATASET / "TinyAny2Seg3DTrainer__3d_fullres__labeled0.5" / "fold_0"
    table = pd.read_csv(fold / "validation" / "subsets.csv")
    assert list(table.iloc[:, 0]) == ["bSSFP", "LGE", "T2", "bSSFP+LGE", "bSSFP+T2", "LGE+T2", "bSSFP+LGE+T2"]
    assert {"myocardium", "LV", "RV", "mean"} <= set(table.columns)
    assert table["mean"].between(0, 1).all()
    assert (fold / "validation" / "subsets.png").stat().st_size > 0
    init = load_checkpoint(fold / "checkpoint_final.pt")["init"]
    assert init["backbone"] == "residual" and init["deep_supervision"] is True
    assert init["fusion_stage"] == "input"  # the U-Net's default: early fusion

    # cases with different modalities missing: each written on its reference grid, or the first present one's
    images = planned.raw / DATASET / "imagesTr"
    given = {"patient001": (0, 2), "patient002": (1,), "patient003": (0, 1, 2)}
    grid = {"patient001": 0, "patient002": 1, "patient003": 1}  # LGE is the reference; patient001 lacks it
    folder = tmp_path / "in"
    folder.mkdir()
    for case, channels in given.items():
        for c in channels:
            (folder / f"{case}_{c:04d}.nii.gz").write_bytes((images / f"{case}_{c:04d}.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert cli_main(["predict", "-i", str(folder), "-o", str(out), "-d", "MSCMR", "--trainer", trainer, "-f", "0",
                     "--no-tta", "--device", "cpu", *flags(roots)]) == 0
    for case, channel in grid.items():
        written = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        source = sitk.ReadImage(str(images / f"{case}_{channel:04d}.nii.gz"))
        assert written.GetSize() == source.GetSize() and written.GetSpacing() == pytest.approx(source.GetSpacing())
        assert written.GetOrigin() == pytest.approx(source.GetOrigin())


def test_mean_fusion_is_the_mean_of_the_present_modalities_only() -> None:
    feats = torch.randn(3, 2, 4, 2, 5, 5)
    present = torch.tensor([[True, False], [False, True], [True, True]])
    garbage = feats.clone()
    garbage[1, 0] = float("nan")
    garbage[0, 1] = 1e9
    fused = ModalityAgnosticFusion(mode="mean")(garbage, present)
    assert torch.allclose(fused[0], (feats[0, 0] + feats[2, 0]) / 2)
    assert torch.allclose(fused[1], (feats[1, 1] + feats[2, 1]) / 2)
    # MFF at a very low temperature is not the mean: it weights by similarity and selects a modality
    assert not torch.allclose(ModalityAgnosticFusion(temperature=0.01)(feats, present), fused)
    with pytest.raises(ValueError, match="fusion mode"):
        ModalityAgnosticFusion(mode="max")
