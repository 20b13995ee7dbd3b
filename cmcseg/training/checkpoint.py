"""Checkpoints: ``checkpoint_{latest,best,final}.pt``, written atomically, and resuming from them.

A checkpoint holds everything that ``--continue`` needs to carry on as if the run had not
stopped: the network's weights, the optimizer (SGD momentum buffers), the GradScaler and the
LR scheduler, the next epoch to run, the metrics history, the best EMA pseudo-Dice, any
trainer-specific state (e.g. a mean teacher) and the random number generators' states.

Every save goes through :func:`cmcseg.image_io.atomic_path`: ``torch.save`` writes a hidden
``.tmp-checkpoint_*.pt-XXXX.pt`` beside the target, which is renamed over it once complete.
A SIGKILL therefore never truncates a checkpoint; it can at most leave such a temporary file,
which :meth:`CheckpointManager.remove_stale_temporaries` deletes when the next run starts.
Checkpoints are loaded onto the CPU; ``load_state_dict`` then copies weights and optimizer
state onto the network's device.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcseg.errors import CmcsegError
from cmcseg.image_io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_KINDS = ("latest", "best", "final")
#: the order in which ``--continue`` looks for a checkpoint (nnU-Net's order)
RESUME_ORDER = ("final", "latest", "best")
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when there is the same number of GPUs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a damaged file is a clear error."""
    try:
        # weights_only=False: the checkpoint holds RNG states and the metrics history (trusted, our own file)
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors... for damaged files
        raise CmcsegError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). Fix: delete it and "
                          "resume from another checkpoint_*.pt in the folder, or train without --continue.") from e
    if not isinstance(state, dict) or "network" not in state:
        raise CmcsegError(f"{path} is not a cmcseg training checkpoint (no 'network' entry).")
    return state


class CheckpointManager:
    """The checkpoint files of one output folder: names, atomic saves, and which one to resume from."""

    def __init__(self, output_folder: Path) -> None:
        self.output_folder = Path(output_folder)

    def path(self, kind: str) -> Path:
        """``<output>/checkpoint_<kind>.pt``."""
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"unknown checkpoint kind {kind!r}; one of {CHECKPOINT_KINDS}")
        return self.output_folder / f"checkpoint_{kind}.pt"

    def save(self, state: dict[str, Any], kind: str) -> Path:
        """Write ``state`` as ``checkpoint_<kind>.pt`` atomically."""
        path = self.path(kind)
        save_checkpoint({"format_version": FORMAT_VERSION, "kind": kind, **state}, path)
        log.debug("saved %s", path)
        return path

    def resume_path(self) -> Path | None:
        """The checkpoint ``--continue`` starts from: final, else latest, else best; None if there is none."""
        for kind in RESUME_ORDER:
            if self.path(kind).is_file():
                return self.path(kind)
        return None

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the ``.tmp-*`` files a killed run left in the output folder (unfinished checkpoints, plots,
        JSON files, also under ``validation/``); returns what was removed. Call it before this run writes."""
        removed = []
        for tmp in sorted([*self.output_folder.glob(".tmp-*"), *self.output_folder.glob("*/.tmp-*")]):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        if removed:
            log.warning("removed %d unfinished file(s) left by a killed run: %s",
                        len(removed), ", ".join(p.name for p in removed))
        return removed
