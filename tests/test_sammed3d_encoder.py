"""The sammed3d encoder: SAM-Med3D's published checkpoint layout loads strictly, skips and decoder fit, errors name
the fix. A tiny ViT stands in for ViT-B (whose names and shapes are checked without running it)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

import cmcseg.networks.sammed3d  # noqa: F401 - registers "sammed3d"
from cmcseg.errors import CmcsegError
from cmcseg.networks.encoders import WeightsMismatchError, build_encoder
from cmcseg.networks.sammed3d import (
    Attention,
    SAMMed3DEncoder,
    SAMMed3DViT,
    window_partition,
    window_unpartition,
)

#: a tiny configuration: 32^3 pretrained images -> 2^3 tokens; window 3 pads them (as 14 pads 8^3 in ViT-B)
TINY = {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2, "out_chans": 16, "window_size": 3,
        "global_attn_indexes": (1, 3), "feature_size": 4}
PATCH = [32, 32, 32]


def plan(patch=PATCH, conv_op: str = "torch.nn.modules.conv.Conv3d") -> dict:
    return {"patch_size": list(patch),
            "architecture": {"arch_kwargs": {"conv_op": conv_op}, "_kw_requires_import": ["conv_op"]}}


def published_shapes(embed_dim: int, depth: int, num_heads: int, out_chans: int, img_size: int, window_size: int,
                     global_blocks: tuple[int, ...], in_chans: int = 1, mlp_ratio: int = 4) -> dict[str, tuple]:
    """The state-dict names and shapes of SAM-Med3D's ImageEncoderViT3D (segment_anything/modeling/
    image_encoder3D.py of uni-medical/SAM-Med3D), written out from the published code."""
    grid, head_dim, p = img_size // 16, embed_dim // num_heads, 16
    shapes: dict[str, tuple] = {"pos_embed": (1, grid, grid, grid, embed_dim),
                                "patch_embed.proj.weight": (embed_dim, in_chans, p, p, p),
                                "patch_embed.proj.bias": (embed_dim,)}
    for i in range(depth):
        size = grid if i in global_blocks else window_size  # global blocks: the image grid; others: the window
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (embed_dim,), b + "norm1.bias": (embed_dim,),
                       b + "attn.qkv.weight": (3 * embed_dim, embed_dim), b + "attn.qkv.bias": (3 * embed_dim,),
                       b + "attn.proj.weight": (embed_dim, embed_dim), b + "attn.proj.bias": (embed_dim,),
                       b + "attn.rel_pos_d": (2 * size - 1, head_dim), b + "attn.rel_pos_h": (2 * size - 1, head_dim),
                       b + "attn.rel_pos_w": (2 * size - 1, head_dim),
                       b + "norm2.weight": (embed_dim,), b + "norm2.bias": (embed_dim,),
                       b + "mlp.lin1.weight": (mlp_ratio * embed_dim, embed_dim),
                       b + "mlp.lin1.bias": (mlp_ratio * embed_dim,),
                       b + "mlp.lin2.weight": (embed_dim, mlp_ratio * embed_dim), b + "mlp.lin2.bias": (embed_dim,)})
    shapes.update({"neck.0.weight": (out_chans, embed_dim, 1, 1, 1), "neck.1.weight": (out_chans,),
                   "neck.1.bias": (out_chans,), "neck.2.weight": (out_chans, out_chans, 3, 3, 3),
                   "neck.3.weight": (out_chans,), "neck.3.bias": (out_chans,)})
    return shapes


def tiny_published_shapes() -> dict[str, tuple]:
    return published_shapes(32, 4, 2, 16, 32, 3, (1, 3))


def write_published(path: Path, with_args: bool = True) -> dict[str, Tensor]:
    """A SAM-Med3D training-script file for the tiny configuration; returns its image-encoder tensors (no prefix)."""
    gen = torch.Generator().manual_seed(3)
    encoder = {k: torch.randn(s, generator=gen) for k, s in tiny_published_shapes().items()}
    model = {"image_encoder." + k: v for k, v in encoder.items()}
    model.update({"prompt_encoder.point_embeddings.0.weight": torch.randn(1, 16),
                  "prompt_encoder.mask_downscaling.0.weight": torch.randn(4, 1, 2, 2, 2),
                  "mask_decoder.iou_token.weight": torch.randn(1, 16)})
    obj: dict = {"epoch": 7, "model_state_dict": model, "best_dice": 0.5, "used_datas": ["a/b"]}
    if with_args:
        obj["args"] = argparse.Namespace(model_type="vit_b_ori", lr=8e-4, device="cuda")
    torch.save(obj, path)
    return encoder


def test_vit_b_has_the_published_names_and_shapes():
    with torch.device("meta"):  # built, never run nor allocated
        vit = SAMMed3DViT()  # the defaults are build_sam3D_vit_b_ori's
        encoder = SAMMed3DEncoder(2)
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert got == published_shapes(768, 12, 12, 384, 128, 14, (2, 5, 8, 11))
    assert got["blocks.0.attn.qkv.weight"] == (2304, 768) and got["blocks.0.attn.rel_pos_d"] == (27, 64)
    assert got["blocks.2.attn.rel_pos_d"] == (15, 64) and got["pos_embed"] == (1, 8, 8, 8, 768)
    assert got["patch_embed.proj.weight"] == (768, 1, 16, 16, 16)
    assert got["neck.0.weight"] == (384, 768, 1, 1, 1) and got["neck.1.weight"] == (384,)
    assert sum(v.numel() for v in vit.parameters()) == 92_924_928
    assert encoder.output_channels == [16, 32, 64, 128, 384] and encoder.skip_blocks == (3, 6, 9)


def test_loads_the_published_layout_into_image_and_fov_channels(tmp_path: Path, caplog):
    path = tmp_path / "sam_med3d_turbo.pth"
    saved = write_published(path)
    with caplog.at_level(logging.INFO, logger="cmcseg.networks.sammed3d"):
        enc = build_encoder("sammed3d", plan(), 2, path, **TINY)
    assert "3 key(s) outside the image encoder ignored (mask_decoder: 1, prompt_encoder: 2)" in caplog.text
    loaded = enc.image_encoder.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        if key == "patch_embed.proj.weight":  # 1 published channel: image channel as is, FOV channel zero
            assert loaded[key].shape == (32, 2, 16, 16, 16)
            assert torch.equal(loaded[key][:, :1], value) and loaded[key][:, 1].abs().sum() == 0
        else:
            assert torch.equal(loaded[key], value), key
    # the FOV channel's zero weights: the branch starts as the published 1-channel encoder on the image
    published = SAMMed3DViT(in_channels=1, **{k: v for k, v in TINY.items() if k != "feature_size"})
    published.load_state_dict(saved)
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = published(image)[0]
        got = enc.image_encoder(torch.cat([image, (torch.rand_like(image) > 0.5).float()], 1))[0]
    assert torch.allclose(got, expected, atol=1e-5)
    # also as a bare image-encoder state dict behind DataParallel's "module."
    bare = tmp_path / "bare.pth"
    torch.save({"module." + k: v for k, v in saved.items()}, bare)
    enc.load_weights(bare)
    assert torch.equal(enc.image_encoder.state_dict()["neck.2.weight"], saved["neck.2.weight"])


def test_skips_and_decoder_for_a_32_cube():
    torch.manual_seed(0)
    enc = build_encoder("sammed3d", plan(), 2, **TINY)
    assert enc.in_channels == 2 and enc.fov_channels == 1 and enc.spatial_dims == 3
    assert enc.output_channels == [4, 8, 16, 32, 16]
    assert enc.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    x = torch.randn(1, 2, 32, 32, 32)
    skips = enc(x)
    assert [tuple(s.shape) for s in skips] == [(1, 4, 32, 32, 32), (1, 8, 16, 16, 16), (1, 16, 8, 8, 8),
                                               (1, 32, 4, 4, 4), (1, 16, 2, 2, 2)]
    assert enc.deep_supervision_scales() == [[1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3]
    decoder = enc.build_decoder(3, deep_supervision=True)
    out = decoder(skips)
    assert [tuple(t.shape) for t in out] == [(1, 3, 32, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8),
                                             (1, 3, 4, 4, 4)]
    decoder.deep_supervision = False
    assert tuple(decoder(skips).shape) == (1, 3, 32, 32, 32)
    assert tuple(enc.build_decoder(2, deep_supervision=False)(skips).shape) == (1, 2, 32, 32, 32)
    decoder(skips).square().mean().backward()  # the relative tables (an attention mask) are trained too
    for block in enc.image_encoder.blocks:
        assert block.attn.rel_pos_d.grad is not None and block.attn.rel_pos_d.grad.abs().sum() > 0
    assert enc.image_encoder.pos_embed.grad is not None and enc.encoder1.layer.conv1.conv.weight.grad is not None


def test_other_patch_resizes_positions_and_pretrained_patch_uses_them_as_they_are():
    enc = SAMMed3DEncoder(2, **TINY)
    vit = enc.image_encoder
    assert vit.position_embedding((2, 2, 2)) is vit.pos_embed
    with torch.no_grad():
        vit.pos_embed.fill_(0.25)
    resized = vit.position_embedding((3, 2, 4))
    assert resized.shape == (1, 3, 2, 4, 32) and torch.allclose(resized, torch.full_like(resized, 0.25))
    skips = enc(torch.randn(1, 2, 48, 48, 48))  # 3^3 tokens: pos_embed and global relative tables resized
    assert tuple(skips[-1].shape) == (1, 16, 3, 3, 3) and tuple(skips[3].shape) == (1, 32, 6, 6, 6)
    with pytest.raises(CmcsegError, match="cubic token grid"):
        enc(torch.randn(1, 2, 48, 32, 64))
    anisotropic = build_encoder("sammed3d", plan([48, 32, 64]), 2, rel_pos_mode="decomposed", **TINY)
    assert tuple(anisotropic(torch.randn(1, 2, 48, 32, 64))[-1].shape) == (1, 16, 3, 2, 4)


def test_pos_embed_of_another_grid_is_resized_on_load(tmp_path: Path):
    path = tmp_path / "grid4.pth"
    write_published(path)
    obj = torch.load(path, weights_only=False)
    obj["model_state_dict"]["image_encoder.pos_embed"] = torch.full((1, 4, 4, 4, 32), 0.5)
    torch.save(obj, path)
    enc = build_encoder("sammed3d", plan(), 2, path, **TINY)
    assert torch.allclose(enc.image_encoder.pos_embed, torch.full((1, 2, 2, 2, 32), 0.5))


@pytest.mark.parametrize("mode, grid", [("published", (3, 3, 3)), ("decomposed", (2, 3, 2))])
def test_attention_adds_the_relative_positions(mode: str, grid: tuple[int, int, int]):
    """Known answer, one token pair at a time: logits(i, j) = q_i.k_j / sqrt(c) + the relative terms. "decomposed":
    q_i.(Rd[di - dj] + Rh[hi - hj] + Rw[wi - wj]). "published", what SAM-Med3D's add_decomposed_rel_pos computes
    (its broadcast axes sit one place off): q(di,hi,wi).Rd[di - wj] + q(di,hi,dj).Rh[hi - wj] + q(di,hi,hj).Rw[hj - wj].
    """
    torch.manual_seed(1)
    dim, heads = 8, 2
    attn = Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=grid, rel_pos_mode=mode)
    with torch.no_grad():
        for p in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
            p.normal_()
    x = torch.randn(1, *grid, dim)
    coords = [(d, h, w) for d in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    index = {c: i for i, c in enumerate(coords)}
    qkv = attn.qkv(x.reshape(-1, dim))
    c = dim // heads
    rd, rh, rw = (lambda o, t=t, n=n: t[o + n - 1] for t, n in zip((attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w),
                                                                     grid))
    outs = []
    for head in range(heads):
        q, k, v = (qkv[:, j * dim + head * c: j * dim + (head + 1) * c] for j in range(3))
        logits = torch.empty(len(coords), len(coords))
        for i, (di, hi, wi) in enumerate(coords):
            for j, (dj, hj, wj) in enumerate(coords):
                if mode == "decomposed":
                    rel = q[i] @ (rd(di - dj) + rh(hi - hj) + rw(wi - wj))
                else:
                    rel = (q[i] @ rd(di - wj) + q[index[(di, hi, dj)]] @ rh(hi - wj)
                           + q[index[(di, hi, hj)]] @ rw(hj - wj))
                logits[i, j] = q[i] @ k[j] / c ** 0.5 + rel
        outs.append(logits.softmax(-1) @ v)
    expected = attn.proj(torch.cat(outs, dim=1)).reshape(1, *grid, dim)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_window_partition_pads_and_round_trips():
    x = torch.arange(2 * 2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 2, 3, 4, 5)
    windows, padded = window_partition(x, 3)
    assert padded == (3, 3, 6) and windows.shape == (2 * 2, 3, 3, 3, 5)
    assert torch.equal(windows[1, :2, :, :1], x[0, :, :, 3:4])  # second window of the first image: w from 3
    assert windows[1, 2].abs().sum() == 0  # padded depth
    assert torch.equal(window_unpartition(windows, 3, padded, (2, 3, 4)), x)


def test_mismatching_checkpoint_lists_every_difference(tmp_path: Path):
    path = tmp_path / "sam_med3d.pth"
    write_published(path, with_args=False)
    obj = torch.load(path)
    state = obj["model_state_dict"]
    state["image_encoder.blocks.0.attn.qkv_renamed.weight"] = state.pop("image_encoder.blocks.0.attn.qkv.weight")
    state["image_encoder.neck.1.weight"] = torch.zeros(5)
    bad = tmp_path / "broken_sam_med3d.pth"
    torch.save(obj, bad)
    with pytest.raises(WeightsMismatchError) as info:
        build_encoder("sammed3d", plan(), 2, bad, **TINY)
    text = str(info.value)
    assert str(bad) in text and "SAM-Med3D image encoder of the sammed3d encoder (embed_dim 32" in text
    assert "1 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in text
    assert "    blocks.0.attn.qkv.weight" in text and "    blocks.0.attn.qkv_renamed.weight" in text
    assert "neck.1.weight: (5,) vs (16,)" in text
    with pytest.raises(WeightsMismatchError, match="This checkpoint shows embed_dim 32, depth 4, out_chans 16"):
        build_encoder("sammed3d", plan(), 2, path, **{**TINY, "embed_dim": 64})
    with pytest.raises(CmcsegError, match="does not exist"):
        build_encoder("sammed3d", plan(), 2, tmp_path / "absent.pth", **TINY)


def test_plan_and_option_errors_name_the_fix():
    with pytest.raises(CmcsegError, match=r"divisible by 16.*\[40, 32, 32\].*multiples of 16 \(e\.g\. \[48, 32, 32\]"):
        build_encoder("sammed3d", plan([40, 32, 32]), 2, **TINY)
    with pytest.raises(CmcsegError, match=r"need a cubic patch.*\[48, 32, 64\].*\[64, 64, 64\].*rel_pos_mode='decomp"):
        build_encoder("sammed3d", plan([48, 32, 64]), 2, **TINY)
    with pytest.raises(CmcsegError, match="3D ViT, but this plan configuration is 2d"):
        build_encoder("sammed3d", plan([32, 32], "torch.nn.modules.conv.Conv2d"), 2, **TINY)
    with pytest.raises(CmcsegError, match=r"unknown option\(s\) \['patch'\]"):
        build_encoder("sammed3d", plan(), 2, patch=8, **TINY)
    with pytest.raises(CmcsegError, match="global_attn_indexes"):
        build_encoder("sammed3d", plan(), 2, **{**TINY, "global_attn_indexes": (2, 5, 8, 11)})
    enc = build_encoder("sammed3d", plan(), 2, **TINY)
    with pytest.raises(CmcsegError, match="not divisible by 16"):
        enc(torch.zeros(1, 2, 24, 32, 32))
