"""Losses, one concept per module, each with its formula in the docstring.

- :mod:`~cmcseg.losses.supervised`: nnU-Net's Dice+CE with deep supervision, per modality head.
- :mod:`~cmcseg.losses.channel_semantic_consistency`: CSC, contrastive over bottleneck channels.
- :mod:`~cmcseg.losses.pseudo_label`: cross-modality teaching, confident fused EMA-teacher pseudo-labels.
- :mod:`~cmcseg.losses.cross_modality_agreement`: CAC, 1 - soft Dice between heads' probabilities (and the
  restricted, detached, foreground-only variant).
- :mod:`~cmcseg.losses.mean_teacher`: EMA-teacher consistency, for unpaired modalities.
- :mod:`~cmcseg.losses.rampup`: ramp-up schedules for the unlabeled terms' weights.
"""
from cmcseg.losses.channel_semantic_consistency import (
    ChannelSemanticConsistencyLoss,
    channel_semantic_consistency_loss,
)
from cmcseg.losses.cross_modality_agreement import (
    CrossModalityAgreementLoss,
    cross_modality_agreement_loss,
    masked_agreement_loss,
)
from cmcseg.losses.mean_teacher import (
    MeanTeacherConsistencyLoss,
    create_ema_teacher,
    mean_teacher_consistency_loss,
    update_ema_teacher,
)
from cmcseg.losses.pseudo_label import (
    PseudoLabelLoss,
    adaptive_thresholds,
    class_thresholds,
    confident_pseudo_labels,
    confusion_candidates,
    grouped_candidates,
    hold_background,
)
from cmcseg.losses.rampup import RampUp, linear_rampup, sigmoid_rampup
from cmcseg.losses.supervised import (
    DeepSupervisedDiceCELoss,
    SupervisedDiceCELoss,
    deep_supervision_weights,
    downsample_target,
    ignore_outside_fov,
)

__all__ = [
    "ChannelSemanticConsistencyLoss",
    "CrossModalityAgreementLoss",
    "DeepSupervisedDiceCELoss",
    "MeanTeacherConsistencyLoss",
    "PseudoLabelLoss",
    "RampUp",
    "SupervisedDiceCELoss",
    "channel_semantic_consistency_loss",
    "adaptive_thresholds",
    "class_thresholds",
    "confident_pseudo_labels",
    "confusion_candidates",
    "grouped_candidates",
    "hold_background",
    "create_ema_teacher",
    "cross_modality_agreement_loss",
    "deep_supervision_weights",
    "downsample_target",
    "ignore_outside_fov",
    "linear_rampup",
    "masked_agreement_loss",
    "mean_teacher_consistency_loss",
    "sigmoid_rampup",
    "update_ema_teacher",
]
