"""``cmcseg pretrain``: a pretrained encoder from the user's own scans, by masked image modelling.

A clinic cannot download weights here, but it has scans: every image of a planned dataset (its labeled and its
unlabeled cases, every modality; labels are never read) trains the encoder to reconstruct image content that a
corrupted view hides (:class:`~cmcseg.training.augmentation.MaskedImageView`, MONAI's recipe: holes, inverse
holes, shuffled blocks), with an L1 loss inside each modality's field of view
(:mod:`cmcseg.losses.reconstruction`). The encoder is the one the default CMC network uses over all modalities,
so the file written at the end, ``encoder_weights.pt``, is what ``cmcseg train --encoder-weights`` loads.

Everything else is the training loop's: nnU-Net's patches and augmentation, progress bar, ``log.txt``,
``progress.png``, atomic checkpoints and ``--continue``. The output folder is
``<results>/DatasetNNN_NAME/PretrainTrainer__<configuration>__<encoder>/all``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from cmcseg.image_io import atomic_path
from cmcseg.losses.reconstruction import masked_reconstruction_loss
from cmcseg.networks.reconstruction import ReconstructionNetwork, build_reconstruction_network
from cmcseg.plans.files import DEFAULT_PLANS
from cmcseg.plans.plans import (
    Configuration,
    input_channel_modalities,
    plan_channels_per_modality,
    plan_configuration,
    plan_encoder,
)
from cmcseg.plans.splits import labeled_subset, unlabeled_subset
from cmcseg.training import ddp
from cmcseg.training.augmentation import MaskedImageView
from cmcseg.training.trainer import FoldCases, TrainerBase

log = logging.getLogger(__name__)

#: the file ``cmcseg pretrain`` writes for ``cmcseg train --encoder-weights``
ENCODER_WEIGHTS_FILE = "encoder_weights.pt"


class PretrainTrainer(TrainerBase):
    """Masked image modelling of every case of the dataset; writes the encoder's weights."""

    val_iterations = 0  # nothing to score: labels are not used

    def select_cases(self) -> FoldCases:
        """Every case of the dataset: the labeled ones (all folds' training and validation cases) and the unlabeled
        pool; none is held out (no labels are read, so no validation is scored)."""
        folds = self.splits["folds"]
        labeled = sorted({c for f in range(len(folds)) for c in labeled_subset(self.splits, f, 1.0)}
                         | {c for f in folds for c in f["val"]})
        unlabeled = sorted({c for f in range(len(folds)) for c in unlabeled_subset(self.splits, f, 1.0)}
                           - set(labeled))
        return FoldCases(labeled, unlabeled, [])

    def load_plans_and_fold(self) -> None:
        """As training's, but the plan's batch is shared between labeled and unlabeled cases in proportion to their
        numbers (nothing comes on top: the plan's memory budget holds)."""
        super().load_plans_and_fold()
        total = ddp.rank_batch_size(int(self.config["batch_size"]), self.dist)
        labeled, unlabeled = len(self.cases.labeled), len(self.cases.unlabeled)
        rows = max(1, round(total * unlabeled / max(1, labeled + unlabeled))) if unlabeled else 0
        self.labeled_batch_size, self.unlabeled_batch_size = max(1, total - rows), rows
        log.info("pretraining on %d cases (%d labeled, %d unlabeled; labels are not read), batch %d + %d",
                 labeled + unlabeled, labeled, unlabeled, self.labeled_batch_size, self.unlabeled_batch_size)

    def compute_output_folder(self) -> Path:
        plans = "" if self.request.plans == DEFAULT_PLANS else f"{self.request.plans}__"
        encoder = self.request.encoder or "plan"
        return self.roots.results / self.preprocessed_folder.name / \
            f"{self.name}__{plans}{self.configuration}__{encoder}" / "all"

    @classmethod
    def build_network_architecture(cls, plans: Mapping[str, Any], configuration: str | Configuration,
                                   options: Mapping[str, Any], deep_supervision: bool) -> nn.Module:
        """The encoder over every modality (as the default CMC network's) and a reconstruction decoder."""
        config = plan_configuration(plans, configuration)
        channels = plan_channels_per_modality(plans)
        return build_reconstruction_network(options.get("encoder") or plan_encoder(config), config, sum(channels),
                                            len(channels), options.get("encoder_options"),
                                            options.get("encoder_weights"),
                                            bool(options.get("unsafe_allow_pickle", False)))

    def training_network_options(self) -> dict[str, Any]:
        """Start from ``--encoder-weights`` if given (read as data unless ``--unsafe-allow-pickle``)."""
        return {"encoder_weights": self.request.encoder_weights,
                "unsafe_allow_pickle": self.request.unsafe_allow_pickle}

    def build_losses(self) -> None:
        self.channel_modalities = input_channel_modalities(self.plans["channels_per_modality"])
        self.image_channels = len(self.channel_modalities)
        self.corrupt = MaskedImageView(self.patch_size, seed=self.seed + 7919 * self.current_epoch)

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """L1 reconstruction of the image channels from the corrupted view, inside each channel's field of view."""
        x = batch["data"]
        n = self.image_channels
        reconstruction = self.network(self.corrupt(x, n))
        fov = x[:, [n + m for m in self.channel_modalities]]
        loss = masked_reconstruction_loss(reconstruction.float(), x[:, :n].float(), fov)
        return {"loss": loss, "reconstruction": loss.detach()}

    def on_train_end(self) -> None:
        """The final checkpoints, then ``encoder_weights.pt`` (the encoder's state dict, for
        ``cmcseg train --encoder-weights``); no validation."""
        if self.is_main:
            self.save_checkpoint("latest")
            self.save_checkpoint("final")
            path = self.write_encoder_weights()
            log.info("pretrained encoder weights: %s (use: cmcseg train ... --encoder-weights %s)", path, path)

    def write_encoder_weights(self) -> Path:
        """``encoder_weights.pt`` in the output folder, written atomically: ``{"state_dict": encoder weights,
        "cmcseg_pretrain": what made them}``."""
        encoder = cast(ReconstructionNetwork, self.inference_network()).encoder
        state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        meta = {"encoder": self.network_options()["encoder"], "dataset": self.preprocessed_folder.name,
                "configuration": self.configuration, "iterations": self.global_step, "plans_sha256": self.plans_sha256}
        path = self.output_folder / ENCODER_WEIGHTS_FILE
        with atomic_path(path) as tmp:
            torch.save({"state_dict": state, "cmcseg_pretrain": meta}, tmp)
        return path
