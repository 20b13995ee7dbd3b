"""The trainer base class: what every cmcseg method shares.

:class:`TrainerBase` owns the plan and the fold (labeled / unlabeled / validation cases), the
two-stream data loader, the optimisation (nnU-Net's SGD with Nesterov momentum, poly learning
rate, gradient clipping, AMP on CUDA), seeding, the epoch loop with its hooks, checkpoints and
``--continue``, the log, the progress bar and plot, validation, and DDP under torchrun.

A method (``CMCTrainer``, ``Any2SegTrainer``) subclasses it and implements three things:

* :meth:`TrainerBase.build_network` - the network;
* :meth:`TrainerBase.compute_losses` - the losses of one batch (a dict with the total under ``"loss"``);
* :meth:`TrainerBase.predict_probabilities` - class probabilities for validation and inference.

Hyperparameters are plain class attributes, so a variant is a tiny subclass::

    class CMCTrainerLongRamp(CMCTrainer):
        unlabeled_warmup = 0.3

The work lives in helpers of their own: :mod:`~cmcseg.checkpoint` (atomic checkpoints),
:mod:`~cmcseg.training.progress` (log file, tqdm, history, ``progress.png``),
:mod:`~cmcseg.training.validation` (pseudo-Dice, sliding-window validation) and
:mod:`~cmcseg.training.ddp` (process group, model wrapping, rank-0-only writes).
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import Tensor, nn

from cmcseg.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from cmcseg.devices import (
    autocast_context,
    bound_cpu_allocator_retention,
    cpu_computes_bfloat16,
    precision_name,
    resolve_device,
    resolve_precision,
)
from cmcseg.errors import CmcsegError
from cmcseg.evaluation import patch_counts
from cmcseg.image_io import make_folder, read_json, write_json_atomic
from cmcseg.paths import WorkRoots, require_preprocessed_dataset, resolve_roots
from cmcseg.plans.files import (
    DATASET_FILE,
    DEFAULT_PLANS,
    PLANS_FILE,
    SPLITS_FILE,
    TRAINING_CONFIG_FILE,
    plans_file_name,
)
from cmcseg.plans.memory import DEFAULT_UNLABELED_RATIO, MemoryEstimate, unlabeled_rows_for
from cmcseg.plans.plans import Configuration, LabelInfo, load_plans, plan_configuration, plan_encoder, plans_hash
from cmcseg.plans.splits import describe_labeled_subset, labeled_subset, load_splits, unlabeled_subset
from cmcseg.serialization import file_provenance
from cmcseg.training import ddp
from cmcseg.training.augmentation import SpatialAugmentation, configure_spatial_augmentation
from cmcseg.training.data import build_training_loader, build_validation_patches
from cmcseg.training.progress import (
    DIAGNOSTIC_KEYS,
    DICE_PREFIX,
    LOSS_PREFIX,
    MASS_PREFIX,
    PLOT_FILE,
    WEIGHT_PREFIX,
    MetricsHistory,
    attach_log_file,
    detach_log_file,
    epoch_means,
    format_metrics,
    iteration_bar,
    loss_metrics,
    plot_progress,
)
from cmcseg.training.validation import (
    BestTracker,
    pseudo_dice_metrics,
    summarize,
    validate_case_outputs,
    write_summary,
)

log = logging.getLogger(__name__)



@dataclass
class TrainingRequest:
    """What to train, as the CLI (or a script) asks for it. ``None`` means "the trainer's default"."""

    dataset: str
    fold: int
    labeled_fraction: float
    configuration: str = "3d_fullres"
    plans: str = DEFAULT_PLANS  # plans identifier: plans.json, or a planner variant's (cmcseg plan -pl)
    roots: WorkRoots | None = None
    device: str = "auto"
    seed: int = 0
    num_epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations: int | None = None
    num_workers: int | None = None
    continue_training: bool = False
    encoder: str | None = None  # None: the plan's topology (residual for ResEnc plans, plain for PlainConvUNet)
    encoder_weights: Path | None = None
    #: the encoder class's options (``--encoder-option feature_size=48``); the checkpoint stores them
    encoder_options: dict[str, Any] = field(default_factory=dict)
    shared_encoder: bool = False
    # ---- fine-tuning a pretrained encoder; None: the trainer's default
    encoder_lr_scale: float | None = None
    freeze_encoder: float | None = None
    command: str = ""
    max_seconds: float | None = None
    # ---- Any2Seg options; None: the trainer's default
    backbone: str | None = None
    backbone_weights: Path | None = None
    teacher: str | None = None
    teacher_weights: Path | None = None
    modality_dropout: float | None = None
    # ---- semi-supervised: scales every unlabeled loss term (0: supervised only, same batches); None: default
    unlabeled_weight: float | None = None
    # ---- security: read checkpoints and weight files with full unpickling (runs code in them); trusted files only
    unsafe_allow_pickle: bool = False


class ScaledPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule, with each parameter group's rate times its ``lr_scale`` (1 where unset), so a
    pretrained encoder can learn more slowly than a new decoder on the same curve."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= float(group.get("lr_scale", 1.0))
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


@dataclass(frozen=True)
class FoldCases:
    """The cases of one fold at one labeled fraction."""

    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]


def select_fold_cases(splits: dict, fold: int, fraction: float, unlabeled_when_fully_labeled: bool) -> FoldCases:
    """Labeled subset (nested across fractions), the cases trained on without labels, and validation cases.

    At ``fraction == 1`` training is supervised: the fold's truly unlabeled cases are left out
    unless ``unlabeled_when_fully_labeled``.
    """
    labeled = labeled_subset(splits, fold, fraction)
    unlabeled = unlabeled_subset(splits, fold, fraction)
    if fraction >= 1.0 and not unlabeled_when_fully_labeled:
        unlabeled = []
    return FoldCases(labeled, unlabeled, list(splits["folds"][fold]["val"]))


def check_request(request: TrainingRequest) -> None:
    """Refuse values no run can use (the CLI refuses them at parsing already; this guards library callers)."""
    minimum = {"num_epochs": 1, "iterations_per_epoch": 1, "val_iterations": 0, "num_workers": 0}
    flags = {"num_epochs": "--epochs", "iterations_per_epoch": "--iters-per-epoch", "val_iterations": "--val-iters",
             "num_workers": "--num-processes"}
    for name, low in minimum.items():
        value = getattr(request, name)
        if value is not None and int(value) < low:
            raise CmcsegError(f"{flags[name]} ({name}) is {value}, but it must be at least {low}. "
                              f"Fix: pass {flags[name]} {max(low, 1)} or more (or leave it out for the default).")
    if not 0 < float(request.labeled_fraction) <= 1:
        raise CmcsegError(f"--labeled {request.labeled_fraction} is not in (0, 1]. Fix: pass e.g. --labeled 0.2.")
    if request.fold < 0:
        raise CmcsegError(f"fold {request.fold} is negative. Fix: pass a fold of splits.json, e.g. -f 0.")
    plans_file_name(request.plans)  # a plans identifier names files and the model folder: a plain name only
    if request.encoder_lr_scale is not None and not float(request.encoder_lr_scale) > 0:
        raise CmcsegError(f"--encoder-lr-scale {request.encoder_lr_scale} must be above 0. Fix: pass e.g. 0.1 (or "
                          "--freeze-encoder-iters to hold the encoder still).")
    if request.freeze_encoder is not None and not float(request.freeze_encoder) >= 0:
        raise CmcsegError(f"--freeze-encoder-iters {request.freeze_encoder} is negative. Fix: pass a number of "
                          "iterations (e.g. 500) or a fraction of the run below 1 (e.g. 0.1).")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def batch_composition(batch_size: int, has_unlabeled: bool, unlabeled_ratio: float,
                      min_labeled: int) -> tuple[int, int]:
    """(labeled, unlabeled) items per batch.

    The labeled stream keeps the plan's whole batch (at least ``min_labeled``), so semi-supervised
    training sees as many labeled rows as supervised training does. With unlabeled cases,
    ``round(labeled * ratio)`` unlabeled rows (at least one) come on top.
    """
    labeled = max(batch_size, min_labeled)
    return labeled, unlabeled_rows_for(labeled, unlabeled_ratio) if has_unlabeled else 0


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside lists and dicts) moved to ``device``; other values as they are."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class TrainerBase:
    """Shared training machinery; subclasses add the network, the losses and the prediction."""

    # ---- optimisation (nnU-Net's defaults)
    initial_lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    nesterov: bool = True
    poly_exponent: float = 0.9
    grad_clip_norm: float = 12.0
    amp: bool = True  # mixed precision on CUDA (on a CPU: cpu_bfloat16)
    amp_dtype: str = "float16"  # "bfloat16" needs no loss scaling (the GradScaler is then off)
    #: train under bfloat16 autocast on a CPU with native bfloat16 instructions
    #: (:func:`cmcseg.devices.cpu_computes_bfloat16`; elsewhere float32). Off by default: a step of the small
    #: myops_dev network took 0.9 s against 1.3 s, and its effect on Dice is measured in the README, not assumed
    cpu_bfloat16: bool = False
    #: what the validation passes compute in on a CPU (:func:`cmcseg.devices.resolve_precision`; ``auto``: bfloat16
    #: where the CPU computes it natively, as ``cmcseg predict``); on a GPU they follow ``amp`` as training does
    inference_precision: str = "auto"
    # ---- schedule
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    # ---- data
    num_workers: int = 1
    oversample_foreground_percent: float = 0.33
    unlabeled_batch_ratio: float = DEFAULT_UNLABELED_RATIO  # unlabeled rows per labeled row, on top of them
    min_labeled_batch_size: int = 1
    unlabeled_when_fully_labeled: bool = False
    deep_supervision: bool = True
    augment: bool = True
    # ---- bookkeeping
    save_every: int = 1  # epochs between checkpoint_latest saves (nnU-Net: 50; CPU epochs are long)
    pseudo_dice_ema_momentum: float = 0.9
    sliding_window_step: float = 0.5  # nnU-Net's tile_step_size: windows overlap by half a patch
    #: windows per forward pass of the final validation; None: :func:`cmcseg.sliding_window.auto_window_batch`,
    #: the rule ``cmcseg predict`` uses (several small windows per pass on a CPU, one on a GPU)
    sliding_window_batch_size: int | None = None
    ddp_find_unused_parameters: bool = True
    cudnn_benchmark: bool = True
    #: on a CPU, blocks above this many bytes go back to the system when freed, so the resident peak is the live
    #: peak (:func:`cmcseg.devices.bound_cpu_allocator_retention`). None: glibc's default, which keeps freed blocks.
    #: At the real myops_dev 3d_fullres plan, 4 MB (4 * 2**20) lowered the peak from 3.54 to 3.00 GB and cost 16 %
    #: more CPU per step (page faults), so it is for machines short of memory, not the default
    cpu_mmap_threshold: int | None = None
    # ---- time budget: None trains all epochs; else no epoch starts that would end after this many seconds
    max_seconds: float | None = None
    # ---- fine-tuning a pretrained encoder (:meth:`encoder_parameters`)
    #: the encoder's learning rate relative to the rest's (e.g. 0.1 for a pretrained encoder); the poly schedule
    #: scales both alike
    encoder_lr_scale: float = 1.0
    #: the encoder learns nothing during this many first iterations (>= 1), or this fraction of the run (< 1): a new
    #: decoder first fits the pretrained features instead of pulling them towards its random start
    freeze_encoder: float = 0.0

    def __init__(self, request: TrainingRequest) -> None:
        check_request(request)
        self.request = request
        self.roots = request.roots or resolve_roots()
        self.fold = int(request.fold)
        self.labeled_fraction = float(request.labeled_fraction)
        self.configuration = request.configuration
        self.seed = int(request.seed)
        for name in ("num_epochs", "iterations_per_epoch", "val_iterations", "num_workers"):
            value = getattr(request, name)
            if value is not None:
                setattr(self, name, int(value))
        if request.iterations_per_epoch is not None and request.val_iterations is None:
            # keep nnU-Net's 250:50 ratio of training to validation batches in a shortened epoch
            self.val_iterations = max(1, -(-self.iterations_per_epoch * type(self).val_iterations
                                           // type(self).iterations_per_epoch))
        if request.max_seconds is not None:
            self.max_seconds = float(request.max_seconds)
        for name in ("encoder_lr_scale", "freeze_encoder"):
            if getattr(request, name) is not None:
                setattr(self, name, float(getattr(request, name)))
        self.dist = ddp.DistributedContext()
        self.device = torch.device("cpu")
        self.current_epoch = 0
        self.iteration = 0
        self.global_step = 0
        self.best = BestTracker(self.pseudo_dice_ema_momentum)
        self.history = MetricsHistory()
        self._log_handler: logging.Handler | None = None
        self._weights_source: dict[str, Any] | None = None  # the encoder weights file's provenance, hashed once
        self._initialized = False

    # =================================================================================== properties
    @property
    def name(self) -> str:
        """The trainer's name in output folders (its class name)."""
        return type(self).__name__

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0, or the only process)."""
        return self.dist.is_main

    @property
    def epoch_progress(self) -> float:
        """Epochs done so far, fractional within the current epoch (for ramp-ups)."""
        return self.current_epoch + self.iteration / max(1, self.iterations_per_epoch)

    @property
    def run_fraction(self) -> float:
        """How much of the run is done, in [0, 1]: iterations done over ``num_epochs * iterations_per_epoch``, or,
        with a time budget (``max_seconds``), the share of the budget spent if that is larger. Ramp-ups and warm-ups
        count in this unit, so a 5-minute run and a 1000-epoch run follow the same curve."""
        total = max(1, self.num_epochs * self.iterations_per_epoch)
        fraction = (self.current_epoch * self.iterations_per_epoch + self.iteration) / total
        started = getattr(self, "_run_started", None)
        if self.max_seconds and started is not None:
            fraction = max(fraction, (time.monotonic() - started) / self.max_seconds)
        return min(1.0, max(0.0, fraction))

    @property
    def use_amp(self) -> bool:
        """Mixed precision: on CUDA when ``amp`` is set; on a CPU when ``cpu_bfloat16`` is set and the CPU computes
        bfloat16 natively."""
        if self.device.type == "cuda":
            return self.amp
        return self.device.type == "cpu" and self.cpu_bfloat16 and cpu_computes_bfloat16()

    @property
    def amp_torch_dtype(self) -> torch.dtype:
        """The autocast dtype of training: ``amp_dtype`` on CUDA, bfloat16 on a CPU."""
        return getattr(torch, self.amp_dtype) if self.device.type == "cuda" else torch.bfloat16

    @property
    def training_dtype(self) -> torch.dtype:
        """What the training forward pass computes in: :attr:`amp_torch_dtype` under :attr:`use_amp`, else
        float32."""
        return self.amp_torch_dtype if self.use_amp else torch.float32

    @property
    def inference_dtype(self) -> torch.dtype:
        """What the validation passes compute in: ``inference_precision`` on a CPU, :attr:`training_dtype` on a
        GPU."""
        if self.device.type != "cpu":
            return self.training_dtype
        return resolve_precision(self.inference_precision, self.device)

    # =================================================================================== setup
    def initialize(self) -> None:
        """Load plan and fold, build network, optimizer, data and helpers; resume when asked (idempotent)."""
        if self._initialized:
            return
        self.dist = ddp.init_distributed("cuda" if self._wants_cuda() else "cpu")
        ddp.quiet_other_ranks(self.dist)
        self.device = resolve_device(self.request.device, self.dist.local_rank if self.dist.enabled else None)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        elif self.cpu_mmap_threshold is not None:
            if bound_cpu_allocator_retention(self.cpu_mmap_threshold):
                log.info("CPU allocator: blocks above %d bytes go back to the system when freed (cpu_mmap_threshold)",
                         self.cpu_mmap_threshold)
            else:
                log.warning("cpu_mmap_threshold %d was not applied (the C library is not glibc, or it refused the "
                            "value): freed memory stays with the allocator", self.cpu_mmap_threshold)
        self.preprocessed_folder = require_preprocessed_dataset(self.roots, self.request.dataset)
        self.output_folder = self.compute_output_folder()
        self.checkpoints = CheckpointManager(self.output_folder)
        if self.is_main:
            make_folder(self.output_folder)
            self._log_handler = attach_log_file(self.output_folder)
            self.checkpoints.remove_stale_temporaries()
        log.info("%s: dataset %s, configuration %s, fold %d, labeled fraction %g, device %s%s", self.name,
                 self.preprocessed_folder.name, self.configuration, self.fold, self.labeled_fraction, self.device,
                 f", DDP rank {self.dist.rank} of {self.dist.world_size}" if self.dist.enabled else "")
        if self.request.command:
            log.info("command: %s", self.request.command)
        self.load_plans_and_fold()
        if self.is_main:
            self.write_model_files()
        seed_everything(self.seed)  # same initial weights on every rank
        network = self.build_network().to(self.device)
        self.network = ddp.wrap_model(network, self.dist, self.device, self.ddp_find_unused_parameters)
        self.optimizer = self.configure_optimizer()
        self.lr_scheduler = self.configure_lr_scheduler()
        self.grad_scaler = torch.amp.GradScaler(self.device.type,
                                                enabled=self.use_amp and self.amp_torch_dtype == torch.float16)
        # resolving the validation precision here also refuses a bad inference_precision before training, not after
        log.info("training computes in %s, validation in %s, on %s", precision_name(self.training_dtype),
                 precision_name(self.inference_dtype), self.device)
        self.build_losses()
        self.memory_estimate = self.estimate_memory()
        self.report_memory_estimate()
        resumed = self.maybe_resume()
        self.write_training_config(resumed)
        seed_everything(self.seed + 1000 * self.dist.rank + 7919 * self.current_epoch)
        self.dataloader = self.build_dataloader()
        self.val_batches = self.build_validation_batches()
        self._initialized = True

    def _wants_cuda(self) -> bool:
        spec = self.request.device
        return spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())

    def configure_plans(self, plans: dict) -> dict:
        """Hook: adjust the plans before anything is built from them (e.g. a smaller network in a variant)."""
        return plans

    def load_plans_and_fold(self) -> None:
        """Read plans.json and splits.json and choose this fold's cases and the batch composition."""
        self.plans = self.configure_plans(load_plans(self.preprocessed_folder / plans_file_name(self.request.plans)))
        self.config = plan_configuration(self.plans, self.configuration)
        self.plans_sha256 = plans_hash(self.plans)
        self.splits = load_splits(self.preprocessed_folder / SPLITS_FILE)
        info, warning = describe_labeled_subset(self.splits, self.fold, self.labeled_fraction)
        log.info("%s", info)
        if warning:
            log.warning("%s", warning)
        self.cases = self.select_cases()
        self.labels = LabelInfo.from_plans(self.plans)
        self.patch_size = [int(p) for p in self.config["patch_size"]]
        rank_batch = ddp.rank_batch_size(int(self.config["batch_size"]), self.dist)
        self.labeled_batch_size, self.unlabeled_batch_size = batch_composition(
            rank_batch, bool(self.cases.unlabeled), self.unlabeled_batch_ratio, self.min_labeled_batch_size)
        log.info("fold %d: %d labeled, %d unlabeled, %d validation cases; batch of %d labeled + %d unlabeled "
                 "per process, patch %s", self.fold, len(self.cases.labeled), len(self.cases.unlabeled),
                 len(self.cases.validation), self.labeled_batch_size, self.unlabeled_batch_size, self.patch_size)

    def select_cases(self) -> FoldCases:
        """Hook: this fold's labeled, unlabeled and validation cases (before the batch composition is chosen)."""
        return select_fold_cases(self.splits, self.fold, self.labeled_fraction, self.unlabeled_when_fully_labeled)

    def write_model_files(self) -> None:
        """plans.json (as this trainer uses them, after :meth:`configure_plans`) and dataset.json into the model
        folder above ``fold_F``, so that the model folder alone is enough to predict (as nnU-Net's is).

        The plans written are the ones whose hash every checkpoint records (``plans_sha256``), so the predictor can
        rebuild the network and refuse a fold trained with other plans."""
        model_folder = self.output_folder.parent
        write_json_atomic(self.plans, model_folder / PLANS_FILE)
        dataset_json = self.preprocessed_folder / DATASET_FILE
        if dataset_json.is_file():
            write_json_atomic(read_json(dataset_json), model_folder / DATASET_FILE)
        else:
            log.warning("%s is missing: the model folder gets no dataset.json (cmcseg predict needs it)", dataset_json)

    def compute_output_folder(self) -> Path:
        """``<results>/DatasetNNN_NAME/<Trainer>__<configuration>__labeled<fraction>/fold_<F>``; a planner variant's
        plans identifier comes after the trainer (``<Trainer>__<plans>__<configuration>...``)."""
        plans = "" if self.request.plans == DEFAULT_PLANS else f"{self.request.plans}__"  # a variant says so
        run = f"{self.name}__{plans}{self.configuration}__labeled{self.labeled_fraction}"
        return self.roots.results / self.preprocessed_folder.name / run / f"fold_{self.fold}"

    def build_network(self) -> nn.Module:
        """The network this run trains: :meth:`build_network_architecture` with this run's
        :meth:`network_options` (which the checkpoint stores) and :meth:`training_network_options` (pretrained
        weights and the like, which prediction does not need)."""
        options = {**self.network_options(), **self.training_network_options()}
        return self.build_network_architecture(self.plans, self.config, options, self.deep_supervision)

    @classmethod
    def build_network_architecture(cls, plans: Mapping[str, Any], configuration: str | Configuration,
                                   options: Mapping[str, Any], deep_supervision: bool) -> nn.Module:
        """Hook: the network of ``configuration`` in ``plans`` with ``options``, the one place it is built.

        As nnU-Net's ``build_network_architecture``, it is called in inference as well: ``cmcseg predict`` calls it
        (through :meth:`build_inference_network`) with the checkpoint's ``init`` over its training_config.json
        hyperparameters as ``options``, so a subclass that changes the network changes both.
        """
        raise NotImplementedError(f"{cls.__name__} does not build a network")

    @classmethod
    def build_inference_network(cls, plans: Mapping[str, Any], configuration: str, options: Mapping[str, Any],
                                weights: Mapping[str, Tensor]) -> nn.Module:
        """The module ``cmcseg predict`` runs: input ``(B, C + M, *)`` to class probabilities ``(B, K, *)``, with a
        fold's ``weights`` loaded (:meth:`probabilities_module` switches deep supervision off)."""
        network = cls.build_network_architecture(plans, configuration, options,
                                                 deep_supervision=bool(options.get("deep_supervision", True)))
        network.load_state_dict(cls.checkpoint_weights(network, weights))
        return cls.probabilities_module(network, plans)

    @classmethod
    def checkpoint_weights(cls, network: nn.Module, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Hook: a checkpoint's weights made loadable into ``network`` (e.g. buffers older checkpoints lack)."""
        return weights

    @classmethod
    def probabilities_module(cls, network: nn.Module, plans: Mapping[str, Any]) -> nn.Module:
        """Hook: ``network`` wrapped to give class probabilities of the pipeline's input (for prediction)."""
        raise NotImplementedError(f"{cls.__name__} does not say how its network gives probabilities")

    def training_network_options(self) -> dict[str, Any]:
        """Hook: options of :meth:`build_network_architecture` that only training needs (pretrained weights)."""
        return {}

    def build_losses(self) -> None:
        """Hook: create the loss modules (called once the network exists)."""

    def estimate_memory(self) -> MemoryEstimate | None:
        """Hook: the estimated peak of this trainer's step (:mod:`cmcseg.plans.memory`); None if it has none."""
        return None

    def report_memory_estimate(self) -> None:
        """Log the estimate against the plan's budget; warn when this run's batch or network exceeds it."""
        estimate, budget = self.memory_estimate, self.plans.get("memory_budget_gb")
        if estimate is None:
            return
        log.info("memory: estimated training peak %.2f GB on %s (%s)%s", estimate.total_gb, self.device.type,
                 ", ".join(f"{k.removesuffix('_gb')} {v:.2f}" for k, v in estimate.as_dict().items()
                           if k != "total_gb"),
                 f" of the plan's {budget:g} GB budget" if budget else "")
        # only a plan made to fit the estimate promised it (nnU-Net's rule alone, e.g. the demo's, did not)
        promised = self.plans.get("memory_rule") == "cmcseg estimate"
        if promised and budget and estimate.total_gb > float(budget) * 1.05:
            log.warning("this run's estimated peak %.2f GB exceeds the plan's %g GB budget (the plan was made for "
                        "another batch, trainer or device). Fix: re-plan with `cmcseg plan --memory-gb` for this "
                        "machine, or expect up to that much memory", estimate.total_gb, float(budget))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """nnU-Net's SGD with Nesterov momentum over the network's parameters; with an ``encoder_lr_scale`` other
        than 1, the encoder's parameters are a group of their own whose learning rate is scaled by it."""
        encoder = {id(p) for p in self.encoder_parameters()}
        parameters = list(self.network.parameters())
        groups: list[dict[str, Any]] = [{"params": parameters, "lr_scale": 1.0}]
        if encoder and self.encoder_lr_scale != 1.0:
            groups = [{"params": [p for p in parameters if id(p) not in encoder], "lr_scale": 1.0},
                      {"params": [p for p in parameters if id(p) in encoder], "lr_scale": self.encoder_lr_scale,
                       "lr": self.initial_lr * self.encoder_lr_scale}]
        if encoder and (self.encoder_lr_scale != 1.0 or self.freeze_encoder):
            log.info("encoder (%d tensors): learning rate x %g, frozen for the first %d iterations", len(encoder),
                     self.encoder_lr_scale, self.freeze_encoder_iterations)
        return torch.optim.SGD(groups, lr=self.initial_lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.nesterov)

    def configure_lr_scheduler(self) -> PolyLRScheduler:
        """nnU-Net's poly schedule ``lr = initial (1 - epoch / epochs)^0.9``, stepped once per epoch, times each
        parameter group's ``lr_scale``."""
        return ScaledPolyLRScheduler(self.optimizer, self.initial_lr, self.num_epochs, self.poly_exponent)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Hook: the parameters the fine-tuning controls (``encoder_lr_scale``, ``freeze_encoder``) treat as the
        encoder: by default those of the network's ``encoders``, ``encoder`` or ``backbone`` module."""
        network = self.inference_network()
        for name in ("encoders", "encoder", "backbone"):
            module = getattr(network, name, None)
            if isinstance(module, nn.Module):
                return list(module.parameters())
        return []

    @property
    def freeze_encoder_iterations(self) -> int:
        """The iterations at the start of the run during which the encoder does not learn."""
        if self.freeze_encoder >= 1:
            return int(self.freeze_encoder)
        return int(round(self.freeze_encoder * self.num_epochs * self.iterations_per_epoch))

    def build_dataloader(self) -> Iterator[dict]:
        """The endless two-stream batch iterator (labeled rows first, unlabeled rows after)."""
        return build_training_loader(
            self.preprocessed_folder, self.plans, self.config, self.cases.labeled, self.cases.unlabeled,
            self.labeled_batch_size, self.unlabeled_batch_size, deep_supervision=self.deep_supervision,
            oversample_foreground_percent=self.oversample_foreground_percent, num_workers=self.num_workers,
            seed=self.seed + 1000 * self.dist.rank + 7919 * self.current_epoch, augment=self.augment,
            ds_scales=self.deep_supervision_scales())

    def deep_supervision_scales(self) -> list[list[float]] | None:
        """Hook: the scale of each deep-supervision output of the network, full resolution first: the network's
        own (an encoder that is not the plan's, e.g. a ViT, downsamples its own way); None: the plan's strides."""
        scales = getattr(self.inference_network(), "deep_supervision_scales", None)
        return scales() if callable(scales) else None

    def build_validation_batches(self) -> list[dict]:
        """The fixed validation patches of the per-epoch pseudo-Dice, this rank's share of them."""
        if self.val_iterations <= 0 or not self.cases.validation:
            return []
        batch = self.labeled_batch_size + self.unlabeled_batch_size
        batches = build_validation_patches(
            self.preprocessed_folder, self.plans, self.config, self.cases.validation,
            num_patches=self.val_iterations * batch * self.dist.world_size, seed=self.seed, batch_size=batch,
            deep_supervision=False, oversample_foreground_percent=self.oversample_foreground_percent)
        return ddp.shard(batches, self.dist)

    # =================================================================================== loop
    def run(self) -> Path:
        """Train (or resume) to ``num_epochs``, save the final checkpoint, validate; returns the output folder."""
        try:
            self.initialize()
            self.on_train_start()
            started, first_epoch = time.monotonic(), self.current_epoch
            self._run_started = started
            while self.current_epoch < self.num_epochs:
                self.run_epoch()
                if self.current_epoch < self.num_epochs and self.time_budget_spent(started, first_epoch):
                    break
            self.on_train_end()
        finally:
            self.close()
        return self.output_folder

    def time_budget_spent(self, started: float, first_epoch: int) -> bool:
        """True when another epoch (at the mean epoch time of this run) would end after ``max_seconds``.

        Every DDP rank takes the same decision (rank 0's clock is summed over ranks as a vote).
        """
        if self.max_seconds is None:
            return False
        elapsed = time.monotonic() - started
        per_epoch = elapsed / max(1, self.current_epoch - first_epoch)
        stop = float(elapsed + per_epoch > self.max_seconds) if self.is_main else 0.0
        stop = float(ddp.sum_over_ranks(np.array([stop]), self.dist, self.device)[0])
        if stop > 0:
            log.info("time budget of %.0f s reached after %.0f s: training stops after epoch %d of %d (the final "
                     "checkpoint and the validation follow)", self.max_seconds, elapsed, self.current_epoch - 1,
                     self.num_epochs)
        return stop > 0

    def run_epoch(self) -> None:
        """One epoch: ``iterations_per_epoch`` train steps, then the validation steps, then the epoch's end."""
        self.on_epoch_start()
        train_outputs = []
        bar = iteration_bar(range(self.iterations_per_epoch), self.iterations_per_epoch,
                            f"epoch {self.current_epoch}", enabled=self.is_main and sys.stderr is not None)
        for self.iteration in bar:
            output = self.train_step(next(self.dataloader))
            train_outputs.append(output)
            self.global_step += 1
            bar.set_postfix(loss=f"{output['loss']:.4f}")
        bar.close()
        self.iteration = self.iterations_per_epoch
        val_outputs = [self.validation_step(batch) for batch in self.val_batches]
        self.on_epoch_end(train_outputs, val_outputs)

    def on_train_start(self) -> None:
        """Hook: before the first epoch (also when resuming)."""
        log.info("training epochs %d..%d, %d iterations each", self.current_epoch, self.num_epochs - 1,
                 self.iterations_per_epoch)

    def on_epoch_start(self) -> None:
        """Hook: set the learning rate of this epoch and start its clock."""
        self.network.train()
        self.lr_scheduler.step(self.current_epoch)
        self.iteration = 0
        self._epoch_start = time.time()
        log.info("epoch %d, learning rate %.5g", self.current_epoch, self.optimizer.param_groups[0]["lr"])

    def autocast(self):
        """The mixed-precision context of the training forward pass (:attr:`training_dtype`; float32: none)."""
        return autocast_context(self.device, self.training_dtype)

    def inference_autocast(self):
        """The precision context of the validation passes (:attr:`inference_dtype`)."""
        return autocast_context(self.device, self.inference_dtype)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step: forward and losses, scaled backward, clipping at 12, SGD step."""
        batch = move_to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            losses = self.compute_losses(batch)
        self.grad_scaler.scale(losses["loss"]).backward()
        self.on_after_backward()
        self.grad_scaler.unscale_(self.optimizer)
        if self.global_step < self.freeze_encoder_iterations:
            for parameter in self.encoder_parameters():
                parameter.grad = None  # SGD skips a parameter without a gradient (no momentum, no weight decay)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.on_after_optimizer_step()
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in losses.items()}

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """Hook: the losses of one batch; ``"loss"`` is the total that is back-propagated.

        Keys other than ``"loss"`` are logged and plotted: loss terms as they are, loss weights
        under ``"weight/<name>"``.
        """
        raise NotImplementedError

    def on_after_backward(self) -> None:
        """Hook: after the backward pass, before clipping and the step (e.g. averaging gradients of modules
        outside the DDP-wrapped network)."""

    def on_after_optimizer_step(self) -> None:
        """Hook: after every optimizer step (e.g. an EMA teacher update)."""

    def predict_probabilities(self, x: Tensor) -> Tensor:
        """Hook: class probabilities ``(B, K, *spatial)`` of an input batch, full resolution, no deep supervision."""
        raise NotImplementedError

    def inference_network(self) -> nn.Module:
        """The plain network (outside DDP) for forward passes without gradient."""
        return ddp.unwrap_model(self.network)

    @torch.no_grad()
    def validation_step(self, batch: dict) -> dict[str, Any]:
        """TP/FP/FN per foreground class on one fixed validation batch."""
        self.network.eval()
        data = batch["data"].to(self.device)
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        probabilities = self.predict_probabilities_float(data)
        return {"counts": patch_counts(probabilities, target, self.labels)}

    def on_epoch_end(self, train_outputs: list[dict[str, float]], val_outputs: list[dict[str, Any]]) -> None:
        """Hook: aggregate losses and pseudo-Dice (over ranks), update the EMA, log, plot, checkpoint."""
        means = epoch_means(train_outputs)
        summed = ddp.sum_over_ranks(np.array(list(means.values())), self.dist, self.device)
        metrics = loss_metrics(dict(zip(means, (summed / self.dist.world_size).tolist())))
        counts = sum((o["counts"] for o in val_outputs), np.zeros((3, len(self.labels.values))))
        metrics.update(pseudo_dice_metrics(ddp.sum_over_ranks(counts, self.dist, self.device), self.labels))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch_time"] = time.time() - self._epoch_start
        improved = self.best.update(metrics.get("pseudo_dice", math.nan))
        if self.best.ema is not None:
            metrics["pseudo_dice_ema"] = self.best.ema
        self.history.append(self.current_epoch, metrics)
        self.log_epoch(metrics)
        if improved:
            log.info("new best EMA pseudo-Dice %.4f", self.best.best)
        self.current_epoch += 1
        if self.is_main:
            if improved:
                self.save_checkpoint("best")
            if self.current_epoch % self.save_every == 0 and self.current_epoch < self.num_epochs:
                self.save_checkpoint("latest")
            self.plot()
        ddp.barrier(self.dist)

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """One log line per group: losses, loss weights, pseudo-Dice, time."""
        log.info("epoch %d: %s", self.current_epoch,
                 format_metrics(metrics, [k for k in metrics if k.startswith(LOSS_PREFIX)]))
        weights = [k for k in metrics if k.startswith(WEIGHT_PREFIX)]
        if weights:
            log.info("epoch %d loss weights: %s", self.current_epoch,
                     format_metrics(metrics, weights + [k for k in DIAGNOSTIC_KEYS if k in metrics]))
        mass = [k for k in metrics if k.startswith(MASS_PREFIX)]
        if mass:
            log.info("epoch %d predicted foreground mass per head/class: %s", self.current_epoch,
                     format_metrics(metrics, mass))
        if "pseudo_dice" in metrics:
            per_class = [k for k in metrics if k.startswith(DICE_PREFIX)]
            log.info("epoch %d pseudo-Dice %.4f (%s)", self.current_epoch, metrics["pseudo_dice"],
                     format_metrics(metrics, per_class))
        log.info("epoch %d took %.1f s", self.current_epoch, metrics["epoch_time"])

    def plot(self) -> None:
        """Redraw ``progress.png`` (rank 0)."""
        try:
            plot_progress(self.history, self.output_folder / PLOT_FILE,
                          f"{self.name} {self.preprocessed_folder.name} {self.configuration} fold {self.fold} "
                          f"labeled {self.labeled_fraction}")
        except Exception as e:  # a plotting problem must never stop training
            log.warning("could not draw %s: %s", PLOT_FILE, e)

    def on_train_end(self) -> None:
        """Hook: save the final checkpoints (``latest`` to resume from, ``final`` weights only), run the full
        validation, write ``validation/summary.json``."""
        if self.is_main:
            self.save_checkpoint("latest")
            self.save_checkpoint("final")
        ddp.barrier(self.dist)
        self.run_final_validation()

    def run_final_validation(self) -> dict | None:
        """Sliding-window validation of this fold's validation cases (split over ranks); rank 0 writes the summary."""
        if not self.cases.validation:
            log.warning("fold %d has no validation cases; no validation summary", self.fold)
            return None
        network = self.inference_network()
        network.eval()
        folder = self.preprocessed_folder / self.config["data_identifier"]
        mine = ddp.shard(self.cases.validation, self.dist)
        heads = self.head_outputs()
        predict: Callable[[Tensor], Tensor]
        if heads is None:
            predict, names = self.predict_probabilities_float, ["fused"]
        else:
            predict, names = heads[0], ["fused", *heads[1]]
        per_output = validate_case_outputs(predict, names, folder, mine, self.patch_size, self.labels, self.device,
                                           self.sliding_window_step, self.sliding_window_batch_size)
        merged: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
        for part in ddp.all_gather_objects(per_output, self.dist):
            for name in names:
                merged[name].update(part[name])
        summary = summarize(merged["fused"], self.labels, trainer=self.name, configuration=self.configuration,
                            fold=self.fold, labeled_fraction=self.labeled_fraction, epochs_trained=self.current_epoch,
                            sliding_window={"step": self.sliding_window_step, "mode": "gaussian",
                                            "roi_size": self.patch_size})
        if len(names) > 1:
            summary["per_head"] = {name: summarize(merged[name], self.labels) for name in names[1:]}
        if self.is_main:
            path = write_summary(summary, self.output_folder)
            log.info("validation: mean Dice %s, foreground mean %.4f -> %s",
                     format_metrics(summary["mean"]), summary["foreground_mean"], path)
            for name, head in summary.get("per_head", {}).items():
                log.info("validation, head %s alone: mean Dice %s, foreground mean %.4f", name,
                         format_metrics(head["mean"]), head["foreground_mean"])
        return summary

    def head_outputs(self) -> tuple[Callable[[Tensor], Tensor], list[str]] | None:
        """Hook: a predictor whose output is the fused probabilities followed by each head's (K channels each),
        and the head names, so that the validation summary scores every head alone; None: no heads to score."""
        return None

    def predict_probabilities_float(self, x: Tensor) -> Tensor:
        """:meth:`predict_probabilities` under :meth:`inference_autocast`, returned in float32 (the sliding window
        accumulates in float32)."""
        with self.inference_autocast():
            return self.predict_probabilities(x).float()

    def close(self) -> None:
        """Stop the data workers, close the log file and leave the process group."""
        closer = getattr(getattr(self, "dataloader", None), "close", None)
        if closer is not None:
            closer()
        detach_log_file(self._log_handler)
        self._log_handler = None
        ddp.destroy(self.dist)

    # =================================================================================== checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything ``--continue`` needs: weights, optimizer, scaler, scheduler, epoch, history, RNG."""
        return {
            "trainer": self.name,
            "network": ddp.unwrap_model(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "history": self.history.state_dict(),
            "best": self.best.state_dict(),
            "rng": rng_state(),
            "extra": self.extra_state(),
            "plans_sha256": self.plans_sha256,
            "labeled_ids": list(self.cases.labeled),
            "num_epochs": self.num_epochs,
            "init": {"dataset": self.preprocessed_folder.name, "configuration": self.configuration,
                     "fold": self.fold, "labeled_fraction": self.labeled_fraction, "seed": self.seed,
                     "mirror_axes": list(self.spatial_augmentation().mirror_axes), **self.network_options()},
        }

    def spatial_augmentation(self) -> SpatialAugmentation:
        """Hook: rotation, scaling and mirroring of the training patches (nnU-Net's rule for the patch size). The
        checkpoint records the mirror axes, so test-time mirroring flips what training flipped."""
        return configure_spatial_augmentation(self.patch_size)

    def network_options(self) -> dict[str, Any]:
        """Hook: what, besides plans.json, rebuilds this trainer's network (stored as the checkpoint's ``init``)."""
        weights = self.request.encoder_weights
        if weights and self._weights_source is None:
            self._weights_source = file_provenance(weights)  # not at every checkpoint
        return {"encoder": self.request.encoder or plan_encoder(self.config),
                "shared_encoder": self.request.shared_encoder,
                "encoder_options": dict(self.request.encoder_options),
                # provenance only: prediction rebuilds the network without the weights file
                "encoder_weights_source": self._weights_source if weights else None}

    def extra_state(self) -> dict[str, Any]:
        """Hook: trainer-specific state to checkpoint (e.g. an EMA teacher)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Hook: restore what :meth:`extra_state` returned."""

    def save_checkpoint(self, kind: str) -> Path:
        """Write ``checkpoint_<kind>.pt`` atomically (rank 0 only)."""
        path = self.checkpoints.save(self.checkpoint_state(), kind)
        log.info("saved %s (next epoch %d)", path.name, self.current_epoch)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint into this (initialised) trainer; refuses one from other plans or cases."""
        state = load_checkpoint(path, map_location="cpu", unsafe_allow_pickle=self.request.unsafe_allow_pickle)
        if state.get("plans_sha256") != self.plans_sha256:
            raise CmcsegError(f"{path} was trained with other plans than {self.preprocessed_folder / PLANS_FILE} "
                              "has now. Fix: train without --continue (a new run), or restore the plans it used.")
        if state.get("labeled_ids") != list(self.cases.labeled):
            raise CmcsegError(f"{path} was trained on other labeled cases than fold {self.fold} at --labeled "
                              f"{self.labeled_fraction} gives now (splits.json changed?). Fix: train without "
                              "--continue, or restore the splits it used.")
        ddp.unwrap_model(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.lr_scheduler.initial_lr, self.lr_scheduler.max_steps = self.initial_lr, self.num_epochs  # this run's
        self.current_epoch = int(state["epoch"])
        self.global_step = int(state.get("global_step", 0))
        self.history.load_state_dict(state.get("history", {}))
        self.best.load_state_dict(state.get("best", {}))
        self.load_extra_state(state.get("extra", {}))
        set_rng_state(state["rng"])
        if state.get("num_epochs") not in (None, self.num_epochs):
            log.warning("the checkpoint was trained for %s epochs, this run asks for %d: the LR schedule changes",
                        state.get("num_epochs"), self.num_epochs)
        log.info("resumed from %s at epoch %d", path, self.current_epoch)

    def maybe_resume(self) -> bool:
        """With ``--continue``, load the most advanced checkpoint of this run (highest recorded step); True if one
        was loaded. Without it, an earlier run's checkpoints are moved into ``previous_run_<time>/`` (rank 0), so
        that a later ``--continue`` resumes this run and nothing of the old one is lost."""
        unsafe = self.request.unsafe_allow_pickle
        if not self.request.continue_training:
            moved = self.checkpoints.move_aside() if self.is_main else None
            if moved is not None:
                log.warning("%s held the checkpoints of an earlier run; they were moved to %s (this is a fresh start; "
                            "pass --continue to resume instead)", self.output_folder, moved)
            ddp.barrier(self.dist)
            return False
        existing = self.checkpoints.resume_path(unsafe)
        if existing is None:
            if self.checkpoints.existing():
                raise CmcsegError(
                    f"--continue: {self.output_folder} holds only weights-only checkpoints "
                    f"({', '.join(p.name for p in self.checkpoints.existing())}), without the optimizer state a "
                    "resume needs (checkpoint_latest.pt is missing). Fix: train without --continue (the old files "
                    "are moved aside, not deleted).")
            log.warning("--continue: no checkpoint in %s; starting from scratch", self.output_folder)
            return False
        self.load_checkpoint(existing)
        return True

    def write_training_config(self, resumed: bool) -> None:
        """``training_config.json``: command, fraction, case lists, seed, plans hash, batch and schedule (rank 0)."""
        if not self.is_main:
            return
        path = self.output_folder / TRAINING_CONFIG_FILE
        if resumed and path.is_file():
            config = read_json(path)
            config.setdefault("resumes", []).append({"command": self.request.command, "from_epoch": self.current_epoch})
        else:
            config = {
                "trainer": self.name,
                "command": self.request.command,
                "dataset": self.preprocessed_folder.name,
                "configuration": self.configuration,
                "fold": self.fold,
                "labeled_fraction": self.labeled_fraction,
                "labeled_ids": self.cases.labeled,
                "unlabeled_ids": self.cases.unlabeled,
                "validation_ids": self.cases.validation,
                "seed": self.seed,
                "plans_sha256": self.plans_sha256,
                "device": str(self.device),
                "world_size": self.dist.world_size,
                "labeled_batch_size": self.labeled_batch_size,
                "unlabeled_batch_size": self.unlabeled_batch_size,
                "patch_size": self.patch_size,
                "num_epochs": self.num_epochs,
                "iterations_per_epoch": self.iterations_per_epoch,
                "val_iterations": self.val_iterations,
                "memory_estimate_gb": self.memory_estimate.as_dict() if self.memory_estimate else None,
                "hyperparameters": self.hyperparameters(),
            }
        write_json_atomic(config, path)

    def hyperparameters(self) -> dict[str, Any]:
        """The class attributes that are plain values (the trainer's knobs), for the record, with the values this
        run uses (a request may override some, e.g. ``--epochs`` or ``--modality-dropout``)."""
        out: dict[str, Any] = {}
        for cls in reversed(type(self).__mro__):
            for key, value in vars(cls).items():
                if not key.startswith("_") and isinstance(value, (int, float, str, bool, tuple, type(None))):
                    value = vars(self).get(key, value)
                    out[key] = list(value) if isinstance(value, tuple) else value
        for key in ("num_epochs", "iterations_per_epoch", "val_iterations", "num_workers", "max_seconds"):
            out[key] = getattr(self, key)
        return out
