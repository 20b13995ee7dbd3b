"""Cross-modality teaching by confident pseudo-labels: the prediction-level unlabeled term of CMC.

An EMA teacher of the whole multi-branch network sees a weakly augmented patch. Its heads'
probabilities are fused (field-of-view weighted, with per-head, per-class reliability weights;
:func:`cmcseg.networks.cmc.fov_weighted_ensemble`), and the fused map gives hard pseudo-labels
where it is confident. Every student head, run on a strongly augmented copy of the same patch,
learns those labels inside its own field of view:

    y_hat(x)  = argmax_k p_T(k | x)                   (fused teacher)
    keep(x)   = max_k p_T(k | x) >= tau[y_hat(x)]     (per-class thresholds: thin classes may need a lower one)
    L_pl      = 1/M sum_m [ CE + foreground soft Dice ](z_m, y_hat) over {x : keep(x) and fov_m(x)}

Classes a head has not learned yet (its reliability, the EMA Dice on labeled rows, below a bar) are merged into
background for that head, a marginal loss: ``p'(bg) = p(bg) + sum_{u unreliable} p(u)``, and their own
pseudo-labels are ignored. A teacher that has not learned a thin class yet calls it background, confidently; a
plain CE on those labels teaches the student that the class does not exist before the labeled rows can teach
it (on real cardiac MRI the RV and scar never appeared). Merged, such a voxel only says "not one of the learned
classes", which is true.

Where the labeled rows show that a predicted class often stands for another (``confusion_candidates``: on real
cardiac MRI, most voxels called scar near the labeled edema are edema), a pseudo-label of that class becomes a set of
candidates: its CE is the marginal ``-log sum_{j in S(y_hat)} p(j)`` and it leaves the Dice term. The voxel still
says "one of these, none of the others", and the labeled rows alone decide between the candidates; a hard label
would teach the student the teacher's confusion.

The teacher is a detached target, so the good head (e.g. LGE, on the label grid) is never
pulled towards a weak one; the fused target already carries the strong heads' votes. Hard
labels reward confidence, unlike the symmetric soft-Dice agreement this replaces, which two
identical flat maps satisfy perfectly. The loss is nnU-Net's own ``DC_and_CE_loss`` with an
ignore value for the voxels that are not kept; it supervises each head's full-resolution output
(the coarse deep-supervision outputs learn from the labeled rows).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cmcseg.losses.supervised import DeepSupervisedDiceCELoss, ignore_outside_fov


def class_thresholds(threshold: float | Sequence[float], num_classes: int, device: torch.device | None = None
                     ) -> Tensor:
    """A ``(K,)`` tensor of confidence thresholds: one value for every class, or one per class."""
    if isinstance(threshold, (int, float)):
        values = [float(threshold)] * num_classes
    else:
        values = [float(t) for t in threshold]
        if len(values) != num_classes:
            raise ValueError(f"{len(values)} pseudo-label thresholds for {num_classes} classes; give one per class "
                             "(background first) or a single value")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"pseudo-label thresholds must lie in [0, 1], got {values}")
    return torch.tensor(values, dtype=torch.float32, device=device)


def confident_pseudo_labels(probabilities: Tensor, thresholds: Tensor, ignore_value: int) -> tuple[Tensor, Tensor]:
    """Hard labels ``(B, 1, *)`` of ``(B, K, *)`` probabilities, ``ignore_value`` where the confidence is below
    the threshold of the predicted class; also the boolean keep mask ``(B, 1, *)``."""
    confidence, label = probabilities.detach().float().max(dim=1, keepdim=True)
    keep = confidence >= thresholds.to(probabilities.device)[label]
    return torch.where(keep, label, torch.full_like(label, ignore_value)), keep


def adaptive_thresholds(thresholds: Tensor, reliability: Tensor, floor: float) -> Tensor:
    """Per-class thresholds lowered for the classes the network has learned least (FlexMatch's curriculum, Zhang et
    al., NeurIPS 2021, with the labeled rows' EMA Dice as the learning effect): ``beta_k = r_k / max_j r_j`` over
    the foreground classes, ``tau_k = max(floor, tau_k * beta_k / (2 - beta_k))``, never above ``tau_k``;
    background keeps its own. ``floor`` 0 turns it off. A hard class rarely reaches a fixed confidence, so a fixed
    threshold lets the unlabeled rows teach the easy classes alone, and the easy classes on the hard class's voxels."""
    if floor <= 0:
        return thresholds
    r = reliability.to(thresholds.device).float().clamp_min(0.0)
    beta = r / r[1:].max().clamp_min(1e-6)
    beta[0] = 1.0
    lowered = thresholds * beta / (2.0 - beta)
    return torch.minimum(thresholds, lowered.clamp_min(float(floor)))


def confusion_candidates(confusion: Tensor, share: float) -> Tensor:
    """``(K, K)`` bool, row ``k``: the classes a prediction of ``k`` stands for. ``confusion[j, k]`` counts voxels of
    true class ``j`` predicted ``k`` (labeled rows); class ``j`` is a candidate of ``k`` when it is ``k`` or makes
    up at least ``share`` of the voxels predicted ``k``. ``share`` 0 (off), or a class never predicted: ``k`` alone."""
    k = confusion.shape[-1]
    identity = torch.eye(k, dtype=torch.bool, device=confusion.device)
    if share <= 0:
        return identity
    counts = confusion.double()
    of_prediction = counts / counts.sum(0, keepdim=True).clamp_min(1e-12)  # [true j, predicted k]
    return identity | (of_prediction >= share).T


def grouped_candidates(groups: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """``(K, K)`` bool: each class stands for itself and for every class it shares a group with (classes the user
    knows to be confusable, e.g. nested pathologies)."""
    candidates = torch.eye(num_classes, dtype=torch.bool)
    for group in groups:
        members = [int(c) for c in group]
        if any(not 0 <= c < num_classes for c in members):
            raise ValueError(f"confusable classes {members}: every class must lie in 0..{num_classes - 1}")
        index = torch.tensor(members, dtype=torch.long)
        candidates[index.unsqueeze(1), index.unsqueeze(0)] = True
    return candidates


def candidate_cross_entropy(logits: Tensor, allowed: Tensor, valid: Tensor) -> Tensor:
    """Mean over ``valid`` voxels (``(B, 1, *)``) of ``-log sum_j p(j)`` over the ``allowed`` classes (``(B, K, *)``
    bool, at least one per valid voxel): the CE of a set-valued label, plain CE where the set is one class."""
    log_p = torch.log_softmax(logits.float(), 1).masked_fill(~allowed, float("-inf"))
    nll = -torch.logsumexp(log_p, 1, keepdim=True)
    return nll[valid].mean()


class PseudoLabelLoss(DeepSupervisedDiceCELoss):
    """CE + foreground soft Dice of each student head against the fused teacher's confident hard labels.

    ``ignore_value`` must be a value no class uses (the trainer passes the number of classes, or the
    plan's ignore label). The target of head m is ``ignore_value`` wherever the voxel is not kept or
    lies outside modality m's field of view, so those voxels send no gradient. A head with no kept
    voxel in its field of view contributes nothing; with none for any head the loss is 0 (attached).
    """

    def __init__(self, ignore_value: int, batch_dice: bool = False) -> None:
        super().__init__(batch_dice=batch_dice, ignore_label=int(ignore_value))
        self.dice_only = DeepSupervisedDiceCELoss(batch_dice=batch_dice, ignore_label=int(ignore_value), weight_ce=0.0)

    def forward(self, head_logits: Sequence[Tensor], pseudo_labels: Tensor,  # type: ignore[override]
                head_fov: Tensor | None = None, learned: Tensor | None = None, candidates: Tensor | None = None,
                from_teacher: Tensor | None = None) -> Tensor:
        """``head_logits``: M full-resolution ``(B, K, *)`` logits; ``pseudo_labels``: ``(B, 1, *)`` from
        :func:`confident_pseudo_labels`; ``head_fov``: ``(B, M, *)`` masks (None: every voxel in view);
        ``learned``: ``(M, K)`` bool, the classes each head has learned (None: all); the others are merged into
        background (see the module docstring). ``candidates``: ``(K, K)`` bool from :func:`confusion_candidates`
        or :func:`grouped_candidates` (None: every label is one class); it applies to the voxels whose label is the
        teacher's, ``from_teacher`` ``(B, 1, *)`` bool (None: all; copy-paste puts true labels beside them)."""
        ignore = int(self.ignore_label)  # type: ignore[arg-type]
        if candidates is not None and learned is not None and not bool(learned[:, 1:].all()):
            raise ValueError("candidate sets and merged unlearned classes cannot be combined; use one of the two")
        losses = []
        for m, logits in enumerate(head_logits):
            target = pseudo_labels if head_fov is None else ignore_outside_fov(pseudo_labels, head_fov[:, m:m + 1],
                                                                               ignore)
            if learned is not None and not bool(learned[m, 1:].all()):
                logits, target = merge_unlearned(logits, target, learned[m], ignore)
            if bool((target != ignore).any()):
                losses.append(self.candidate_loss(logits, target, candidates, from_teacher))
        if not losses:
            return torch.stack([logits.sum() * 0.0 for logits in head_logits]).sum()
        return torch.stack(losses).mean()

    def candidate_loss(self, logits: Tensor, target: Tensor, candidates: Tensor | None,
                       from_teacher: Tensor | None) -> Tensor:
        """Dice+CE of one head; the teacher's labels with several candidates count in the CE as their set and not
        in the Dice term."""
        several = candidates.sum(1) > 1 if candidates is not None else None
        if several is None or not bool(several.any()):  # hard labels: nothing to look up per voxel
            return super().forward([logits], [target])
        assert candidates is not None
        ignore = int(self.ignore_label)  # type: ignore[arg-type]
        valid = target != ignore
        label = torch.where(valid, target, torch.zeros_like(target)).long().clamp(0, logits.shape[1] - 1)
        ambiguous = valid & several.to(target.device)[label]
        if from_teacher is not None:
            ambiguous = ambiguous & from_teacher.to(ambiguous.device)
        if not bool(ambiguous.any()):
            return super().forward([logits], [target])
        one_hot = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, label, True)
        allowed = one_hot | (candidates.to(logits.device)[label.squeeze(1)].movedim(-1, 1) & ambiguous)
        dice_target = torch.where(ambiguous, torch.full_like(target, ignore), target)
        return self.dice_only([logits], [dice_target]) + candidate_cross_entropy(logits, allowed, valid)


def hold_background(pseudo_labels: Tensor, reliability: Tensor, bar: float, ignore_value: int) -> tuple[Tensor, bool]:
    """``pseudo_labels`` with the background ones ignored while some foreground class's reliability (``(K,)``, the
    best head's EMA Dice on labeled rows) is below ``bar``; also whether background is taught. A teacher that has
    not learned a class calls it background, and that label is confident: held back, the unlabeled rows teach only
    the classes the teacher knows, and the labeled rows alone decide where a class still being learned ends."""
    if bar <= 0 or bool((reliability[1:] >= bar).all()):
        return pseudo_labels, True
    return torch.where(pseudo_labels == 0, torch.full_like(pseudo_labels, int(ignore_value)), pseudo_labels), False


def merge_unlearned(logits: Tensor, target: Tensor, learned: Tensor, ignore_value: int) -> tuple[Tensor, Tensor]:
    """``(B, K, *)`` logits and ``(B, 1, *)`` labels with the classes not ``learned`` (``(K,)`` bool; index 0,
    background, always kept) merged into background: log-probabilities of background + those classes, then the
    learned classes; labels renumbered, and labels of the merged classes ignored."""
    keep = learned.clone().bool()
    keep[0] = True
    kept = torch.nonzero(keep).flatten()  # background first, then the learned classes
    probabilities = torch.softmax(logits.float(), 1)
    columns = torch.cat([probabilities[:, 0:1] + probabilities[:, ~keep].sum(1, keepdim=True),
                         probabilities[:, kept[1:]]], 1)
    lookup = torch.full((max(int(ignore_value), logits.shape[1]) + 1,), int(ignore_value), dtype=torch.long,
                        device=target.device)
    lookup[kept.to(target.device)] = torch.arange(len(kept), device=target.device)
    renumbered = lookup[target.long().clamp(0, len(lookup) - 1)]
    return columns.clamp_min(1e-8).log(), renumbered.to(target.dtype)
