"""The torch device a command runs on, from ``--device`` (one rule for training and prediction)."""
from __future__ import annotations

import torch

from cmcseg.errors import CmcsegError


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
