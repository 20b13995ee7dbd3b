"""The Cross Modality Collaboration (CMC) network: one encoder-decoder branch per modality, fused at the bottleneck.

Input ``x``: ``(B, sum(components) + M, *spatial)``, the modality channels in order followed by
the M field-of-view (FOV) masks. Branch m sees its own channels plus its FOV mask
(:func:`split_modalities`), so it can tell "outside the field of view" from dark data.

Per branch: encoder -> skips; at the bottleneck channel attention (per modality) and the
unified fusion layer (:mod:`cmcseg.networks.cmc_fusion`); then the branch's own decoder pass with
its own skips. ``forward`` returns :class:`CMCOutput`.

With one branch (a single-modality dataset, or ``single_branch=True`` where all modalities are
stacked as input channels as nnU-Net does; the CMC trainer's default) attention and fusion are off
and the network is nnU-Net's architecture (encoder + ``UNetDecoder``) with the FOV mask(s) as extra
input channel(s). :meth:`CMCNetwork.predict_with_heads` then gives each modality's own prediction by
running it with the other modalities absent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.networks.cmc_fusion import ChannelAttention, UnifiedFusion
from cmcseg.networks.encoders import ModalityEncoder, build_encoder
from cmcseg.plans.plans import (
    Configuration,
    plan_channels_per_modality,
    plan_configuration,
    plan_encoder,
    plan_num_classes,
)

log = logging.getLogger(__name__)


class CMCOutput(NamedTuple):
    """What :class:`CMCNetwork` returns (a NamedTuple: a pytree that torch.compile and tracing pass through).

    ``logits``: one entry per branch; each a list over deep-supervision scales (full resolution
    first) when deep supervision is on, else the full-resolution tensor ``(B, K, *spatial)``.
    ``bottlenecks``: one ``(B, C, *bottleneck)`` tensor per branch, after channel attention and
    before fusion (the input of the channel-wise semantic consistency loss).
    """

    logits: list[Tensor] | list[list[Tensor]]
    bottlenecks: list[Tensor]


def as_scales(output: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """One head's output as a list over deep-supervision scales (full resolution first)."""
    return [output] if isinstance(output, Tensor) else list(output)


def head_probabilities(output: CMCOutput) -> list[Tensor]:
    """Each head's full-resolution softmax ``(B, K, *)`` (float32) of a network output."""
    return [torch.softmax(as_scales(h)[0].float(), dim=1) for h in output.logits]


def fov_weighted_ensemble(head_probabilities: Sequence[Tensor], fov: Tensor,
                          reliability: Tensor | None = None) -> Tensor:
    """The fused prediction: voxel-wise weighted mean of M heads' ``(B, K, *)`` probabilities.

    Head m's weight at voxel x for class k is ``fov[b, m, x] * reliability[m, k]``: a head votes only
    inside its modality's field of view, and (with ``reliability``, ``(M, K)``, e.g. each head's Dice
    on labeled data) a head that segments class k badly has less say on class k. With reliability
    weights the result is renormalised over classes. Where no modality is in view (e.g.
    sliding-window padding) the plain mean is used. One head is returned as it is.
    """
    probabilities = torch.stack([p.float() for p in head_probabilities])  # (M, B, K, *)
    n_heads, num_classes = probabilities.shape[0], probabilities.shape[2]
    if n_heads == 1:
        return probabilities[0]
    weights = fov[:, :n_heads].float().transpose(0, 1).unsqueeze(2)  # (M, B, 1, *)
    if reliability is not None:
        per_class = reliability.to(probabilities).reshape(n_heads, 1, num_classes, *[1] * (probabilities.ndim - 3))
        weights = weights * per_class
    weight_sum = weights.sum(0)
    weighted = (weights * probabilities).sum(0) / weight_sum.clamp_min(1e-6)
    fused = torch.where(weight_sum > 0, weighted, probabilities.mean(0))
    if reliability is not None:
        fused = fused / fused.sum(1, keepdim=True).clamp_min(1e-6)
    return fused


def split_modalities(x: Tensor, channels_per_modality: Sequence[int], pad_to: int | None = None) -> list[Tensor]:
    """Cut ``x`` into one input per modality: its channels (zero-padded to ``pad_to``) then its FOV mask.

    Static slicing only (no data-dependent shapes). Raises if ``x`` does not have
    ``sum(channels_per_modality) + M`` channels.
    """
    n_mod = len(channels_per_modality)
    total = sum(channels_per_modality)
    if x.shape[1] != total + n_mod:
        raise CmcsegError(f"the network expects {total} modality channel(s) + {n_mod} FOV mask(s) = "
                          f"{total + n_mod} input channels, got {x.shape[1]}.")
    out: list[Tensor] = []
    start = 0
    for m, comps in enumerate(channels_per_modality):
        parts = [x[:, start:start + comps]]
        if pad_to is not None and pad_to > comps:
            parts.append(x.new_zeros((x.shape[0], pad_to - comps, *x.shape[2:])))
        parts.append(x[:, total + m:total + m + 1])
        out.append(torch.cat(parts, dim=1))
        start += comps
    return out


class CMCNetwork(nn.Module):
    """M modality branches with shared or per-modality encoder and decoder, fused at the bottleneck.

    ``make_encoder(in_channels, fov_channels)`` builds one branch encoder (called once when
    shared, else once per branch). Options:

    * ``shared_encoder``: one encoder for all branches; inputs are zero-padded to the largest
      component count, and the branches run as one batch (identical to separate calls with
      instance norm, the plan's default).
    * ``shared_decoder``: one decoder for all branches (each branch still uses its own skips).
    * ``fusion`` / ``channel_attention``: default on when there is more than one branch.
    * ``single_branch``: one branch that takes every modality and FOV mask as input channels.
    """

    head_reliability: Tensor  # registered buffer ``(n_branches, num_classes)``

    def __init__(self, make_encoder: Callable[[int, int], ModalityEncoder], channels_per_modality: Sequence[int],
                 num_classes: int, shared_encoder: bool = False, shared_decoder: bool = False,
                 deep_supervision: bool = True, fusion: bool | None = None, channel_attention: bool | None = None,
                 single_branch: bool = False):
        super().__init__()
        self.channels_per_modality = [int(c) for c in channels_per_modality]
        if not self.channels_per_modality or min(self.channels_per_modality) < 1:
            raise CmcsegError(f"channels_per_modality {self.channels_per_modality}: every modality needs >= 1 channel.")
        self.num_classes = int(num_classes)
        self.single_branch = bool(single_branch)
        self.n_branches = 1 if single_branch else len(self.channels_per_modality)
        self.shared_encoder = bool(shared_encoder) and self.n_branches > 1
        self.shared_decoder = bool(shared_decoder) and self.n_branches > 1
        self.pad_to = max(self.channels_per_modality) if self.shared_encoder else None

        if single_branch:
            n_mod = len(self.channels_per_modality)
            encoders = [make_encoder(sum(self.channels_per_modality) + n_mod, n_mod)]
        elif self.shared_encoder:
            encoders = [make_encoder(max(self.channels_per_modality) + 1, 1)]
        else:
            encoders = [make_encoder(c + 1, 1) for c in self.channels_per_modality]
        self.encoders = nn.ModuleList(encoders)
        first = encoders[0]
        n_dec = 1 if self.shared_decoder else self.n_branches
        self.decoders = nn.ModuleList(first.build_decoder(self.num_classes, deep_supervision) for _ in range(n_dec))

        multi = self.n_branches > 1
        self.use_attention = multi if channel_attention is None else bool(channel_attention)
        self.use_fusion = multi if fusion is None else bool(fusion)
        if self.use_fusion and not multi:
            raise CmcsegError("fusion needs at least two modality branches; this network has one.")
        bottleneck = first.output_channels[-1]
        self.attention = nn.ModuleList(ChannelAttention(first.spatial_dims, bottleneck)
                                       for _ in range(self.n_branches)) if self.use_attention else None
        self.fusion = UnifiedFusion(first.spatial_dims, bottleneck, self.n_branches) if self.use_fusion else None
        # per-head, per-class vote in the fused prediction; the trainer sets it from the labeled data, and it
        # travels in the state dict (checkpoints), so prediction fuses the heads as training did
        self.register_buffer("head_reliability", torch.ones(self.n_branches, self.num_classes))

    # ------------------------------------------------------------------------------ properties
    @property
    def deep_supervision(self) -> bool:
        return bool(self.decoders[0].deep_supervision)

    def set_deep_supervision(self, enabled: bool) -> None:
        """Switch deep supervision (off for inference, as nnU-Net's ``set_deep_supervision_enabled``)."""
        for decoder in self.decoders:
            cast(Any, decoder).deep_supervision = bool(enabled)

    def deep_supervision_scales(self) -> list[list[float]]:
        """Scale of each deep-supervision output relative to the patch, full resolution first (for the targets)."""
        return cast(ModalityEncoder, self.encoders[0]).deep_supervision_scales()

    # --------------------------------------------------------------------------------- forward
    def fov_masks(self, x: Tensor) -> Tensor:
        """The ``(B, M, *)`` field-of-view masks at the end of the input ``x``."""
        return x[:, x.shape[1] - len(self.channels_per_modality):]

    def fuse(self, head_probabilities: Sequence[Tensor], x: Tensor) -> Tensor:
        """The fused prediction of the heads' probabilities for input ``x`` (FOV masks from ``x``), weighted
        by :attr:`head_reliability` (see :func:`fov_weighted_ensemble`)."""
        return fov_weighted_ensemble(head_probabilities, self.fov_masks(x), self.head_reliability)

    def head_fov(self, x: Tensor) -> Tensor:
        """``(B, n_branches, *)`` field-of-view mask of each head: its modality's mask (one branch: their union)."""
        fov = self.fov_masks(x)
        return fov.amax(1, keepdim=True) if self.single_branch else fov

    def branch_inputs(self, x: Tensor) -> list[Tensor]:
        """The input of each branch (see :func:`split_modalities`)."""
        if self.single_branch:
            expected = sum(self.channels_per_modality) + len(self.channels_per_modality)
            if x.shape[1] != expected:
                raise CmcsegError(f"the network expects {expected} input channels, got {x.shape[1]}.")
            return [x]
        return split_modalities(x, self.channels_per_modality, self.pad_to)

    def encode(self, inputs: Sequence[Tensor]) -> list[list[Tensor]]:
        """Skips per branch; a shared encoder runs all branches as one batch."""
        if self.shared_encoder:
            skips = self.encoders[0](torch.cat(list(inputs), dim=0))
            per_level = [s.chunk(self.n_branches, dim=0) for s in skips]
            return [[level[m] for level in per_level] for m in range(self.n_branches)]
        return [enc(inp) for enc, inp in zip(self.encoders, inputs)]

    def decode(self, skips: Sequence[Sequence[Tensor]]) -> list[Any]:
        """Logits per branch; a shared decoder runs all branches as one batch."""
        if self.shared_decoder:
            batched = [torch.cat([s[level] for s in skips], dim=0) for level in range(len(skips[0]))]
            out = self.decoders[0](batched)
            if isinstance(out, Tensor):
                return list(out.chunk(self.n_branches, dim=0))
            per_scale = [o.chunk(self.n_branches, dim=0) for o in out]
            return [[scale[m] for scale in per_scale] for m in range(self.n_branches)]
        return [dec(s) for dec, s in zip(self.decoders, skips)]

    def modality_alone(self, x: Tensor, m: int) -> Tensor:
        """``x`` with every modality but m absent: its image channels and FOV masks zeroed, as a case without
        those sequences reaches the network."""
        keep = x.new_zeros(x.shape[1])
        start = sum(self.channels_per_modality[:m])
        keep[start:start + self.channels_per_modality[m]] = 1
        keep[sum(self.channels_per_modality) + m] = 1
        return x * keep.reshape(1, -1, *[1] * (x.ndim - 2))

    def probabilities(self, x: Tensor) -> Tensor:
        """The fused class probabilities ``(B, K, *)`` (float32) of input ``x``: the heads' softmax maps fused by
        field of view and reliability (one head: its own)."""
        return self.fuse(head_probabilities(self(x)), x)

    def predict_with_heads(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The fused probabilities and each modality's own ``(B, K, *)``, float32: a branch network's heads (one
        forward pass); a single branch run once on all modalities and once on each modality alone (a network
        trained with the strong view's modality drop learns to answer that)."""
        if not self.single_branch:
            heads = head_probabilities(self(x))
            return self.fuse(heads, x), heads
        fused = self.probabilities(x)
        if len(self.channels_per_modality) < 2:
            return fused, [fused]
        return fused, [head_probabilities(self(self.modality_alone(x, m)))[0]
                       for m in range(len(self.channels_per_modality))]

    def forward(self, x: Tensor) -> CMCOutput:
        skips = self.encode(self.branch_inputs(x))
        bottlenecks = [s[-1] for s in skips]
        if self.attention is not None:
            bottlenecks = [att(b) for att, b in zip(self.attention, bottlenecks)]
        fused = self.fusion(bottlenecks) if self.fusion is not None else bottlenecks
        logits = self.decode([list(s[:-1]) + [f] for s, f in zip(skips, fused)])
        return CMCOutput(logits, bottlenecks)


# ------------------------------------------------------------------------------------- building
class CMCProbabilities(nn.Module):
    """A CMC network's class probabilities, as ``CMCTrainer.predict_probabilities`` computes them: the heads fused
    by field of view and by the per-head, per-class reliability stored with the weights. With ``with_heads`` each
    head's own probabilities follow the fused ones (``cmcseg predict --save-heads``)."""

    def __init__(self, network: CMCNetwork, num_image_channels: int) -> None:
        super().__init__()
        self.network = network
        self.num_image_channels = int(num_image_channels)
        self.with_heads = False

    @property
    def supports_heads(self) -> bool:
        """True when there are several modalities to show alone (one branch each, or one network run on each)."""
        return len(getattr(self.network, "channels_per_modality", [])) > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.with_heads:
            fused, heads = self.network.predict_with_heads(x)
            return torch.cat([fused, *heads], dim=1)
        return self.network.probabilities(x)


def build_cmc_network(plans: Mapping[str, Any], configuration: str | Configuration, encoder: str | None = None,
                      shared_encoder: bool = False, encoder_weights: Path | str | None = None,
                      deep_supervision: bool = True, *, shared_decoder: bool = False, fusion: bool | None = None,
                      channel_attention: bool | None = None, single_branch: bool = False,
                      encoder_options: Mapping[str, Any] | None = None,
                      unsafe_allow_pickle: bool = False) -> CMCNetwork:
    """The CMC network for one configuration of plans.json.

    ``encoder`` names a registered encoder (default: the plan's topology, :func:`plan_encoder`);
    ``encoder_weights`` (a local file) is loaded into every branch's encoder, as data only unless
    ``unsafe_allow_pickle``; ``encoder_options`` go to the encoder class (e.g. ``{"feature_size": 48}``).
    """
    config = plan_configuration(plans, configuration)
    options = dict(encoder_options or {})
    encoder = encoder or plan_encoder(config)

    def make_encoder(in_channels: int, fov_channels: int) -> ModalityEncoder:
        return build_encoder(encoder, config, in_channels, encoder_weights, fov_channels=fov_channels,
                             unsafe_allow_pickle=unsafe_allow_pickle, **options)

    net = CMCNetwork(make_encoder, plan_channels_per_modality(plans), plan_num_classes(plans),
                     shared_encoder=shared_encoder, shared_decoder=shared_decoder, deep_supervision=deep_supervision,
                     fusion=fusion, channel_attention=channel_attention, single_branch=single_branch)
    log.info("CMC network: %d branch(es), encoder %s (%s), decoder %s, fusion %s, %.2fM parameters",
             net.n_branches, encoder, "shared" if net.shared_encoder else "per branch",
             "shared" if net.shared_decoder else "per branch", net.use_fusion,
             sum(p.numel() for p in net.parameters()) / 1e6)
    return net
