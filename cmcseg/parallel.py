"""Worker processes for the per-case stages (integrity check, fingerprint, registration, preprocessing).

Workers are forked where the platform allows it: they inherit the parent's imports, while a
spawned worker re-imports torch, nnunetv2 and SimpleITK (about 4-5 s each on 2 cores, per
stage). The parent of these pools does no torch or ITK computation of its own, so forking is
safe. Elsewhere (macOS, Windows) workers are spawned. Set ``CMCSEG_MP_START=spawn`` to force
spawning.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def start_method() -> str:
    """``fork`` on Linux unless CMCSEG_MP_START says otherwise; ``spawn`` elsewhere."""
    requested = os.environ.get("CMCSEG_MP_START")
    if requested:
        return requested
    return "fork" if sys.platform.startswith("linux") else "spawn"


def process_pool(num_workers: int, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = ()) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor with cmcseg's start method."""
    ctx = multiprocessing.get_context(start_method())
    return ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=initializer, initargs=initargs)
