"""Finding nnU-Net's own preprocessing pieces (normalisation classes, resampling functions) by the names plans store."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class


def find_nnunet_member(default_module: ModuleType, subpackage: str, name: str) -> Any | None:
    """``name`` from ``default_module``, else searched in ``nnunetv2.preprocessing.<subpackage>`` as nnU-Net does;
    None if absent."""
    member = getattr(default_module, name, None)
    if member is None:
        folder = str(Path(nnunetv2.__path__[0]) / "preprocessing" / subpackage)
        member = recursive_find_python_class(folder, name, f"nnunetv2.preprocessing.{subpackage}")
    return member
