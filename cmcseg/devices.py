"""The torch device a command runs on, from ``--device`` (one rule for training and prediction), and how the CPU's
allocator hands freed memory back."""
from __future__ import annotations

import ctypes
import logging

import torch

from cmcseg.errors import CmcsegError

log = logging.getLogger(__name__)

#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h), the parameter :func:`bound_cpu_allocator_retention` sets
_M_MMAP_THRESHOLD = -3


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``; under DDP (``local_rank``) on CUDA, the GPU of
    the local rank."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise CmcsegError(f"unknown device {spec!r}. Fix: pass --device auto, cpu or cuda.")
    if not torch.cuda.is_available():
        raise CmcsegError("--device cuda was asked for but torch sees no CUDA GPU. Fix: pass --device cpu, or "
                          "install a CUDA build of torch.")
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(spec) if ":" in spec else torch.device("cuda", torch.cuda.current_device())


def bound_cpu_allocator_retention(threshold_bytes: int) -> bool:
    """Serve every CPU block above ``threshold_bytes`` from a mapping of its own, returned to the system when freed.

    glibc's default threshold rises with each large block freed (up to 32 MB), so after the first steps a training
    step's activations come from the heap, and when they are freed they stay there, fragmented. The process's
    resident memory then grows past the step's live peak, which is what the planner's estimate counts
    (:mod:`cmcseg.plans.memory`). A fixed threshold keeps the resident peak at the live peak. It costs page faults
    on each step's large blocks: at the real myops_dev 3d_fullres plan, 4 MB took the peak from 3.54 to 3.00 GB
    for 16 % more CPU time per step (``TrainerBase.cpu_mmap_threshold``).

    Returns whether it was applied: False, changing nothing, where the C library is not glibc (macOS, musl) or
    glibc refuses the value.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: mallopt's parameter numbers are glibc's)
    except (OSError, AttributeError):
        log.debug("not glibc: the CPU allocator's retention is left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
