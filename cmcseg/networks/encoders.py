"""The encoder registry: one modality branch's encoder, chosen by name, built from the plan.

Every encoder is a :class:`ModalityEncoder`: ``forward(x)`` returns the skips from the highest
resolution down to the bottleneck, ``output_channels``/``strides`` describe them, and
``build_decoder`` makes the decoder that fits them (a U-Net decoder pass with deep supervision).
A new encoder is one class registered by name::

    @register_encoder("mine")
    class MyEncoder(ModalityEncoder):
        ...

Encoders shipped here:

* ``residual`` (default): the encoder of nnU-Net's ``ResidualEncoderUNet`` for the plan, built and
  initialised by nnU-Net's ``get_network_from_plans`` (:func:`plan_network`), trained from scratch;
  the decoder is nnU-Net's ``UNetDecoder``.
* ``plain``: the same for a plan with nnU-Net's ``PlainConvUNet`` topology.
* ``swinunetr``: the encoder half of MONAI's SwinUNETR (``swinViT`` + ``encoder1..4`` +
  ``encoder10``); it loads MONAI's published self-supervised ``model_swinvit.pt`` from a local
  path. Its decoder is SwinUNETR's (``UnetrUpBlock``/``UnetOutBlock``).

Weights only ever come from a local file (``--encoder-weights``); nothing is downloaded. A
checkpoint that does not fit raises :class:`WeightsMismatchError`, which lists every
difference. Input convention: a branch's input is its image channels followed by its
field-of-view (FOV) mask channel(s); see :func:`adapt_input_weight` for how pretrained input
projections with another channel count are mapped.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.plans.plans import Configuration
from cmcseg.serialization import UnsafeFileError, load_torch_file

log = logging.getLogger(__name__)

#: how many entries of each kind a mismatch report lists before it only counts
MAX_LISTED = 20


# ------------------------------------------------------------------------------------- interface
class ModalityEncoder(nn.Module, ABC):
    """One modality branch's encoder.

    Attributes every encoder sets: ``in_channels`` (image + FOV channels), ``fov_channels``,
    ``spatial_dims``, ``output_channels`` (one entry per skip, highest resolution first, the
    bottleneck last) and ``strides`` (per skip, its stride relative to the skip before it; the
    first relative to the input).
    """

    in_channels: int
    fov_channels: int
    spatial_dims: int
    output_channels: list[int]
    strides: list[list[int]]

    @classmethod
    @abstractmethod
    def from_plan(cls, plan_config: Mapping[str, Any], in_channels: int, fov_channels: int = 1,
                  **options: Any) -> ModalityEncoder:
        """Build the encoder for one configuration of plans.json (``plans["configurations"][name]``)."""

    @abstractmethod
    def forward(self, x: Tensor) -> list[Tensor]:
        """Skips from the highest resolution to the bottleneck (``len(output_channels)`` tensors)."""

    @abstractmethod
    def build_decoder(self, num_classes: int, deep_supervision: bool) -> nn.Module:
        """A fresh decoder for these skips: ``decoder(skips)`` gives the logits.

        With ``deep_supervision`` it returns a list, full resolution first, one entry per skip
        above the bottleneck (as nnU-Net's ``UNetDecoder``); otherwise the full-resolution
        tensor. The decoder has a ``deep_supervision`` attribute that may be switched later.
        """

    def load_weights(self, path: Path, unsafe_allow_pickle: bool = False) -> None:
        """Load pretrained weights from a local file (as data only unless ``unsafe_allow_pickle``); encoders
        without a published format refuse."""
        raise CmcsegError(f"the {type(self).__name__} encoder cannot load weights (asked to load {path}). "
                          "Fix: drop --encoder-weights or choose an encoder that loads them.")

    @property
    def image_channels(self) -> int:
        """Input channels that hold image data (the FOV channels come after them)."""
        return self.in_channels - self.fov_channels

    def deep_supervision_scales(self) -> list[list[float]]:
        """The scale of each deep-supervision output relative to the input, full resolution first.

        Same rule as nnU-Net's trainer (``1 / cumprod(strides)``, bottleneck dropped).
        """
        cumulative = np.cumprod(np.asarray(self.strides, dtype=np.float64), axis=0)[:-1]
        return [[float(v) for v in 1.0 / row] for row in cumulative]


E = TypeVar("E", bound=type)

#: name -> encoder class. Open: see :func:`register_encoder`.
ENCODERS: dict[str, type[ModalityEncoder]] = {}


def register_encoder(name: str) -> Callable[[E], E]:
    """Class decorator: make ``build_encoder(name, ...)`` build this encoder class."""

    def register(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, ModalityEncoder)):
            raise TypeError(f"encoder {name!r}: {cls!r} is not a ModalityEncoder subclass")
        existing = ENCODERS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"encoder name {name!r} is already registered for {existing.__qualname__}")
        ENCODERS[name] = cls
        return cls

    return register


def build_encoder(name: str, plan_config: Mapping[str, Any], in_channels: int, weights: Path | str | None = None,
                  *, fov_channels: int = 1, unsafe_allow_pickle: bool = False, **options: Any) -> ModalityEncoder:
    """Build the registered encoder ``name`` for a plan configuration, and load ``weights`` if given.

    ``in_channels`` counts the branch's image channels plus its ``fov_channels`` FOV masks (last).
    ``options`` go to the encoder class (e.g. ``feature_size`` for ``swinunetr``).
    """
    cls = ENCODERS.get(name)
    if cls is None:
        raise CmcsegError(f"unknown encoder {name!r}. Fix: choose one of {sorted(ENCODERS)}.")
    if in_channels <= fov_channels:
        raise CmcsegError(f"encoder {name!r}: in_channels={in_channels} leaves no image channel beside "
                          f"{fov_channels} FOV channel(s).")
    encoder = cls.from_plan(plan_config, in_channels, fov_channels=fov_channels, **options)
    if weights is not None:
        encoder.load_weights(Path(weights), unsafe_allow_pickle=unsafe_allow_pickle)
        log.info("encoder %s: loaded weights from %s", name, weights)
    return encoder


# --------------------------------------------------------------------------------- plan helpers
#: the PlainConvUNet class nnU-Net's default planner names
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
#: ResidualEncoderUNet arguments a PlainConvUNet does not take
_RESIDUAL_ONLY = ("n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels")


def plan_network(plan_config: Mapping[str, Any], in_channels: int, num_classes: int = 1,
                 topology: str | None = None) -> nn.Module:
    """nnU-Net's network for a plan configuration, built and initialised by nnU-Net's ``get_network_from_plans``.

    The plan's class paths are checked first (:meth:`Configuration.network_architecture`). ``topology="plain"``
    builds a PlainConvUNet from a residual-encoder plan (a block per stage becomes a convolution per stage).
    """
    config = plan_config if isinstance(plan_config, Configuration) else Configuration("the plan", plan_config)
    name, kwargs = config.network_architecture()
    if topology == "plain" and "n_blocks_per_stage" in kwargs:
        name, kwargs["n_conv_per_stage"] = PLAIN_CONV_UNET, kwargs["n_blocks_per_stage"]
        kwargs = {k: v for k, v in kwargs.items() if k not in _RESIDUAL_ONLY}
    return get_network_from_plans(name, kwargs, [], in_channels, num_classes, allow_init=True,
                                  deep_supervision=True)


def _spatial_dims(conv_op: type) -> int:
    """2 or 3, from the plan's conv op."""
    for dims, op in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if conv_op is op or (isinstance(conv_op, type) and issubclass(conv_op, op)):
            return dims
    raise CmcsegError(f"unsupported conv_op {conv_op!r} in plans.json; expected torch.nn.Conv2d or Conv3d.")


@dataclass(frozen=True)
class DecoderSpec:
    """What nnU-Net's ``UNetDecoder`` reads from its encoder, as plain data.

    Passing this instead of the encoder module keeps the encoder's parameters out of each
    decoder's state dict (``UNetDecoder`` stores what it is given as ``self.encoder``).
    """

    output_channels: list[int]
    strides: list[list[int]]
    kernel_sizes: list[Any]
    conv_op: type
    conv_bias: bool
    norm_op: type | None
    norm_op_kwargs: dict | None
    dropout_op: type | None
    dropout_op_kwargs: dict | None
    nonlin: type | None
    nonlin_kwargs: dict | None


# ------------------------------------------------------------------------------- weight loading
class WeightsMismatchError(CmcsegError):
    """A checkpoint's keys or shapes do not fit the encoder; lists every difference (up to ``MAX_LISTED`` each)."""

    def __init__(self, path: Path | str, what: str, missing: Sequence[str], unexpected: Sequence[str],
                 shape_mismatches: Sequence[tuple[str, tuple, tuple]], fix: str = ""):
        self.path, self.what = str(path), what
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.shape_mismatches = list(shape_mismatches)
        lines = [f"{path}: the checkpoint does not fit the {what}: {len(self.missing)} missing key(s), "
                 f"{len(self.unexpected)} unexpected key(s), {len(self.shape_mismatches)} shape mismatch(es)."]
        for title, items in (("missing (the encoder has them, the checkpoint does not)", self.missing),
                             ("unexpected (the checkpoint has them, the encoder does not)", self.unexpected),
                             ("shape mismatches (checkpoint vs encoder)",
                              [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.shape_mismatches])):
            if items:
                lines.append(f"  {title}, {len(items)}:")
                lines += [f"    {item}" for item in items[:MAX_LISTED]]
                if len(items) > MAX_LISTED:
                    lines.append(f"    ... and {len(items) - MAX_LISTED} more")
        lines.append("Fix: " + (fix or "pass a checkpoint written for this encoder and these settings "
                                       "(feature size, stages, channels), or drop --encoder-weights."))
        super().__init__("\n".join(lines))


def read_checkpoint(path: Path, unsafe_allow_pickle: bool = False) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from the usual containers.

    Accepts a bare state dict or one under ``state_dict`` / ``network_weights`` (nnU-Net) /
    ``model`` / ``network`` / ``net`` (the CLIP-Driven Universal Model) / ``model_state_dict`` (SAM-Med3D).
    Reads as data only (:func:`cmcseg.serialization.load_torch_file`:
    tensors, plain values and NumPy data, which covers nnU-Net's checkpoints); a file that holds
    other Python objects is refused unless ``unsafe_allow_pickle`` (``--unsafe-allow-pickle``).
    """
    path = Path(path)
    if not path.is_file():
        raise CmcsegError(f"encoder weights file {path} does not exist. Fix: pass the path of a local checkpoint "
                          "(nothing is downloaded).")
    try:
        obj = load_torch_file(path, "encoder weights file", unsafe_allow_pickle=unsafe_allow_pickle)
    except UnsafeFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read is a problem of the user's file
        raise CmcsegError(f"cannot read encoder weights {path}: {str(e).rstrip('.')}. Fix: pass a file written by "
                          "torch.save.") from e
    for key in ("state_dict", "network_weights", "model", "network", "net", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise CmcsegError(f"{path} holds no state dict (a mapping of names to tensors). Fix: pass a checkpoint "
                          "written with torch.save(model.state_dict()) or a {'state_dict': ...} dict.")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) parts of every key."""
    out = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
        out[".".join(parts)] = value
    return out


def adapt_input_weight(weight: Tensor, target_shape: Sequence[int], image_channels: int) -> Tensor | None:
    """Map a pretrained input-projection weight ``(out, c_in, *k)`` onto this branch's input channels.

    The branch's input is ``image_channels`` image channels followed by FOV mask channels.

    * same channel count: unchanged;
    * the checkpoint has exactly the image channels (no FOV; e.g. an nnU-Net model on the same
      modality): image weights copied, FOV weights zero;
    * the checkpoint has one channel (MONAI's self-supervised SwinViT, grey-value CT): its kernel
      divided by ``image_channels`` on each image channel, so an image whose channels are all
      equal gives the pretrained response (timm's ``adapt_input_conv`` rule), FOV weights zero.

    Zero FOV weights make the loaded encoder start exactly as pretrained inside the field of view;
    they still receive gradient, so the branch learns to use the mask. Returns ``None`` when the
    shapes cannot be mapped (any other difference).
    """
    target_shape = tuple(int(s) for s in target_shape)
    if weight.dim() != len(target_shape) or weight.shape[0] != target_shape[0] or \
            tuple(weight.shape[2:]) != target_shape[2:]:
        return None
    c_ckpt, c_target = int(weight.shape[1]), target_shape[1]
    if c_ckpt == c_target:
        return weight
    out = weight.new_zeros(target_shape)
    if c_ckpt == image_channels:
        out[:, :image_channels] = weight
    elif c_ckpt == 1:
        out[:, :image_channels] = weight / image_channels
    else:
        return None
    log.info("input projection: %d checkpoint channel(s) mapped onto %d image + %d FOV channel(s)",
             c_ckpt, image_channels, c_target - image_channels)
    return out


def load_checked(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str,
                 adapt: Callable[[str, Tensor, Sequence[int]], Tensor | None] | None = None, fix: str = "") -> None:
    """Load ``state`` into ``module`` strictly, or raise :class:`WeightsMismatchError` listing every difference.

    ``adapt(key, value, target_shape)`` may turn a differently shaped tensor into a fitting one
    (or return ``None``: a shape mismatch).
    """
    target = module.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatches: list[tuple[str, tuple, tuple]] = []
    fitted: dict[str, Tensor] = {}
    for key in sorted(set(target) & set(state)):
        value, shape = state[key], tuple(target[key].shape)
        if tuple(value.shape) != shape:
            adapted = adapt(key, value, shape) if adapt is not None else None
            if adapted is None:
                mismatches.append((key, tuple(state[key].shape), shape))
                continue
            value = adapted
        fitted[key] = value
    if missing or unexpected or mismatches:
        raise WeightsMismatchError(path, what, missing, unexpected, mismatches, fix)
    module.load_state_dict(fitted, strict=True)


# ---------------------------------------------------------------------------- nnU-Net encoders
class _PlanConvEncoder(ModalityEncoder):
    """Shared part of the nnU-Net encoders: the wrapped encoder is ``self.encoder``, as in nnU-Net's UNets.

    That makes this module's state-dict keys (``encoder.stem...``, ``encoder.stages...``) the same
    as the encoder keys of an nnU-Net ``ResidualEncoderUNet``/``PlainConvUNet`` checkpoint.
    """

    #: the state-dict keys of the first convolution (the input projection), as nnU-Net's ``keys_to_in_proj``
    in_proj_keys: tuple[str, ...] = ()

    def __init__(self, encoder: ResidualEncoder | PlainConvEncoder, in_channels: int, fov_channels: int,
                 n_conv_per_stage_decoder: Sequence[int] | int):
        super().__init__()
        self.encoder = encoder
        self.in_channels, self.fov_channels = int(in_channels), int(fov_channels)
        self.spatial_dims = _spatial_dims(encoder.conv_op)
        self.output_channels = list(encoder.output_channels)
        self.strides = [list(s) for s in encoder.strides]
        self.n_conv_per_stage_decoder = n_conv_per_stage_decoder

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)

    def decoder_spec(self) -> DecoderSpec:
        e = self.encoder
        return DecoderSpec(self.output_channels, self.strides, list(e.kernel_sizes), e.conv_op, e.conv_bias,
                           e.norm_op, e.norm_op_kwargs, e.dropout_op, e.dropout_op_kwargs, e.nonlin, e.nonlin_kwargs)

    def build_decoder(self, num_classes: int, deep_supervision: bool) -> nn.Module:
        decoder = UNetDecoder(self.decoder_spec(), num_classes, self.n_conv_per_stage_decoder, deep_supervision)
        decoder.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation
        return decoder

    def load_weights(self, path: Path, unsafe_allow_pickle: bool = False) -> None:
        """Load the encoder part of an nnU-Net or cmcseg checkpoint (any module prefix, e.g. ``encoders.0.``).

        The prefix is the shortest one under which the checkpoint holds this encoder's first key.
        Everything outside ``<prefix>encoder.`` (decoders, heads) is ignored.
        """
        state = strip_wrapper_prefixes(read_checkpoint(path, unsafe_allow_pickle))
        anchor = next(iter(self.state_dict()))
        prefixes = sorted({k[: -len(anchor)] for k in state if k.endswith(anchor)}, key=lambda p: (len(p), p))
        prefix = prefixes[0] if prefixes else ""
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix + "encoder.")}
        if prefix:
            log.info("%s: encoder weights taken from the keys under %r", path, prefix)
        ignored = len(state) - len(sub)
        if ignored:
            log.info("%s: %d key(s) outside the encoder ignored (decoder, heads, other branches)", path, ignored)

        def adapt(key: str, value: Tensor, shape: Sequence[int]) -> Tensor | None:
            return adapt_input_weight(value, shape, self.image_channels) if key in self.in_proj_keys else None

        load_checked(self, sub, path, f"{type(self).__name__} ({self.in_channels} input channels, "
                                      f"features {self.output_channels})", adapt,
                     fix="pass an nnU-Net/cmcseg checkpoint trained with the same plan (features, stages, "
                         "blocks per stage), or drop --encoder-weights.")


@register_encoder("residual")
class ResidualModalityEncoder(_PlanConvEncoder):
    """nnU-Net's residual encoder (``ResidualEncoderUNet``'s encoder) from the plan; trained from scratch."""

    in_proj_keys = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")

    @classmethod
    def from_plan(cls, plan_config: Mapping[str, Any], in_channels: int, fov_channels: int = 1,
                  **options: Any) -> ResidualModalityEncoder:
        if options:
            raise CmcsegError(f"the residual encoder takes no options, got {sorted(options)}.")
        arch = plan_config["architecture"]
        if "n_blocks_per_stage" not in arch.get("arch_kwargs", {}):
            raise CmcsegError(
                f"the plan's network ({arch.get('network_class_name')}) has no "
                "n_blocks_per_stage, so it is not a residual-encoder topology. Fix: train with --encoder plain, "
                "or replan with the default ResEnc topology.")
        network = plan_network(plan_config, in_channels)
        return cls(network.encoder, in_channels, fov_channels, arch["arch_kwargs"]["n_conv_per_stage_decoder"])


@register_encoder("plain")
class PlainModalityEncoder(_PlanConvEncoder):
    """nnU-Net's plain convolutional encoder (``PlainConvUNet``'s encoder) from the plan; trained from scratch."""

    in_proj_keys = ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.all_modules.0.weight")

    @classmethod
    def from_plan(cls, plan_config: Mapping[str, Any], in_channels: int, fov_channels: int = 1,
                  **options: Any) -> PlainModalityEncoder:
        if options:
            raise CmcsegError(f"the plain encoder takes no options, got {sorted(options)}.")
        network = plan_network(plan_config, in_channels, topology="plain")
        return cls(network.encoder, in_channels, fov_channels,
                   plan_config["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"])


# ------------------------------------------------------------------------------------ SwinUNETR
#: keys of MONAI's published self-supervised checkpoints that are not part of the SwinViT encoder:
#: the pretraining's final LayerNorm (``norm.*``) and, in files written by the Pretrain script,
#: its SSL heads. They are skipped (and counted in the log), not reported as unexpected.
_SWIN_SSL_EXTRAS = ("norm.", "rotation_head.", "rotation_pre.", "contrastive_head.", "contrastive_pre.", "conv.")
#: parts of a full (fine-tuned) SwinUNETR state dict beside ``swinViT``; skipped, only the transformer is loaded.
_SWINUNETR_PARTS = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.", "decoder", "out.")


def swin_checkpoint_to_monai(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a SwinViT checkpoint's keys to MONAI ``SwinTransformer`` state-dict keys.

    MONAI's published ``model_swinvit.pt`` (research-contributions SwinUNETR/Pretrain, loaded by
    ``SwinUNETR.load_from``) is ``{"state_dict": {...}}`` with keys such as
    ``module.patch_embed.proj.weight``, ``module.layers1.0.blocks.0.attn.qkv.weight``,
    ``module.layers1.0.blocks.0.mlp.fc1.weight``, ``module.layers1.0.downsample.reduction.weight``
    and ``module.norm.weight``. The mapping: drop ``module.`` (DDP), drop a ``swin_vit.``/``swinViT.``
    prefix (files from the Pretrain script / full SwinUNETR), and ``mlp.fc1``/``mlp.fc2`` become
    MONAI's ``mlp.linear1``/``mlp.linear2`` (what ``SwinTransformerBlock.load_from`` does).

    Returns the renamed transformer keys and the keys skipped as not part of the transformer.
    """
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in strip_wrapper_prefixes(state).items():
        if key.startswith(("swin_vit.", "swinViT.")):
            key = key.split(".", 1)[1]
        elif key.startswith(_SWINUNETR_PARTS) or key.startswith(_SWIN_SSL_EXTRAS):
            skipped.append(key)
            continue
        key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if key.startswith(_SWIN_SSL_EXTRAS):
            skipped.append(key)
            continue
        out[key] = value
    return out, skipped


@register_encoder("swinunetr")
class SwinUNETREncoder(ModalityEncoder):
    """The encoder half of MONAI's SwinUNETR: SwinViT + ``encoder1..4`` + ``encoder10``.

    Skips (6, highest resolution first): ``encoder1(x)`` (F, full), ``encoder2(h0)`` (F, /2),
    ``encoder3(h1)`` (2F, /4), ``encoder4(h2)`` (4F, /8), ``h3`` (8F, /16) and the bottleneck
    ``encoder10(h4)`` (16F, /32), with ``h0..h4`` SwinViT's hidden states and F ``feature_size``,
    wired exactly as ``SwinUNETR.forward``. Each spatial size must be divisible by 32.
    Only ``swinViT`` loads pretrained weights; the convolutional blocks train from scratch.
    """

    #: SwinUNETR's defaults (feature_size 48 is the published self-supervised checkpoint's)
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    norm_name: str = "instance"
    dropout_path_rate: float = 0.0
    use_checkpoint: bool = False
    patch_size: int = 2
    #: the hyperparameters above that ``build_encoder(..., **options)`` may set
    options: tuple[str, ...] = ("feature_size", "depths", "num_heads", "window_size", "norm_name",
                                "dropout_path_rate", "use_checkpoint", "patch_size")

    def __init__(self, in_channels: int, spatial_dims: int = 3, fov_channels: int = 1, **hyper: Any):
        super().__init__()
        for name, value in hyper.items():
            if name not in self.options:
                raise CmcsegError(f"swinunetr encoder: unknown option {name!r}. Fix: use one of {self.options}.")
            setattr(self, name, value)
        self.in_channels, self.fov_channels, self.spatial_dims = int(in_channels), int(fov_channels), int(spatial_dims)
        # Built through SwinUNETR so the transformer's configuration and parameter names are MONAI's own;
        # its decoder half is dropped (build_decoder makes one per branch). MONAI is imported only here: its
        # import takes seconds, and the residual encoder (the default) does not need it.
        from monai.networks.nets import SwinUNETR

        full = SwinUNETR(in_channels=in_channels, out_channels=1, patch_size=self.patch_size, depths=self.depths,
                         num_heads=self.num_heads, window_size=self.window_size, feature_size=self.feature_size,
                         norm_name=self.norm_name, dropout_path_rate=self.dropout_path_rate,
                         use_checkpoint=self.use_checkpoint, spatial_dims=spatial_dims)
        self.normalize = full.normalize
        self.swinViT = full.swinViT
        self.encoder1, self.encoder2, self.encoder3 = full.encoder1, full.encoder2, full.encoder3
        self.encoder4, self.encoder10 = full.encoder4, full.encoder10
        f = self.feature_size
        self.output_channels = [f, f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.strides = [[1] * spatial_dims] + [[self.patch_size] * spatial_dims] * 5
        self.divisor = self.patch_size ** 5

    @classmethod
    def from_plan(cls, plan_config: Mapping[str, Any], in_channels: int, fov_channels: int = 1,
                  **options: Any) -> SwinUNETREncoder:
        patch = [int(p) for p in plan_config.get("patch_size", [])]
        divisor = int(options.get("patch_size", cls.patch_size)) ** 5
        if patch and any(p % divisor for p in patch):
            raise CmcsegError(f"the swinunetr encoder needs every patch dimension divisible by {divisor}; the plan's "
                              f"patch_size is {patch}. Fix: use the residual encoder, or edit the configuration's "
                              f"patch_size in plans.json to multiples of {divisor}.")
        spatial_dims = len(patch) if patch else 3
        return cls(in_channels, spatial_dims=spatial_dims, fov_channels=fov_channels, **options)

    def forward(self, x: Tensor) -> list[Tensor]:
        if any(int(s) % self.divisor for s in x.shape[2:]):
            raise CmcsegError(f"swinunetr encoder: input spatial shape {tuple(x.shape[2:])} is not divisible by "
                              f"{self.divisor}. Fix: use patch sizes that are multiples of {self.divisor}.")
        hidden = self.swinViT(x, self.normalize)
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], self.encoder10(hidden[4])]

    def build_decoder(self, num_classes: int, deep_supervision: bool) -> nn.Module:
        return UNETRDecoder(self.spatial_dims, self.output_channels, num_classes, deep_supervision, self.norm_name)

    def load_weights(self, path: Path, unsafe_allow_pickle: bool = False) -> None:
        """Load a SwinViT checkpoint in MONAI's published layout into ``swinViT`` (see
        :func:`swin_checkpoint_to_monai`).

        The patch embedding's input channels are mapped by :func:`adapt_input_weight`.
        """
        state, skipped = swin_checkpoint_to_monai(read_checkpoint(path, unsafe_allow_pickle))
        if skipped:
            log.info("%s: %d key(s) outside the SwinViT transformer skipped (e.g. %s)", path, len(skipped), skipped[0])

        def adapt(key: str, value: Tensor, shape: Sequence[int]) -> Tensor | None:
            return adapt_input_weight(value, shape, self.image_channels) if key == "patch_embed.proj.weight" else None

        embed = state.get("patch_embed.proj.weight")
        found = f" This checkpoint's feature_size is {embed.shape[0]}." if embed is not None else ""
        load_checked(self.swinViT, state, path, f"SwinViT of the swinunetr encoder (feature_size {self.feature_size}, "
                                                f"depths {tuple(self.depths)}; keys in MONAI's names: 'module.' "
                                                "dropped, mlp.fc1/fc2 read as mlp.linear1/linear2)", adapt,
                     fix="pass MONAI's self-supervised model_swinvit.pt (feature_size 48) or a checkpoint in its "
                         f"layout, and set the encoder option feature_size to the checkpoint's.{found}")


class UNETRDecoder(nn.Module):
    """UNETR's decoder: a ``UnetrUpBlock`` per skip from the bottleneck up, with a ``UnetOutBlock`` per output level.

    ``channels`` are the encoder's ``output_channels`` (highest resolution first, the bottleneck last):
    SwinUNETR's (:class:`SwinUNETREncoder`) and the UNETR-style skips of a ViT (``sammed3d``) alike. With deep
    supervision ``forward(skips)`` gives one logits tensor per skip above the bottleneck, full resolution first;
    otherwise the full-resolution logits, exactly SwinUNETR's and UNETR's output path.
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int], num_classes: int, deep_supervision: bool,
                 norm_name: str | tuple = "instance"):
        from monai.networks.blocks import UnetOutBlock, UnetrUpBlock  # only for these encoders (a slow import)

        super().__init__()
        self.deep_supervision = deep_supervision
        up = list(channels)[::-1]  # bottleneck, then each up block's output
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(spatial_dims=spatial_dims, in_channels=up[i], out_channels=up[i + 1], kernel_size=3,
                         upsample_kernel_size=2, norm_name=norm_name, res_block=True) for i in range(len(up) - 1))
        # seg_layers[0] is the full-resolution head (the network's ``out``), then /2, /4, ...
        self.seg_layers = nn.ModuleList(
            UnetOutBlock(spatial_dims=spatial_dims, in_channels=c, out_channels=num_classes) for c in up[:0:-1])

    def forward(self, skips: list[Tensor]) -> Tensor | list[Tensor]:
        x = skips[-1]
        outputs: list[Tensor] = []
        for i, block in enumerate(self.up_blocks):
            x = block(x, skips[-(i + 2)])
            if self.deep_supervision:
                outputs.append(self.seg_layers[len(self.up_blocks) - 1 - i](x))
        if not self.deep_supervision:
            return self.seg_layers[0](x)
        return outputs[::-1]
