"""Where cmcseg reads and writes: the three work roots, dataset folder names, and the names that become paths.

Roots resolve, in order, from explicit flags, ``CMCSEG_RAW``/``CMCSEG_PREPROCESSED``/
``CMCSEG_RESULTS``, nnU-Net's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``,
and finally ``./cmcseg_work/{raw,preprocessed,results}``.

Names that end up in a path (dataset names, case ids, file endings, modality names) come from
the command line, file names and other people's JSON files. Each is checked where it enters
(:func:`check_name`, :func:`check_file_ending`), and every output path is checked to lie inside
its root before anything is written (:func:`contained`), so that no name can lead a write
outside the folder the user named.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cmcseg.errors import CmcsegError
from cmcseg.registry import known_dataset

_ROOT_ENV = {
    "raw": ("CMCSEG_RAW", "nnUNet_raw"),
    "preprocessed": ("CMCSEG_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("CMCSEG_RESULTS", "nnUNet_results"),
}
DEFAULT_WORK_DIR = "cmcseg_work"
#: a dataset name: letters, digits, ``_ . + -``; it starts with a letter or digit (so never ``..``)
_DATASET_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}"
DATASET_NAME_RE = re.compile(rf"^{_DATASET_NAME}$")
_FOLDER_RE = re.compile(rf"^Dataset(\d{{3}})_({_DATASET_NAME})$")
#: a case id or modality name: no path separator, no control character, not starting with a dot or space
_UNSAFE_NAME_RE = re.compile(r"[/\\\x00-\x1f\x7f]|^[. ]|\s$|^$")
#: a file ending: one or two dotted parts of letters and digits (``.nii.gz``, ``.nrrd``, ``.png``)
FILE_ENDING_RE = re.compile(r"^(\.[A-Za-z0-9]{1,10}){1,2}$")
#: ids handed to new datasets that the registry does not know
_FIRST_FREE_ID = 600


class UnsafeNameError(CmcsegError):
    """A name that would become (part of) a path is not a plain file name."""


def check_name(value: object, what: str, source: str, max_length: int = 200) -> str:
    """``value`` as a str if it is safe as one path component (no separator, no ``..``, no control character,
    not empty, at most ``max_length`` characters); else :class:`UnsafeNameError` naming ``what`` and ``source``."""
    text = str(value) if isinstance(value, (str, int)) else None
    if text is None or _UNSAFE_NAME_RE.search(text) or len(text) > max_length:
        raise UnsafeNameError(f"{source}: {what} {value!r} is not a plain name (it must not be empty, contain / or \\ "
                              "or control characters, or start with a dot or a space; at most "
                              f"{max_length} characters). Fix: rename it to letters, digits, '_', '-' and '.'.")
    return text


def check_dataset_name(value: str, source: str = "") -> str:
    """A dataset name as it becomes ``DatasetNNN_<name>``: letters, digits, ``_ . + -``."""
    if not DATASET_NAME_RE.match(str(value)):
        where = f"{source}: " if source else ""
        raise UnsafeNameError(f"{where}dataset name {value!r} is not allowed. Fix: use letters, digits, '_', '-', "
                              "'+' and '.', starting with a letter or digit (e.g. MSCMR, MyData_2).")
    return str(value)


def check_file_ending(value: object, source: str) -> str:
    """A file ending such as ``.nii.gz``; anything else (``./../x.nii.gz``) is :class:`UnsafeNameError`."""
    if not isinstance(value, str) or not FILE_ENDING_RE.match(value):
        raise UnsafeNameError(f"{source}: file_ending {value!r} is not a file extension. Fix: set it to e.g. "
                              "\".nii.gz\", \".nrrd\" or \".png\" (one or two dotted parts of letters and digits).")
    return value


def contained(root: Path | str, path: Path | str) -> Path:
    """``path`` resolved, after checking that it lies inside ``root`` (also resolved): where a write may go.

    Symbolic links are followed, so a link inside ``root`` that points outside is refused as well.
    """
    root_r = Path(root).resolve()
    path_r = Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise UnsafeNameError(f"refusing to write {path}: it resolves to {path_r}, outside {root_r}. Fix: check the "
                              "names (case id, file ending, dataset name) that made this path, and links in the "
                              "folder.")
    return path_r


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
    spec = str(spec)
    if not spec.isdigit() and not parse_folder_name(spec):
        check_dataset_name(spec)
    existing = find_dataset_folder(root, spec)
    if existing is not None:
        return existing.name
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
    used = {parsed[0] for c in Path(root).glob("Dataset*_*") if (parsed := parse_folder_name(c.name))}
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


def require_preprocessed_dataset(roots: WorkRoots, spec: str) -> Path:
    """The preprocessed folder of a dataset; a dataset that exists raw but was never planned says so."""
    found = find_dataset_folder(roots.preprocessed, spec)
    if found is not None:
        return found
    raw = find_dataset_folder(roots.raw, spec)
    if raw is not None:
        raise CmcsegError(
            f"dataset '{spec}' was never planned: the raw dataset {raw} exists, but the preprocessed root "
            f"{roots.preprocessed} holds no {raw.name}. Fix: run `cmcseg plan -d {spec}` (with the same --raw and "
            "--preprocessed roots, or CMCSEG_* variables) first, then train."
        )
    return require_dataset_folder(roots.preprocessed, spec, "preprocessed")
