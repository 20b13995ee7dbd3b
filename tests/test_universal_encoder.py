"""The ``universal`` encoder (U-Net encoder of the CLIP-Driven Universal Model): published checkpoint layout,
skips, decoder, and the plan checks (CPU, a few seconds)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import cmcseg.networks.universal  # noqa: F401 - registers "universal"
from cmcseg.errors import CmcsegError
from cmcseg.networks.encoders import ENCODERS, WeightsMismatchError, build_encoder
from cmcseg.networks.universal import UniversalEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAN = {"patch_size": [32, 32, 32], "architecture": {}}

#: the published UNet3D's encoder (model/Unet.py of ljwztc/CLIP-Driven-Universal-Model): per DownTransition,
#: the (in, out) channels of its two LUConvs; written out here, independently of cmcseg's module.
PUBLISHED_STAGES = {
    "down_tr64": [(1, 32), (32, 64)],
    "down_tr128": [(64, 64), (64, 128)],
    "down_tr256": [(128, 128), (128, 256)],
    "down_tr512": [(256, 256), (256, 512)],
}


def published_backbone_encoder() -> dict[str, Tensor]:
    """Random tensors under the published encoder key names (without ``module.backbone.``), 1 input channel."""
    g = torch.Generator().manual_seed(7)
    state: dict[str, Tensor] = {}
    for stage, convs in PUBLISHED_STAGES.items():
        for i, (c_in, c_out) in enumerate(convs):
            p = f"{stage}.ops.{i}."
            state[p + "conv1.weight"] = torch.randn(c_out, c_in, 3, 3, 3, generator=g)
            state[p + "conv1.bias"] = torch.randn(c_out, generator=g)
            state[p + "bn1.weight"] = torch.rand(c_out, generator=g) + 0.5
            state[p + "bn1.bias"] = torch.randn(c_out, generator=g)
            state[p + "bn1.running_mean"] = torch.randn(c_out, generator=g)
            state[p + "bn1.running_var"] = torch.rand(c_out, generator=g) + 0.5
            state[p + "bn1.num_batches_tracked"] = torch.tensor(1234)
    return state


def write_published_unet(path: Path, encoder: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A file in the layout train.py writes for the DDP-wrapped Universal Model (``{"net": ..., ...}``)."""
    encoder = published_backbone_encoder() if encoder is None else encoder
    net = {f"module.backbone.{k}": v for k, v in encoder.items()}
    # a few keys of the backbone's decoder and of the text/controller heads (ignored by the encoder)
    net["module.backbone.up_tr64.up_conv.weight"] = torch.zeros(128, 128, 2, 2, 2)
    net["module.backbone.up_tr64.ops.0.conv1.weight"] = torch.zeros(64, 192, 3, 3, 3)
    net["module.precls_conv.0.weight"] = torch.ones(64)
    net["module.GAP.3.weight"] = torch.zeros(256, 512, 1, 1, 1)
    net["module.controller.weight"] = torch.zeros(153, 512, 1, 1, 1)
    net["module.organ_embedding"] = torch.zeros(32, 512)
    net["module.text_to_vision.weight"] = torch.zeros(256, 512)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]}
    torch.save({"net": net, "optimizer": optimizer, "scheduler": {"last_epoch": 3}, "epoch": 3}, path)
    return encoder


def test_registered_and_built_through_the_registry():
    assert ENCODERS["universal"] is UniversalEncoder
    enc = build_encoder("universal", PLAN, 2)
    assert isinstance(enc, UniversalEncoder)
    assert (enc.in_channels, enc.fov_channels, enc.image_channels, enc.spatial_dims) == (2, 1, 1, 3)
    assert UniversalEncoder.divisor == 8
    assert enc.output_channels == [64, 128, 256, 512]
    assert enc.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert enc.deep_supervision_scales() == [[1.0] * 3, [0.5] * 3, [0.25] * 3]
    assert sum(p.numel() for p in UniversalEncoder(1).parameters()) == 7_027_776


def test_loads_the_published_layout_strictly(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "unet.pth"
    saved = write_published_unet(path)
    with caplog.at_level("INFO"):
        enc = build_encoder("universal", PLAN, 2, path)
    assert "7 key(s) outside the encoder ignored (5 outside the backbone" in caplog.text
    loaded = enc.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        if key == "down_tr64.ops.0.conv1.weight":  # 1 CT channel -> image channel as is, FOV channel zero
            assert loaded[key].shape == (32, 2, 3, 3, 3)
            assert torch.equal(loaded[key][:, :1], value) and loaded[key][:, 1].abs().sum() == 0
        else:
            assert torch.equal(loaded[key], value), key

    # known answer: with the FOV kernel zero, the skips do not depend on the FOV channel
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 16, 16, 16, generator=g)
    with torch.no_grad():
        ones = enc(torch.cat([image, torch.ones_like(image)], 1))
        zeros = enc(torch.cat([image, torch.zeros_like(image)], 1))
    for a, b in zip(ones, zeros):
        torch.testing.assert_close(a, b)


def test_a_bare_state_dict_under_state_dict_also_loads(tmp_path: Path):
    path = tmp_path / "genesis_like.pt"
    saved = published_backbone_encoder()
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)
    enc = build_encoder("universal", PLAN, 2, path)
    assert torch.equal(enc.state_dict()["down_tr512.ops.1.bn1.running_var"], saved["down_tr512.ops.1.bn1.running_var"])


def test_skips_and_decoder_shapes():
    torch.manual_seed(0)
    enc = build_encoder("universal", PLAN, 2)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        skips = enc(x)
    assert len(skips) == len(enc.output_channels) == len(enc.strides)
    size = [32, 32, 32]
    for skip, channels, stride in zip(skips, enc.output_channels, enc.strides):
        size = [s // st for s, st in zip(size, stride)]
        assert tuple(skip.shape) == (1, channels, *size)
    assert [tuple(s.shape[1:]) for s in skips] == [(64, 32, 32, 32), (128, 16, 16, 16), (256, 8, 8, 8),
                                                   (512, 4, 4, 4)]

    plain = enc.build_decoder(3, deep_supervision=False)
    assert plain.deep_supervision is False
    with torch.no_grad():
        logits = plain(skips)
    assert isinstance(logits, Tensor) and tuple(logits.shape) == (1, 3, 32, 32, 32)

    deep = enc.build_decoder(3, deep_supervision=True)
    assert deep.deep_supervision is True
    assert not any(k.startswith("down_tr") for k in deep.state_dict())  # the encoder is not inside the decoder
    with torch.no_grad():
        outputs = deep(skips)
    assert isinstance(outputs, list) and len(outputs) == len(skips) - 1
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 32, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
    with pytest.raises(CmcsegError, match="not divisible by 8"):
        enc(torch.randn(1, 2, 32, 32, 20))


def test_a_wrong_checkpoint_lists_every_difference(tmp_path: Path):
    encoder = published_backbone_encoder()
    encoder["down_tr128.ops.0.conv_1.weight"] = encoder.pop("down_tr128.ops.0.conv1.weight")
    encoder["down_tr256.ops.1.conv1.bias"] = torch.zeros(255)
    bad = tmp_path / "broken_unet.pth"
    write_published_unet(bad, encoder)
    with pytest.raises(WeightsMismatchError) as info:
        build_encoder("universal", PLAN, 2, bad)
    text = str(info.value)
    assert str(bad) in text
    assert "1 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in text
    assert "    down_tr128.ops.0.conv1.weight" in text  # missing
    assert "    down_tr256.ops.1.conv1.bias: (255,) vs (256,)" in text  # shape conflict
    assert "    down_tr128.ops.0.conv_1.weight" in text  # unexpected
    assert "universal encoder (the U-Net encoder of the CLIP-Driven Universal Model" in text
    assert "2 input channels" in text and "unet.pth" in text

    with pytest.raises(CmcsegError, match="does not exist"):
        build_encoder("universal", PLAN, 2, tmp_path / "absent.pth")


def test_plan_checks_and_options():
    with pytest.raises(CmcsegError, match=r"divisible by 8.*\[32, 32, 20\].*Fix: .*multiples of 8"):
        build_encoder("universal", {"patch_size": [32, 32, 20], "architecture": {}}, 2)
    with pytest.raises(CmcsegError, match=r"3D.*patch_size \[64, 64\] is 2D.*Fix"):
        build_encoder("universal", {"patch_size": [64, 64], "architecture": {}}, 2)
    with pytest.raises(CmcsegError, match=r"takes no options.*\['feature_size'\]"):
        build_encoder("universal", PLAN, 2, feature_size=48)
