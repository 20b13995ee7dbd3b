"""Reading images and writing every output atomically (temporary name, then rename).

All image I/O goes through SimpleITK, so any format it reads is accepted, and geometry
(spacing, origin, direction) travels with the pixels.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk

from cmcseg.errors import WRITE_FAULTS, ImageReadError, WriteFaultError

#: Extensions that belong together (".nii.gz" is one extension).
_DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd")


def split_extension(name: str) -> tuple[str, str]:
    """Split ``case_0000.nii.gz`` into (``case_0000``, ``.nii.gz``)."""
    for ext in _DOUBLE_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext


#: the image file extensions SimpleITK reads, longest first (so that .nii.gz wins over .gz)
IMAGE_EXTENSIONS = tuple(sorted(
    (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".gipl", ".gipl.gz",
     ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".vtk", ".mnc", ".dcm"),
    key=len, reverse=True,
))


def case_id_of(path: Path | str) -> str | None:
    """Case id of an image file (name without its image extension), or None for a file that is no image."""
    name = Path(path).name
    if name.startswith("."):
        return None
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


#: below this much free space a failed write is taken as "the disk is full" (libraries that hide errno)
MIN_FREE_BYTES = 4 * 1024 * 1024


def write_fault(folder: Path | str, error: BaseException | None = None, path: Path | str | None = None
                ) -> WriteFaultError | None:
    """Why a write into ``folder`` failed, when the folder is the cause (full, read-only, no permission); else None.

    An ``OSError`` says it by its errno. torch's zip writer and blosc2 raise RuntimeError without one, so then the
    folder itself is looked at: almost no free space, or not writable.
    """
    if isinstance(error, WriteFaultError):
        return error
    if isinstance(error, OSError) and error.errno in WRITE_FAULTS:
        return WriteFaultError(folder, WRITE_FAULTS[error.errno], path)
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if probe is None:
        return None
    try:
        if shutil.disk_usage(probe).free < MIN_FREE_BYTES:
            return WriteFaultError(folder, WRITE_FAULTS[errno.ENOSPC], path)
    except OSError:
        pass
    if not os.access(probe, os.W_OK):
        return WriteFaultError(folder, "is not writable (read-only file system or no permission)", path)
    return None


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same extension; rename it over ``path`` on success.

    A crash leaves at most a hidden ``.tmp-*`` file, never a truncated ``path``. A write that fails because of
    the folder (full, read-only, no permission) raises :class:`WriteFaultError` naming the folder.
    """
    path = Path(path)
    _, ext = split_extension(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=ext, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise (write_fault(path.parent, e, path) or e) from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    except Exception as e:
        fault = write_fault(path.parent, e, path)
        if fault is None or fault is e:
            raise
        raise fault from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_folder(folder: Path | str) -> Path:
    """``mkdir -p``; a folder that cannot be made because of the disk is a :class:`WriteFaultError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_fault(folder, e) or e) from e
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(obj: Any, path: Path | str, indent: int = 2) -> None:
    """Write JSON atomically (numpy scalars and arrays are converted)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON values, recursively: numpy scalars and arrays to Python, NaN and inf to None
    (JSON has no NaN; a metric that could not be computed is null)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path | str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_image(path: Path | str, case: str = "") -> sitk.Image:
    """Read an image with SimpleITK; any failure becomes an ImageReadError naming the file and case."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist", case)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK raises RuntimeError for unreadable/corrupt files
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise ImageReadError(path, reason, case) from None


def check_compressed_stream(path: Path | str, case: str = "", chunk: int = 1 << 24) -> None:
    """Decompress a ``.gz`` file to its end and raise ImageReadError if the stream is truncated or corrupt.

    SimpleITK/ITK read a truncated ``.nii.gz`` without complaint (the missing voxels come back
    as zeros), so the integrity check verifies the gzip stream itself.
    """
    import gzip
    import zlib

    path = Path(path)
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(chunk):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise ImageReadError(path, f"compressed stream is truncated or corrupt ({e})", case) from None


def read_stored_values(path: Path | str, case: str = "") -> np.ndarray:
    """The voxel values exactly as stored, for validation (axis order is not guaranteed).

    NIfTI goes through nibabel: ITK's NIfTI reader turns NaN/inf into 0 and reads a truncated
    ``.nii.gz`` without complaint, which would hide exactly what validation looks for.
    """
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            return np.asanyarray(cast(Any, nib.load(str(path))).dataobj)
        except Exception as e:  # nibabel raises many types (EOFError, zlib.error, ImageFileError, ...)
            raise ImageReadError(path, f"{type(e).__name__}: {e}", case) from None
    check_compressed_stream(path, case)
    return sitk.GetArrayFromImage(read_image(path, case))


def read_image_header(path: Path | str, case: str = "") -> sitk.ImageFileReader:
    """Read only the header (size, spacing, origin, direction) without loading pixels."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist", case)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable header"
        raise ImageReadError(path, reason, case) from None
    return reader


def write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write an image atomically; the format follows the extension of ``path``."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def array_to_image(array: np.ndarray, spacing, origin=None, direction=None) -> sitk.Image:
    """Make an image from a numpy array in SimpleITK's (z, y, x) order with the given geometry (x, y, z order)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return img


def geometry_of(image) -> dict:
    """Geometry of an image or header reader as a JSON-ready dict (SimpleITK's x, y, z order)."""
    return {
        "size": [int(s) for s in image.GetSize()],
        "spacing": [float(s) for s in image.GetSpacing()],
        "origin": [float(o) for o in image.GetOrigin()],
        "direction": [float(d) for d in image.GetDirection()],
    }
