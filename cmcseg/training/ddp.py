"""Distributed data parallel (DDP) training when the command is launched by ``torchrun``.

``torchrun --nproc_per_node N -m cmcseg train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`init_distributed` reads them and joins the process group (NCCL on CUDA, Gloo on CPU);
without them training runs in one process and every helper here is a no-op.

The rules the trainer follows (as nnU-Net does):

* the plan's batch size is the global batch: each rank draws ``batch_size / world_size``;
* ranks shard the data by seed: each rank samples patches with ``seed + rank``, and the
  validation cases are split ``cases[rank::world_size]``;
* DDP averages gradients, so the ranks' parameters stay identical;
* only rank 0 writes logs, checkpoints, plots and summaries; the other ranks log warnings only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes (0 of 1 without DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True inside a process group of more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files."""
        return self.rank == 0


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True when the torchrun variables are set and ask for more than one process."""
    env = os.environ if environ is None else environ
    return all(k in env for k in _ENV_KEYS) and int(env["WORLD_SIZE"]) > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group from torchrun's environment variables (NCCL on CUDA, Gloo on CPU).

    Returns the single-process context when not launched by torchrun. On CUDA each rank uses
    the GPU ``LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return DistributedContext()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
        log.info("DDP: rank %d of %d joined the %s process group", rank, world, backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank)


def quiet_other_ranks(ctx: DistributedContext, logger_name: str = "cmcseg") -> None:
    """Ranks other than 0 log warnings and errors only: rank 0 speaks for all (and writes log.txt)."""
    if ctx.enabled and not ctx.is_main:
        logging.getLogger(logger_name).setLevel(logging.WARNING)


def wrap_model(model: nn.Module, ctx: DistributedContext, device: torch.device,
               find_unused_parameters: bool = True) -> nn.Module:
    """The model wrapped in DistributedDataParallel under DDP, else the model itself.

    ``find_unused_parameters`` defaults to True: nnU-Net's deep supervision gives the lowest
    resolution output weight 0, so its segmentation layer gets no gradient, which plain DDP
    rejects.
    """
    if not ctx.enabled:
        return model
    device_ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP (or torch.compile) wrapper."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(inner, "_orig_mod", inner)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (in place; returns it)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(module: nn.Module, ctx: DistributedContext) -> None:
    """Average the gradients of ``module``'s parameters over ranks (for a module outside the DDP wrapper)."""
    if not ctx.enabled:
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            all_reduce_sum(parameter.grad, ctx).div_(ctx.world_size)


def sum_over_ranks(values: np.ndarray, ctx: DistributedContext, device: torch.device) -> np.ndarray:
    """Element-wise sum of a float array over all ranks (through ``device``: the GPU for NCCL)."""
    if not ctx.enabled:
        return np.asarray(values, dtype=np.float64)
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    tensor = tensor.to(device if device.type == "cuda" else torch.device("cpu"))
    return all_reduce_sum(tensor, ctx).cpu().numpy()


def all_gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without DDP."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, ctx: DistributedContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank."""
    if ctx.enabled:
        dist.barrier()


def shard(items: list[Any], ctx: DistributedContext) -> list[Any]:
    """This rank's share of ``items`` (every ``world_size``-th item from ``rank``)."""
    return list(items[ctx.rank::ctx.world_size])


def rank_batch_size(global_batch_size: int, ctx: DistributedContext) -> int:
    """This rank's part of the global batch (at least 1): the sizes over ranks sum to the global batch
    when it is at least ``world_size``."""
    base, extra = divmod(int(global_batch_size), ctx.world_size)
    return max(1, base + (1 if ctx.rank < extra else 0))


def destroy(ctx: DistributedContext) -> None:
    """Leave the process group (after the last collective)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
