"""The MiT (Mix Transformer) backbone of SegFormer, shared by every modality of Any2Seg.

The backbone is transformers' :class:`~transformers.SegformerModel`, built from a
:class:`~transformers.SegformerConfig` that matches one of the published MiT-b0..b5 encoders
(Xie et al., NeurIPS 2021, Table 1), or the ``tiny`` variant used by the tests. It returns the
four stage outputs at strides 4, 8, 16 and 32.

Input convention (one backbone for all modalities): every modality is fed as an
``in_channels``-channel image (3 by default), so that modalities can be stacked in the batch
dimension and share one set of weights. :func:`match_channels` maps a modality with ``c``
channels onto ``in_channels``:

* ``c == in_channels``: unchanged;
* ``c == 1`` (a grey-value modality: MRI sequence, depth, NIR): the channel is **replicated**.
  A pretrained RGB patch embedding then sees the grey image as a grey RGB photo, which is the
  input it was trained on (zero padding would use only the filters of the red channel);
* ``1 < c < in_channels``: zero-padded (the channels carry different information, so copying
  them would invent a channel order);
* ``c > in_channels``: an error.

Pretrained weights only ever come from a local path (``weights=``): a Hugging Face folder
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, e.g. ``nvidia/mit-b0``), a
``.safetensors`` file, or a ``torch.save``'d state dict. Three key layouts are understood and
converted to the one of transformers 5 (``stages.N.blocks.M...``): transformers 5 itself,
transformers 4 (``encoder.block.N.M...``) and the original NVlabs/mmsegmentation MiT checkpoints
(``block1.0.attn.q...``, ``mit_b0.pth``). A checkpoint that does not fit raises
:class:`~cmcseg.networks.encoders.WeightsMismatchError` (a :class:`~cmcseg.errors.CmcsegError`)
listing every missing/unexpected key and shape mismatch, and naming the file.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import SegformerConfig, SegformerModel

from cmcseg.errors import CmcsegError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiTSpec:
    """The architecture numbers of one MiT encoder (SegFormer paper, Table 1)."""

    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_attention_heads: tuple[int, int, int, int]
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    #: the all-MLP decoder width SegFormer uses with this encoder
    decoder_hidden_size: int = 256
    drop_path_rate: float = 0.1


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)

#: variant name -> architecture. ``tiny`` is not published; it keeps tests fast.
MIT_VARIANTS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2), _HEADS, decoder_hidden_size=256),
    "mit_b1": MiTSpec(_WIDE, (2, 2, 2, 2), _HEADS, decoder_hidden_size=256),
    "mit_b2": MiTSpec(_WIDE, (3, 4, 6, 3), _HEADS, decoder_hidden_size=768),
    "mit_b3": MiTSpec(_WIDE, (3, 4, 18, 3), _HEADS, decoder_hidden_size=768),
    "mit_b4": MiTSpec(_WIDE, (3, 8, 27, 3), _HEADS, decoder_hidden_size=768),
    "mit_b5": MiTSpec(_WIDE, (3, 6, 40, 3), _HEADS, decoder_hidden_size=768),
    "tiny": MiTSpec((8, 16, 32, 64), (1, 1, 1, 1), (1, 1, 2, 4), decoder_hidden_size=32, drop_path_rate=0.0),
}

#: the stride of each stage output relative to the input
MIT_STRIDES: tuple[int, int, int, int] = (4, 8, 16, 32)


def mit_spec(variant: str) -> MiTSpec:
    """The :class:`MiTSpec` of ``variant`` (``mit_b0``..``mit_b5``, ``b0``.. or ``tiny``)."""
    key = variant.lower().replace("-", "_")
    key = f"mit_{key}" if re.fullmatch(r"b[0-5]", key) else key
    if key not in MIT_VARIANTS:
        raise CmcsegError(f"unknown MiT variant {variant!r}. Fix: choose one of {sorted(MIT_VARIANTS)}.")
    return MIT_VARIANTS[key]


def mit_config(variant: str = "mit_b0", in_channels: int = 3, num_labels: int = 2) -> SegformerConfig:
    """A :class:`SegformerConfig` for ``variant`` with ``in_channels`` input channels."""
    spec = mit_spec(variant)
    config = SegformerConfig(
        num_channels=in_channels,
        num_encoder_blocks=4,
        hidden_sizes=list(spec.hidden_sizes),
        depths=list(spec.depths),
        num_attention_heads=list(spec.num_attention_heads),
        sr_ratios=list(spec.sr_ratios),
        mlp_ratios=list(spec.mlp_ratios),
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        decoder_hidden_size=spec.decoder_hidden_size,
        drop_path_rate=spec.drop_path_rate,
        output_hidden_states=True,
    )
    config.num_labels = num_labels  # PretrainedConfig's setter: id2label / label2id follow
    return config


def match_channels(images: Tensor, in_channels: int) -> Tensor:
    """Map images ``(..., c, H, W)`` onto ``in_channels`` channels (replicate one channel, zero-pad 2..in-1).

    See the module docstring for why grey modalities are replicated rather than zero-padded.
    """
    c = images.shape[-3]
    if c == in_channels:
        return images
    if c > in_channels:
        raise CmcsegError(f"a modality has {c} channels but the backbone takes {in_channels}. "
                          "Fix: build the model with in_channels >= the largest modality's channel count.")
    if c == 1:
        return images.expand(*images.shape[:-3], in_channels, *images.shape[-2:])
    pad = images.new_zeros(*images.shape[:-3], in_channels - c, *images.shape[-2:])
    return torch.cat([images, pad], dim=-3)


class MiTBackbone(nn.Module):
    """SegFormer's MiT encoder: ``forward(x (N, C, H, W))`` gives the 4 stage maps (strides 4..32).

    Attributes: ``variant``, ``in_channels``, ``out_channels`` (per stage) and ``strides``.
    The wrapped transformers model is ``self.mit``.
    """

    def __init__(self, config: SegformerConfig, variant: str = "custom"):
        super().__init__()
        self.variant = variant
        self.in_channels = int(config.num_channels)
        self.out_channels: list[int] = [int(c) for c in config.hidden_sizes]
        self.strides: list[int] = list(MIT_STRIDES)
        self.config = config
        self.mit = SegformerModel(config)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs ``(N, C_s, H/stride_s, W/stride_s)``, highest resolution first."""
        out = self.mit(pixel_values=x, output_hidden_states=True, return_dict=True)
        return list(out.hidden_states)

    def load_weights(self, path: Path | str) -> None:
        """Load pretrained MiT weights from a local file or Hugging Face folder (see :func:`load_mit_weights`)."""
        load_mit_weights(self, path)


def build_mit_backbone(variant: str = "mit_b0", in_channels: int = 3, weights: Path | str | None = None) -> MiTBackbone:
    """Build the MiT encoder ``variant`` for ``in_channels``-channel input; load local ``weights`` if given.

    Nothing is downloaded: without ``weights`` the backbone is randomly initialised.
    """
    backbone = MiTBackbone(mit_config(variant, in_channels), variant=variant)
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


# ------------------------------------------------------------------------------- weight loading
#: stage-level rules from the transformers 4 key layout to transformers 5's (regular expressions)
_HF4_STAGE_RULES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"^encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
)
#: the inverse stage rules, transformers 5 -> 4
_HF5_STAGE_RULES: tuple[tuple[str, str], ...] = (
    (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
)
#: (transformers 4, transformers 5) names inside a block, applied in order in either direction
_HF4_HF5_BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    ("attention.self.query.", "attention.q_proj."),
    ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."),
    ("attention.self.sr.", "attention.sequence_reduction.sequence_reduction."),
    ("attention.self.layer_norm.", "attention.sequence_reduction.layer_norm."),
    ("attention.output.dense.", "attention.o_proj."),
    ("mlp.dense1.", "mlp.fc1."),
    ("mlp.dense2.", "mlp.fc2."),
    (".layer_norm_1.", ".layernorm_before."),
    (".layer_norm_2.", ".layernorm_after."),
)


def _rename_transformers_key(key: str, to_version: int) -> str:
    """A MiT key in transformers 4's layout renamed to 5's (``to_version=5``), or back (``to_version=4``)."""
    stage_rules = _HF4_STAGE_RULES if to_version == 5 else _HF5_STAGE_RULES
    for pattern, repl in stage_rules:
        key = re.sub(pattern, repl, key)
    for old, new in _HF4_HF5_BLOCK_NAMES:
        key = key.replace(old, new) if to_version == 5 else key.replace(new, old)
    return key


#: ordered rules from the original NVlabs / mmsegmentation MiT layout (``kv`` is split separately)
_NVLABS_RULES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed(\d)\.norm\.", r"stages.<\1>.patch_embeddings.layer_norm."),
    (r"^patch_embed(\d)\.proj\.", r"stages.<\1>.patch_embeddings.proj."),
    (r"^block(\d)\.(\d+)\.norm1\.", r"stages.<\1>.blocks.\2.layernorm_before."),
    (r"^block(\d)\.(\d+)\.norm2\.", r"stages.<\1>.blocks.\2.layernorm_after."),
    (r"^block(\d)\.(\d+)\.attn\.q\.", r"stages.<\1>.blocks.\2.attention.q_proj."),
    (r"^block(\d)\.(\d+)\.attn\.proj\.", r"stages.<\1>.blocks.\2.attention.o_proj."),
    (r"^block(\d)\.(\d+)\.attn\.sr\.", r"stages.<\1>.blocks.\2.attention.sequence_reduction.sequence_reduction."),
    (r"^block(\d)\.(\d+)\.attn\.norm\.", r"stages.<\1>.blocks.\2.attention.sequence_reduction.layer_norm."),
    (r"^block(\d)\.(\d+)\.mlp\.", r"stages.<\1>.blocks.\2.mlp."),
    (r"^norm(\d)\.", r"stages.<\1>.layer_norm."),
)

#: key prefixes of wrappers and heads that are not part of the encoder
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "segformer.", "backbone.", "mit.")
_HEAD_PREFIXES = ("classifier.", "decode_head.", "head.", "auxiliary_head.")


def _strip_prefixes(key: str) -> str:
    """``key`` without wrapper prefixes (DDP, torch.compile, SegformerFor*, mmseg's ``backbone.``, ours)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _nvlabs_key(key: str) -> str:
    """One NVlabs key in the transformers 5 layout (stage numbers 1..4 become 0..3)."""
    for pattern, repl in _NVLABS_RULES:
        new = re.sub(pattern, repl, key)
        if new != key:
            return re.sub(r"<(\d)>", lambda m: str(int(m.group(1)) - 1), new)
    return key


def convert_mit_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A MiT checkpoint's tensors renamed to the key layout of transformers 5's ``SegformerModel``.

    Understands transformers 5 and 4 layouts and the original NVlabs/mmseg layout (whose fused
    ``attn.kv`` projection is split into ``k_proj`` (first half of the rows) and ``v_proj``).
    Classification/decode heads are dropped; anything unrecognised is kept, so that a wrong
    checkpoint shows up as unexpected keys.
    """
    out: dict[str, Tensor] = {}
    for raw_key, value in state.items():
        key = _strip_prefixes(str(raw_key))
        if key.startswith(_HEAD_PREFIXES):
            continue
        if key.startswith("encoder."):
            key = _rename_transformers_key(key, to_version=5)
        elif re.match(r"^(patch_embed\d|block\d|norm\d)\.", key):
            kv = re.match(r"^block(\d)\.(\d+)\.attn\.kv\.(weight|bias)$", key)
            if kv:
                stage, block, kind = int(kv.group(1)) - 1, kv.group(2), kv.group(3)
                half = value.shape[0] // 2
                base = f"stages.{stage}.blocks.{block}.attention"
                out[f"{base}.k_proj.{kind}"] = value[:half]
                out[f"{base}.v_proj.{kind}"] = value[half:]
                continue
            key = _nvlabs_key(key)
        out[key] = value
    return out


def to_transformers4_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers-5-layout MiT state dict in transformers 4's layout (``encoder.block.N.M...``)."""
    return {_rename_transformers_key(key, to_version=4): value for key, value in state.items()}


def _read_weights_file(path: Path) -> tuple[dict[str, Tensor], Path]:
    """The tensors of a local MiT checkpoint (folder, .safetensors or torch file) and the file read."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _read_weights_file(path / name)
        raise CmcsegError(f"{path} holds neither model.safetensors nor pytorch_model.bin. Fix: pass a Hugging Face "
                          "MiT/SegFormer folder or a checkpoint file (nothing is downloaded).")
    if not path.is_file():
        raise CmcsegError(f"MiT weights {path} do not exist. Fix: pass the path of a local checkpoint file or "
                          "Hugging Face folder (nothing is downloaded).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu")), path
        except Exception as e:  # noqa: BLE001 - any failure to read is a problem of the user's file
            raise CmcsegError(f"cannot read MiT weights {path}: {e}. Fix: pass a complete .safetensors file.") from e
    from cmcseg.networks.encoders import read_checkpoint

    return read_checkpoint(path), path


def _adapt_patch_embedding(key: str, value: Tensor, shape: Sequence[int]) -> Tensor | None:
    """Map the first patch embedding ``(out, c, k, k)`` of a checkpoint onto another input channel count.

    One target channel: the kernels are summed over the checkpoint's channels, so a grey image
    gives the response the pretrained model gives to that image as grey RGB. Otherwise channels
    are repeated cyclically and scaled by ``c_ckpt / c_target`` (timm's ``adapt_input_conv`` rule).
    """
    first = ("stages.0.patch_embeddings.proj.weight", "encoder.patch_embeddings.0.proj.weight")
    if key not in first or value.dim() != 4 or len(shape) != 4 or value.shape[0] != shape[0] \
            or tuple(value.shape[2:]) != tuple(shape[2:]):
        return None
    c_ckpt, c_target = int(value.shape[1]), int(shape[1])
    if c_target == 1:
        adapted = value.sum(dim=1, keepdim=True)
    else:
        reps = -(-c_target // c_ckpt)
        adapted = value.repeat(1, reps, 1, 1)[:, :c_target] * (c_ckpt / c_target)
    log.info("MiT patch embedding: %d checkpoint channel(s) mapped onto %d input channel(s)", c_ckpt, c_target)
    return adapted


def _config_hint(path: Path) -> str:
    """What the folder's config.json says about the architecture, to help choose the variant."""
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        return ""
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return ""
    sizes, depths = cfg.get("hidden_sizes"), cfg.get("depths")
    if sizes is None:
        return ""
    known = [name for name, s in MIT_VARIANTS.items() if list(s.hidden_sizes) == sizes and list(s.depths) == depths]
    return (f" {config_file} says hidden_sizes={sizes}, depths={depths}"
            + (f" (variant {known[0]})." if known else "."))


def load_mit_weights(backbone: MiTBackbone, path: Path | str) -> None:
    """Load a local MiT checkpoint into ``backbone`` strictly (after :func:`convert_mit_state_dict`).

    Raises :class:`~cmcseg.networks.encoders.WeightsMismatchError` listing every missing and
    unexpected key and shape mismatch, naming the file. Only the first patch embedding may differ
    in its input channel count (see :func:`_adapt_patch_embedding`).
    """
    from cmcseg.networks.encoders import load_checked

    path = Path(path)
    state, source = _read_weights_file(path)
    converted = convert_mit_state_dict(state)
    if any(k.startswith("encoder.") for k in backbone.mit.state_dict()):  # transformers < 5 names its keys so
        converted = to_transformers4_keys(converted)
    fix = (f"pass weights of the {backbone.variant} encoder, or choose the --backbone variant that matches the "
           f"checkpoint.{_config_hint(path)}")
    load_checked(backbone.mit, converted, source, f"{backbone.variant} MiT backbone", adapt=_adapt_patch_embedding,
                 fix=fix)
    log.info("MiT backbone %s: loaded %d tensors from %s", backbone.variant, len(converted), source)
