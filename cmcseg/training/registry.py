"""Trainers by name: ``cmcseg train --trainer NAME``.

``TRAINERS`` maps a short name to a trainer class. A method registers itself with
:func:`register_trainer`. ``--trainer`` also accepts
``package.module:ClassName``, so a variant written as a tiny subclass in the user's own module
runs without touching cmcseg.
"""
from __future__ import annotations

import importlib

from cmcseg.errors import CmcsegError
from cmcseg.training.any2seg_trainer import Any2SegTrainer
from cmcseg.training.cmc_trainer import CMCTrainer
from cmcseg.training.trainer import TrainerBase

TRAINERS: dict[str, type[TrainerBase]] = {
    "cmc": CMCTrainer,
    "any2seg": Any2SegTrainer,
}
#: trainers that register themselves when their module is imported (kept out of the import of this module)
_REGISTERED_ON_IMPORT = {"demo": "cmcseg.demo"}


def register_trainer(name: str, trainer_class: type[TrainerBase]) -> None:
    """Make ``trainer_class`` available as ``--trainer name``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, TrainerBase)):
        raise TypeError(f"{trainer_class!r} is not a TrainerBase subclass")
    existing = TRAINERS.get(name)
    if existing is not None and existing is not trainer_class:
        raise ValueError(f"trainer name {name!r} is already taken by {existing.__name__}")
    TRAINERS[name] = trainer_class


def get_trainer_class(name: str) -> type[TrainerBase]:
    """The trainer class for a registered name, a class name of a registered trainer, or ``module:Class``."""
    if name not in TRAINERS and name in _REGISTERED_ON_IMPORT:
        importlib.import_module(_REGISTERED_ON_IMPORT[name])
    if name in TRAINERS:
        return TRAINERS[name]
    for cls in TRAINERS.values():
        if cls.__name__ == name:
            return cls
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise CmcsegError(f"trainer {name!r} cannot be loaded ({e}). Fix: check the module is importable "
                              "(PYTHONPATH) and defines that class.") from e
        if not (isinstance(cls, type) and issubclass(cls, TrainerBase)):
            raise CmcsegError(f"trainer {name!r} is not a subclass of cmcseg's TrainerBase.")
        return cls
    raise CmcsegError(f"unknown trainer {name!r}. Fix: use one of {', '.join(sorted({*TRAINERS, *_REGISTERED_ON_IMPORT}))}, or "
                      "module:ClassName for a trainer class of your own.")
