"""The memory a training step holds, estimated from the plans before anything trains.

nnU-Net's patch/batch rule compares a count of feature-map voxels with a reference measured on
a GPU with mixed precision; it does not know what else a trainer holds. cmcseg's CMC trainer
holds more than nnU-Net's: unlabeled rows on top of the labeled batch, an EMA teacher, and fp32
activations on a CPU. So the planner checks its patch and batch against this estimate, which
counts, for the network the default trainer builds:

* **parameters**: weights, their gradients, SGD momentum, and the EMA teacher's copy;
* **activations**: every tensor autograd saves for the backward pass, for every row of the batch
  (labeled and unlabeled). They are counted by running the network once on PyTorch's ``meta``
  device (shapes only, no data, no arithmetic) under ``saved_tensors_hooks``, so the count follows
  the real network, deep supervision included, whatever its topology;
* **transients**: what lives beside them at the peak: the backward pass's gradient buffers (twice
  the largest saved tensor), the teacher's no-grad forward on the unlabeled rows, and the losses'
  full-resolution maps;
* **batch**: the input patches, FOV masks and targets;
* **baseline**: the process itself (Python, torch and the libraries on a CPU; the CUDA context on a
  GPU), which counts against the budget as well.

The estimate is checked against measured peaks (``tests/test_memory.py``,
``benchmarks/real_size_cost.py``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cmcseg.plans.plans import Configuration

log = logging.getLogger(__name__)

GB = 1024 ** 3
#: resident memory of a training process before its network and data: Python, torch, MONAI, nnU-Net's and
#: batchgenerators' modules (measured on CPU, torch 2.13: 0.78 GB), and on CUDA the context that
#: ``torch.cuda.max_memory_allocated`` does not count
BASELINE_GB = {"cpu": 0.8, "cuda": 0.6}
#: bytes per activation element: fp32 on a CPU, mostly half precision under CUDA autocast (normalisation
#: statistics and the losses stay fp32, hence not 2.0)
ACTIVATION_BYTES = {"cpu": 4.0, "cuda": 2.5}
#: tensors the training step keeps per output voxel and class beside the saved activations: softmax, one-hot
#: target, CE and Dice intermediates of the student, the teacher's fused probabilities and the pseudo-labels
LOSS_MAPS_PER_CLASS = 6
#: unlabeled rows per labeled row: the trainers' ``unlabeled_batch_ratio`` and what the planner assumes (a plan is
#: made before anyone chooses ``--labeled``, so it makes room for semi-supervised training). One unlabeled row per
#: two labeled rows: on myops_dev it scored higher than one per labeled row, in less time per step
#: (benchmarks/semi_supervised_gain.py, arm ``cmc-half``)
DEFAULT_UNLABELED_RATIO = 0.5


def unlabeled_rows_for(labeled: int, ratio: float = DEFAULT_UNLABELED_RATIO) -> int:
    """Unlabeled rows on top of ``labeled`` labeled rows: ``round(labeled * ratio)``, at least one (none at ratio 0).

    The one rule for the trainers' batch and the planner's estimate of it."""
    return 0 if ratio <= 0 else max(1, int(round(labeled * ratio)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, in GB, by what holds it."""

    parameters_gb: float
    activations_gb: float
    transients_gb: float
    batch_gb: float
    baseline_gb: float

    @property
    def total_gb(self) -> float:
        return self.parameters_gb + self.activations_gb + self.transients_gb + self.batch_gb + self.baseline_gb

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in asdict(self).items()}, "total_gb": round(self.total_gb, 4)}


@dataclass(frozen=True)
class ActivationCount:
    """What one forward pass of one row saves for backward, in elements, and the network's parameter count."""

    saved_elements: int  # every saved tensor, each counted once
    largest_elements: int  # the largest of them
    output_elements: int  # the full-resolution output map (classes x voxels)
    input_shape: tuple[int, ...]  # one row: channels, then the patch
    parameters: int


def count_saved_activations(network: nn.Module, input_shape: tuple[int, ...]) -> ActivationCount:
    """Elements autograd saves when ``network`` (built on the ``meta`` device) runs on one ``input_shape`` row.

    A tensor saved by several operations is counted once (by identity). Parameters are not activations and are
    left out; so are the integer index tensors of pooling (none in nnU-Net's conv networks).
    """
    parameters = {id(p) for p in network.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters and tensor.is_floating_point():
            seen.setdefault(id(tensor), tensor.numel())
        return tensor

    x = torch.empty((1, *input_shape), device="meta", requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = network(x)
    full = _first_tensor(out)
    sizes = list(seen.values()) or [0]
    return ActivationCount(sum(sizes), max(sizes), full.numel(), tuple(int(i) for i in input_shape),
                           sum(p.numel() for p in network.parameters()))


def _first_tensor(out: Any) -> torch.Tensor:
    """The full-resolution logits in a network's output (a tensor, a list of scales, or a CMCOutput)."""
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


def estimate_step(count: ActivationCount, labeled_rows: int, unlabeled_rows: int, device: str = "cpu",
                  teacher: bool = True) -> MemoryEstimate:
    """Peak memory of a training step of the network behind ``count``.

    ``labeled_rows`` + ``unlabeled_rows`` go through the student with gradients; with ``teacher`` and unlabeled
    rows, an EMA copy of the weights also runs (no gradients) on the unlabeled rows. ``device`` is ``"cpu"``
    (fp32) or ``"cuda"`` (autocast).
    """
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    act_bytes = ACTIVATION_BYTES[kind]
    rows = int(labeled_rows) + int(unlabeled_rows)
    has_teacher = teacher and unlabeled_rows > 0
    # weights + gradients + SGD momentum (+ the teacher's copy), fp32 on every device
    parameters = count.parameters * 4 * (3 + int(has_teacher))
    activations = count.saved_elements * act_bytes * rows
    backward = 2 * count.largest_elements * 4 * rows
    teacher_forward = 2 * count.largest_elements * act_bytes * unlabeled_rows if has_teacher else 0
    losses = LOSS_MAPS_PER_CLASS * count.output_elements * 4 * rows
    channels, voxels = count.input_shape[0], math.prod(count.input_shape[1:])
    batch = rows * voxels * (channels + 2) * 4 * (1 + int(has_teacher))
    return MemoryEstimate(parameters / GB, activations / GB, (backward + teacher_forward + losses) / GB, batch / GB,
                          BASELINE_GB[kind])


def estimate_training_memory(network: nn.Module, input_shape: tuple[int, ...], labeled_rows: int,
                             unlabeled_rows: int, device: str = "cpu", teacher: bool = True) -> MemoryEstimate:
    """:func:`estimate_step` for ``network`` (built on the meta device) on rows of ``input_shape``."""
    return estimate_step(count_saved_activations(network, input_shape), labeled_rows, unlabeled_rows, device,
                         teacher)


def meta_network(build: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``build(*args, **kwargs)`` with every tensor on the meta device: a network's shapes without its memory."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def plan_activation_count(plans: Mapping[str, Any], configuration: str | Configuration,
                          **network_options: Any) -> ActivationCount:
    """The count for the CMC network of ``plans[configuration]`` at its patch size; ``network_options`` go to
    :func:`cmcseg.networks.cmc.build_cmc_network` (default: one network over all modalities, with the
    encoder of the plan's topology)."""
    from cmcseg.networks.cmc import build_cmc_network
    from cmcseg.plans.plans import plan_channels_per_modality, plan_configuration

    config = plan_configuration(plans, configuration)
    options = {"single_branch": True, **network_options}  # no encoder given: the plan's topology
    network = meta_network(build_cmc_network, plans, configuration, **options)
    channels = plan_channels_per_modality(plans)
    return count_saved_activations(network, (sum(channels) + len(channels), *[int(p) for p in config["patch_size"]]))


def plan_memory_estimate(plans: Mapping[str, Any], configuration: str | Configuration, labeled_rows: int,
                         unlabeled_rows: int, device: str = "cpu", **network_options: Any) -> MemoryEstimate:
    """:func:`estimate_step` for the CMC network of ``plans[configuration]`` (see :func:`plan_activation_count`)."""
    count = plan_activation_count(plans, configuration, **network_options)
    return estimate_step(count, labeled_rows, unlabeled_rows, device)
