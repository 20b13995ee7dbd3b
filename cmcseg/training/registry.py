"""Trainers by name: ``cmcseg train --trainer NAME``.

``TRAINERS`` maps a short name to a trainer class. A method registers itself with
:func:`register_trainer`. ``--trainer`` also accepts
``package.module:ClassName``, so a variant written as a tiny subclass in the user's own module
runs without touching cmcseg.

Only the CMC trainer is imported with this module. The Any2Seg trainer (which needs
transformers) and the demo trainer are imported when they are asked for, so a broken or absent
transformers never stops CMC training; asking for Any2Seg then says what is wrong and the fix.
"""
from __future__ import annotations

import importlib

from cmcseg.errors import CmcsegError
from cmcseg.training.cmc_trainer import CMCBranchesTrainer, CMCTrainer
from cmcseg.training.trainer import TrainerBase

TRAINERS: dict[str, type[TrainerBase]] = {
    "cmc": CMCTrainer,
    "cmc_branches": CMCBranchesTrainer,
}
#: name -> (module, class name) of trainers imported only when asked for; the module registers the name
LAZY_TRAINERS = {
    "any2seg": ("cmcseg.training.any2seg_trainer", "Any2SegTrainer"),
    "demo": ("cmcseg.demo", "DemoCMCTrainer"),
}


def register_trainer(name: str, trainer_class: type[TrainerBase]) -> None:
    """Make ``trainer_class`` available as ``--trainer name``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, TrainerBase)):
        raise TypeError(f"{trainer_class!r} is not a TrainerBase subclass")
    existing = TRAINERS.get(name)
    if existing is not None and existing is not trainer_class:
        raise ValueError(f"trainer name {name!r} is already taken by {existing.__name__}")
    TRAINERS[name] = trainer_class


def is_builtin_name(name: str) -> bool:
    """True for the name (short or class name) of a trainer cmcseg ships, imported or not yet."""
    return name in TRAINERS or any(name in (short, cls) for short, (_, cls) in LAZY_TRAINERS.items())


def _import_lazy(name: str) -> None:
    """Import the module of the lazily registered trainer ``name`` (a short name or its class name)."""
    for short, (module_name, class_name) in LAZY_TRAINERS.items():
        if name not in (short, class_name) or short in TRAINERS:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise CmcsegError(
                f"the {class_name} trainer cannot be imported: {type(e).__name__}: {e}. It needs transformers (and "
                "nothing may break its import: an installed torchvision that does not match torch does). Fix: run "
                "`make install` (scripts/install.sh removes such a torchvision), or `pip uninstall torchvision`; the "
                "CMC trainer (--trainer cmc) does not need transformers.") from e
        TRAINERS.setdefault(short, getattr(module, class_name))


def get_trainer_class(name: str) -> type[TrainerBase]:
    """The trainer class for a registered name, a class name of a registered trainer, or ``module:Class``."""
    _import_lazy(name)
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
    raise CmcsegError(f"unknown trainer {name!r}. Fix: use one of {', '.join(sorted({*TRAINERS, *LAZY_TRAINERS}))}, "
                      "or module:ClassName for a trainer class of your own.")
