"""The ``universal`` encoder: the 3D U-Net encoder of the CLIP-Driven Universal Model (Liu et al., ICCV 2023).

Where the weights come from: the authors' repository (ljwztc/CLIP-Driven-Universal-Model) publishes
``unet.pth``, the Universal Model trained with its ``unet`` backbone (``model/Unet.py``, the Models Genesis
3D U-Net) on abdominal CT. Download it yourself and pass the local path (``--encoder-weights``); nothing is
downloaded here.

Expected file layout: the training checkpoint that the repository's ``train.py`` writes,
``{"net": state_dict, "optimizer": ..., "scheduler": ..., "epoch": ...}``; a bare state dict or one under
``state_dict`` (Models Genesis' ``Genesis_Chest_CT.pt`` uses this one and the same layer names) also works.
Keys look like ``module.backbone.down_tr64.ops.0.conv1.weight``. How a key is read:

* ``module.`` (DistributedDataParallel) and ``_orig_mod.`` are dropped (:func:`strip_wrapper_prefixes`);
* then a leading ``backbone.``. If the file has ``backbone.`` keys, the keys outside it (the text/controller
  heads: ``organ_embedding``, ``text_to_vision``, ``controller``, ``GAP``, ``precls_conv``) are ignored;
* the backbone's decoder (``up_tr256``, ``up_tr128``, ``up_tr64``, ``out_tr``) is ignored too: each branch
  gets a fresh decoder (:meth:`UniversalEncoder.build_decoder`). The ignored keys are counted in the log;
* everything else must be exactly the encoder's ``down_tr64`` ... ``down_tr512`` (strict load).

In-channel rule: the published model reads 1 CT channel; this branch reads its image channels followed by
its FOV mask channel(s). The first convolution (``down_tr64.ops.0.conv1.weight``) is mapped by
:func:`adapt_input_weight`: the pretrained kernel on the image channel(s), zero on the FOV channel(s).

Patch constraint: the encoder max-pools 3 times by 2, so every patch dimension must be divisible by 8
(:attr:`UniversalEncoder.divisor`); :meth:`UniversalEncoder.from_plan` refuses other plans.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.networks.encoders import (
    DecoderSpec,
    ModalityEncoder,
    adapt_input_weight,
    load_checked,
    read_checkpoint,
    register_encoder,
    strip_wrapper_prefixes,
)

log = logging.getLogger(__name__)

#: the published backbone's encoder stages, highest resolution first (``UNet3D.down_tr*``)
STAGE_NAMES: tuple[str, ...] = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
#: the first convolution, whose input channels are mapped onto image + FOV channels
IN_PROJ_KEY = "down_tr64.ops.0.conv1.weight"
#: key prefixes of the published backbone that belong to its decoder (not loaded: the decoder is built fresh)
BACKBONE_DECODER_PARTS: tuple[str, ...] = ("up_tr", "out_tr")


class ContBatchNorm3d(nn.BatchNorm3d):
    """Batch norm that always normalises with the statistics of the current batch, also in eval mode.

    This is the published model's ``ContBatchNorm3d`` (from Models Genesis), so the pretrained weights see
    the normalisation they were trained with. Same parameters and buffers as ``nn.BatchNorm3d`` (so the
    same state-dict keys). Running statistics are only updated in training mode: they never enter the
    output, and updating them in eval mode (as the published code does) would mutate buffers during
    inference.
    """

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        track = self.training and self.track_running_stats
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, True, 0.1 if self.momentum is None else self.momentum, self.eps)


class ConvBNReLU(nn.Module):
    """3x3x3 convolution (bias, padding 1), :class:`ContBatchNorm3d`, ReLU: the published ``LUConv`` with
    ``act='relu'`` (the Universal Model's setting), named ``conv1``/``bn1``/``activation`` as there."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownStage(nn.Module):
    """One encoder stage (the published ``DownTransition`` without its pooling): two :class:`ConvBNReLU` in
    ``ops``, ``in -> 32 * 2**depth -> 64 * 2**depth`` channels."""

    def __init__(self, in_channels: int, depth: int):
        super().__init__()
        mid, out = 32 * 2 ** depth, 64 * 2 ** depth
        self.ops = nn.Sequential(ConvBNReLU(in_channels, mid), ConvBNReLU(mid, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x)


def split_universal_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Split a checkpoint into the encoder's keys (wrapper prefixes dropped), the keys outside the backbone
    (heads) and the backbone decoder's keys; see the module docstring for the rule."""
    stripped = strip_wrapper_prefixes(state)
    has_backbone = any(k.startswith("backbone.") for k in stripped)
    encoder: dict[str, Tensor] = {}
    heads: list[str] = []
    decoder: list[str] = []
    for key, value in stripped.items():
        if has_backbone:
            if not key.startswith("backbone."):
                heads.append(key)
                continue
            key = key[len("backbone."):]
        if key.startswith(BACKBONE_DECODER_PARTS):
            decoder.append(key)
        else:
            encoder[key] = value
    return encoder, heads, decoder


@register_encoder("universal")
class UniversalEncoder(ModalityEncoder):
    """The encoder half of the Universal Model's 3D U-Net (``down_tr64`` ... ``down_tr512``).

    Skips (4, highest resolution first): 64 channels at full resolution, 128 at /2, 256 at /4 and the
    bottleneck, 512 at /8; each stage is two 3x3x3 conv + :class:`ContBatchNorm3d` + ReLU, and a 2x2x2 max
    pool comes before every stage but the first (as the published ``DownTransition``, which pools after its
    skip except at depth 3). Widths are fixed (the published model has no width option).
    """

    #: each patch dimension must be a multiple of this (3 max pools by 2)
    divisor: int = 8
    spatial_dims: int = 3

    def __init__(self, in_channels: int, fov_channels: int = 1):
        super().__init__()
        self.in_channels, self.fov_channels = int(in_channels), int(fov_channels)
        self.spatial_dims = 3
        self.down_tr64 = DownStage(self.in_channels, 0)
        self.down_tr128 = DownStage(64, 1)
        self.down_tr256 = DownStage(128, 2)
        self.down_tr512 = DownStage(256, 3)
        self.pool = nn.MaxPool3d(2)
        self.output_channels = [64, 128, 256, 512]
        self.strides = [[1, 1, 1]] + [[2, 2, 2]] * 3

    @classmethod
    def from_plan(cls, plan_config: Mapping[str, Any], in_channels: int, fov_channels: int = 1,
                  **options: Any) -> UniversalEncoder:
        """Check the plan's patch (3D, each dimension a multiple of 8) and build the encoder; takes no options."""
        if options:
            raise CmcsegError(f"the universal encoder takes no options (the published U-Net has fixed widths "
                              f"64/128/256/512), got {sorted(options)}. Fix: drop the encoder options.")
        patch = [int(p) for p in plan_config.get("patch_size", [])]
        if patch and len(patch) != 3:
            raise CmcsegError(f"the universal encoder is 3D (the published U-Net is a 3D CT model), but the plan's "
                              f"patch_size {patch} is {len(patch)}D. Fix: train a 3D configuration (3d_fullres) "
                              "with it, or use the residual encoder for 2D.")
        if any(p % cls.divisor for p in patch):
            raise CmcsegError(f"the universal encoder needs every patch dimension divisible by {cls.divisor} (it "
                              f"max-pools 3 times); the plan's patch_size is {patch}. Fix: use the residual "
                              f"encoder, or edit the configuration's patch_size in plans.json to multiples of "
                              f"{cls.divisor}.")
        return cls(in_channels, fov_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 5:
            raise CmcsegError(f"universal encoder: expected a 5D input (batch, channels, z, y, x), got shape "
                              f"{tuple(x.shape)}.")
        if any(int(s) % self.divisor for s in x.shape[2:]):
            raise CmcsegError(f"universal encoder: input spatial shape {tuple(x.shape[2:])} is not divisible by "
                              f"{self.divisor}. Fix: use patch sizes that are multiples of {self.divisor}.")
        skips: list[Tensor] = []
        h = x
        for i, name in enumerate(STAGE_NAMES):
            if i:
                h = self.pool(h)
            h = getattr(self, name)(h)
            skips.append(h)
        return skips

    def decoder_spec(self) -> DecoderSpec:
        """The decoder's settings: nnU-Net's defaults (3x3x3 convs with bias, instance norm, leaky ReLU)."""
        return DecoderSpec(list(self.output_channels), [list(s) for s in self.strides], [[3, 3, 3]] * 4, nn.Conv3d,
                           True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                           {"inplace": True})

    def build_decoder(self, num_classes: int, deep_supervision: bool) -> nn.Module:
        """nnU-Net's ``UNetDecoder`` over these skips (2 convs per stage, He init), as the nnU-Net encoders use.

        Why this decoder: it gives the deep-supervision outputs cmcseg's trainer expects (full resolution
        first, one per skip above the bottleneck) and has a switchable ``deep_supervision``. The published
        decoder (``up_tr*``) has no deep-supervision heads and normalises with batch statistics; its weights
        are not loaded. It uses instance norm, so predictions do not depend on what else is in the batch.
        """
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        decoder = UNetDecoder(self.decoder_spec(), num_classes, 2, deep_supervision)
        decoder.apply(InitWeights_He(1e-2))
        return decoder

    def load_weights(self, path: Path, unsafe_allow_pickle: bool = False) -> None:
        """Load the encoder part of the published ``unet.pth`` (see the module docstring for the layout)."""
        state, heads, decoder = split_universal_keys(read_checkpoint(path, unsafe_allow_pickle))
        if heads or decoder:
            log.info("%s: %d key(s) outside the encoder ignored (%d outside the backbone, e.g. text/controller "
                     "heads; %d of the backbone's decoder)", path, len(heads) + len(decoder), len(heads),
                     len(decoder))

        def adapt(key: str, value: Tensor, shape: Sequence[int]) -> Tensor | None:
            return adapt_input_weight(value, shape, self.image_channels) if key == IN_PROJ_KEY else None

        hint = ""
        if any("swinViT" in k for k in state):
            hint = " This file looks like the Universal Model's SwinUNETR checkpoint, which does not fit this encoder."
        what = (f"universal encoder (the U-Net encoder of the CLIP-Driven Universal Model: {', '.join(STAGE_NAMES)}, "
                f"{self.in_channels} input channels; checkpoint keys shown without 'module.' and 'backbone.')")
        load_checked(self, state, path, what, adapt,
                     fix="pass the Universal Model's published unet.pth (U-Net backbone) or a checkpoint in its "
                         f"layout, or drop --encoder-weights.{hint}")
