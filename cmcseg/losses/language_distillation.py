"""Language-guided semantic correlation distillation (LSCD) of Any2Seg, and the EMA visual teacher.

Notation: ``f_{b,m}`` the student's features of modality ``m`` of sample ``b`` (present:
``a_{b,m} = 1``), ``T`` the EMA teacher's fused features computed with ALL modalities present
and ``T_{b,m}`` its per-modality features (present there: ``a'_{b,m} = 1``), ``t_k`` the frozen,
L2-normalised text anchor of class ``k`` (``K x D``), ``P`` a learnable linear projection from
visual channels to the text space ``D``, ``P'`` its EMA copy (no gradient;
``P' <- a P' + (1 - a) P`` after each optimizer step, with the EMA teacher's decay and ramp),
which maps the teacher's features so that the target does not move with the student's
projection, ``n(.)`` L2 normalisation, ``tau`` a temperature: 0.01 by default, CLIP's
``1 / logit_scale`` (CLIP and LanguageBind learn ``logit_scale`` up to its cap of 100). Cosines
in such a space span a narrow range (image-text cosines of all classes lie within about 0.1 of
each other), so ``tau = 0.1`` would make every class distribution nearly uniform; the same fixed
value serves both teachers.

* **Inter-modal** (language-guided class distributions). Per token ``x`` (of stage
  ``inter_stage``, or of the pooled map when the target is global)::

      p_{b,m}(k | x) = softmax_k( <n(P f_{b,m}(x)), t_k> / tau )          student, per present modality
      q_b(k | x)     = softmax_k( <n(P' T_b(x)),    t_k> / tau )          teacher (no gradient)
      L_inter = mean_{b, m: a_bm = 1} mean_x  KL(q_b || p_{b,m})
              = mean sum_k q log(q / p)

  With a teacher that has image towers (LanguageBind), ``q_b`` may instead be given globally,
  ``q_b(k) = softmax_k(<e_b, t_k> / tau)`` with ``e_b`` its full-modality embedding; the student
  side is then pooled over tokens.

* **Inter-modal correlation** (the M x M modality structure, in addition to the distributions).
  Per sample, the present modalities' features of stage ``inter_stage``, pooled over tokens and
  mapped to the text space: ``z_{b,m} = n(P mean_x f_{b,m}(x))`` (student) and
  ``z'_{b,m} = n(P' mean_x T_{b,m}(x))`` (teacher, no gradient)::

      C_b(m, m')  = <z_{b,m},  z_{b,m'}>            C'_b(m, m') = <z'_{b,m}, z'_{b,m'}>
      L_corr = mean_{b, m != m': a_bm a_bm' a'_bm a'_bm' = 1} (C_b(m, m') - C'_b(m, m'))^2

  Only pairs of modalities present in both count (a row with one modality has none). The cosines
  are taken between the projected features, not the class distributions: at ``tau = 0.01`` those
  are nearly one-hot, and their cosines (about 0 or 1) would carry almost no gradient.

* **Intra-modal** (token affinity). Features of stage ``intra_stage``, average-pooled to at most
  ``affinity_size x affinity_size`` tokens (memory O(B M N^2) with N <= affinity_size^2)::

      A(f)_{ij} = <n(f_i), n(f_j)>                     (cosine Gram matrix over tokens i, j)
      L_intra   = mean_{b, m: a_bm = 1} (1 / N^2) sum_ij (A(f_{b,m})_{ij} - A(T_b)_{ij})^2

* **Text alignment** (optional, needs labels): anchors the projection ``P`` so that the
  inter-modal distributions mean classes, and rules out the trivial solution of a projection
  that makes every distribution uniform::

      L_align = CE( <n(P F_b(x)), t_k> / tau , y_b(x) )      F the student's fused features,
                                                               y the label at that token (nearest)

  ``total = inter_weight L_inter + correlation_weight L_corr + intra_weight L_intra + align_weight L_align``.

The distillation terms are exactly zero when each present modality's features equal the
teacher's (e.g. identical modalities and a freshly copied EMA teacher), and send gradient into
the backbone otherwise.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmcseg.losses.mean_teacher import create_ema_teacher, update_ema_teacher
from cmcseg.networks.any2seg import Any2SegNetwork, Any2SegOutput


@dataclass
class LSCDTerms:
    """The LSCD terms of one batch (unweighted) and their weighted sum ``total``."""

    inter: Tensor
    intra: Tensor
    correlation: Tensor
    align: Tensor
    total: Tensor


def _masked_mean(values: Tensor, present: Tensor) -> Tensor:
    """Mean of ``values (B, M)`` over the present entries of ``present (B, M)``."""
    weights = present.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def token_affinity(features: Tensor, max_size: int) -> Tensor:
    """Cosine Gram matrix ``(..., N, N)`` over the tokens of ``features (..., C, h, w)``.

    The map is average-pooled to at most ``max_size x max_size`` tokens first, to bound memory.
    """
    lead, (c, h, w) = features.shape[:-3], features.shape[-3:]
    x = features.reshape(-1, c, h, w)
    if h > max_size or w > max_size:
        x = F.adaptive_avg_pool2d(x, (min(h, max_size), min(w, max_size)))
    tokens = F.normalize(x.flatten(2), dim=1)                                    # (L, C, N)
    gram = tokens.transpose(1, 2) @ tokens                                      # (L, N, N)
    return gram.reshape(*lead, *gram.shape[-2:])


class LSCDLoss(nn.Module):
    """LSCD (formulas in the module docstring). Holds the learnable projection ``P`` (``self.projection``) and its
    EMA copy ``P'`` (``self.ema_projection``, no gradient, moved by :meth:`update_ema`), which maps the teacher.

    ``feature_dim``: channels of stage ``inter_stage`` (see :meth:`for_model`); ``text_dim``: the
    teacher's embedding dimension D. Weights and settings are plain attributes.
    """

    def __init__(self, feature_dim: int, text_dim: int, temperature: float = 0.01, inter_weight: float = 1.0,
                 intra_weight: float = 1.0, align_weight: float = 1.0, correlation_weight: float = 1.0,
                 inter_stage: int = -1, intra_stage: int = -1, affinity_size: int = 16, ignore_index: int = -1):
        super().__init__()
        self.projection = nn.Linear(feature_dim, text_dim)
        self.ema_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.temperature = temperature
        self.inter_weight = inter_weight
        self.intra_weight = intra_weight
        self.align_weight = align_weight
        self.correlation_weight = correlation_weight
        self.inter_stage = inter_stage
        self.intra_stage = intra_stage
        self.affinity_size = affinity_size
        self.ignore_index = ignore_index

    @classmethod
    def for_model(cls, model: Any2SegNetwork, text_dim: int, **options: Any) -> LSCDLoss:
        """An LSCD loss whose projection fits ``model``'s ``inter_stage`` channels."""
        stage = int(options.get("inter_stage", -1))
        return cls(model.stage_channels[stage], text_dim, **options)

    @torch.no_grad()
    def update_ema(self, decay: float, step: int) -> None:
        """One EMA step of ``P'`` towards ``P`` (after an optimizer step; ``step`` the global step, 0-based)."""
        update_ema_teacher(self.ema_projection, self.projection, decay, step)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As :meth:`nn.Module.load_state_dict`; a state saved before ``P'`` existed starts ``P'`` from its ``P``."""
        state = dict(state_dict)
        if not any(key.startswith("ema_projection.") for key in state):
            state.update({f"ema_{key}": value for key, value in state_dict.items() if key.startswith("projection.")})
        return super().load_state_dict(state, strict, assign)

    # ------------------------------------------------------------------------------ pieces
    def class_logits(self, features: Tensor, anchors: Tensor, spatial: bool = True,
                     projection: nn.Module | None = None) -> Tensor:
        """``<n(P f), t_k> / tau``: ``(..., C, h, w) -> (..., K, h, w)`` (``spatial``) or ``(..., C) -> (..., K)``;
        ``projection`` replaces ``P`` (e.g. ``P'``)."""
        anchors = F.normalize(anchors.to(features.device, features.dtype), dim=-1)
        x = features.movedim(-3, -1) if spatial else features                     # (..., [h, w,] C)
        z = F.normalize((self.projection if projection is None else projection)(x), dim=-1)
        logits = z @ anchors.t() / self.temperature                               # (..., [h, w,] K)
        return logits.movedim(-1, -3) if spatial else logits

    def teacher_log_probs(self, teacher_features: Tensor, anchors: Tensor) -> Tensor:
        """The target ``log q`` from the teacher's fused features ``(B, C, h, w)`` through ``P'`` (no gradient):
        ``(B, K, h, w)``."""
        with torch.no_grad():
            return F.log_softmax(self.class_logits(teacher_features.detach(), anchors,
                                                   projection=self.ema_projection), dim=-3)

    @staticmethod
    def embedding_log_probs(embeddings: Tensor, anchors: Tensor, temperature: float) -> Tensor:
        """The global target ``log q_b = log softmax_k(<e_b, t_k> / tau)`` from teacher embeddings ``(B, D)``."""
        anchors = F.normalize(anchors.to(embeddings.device, embeddings.dtype), dim=-1)
        return F.log_softmax(F.normalize(embeddings, dim=-1) @ anchors.t() / temperature, dim=-1).detach()

    def inter_modal(self, features: Tensor, present: Tensor, target_log_probs: Tensor, anchors: Tensor) -> Tensor:
        """``L_inter`` for student features ``(B, M, C, h, w)``; target ``(B, K, h, w)`` or global ``(B, K)``."""
        if target_log_probs.dim() == 2:
            features = features.mean(dim=(-2, -1))                                 # (B, M, C)
            log_p = F.log_softmax(self.class_logits(features, anchors, spatial=False), dim=-1)  # (B, M, K)
            log_q = target_log_probs.unsqueeze(1)
            kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)                      # (B, M)
        else:
            log_p = F.log_softmax(self.class_logits(features, anchors), dim=-3)    # (B, M, K, h, w)
            log_q = target_log_probs.unsqueeze(1)
            kl = (log_q.exp() * (log_q - log_p)).sum(dim=-3).mean(dim=(-2, -1))   # (B, M)
        return _masked_mean(kl, present)

    def modality_embeddings(self, features: Tensor, projection: nn.Module | None = None) -> Tensor:
        """``z = n(P mean_x f)``: per-modality embeddings ``(B, M, D)`` in the text space of ``(B, M, C, h, w)``;
        ``projection`` replaces ``P`` (e.g. ``P'``)."""
        pooled = features.mean(dim=(-2, -1))
        return F.normalize((self.projection if projection is None else projection)(pooled), dim=-1)

    def inter_modal_correlation(self, features: Tensor, present: Tensor, teacher_features: Tensor,
                                teacher_present: Tensor | None = None) -> Tensor:
        """``L_corr`` for student features ``(B, M, C, h, w)`` and the teacher's per-modality ones (same shape).

        Pairs ``m != m'`` absent from either side are masked out (``torch.where``: their values, whatever they
        are, change neither the loss nor the gradient).
        """
        z = self.modality_embeddings(features)
        student = z @ z.transpose(-1, -2)                                          # (B, M, M)
        with torch.no_grad():
            z_t = self.modality_embeddings(teacher_features.detach(), self.ema_projection)
            target = z_t @ z_t.transpose(-1, -2)
        mask = present.bool() if teacher_present is None else present.bool() & teacher_present.bool()
        eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        pairs = mask[:, :, None] & mask[:, None, :] & ~eye
        squared = torch.where(pairs, (student - target) ** 2, torch.zeros_like(student))
        return squared.sum() / pairs.sum().clamp_min(1)

    def intra_modal(self, features: Tensor, present: Tensor, teacher_features: Tensor) -> Tensor:
        """``L_intra`` for student features ``(B, M, C, h, w)`` and teacher fused features ``(B, C, h, w)``."""
        student = token_affinity(features, self.affinity_size)                    # (B, M, N, N)
        with torch.no_grad():
            target = token_affinity(teacher_features.detach(), self.affinity_size).unsqueeze(1)
        mse = ((student - target) ** 2).mean(dim=(-2, -1))                        # (B, M)
        return _masked_mean(mse, present)

    def text_alignment(self, fused: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
        """``L_align``: cross-entropy of the fused features' class logits against labels ``(B, H, W)`` (nearest)."""
        logits = self.class_logits(fused, anchors)                                # (B, K, h, w)
        target = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        if bool((target == self.ignore_index).all()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)

    # ------------------------------------------------------------------------------- total
    def forward(self, student: Any2SegOutput, teacher: Any2SegOutput, anchors: Tensor, labels: Tensor | None = None,
                teacher_embeddings: Tensor | None = None) -> LSCDTerms:
        """All LSCD terms of a batch.

        ``teacher``: the EMA teacher's output with all modalities present (its per-modality features give the
        correlation target). ``teacher_embeddings``
        ``(B, D)``: a language-vision teacher's full-modality embedding; when given it is the
        inter-modal target instead of the EMA representation. ``labels`` ``(B, H, W)`` enable
        ``L_align`` (pass None for unlabeled batches).
        """
        if student.present is None:
            raise ValueError("the student output carries no presence mask")
        feats = student.features[self.inter_stage]
        if teacher_embeddings is not None:
            target = self.embedding_log_probs(teacher_embeddings, anchors, self.temperature)
        else:
            target = self.teacher_log_probs(teacher.fused[self.inter_stage], anchors)
        inter = self.inter_modal(feats, student.present, target, anchors)
        if self.correlation_weight:
            correlation = self.inter_modal_correlation(feats, student.present, teacher.features[self.inter_stage],
                                                       teacher.present)
        else:
            correlation = inter.new_zeros(())
        intra = self.intra_modal(student.features[self.intra_stage], student.present, teacher.fused[self.intra_stage])
        if labels is not None and self.align_weight:
            align = self.text_alignment(student.fused[self.inter_stage], labels, anchors)
        else:
            align = inter.new_zeros(())
        total = (self.inter_weight * inter + self.correlation_weight * correlation + self.intra_weight * intra
                 + self.align_weight * align)
        return LSCDTerms(inter=inter, intra=intra, correlation=correlation, align=align, total=total)


class EMATeacherModel(nn.Module):
    """An EMA copy of an :class:`Any2SegNetwork` that gives the full-modality visual target, without gradient.

    ``theta_t <- a theta_t + (1 - a) theta_s`` with ``a = min(1 - 1/(step + 1), decay)``
    (:func:`cmcseg.losses.mean_teacher.update_ema_teacher`; buffers are copied). It always runs
    in eval mode, whatever mode its parent is put in.
    """

    def __init__(self, student: Any2SegNetwork, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.model: Any2SegNetwork = create_ema_teacher(student)
        self.model.eval()

    def train(self, mode: bool = True) -> EMATeacherModel:
        """Stays in eval mode (no dropout, BatchNorm running statistics)."""
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, student: Any2SegNetwork, step: int) -> None:
        """One EMA step towards ``student`` (``step`` is the global optimiser step, 0-based)."""
        update_ema_teacher(self.model, student, self.decay, step)

    @torch.no_grad()
    def forward(self, images: Tensor, present: Tensor | Sequence[bool] | None = None) -> Any2SegOutput:
        """The teacher's output; ``present`` None means all modalities (the full-modality representation)."""
        return self.model(images, present)
