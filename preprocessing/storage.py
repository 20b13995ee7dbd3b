"""Reading and writing preprocessed cases: blosc2 arrays and a JSON properties file per case.

Layout of one case in ``<preprocessed>/<data_identifier>/``::

    CASE.b2nd        data, float32 (C, z, y, x)
    CASE_seg.b2nd    segmentation, int8/int16 (1, z, y, x); absent for unlabeled cases
    CASE_fov.b2nd    field-of-view mask per modality, uint8 (M, z, y, x)
    CASE.json        properties (geometry to revert predictions, class locations, content hash)

Arrays use nnU-Net's blosc2 chunk and block choice (``comp_blosc2_params``) so that the
trainers can memory-map them and read patches cheaply. The codec is LZ4 where nnU-Net uses
LZ4HC: on myops_dev's float data LZ4HC took 9x as long to write (5.3 s against 0.6 s for 20
cases; the largest single item of ``cmcseg plan``'s compute), for files 8 % smaller and patch
reads about 1 ms faster, which a training step of 0.3 s or more does not notice. Every file is written under a
temporary name and renamed into place, so a killed run never leaves a partial file where a
finished one is expected. ``CASE.json`` is written last: its presence with a matching
content hash is what marks a case as done.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

from cmcseg.image_io import _json_default, atomic_path, make_folder
from cmcseg.paths import check_name

logger = logging.getLogger(__name__)

DATA_SUFFIX = ".b2nd"
SEG_SUFFIX = "_seg.b2nd"
FOV_SUFFIX = "_fov.b2nd"
PROPERTIES_SUFFIX = ".json"

_CODEC = blosc2.Codec.LZ4  # not nnU-Net's LZ4HC: see the module docstring
_CLEVEL = 5


def case_files(folder: Path | str, case_id: str) -> dict[str, Path]:
    """Paths of the four files of a preprocessed case (data, seg, fov, properties); the case id is checked."""
    folder = Path(folder)
    check_name(case_id, "case id", str(folder))
    return {
        "data": folder / f"{case_id}{DATA_SUFFIX}",
        "seg": folder / f"{case_id}{SEG_SUFFIX}",
        "fov": folder / f"{case_id}{FOV_SUFFIX}",
        "properties": folder / f"{case_id}{PROPERTIES_SUFFIX}",
    }


def blosc2_layout(shape: Sequence[int], patch_size: Sequence[int], itemsize: int) -> tuple[tuple, tuple]:
    """(blocks, chunks) for a (C, z, y, x) array read in patches of ``patch_size`` (nnU-Net's rule)."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) == 2:  # 2D configuration: patches are single slices
        patch = (1, *patch)
    # Patches larger than the image are padded at training time; the layout only needs the image.
    patch = tuple(max(1, min(p, s)) for p, s in zip(patch, shape[1:]))
    return comp_blosc2_params(tuple(int(s) for s in shape), patch, itemsize)


def _choose_filter(array: np.ndarray, blocks: tuple, chunks: tuple) -> blosc2.Filter:
    """nnU-Net's trial compression (NOFILTER vs SHUFFLE); SHUFFLE where that helper is unavailable."""
    select = getattr(nnUNetDatasetBlosc2, "_select_filter", None)
    if select is None:
        return blosc2.Filter.SHUFFLE
    return select(array, blocks, chunks, _CODEC, _CLEVEL)


def write_array(array: np.ndarray, path: Path | str, patch_size: Sequence[int], nthreads: int = 1) -> None:
    """Write a 4D array as a memory-mappable blosc2 file, atomically (temporary name, then rename)."""
    if array.ndim != 4:
        raise ValueError(f"expected a (C, z, y, x) array for {path}, got shape {array.shape}")
    array = np.ascontiguousarray(array)
    blocks, chunks = blosc2_layout(array.shape, patch_size, array.itemsize)
    cparams = {"codec": _CODEC, "clevel": _CLEVEL, "nthreads": nthreads,
               "filters": [_choose_filter(array, blocks, chunks)]}
    with atomic_path(path) as tmp:
        tmp.unlink()  # blosc2 creates the file itself
        blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def read_array(path: Path | str, mmap: bool = True) -> blosc2.NDArray:
    """Open a blosc2 array read-only; memory-mapped unless ``mmap`` is False (or on Windows)."""
    kwargs: dict[str, Any] = {"mmap_mode": "r"} if mmap and os.name != "nt" else {}
    return blosc2.open(urlpath=str(path), mode="r", dparams={"nthreads": 1}, **kwargs)


def properties_to_json(properties: dict) -> str:
    """Readable JSON: objects are indented, lists stay on one line (thousands of class locations included)."""
    return _to_json(properties, 0) + "\n"


def _to_json(obj: Any, level: int) -> str:
    if isinstance(obj, dict) and obj:
        pad = "  " * (level + 1)
        items = (f"{pad}{json.dumps(str(k))}: {_to_json(v, level + 1)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    return json.dumps(obj, separators=(",", ":") if _is_nested_list(obj) else (", ", ": "), default=_json_default)


def _is_nested_list(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and bool(obj) and isinstance(obj[0], (list, tuple))


def write_properties(properties: dict, path: Path | str) -> None:
    """Write a case's properties JSON atomically."""
    text = properties_to_json(properties)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_properties(path: Path | str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_case(
    folder: Path | str,
    case_id: str,
    data: np.ndarray,
    seg: np.ndarray | None,
    fov: np.ndarray,
    properties: dict,
    patch_size: Sequence[int],
) -> dict[str, Path]:
    """Write one preprocessed case; the properties go last so that they mark a complete case.

    An old ``CASE.json`` is removed first, so a run killed half-way leaves a case that the
    next run sees as not done. For an unlabeled case a stale seg file is removed.
    """
    files = case_files(folder, case_id)
    make_folder(folder)
    files["properties"].unlink(missing_ok=True)
    write_array(data, files["data"], patch_size)
    write_array(fov, files["fov"], patch_size)
    if seg is not None:
        write_array(seg, files["seg"], patch_size)
    else:
        files["seg"].unlink(missing_ok=True)
    write_properties(properties, files["properties"])
    return files


def load_case(
    folder: Path | str, case_id: str, mmap: bool = True
) -> tuple[blosc2.NDArray, blosc2.NDArray | None, blosc2.NDArray, dict]:
    """(data, seg or None, fov, properties) of a preprocessed case; the arrays are memory-mapped blosc2 arrays.

    Index them (``data[:, z0:z1, y0:y1, x0:x1]``) to get numpy arrays of a patch only.
    """
    files = case_files(folder, case_id)
    if not files["properties"].is_file():
        raise FileNotFoundError(
            f"preprocessed case {case_id} is missing or incomplete in {folder} (no {files['properties'].name}). "
            "Fix: run `cmcseg plan` (preprocessing) again; it redoes only the cases that are not done."
        )
    properties = read_properties(files["properties"])
    data = read_array(files["data"], mmap)
    fov = read_array(files["fov"], mmap)
    seg = read_array(files["seg"], mmap) if properties.get("labeled", files["seg"].is_file()) else None
    return data, seg, fov, properties


def list_cases(folder: Path | str) -> list[str]:
    """Case ids that have a properties file (complete cases) in a preprocessed configuration folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(PROPERTIES_SUFFIX)] for p in folder.iterdir()
                  if p.name.endswith(PROPERTIES_SUFFIX) and not p.name.startswith("."))
