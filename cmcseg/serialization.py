"""Reading and writing torch files (checkpoints, weights) so that opening one never runs code.

``torch.load(weights_only=False)`` unpickles arbitrary Python objects, and unpickling can run
any code the file's author put there. A checkpoint from another clinic or a downloaded
foundation-model file must stay data, so every cmcseg read goes through :func:`load_torch_file`:

* ``weights_only=True`` always, with NumPy's data-only constructors allowed (arrays, dtypes and
  scalars, which nnU-Net checkpoints hold in their logs). These build values; they call nothing.
* A file that needs any other global (a class, a function) is refused before anything in it runs,
  with the globals it names and the fix.
* The one exception is ``unsafe_allow_pickle=True``, reached only through the CLI flag
  ``--unsafe-allow-pickle``, for a file the user made or trusts.

cmcseg's own checkpoints hold nothing but tensors and JSON-like values (dicts, lists, tuples,
strings, numbers, booleans, None); :func:`check_plain_state` enforces that on save, so a
trainer's ``extra_state`` hook cannot slip a Python object into the format.
"""
from __future__ import annotations

import logging
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcseg.errors import CmcsegError

log = logging.getLogger(__name__)

#: the CLI flag that allows full unpickling; its name says the risk
UNSAFE_FLAG = "--unsafe-allow-pickle"


def _numpy_data_globals() -> list[Any]:
    """NumPy's constructors of plain data (arrays, dtypes, scalars): they rebuild values, never call user code."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core to numpy._core
    found: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "StringDType"]
    return found


class UnsafeFileError(CmcsegError):
    """A torch file that can only be read by unpickling Python objects, i.e. by running code it names."""


def load_torch_file(path: Path | str, what: str, map_location: str | torch.device = "cpu",
                    unsafe_allow_pickle: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` a file as data only; a file that needs more is refused with :class:`UnsafeFileError`.

    ``what`` names the file in messages ("checkpoint", "encoder weights file"). Other read failures
    (truncated, not a torch file) propagate as they are, for the caller to word.
    """
    path = Path(path)
    if unsafe_allow_pickle:
        log.warning("%s: loading with full unpickling (%s): any code inside this file runs now", path, UNSAFE_FLAG)
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).casefold() and "weights_only" not in str(e).casefold():
            raise
        try:
            names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
        except Exception:  # noqa: BLE001 - only for the message
            names = "unknown"
        raise UnsafeFileError(
            f"{what} {path} holds Python objects besides tensors and plain values ({names}). Reading it would "
            "unpickle them, which runs code named by whoever wrote the file, so cmcseg refuses it. Fix: ask for a "
            "file saved as a plain state dict (torch.save(model.state_dict())); or, only if you made this file "
            f"yourself or fully trust its source, pass {UNSAFE_FLAG}.") from None


_PLAIN = (str, int, float, bool, type(None))


def check_plain_state(obj: Any, where: str = "state") -> None:
    """Raise TypeError if ``obj`` holds anything but tensors and JSON-like containers and scalars.

    This is the checkpoint format: what passes here loads with ``weights_only=True``.
    """
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; keys must be str or int")
            check_plain_state(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain_state(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; a checkpoint holds only tensors, "
                    "dicts, lists, tuples, str, int, float, bool and None (convert it, e.g. ndarray -> tensor)")


def file_provenance(path: Path | str) -> dict[str, Any]:
    """Where a weights file came from, for the record: its name, size and SHA-256 (the path itself is not kept: a
    model folder travels to other machines)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
