"""Where cmcseg reads and writes: the three work roots and dataset folder names.

Roots resolve, in order, from explicit flags, ``CMCSEG_RAW``/``CMCSEG_PREPROCESSED``/
``CMCSEG_RESULTS``, nnU-Net's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``,
and finally ``./cmcseg_work/{raw,preprocessed,results}``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cmcseg.errors import CmcsegError
from cmcseg.registry import known_dataset

_ROOT_ENV = {
    "raw": ("CMCSEG_RAW", "nnUNet_raw"),
    "preprocessed": ("CMCSEG_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("CMCSEG_RESULTS", "nnUNet_results"),
}
DEFAULT_WORK_DIR = "cmcseg_work"
_FOLDER_RE = re.compile(r"^Dataset(\d{3})_(.+)$")
#: ids handed to new datasets that the registry does not know
_FIRST_FREE_ID = 600


@dataclass(frozen=True)
class WorkRoots:
    raw: Path
    preprocessed: Path
    results: Path


def resolve_roots(
    raw: str | Path | None = None,
    preprocessed: str | Path | None = None,
    results: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkRoots:
    """Resolve the three roots: flag, then cmcseg variable, then nnU-Net variable, then the default."""
    env = os.environ if environ is None else environ
    given = {"raw": raw, "preprocessed": preprocessed, "results": results}
    out = {}
    for key, (ours, nnunet) in _ROOT_ENV.items():
        value = given[key] or env.get(ours) or env.get(nnunet) or os.path.join(DEFAULT_WORK_DIR, key)
        out[key] = Path(value).expanduser().absolute()
    return WorkRoots(**out)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def parse_folder_name(folder: str) -> tuple[int, str] | None:
    """``Dataset501_MSCMR`` -> (501, "MSCMR"); anything else -> None."""
    m = _FOLDER_RE.match(folder)
    return (int(m.group(1)), m.group(2)) if m else None


def find_dataset_folder(root: Path, spec: str | int) -> Path | None:
    """Find an existing dataset folder under ``root`` from a name, an id or a folder name."""
    spec = str(spec)
    root = Path(root)
    if not root.is_dir():
        return None
    if (root / spec).is_dir() and parse_folder_name(spec):
        return root / spec
    matches = []
    for child in sorted(root.iterdir()):
        parsed = parse_folder_name(child.name)
        if not child.is_dir() or not parsed:
            continue
        did, name = parsed
        if (spec.isdigit() and int(spec) == did) or name.lower() == spec.lower():
            matches.append(child)
    if len(matches) > 1:
        raise CmcsegError(
            f"dataset '{spec}' is ambiguous under {root}: {', '.join(m.name for m in matches)}. "
            "Fix: pass the full folder name (e.g. -d Dataset501_MSCMR)."
        )
    return matches[0] if matches else None


def dataset_folder_for_new(root: Path, spec: str | int) -> str:
    """The folder name for a dataset about to be created (by synth or convert) under ``root``.

    An existing folder is reused; a known name gets its registry id; a new name gets the first
    id from 600 up that no folder in ``root`` uses.
    """
    existing = find_dataset_folder(root, spec)
    if existing is not None:
        return existing.name
    spec = str(spec)
    if parse_folder_name(spec):
        return spec
    if spec.isdigit():
        raise CmcsegError(
            f"no dataset with id {spec} under {root}, and an id alone cannot name a new dataset. "
            "Fix: pass a name (-d MSCMR) or a full folder name (-d Dataset501_MSCMR)."
        )
    known = known_dataset(spec)
    if known is not None:
        return known.folder_name
    used = {parse_folder_name(c.name)[0] for c in Path(root).glob("Dataset*_*") if parse_folder_name(c.name)}
    new_id = next(i for i in range(_FIRST_FREE_ID, 1000) if i not in used)
    return dataset_folder_name(new_id, spec)


def require_dataset_folder(root: Path, spec: str | int, what: str = "raw") -> Path:
    """Like find_dataset_folder, but a missing dataset is an error that says where we looked."""
    found = find_dataset_folder(root, spec)
    if found is None:
        raise CmcsegError(
            f"dataset '{spec}' not found in the {what} root {root}. Fix: create it with `cmcseg synth -d {spec}` "
            f"or `cmcseg convert`, or point --{what} (or CMCSEG_{what.upper()}) at the folder that holds "
            "DatasetNNN_NAME."
        )
    return found
