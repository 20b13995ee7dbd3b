"""Modality-agnostic feature fusion (MFF) of Any2Seg, for any number of present modalities.

Given the features ``f_m`` (C channels per pixel) of the present modalities ``m`` (presence
``a_m in {0, 1}``, per sample), at each pixel:

1. mean feature and similarity-weighted fusion::

       fbar  = sum_m a_m f_m / sum_m a_m
       s_m   = cos(f_m, fbar)
       w_m   = a_m exp(s_m / tau) / sum_n a_n exp(s_n / tau)        (softmax over present modalities)
       F     = sum_m w_m f_m

2. fine-grained selection: the present modality whose feature best matches the fused one::

       m*    = argmax_{m : a_m = 1} cos(f_m, F)
       MFF   = (F + f_{m*}) / 2

Properties (tested): the result does not depend on the order of the modalities (means, softmax
and argmax are symmetric; on an exact tie of two equal features either choice is the same
vector); one present modality gives exactly its own features (``F = f_{m*} = f``); absent
modalities take no part (their weight is exactly zero and their values are never read, so
NaN/garbage in an absent slot cannot leak). The public Any2Seg snapshot hard-coded two
modalities; this implementation takes any ``M``.

The argmax selection is not differentiable w.r.t. the choice, but the selected feature carries
gradient to its modality's backbone pass, and ``F`` to all present modalities.

``mode="mean"`` is the plain mean ``fbar`` of the present modalities (no similarity weights, no
selection): the ablation baseline of MFF. With ``tau = 1`` the similarity weights of MFF are close to
uniform (cosines lie in [-1, 1], so weights differ by at most a factor e^2), which is why the
temperature is an attribute and the plain mean an option.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _cosine(a: Tensor, b: Tensor, dim: int, eps: float) -> Tensor:
    """Cosine similarity along ``dim``: ``<a, b> / (max(|a|, eps) max(|b|, eps))``."""
    an = a / a.norm(dim=dim, keepdim=True).clamp_min(eps)
    bn = b / b.norm(dim=dim, keepdim=True).clamp_min(eps)
    return (an * bn).sum(dim=dim)


def _check_present(features: Tensor, present: Tensor | None) -> Tensor:
    """``present`` as a bool ``(M, B)`` tensor (all present when None); every sample needs one modality."""
    m, b = features.shape[:2]
    if present is None:
        return torch.ones(m, b, dtype=torch.bool, device=features.device)
    present = present.to(device=features.device, dtype=torch.bool)
    if present.dim() == 1:
        present = present[:, None].expand(m, b)
    if tuple(present.shape) != (m, b):
        raise ValueError(f"present must be (M,) or (M, B) = ({m}, {b}), got {tuple(present.shape)}")
    if not bool(present.any(dim=0).all()):
        raise ValueError("every sample needs at least one present modality for the fusion")
    return present


def _masked_mean(features: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """``features (M, B, C, ...)`` with absent entries set to 0 (their values are never read), and the mean of the
    present ones ``(B, C, ...)``."""
    mask = present.reshape(*present.shape, *([1] * (features.dim() - 2)))       # (M, B, 1, ...)
    feats = torch.where(mask, features, torch.zeros((), dtype=features.dtype, device=features.device))
    count = mask.sum(dim=0).clamp_min(1).to(features.dtype)                      # (B, 1, ...)
    return feats, feats.sum(dim=0) / count


def mean_fusion(features: Tensor, present: Tensor | None = None) -> Tensor:
    """The mean of the present modalities' ``features (M, B, C, *spatial)`` -> ``(B, C, *spatial)``."""
    return _masked_mean(features, _check_present(features, present))[1]


def modality_agnostic_feature_fusion(features: Tensor, present: Tensor | None = None, temperature: float = 1.0,
                                     eps: float = 1e-6) -> Tensor:
    """Fuse ``features (M, B, C, *spatial)`` of M modalities into ``(B, C, *spatial)`` (formula: module docstring).

    ``present`` is a bool ``(M, B)`` or ``(M,)`` mask (None: all present); absent modalities are
    excluded from the mean, the softmax and the selection.
    """
    if features.dim() < 3:
        raise ValueError(f"features must be (M, B, C, ...), got shape {tuple(features.shape)}")
    present = _check_present(features, present)
    feats, mean = _masked_mean(features, present)                                # (M, B, C, ...), (B, C, ...)

    absent = ~present.reshape(*present.shape, *([1] * (features.dim() - 3)))     # (M, B, ...) without C
    sim = _cosine(feats, mean.unsqueeze(0), dim=2, eps=eps) / temperature       # (M, B, ...)
    weights = torch.softmax(sim.masked_fill(absent, float("-inf")), dim=0)
    fused = (weights.unsqueeze(2) * feats).sum(dim=0)                            # (B, C, ...)

    match = _cosine(feats, fused.unsqueeze(0), dim=2, eps=eps).masked_fill(absent, float("-inf"))
    best = match.argmax(dim=0)                                                   # (B, ...)
    index = best.unsqueeze(0).unsqueeze(2).expand(1, *feats.shape[1:])           # (1, B, C, ...)
    selected = torch.gather(feats, 0, index).squeeze(0)
    return 0.5 * (fused + selected)


#: the fusions :class:`ModalityAgnosticFusion` can run
FUSION_MODES = ("mff", "mean")


class ModalityAgnosticFusion(nn.Module):
    """Module form of :func:`modality_agnostic_feature_fusion` (``mode="mff"``) or of :func:`mean_fusion`
    (``mode="mean"``); parameter-free, ``temperature`` and ``mode`` are attributes."""

    def __init__(self, temperature: float = 1.0, eps: float = 1e-6, mode: str = "mff"):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
        self.temperature = temperature
        self.eps = eps
        self.mode = mode

    def forward(self, features: Tensor, present: Tensor | None = None) -> Tensor:
        """``(M, B, C, *spatial)`` features and an ``(M, B)`` presence mask -> ``(B, C, *spatial)``."""
        if self.mode == "mean":
            return mean_fusion(features, present)
        return modality_agnostic_feature_fusion(features, present, self.temperature, self.eps)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, temperature={self.temperature}"
