"""Channel-wise semantic consistency (CSC): a contrastive loss over per-channel bottleneck descriptors.

Each modality's bottleneck ``(B, C, *spatial)`` is read as C channel descriptors, one vector of
N = prod(spatial) values per channel. Channel c of modality a should describe the same
semantic pattern as channel c of modality b (its positive) and differ from the other channels
of b (its negatives).

Which features, and why: CMC applies it to each branch's BOTTLENECK (``CMCOutput.bottlenecks``: after the
modality's channel attention, before the unified fusion mixes the modalities). That is the deepest map each
modality computes on its own, so aligning its channels asks every encoder to describe the same anatomy in the
same channels, which the fusion and the decoders can then combine; after fusion the branches already share
information and the term would be trivially low. The bottleneck is also the smallest map (O(C^2) similarities
over few voxels). It needs no label, so it runs on every row, labeled and unlabeled, and as an unlabeled
term it is scaled by ``--unlabeled-weight``.

Temperature: ``tau = 0.1`` (``CMCTrainer.csc_temperature``), the usual value for InfoNCE over L2-normalised
descriptors (SimCLR, MoCo): cosines lie in [-1, 1], so ``1 / tau = 10`` spreads them over a softmax range in
which the positive can dominate C - 1 negatives without saturating the gradient. Its weight is 0.1, below the
pseudo-label term, because it shapes features rather than predictions.

Memory: the similarities are one normalised batched matrix product
``(B, C, N) @ (B, N, C) -> (B, C, C)``, so beyond the inputs (and their normalised copies,
O(B*C*N)) the loss holds O(B*C^2). The public code of the CMC paper compared every voxel with
every voxel, allocating O(N^2 D); this module never forms an N x N tensor.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channel_descriptors(features: Tensor) -> Tensor:
    """L2-normalised per-channel descriptors ``(B, C, N)`` of a ``(B, C, *spatial)`` feature map.

    Computed in float32 so that the similarities are accurate under mixed precision.
    """
    if features.ndim < 3:
        raise ValueError(f"features must be (B, C, *spatial), got shape {tuple(features.shape)}")
    flat = features.float().flatten(start_dim=2)
    return F.normalize(flat, p=2.0, dim=2)


def channel_similarity(desc_a: Tensor, desc_b: Tensor) -> Tensor:
    """Cosine similarities ``(B, C, C)`` between the channels of two descriptor sets ``(B, C, N)``.

    ``S[b, i, j] = <z_a[b, i], z_b[b, j]>``; one bmm, O(B*C^2) output, no N x N tensor.
    """
    return torch.bmm(desc_a, desc_b.transpose(1, 2))


def symmetric_channel_info_nce(similarity: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE over a ``(B, C, C)`` similarity matrix whose diagonal holds the positives.

    ``L = 1/2 [CE(S/tau, diag) over rows + CE(S^T/tau, diag) over rows]``, averaged over B*C rows,
    where ``CE(s, c) = -log(exp(s_c) / sum_j exp(s_j))``.
    """
    batch, channels, _ = similarity.shape
    logits = similarity / temperature
    target = torch.arange(channels, device=similarity.device).repeat(batch)
    rows = F.cross_entropy(logits.reshape(batch * channels, channels), target)
    cols = F.cross_entropy(logits.transpose(1, 2).reshape(batch * channels, channels), target)
    return 0.5 * (rows + cols)


def _check_features(features: Sequence[Tensor]) -> None:
    """Raise a clear error unless there are >= 2 modalities with the same (B, C, N)."""
    if len(features) < 2:
        raise ValueError(f"channel semantic consistency needs >= 2 modalities, got {len(features)}")
    first = features[0]
    for index, feat in enumerate(features):
        if feat.ndim < 3:
            raise ValueError(f"modality {index}: features must be (B, C, *spatial), got {tuple(feat.shape)}")
        if feat.shape[:2] != first.shape[:2] or feat[0, 0].numel() != first[0, 0].numel():
            raise ValueError(
                "all modalities' bottlenecks must have the same batch size, channels and number of voxels; "
                f"modality 0 has {tuple(first.shape)}, modality {index} has {tuple(feat.shape)}"
            )


def channel_semantic_consistency_loss(features: Sequence[Tensor], temperature: float = 0.1) -> Tensor:
    """Channel-wise semantic consistency between M modality bottlenecks.

    With ``z_m[b, c] = f_m[b, c] / ||f_m[b, c]||_2`` (flattened over space) and
    ``S_ab = z_a z_b^T / tau`` of shape (B, C, C):

        L = mean_{ordered pairs a != b} mean_{b, c} -log( exp(S_ab[b, c, c]) / sum_k exp(S_ab[b, c, k]) )

    Averaging over ordered pairs equals the symmetric (row + column) InfoNCE over unordered
    pairs, which is how it is computed (one bmm per unordered pair). Memory O(B*C^2) beyond the
    O(B*C*N) normalised inputs; never O(N^2). Gradient flows into every modality's features.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_features(features)
    descriptors = [channel_descriptors(feat) for feat in features]
    pair_losses = [
        symmetric_channel_info_nce(channel_similarity(descriptors[a], descriptors[b]), temperature)
        for a, b in itertools.combinations(range(len(descriptors)), 2)
    ]
    return torch.stack(pair_losses).mean()


class ChannelSemanticConsistencyLoss(nn.Module):
    """Module form of :func:`channel_semantic_consistency_loss`; ``temperature`` is a plain attribute."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Loss over the modalities' bottlenecks, each ``(B, C, *spatial)``."""
        return channel_semantic_consistency_loss(features, temperature=self.temperature)
