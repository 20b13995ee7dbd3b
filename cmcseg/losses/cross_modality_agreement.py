"""Cross-modality agreement (CAC): the modality heads should predict the same segmentation.

On paired cases (all modalities of one patient, on one grid) every modality head segments the
same anatomy, so their probability maps should agree, labels or not. The loss is
``1 - soft Dice`` between the heads' PROBABILITIES (softmax outputs). The public code of the
CMC paper applied it to logits and with the wrong sign (rewarding disagreement); here it is 0
for identical predictions and grows as they diverge.

Formula (MONAI ``DiceLoss(soft_label=True)``, the Dice semimetric of Wang et al., MICCAI 2023),
per case b and class k, sums over voxels x:

    Dice(p, q) = (|p|_1 + |q|_1 - |p - q|_1 + s_nr) / (|p|_1 + |q|_1 + s_dr)
               = (2 sum_x min(p, q) + s_nr) / (sum_x p + sum_x q + s_dr)      (p, q >= 0)

with s_nr = s_dr = 1e-5. It equals the classic soft Dice ``2 sum pq / (sum p + sum q)`` when
one side is one-hot, but unlike the classic form it is exactly 1 (loss exactly 0) for ANY two
identical soft maps; the classic form gives ``sum p^2 / sum p < 1`` for identical soft maps and
would therefore also push both heads towards over-confidence instead of only towards agreement.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Values outside [0 - tol, 1 + tol] mean the caller passed logits, not probabilities.
PROBABILITY_TOLERANCE = 1e-4


def _check_probabilities(probabilities: Sequence[Tensor]) -> None:
    """Raise a clear error for < 2 heads, mismatched shapes or values outside [0, 1] (logits)."""
    if len(probabilities) < 2:
        raise ValueError(f"cross-modality agreement needs >= 2 modality heads, got {len(probabilities)}")
    first = probabilities[0]
    for index, prob in enumerate(probabilities):
        if prob.shape != first.shape:
            raise ValueError(
                f"all heads' probability maps must have the same shape; head 0 has {tuple(first.shape)}, "
                f"head {index} has {tuple(prob.shape)}"
            )
        low, high = torch.aminmax(prob.detach())
        if low < -PROBABILITY_TOLERANCE or high > 1 + PROBABILITY_TOLERANCE:
            raise ValueError(
                f"head {index}: values in [{float(low):.3g}, {float(high):.3g}] are not probabilities; "
                "pass softmax(logits, dim=1), not logits"
            )


def soft_dice_agreement_loss(
    prob_a: Tensor,
    prob_b: Tensor,
    include_background: bool = True,
    smooth: float = 1e-5,
) -> Tensor:
    """``1 - Dice(p_a, p_b)`` on two ``(B, K, *spatial)`` probability maps, mean over cases and classes.

    Uses ``monai.losses.DiceLoss(soft_label=True)`` (formula in the module docstring): symmetric in
    its arguments and exactly 0 when ``p_a == p_b``.
    """
    from monai.losses import DiceLoss  # MONAI loads all of its modules: only when the term is computed

    dice = DiceLoss(
        include_background=include_background,
        soft_label=True,
        smooth_nr=smooth,
        smooth_dr=smooth,
        reduction="mean",
    )
    return dice(prob_a.float(), prob_b.float())


def cross_modality_agreement_loss(
    probabilities: Sequence[Tensor],
    include_background: bool = True,
    detach_modality: int | None = None,
    smooth: float = 1e-5,
    check_probabilities: bool = True,
) -> Tensor:
    """Mean over unordered modality pairs of ``1 - soft Dice(p_a, p_b)`` on PROBABILITIES.

        L = 2 / (M (M - 1)) * sum_{a < b} (1 - Dice(p_a, p_b))

    ``probabilities`` holds one ``(B, K, *spatial)`` softmax map per modality head (full
    resolution; not logits: values outside [0, 1] raise a ValueError when
    ``check_probabilities``). The loss is 0 for identical maps, symmetric, and grows as the maps
    diverge.

    Gradient flows into BOTH heads of every pair (no detach), so the heads move towards each
    other. ``detach_modality`` (an index) turns one head into a fixed target instead: it gets no
    gradient from this loss and the other heads move towards it, e.g. when one sequence (the
    reference modality, such as bSSFP in MS-CMRSeg) is known to segment far better than the
    others and should not be pulled towards their mistakes.
    """
    if check_probabilities:
        _check_probabilities(probabilities)
    elif len(probabilities) < 2:
        raise ValueError(f"cross-modality agreement needs >= 2 modality heads, got {len(probabilities)}")
    if detach_modality is not None and not 0 <= detach_modality < len(probabilities):
        raise ValueError(f"detach_modality={detach_modality} is not a head index (0..{len(probabilities) - 1})")
    maps = [
        prob.detach() if index == detach_modality else prob for index, prob in enumerate(probabilities)
    ]
    pair_losses = [
        soft_dice_agreement_loss(maps[a], maps[b], include_background=include_background, smooth=smooth)
        for a, b in itertools.combinations(range(len(maps)), 2)
    ]
    return torch.stack(pair_losses).mean()


class CrossModalityAgreementLoss(nn.Module):
    """Module form of :func:`cross_modality_agreement_loss`; options are plain attributes."""

    def __init__(
        self,
        include_background: bool = True,
        detach_modality: int | None = None,
        smooth: float = 1e-5,
        check_probabilities: bool = True,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.detach_modality = detach_modality
        self.smooth = smooth
        self.check_probabilities = check_probabilities

    def forward(self, probabilities: Sequence[Tensor]) -> Tensor:
        """Loss over the heads' softmax maps, each ``(B, K, *spatial)``."""
        return cross_modality_agreement_loss(
            probabilities,
            include_background=self.include_background,
            detach_modality=self.detach_modality,
            smooth=self.smooth,
            check_probabilities=self.check_probabilities,
        )


def masked_agreement_loss(head_probabilities: Sequence[Tensor], target: Tensor, head_fov: Tensor | None = None,
                          smooth: float = 1e-5) -> Tensor:
    """The restricted CAC that cmcseg keeps as an option: each head against a DETACHED target, foreground only,
    inside the head's field of view.

        L = 1/M sum_m (1 - Dice_fg(p_m * fov_m, q * fov_m)),   q = target.detach()

    ``head_probabilities``: M ``(B, K, *)`` softmax maps of the student heads; ``target``: ``(B, K, *)``
    probabilities (e.g. the fused EMA teacher); ``head_fov``: ``(B, M, *)`` masks. Unlike
    :func:`cross_modality_agreement_loss` no head is pulled towards another head's mistakes (the target gets
    no gradient), background is left out, and voxels outside a modality's view do not count.
    """
    if len(head_probabilities) < 1:
        raise ValueError("masked agreement needs at least one head")
    goal = target.detach().float()
    losses = []
    for m, probabilities in enumerate(head_probabilities):
        if probabilities.shape != goal.shape:
            raise ValueError(f"head {m} has shape {tuple(probabilities.shape)}, the target {tuple(goal.shape)}")
        mask = head_fov[:, m:m + 1].float() if head_fov is not None else 1.0
        losses.append(soft_dice_agreement_loss(probabilities.float() * mask, goal * mask, include_background=False,
                                               smooth=smooth))
    return torch.stack(losses).mean()
