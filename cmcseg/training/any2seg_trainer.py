"""The Any2Seg trainer (2D and 3D): one model that segments from any non-empty subset of the modalities.

It shares everything with :class:`~cmcseg.training.cmc_trainer.CMCTrainer` through
:class:`~cmcseg.training.trainer.TrainerBase` (plans, folds, the two-stream loader, checkpoints,
``--continue``, logs, ``progress.png``, validation) and differs in the network, the losses and
the batch composition:

* **network** (``--backbone``): one encoder shared by the modalities (stacked in the batch), MFF at
  every stage, one decoder (:mod:`cmcseg.networks.any2seg`):

  - ``mit_b0`` .. ``mit_b5`` (the default of 2D configurations, the paper's):
    :class:`~cmcseg.networks.any2seg.Any2SegModel`, a SegFormer MiT backbone and the all-MLP head;
  - a registered encoder name, ``residual`` (the plan's, the default of 3D configurations), ``plain``,
    ``swinunetr``, ...: :class:`~cmcseg.networks.any2seg.Any2SegUNet`, nnU-Net's encoder and decoder
    with deep supervision, trained with nnU-Net's SGD and poly schedule; ``--encoder-weights`` loads
    the encoder (e.g. from ``cmcseg pretrain``). By default it fuses the present modalities at the
    input (``fusion_stage``; MFF on each skip, the paper's late fusion, stalls on real cardiac MRI);
* **modality dropout**: each row keeps, with probability ``modality_dropout``, a subset drawn
  uniformly from the non-empty subsets of its available modalities, else all of them
  (:func:`~cmcseg.networks.any2seg.sample_modality_subsets`); a modality whose field of view is
  empty in the patch is not available;
* **losses** (weights are attributes, ramp-ups sigmoid over fractions of the run, so a short run
  and a long one follow the same curve)::

      L = w_seg L_DiceCE(student, y)                       labeled rows only (deep-supervised: U-Net)
        + w_lscd(t) L_LSCD(student, EMA teacher, anchors)  all rows (MiT; see below)
        + w_cons(t) L_cons(student, EMA teacher)           all rows

  where the student sees the dropped subset and the EMA teacher (no gradient) sees every
  available modality, i.e. the full-modality representation. ``L_DiceCE`` is nnU-Net's Dice+CE,
  ``L_LSCD`` is :class:`~cmcseg.losses.language_distillation.LSCDLoss` (inter-modal class distributions,
  the M x M correlation of the present modalities matched to the teacher's, intra-modal token affinity,
  text alignment; each logged as ``lscd_*``) with text anchors of the class
  names from the frozen language teacher (``--teacher minilm``, offline, or ``languagebind``,
  whose image towers then give the class-distribution target; otherwise the EMA teacher's features give it,
  mapped to the text space by an EMA copy of LSCD's projection, moved with the teacher's decay
  after each optimizer step and saved with it), ``L_cons`` the softmax MSE between the
  student's and the teacher's full-resolution class maps. LSCD belongs to the MiT network: its
  projection and token affinities work on 2D feature maps, and the U-Net trains without it
  (modality dropout, the full-modality EMA teacher and MFF are what make it any-subset).
  Unlabeled rows (``--labeled F < 1``) train through the last terms: that is the semi-supervised path;
* **evaluation across subsets**: after the base trainer's validation (all modalities), every
  validation case is predicted from every non-empty subset; ``validation/subsets.csv`` and
  ``validation/subsets.png`` hold mIoU (2D datasets: scenes) or Dice (3D medical data) per subset.

Optimisation of the MiT network follows SegFormer/Any2Seg: AdamW with the poly schedule; ``initial_lr``
with pretrained backbone weights, ``scratch_lr`` without. The U-Net trains as nnU-Net does
(SGD, ``unet_lr``, ``unet_weight_decay``). Scenes (datasets of 2D images) are
augmented upright: small rotations and horizontal mirroring only, and the test-time mirroring
of ``cmcseg predict`` follows.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from cmcseg.errors import CmcsegError
from cmcseg.losses import DeepSupervisedDiceCELoss, RampUp, mean_teacher_consistency_loss
from cmcseg.losses.language_distillation import EMATeacherModel, LSCDLoss
from cmcseg.networks.any2seg import (
    Any2SegModel,
    Any2SegNetwork,
    Any2SegProbabilities,
    Any2SegUNet,
    SubsetProbabilities,
    fov_presence,
    sample_modality_subsets,
)
from cmcseg.networks.cmc import as_scales
from cmcseg.networks.encoders import ENCODERS
from cmcseg.networks.language_teachers import DEFAULT_TEMPLATE, MEDICAL_TEMPLATE, build_teacher
from cmcseg.plans.plans import (
    Configuration,
    plan_channels_per_modality,
    plan_configuration,
    plan_encoder,
    plan_num_classes,
)
from cmcseg.training import ddp
from cmcseg.training.augmentation import configure_spatial_augmentation
from cmcseg.training.data import build_training_loader
from cmcseg.training.progress import WEIGHT_PREFIX
from cmcseg.training.subset_validation import (
    evaluate_subsets,
    is_scene_dataset,
    scored_classes,
    subset_metric_for,
    write_subset_table,
)
from cmcseg.training.trainer import TrainerBase
from cmcseg.training.validation import VALIDATION_DIR

log = logging.getLogger(__name__)


def class_names_by_index(labels: dict[str, Any], num_classes: int) -> list[str]:
    """Class names ordered by output index ``0..K-1`` (the ``ignore`` label is not a class)."""
    by_value = {int(v): str(k) for k, v in labels.items() if k != "ignore" and not isinstance(v, (list, tuple))}
    return [by_value.get(i, f"class {i}") for i in range(num_classes)]


def uses_unet(backbone: str) -> bool:
    """True when ``--backbone`` names a registered encoder (the U-Net network), not a MiT variant."""
    return backbone in ENCODERS


class Any2SegTrainer(TrainerBase):
    """Any2Seg on a 2D or 3D configuration (see the module docstring)."""

    #: cmcseg predict may give this model cases with modalities missing
    accepts_missing_modalities: bool = True
    deep_supervision: bool = False  # the all-MLP head has one output; the U-Net network switches it on
    ddp_find_unused_parameters: bool = False  # every parameter takes part in every step
    # ---- network: None picks mit_b0 for 2D configurations and the plan's encoder (residual) for 3D ones
    backbone_variant: str | None = None
    default_2d_backbone: str = "mit_b0"
    backbone_in_channels: int = 3
    decoder_hidden_size: int | None = None  # None: SegFormer's width for the variant
    fusion_temperature: float = 1.0
    fusion_mode: str = "mff"  # or "mean": the plain mean of the present modalities (the MFF ablation)
    #: where the modalities meet: None picks "input" for the U-Net (early fusion: the present modalities as
    #: channels of one encoder pass, which learns real cardiac MRI where per-skip fusion stalls, see README) and
    #: "features" (MFF on every stage, the paper's; the only choice of the MiT network)
    fusion_stage: str | None = None
    classifier_dropout: float = 0.1
    # ---- optimisation (SegFormer / Any2Seg): AdamW, poly decay
    initial_lr: float = 6e-5  # with pretrained backbone weights
    scratch_lr: float = 6e-4  # from random initialisation
    weight_decay: float = 0.01
    # ---- optimisation of the U-Net network: nnU-Net's SGD
    unet_lr: float = 1e-2
    unet_weight_decay: float = 3e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # ---- modality dropout: probability that a row keeps a random non-empty subset instead of all
    modality_dropout: float = 0.5
    # ---- supervised term (nnU-Net's Dice + CE)
    segmentation_weight: float = 1.0
    # ---- LSCD distillation
    teacher_name: str = "minilm"
    text_template: str | None = None  # None: a scene prompt for 2D datasets, a medical prompt for 3D ones
    lscd_weight: float = 0.1
    lscd_rampup: float = 0.05  # fraction of the run
    lscd_temperature: float = 0.01  # CLIP's 1 / logit_scale: cosines in a CLIP space span a narrow range
    lscd_inter_weight: float = 1.0
    lscd_intra_weight: float = 1.0
    lscd_align_weight: float = 1.0
    lscd_correlation_weight: float = 1.0  # the M x M modality-correlation term
    lscd_affinity_size: int = 16
    # ---- consistency of the dropped-subset student with the full-modality EMA teacher
    consistency_weight: float = 1.0
    consistency_rampup: float = 0.05  # fraction of the run
    ema_decay: float = 0.99
    # ---- subset table: "miou", "dice" or None (mIoU for datasets of 2D images, Dice for 3D volumes)
    subset_metric: str | None = None
    # ---- augmentation of natural scenes (datasets of 2D images, kept upright): rotation range, mirrored axes
    natural_rotation_degrees: float = 10.0
    natural_mirror_axes: tuple[int, ...] = (1,)

    def __init__(self, request) -> None:
        super().__init__(request)
        if request.backbone is not None:
            self.backbone_variant = request.backbone
        if request.teacher is not None:
            self.teacher_name = request.teacher
        if request.modality_dropout is not None:
            if not 0.0 <= request.modality_dropout <= 1.0:
                raise CmcsegError(f"--modality-dropout {request.modality_dropout} is not in [0, 1]. Fix: pass e.g. "
                                  "0.5 (half of the rows train on a random subset of the modalities).")
            self.modality_dropout = float(request.modality_dropout)
        if request.backbone_weights is None:
            self.initial_lr = self.scratch_lr
        self.lscd: LSCDLoss | None = None

    # =================================================================================== building
    def load_plans_and_fold(self) -> None:
        """The base's plans and fold; the backbone for the configuration's dimensionality (a MiT backbone is 2D);
        then the dataset's kind and modalities."""
        super().load_plans_and_fold()
        if self.backbone_variant is None:
            self.backbone_variant = self.default_2d_backbone if len(self.patch_size) == 2 else plan_encoder(self.config)
        self.uses_unet = uses_unet(self.backbone_variant)
        if not self.uses_unet and len(self.patch_size) != 2:
            raise CmcsegError(f"--backbone {self.backbone_variant} is a 2D SegFormer backbone but configuration "
                              f"{self.configuration!r} has a {len(self.patch_size)}D patch. Fix: drop --backbone "
                              f"(3D configurations use the plan's residual encoder) or pass -c 2d.")
        if self.fusion_stage is None:
            self.fusion_stage = "input" if self.uses_unet else "features"
        if not self.uses_unet and self.fusion_stage != "features":
            raise CmcsegError(f"fusion_stage {self.fusion_stage!r} needs the U-Net network, not the MiT backbone "
                              f"{self.backbone_variant}. Fix: pass --backbone residual or leave fusion_stage at "
                              "'features'.")
        if self.uses_unet:
            self.deep_supervision = True
            self.initial_lr, self.weight_decay = self.unet_lr, self.unet_weight_decay
        if str(self.plans.get("pairing", "paired")).lower() == "unpaired":
            raise CmcsegError(f"dataset {self.request.dataset} has unpaired modalities (one per case): Any2Seg fuses "
                              "modalities of the same scene. Fix: use the cmc trainer for unpaired data.")
        self.natural_scenes = is_scene_dataset(self.plans)
        self.subset_metric = self.subset_metric or subset_metric_for(self.plans)
        self.channels_per_modality = plan_channels_per_modality(self.plans)
        names = list(self.plans.get("modalities") or [])
        self.modality_names = [names[m] if m < len(names) else f"modality {m}"
                               for m in range(len(self.channels_per_modality))]
        self.class_names = class_names_by_index(self.plans["labels"], self.labels.num_classes)

    def build_network(self) -> nn.Module:
        """The Any2Seg model for the plan's modalities and classes, with the local backbone weights if given."""
        self.dropout_generator = torch.Generator().manual_seed(self.seed + 104729 * self.dist.rank)
        model = super().build_network()
        if self.dist.enabled and self.device.type == "cuda":
            # the decoder's BatchNorm sees every rank's batch, as SegFormer trains (CPU/gloo has no SyncBatchNorm:
            # there each rank keeps its own running statistics and rank 0's are saved)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the MiT network (the LSCD projection is added when the losses are built); nnU-Net's SGD over
        the U-Net."""
        if self.uses_unet:
            return super().configure_optimizer()
        return torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, betas=self.adam_betas,
                                 weight_decay=self.weight_decay)

    def build_losses(self) -> None:
        """Dice+CE, the EMA teacher and the ramps; for the MiT network the frozen text anchors and LSCD (its
        projection joins the optimizer)."""
        self.segmentation_loss = DeepSupervisedDiceCELoss(batch_dice=bool(self.config.get("batch_dice", False)),
                                                          ignore_label=self.labels.ignore_label)
        model = self.inference_network()
        self.ema_teacher = EMATeacherModel(model, self.ema_decay).to(self.device)
        if isinstance(self.ema_teacher.model, Any2SegUNet):
            self.ema_teacher.model.set_deep_supervision(False)  # its full-resolution map is the target
        self.lscd_ramp = RampUp(self.lscd_weight, self.lscd_rampup, "sigmoid", "fraction")
        self.consistency_ramp = RampUp(self.consistency_weight, self.consistency_rampup, "sigmoid", "fraction")
        if not self.uses_unet:
            self.build_lscd(model)

    def build_lscd(self, model: Any2SegNetwork) -> None:
        """The language teacher (on the training device) with its class anchors, and the LSCD loss, whose projection
        joins the optimizer."""
        template = self.text_template or (DEFAULT_TEMPLATE if self.natural_scenes else MEDICAL_TEMPLATE)
        self.teacher = build_teacher(self.teacher_name, self.request.teacher_weights, device=self.device,
                                     templates=(template,))
        self.anchors = self.teacher.class_text_embeddings(self.class_names).to(self.device)
        log.info("LSCD: %s teacher, %d class anchors of dimension %d (%r)%s", self.teacher_name, len(self.class_names),
                 self.anchors.shape[1], template, "; its image towers give the inter-modal target"
                 if self.teacher.has_image_encoder else "; the EMA full-modality representation is the visual target")
        self.lscd = LSCDLoss.for_model(model, int(self.anchors.shape[1]), temperature=self.lscd_temperature,
                                       inter_weight=self.lscd_inter_weight, intra_weight=self.lscd_intra_weight,
                                       align_weight=self.lscd_align_weight,
                                       correlation_weight=self.lscd_correlation_weight,
                                       affinity_size=self.lscd_affinity_size).to(self.device)
        self.optimizer.add_param_group({"params": [p for p in self.lscd.parameters() if p.requires_grad]})

    def spatial_augmentation(self):
        """nnU-Net's rule for medical slices; upright small rotations and horizontal mirroring for scenes."""
        augmentation = configure_spatial_augmentation(self.patch_size)
        if not self.natural_scenes:
            return augmentation
        angle = math.radians(self.natural_rotation_degrees)
        return dataclasses.replace(augmentation, rotation=(-angle, angle),
                                   mirror_axes=tuple(int(a) for a in self.natural_mirror_axes))

    def build_dataloader(self) -> Iterator[dict]:
        """The base's two-stream loader with this trainer's spatial augmentation."""
        return build_training_loader(
            self.preprocessed_folder, self.plans, self.config, self.cases.labeled, self.cases.unlabeled,
            self.labeled_batch_size, self.unlabeled_batch_size, deep_supervision=self.deep_supervision,
            oversample_foreground_percent=self.oversample_foreground_percent, num_workers=self.num_workers,
            seed=self.seed + 1000 * self.dist.rank + 7919 * self.current_epoch, augment=self.augment,
            spatial_augmentation=self.spatial_augmentation(), ds_scales=self.deep_supervision_scales())

    @classmethod
    def build_network_architecture(cls, plans: Mapping[str, Any], configuration: str | Configuration,
                                   options: Mapping[str, Any], deep_supervision: bool) -> nn.Module:
        """The Any2Seg network for the plan's modalities and classes: the U-Net when ``backbone`` names a registered
        encoder, else the MiT model (SegFormer's decoder has no deep supervision). Checkpoints from before the
        options were stored name the backbone in their hyperparameters."""
        backbone = str(options.get("backbone", options.get("backbone_variant", "mit_b0")))
        if uses_unet(backbone):
            return Any2SegUNet(
                plan_configuration(plans, configuration), plan_channels_per_modality(plans), plan_num_classes(plans),
                encoder=backbone, deep_supervision=deep_supervision,
                fusion_temperature=float(options.get("fusion_temperature", 1.0)),
                fusion_mode=str(options.get("fusion_mode", "mff")),
                fusion_stage=str(options.get("fusion_stage", "features")),
                encoder_weights=options.get("encoder_weights"), encoder_options=options.get("encoder_options"),
                modality_names=options.get("modality_names"),
                unsafe_allow_pickle=bool(options.get("unsafe_allow_pickle", False)))
        return Any2SegModel(
            num_classes=plan_num_classes(plans), num_modalities=len(plan_channels_per_modality(plans)),
            variant=backbone,
            in_channels=int(options.get("in_channels", options.get("backbone_in_channels", 3))),
            backbone_weights=options.get("backbone_weights"), decoder_hidden_size=options.get("decoder_hidden_size"),
            fusion_temperature=float(options.get("fusion_temperature", 1.0)),
            fusion_mode=str(options.get("fusion_mode", "mff")), dropout=float(options.get("classifier_dropout", 0.1)),
            modality_names=options.get("modality_names"))

    def training_network_options(self) -> dict[str, Any]:
        """The local backbone (MiT) or encoder (U-Net) weights, the classifier dropout and the modality names."""
        return {"backbone_weights": self.request.backbone_weights, "classifier_dropout": self.classifier_dropout,
                "modality_names": self.modality_names, "encoder_weights": self.request.encoder_weights,
                "unsafe_allow_pickle": self.request.unsafe_allow_pickle}

    @classmethod
    def probabilities_module(cls, network: nn.Module, plans: Mapping[str, Any]) -> nn.Module:
        """Probabilities from the modalities in view of each window (:class:`Any2SegProbabilities`), one output."""
        if isinstance(network, Any2SegUNet):
            network.set_deep_supervision(False)
        return Any2SegProbabilities(cast(Any2SegNetwork, network), plan_channels_per_modality(plans))

    def network_options(self) -> dict[str, Any]:
        """Backbone variant and input channels (encoder options for the U-Net) rebuild the network; the mirror axes
        steer test-time mirroring."""
        return {"backbone": self.backbone_variant, "in_channels": self.backbone_in_channels,
                "decoder_hidden_size": self.decoder_hidden_size, "fusion_temperature": self.fusion_temperature,
                "fusion_mode": self.fusion_mode, "fusion_stage": self.fusion_stage,
                "encoder_options": dict(self.request.encoder_options),
                "deep_supervision": self.deep_supervision,
                "mirror_axes": list(self.spatial_augmentation().mirror_axes)}

    # =================================================================================== losses
    def split_batch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, M, C, H, W)`` and the ``(B, M)`` modalities in view of each row."""
        return self.inference_network().split_input(x, self.channels_per_modality), \
            fov_presence(x, self.channels_per_modality)

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """Dice+CE on labeled rows of the dropped-subset student; LSCD and consistency with the EMA teacher."""
        x = batch["data"]
        targets = as_scales(batch["target"])
        labeled = batch["labeled"].to(x.device).bool()
        images, available = self.split_batch(x)
        present = sample_modality_subsets(available, self.modality_dropout, self.dropout_generator).to(x.device)
        student = self.network(images, present)
        with torch.no_grad():
            teacher = self.ema_teacher(images, available)
        losses: dict[str, Tensor] = {}
        scales = as_scales(student.logits)
        logits = scales[0]
        if bool(labeled.any()):
            losses["segmentation"] = self.segmentation_loss([s[labeled] for s in scales],
                                                            [t[labeled] for t in targets[:len(scales)]])
        else:
            losses["segmentation"] = logits.sum() * 0.0
        step = self.run_fraction
        weights = {"consistency": self.consistency_ramp(step)}
        losses["consistency"] = mean_teacher_consistency_loss(logits, as_scales(teacher.logits)[0])
        total = self.segmentation_weight * losses["segmentation"] + weights["consistency"] * losses["consistency"]
        if self.lscd is not None:
            weights["lscd"] = self.lscd_ramp(step)
            total = total + weights["lscd"] * self.lscd_terms(targets[0], images, available, student, teacher, losses)
        losses["modalities_per_row"] = present.float().sum(1).mean()
        return {"loss": total, **losses, **{f"{WEIGHT_PREFIX}{k}": torch.tensor(w) for k, w in weights.items()}}

    def lscd_terms(self, target: Tensor, images: Tensor, available: Tensor, student: Any, teacher: Any,
                   losses: dict[str, Tensor]) -> Tensor:
        """The LSCD terms (added to ``losses``) and their weighted sum; ``target`` is the full-resolution label."""
        assert self.lscd is not None
        embeddings = None
        if self.teacher.has_image_encoder:
            embeddings = self.teacher.full_modality_embedding(images, self.modality_names, available).to(
                images.device)
        align_labels = target[:, 0].long()
        if self.labels.ignore_label is not None:
            align_labels = torch.where(align_labels == self.labels.ignore_label, -1, align_labels)
        terms = self.lscd(student, teacher, self.anchors, labels=align_labels, teacher_embeddings=embeddings)
        losses.update({"lscd_inter": terms.inter, "lscd_correlation": terms.correlation, "lscd_intra": terms.intra,
                       "lscd_align": terms.align})
        return terms.total

    def on_after_backward(self) -> None:
        """The LSCD projection lives outside the DDP wrapper: average its gradients over ranks."""
        if self.lscd is not None:
            ddp.average_gradients(self.lscd, self.dist)

    def on_after_optimizer_step(self) -> None:
        """Move the EMA teacher towards the student, and LSCD's EMA projection (the target's) towards its projection,
        with the same decay."""
        self.ema_teacher.update(self.inference_network(), self.global_step)
        if self.lscd is not None:
            self.lscd.update_ema(self.ema_teacher.decay, self.global_step)

    # =================================================================================== prediction
    def inference_network(self) -> Any2SegNetwork:
        """The plain Any2Seg network (outside DDP)."""
        return cast(Any2SegNetwork, super().inference_network())

    def probabilities_network(self, subset: Sequence[int] | None = None) -> Any2SegProbabilities:
        """The probability wrapper (the one ``cmcseg predict`` rebuilds), optionally restricted to ``subset``."""
        return Any2SegProbabilities(self.inference_network(), self.channels_per_modality, subset).to(self.device)

    def predict_probabilities(self, x: Tensor) -> Tensor:
        """Softmax of the model on the modalities in view of each window."""
        return self.probabilities_network()(x)

    def on_train_end(self) -> None:
        """The base's final checkpoint and validation, then the table over every modality subset (rank 0)."""
        super().on_train_end()
        if self.is_main and self.cases.validation:
            self.run_subset_evaluation()
        ddp.barrier(self.dist)

    def run_subset_evaluation(self):
        """Predict the validation cases from each non-empty subset; write ``validation/subsets.{csv,png}``."""
        network = self.inference_network()
        network.eval()

        def joint_predictor_for(subsets: Sequence[tuple[int, ...]]):
            wrapper = SubsetProbabilities(network, self.channels_per_modality, subsets).to(self.device)

            def predict(x: Tensor) -> Tensor:
                with self.inference_autocast():
                    return wrapper(x).float()
            return predict

        folder = self.preprocessed_folder / self.config["data_identifier"]
        table = evaluate_subsets(None, folder, self.cases.validation, self.patch_size,
                                 scored_classes(self.plans, self.subset_metric),
                                 self.modality_names, self.device, self.subset_metric, self.sliding_window_step,
                                 self.sliding_window_batch_size, joint_predictor_for=joint_predictor_for)
        title = (f"{self.name} {self.preprocessed_folder.name} fold {self.fold}: "
                 f"{'mIoU' if self.subset_metric == 'miou' else 'Dice'} per modality subset")
        csv_path, png_path = write_subset_table(table, self.output_folder / VALIDATION_DIR, self.subset_metric, title)
        log.info("subset table (%d subsets, %s): mean over subsets %.4f, all modalities %.4f -> %s, %s", len(table),
                 self.subset_metric, table["mean"].mean(), table["mean"].iloc[-1], csv_path, png_path)
        return table

    # =================================================================================== state
    def extra_state(self) -> dict[str, Any]:
        """The EMA teacher, the LSCD projection and its EMA copy, and the modality-dropout generator (a resumed run
        goes on drawing where it stopped instead of repeating the first epoch's subsets)."""
        state = {"ema_teacher": self.ema_teacher.model.state_dict(), "dropout_rng": self.dropout_generator.get_state()}
        if self.lscd is not None:
            state["lscd"] = self.lscd.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the EMA teacher, the LSCD projection and its EMA copy (from the projection when the checkpoint
        predates it), and the modality-dropout generator."""
        if "ema_teacher" in state:
            self.ema_teacher.model.load_state_dict(state["ema_teacher"])
        if "lscd" in state and self.lscd is not None:
            self.lscd.load_state_dict(state["lscd"])
        if "dropout_rng" in state:
            self.dropout_generator.set_state(state["dropout_rng"])
