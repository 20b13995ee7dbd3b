"""The ``sammed3d`` encoder: SAM-Med3D's 3D ViT-B image encoder with UNETR-style skips for a U-Net decoder.

Weights: SAM-Med3D (Wang et al., "SAM-Med3D", github.com/uni-medical/SAM-Med3D) publishes ``sam_med3d.pth`` and
``sam_med3d_turbo.pth`` (Hugging Face ``blueyo0/SAM-Med3D``). The model is ``Sam3D`` built by
``build_sam3D_vit_b_ori`` (``segment_anything/build_sam3D.py``) around ``ImageEncoderViT3D``
(``segment_anything/modeling/image_encoder3D.py``): img_size 128, patch 16, 1 input channel, embed_dim 768,
depth 12, 12 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, absolute position embedding (1, 8, 8, 8, 768),
relative positions in every block, window size 14 except the global blocks (2, 5, 8, 11), and a
neck (1x1x1 conv, LayerNorm3d, 3x3x3 conv, LayerNorm3d) to 384 channels. Nothing is downloaded: the file is
read from a local path.

File layout: the training script's ``torch.save`` dict (``epoch``, ``model_state_dict``, optimizer and scheduler
states, ``args`` as an ``argparse.Namespace``, ...). The tensors sit under ``model_state_dict``; the image
encoder's keys start with ``image_encoder.`` (``image_encoder.patch_embed.proj.weight``,
``image_encoder.blocks.0.attn.rel_pos_d``, ``image_encoder.neck.0.weight``, ...), next to ``prompt_encoder.``
and ``mask_decoder.`` keys, which are ignored and counted in the log. ``module.``/``_orig_mod.`` parts are
dropped; a bare image-encoder state dict (no ``image_encoder.`` prefix) is accepted too. The file is read as
data (``weights_only``); the only class allowed beyond cmcseg's usual data types is ``argparse.Namespace``,
a plain attribute bag whose rebuilding runs no code, because the training script stores its ``args`` in the
file.

In-channel rule: the published patch embedding takes 1 channel (grey values); this branch's input is its image
channels followed by its FOV mask channel(s), mapped by :func:`adapt_input_weight` (image channels share the
pretrained kernel, FOV channels start at zero, so the loaded encoder starts exactly as pretrained inside the
field of view).

Patch constraint: every patch dimension must be divisible by 16 (the patch embedding's stride), and with the
default ``rel_pos_mode="published"`` the patch must be cubic: the published code computes its relative position
terms in a way that is only defined on cubic token grids (see :class:`Attention`), and reproducing it exactly is
what makes the loaded encoder the pretrained one. ``rel_pos_mode="decomposed"`` lifts the cube rule at that
price. Sizes other than the pretrained 128^3 work: when the token grid differs from the pretrained 8x8x8, the
absolute position embedding is resized trilinearly and the global blocks' relative position tables linearly at
run time (the latter is the published ``get_rel_pos`` rule; the former is ViTDet's, as the published forward only
accepts the pretrained grid). The parameters keep the published shapes, so a checkpoint always loads strictly;
with a 128x128x128 patch the encoder computes the published forward. Window blocks pad the token grid to a
multiple of 14 as published (a 128^3 patch's 8^3 tokens become one zero-padded 14^3 window), which costs
memory: attention over 2744 tokens in 8 of the 12 blocks.

SAM-Med3D was trained on 128^3 crops at 1.5 mm isotropic spacing, z-score normalised over voxels > 0; plans with
other spacing or normalisation still load, but start further from the pretrained regime.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.networks.encoders import (
    ModalityEncoder,
    UNETRDecoder,
    adapt_input_weight,
    load_checked,
    read_checkpoint,
    register_encoder,
    strip_wrapper_prefixes,
)

log = logging.getLogger(__name__)

#: the key prefix of the image encoder in SAM-Med3D's ``Sam3D`` state dict
IMAGE_ENCODER_PREFIX = "image_encoder."
#: where SAM-Med3D's training script puts the state dict
STATE_KEY = "model_state_dict"


# ----------------------------------------------------------------------------- the ViT (published names)
# Hand-written modules: the published parameter names (attn.qkv, attn.rel_pos_d, mlp.lin1, neck.1.weight, ...)
# have no torch counterpart (nn.MultiheadAttention names its weights in_proj_weight/out_proj and has no relative
# positions), and a strict load of the checkpoint needs exactly these names.
class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of a (B, C, D, H, W) tensor; parameters ``weight``/``bias`` as published."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches to tokens: ``proj`` (Conv3d, kernel = stride = patch), output channels last."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class MLPBlock(nn.Module):
    """The transformer MLP, ``lin1`` -> GELU -> ``lin2`` (the published names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


def rel_pos_table(size: int, rel_pos: Tensor) -> Tensor:
    """(size, size, head_dim): the embedding of each query-key offset along one axis of a ``size`` grid.

    A table of another length than ``2 * size - 1`` is resized linearly first (the published ``get_rel_pos``
    rule for a grid other than the pretrained one).
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    pos = torch.arange(size, device=rel_pos.device)
    return rel_pos[pos[:, None] - pos[None, :] + (size - 1)]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, D, H, W, C) token grid with relative position terms.

    ``rel_pos_d/h/w`` hold ``2 * size - 1`` rows for the grid ``input_size`` they were trained on; each axis gives
    a term ``q . R[offset]`` (unscaled ``q``) added to the logits, computed with ``scaled_dot_product_attention``
    and the terms as its additive mask. ``rel_pos_mode``:

    * ``"published"``: SAM-Med3D's terms as its code computes them. Its 3D port of SAM's 2D
      ``add_decomposed_rel_pos`` inserts the broadcast axes as if the per-axis terms had one dimension fewer, so
      for query (d, h, w) and key (d', h', w') it adds ``q(d,h,w) . R_d[d - w'] + q(d,h,d') . R_h[h - w'] +
      q(d,h,h') . R_w[h' - w']``. That is only defined on cubic grids; it is what the pretrained weights were
      trained with, so it is the default and reproduces the published encoder.
    * ``"decomposed"``: MViTv2's intended ``q . (R_d[d - d'] + R_h[h - h'] + R_w[w - w'])``, defined on any grid;
      the pretrained tables then act differently than in pretraining.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool,
                 input_size: tuple[int, int, int], rel_pos_mode: str = "published"):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos, self.rel_pos_mode = use_rel_pos, rel_pos_mode
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def rel_pos_bias(self, q: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """The (B, heads, N, N) relative-position logits for queries ``q`` (B, heads, N, head_dim)."""
        d, h, w = grid
        b, heads, n, c = q.shape
        r_q = q.reshape(b, heads, d, h, w, c)
        # per axis: (B, heads, d, h, w, k), the query at (d, h, w) against key coordinate k along that axis
        rel_d = torch.einsum("bndhwc,dkc->bndhwk", r_q, rel_pos_table(d, self.rel_pos_d).to(q.dtype))
        rel_h = torch.einsum("bndhwc,hkc->bndhwk", r_q, rel_pos_table(h, self.rel_pos_h).to(q.dtype))
        rel_w = torch.einsum("bndhwc,wkc->bndhwk", r_q, rel_pos_table(w, self.rel_pos_w).to(q.dtype))
        # target layout (B, heads, d, h, w, d', h', w')
        if self.rel_pos_mode == "published":
            if not d == h == w:
                raise CmcsegError(f"sammed3d encoder: the published relative positions need a cubic token grid, got "
                                  f"{grid}. Fix: use a cubic patch (e.g. [128, 128, 128]) or the encoder option "
                                  "rel_pos_mode='decomposed'.")
            bias = (rel_d[:, :, :, :, :, None, None, :] + rel_h[:, :, :, :, None, :, None, :]
                    + rel_w[:, :, :, :, None, None, :, :])
        else:
            bias = rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
        return bias.reshape(b, heads, n, n)

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w, dim = x.shape
        qkv = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        bias = self.rel_pos_bias(q, (d, h, w)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale head_dim ** -0.5, as published
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, dim))


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * windows, window, window, window, C), zero-padding the grid to multiples of
    ``window`` at its end; also returns the padded grid."""
    b, d, h, w, c = x.shape
    pad = [(-s) % window for s in (d, h, w)]
    if any(pad):
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    dp, hp, wp = d + pad[0], h + pad[1], w + pad[2]
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c), (dp, hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int, int],
                       grid: tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`window_partition`, padding removed: (B, D, H, W, C)."""
    dp, hp, wp = padded
    b = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    d, h, w = grid
    return x[:, :d, :h, :w].contiguous()


class Block3D(nn.Module):
    """Pre-norm transformer block (``norm1``, ``attn``, ``norm2``, ``mlp``); window attention if ``window_size``.

    Window blocks attend within ``window_size``^3 windows of the zero-padded grid (padding after ``norm1``, as
    published); their relative tables are sized for the window, a global block's for the pretrained grid.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, use_rel_pos: bool,
                 window_size: int, input_size: tuple[int, int, int], rel_pos_mode: str = "published"):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size, rel_pos_mode)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        if self.window_size > 0:
            grid = (x.shape[1], x.shape[2], x.shape[3])
            windows, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(windows), self.window_size, padded, grid)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SAMMed3DViT(nn.Module):
    """SAM-Med3D's ``ImageEncoderViT3D`` with the published module names: ``patch_embed.proj``, ``pos_embed``,
    ``blocks.<i>`` and ``neck.0..3``.

    ``forward(x, keep)`` returns the neck output (B, out_chans, D/16, H/16, W/16) and the outputs of the blocks
    listed in ``keep`` as (B, embed_dim, D/16, H/16, W/16). Parameters start as published (torch defaults, zero
    position embeddings): the module is meant to be loaded with the pretrained weights.
    """

    def __init__(self, in_channels: int = 1, img_size: int = 128, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 384,
                 qkv_bias: bool = True, use_abs_pos: bool = True, use_rel_pos: bool = True, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), rel_pos_mode: str = "published"):
        super().__init__()
        grid = img_size // patch_size
        self.img_size, self.patch_size = img_size, patch_size
        self.patch_embed = PatchEmbed3D(in_channels, embed_dim, patch_size)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, qkv_bias, use_rel_pos,
                    0 if i in global_attn_indexes else window_size, (grid, grid, grid), rel_pos_mode)
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def position_embedding(self, grid: Sequence[int]) -> Tensor:
        """The absolute position embedding for a token grid, resized trilinearly if it is not the pretrained one."""
        assert self.pos_embed is not None
        if tuple(self.pos_embed.shape[1:4]) == tuple(grid):
            return self.pos_embed
        resized = F.interpolate(self.pos_embed.permute(0, 4, 1, 2, 3), size=tuple(grid), mode="trilinear",
                                align_corners=False)
        return resized.permute(0, 2, 3, 4, 1)

    def forward(self, x: Tensor, keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.position_embedding(x.shape[1:4])
        kept: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in keep:
                kept.append(x.permute(0, 4, 1, 2, 3))
        return self.neck(x.permute(0, 4, 1, 2, 3)), kept


# ------------------------------------------------------------------------------------ checkpoint reading
def read_sammed3d_checkpoint(path: Path, unsafe_allow_pickle: bool = False) -> tuple[dict[str, Tensor], Counter[str]]:
    """The image-encoder tensors of a SAM-Med3D file (keys without ``image_encoder.``), and a count of the
    ignored keys by their first name part (``prompt_encoder``, ``mask_decoder``, ...)."""
    # the training script stores its argparse.Namespace in the file; it rebuilds as a plain attribute bag
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = strip_wrapper_prefixes(read_checkpoint(Path(path), unsafe_allow_pickle))
    if not any(k.startswith(IMAGE_ENCODER_PREFIX) for k in state):
        return state, Counter()  # a bare image-encoder state dict
    encoder = {k[len(IMAGE_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(IMAGE_ENCODER_PREFIX)}
    ignored = Counter(k.split(".", 1)[0] for k in state if not k.startswith(IMAGE_ENCODER_PREFIX))
    return encoder, ignored


def describe_checkpoint(state: Mapping[str, Tensor]) -> str:
    """The ViT hyperparameters a checkpoint's shapes show, for a mismatch message (empty if unreadable)."""
    parts = []
    if "patch_embed.proj.weight" in state:
        parts.append(f"embed_dim {state['patch_embed.proj.weight'].shape[0]}")
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        parts.append(f"depth {max(blocks) + 1}")
    if "neck.0.weight" in state:
        parts.append(f"out_chans {state['neck.0.weight'].shape[0]}")
    if "pos_embed" in state and state["pos_embed"].dim() == 5:
        parts.append(f"pos_embed grid {tuple(state['pos_embed'].shape[1:4])}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ the encoder
@register_encoder("sammed3d")
class SAMMed3DEncoder(ModalityEncoder):
    """SAM-Med3D's image encoder (``image_encoder``, pretrained) with UNETR's skip projections (trained from
    scratch), as MONAI's ``UNETR`` wires them.

    Skips (5, highest resolution first; F = ``feature_size``): ``encoder1(x)`` (F, full resolution, a conv block
    on the input), ``encoder2/3/4`` on the outputs of blocks ``skip_blocks`` (2F at /2, 4F at /4, 8F at /8,
    ``UnetrPrUpBlock``s upsampling the /16 tokens), and the bottleneck: the neck output (``out_chans``, /16).
    The neck rather than the last block's tokens, because it is the pretrained representation SAM-Med3D's mask
    decoder read (normalised by its LayerNorm3d), it has half the channels, and it uses every tensor of the
    published image encoder, so the checkpoint loads strictly. ``skip_blocks`` (0-based) defaults to MONAI's
    choice, the blocks ``depth * k // 4`` for k = 1, 2, 3: 3, 6, 9 of 12 (UNETR's ``hidden_states_out[3/6/9]``).
    """

    #: every patch (and input) dimension must be a multiple of the patch embedding's stride
    divisor: int = 16
    #: the ViT-B of ``build_sam3D_vit_b_ori`` (the published SAM-Med3D / SAM-Med3D-turbo) and UNETR's defaults
    defaults: dict[str, Any] = {
        "img_size": 128, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "out_chans": 384,
        "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True, "window_size": 14,
        "global_attn_indexes": (2, 5, 8, 11), "rel_pos_mode": "published", "skip_blocks": None,
        "feature_size": 16, "norm_name": "instance", "res_block": True, "conv_block": True,
    }

    def __init__(self, in_channels: int, fov_channels: int = 1, **options: Any):
        super().__init__()
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise CmcsegError(f"sammed3d encoder: unknown option(s) {unknown}. Fix: use only {sorted(self.defaults)}.")
        hp = {**self.defaults, **options}
        depth, img_size = int(hp["depth"]), int(hp["img_size"])
        glob = tuple(int(i) for i in hp["global_attn_indexes"])
        skips = hp["skip_blocks"]
        skips = tuple(depth * k // 4 for k in (1, 2, 3)) if skips is None else tuple(int(i) for i in skips)
        problems = []
        if img_size % self.divisor:
            problems.append(f"img_size {img_size} is not a multiple of {self.divisor}")
        if int(hp["embed_dim"]) % int(hp["num_heads"]):
            problems.append(f"embed_dim {hp['embed_dim']} is not divisible by num_heads {hp['num_heads']}")
        if any(not 0 <= i < depth for i in glob):
            problems.append(f"global_attn_indexes {glob} name blocks outside depth {depth}")
        if len(skips) != 3 or len(set(skips)) != 3 or any(not 0 <= i < depth for i in skips):
            problems.append(f"skip_blocks {skips} must be 3 different block indexes below depth {depth}")
        if hp["rel_pos_mode"] not in ("published", "decomposed"):
            problems.append(f"rel_pos_mode {hp['rel_pos_mode']!r} is neither 'published' nor 'decomposed'")
        if problems:
            raise CmcsegError("sammed3d encoder: " + "; ".join(problems) + ". Fix: correct the encoder options.")
        self.hparams = {**hp, "global_attn_indexes": glob, "skip_blocks": skips}
        self.in_channels, self.fov_channels, self.spatial_dims = int(in_channels), int(fov_channels), 3
        self.skip_blocks = skips
        self.image_encoder = SAMMed3DViT(
            in_channels=self.in_channels, img_size=img_size, patch_size=self.divisor, embed_dim=int(hp["embed_dim"]),
            depth=depth, num_heads=int(hp["num_heads"]), mlp_ratio=float(hp["mlp_ratio"]),
            out_chans=int(hp["out_chans"]), qkv_bias=bool(hp["qkv_bias"]), use_abs_pos=bool(hp["use_abs_pos"]),
            use_rel_pos=bool(hp["use_rel_pos"]), window_size=int(hp["window_size"]), global_attn_indexes=glob,
            rel_pos_mode=str(hp["rel_pos_mode"]))
        # UNETR's encoder-side projections; MONAI is imported only here (its import takes seconds)
        from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock

        f, embed, norm = int(hp["feature_size"]), int(hp["embed_dim"]), hp["norm_name"]
        self.feature_size, self.norm_name = f, norm
        self.encoder1 = UnetrBasicBlock(spatial_dims=3, in_channels=self.in_channels, out_channels=f, kernel_size=3,
                                        stride=1, norm_name=norm, res_block=bool(hp["res_block"]))
        # the skip at /2**i upsamples the /16 tokens 4 - i times: a first transposed conv, then 3 - i more layers
        self.encoder2, self.encoder3, self.encoder4 = (
            UnetrPrUpBlock(spatial_dims=3, in_channels=embed, out_channels=f * 2 ** i, num_layer=3 - i, kernel_size=3,
                           stride=1, upsample_kernel_size=2, norm_name=norm, conv_block=bool(hp["conv_block"]),
                           res_block=bool(hp["res_block"])) for i in (1, 2, 3))
        self.output_channels = [f, 2 * f, 4 * f, 8 * f, int(hp["out_chans"])]
        self.strides = [[1, 1, 1]] + [[2, 2, 2]] * 4

    @classmethod
    def from_plan(cls, plan_config: Mapping[str, Any], in_channels: int, fov_channels: int = 1,
                  **options: Any) -> SAMMed3DEncoder:
        patch = [int(p) for p in plan_config.get("patch_size", [])]
        conv_op = str(plan_config.get("architecture", {}).get("arch_kwargs", {}).get("conv_op", ""))
        if len(patch) == 2 or "Conv2d" in conv_op:
            raise CmcsegError(f"the sammed3d encoder is a 3D ViT, but this plan configuration is 2d (patch_size "
                              f"{patch}). Fix: train a 3d configuration (3d_fullres/3d_lowres), or choose an "
                              "encoder that supports 2d (residual, plain).")
        if any(p % cls.divisor for p in patch):
            fixed = [-(-p // cls.divisor) * cls.divisor for p in patch]
            raise CmcsegError(f"the sammed3d encoder needs every patch dimension divisible by {cls.divisor} (its patch "
                              f"embedding stride); the plan's patch_size is {patch}. Fix: edit the configuration's "
                              f"patch_size in plans.json to multiples of {cls.divisor} (e.g. {fixed}; SAM-Med3D was "
                              "pretrained on [128, 128, 128]), or use the residual encoder.")
        if len(set(patch)) > 1 and cls.needs_cubic_grid({**cls.defaults, **options}):
            side = max(patch)
            raise CmcsegError(f"the sammed3d encoder's published relative positions (rel_pos_mode 'published', the "
                              f"pretrained behaviour) need a cubic patch; the plan's patch_size is {patch}. Fix: edit "
                              f"the configuration's patch_size in plans.json to a cube (e.g. {[side] * 3} or the "
                              "pretraining size [128, 128, 128]), or pass the encoder option rel_pos_mode='decomposed' "
                              "(any patch; the pretrained relative tables then act differently than in pretraining).")
        return cls(in_channels, fov_channels=fov_channels, **options)

    @staticmethod
    def needs_cubic_grid(hp: Mapping[str, Any]) -> bool:
        """Whether these options need a cubic token grid: the published relative positions are only defined on
        one, and the global blocks see the whole grid (window blocks always see cubic windows)."""
        return bool(hp.get("use_rel_pos", True) and hp.get("rel_pos_mode") == "published"
                    and tuple(hp.get("global_attn_indexes", ())))

    def forward(self, x: Tensor) -> list[Tensor]:
        if any(int(s) % self.divisor for s in x.shape[2:]):
            raise CmcsegError(f"sammed3d encoder: input spatial shape {tuple(x.shape[2:])} is not divisible by "
                              f"{self.divisor}. Fix: use patch sizes that are multiples of {self.divisor}.")
        bottleneck, hidden = self.image_encoder(x, self.skip_blocks)
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                bottleneck]

    def build_decoder(self, num_classes: int, deep_supervision: bool) -> nn.Module:
        return UNETRDecoder(3, self.output_channels, num_classes, deep_supervision, self.norm_name)

    def load_weights(self, path: Path, unsafe_allow_pickle: bool = False) -> None:
        """Load a SAM-Med3D checkpoint's image encoder into ``image_encoder`` (see the module docstring).

        The patch embedding's input channels are mapped by :func:`adapt_input_weight`; a ``pos_embed`` of another
        grid is resized trilinearly and relative position tables of another length linearly (logged).
        """
        state, ignored = read_sammed3d_checkpoint(path, unsafe_allow_pickle)
        if ignored:
            log.info("%s: %d key(s) outside the image encoder ignored (%s)", path, sum(ignored.values()),
                     ", ".join(f"{n}: {c}" for n, c in sorted(ignored.items())))

        def adapt(key: str, value: Tensor, shape: Sequence[int]) -> Tensor | None:
            if key == "patch_embed.proj.weight":
                return adapt_input_weight(value, shape, self.image_channels)
            if key == "pos_embed" and value.dim() == 5 and len(shape) == 5 and value.shape[-1] == shape[-1]:
                log.info("%s: pos_embed grid %s resized to %s", path, tuple(value.shape[1:4]), tuple(shape[1:4]))
                resized = F.interpolate(value.permute(0, 4, 1, 2, 3).float(), size=tuple(shape[1:4]),
                                        mode="trilinear", align_corners=False)
                return resized.permute(0, 2, 3, 4, 1).to(value.dtype)
            if key.split(".")[-1] in ("rel_pos_d", "rel_pos_h", "rel_pos_w") and value.dim() == 2 \
                    and len(shape) == 2 and value.shape[1] == shape[1]:
                log.info("%s: %s resized from %d to %d rows", path, key, value.shape[0], shape[0])
                resized = F.interpolate(value.t().unsqueeze(0).float(), size=int(shape[0]), mode="linear")
                return resized.squeeze(0).t().to(value.dtype)
            return None

        hp = self.hparams
        found = describe_checkpoint(state)
        load_checked(
            self.image_encoder, state, path,
            f"SAM-Med3D image encoder of the sammed3d encoder (embed_dim {hp['embed_dim']}, depth {hp['depth']}, "
            f"num_heads {hp['num_heads']}, out_chans {hp['out_chans']}, window_size {hp['window_size']}, global "
            f"blocks {hp['global_attn_indexes']}, pos_embed grid {hp['img_size'] // self.divisor}^3; keys read "
            f"from {STATE_KEY!r} under {IMAGE_ENCODER_PREFIX!r})", adapt,
            fix="pass SAM-Med3D's sam_med3d.pth / sam_med3d_turbo.pth (ViT-B: the default options) or a checkpoint "
                "in its layout, and set the encoder options to the checkpoint's."
                + (f" This checkpoint shows {found}." if found else ""))
