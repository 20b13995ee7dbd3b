"""CMCTrainer: semi-supervised multimodal 3D segmentation by Cross Modality Collaboration.

What it adds to :class:`~cmcseg.training.trainer.TrainerBase`: the CMC network
(:func:`cmcseg.networks.build_cmc_network`), its losses, and how a batch feeds them.

A batch holds labeled rows first and unlabeled rows after (``batch["labeled"]``). One forward
pass of the whole batch WITH gradient gives every modality head's logits and every branch's
bottleneck. Then, for paired datasets (every modality of a case on one grid):

* **supervised**: nnU-Net's Dice+CE with deep supervision per modality head, on the labeled
  rows only (the unlabeled rows' targets are -1 and never reach the loss);
* **CSC** (channel-wise semantic consistency) on the bottlenecks of ALL rows;
* **CAC** (cross-modality agreement, ``1 - soft Dice``) on the heads' softmax PROBABILITIES
  of ALL rows, labeled and unlabeled;

    L = w_sup L_sup + w_csc(t) L_csc + w_cac(t) L_cac

with sigmoid ramp-ups ``w(t) = w exp(-5 (1 - t / T)^2)`` over ``T`` epochs. The public code
of the CMC paper ran the unlabeled pass under ``torch.no_grad()``, so its semi-supervised
terms never trained anything; here they back-propagate into encoders, fusion and decoders
(tests/test_trainer.py proves it).

**Unpaired datasets** (``"pairing": "unpaired"`` in the plans, e.g. AMOS CT vs MRI from
different patients): a case has one modality, the others are zeros with an empty field of
view. Two heads never see the same anatomy, so CAC is meaningless and is replaced by a
mean-teacher consistency within each modality: an EMA copy of the network (the teacher) sees
the clean input, the student sees it with Gaussian noise (inside each modality's field of
view), and each head m is pulled towards the teacher's head m on the rows where modality m
is present. CSC is skipped: there are no paired channels to contrast. The same mean-teacher
term is used for a network with a single branch. Each head is supervised only on the rows
where its modality is present (for paired data: every row).

Prediction (validation, and the predictor) averages the heads' probabilities voxel by voxel,
weighted by each modality's field-of-view mask, so a head outside its modality's field of
view (or of an absent modality) does not vote.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from cmcseg.losses import (
    ChannelSemanticConsistencyLoss,
    CrossModalityAgreementLoss,
    RampUp,
    SupervisedDiceCELoss,
    create_ema_teacher,
    mean_teacher_consistency_loss,
    update_ema_teacher,
)
from cmcseg.networks import build_cmc_network
from cmcseg.preprocessing.preprocessor import input_channel_modalities
from cmcseg.training import ddp
from cmcseg.training.progress import WEIGHT_PREFIX
from cmcseg.training.trainer import TrainerBase

log = logging.getLogger(__name__)


def as_scales(output: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """One head's output as a list over deep-supervision scales (full resolution first)."""
    return [output] if isinstance(output, Tensor) else list(output)


def fov_weighted_ensemble(head_probabilities: Sequence[Tensor], fov: Tensor) -> Tensor:
    """Voxel-wise mean of M heads' ``(B, K, *)`` probabilities weighted by the ``(B, M, *)`` FOV masks.

    A head votes only inside its modality's field of view; where no modality is in view (e.g.
    sliding-window padding) the plain mean is used. One head is returned as it is.
    """
    probabilities = torch.stack([p.float() for p in head_probabilities])  # (M, B, K, *)
    if probabilities.shape[0] == 1:
        return probabilities[0]
    weights = fov[:, :probabilities.shape[0]].float().transpose(0, 1).unsqueeze(2)  # (M, B, 1, *)
    weight_sum = weights.sum(0)
    weighted = (weights * probabilities).sum(0) / weight_sum.clamp_min(1e-6)
    return torch.where(weight_sum > 0, weighted, probabilities.mean(0))


class CMCTrainer(TrainerBase):
    """The CMC method: M modality branches, supervised Dice+CE per head, CSC and CAC on all rows."""

    # ---- network
    shared_decoder: bool = False
    fusion: bool | None = None  # None: the network's default (on with >= 2 branches)
    channel_attention: bool | None = None
    # ---- supervised term
    supervised_weight: float = 1.0
    # ---- channel-wise semantic consistency (paired)
    csc_weight: float = 0.1
    csc_rampup_epochs: float = 100.0
    csc_temperature: float = 0.1
    # ---- cross-modality agreement (paired)
    cac_weight: float = 1.0
    cac_rampup_epochs: float = 100.0
    cac_include_background: bool = True
    cac_detach_modality: int | None = None
    # ---- mean teacher (unpaired, or a single branch)
    mean_teacher_weight: float = 0.1
    mean_teacher_rampup_epochs: float = 100.0
    ema_alpha: float = 0.99
    student_noise_std: float = 0.1
    student_noise_clip: float = 0.2

    # =================================================================================== building
    def build_network(self) -> nn.Module:
        """The CMC network of the plan, with the encoder options of the request."""
        request = self.request
        network = build_cmc_network(
            self.plans, self.configuration, encoder=request.encoder, shared_encoder=request.shared_encoder,
            encoder_weights=request.encoder_weights, deep_supervision=self.deep_supervision,
            shared_decoder=self.shared_decoder, fusion=self.fusion, channel_attention=self.channel_attention)
        self.channel_modalities = input_channel_modalities(self.plans["channels_per_modality"])
        self.num_modalities = len(self.plans["channels_per_modality"])
        paired = str(self.plans.get("pairing", "paired")).lower() != "unpaired"
        self.cross_modality = paired and network.n_branches > 1
        if not self.cross_modality:
            why = "unpaired modalities" if not paired else "a single branch"
            log.info("CMC with %s: mean-teacher consistency within each modality replaces CAC; CSC is off", why)
        return network

    def build_losses(self) -> None:
        """Loss modules and ramp-ups from the class attributes; the EMA teacher when needed."""
        self.supervised_loss = SupervisedDiceCELoss(batch_dice=bool(self.config.get("batch_dice", False)),
                                                    ignore_label=self.labels.ignore_label)
        self.csc_loss = ChannelSemanticConsistencyLoss(self.csc_temperature)
        self.cac_loss = CrossModalityAgreementLoss(include_background=self.cac_include_background,
                                                   detach_modality=self.cac_detach_modality)
        self.csc_ramp = RampUp(self.csc_weight, self.csc_rampup_epochs, "sigmoid", "epoch")
        self.cac_ramp = RampUp(self.cac_weight, self.cac_rampup_epochs, "sigmoid", "epoch")
        self.mean_teacher_ramp = RampUp(self.mean_teacher_weight, self.mean_teacher_rampup_epochs, "sigmoid", "epoch")
        self.teacher: nn.Module | None = None
        if not self.cross_modality:
            self.teacher = create_ema_teacher(ddp.unwrap_model(self.network))
        longest = max(self.csc_rampup_epochs, self.cac_rampup_epochs, self.mean_teacher_rampup_epochs)
        if longest > self.num_epochs:
            log.warning("ramp-ups of up to %g epochs are longer than the %d epochs of training: the unlabeled "
                        "terms never reach their full weight", longest, self.num_epochs)

    # =================================================================================== batch helpers
    @property
    def num_image_channels(self) -> int:
        """Modality channels at the front of the input; the FOV masks follow."""
        return len(self.channel_modalities)

    def modality_presence(self, x: Tensor) -> Tensor:
        """``(B, M)`` bool: True where the row's modality m has a non-empty field of view."""
        fov = x[:, self.num_image_channels:self.num_image_channels + self.num_modalities]
        return fov.flatten(2).amax(2) > 0.5

    def noisy_student_input(self, x: Tensor) -> Tensor:
        """``x`` with clipped Gaussian noise on the modality channels, inside each modality's field of view."""
        n = self.num_image_channels
        noise = (torch.randn_like(x[:, :n]) * self.student_noise_std).clamp(-self.student_noise_clip,
                                                                           self.student_noise_clip)
        fov = x[:, [n + m for m in self.channel_modalities]]
        return torch.cat([x[:, :n] + noise * fov, x[:, n:]], dim=1)

    # =================================================================================== losses
    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """Supervised term on labeled rows; CSC + CAC (paired) or mean teacher (unpaired) on all rows."""
        x = batch["data"]
        labeled = batch["labeled"].to(x.device).bool()
        targets = as_scales(batch["target"])
        present = self.modality_presence(x)
        student_input = x if self.cross_modality else self.noisy_student_input(x)
        output = self.network(student_input)
        heads = [as_scales(h) for h in output.logits]
        losses: dict[str, Tensor] = {"supervised": self.supervised_term(heads, targets, labeled, present)}
        total = self.supervised_weight * losses["supervised"]
        step = self.epoch_progress
        if self.cross_modality:
            probabilities = [torch.softmax(h[0].float(), dim=1) for h in heads]
            losses["csc"] = self.csc_loss(output.bottlenecks)
            losses["cac"] = self.cac_loss(probabilities)
            weights = {"csc": self.csc_ramp(step), "cac": self.cac_ramp(step)}
        else:
            losses["mean_teacher"] = self.mean_teacher_term(x, heads, present)
            weights = {"mean_teacher": self.mean_teacher_ramp(step)}
        for key, weight in weights.items():
            total = total + weight * losses[key]
        return {"loss": total, **losses, **{f"{WEIGHT_PREFIX}{k}": torch.tensor(w) for k, w in weights.items()}}

    def supervised_term(self, heads: list[list[Tensor]], targets: list[Tensor], labeled: Tensor,
                        present: Tensor) -> Tensor:
        """Mean over heads of Dice+CE on the labeled rows where the head's modality is present.

        Zero (still attached to the graph) when no head has such a row, e.g. an unlabeled-only batch.
        """
        per_head = []
        for m, scales in enumerate(heads):
            rows = (labeled & present[:, m]) if len(heads) > 1 else labeled
            if bool(rows.any()):
                per_head.append(self.supervised_loss([[s[rows] for s in scales]], [t[rows] for t in targets]))
        if not per_head:
            return sum(scales[0].sum() * 0.0 for scales in heads)
        return torch.stack(per_head).mean()

    def mean_teacher_term(self, x: Tensor, student_heads: list[list[Tensor]], present: Tensor) -> Tensor:
        """Softmax-MSE between each student head and the EMA teacher's same head, on rows with that modality."""
        assert self.teacher is not None
        self.teacher.train(self.network.training)
        with torch.no_grad():
            teacher_heads = [as_scales(h) for h in self.teacher(x).logits]
        per_head = []
        for m, (student, teacher) in enumerate(zip(student_heads, teacher_heads)):
            rows = present[:, m] if len(student_heads) > 1 else torch.ones_like(present[:, 0])
            if bool(rows.any()):
                per_head.append(mean_teacher_consistency_loss(student[0][rows], teacher[0][rows]))
        if not per_head:
            return sum(h[0].sum() * 0.0 for h in student_heads)
        return torch.stack(per_head).mean()

    def on_after_optimizer_step(self) -> None:
        """Move the EMA teacher towards the student."""
        if self.teacher is not None:
            update_ema_teacher(self.teacher, ddp.unwrap_model(self.network), self.ema_alpha, self.global_step)

    # =================================================================================== prediction
    def predict_probabilities(self, x: Tensor) -> Tensor:
        """Heads' softmax maps averaged voxel-wise with each modality's FOV mask as weight."""
        output = self.inference_network()(x)
        heads = [torch.softmax(as_scales(h)[0].float(), dim=1) for h in output.logits]
        return fov_weighted_ensemble(heads, x[:, self.num_image_channels:])

    # =================================================================================== state
    def extra_state(self) -> dict[str, Any]:
        """The EMA teacher's weights (unpaired datasets)."""
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the EMA teacher."""
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
