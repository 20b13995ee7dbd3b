"""The encoder registry, weight loading and the CMC network (tiny plans, CPU)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.networks import (
    ENCODERS,
    CMCNetwork,
    ModalityEncoder,
    WeightsMismatchError,
    build_cmc_network,
    build_encoder,
    register_encoder,
    split_modalities,
)
from cmcseg.plans.plans import plan_num_classes

PATCH = (16, 32, 32)  # (z, y, x)
ARCH_KWARGS = {
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 32],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_blocks_per_stage": [1, 2, 2, 2],
    "n_conv_per_stage_decoder": [1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def tiny_plans(channels=(1, 1, 1), patch=PATCH, labels=None) -> dict:
    """A plans.json-like dict with a 4-stage residual U-Net of 8-32 features."""
    return {
        "labels": labels or {"background": 0, "a": 1, "b": 2},
        "channels_per_modality": {str(m): c for m, c in enumerate(channels)},
        "configurations": {"3d_fullres": {
            "patch_size": list(patch),
            "architecture": {"network_class_name": RESENC, "arch_kwargs": copy.deepcopy(ARCH_KWARGS),
                             "_kw_requires_import": IMPORTS},
        }},
    }


def tiny_input(channels=(1, 1, 1), batch: int = 1, patch=PATCH, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, sum(channels), *patch, generator=g)
    fov = torch.ones(batch, len(channels), *patch)
    return torch.cat([data, fov], 1)


def nnunet_resenc(in_channels: int, num_classes: int = 3) -> nn.Module:
    return get_network_from_plans(RESENC, copy.deepcopy(ARCH_KWARGS), IMPORTS, in_channels, num_classes,
                                  deep_supervision=True)


def full_res(logits) -> Tensor:
    return logits[0] if isinstance(logits, list) else logits


def test_nothing_imports_timm_or_torchvision():
    assert "timm" not in sys.modules and "torchvision" not in sys.modules


# ------------------------------------------------------------------------------------ CMC network
@pytest.mark.parametrize("shared_encoder", [False, True])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_output_shapes_three_modalities(shared_encoder, deep_supervision):
    torch.manual_seed(0)
    net = build_cmc_network(tiny_plans(), "3d_fullres", shared_encoder=shared_encoder,
                            deep_supervision=deep_supervision)
    assert isinstance(net, CMCNetwork)
    assert len(net.encoders) == (1 if shared_encoder else 3) and len(net.decoders) == 3
    out = net(tiny_input(batch=2))
    assert len(out.logits) == 3 and len(out.bottlenecks) == 3
    for logits, bottleneck in zip(out.logits, out.bottlenecks):
        assert bottleneck.shape == (2, 32, 4, 4, 4)
        if deep_supervision:
            assert [tuple(t.shape) for t in logits] == [(2, 3, 16, 32, 32), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
        else:
            assert isinstance(logits, Tensor) and logits.shape == (2, 3, 16, 32, 32)
    assert net.deep_supervision_scales() == [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    net.set_deep_supervision(False)
    assert isinstance(net(tiny_input()).logits[0], Tensor)


@pytest.mark.parametrize("shared_encoder", [False, True])
def test_gradients_reach_every_branch_encoder_and_the_fusion_layer(shared_encoder):
    torch.manual_seed(0)
    net = build_cmc_network(tiny_plans(), "3d_fullres", shared_encoder=shared_encoder)
    out = net(tiny_input())
    loss = sum(t.square().mean() for logits in out.logits for t in logits)
    loss.backward()

    def reached(module: nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert all(reached(e) for e in net.encoders)
    assert all(reached(d) for d in net.decoders)
    assert reached(net.fusion.mix) and all(reached(g) for g in net.fusion.gates)
    assert all(reached(a) for a in net.attention)
    if not shared_encoder:  # each branch's stem only gets gradient through its own input and its own decoder
        assert all(e.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0 for e in net.encoders)


def test_fusion_mixes_modalities_and_can_be_switched_off():
    x = tiny_input()
    x2 = x.clone()
    x2[:, 1] = torch.randn_like(x2[:, 1])  # change modality 1's image only
    for fusion, should_change in ((True, True), (False, False)):
        torch.manual_seed(0)
        net = build_cmc_network(tiny_plans(), "3d_fullres", fusion=fusion, deep_supervision=False).eval()
        with torch.no_grad():
            a, b = net(x), net(x2)
        assert not torch.allclose(a.logits[1], b.logits[1])
        assert (not torch.allclose(a.logits[0], b.logits[0])) is should_change
        assert torch.allclose(a.bottlenecks[0], b.bottlenecks[0])  # modality 0's own features do not move


def test_fov_channel_is_used():
    torch.manual_seed(0)
    net = build_cmc_network(tiny_plans(), "3d_fullres", fusion=False, deep_supervision=False).eval()
    x = tiny_input()
    x_out = x.clone()
    x_out[:, 3 + 2, :, :, :16] = 0  # modality 2's FOV now covers half the patch; its image is unchanged
    with torch.no_grad():
        a, b = net(x), net(x_out)
    assert not torch.allclose(a.logits[2], b.logits[2])
    assert torch.equal(a.logits[0], b.logits[0]) and torch.equal(a.logits[1], b.logits[1])


def test_split_modalities_pads_components_and_appends_each_fov():
    x = torch.arange(2 * 6 * 2).float().reshape(2, 6, 2)  # RGB (3) + grey (1) + 2 FOV masks
    rgb, grey = split_modalities(x, [3, 1])
    assert torch.equal(rgb, x[:, [0, 1, 2, 4]]) and torch.equal(grey, x[:, [3, 5]])
    _, grey_padded = split_modalities(x, [3, 1], pad_to=3)
    assert grey_padded.shape[1] == 4 and torch.equal(grey_padded[:, [0, 3]], x[:, [3, 5]])
    assert grey_padded[:, 1:3].abs().sum() == 0
    with pytest.raises(CmcsegError, match="input channels"):
        split_modalities(x[:, :5], [3, 1])


def test_shared_encoder_with_rgb_and_grey_modalities():
    torch.manual_seed(0)
    net = build_cmc_network(tiny_plans(channels=(3, 1)), "3d_fullres", shared_encoder=True, shared_decoder=True)
    assert net.encoders[0].in_channels == 4 and len(net.decoders) == 1
    out = net(tiny_input(channels=(3, 1), batch=2))
    assert [tuple(t[0].shape) for t in out.logits] == [(2, 3, 16, 32, 32)] * 2


def test_one_branch_is_nnunets_residual_unet():
    """M=1 (or single_branch): no attention, no fusion; nnU-Net's architecture with the FOV mask as a channel."""
    torch.manual_seed(0)
    single = build_cmc_network(tiny_plans(channels=(1,)), "3d_fullres")
    assert single.n_branches == 1 and single.fusion is None and single.attention is None
    nnunet = nnunet_resenc(in_channels=2)
    assert sum(p.numel() for p in single.parameters()) == sum(p.numel() for p in nnunet.parameters())
    out = single(tiny_input(channels=(1,)))
    assert len(out.logits) == 1 and out.logits[0][0].shape == (1, 3, *PATCH)

    stacked = build_cmc_network(tiny_plans(), "3d_fullres", single_branch=True)  # nnU-Net style: all as channels
    assert stacked.encoders[0].in_channels == 6 and stacked.encoders[0].fov_channels == 3
    assert sum(p.numel() for p in stacked.parameters()) == sum(p.numel() for p in nnunet_resenc(6).parameters())
    assert len(stacked(tiny_input()).logits) == 1


def test_ignore_label_is_not_a_class():
    assert plan_num_classes(tiny_plans(labels={"background": 0, "a": 1, "ignore": 2})) == 2
    assert plan_num_classes(tiny_plans()) == 3


def test_compiles_to_one_graph():
    torch.manual_seed(0)
    net = build_cmc_network(tiny_plans(channels=(1, 1)), "3d_fullres", shared_encoder=True, shared_decoder=True)
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    x = tiny_input(channels=(1, 1))
    out, ref = compiled(x), net(x)
    assert torch.allclose(out.logits[1][0], ref.logits[1][0])


# ----------------------------------------------------------------------------------- registry
def test_registering_an_encoder_makes_build_encoder_use_it():
    class TinyEncoder(ModalityEncoder):
        def __init__(self, in_channels: int, fov_channels: int):
            super().__init__()
            self.in_channels, self.fov_channels, self.spatial_dims = in_channels, fov_channels, 3
            self.output_channels, self.strides = [4, 8], [[1, 1, 1], [2, 2, 2]]
            self.stem = nn.Conv3d(in_channels, 4, 3, padding=1)
            self.down = nn.Conv3d(4, 8, 2, stride=2)

        @classmethod
        def from_plan(cls, plan_config, in_channels, fov_channels=1, **options):
            return cls(in_channels, fov_channels)

        def forward(self, x):
            s0 = self.stem(x)
            return [s0, self.down(s0)]

        def build_decoder(self, num_classes, deep_supervision):
            encoder = self

            class Up(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.deep_supervision = deep_supervision
                    self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
                    self.head = nn.Conv3d(8, num_classes, 1)

                def forward(self, skips):
                    y = self.head(torch.cat([self.up(skips[1]), skips[0]], 1))
                    return [y] if self.deep_supervision else y

            assert encoder.output_channels == [4, 8]
            return Up()

    register_encoder("tiny_test")(TinyEncoder)
    try:
        enc = build_encoder("tiny_test", tiny_plans()["configurations"]["3d_fullres"], 2)
        assert isinstance(enc, TinyEncoder) and ENCODERS["tiny_test"] is TinyEncoder
        net = build_cmc_network(tiny_plans(channels=(1, 1)), "3d_fullres", encoder="tiny_test")
        assert all(isinstance(e, TinyEncoder) for e in net.encoders)
        assert net(tiny_input(channels=(1, 1))).logits[0][0].shape == (1, 3, *PATCH)
    finally:
        ENCODERS.pop("tiny_test", None)
    with pytest.raises(CmcsegError, match="unknown encoder 'tiny_test'.*residual"):
        build_encoder("tiny_test", tiny_plans()["configurations"]["3d_fullres"], 2)


# ---------------------------------------------------------------------------- residual encoder
def test_residual_encoder_matches_nnunet_encoder_structure():
    enc = build_encoder("residual", tiny_plans()["configurations"]["3d_fullres"], 2)
    ref = nnunet_resenc(in_channels=2).encoder
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in ref.parameters())
    ours = {k: tuple(v.shape) for k, v in enc.encoder.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert enc.output_channels == [8, 16, 32, 32] and enc.strides == ARCH_KWARGS["strides"]


@pytest.mark.parametrize("topology", ["residual", "plain"])
def test_each_encoder_is_the_encoder_nnunet_builds_for_the_plan(topology: str):
    """Built by nnU-Net's get_network_from_plans: from the same seed, the same weights as the encoder of nnU-Net's
    own network (ResidualEncoderUNet, or PlainConvUNet with a convolution per residual block), the same output."""
    cfg = tiny_plans()["configurations"]["3d_fullres"]
    torch.manual_seed(3)
    ours = build_encoder(topology, cfg, 2).encoder
    kwargs, name = copy.deepcopy(ARCH_KWARGS), RESENC
    if topology == "plain":
        name, kwargs["n_conv_per_stage"] = RESENC.replace("ResidualEncoderUNet", "PlainConvUNet"), \
            kwargs.pop("n_blocks_per_stage")
    torch.manual_seed(3)
    theirs = get_network_from_plans(name, kwargs, IMPORTS, 2, 1, deep_supervision=True).encoder
    assert type(ours) is type(theirs)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)
    x = tiny_input(channels=(1,))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ours(x), theirs(x)))


def test_residual_encoder_loads_nnunet_and_cmcseg_checkpoints(tmp_path: Path):
    cfg = tiny_plans()["configurations"]["3d_fullres"]
    ref = nnunet_resenc(in_channels=1)  # an nnU-Net model trained on the one image channel (no FOV)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": ref.state_dict(), "trainer_name": "nnUNetTrainer"}, path)
    enc = build_encoder("residual", cfg, 2, path)
    stem = enc.encoder.stem.convs[0].conv.weight
    assert torch.equal(stem[:, :1], ref.encoder.stem.convs[0].conv.weight) and stem[:, 1].abs().sum() == 0
    key = "stages.2.blocks.1.conv2.conv.weight"
    assert torch.equal(enc.encoder.state_dict()[key], ref.encoder.state_dict()[key])

    net = build_cmc_network(tiny_plans(channels=(1, 1)), "3d_fullres")
    cmc_path = tmp_path / "cmc.pt"
    torch.save({"network_weights": {"_orig_mod." + k: v for k, v in net.state_dict().items()}}, cmc_path)
    enc2 = build_encoder("residual", cfg, 2, cmc_path)
    assert all(torch.equal(v, net.encoders[0].state_dict()[k]) for k, v in enc2.state_dict().items())


def test_residual_checkpoint_of_another_plan_fails_with_the_file_named(tmp_path: Path):
    other = copy.deepcopy(ARCH_KWARGS)
    other["features_per_stage"] = [8, 16, 24, 32]
    other["n_blocks_per_stage"] = [1, 2, 2, 1]
    ref = get_network_from_plans(RESENC, other, IMPORTS, 2, 3)
    path = tmp_path / "other_plan.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(WeightsMismatchError) as info:
        build_encoder("residual", tiny_plans()["configurations"]["3d_fullres"], 2, path)
    err = info.value
    assert str(path) in str(err) and isinstance(err, CmcsegError)
    assert "encoder.stages.3.blocks.1.conv1.conv.weight" in err.missing
    assert any(k == "encoder.stages.2.blocks.0.conv1.conv.weight" for k, _, _ in err.shape_mismatches)
    assert f"{len(err.missing)} missing key(s)" in str(err)


# -------------------------------------------------------------------------------- SwinUNETR
SWIN_PATCH = (64, 32, 32)  # divisible by 32; the /32 bottleneck keeps 2 voxels for instance norm


def swin_plan_config() -> dict:
    return {"patch_size": list(SWIN_PATCH),
            "architecture": {"arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv3d"},
                             "_kw_requires_import": ["conv_op"]}}


def write_published_swinvit(path: Path, feature_size: int = 12) -> dict[str, Tensor]:
    """A checkpoint in the layout of MONAI's model_swinvit.pt; returns its SwinViT weights in MONAI's names."""
    torch.manual_seed(1)
    monai_names = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size).swinViT.state_dict()
    published = {"module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v.clone()
                 for k, v in monai_names.items()}
    published["module.norm.weight"] = torch.ones(16 * feature_size)  # the pretraining's final norm (unused)
    published["module.norm.bias"] = torch.zeros(16 * feature_size)
    torch.save({"state_dict": published}, path)
    return monai_names


def test_swinunetr_loads_the_published_self_supervised_layout(tmp_path: Path):
    path = tmp_path / "model_swinvit.pt"
    saved = write_published_swinvit(path)
    assert any(".mlp.fc1." in k for k in torch.load(path)["state_dict"])
    enc = build_encoder("swinunetr", swin_plan_config(), 2, path, feature_size=12)
    loaded = enc.swinViT.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        if key == "patch_embed.proj.weight":  # 1 pretrained channel -> image channel as is, FOV channel zero
            assert torch.equal(loaded[key][:, :1], value) and loaded[key][:, 1].abs().sum() == 0
        else:
            assert torch.equal(loaded[key], value), key


def test_swinunetr_wrong_checkpoint_lists_the_mismatches(tmp_path: Path):
    path = tmp_path / "model_swinvit.pt"
    write_published_swinvit(path)
    state = torch.load(path)["state_dict"]
    del state["module.layers1.0.blocks.0.attn.qkv.weight"]
    state["module.layers2.0.blocks.0.norm1.weight"] = torch.zeros(5)
    state["module.head.weight"] = torch.zeros(3)
    bad = tmp_path / "broken_swinvit.pt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(CmcsegError) as info:
        build_encoder("swinunetr", swin_plan_config(), 2, bad, feature_size=12)
    text = str(info.value)
    assert str(bad) in text
    assert "1 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in text
    assert "layers1.0.blocks.0.attn.qkv.weight" in text and "head.weight" in text
    assert "layers2.0.blocks.0.norm1.weight: (5,) vs (24,)" in text

    with pytest.raises(WeightsMismatchError, match="checkpoint's feature_size is 12"):
        build_encoder("swinunetr", swin_plan_config(), 2, path, feature_size=24)
    with pytest.raises(CmcsegError, match="does not exist"):
        build_encoder("swinunetr", swin_plan_config(), 2, tmp_path / "absent.pt", feature_size=12)


def test_swinunetr_cmc_network_shapes_and_patch_check():
    torch.manual_seed(0)
    plans = tiny_plans(channels=(1, 1), patch=SWIN_PATCH)
    plans["configurations"]["3d_fullres"] = swin_plan_config()
    net = build_cmc_network(plans, "3d_fullres", encoder="swinunetr", encoder_options={"feature_size": 12},
                            shared_encoder=True)
    out = net(tiny_input(channels=(1, 1), patch=SWIN_PATCH))
    scales = net.deep_supervision_scales()
    assert len(scales) == 5 and scales[-1] == [1 / 16] * 3
    for logits in out.logits:
        assert [tuple(t.shape[2:]) for t in logits] == [tuple(int(p * s) for p, s in zip(SWIN_PATCH, sc))
                                                        for sc in scales]
    assert out.bottlenecks[0].shape == (1, 192, 2, 1, 1)
    bad = swin_plan_config()
    bad["patch_size"] = [16, 32, 32]
    with pytest.raises(CmcsegError, match="divisible by 32"):
        build_encoder("swinunetr", bad, 2, feature_size=12)


def test_single_branch_answers_for_each_modality_alone():
    """One network over all modalities: each modality's own prediction is the network on that modality alone (the
    other modalities' channels and FOV masks zeroed), the fused one is the network on all of them."""
    torch.manual_seed(0)
    net = build_cmc_network(tiny_plans(channels=(2, 1)), "3d_fullres", single_branch=True).eval()
    net.set_deep_supervision(False)
    x = tiny_input(channels=(2, 1))
    alone = net.modality_alone(x, 1)
    assert torch.equal(alone[:, 2], x[:, 2]) and torch.equal(alone[:, 4], x[:, 4])  # modality 1 and its FOV mask
    assert not alone[:, [0, 1, 3]].any()  # modality 0's two channels and its FOV mask
    with torch.no_grad():
        fused, heads = net.predict_with_heads(x)
        assert torch.allclose(fused, torch.softmax(net(x).logits[0], 1))
        assert torch.allclose(heads[1], torch.softmax(net(alone).logits[0], 1))
        assert not torch.allclose(heads[0], heads[1])
    branches = build_cmc_network(tiny_plans(channels=(2, 1)), "3d_fullres").eval()
    branches.set_deep_supervision(False)
    with torch.no_grad():
        fused, heads = branches.predict_with_heads(x)
        assert len(heads) == 2 and torch.allclose(fused, branches.fuse(heads, x))
