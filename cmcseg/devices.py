"""The torch device a command runs on, from ``--device`` (one rule for training and prediction), the precision a
network predicts in on it (``--precision``), and how the CPU's allocator hands freed memory back."""
from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import cast

import torch

from cmcseg.errors import CmcsegError

log = logging.getLogger(__name__)

#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h), the parameter :func:`bound_cpu_allocator_retention` sets
_M_MMAP_THRESHOLD = -3
#: glibc's ``M_TRIM_THRESHOLD`` and ``M_MMAP_MAX`` (malloc.h), the parameters :func:`reuse_cpu_allocations` sets
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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


#: ``--precision`` values: ``auto`` (float16 on CUDA, as nnU-Net; bfloat16 on a CPU whose instructions compute it,
#: else float32), or one of the rest everywhere
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
#: CPU flags (Linux ``/proc/cpuinfo``) of instructions that compute bfloat16 products natively
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_computes_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where oneDNN runs bfloat16 convolutions and the CPU has native bfloat16 instructions (AVX512-BF16 or
    AMX). Without them oneDNN emulates bfloat16 and gains nothing; where ``cpuinfo`` cannot be read (not Linux), no
    gain is assumed."""
    try:
        flags = {word for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
                 for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    if not flags & set(_CPU_BF16_FLAGS):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """The dtype a network predicts in on ``device`` for ``--precision spec`` (see :data:`PRECISIONS`).

    ``auto`` on a CPU is bfloat16 where the CPU computes it natively: on our 2-core AVX512-BF16 AMD EPYC, oneDNN's
    bfloat16 convolutions made a pass of five ResEnc-M 3d_fullres windows 1.9x faster (2.0 against 3.8 s), and on
    nine myops_dev models the argmax of the validation cases agreed on 99.97-99.99 % of the voxels, with the same
    mean Dice to 3 decimals (README).
    """
    if spec not in PRECISIONS:
        raise CmcsegError(f"unknown precision {spec!r}. Fix: pass --precision {', '.join(PRECISIONS)}.")
    if spec == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_computes_bfloat16() else torch.float32
    if spec == "float16" and device.type == "cpu":
        raise CmcsegError("--precision float16 is for GPUs; a CPU computes float16 slowly. Fix: pass --precision "
                          "bfloat16 or float32 on a CPU.")
    return getattr(torch, spec)


def precision_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16``, ...: a dtype as ``--precision`` names it (for logs and reports)."""
    return str(dtype).removeprefix("torch.")


def autocast_context(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; float32: no autocast (full precision)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


def reuse_cpu_allocations() -> bool:
    """Keep freed CPU blocks of any size in the process for the next allocation: no block gets a mapping of its own
    (``M_MMAP_MAX`` 0) and the heap is not trimmed (``M_TRIM_THRESHOLD`` at its maximum).

    glibc maps every block above 32 MB on its own, whatever its threshold, and unmaps it when freed. A full-resolution
    activation of a 3D window is larger than that (32 x 4 x 256 x 256 floats are 32 MiB), so each convolution's output
    was mapped, page-faulted in and unmapped again. At the myops_dev 3d_fullres PlainConvUNet plan (1 thread), one
    case's TTA prediction with one mirrored copy at a time (the CPU default) took 102 s, 24 of them system time; with
    the blocks reused, 71 s at 1.24 GB peak RSS instead of 1.14 (copies batched: 109 -> 62-66 s, 2.8 -> 3.6 GB). A
    training step holds many more blocks at once: reuse took a step from 12.1 to 9.0 s but its peak from 3.7 to
    4.9 GB, over the plan's 4 GB budget, so training does not use it.

    Process-wide, until the process ends. Returns whether it was applied (False where the C library is not glibc).
    """
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt(param, value)``, or None where the C library is not glibc (its parameter numbers are
    glibc's)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        log.debug("not glibc: the CPU allocator is left as it is")
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return cast(Callable[[int, int], int], mallopt)
