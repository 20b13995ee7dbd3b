"""The Any2Seg networks: one encoder shared by the modalities, MFF at every stage, one decoder (the U-Net also
fuses at the input, ``fusion_stage="input"``, see :class:`Any2SegUNet`).

``network(images (B, M, C, *spatial), present (B, M) or (M,))`` segments from any non-empty
subset of the M modalities it was built for:

1. the present ``(b, m)`` images go through the ONE encoder together, stacked in the batch
   (absent images are never read, so they cannot influence anything, BatchNorm included);
2. per stage, :func:`~cmcseg.networks.any2seg_fusion.modality_agnostic_feature_fusion` fuses the present
   modalities' features of each sample;
3. one decoder turns the fused stages into logits.

Two networks share these steps (:class:`Any2SegNetwork`):

* :class:`Any2SegModel` (2D, the paper's): a SegFormer MiT backbone and SegFormer's all-MLP head
  (transformers' ``SegformerDecodeHead``: per-stage linear projection to ``decoder_hidden_size``,
  upsampling to 1/4, concatenation, 1x1 fuse conv + BN + ReLU, dropout, 1x1 classifier), logits
  bilinearly upsampled to the input size;
* :class:`Any2SegUNet` (2D and 3D, the default for volumes): the plan's nnU-Net encoder, MFF on
  every skip, nnU-Net's ``UNetDecoder`` with deep supervision.

The output keeps what the LSCD distillation needs: the per-stage fused maps and the
per-modality maps (zeros where a modality is absent) with the presence mask.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from cmcseg.networks.any2seg_fusion import ModalityAgnosticFusion
from cmcseg.networks.cmc import as_scales, split_modalities
from cmcseg.networks.encoders import ModalityEncoder, build_encoder
from cmcseg.networks.mit import MiTBackbone, build_mit_backbone, match_channels, mit_config


@dataclass
class Any2SegOutput:
    """What an :class:`Any2SegNetwork` returns.

    ``logits`` ``(B, K, *spatial)`` (a list over scales, full resolution first, when a network with deep
    supervision trains); ``fused``: per stage ``(B, C_s, *spatial_s)``; ``features``: per stage
    ``(B, M, C_s, *spatial_s)``, zeros for absent modalities; ``present``: bool ``(B, M)``.
    """

    logits: Any
    fused: list[Tensor] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)
    present: Tensor | None = None


def normalize_present(present: Tensor | Sequence[bool] | None, batch: int, num_modalities: int,
                      device: torch.device | None = None) -> Tensor:
    """A bool ``(B, M)`` presence mask from ``None`` (all present), ``(M,)`` or ``(B, M)``; rows must be non-empty."""
    if present is None:
        mask = torch.ones(batch, num_modalities, dtype=torch.bool, device=device)
    else:
        mask = torch.as_tensor(present, device=device).to(torch.bool)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0).expand(batch, -1)
        if tuple(mask.shape) != (batch, num_modalities):
            raise ValueError(f"present must be (M,) or (B, M) = ({batch}, {num_modalities}), "
                             f"got {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every sample needs at least one present modality")
    return mask


def stack_modalities(images: Sequence[Tensor], in_channels: int) -> Tensor:
    """Stack per-modality images ``(B, C_m, H, W)`` into ``(B, M, in_channels, H, W)`` (see ``match_channels``)."""
    return torch.stack([match_channels(x, in_channels) for x in images], dim=1)


def sample_modality_subsets(available: Tensor, drop_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Modality dropout: the ``(B, M)`` bool mask of the modalities each row keeps.

    With probability ``drop_prob`` a row's subset is drawn uniformly from the non-empty subsets
    of its ``available`` modalities (the full set is one of them); otherwise it keeps all that
    are available. Every subset is therefore seen in training, and the full set most often.
    A row with nothing available keeps nothing (the caller decides what that means).
    """
    available = available.bool().cpu()
    b, m = available.shape
    drop = torch.rand(b, generator=generator) < drop_prob
    keep = available.clone()
    todo = drop & available.any(dim=1)
    while bool(todo.any()):
        bits = (torch.rand(b, m, generator=generator) < 0.5) & available
        accept = todo & bits.any(dim=1)
        keep[accept] = bits[accept]
        todo &= ~accept
    return keep


def non_empty_subsets(num_modalities: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``range(num_modalities)``, by size then lexicographically (15 for four)."""
    return [c for k in range(1, num_modalities + 1) for c in itertools.combinations(range(num_modalities), k)]


def modality_images(x: Tensor, channels_per_modality: Sequence[int], in_channels: int) -> Tensor:
    """The network input ``(B, C + M, H, W)`` of the data loader as ``(B, M, in_channels, H, W)`` images.

    The first ``C = sum(channels_per_modality)`` channels are the modalities' components in
    order (the FOV masks follow and are not images); each modality is mapped onto the
    backbone's channels by :func:`~cmcseg.networks.mit.match_channels`.
    """
    images, start = [], 0
    for count in channels_per_modality:
        images.append(x[:, start:start + int(count)])
        start += int(count)
    return stack_modalities(images, in_channels)


def fov_presence(x: Tensor, channels_per_modality: Sequence[int]) -> Tensor:
    """``(B, M)`` bool: modality m has a non-empty field of view in the row (its FOV mask follows the images).

    A row where no modality is in view (e.g. padding) counts every modality as present: the
    network needs at least one, and all of them are zeros there anyway.
    """
    start = sum(int(c) for c in channels_per_modality)
    fov = x[:, start:start + len(channels_per_modality)]
    present = fov.flatten(2).amax(2) > 0.5
    return present | ~present.any(dim=1, keepdim=True)


class Any2SegNetwork(nn.Module):
    """What every Any2Seg network shares: ONE encoder for all modalities (stacked in the batch), MFF per stage.

    A subclass says how an input becomes per-modality images (:meth:`split_input`), how a stack of
    images becomes per-stage features (:meth:`encode`) and how the fused stages become logits
    (:meth:`decode`). Attributes: ``num_classes``, ``num_modalities``, ``modality_names``,
    ``in_channels`` (of each modality's image), ``fusion``.
    """

    num_classes: int
    num_modalities: int
    in_channels: int

    def __init__(self, num_classes: int, num_modalities: int, fusion_temperature: float = 1.0,
                 modality_names: Sequence[str] | None = None, fusion_mode: str = "mff") -> None:
        super().__init__()
        if num_modalities < 1 or num_classes < 1:
            raise ValueError("num_modalities and num_classes must be >= 1")
        if modality_names is not None and len(modality_names) != num_modalities:
            raise ValueError(f"{len(modality_names)} modality names for {num_modalities} modalities")
        self.num_classes = num_classes
        self.num_modalities = num_modalities
        self.modality_names = list(modality_names) if modality_names else [f"m{i}" for i in range(num_modalities)]
        self.fusion = ModalityAgnosticFusion(temperature=fusion_temperature, mode=fusion_mode)

    # ------------------------------------------------------------------------------ the hooks
    @property
    def stage_channels(self) -> list[int]:
        """Channels of each stage's features (and fused maps)."""
        raise NotImplementedError

    def split_input(self, x: Tensor, channels_per_modality: Sequence[int]) -> Tensor:
        """The pipeline's input ``(B, C + M, *spatial)`` as ``(B, M, in_channels, *spatial)`` images."""
        raise NotImplementedError

    def encode(self, images: Tensor) -> list[Tensor]:
        """Per-stage features of a stack of single-modality images ``(N, in_channels, *spatial)``."""
        raise NotImplementedError

    def decode(self, fused: Sequence[Tensor], size: Sequence[int]) -> Tensor | list[Tensor]:
        """Logits ``(B, K, *size)`` from the fused stages (a list over scales with deep supervision)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- shared steps
    def _check_images(self, images: Tensor) -> Tensor:
        if images.dim() < 4 or images.shape[1] != self.num_modalities:
            raise ValueError(f"images must be (B, M={self.num_modalities}, C, *spatial), got {tuple(images.shape)}")
        return images

    def forward_modalities(self, images: Tensor, present: Tensor | Sequence[bool] | None = None
                           ) -> tuple[list[Tensor], Tensor]:
        """Per-stage per-modality features ``(B, M, C_s, *spatial_s)`` (zeros where absent) and the ``(B, M)`` mask.

        Only the present images go through the encoder, all in one batch.
        """
        images = self._check_images(images)
        b, m = images.shape[:2]
        mask = normalize_present(present, b, m, images.device)
        stages = self.encode(images[mask])                                # each (N, C_s, *spatial_s)
        features = []
        for stage in stages:
            full = stage.new_zeros(b, m, *stage.shape[1:])
            full[mask] = stage
            features.append(full)
        return features, mask

    def fuse(self, features: Sequence[Tensor], present: Tensor) -> list[Tensor]:
        """MFF of each stage's ``(B, M, C, *spatial)`` features under the ``(B, M)`` mask -> ``(B, C, *spatial)``."""
        return [self.fusion(f.transpose(0, 1), present.transpose(0, 1)) for f in features]

    def forward(self, images: Tensor, present: Tensor | Sequence[bool] | None = None) -> Any2SegOutput:
        """Segment ``images (B, M, C, *spatial)`` from the modalities marked in ``present`` (None: all)."""
        features, mask = self.forward_modalities(images, present)
        fused = self.fuse(features, mask)
        logits = self.decode(fused, images.shape[3:])
        return Any2SegOutput(logits=logits, fused=fused, features=features, present=mask)


class Any2SegModel(Any2SegNetwork):
    """Shared MiT backbone + MFF per stage + all-MLP decoder (2D; see the module docstring).

    Attributes beside the base's: ``backbone`` (:class:`~cmcseg.networks.mit.MiTBackbone`), ``decode_head``.
    """

    def __init__(self, num_classes: int, num_modalities: int, variant: str = "mit_b0", in_channels: int = 3,
                 backbone_weights: Path | str | None = None, decoder_hidden_size: int | None = None,
                 fusion_temperature: float = 1.0, dropout: float = 0.1,
                 modality_names: Sequence[str] | None = None, fusion_mode: str = "mff"):
        super().__init__(num_classes, num_modalities, fusion_temperature, modality_names, fusion_mode)
        self.in_channels = in_channels
        self.backbone: MiTBackbone = build_mit_backbone(variant, in_channels, backbone_weights)
        head_config = mit_config(variant, in_channels, num_labels=num_classes)
        if decoder_hidden_size is not None:
            head_config.decoder_hidden_size = decoder_hidden_size
        head_config.classifier_dropout_prob = dropout
        self.decode_head = SegformerDecodeHead(head_config)

    @property
    def stage_channels(self) -> list[int]:
        return list(self.backbone.out_channels)

    def split_input(self, x: Tensor, channels_per_modality: Sequence[int]) -> Tensor:
        """Each modality's image channels mapped onto the backbone's (:func:`modality_images`)."""
        return modality_images(x, channels_per_modality, self.in_channels)

    def _check_images(self, images: Tensor) -> Tensor:
        if images.dim() != 5 or images.shape[1] != self.num_modalities:
            raise ValueError(f"images must be (B, M={self.num_modalities}, C, H, W), got {tuple(images.shape)}")
        return match_channels(images, self.in_channels)

    def encode(self, images: Tensor) -> list[Tensor]:
        return list(self.backbone(images))

    def decode(self, fused: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """All-MLP decoder on the fused stages; logits ``(B, K, *size)``."""
        logits = self.decode_head(list(fused))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class Any2SegUNet(Any2SegNetwork):
    """Any2Seg on nnU-Net's encoder-decoder, 2D or 3D: the plan's encoder shared by the modalities, MFF on every
    skip, and nnU-Net's ``UNetDecoder`` (with deep supervision) on the fused skips.

    Each modality's image is its channels, zero-padded to the largest modality's count, plus its
    field-of-view mask (as a CMC branch sees it, :func:`~cmcseg.networks.cmc.split_modalities`), so
    ``in_channels = max(channels_per_modality) + 1``. ``encoder`` is any registered encoder
    (:mod:`cmcseg.networks.encoders`: ``residual``, the plan's default, ``plain``, ``swinunetr``, ...),
    built from the plan and loaded from ``encoder_weights`` if given. With the instance norm of the
    plan, stacking the modalities in the batch changes nothing per image.

    ``fusion_stage="input"`` is the early-fusion ablation: the present modalities' images and FOV masks
    (absent ones zero) enter ONE encoder pass as channels, as in nnU-Net or a single-branch CMC, and
    :meth:`fuse` is that pass; modality dropout and the EMA teacher train it as they train the late-fused
    network. It costs one encoder pass per row instead of one per present modality, and it is not
    permutation invariant (each modality keeps its channels).
    """

    #: where the modalities meet: "features" (MFF on every skip, the paper's) or "input" (early fusion)
    FUSION_STAGES = ("features", "input")

    def __init__(self, plan_config: Mapping[str, Any], channels_per_modality: Sequence[int], num_classes: int,
                 encoder: str = "residual", deep_supervision: bool = True, fusion_temperature: float = 1.0,
                 encoder_weights: Path | str | None = None, encoder_options: Mapping[str, Any] | None = None,
                 modality_names: Sequence[str] | None = None, unsafe_allow_pickle: bool = False,
                 fusion_mode: str = "mff", fusion_stage: str = "features") -> None:
        super().__init__(num_classes, len(channels_per_modality), fusion_temperature, modality_names, fusion_mode)
        if fusion_stage not in self.FUSION_STAGES:
            raise ValueError(f"fusion_stage {fusion_stage!r} is not one of {self.FUSION_STAGES}")
        self.fusion_stage = fusion_stage
        self.channels_per_modality = [int(c) for c in channels_per_modality]
        self.in_channels = max(self.channels_per_modality) + 1
        early = fusion_stage == "input"
        m = len(self.channels_per_modality)
        self.encoder: ModalityEncoder = build_encoder(
            encoder, plan_config, self.in_channels * m if early else self.in_channels, encoder_weights,
            fov_channels=m if early else 1, unsafe_allow_pickle=unsafe_allow_pickle, **dict(encoder_options or {}))
        self.decoder = self.encoder.build_decoder(num_classes, deep_supervision)

    @property
    def stage_channels(self) -> list[int]:
        return list(self.encoder.output_channels)

    @property
    def deep_supervision(self) -> bool:
        return bool(getattr(self.decoder, "deep_supervision", False))

    def set_deep_supervision(self, enabled: bool) -> None:
        """Deep supervision on (training) or off (inference: one full-resolution output)."""
        cast(Any, self.decoder).deep_supervision = bool(enabled)

    def deep_supervision_scales(self) -> list[list[float]]:
        """The scale of each deep-supervision output relative to the patch, full resolution first."""
        return self.encoder.deep_supervision_scales()

    def split_input(self, x: Tensor, channels_per_modality: Sequence[int]) -> Tensor:
        return torch.stack(split_modalities(x, channels_per_modality, self.in_channels - 1), dim=1)

    def encode(self, images: Tensor) -> list[Tensor]:
        return list(self.encoder(images))

    def decode(self, fused: Sequence[Tensor], size: Sequence[int]) -> Tensor | list[Tensor]:
        return self.decoder(list(fused))

    def forward_modalities(self, images: Tensor, present: Tensor | Sequence[bool] | None = None
                           ) -> tuple[list[Tensor], Tensor]:
        """Late fusion: the base's per-modality features. Early fusion: the images themselves (one "stage"),
        encoded in :meth:`fuse`."""
        if self.fusion_stage == "features":
            return super().forward_modalities(images, present)
        images = self._check_images(images)
        return [images], normalize_present(present, images.shape[0], images.shape[1], images.device)

    def fuse(self, features: Sequence[Tensor], present: Tensor) -> list[Tensor]:
        """Late fusion: MFF per stage. Early fusion: the present images' channels, then their FOV masks (absent
        modalities zero, whatever their images hold), through the encoder once."""
        if self.fusion_stage == "features":
            return super().fuse(features, present)
        images = features[0]
        keep = present.view(*present.shape, *([1] * (images.dim() - 2)))
        images = torch.where(keep, images, torch.zeros((), dtype=images.dtype, device=images.device))
        c = self.in_channels - 1
        return self.encode(torch.cat([images[:, :, :c].flatten(1, 2), images[:, :, c]], dim=1))


class Any2SegProbabilities(nn.Module):
    """Class probabilities of an :class:`Any2SegNetwork` from the pipeline's input ``(B, C + M, *spatial)``.

    Used by validation, the subset evaluation and ``cmcseg predict`` alike. A modality counts as
    present in a window where its field of view is non-empty (an absent modality of a case has
    an empty FOV); ``subset`` (modality indices) further restricts the network to those
    modalities, which is how every subset is evaluated. Where none of the allowed modalities is
    in view, the allowed ones are used (their images are zeros there).
    """

    allowed: Tensor  # buffer ``(M,)``: the modalities the network may use

    def __init__(self, network: Any2SegNetwork, channels_per_modality: Sequence[int],
                 subset: Sequence[int] | None = None) -> None:
        super().__init__()
        self.network = network
        self.channels_per_modality = [int(c) for c in channels_per_modality]
        if len(self.channels_per_modality) != network.num_modalities:
            raise ValueError(f"{len(self.channels_per_modality)} modalities in the input, the network has "
                             f"{network.num_modalities}")
        allowed = torch.zeros(network.num_modalities, dtype=torch.bool)
        allowed[list(range(network.num_modalities)) if subset is None else list(subset)] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def presence(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        """The ``(B, M)`` modalities the network uses for each row of ``x`` (in view and ``allowed``)."""
        allowed = (self.allowed if allowed is None else allowed).to(x.device)
        present = fov_presence(x, self.channels_per_modality) & allowed
        return torch.where(present.any(dim=1, keepdim=True), present, allowed.expand_as(present))

    def forward(self, x: Tensor) -> Tensor:
        images = self.network.split_input(x, self.channels_per_modality)
        return torch.softmax(as_scales(self.network(images, self.presence(x)).logits)[0].float(), dim=1)


class SubsetProbabilities(Any2SegProbabilities):
    """The probabilities of several modality subsets at once: ``(B, S * K, H, W)``, subset after subset.

    Equal to stacking :class:`Any2SegProbabilities` restricted to each subset, but the backbone
    runs once per modality (M passes instead of one per subset member: 4 instead of 32 for the
    15 subsets of four modalities); only fusion and decoding are repeated per subset. With early
    fusion (``Any2SegUNet(fusion_stage="input")``) the fusion is the encoder pass, so that runs once
    per subset. One sliding window over a case then scores every subset.
    """

    subset_masks: Tensor  # buffer ``(S, M)``: one row of allowed modalities per subset

    def __init__(self, network: Any2SegNetwork, channels_per_modality: Sequence[int],
                 subsets: Sequence[Sequence[int]]) -> None:
        super().__init__(network, channels_per_modality)
        masks = torch.zeros(len(subsets), network.num_modalities, dtype=torch.bool)
        for i, subset in enumerate(subsets):
            masks[i, list(subset)] = True
        self.register_buffer("subset_masks", masks, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        images = self.network.split_input(x, self.channels_per_modality)
        features, _ = self.network.forward_modalities(images, None)
        out = []
        for allowed in self.subset_masks:
            fused = self.network.fuse(features, self.presence(x, allowed))
            logits = as_scales(self.network.decode(fused, images.shape[3:]))[0]
            out.append(torch.softmax(logits.float(), dim=1))
        return torch.cat(out, dim=1)
