"""CMCTrainer: semi-supervised multimodal 3D segmentation by Cross Modality Collaboration.

What it adds to :class:`~cmcseg.training.trainer.TrainerBase`: the CMC network
(:func:`cmcseg.networks.build_cmc_network`), its losses, and how a batch feeds them.

The network. By default (``single_branch = True``) one nnU-Net-style encoder-decoder takes every modality as input
channels, with their field-of-view (FOV) masks; the teacher's prediction from all modalities teaches the student.
With ``strong_drop_modality`` > 0 the student's view also loses a modality and must still give what the teacher read
from all of them (off by default: on real cardiac MRI it cost accuracy, see README). One network costs what
nnU-Net's costs; one branch per modality costs M times as much, and was less accurate on real cardiac MRI at
equal iterations (benchmarks/semi_supervised_gain.py; see README). The paper's layout,
an encoder-decoder per modality fused at the bottleneck, with CSC between the branches, is
:class:`CMCBranchesTrainer` (``--trainer cmc_branches``). Each modality's own prediction is its branch's head, or
the single network run on that modality alone (:meth:`CMCNetwork.predict_with_heads`).

A batch holds the plan's batch of labeled rows first and, with unlabeled cases, unlabeled rows
on top (``batch["labeled"]``). For paired datasets (every modality of a case on one grid):

* **supervised**: nnU-Net's Dice+CE with deep supervision per head, on the labeled
  rows, each head only inside its modality's field of view (voxels outside are ignored);
* **pseudo-label** (cross-modality teaching, :mod:`cmcseg.losses.pseudo_label`): an EMA teacher
  of the whole network sees the unlabeled rows as loaded (the weak view); its heads are fused
  with FOV and per-head, per-class reliability weights, and its confident argmax teaches every
  student head, which sees a strongly augmented copy (same spatial transform, per-modality
  intensity perturbations, one modality dropped with probability ``strong_drop_modality``), inside the
  field of view of the student's own input. By default (``copy_paste_box = 2/3``) each unlabeled row of
  the student is first mixed with a labeled row by bidirectional copy-paste (BCP): a box of 2/3 of each
  in-plane side from one inside the other, through every slice, both ways in turn; the labeled part
  learns its label, the rest the pseudo-labels. With ``confusion_share`` > 0 a pseudo-label of a class the labeled
  rows show to be confused with others stands for all of them, and with ``confusable_classes`` one of a group of
  classes stands for the group (set-valued CE, no Dice; both off by default);
* **CSC** (channel-wise semantic consistency, branches only) on the bottlenecks of all rows;
* **CAC** (optional, weight 0 by default): each head's foreground probabilities against the
  fused teacher's, detached, inside the head's field of view, on unlabeled rows;

    L = w_sup L_sup + u [w_pl(t) L_pl + w_csc(t) L_csc + w_cac(t) L_cac]

``u`` is ``--unlabeled-weight`` (0: the supervised-only arm with the same batches and schedule),
and every ramp is 0 for the first ``unlabeled_warmup`` of the run, then a sigmoid ramp-up over
``unlabeled_rampup``, both as fractions of the run (:attr:`TrainerBase.run_fraction`), so a short
run and a long one follow the same curve. The public code of the CMC paper ran the unlabeled
pass under ``torch.no_grad()``; here the unlabeled terms back-propagate into encoders, fusion
and decoders (tests/test_trainer.py proves it).

Reliability: every step, each head's argmax on the labeled rows is compared with the label
(inside its field of view); an EMA of the TP/FP/FN counts gives a Dice per head and class, which
becomes the network's ``head_reliability`` buffer. The teacher's fusion, validation and
``cmcseg predict`` weight the heads by it (it is saved with the weights).

**Unpaired datasets** (``"pairing": "unpaired"`` in the plans, e.g. AMOS CT vs MRI from
different patients): a case has one modality, the others are zeros with an empty field of
view. Two heads never see the same anatomy, so the cross-modality terms are replaced by a
mean-teacher consistency within each modality: the EMA teacher sees the clean input, the student
sees it with Gaussian noise (inside each modality's field of view), and each head m is pulled
towards the teacher's head m on the rows where modality m is present. The same term is used for
a single-modality dataset.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.losses import (
    ChannelSemanticConsistencyLoss,
    PseudoLabelLoss,
    RampUp,
    SupervisedDiceCELoss,
    adaptive_thresholds,
    class_thresholds,
    confident_pseudo_labels,
    confusion_candidates,
    create_ema_teacher,
    grouped_candidates,
    hold_background,
    ignore_outside_fov,
    masked_agreement_loss,
    mean_teacher_consistency_loss,
    update_ema_teacher,
)
from cmcseg.networks import build_cmc_network
from cmcseg.networks.cmc import CMCNetwork, CMCProbabilities, as_scales
from cmcseg.plans.memory import MemoryEstimate, plan_memory_estimate
from cmcseg.plans.plans import Configuration, input_channel_modalities, plan_channels_per_modality
from cmcseg.training import ddp
from cmcseg.training.augmentation import StrongIntensityAugmentation, copy_paste
from cmcseg.training.progress import MASS_PREFIX, WEIGHT_PREFIX
from cmcseg.training.trainer import TrainerBase

log = logging.getLogger(__name__)

class CMCTrainer(TrainerBase):
    """The CMC method: M modality branches; supervised Dice+CE per head, confident cross-modality pseudo-labels
    from an EMA teacher, and CSC on the unlabeled side."""

    # ---- network
    shared_decoder: bool = False
    #: one nnU-Net-style encoder-decoder over every modality (as input channels) instead of a branch per modality;
    #: the teacher's prediction from all modalities teaches it (and, with strong_drop_modality, from fewer)
    single_branch: bool = True
    fusion: bool | None = None  # None: the network's default (on with >= 2 branches)
    channel_attention: bool | None = None
    # ---- supervised term
    supervised_weight: float = 1.0
    # ---- the unlabeled objective (paired); every term is scaled by unlabeled_weight (--unlabeled-weight)
    unlabeled_weight: float = 1.0
    #: fraction of the run before any unlabeled term counts: the teacher must have learned something first (the CMC
    #: authors' code started at 70 %; at 10 % the pseudo-labels erased thin classes on real cardiac MRI)
    unlabeled_warmup: float = 0.3
    unlabeled_rampup: float = 0.2  # fraction of the run over which the terms rise (sigmoid) to full weight
    #: the paired unlabeled objective runs on every k-th step, at k times its weight (the same objective in
    #: expectation); the steps between train the labeled rows alone, at their cost. With one unlabeled row per two
    #: labeled, a step with the teacher costs about 1.67x a supervised one, so k = 2 averages about 1.33x. k = 2:
    #: its step costs 1.03x nnU-Net's (k = 1: 1.56x), and at the same compute it scored 1.5 points above k = 1 on
    #: the five myops_dev folds (1.3 below at the same iterations; README)
    unlabeled_every: int = 2
    #: the CMC authors' unlabeled weights peaked at 0.21 and 1.0 hurt; 0.5 with copy-paste (half of each mixed row is
    #: labeled) beat the labels alone on five of five myops_dev folds (README)
    pseudo_label_weight: float = 0.5
    #: confidence a fused teacher voxel needs to become a pseudo-label: one value, or one per class (background
    #: first), e.g. lower for thin classes
    pseudo_label_threshold: float | tuple[float, ...] = 0.8
    #: > 0: each foreground class's threshold falls with its reliability relative to the best class's, down to this
    #: floor (:func:`cmcseg.losses.pseudo_label.adaptive_thresholds`); 0: the thresholds stay fixed
    adaptive_threshold_floor: float = 0.0
    #: a head learns pseudo-labels only of the classes it has learned: reliability (EMA Dice on labeled rows) at
    #: least this; the others are merged into background for it (:mod:`cmcseg.losses.pseudo_label`). 0: every class
    learned_reliability: float = 0.0
    #: background pseudo-labels count only once every foreground class's reliability (best head) reaches this; until
    #: then the unlabeled rows teach the foreground classes the teacher is sure of (0: always teach background)
    background_pseudo_label_bar: float = 0.0
    #: > 0: a pseudo-label of class k stands for every class that makes up at least this share of the labeled rows'
    #: voxels predicted k (EMA confusion); its CE is that set's marginal and it leaves the Dice term
    #: (:func:`cmcseg.losses.pseudo_label.confusion_candidates`). 0: hard labels. At 0.2 it was level with hard labels
    #: on myops_dev (+0.2, five folds): the labeled rows, which the network fits, hide the confusion (README)
    confusion_share: float = 0.0
    #: groups of class indices a pseudo-label may confuse, known in advance (e.g. ``((4, 5),)``: MyoPS's edema and
    #: scar): a pseudo-label of a group's class stands for the whole group, as with ``confusion_share``
    confusable_classes: tuple[tuple[int, ...], ...] = ()
    csc_weight: float = 0.1
    #: the final validation also scores each modality alone (``per_head``). None: where that score means something,
    #: i.e. for branch heads or a single network trained with modality drops (:meth:`scores_each_modality`)
    validate_each_modality: bool | None = None
    csc_temperature: float = 0.1
    cac_weight: float = 0.0  # the restricted agreement term (foreground, detached fused target, FOV-masked)
    ema_alpha: float = 0.99
    #: the teacher's EMA horizon ``1 / (1 - alpha)`` is at most this fraction of the run's iterations, so a short run
    #: does not learn from a teacher that lags a third of the run behind (0.99 is a 100-iteration horizon)
    ema_horizon: float = 0.05
    reliability_momentum: float = 0.98
    reliability_floor: float = 0.05
    # ---- the student's strong view of the unlabeled rows
    strong_contrast: tuple[float, float] = (0.65, 1.5)
    strong_brightness: float = 0.25
    strong_gamma: tuple[float, float] = (0.7, 1.5)
    strong_noise_std: float = 0.1
    strong_drop_modality: float = 0.0  # probability that a row of the strong view loses one of its modalities
    #: bidirectional copy-paste (BCP): each unlabeled row of the student is mixed with a labeled row, a box of this
    #: fraction of each in-plane side from one inside the other, both ways in turn; the labeled part learns its label,
    #: the rest the teacher's confident pseudo-labels (:func:`cmcseg.training.augmentation.copy_paste`). 0: off.
    #: On myops_dev at --labeled 0.2 it was +4.2 points of mean foreground Dice over the labels alone (five folds)
    copy_paste_box: float = 2 / 3
    # ---- mean teacher (unpaired, or a single modality)
    mean_teacher_weight: float = 0.1
    student_noise_std: float = 0.1
    student_noise_clip: float = 0.2

    # =================================================================================== building
    def build_network(self) -> nn.Module:
        """The CMC network of the plan, with the encoder options of the request."""
        request = self.request
        if request.shared_encoder and self.single_branch:
            raise CmcsegError(f"--shared-encoder shares one encoder between modality branches, and {self.name} runs "
                              "one network over all modalities (no branches). Fix: add --trainer cmc_branches, or drop "
                              "--shared-encoder.")
        network = cast(CMCNetwork, super().build_network())
        self.channel_modalities = input_channel_modalities(self.plans["channels_per_modality"])
        self.num_modalities = len(self.plans["channels_per_modality"])
        paired = str(self.plans.get("pairing", "paired")).lower() != "unpaired"
        self.cross_modality = paired and (network.n_branches > 1 or (self.single_branch and self.num_modalities > 1))
        if not self.cross_modality:
            why = "unpaired modalities" if not paired else "a single modality"
            log.info("CMC with %s: mean-teacher consistency within each modality replaces the cross-modality "
                     "terms; CSC is off", why)
        elif network.n_branches == 1 and self.csc_weight:
            self.csc_weight = 0.0  # recorded as this run's value: CSC compares branch bottlenecks, one has no pair
            log.info("CMC with one branch over all modalities: CSC is off (it compares the branches' bottlenecks); "
                     "the teacher's prediction from all modalities teaches the student (modality drop %.2f)",
                     self.strong_drop_modality)
        return network

    @classmethod
    def build_network_architecture(cls, plans: Mapping[str, Any], configuration: str | Configuration,
                                   options: Mapping[str, Any], deep_supervision: bool) -> nn.Module:
        """The CMC network (:func:`cmcseg.networks.cmc.build_cmc_network`). An option a checkpoint lacks takes the
        value models were trained with before it existed (e.g. a branch per modality)."""
        return build_cmc_network(
            plans, configuration, encoder=options.get("encoder"),
            shared_encoder=bool(options.get("shared_encoder", False)),
            encoder_weights=options.get("encoder_weights"), deep_supervision=deep_supervision,
            shared_decoder=bool(options.get("shared_decoder", False)), fusion=options.get("fusion"),
            channel_attention=options.get("channel_attention"), single_branch=bool(options.get("single_branch", False)),
            encoder_options=options.get("encoder_options"),
            unsafe_allow_pickle=bool(options.get("unsafe_allow_pickle", False)))

    def network_options(self) -> dict[str, Any]:
        """The encoder and the layout of the network (stored in the checkpoint, read back by prediction)."""
        return {**super().network_options(), "shared_decoder": self.shared_decoder, "fusion": self.fusion,
                "channel_attention": self.channel_attention, "single_branch": self.single_branch}

    def training_network_options(self) -> dict[str, Any]:
        """The pretrained encoder weights (``--encoder-weights``), read as data unless ``--unsafe-allow-pickle``."""
        return {"encoder_weights": self.request.encoder_weights,
                "unsafe_allow_pickle": self.request.unsafe_allow_pickle}

    @classmethod
    def checkpoint_weights(cls, network: nn.Module, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Models trained before the heads had reliability weights fuse them with equal votes, as they were
        trained."""
        return {"head_reliability": cast(CMCNetwork, network).head_reliability, **weights}

    @classmethod
    def probabilities_module(cls, network: nn.Module, plans: Mapping[str, Any]) -> nn.Module:
        """The heads fused by field of view and per-head reliability (:class:`CMCProbabilities`)."""
        network = cast(CMCNetwork, network)
        network.set_deep_supervision(False)
        return CMCProbabilities(network, sum(plan_channels_per_modality(plans)))

    def estimate_memory(self) -> MemoryEstimate:
        """The planner's estimate for this run's network, batch (labeled + unlabeled rows) and device."""
        request = self.request
        return plan_memory_estimate(
            self.plans, self.config, self.labeled_batch_size, self.unlabeled_batch_size, self.device.type,
            encoder=request.encoder, shared_encoder=request.shared_encoder, deep_supervision=self.deep_supervision,
            shared_decoder=self.shared_decoder, fusion=self.fusion, channel_attention=self.channel_attention,
            single_branch=self.single_branch)

    def build_losses(self) -> None:
        """Loss modules, the ramps and the EMA teacher, from the class attributes."""
        if self.request.unlabeled_weight is not None:
            self.unlabeled_weight = float(self.request.unlabeled_weight)
        if self.copy_paste_box > 0 and self.cac_weight > 0:
            raise CmcsegError(f"{type(self).__name__}: copy_paste_box and cac_weight cannot both be on (the agreement "
                              "target is the teacher's view of the unmixed rows). Fix: set one of them to 0.")
        if (self.confusion_share > 0 or self.confusable_classes) and self.learned_reliability > 0:
            raise CmcsegError(f"{type(self).__name__}: confusion_share or confusable_classes, and learned_reliability, "
                              "cannot both be on (one makes set-valued pseudo-labels, the other merges classes). Fix: "
                              "set learned_reliability to 0, or drop the set-valued labels.")
        k = self.labels.num_classes
        if any(not 0 < int(c) < k for group in self.confusable_classes for c in group):
            raise CmcsegError(f"{type(self).__name__}: confusable_classes {self.confusable_classes!r} names a class "
                              f"outside the foreground classes 1..{k - 1} of this dataset ({self.labels.names}). "
                              "Fix: give groups of foreground class indices, e.g. ((4, 5),).")
        self.fixed_candidates = grouped_candidates(self.confusable_classes, k)
        if int(self.unlabeled_every) != self.unlabeled_every or self.unlabeled_every < 1:
            raise CmcsegError(f"{type(self).__name__}: unlabeled_every is {self.unlabeled_every!r}; it counts steps "
                              "(the unlabeled objective runs on every k-th one). Fix: set it to a whole number >= 1.")
        # labeled voxels outside a head's field of view, and unconfident pseudo-label voxels, get this target
        self.ignore_value = self.labels.ignore_label if self.labels.ignore_label is not None \
            else self.labels.num_classes
        batch_dice = bool(self.config.get("batch_dice", False))
        self.supervised_loss = SupervisedDiceCELoss(batch_dice=batch_dice, ignore_label=self.ignore_value)
        self.pseudo_label_loss = PseudoLabelLoss(self.ignore_value, batch_dice=batch_dice)
        self.pseudo_label_thresholds = class_thresholds(self.pseudo_label_threshold, self.labels.num_classes)
        self.csc_loss = ChannelSemanticConsistencyLoss(self.csc_temperature)
        self.ramps = self.build_ramps()
        self.strong_view = StrongIntensityAugmentation(self.strong_contrast, self.strong_brightness, self.strong_gamma,
                                                       self.strong_noise_std, self.strong_drop_modality)
        student = self.inference_network()
        # on paired data the teacher only ever sees unlabeled rows: with every case labeled it would cost a copy of
        # the weights (the planner's estimate leaves it out then) and an EMA update per step, for nothing
        self.teacher: CMCNetwork | None = None
        if self.cases.unlabeled or not self.cross_modality:
            self.teacher = create_ema_teacher(student)
            self.teacher.set_deep_supervision(False)  # the teacher's targets are full resolution only
        self.reliability_counts = torch.zeros(3, student.n_branches, k, dtype=torch.float64)
        #: EMA over steps of each head's [true, predicted] voxel counts on the labeled rows, inside its FOV
        self.confusion_counts = torch.zeros(student.n_branches, k, k, dtype=torch.float64)

    def build_ramps(self) -> dict[str, RampUp]:
        """One ramp per unlabeled term: 0 during ``unlabeled_warmup``, then a sigmoid over ``unlabeled_rampup``,
        both as fractions of the run."""
        return {name: RampUp(weight, self.unlabeled_rampup, "sigmoid", "fraction", self.unlabeled_warmup)
                for name, weight in (("pseudo_label", self.pseudo_label_weight), ("csc", self.csc_weight),
                                     ("cac", self.cac_weight), ("mean_teacher", self.mean_teacher_weight))}

    # =================================================================================== batch helpers
    @property
    def num_image_channels(self) -> int:
        """Modality channels at the front of the input; the FOV masks follow."""
        return len(self.channel_modalities)

    @property
    def modality_names(self) -> list[str]:
        """The plan's modality names, in channel order."""
        names = [str(n) for n in self.plans.get("modalities", [])]
        return names if len(names) == self.num_modalities else [str(m) for m in range(self.num_modalities)]

    @property
    def head_names(self) -> list[str]:
        """One name per head: the modality names (a single branch: ``all``)."""
        if self.inference_network().n_branches == 1:
            return ["all"]
        return self.modality_names

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

    def unlabeled_weights(self) -> dict[str, float]:
        """The current weight of each unlabeled term: ramp at this fraction of the run, times ``unlabeled_weight``;
        the paired terms also times ``unlabeled_every`` on every ``unlabeled_every``-th step and 0 between."""
        t = self.run_fraction
        if not self.cross_modality:
            return {"mean_teacher": self.unlabeled_weight * self.ramps["mean_teacher"](t)}
        every = int(self.unlabeled_every)
        scale = float(every) if self.global_step % every == 0 else 0.0
        return {name: scale * self.unlabeled_weight * self.ramps[name](t) for name in ("pseudo_label", "csc", "cac")}

    # =================================================================================== losses
    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """Supervised term on labeled rows; the unlabeled objective (paired) or the mean teacher (unpaired)."""
        x = batch["data"]
        labeled = batch["labeled"].to(x.device).bool()
        targets = as_scales(batch["target"])
        network = self.inference_network()
        weights = self.unlabeled_weights()
        if not self.cross_modality:
            return self.mean_teacher_losses(x, labeled, targets, weights)
        if not any(w > 0 for w in weights.values()) and bool(labeled.any()) and not bool(labeled.all()):
            # warm-up, or --unlabeled-weight 0: the unlabeled rows would add nothing to the loss (every norm is per
            # row), so they are not run at all: an identical loss at the labeled rows' cost
            x, labeled, targets = x[labeled], labeled[labeled], [t[labeled] for t in targets]
        unlabeled = ~labeled
        teach = bool(unlabeled.any()) and (weights["pseudo_label"] > 0 or weights["cac"] > 0)
        student_input = x
        diagnostics: dict[str, Tensor] = {}
        if teach:
            fused = self.teacher_prediction(x[unlabeled])
            reliability = network.head_reliability.max(0).values
            thresholds = adaptive_thresholds(self.pseudo_label_thresholds, reliability, self.adaptive_threshold_floor)
            pseudo, keep = confident_pseudo_labels(fused, thresholds, self.ignore_value)
            if self.adaptive_threshold_floor > 0:
                diagnostics["pseudo_label_threshold_min"] = thresholds[1:].min()
            pseudo, background = hold_background(pseudo, reliability,
                                                 self.background_pseudo_label_bar, self.ignore_value)
            diagnostics["pseudo_label_background"] = x.new_tensor(float(background))
            diagnostics["pseudo_label_kept"] = keep.float().mean()
            candidates = None  # what each pseudo-label stands for, from the labeled rows' confusion so far
            if self.confusion_share > 0 or self.confusable_classes:
                candidates = self.fixed_candidates | confusion_candidates(self.confusion_counts.sum(0),
                                                                          self.confusion_share)
                diagnostics["pseudo_label_candidates"] = candidates.sum(1).double().mean()
            student_rows = x[unlabeled]
            pasted = torch.zeros_like(pseudo, dtype=torch.bool)
            if self.copy_paste_box > 0:
                inward = [(j + self.global_step) % 2 == 0 for j in range(len(student_rows))]
                student_rows, pseudo, pasted = copy_paste(x[labeled], targets[0][labeled], student_rows, pseudo,
                                                          self.copy_paste_box, inward)
            student_input = x.clone()
            student_input[unlabeled] = self.strong_view(student_rows, self.channel_modalities, self.num_modalities)
        output = self.network(student_input)
        heads = [as_scales(h) for h in output.logits]
        head_fov = network.head_fov(x)
        losses: dict[str, Tensor] = {"supervised": self.supervised_term(heads, targets, labeled, head_fov)}
        self.update_reliability(heads, targets[0], labeled, head_fov)
        losses["csc"] = self.csc_loss(output.bottlenecks) if weights["csc"] > 0 else x.new_zeros(())
        losses["pseudo_label"] = losses["cac"] = x.new_zeros(())
        if teach:
            student_logits = [h[0][unlabeled] for h in heads]
            # each head learns where its own (strong-view) input is in view: a dropped modality's head, or a single
            # branch's voxels seen only by a dropped modality, are not asked to predict from nothing
            student_fov = network.head_fov(student_input[unlabeled])
            if weights["pseudo_label"] > 0:
                learned = network.head_reliability >= self.learned_reliability
                losses["pseudo_label"] = self.pseudo_label_loss(student_logits, pseudo, student_fov, learned,
                                                                candidates, ~pasted)
                diagnostics["pseudo_label_classes"] = learned[:, 1:].float().sum(1).mean()
            if weights["cac"] > 0:
                losses["cac"] = masked_agreement_loss([torch.softmax(z.float(), 1) for z in student_logits], fused,
                                                      student_fov)
        return self.step_outputs(losses, weights, diagnostics, heads, head_fov, labeled)

    def step_outputs(self, losses: dict[str, Tensor], weights: dict[str, float], diagnostics: dict[str, Tensor],
                     heads: list[list[Tensor]], head_fov: Tensor, labeled: Tensor) -> dict[str, Tensor]:
        """The total ``w_sup L_sup + sum w_k L_k``, every term, the diagnostics (with each head's foreground mass on
        the unlabeled rows, else the labeled ones) and the weights, as :meth:`compute_losses` returns them."""
        total = self.supervised_weight * losses["supervised"]
        for key, weight in weights.items():
            total = total + weight * losses[key]
        mass_rows = ~labeled if bool((~labeled).any()) else labeled
        diagnostics = {**diagnostics, **self.foreground_mass(heads, head_fov, mass_rows)}
        return {"loss": total, **losses, **diagnostics,
                **{f"{WEIGHT_PREFIX}{k}": torch.tensor(w) for k, w in weights.items()}}

    def head_targets(self, target: Tensor, head_fov: Tensor, m: int) -> Tensor:
        """The label map with ``ignore_value`` outside head m's field of view."""
        return ignore_outside_fov(target, head_fov[:, m:m + 1], self.ignore_value)

    def supervised_term(self, heads: list[list[Tensor]], targets: list[Tensor], labeled: Tensor,
                        head_fov: Tensor) -> Tensor:
        """Mean over heads of Dice+CE on the labeled rows, each head only inside its modality's field of view.

        Zero (still attached to the graph) when no head has a labeled voxel in view, e.g. an unlabeled-only batch.
        """
        per_head = []
        for m, scales in enumerate(heads):
            head_targets = [self.head_targets(t[labeled], head_fov[labeled], m) for t in targets]
            if bool((head_targets[0] != self.ignore_value).any()):
                per_head.append(self.supervised_loss([[s[labeled] for s in scales]], head_targets))
        if not per_head:
            return torch.stack([scales[0].sum() * 0.0 for scales in heads]).sum()
        return torch.stack(per_head).mean()

    @torch.no_grad()
    def teacher_prediction(self, x: Tensor) -> Tensor:
        """The EMA teacher's fused probabilities ``(B, K, *)`` of the weak view ``x`` (FOV- and
        reliability-weighted)."""
        assert self.teacher is not None, "the teacher exists whenever there are unlabeled rows"
        self.teacher.eval()
        with self.autocast():
            return self.teacher.probabilities(x)

    @torch.no_grad()
    def update_reliability(self, heads: list[list[Tensor]], target: Tensor, labeled: Tensor, head_fov: Tensor) -> None:
        """Fold this batch's confusion of each head (labeled rows, inside its FOV) into the EMA counts, and set the
        network's ``head_reliability`` to the resulting Dice per head and class (classes never seen keep 1)."""
        if not bool(labeled.any()):
            return
        k = self.labels.num_classes
        per_head = []
        for m, scales in enumerate(heads):
            reference = self.head_targets(target[labeled], head_fov[labeled], m).long().flatten()
            prediction = scales[0][labeled].max(1).indices.flatten()  # argmax(1): the same, 6x slower on CPU
            valid = (reference >= 0) & (reference < k)
            pairs = reference[valid] * k + prediction[valid]
            per_head.append(torch.bincount(pairs, minlength=k * k).reshape(k, k))  # [true, predicted]
        confusion = torch.stack(per_head).double().cpu()  # (heads, K, K), one transfer per step
        if self.dist.enabled:  # every rank keeps the same counts, so the ranks' networks stay identical
            confusion = torch.from_numpy(ddp.sum_over_ranks(confusion.numpy(), self.dist, self.device))
        tp = torch.diagonal(confusion, dim1=1, dim2=2)
        counts = torch.stack([tp, confusion.sum(1) - tp, confusion.sum(2) - tp])  # (3, heads, K): TP, FP, FN
        momentum = self.reliability_momentum if self.reliability_counts.any() else 0.0
        self.reliability_counts = momentum * self.reliability_counts + (1 - momentum) * counts
        self.confusion_counts = momentum * self.confusion_counts + (1 - momentum) * confusion
        tp, fp, fn = self.reliability_counts
        denominator = 2 * tp + fp + fn
        dice = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1e-12), torch.ones_like(tp))
        network = self.inference_network()
        network.head_reliability.copy_(dice.clamp(self.reliability_floor, 1.0).to(network.head_reliability))

    def foreground_mass(self, heads: list[list[Tensor]], head_fov: Tensor, rows: Tensor) -> dict[str, Tensor]:
        """Per head and foreground class, the mean predicted probability inside the head's FOV on ``rows``:
        a head that collapses (never predicts a class) shows a mass falling to 0."""
        out: dict[str, Tensor] = {}
        if not bool(rows.any()):
            return out
        names = self.head_names
        with torch.no_grad():
            for m, scales in enumerate(heads):
                probabilities = torch.softmax(scales[0][rows].float(), 1)
                fov = head_fov[rows][:, m:m + 1].float()
                inside = fov.sum().clamp_min(1.0)
                for name, value in zip(self.labels.names, self.labels.values):
                    out[f"{MASS_PREFIX}{names[m]}/{name}"] = (probabilities[:, value:value + 1] * fov).sum() / inside
        return out

    def mean_teacher_losses(self, x: Tensor, labeled: Tensor, targets: list[Tensor],
                            weights: dict[str, float]) -> dict[str, Tensor]:
        """Unpaired data or one branch: supervised term plus softmax-MSE to the EMA teacher's same head."""
        network = self.inference_network()
        output = self.network(self.noisy_student_input(x))
        heads = [as_scales(h) for h in output.logits]
        head_fov = network.head_fov(x)
        losses = {"supervised": self.supervised_term(heads, targets, labeled, head_fov),
                  "mean_teacher": self.mean_teacher_term(x, heads, self.modality_presence(x))}
        self.update_reliability(heads, targets[0], labeled, head_fov)
        return self.step_outputs(losses, weights, {}, heads, head_fov, labeled)

    def mean_teacher_term(self, x: Tensor, student_heads: list[list[Tensor]], present: Tensor) -> Tensor:
        """Softmax-MSE between each student head and the EMA teacher's same head, on rows with that modality."""
        assert self.teacher is not None, "unpaired data always has a teacher"
        self.teacher.train(self.network.training)
        with torch.no_grad():
            teacher_heads = [as_scales(h) for h in self.teacher(x).logits]
        per_head = []
        for m, (student, teacher) in enumerate(zip(student_heads, teacher_heads)):
            rows = present[:, m] if len(student_heads) > 1 else torch.ones_like(present[:, 0])
            if bool(rows.any()):
                per_head.append(mean_teacher_consistency_loss(student[0][rows], teacher[0][rows]))
        if not per_head:
            return torch.stack([h[0].sum() * 0.0 for h in student_heads]).sum()
        return torch.stack(per_head).mean()

    @property
    def teacher_alpha(self) -> float:
        """The EMA decay: ``ema_alpha``, lowered so that its horizon is at most ``ema_horizon`` of the run."""
        horizon = max(1.0, self.ema_horizon * self.num_epochs * self.iterations_per_epoch)
        return min(self.ema_alpha, 1.0 - 1.0 / horizon)

    def on_after_optimizer_step(self) -> None:
        """Move the EMA teacher towards the student (its reliability buffer is copied)."""
        if self.teacher is not None:
            update_ema_teacher(self.teacher, self.inference_network(), self.teacher_alpha, self.global_step)

    # =================================================================================== prediction
    def inference_network(self) -> CMCNetwork:
        """The plain CMC network (outside DDP)."""
        return cast(CMCNetwork, super().inference_network())

    def predict_probabilities(self, x: Tensor) -> Tensor:
        """The heads' softmax maps fused voxel-wise by FOV mask and per-head, per-class reliability."""
        network = self.inference_network()
        return network.probabilities(x)

    def head_outputs(self) -> tuple[Callable[[Tensor], Tensor], list[str]] | None:
        """The fused probabilities followed by each modality's own (a branch network's heads; a single branch run on
        each modality alone), for the per-modality Dice of the validation summary; None with one modality."""
        network = self.inference_network()
        if self.num_modalities < 2:
            return None
        if not self.scores_each_modality():
            log.info("final validation scores the fused prediction only: this single network never trained on one "
                     "modality alone (strong_drop_modality 0). Set validate_each_modality = True to score each "
                     "modality alone anyway (M more passes per window)")
            return None

        def predict_all(x: Tensor) -> Tensor:
            with self.inference_autocast():
                fused, heads = network.predict_with_heads(x)
                return torch.cat([fused, *heads], dim=1).float()

        return predict_all, self.modality_names

    def scores_each_modality(self) -> bool:
        """Whether the final validation scores each modality alone: ``validate_each_modality``, or where that is
        None, only if a modality alone is an input the network learned.

        A branch network's heads come with the fused prediction. The default single network, though, pays M more
        passes per window for it (6.7x the fused validation's time on myops_dev at its real plan), and without
        ``strong_drop_modality`` it never saw a modality alone: its scores there were .01-.13 of mean Dice against
        the fused .45 (benchmarks/semi_supervised_gain.py, fold 1)."""
        if self.validate_each_modality is not None:
            return bool(self.validate_each_modality)
        return not self.single_branch or self.strong_drop_modality > 0

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """The base lines, plus the per-head reliability weights."""
        super().log_epoch(metrics)
        reliability = self.inference_network().head_reliability.detach().cpu()
        log.info("epoch %d head reliability (Dice on labeled rows, per class): %s", self.current_epoch, "; ".join(
            f"{name} " + " ".join(f"{c} {float(reliability[m, v]):.2f}" for c, v in zip(self.labels.names,
                                                                                      self.labels.values))
            for m, name in enumerate(self.head_names)))

    # =================================================================================== state
    def extra_state(self) -> dict[str, Any]:
        """The EMA teacher's weights, the reliability and the confusion counts."""
        state: dict[str, Any] = {"reliability_counts": self.reliability_counts.clone(),
                                 "confusion_counts": self.confusion_counts.clone()}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the EMA teacher, the reliability and the confusion counts."""
        if "teacher" in state and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        if "reliability_counts" in state:
            self.reliability_counts = torch.as_tensor(state["reliability_counts"], dtype=torch.float64)
        if "confusion_counts" in state:
            self.confusion_counts = torch.as_tensor(state["confusion_counts"], dtype=torch.float64)


class CMCBranchesTrainer(CMCTrainer):
    """The CMC paper's network: one encoder-decoder per modality, fused at the bottleneck, with CSC between the
    branches' bottlenecks; about M times the cost of one network per step (``--trainer cmc_branches``)."""

    single_branch = False
