"""Checkpoints: ``checkpoint_{latest,best,final}.pt``, written atomically, and resuming from them.

``checkpoint_latest.pt`` holds everything that ``--continue`` needs to carry on as if the run had
not stopped: the network's weights, the optimizer (SGD momentum buffers), the GradScaler and the
LR scheduler, the next epoch to run, the metrics history, the best EMA pseudo-Dice, any
trainer-specific state (e.g. a mean teacher) and the random number generators' states. It is
written every ``save_every`` epochs and once more at the end of training.

``checkpoint_final.pt`` and ``checkpoint_best.pt`` are what prediction reads: the weights and the
metadata that rebuild and check the network (:data:`INFERENCE_KEYS`), without the optimizer, the
teacher or the RNG states, so each is the size of the weights (a third of ``latest`` for CMC).

Every save goes through :func:`cmcseg.image_io.atomic_path`: ``torch.save`` writes a hidden
``.tmp-checkpoint_*.pt-XXXX.pt`` beside the target, which is renamed over it once complete.
A SIGKILL therefore never truncates a checkpoint; it can at most leave such a temporary file,
which :meth:`CheckpointManager.remove_stale_temporaries` deletes when the next run starts.
Checkpoints are loaded onto the CPU; ``load_state_dict`` then copies weights and optimizer
state onto the network's device.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcseg.errors import CmcsegError
from cmcseg.image_io import atomic_path
from cmcseg.serialization import UnsafeFileError, check_plain_state, load_torch_file

log = logging.getLogger(__name__)

CHECKPOINT_KINDS = ("latest", "best", "final")
#: the order in which ``--continue`` looks for a checkpoint (nnU-Net's order)
RESUME_ORDER = ("final", "latest", "best")
#: 2: tensors and plain values only, loadable with ``weights_only=True`` (1 held NumPy RNG state)
FORMAT_VERSION = 2
#: checkpoints written with weights and metadata only (what prediction needs)
WEIGHTS_ONLY_KINDS = ("best", "final")
#: the entries a weights-only checkpoint keeps
INFERENCE_KEYS = ("format_version", "kind", "trainer", "network", "init", "plans_sha256", "labeled_ids", "epoch",
                  "global_step", "num_epochs", "history", "best")
#: a fresh start moves an earlier run's checkpoints into ``previous_run_<UTC time>/``
PREVIOUS_RUN_PREFIX = "previous_run_"
#: what else of a run is moved aside with its checkpoints
RUN_RECORD_FILES = ("training_config.json", "progress.png", "validation")


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # as a tensor and plain values, so that the checkpoint loads with weights_only=True
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when there is the same number of GPUs)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then rename it over ``path``.

    ``state`` must be tensors and plain values only (:func:`check_plain_state`), so that it loads
    with ``weights_only=True``.
    """
    check_plain_state(state, "checkpoint")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", unsafe_allow_pickle: bool = False,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` as data only; a damaged or unsafe file is a clear error.

    A file that needs full unpickling (a checkpoint from cmcseg before format 2, or a crafted one) is refused
    unless ``unsafe_allow_pickle`` (``--unsafe-allow-pickle``) says the user trusts it.
    """
    try:
        state = load_torch_file(path, "checkpoint", map_location, unsafe_allow_pickle, mmap=mmap)
    except UnsafeFileError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors... for damaged files
        raise CmcsegError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). Fix: delete it and "
                          "resume from another checkpoint_*.pt in the folder, or train without --continue.") from e
    if not isinstance(state, dict) or "network" not in state:
        raise CmcsegError(f"{path} is not a cmcseg training checkpoint (no 'network' entry).")
    return state


def checkpoint_progress(path: Path, unsafe_allow_pickle: bool = False) -> tuple[int, int, bool]:
    """(global step, epoch, resumable) of a checkpoint, read memory-mapped (the weights are not copied);
    resumable: it holds the optimizer state that ``--continue`` needs (weights-only ones do not)."""
    state = load_checkpoint(path, unsafe_allow_pickle=unsafe_allow_pickle, mmap=True)
    return int(state.get("global_step", 0)), int(state.get("epoch", 0)), "optimizer" in state


def inference_state(state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a full training state that prediction needs (:data:`INFERENCE_KEYS`)."""
    return {key: state[key] for key in INFERENCE_KEYS if key in state}


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
        """Write ``state`` as ``checkpoint_<kind>.pt`` atomically (weights and metadata only for best and final)."""
        path = self.path(kind)
        state = {"format_version": FORMAT_VERSION, "kind": kind, **state}
        save_checkpoint(inference_state(state) if kind in WEIGHTS_ONLY_KINDS else state, path)
        log.debug("saved %s", path)
        return path

    def existing(self) -> list[Path]:
        """The checkpoint files present, in :data:`RESUME_ORDER`."""
        return [self.path(kind) for kind in RESUME_ORDER if self.path(kind).is_file()]

    def resume_path(self, unsafe_allow_pickle: bool = False) -> Path | None:
        """The checkpoint ``--continue`` starts from: of those that hold the optimizer state (``latest``, and
        those of cmcseg before weights-only final/best), the one with the highest recorded step (then epoch); on a
        tie, final before latest before best. None if there is none.

        A run killed mid-training resumes its last ``latest``; a finished run resumes the ``latest`` written
        at its end.
        """
        ranked = []
        for order, path in enumerate(self.existing()):
            step, epoch, resumable = checkpoint_progress(path, unsafe_allow_pickle)
            if resumable:
                ranked.append((step, epoch, -order, path))
        return max(ranked)[3] if ranked else None

    def move_aside(self) -> Path | None:
        """Move the checkpoints (and the run's record) of a previous run into ``previous_run_<UTC time>/``.

        A fresh start calls this, so that a later ``--continue`` can never resume the old run's files, and
        nothing of the old run is deleted. Returns the folder, or None when there was nothing to move.
        """
        old = self.existing()
        if not old:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.output_folder / f"{PREVIOUS_RUN_PREFIX}{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.output_folder / f"{PREVIOUS_RUN_PREFIX}{stamp}-{n}"
        target.mkdir(parents=True)
        for path in [*old, *(self.output_folder / name for name in RUN_RECORD_FILES)]:
            if path.exists():
                os.replace(path, target / path.name)
        return target

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
