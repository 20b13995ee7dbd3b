"""Moving pixels from a release into the raw layout without touching their geometry.

No resampling ever happens here: an image keeps its size, spacing, origin and direction.
A source already in the dataset's file format is copied byte for byte (after its header is
read, so an unreadable file is reported); anything else is re-written with SimpleITK.
NumPy ``.npy`` arrays (MCubeS AoLP/DoLP) become images with unit spacing and zero origin,
the geometry SimpleITK gives the PNG images of the same scene.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmcseg.errors import ImageReadError, Problem
from cmcseg.image_io import atomic_path, geometry_of, read_image, read_image_header, split_extension, write_image
from cmcseg.preprocessing.converters.base import ConversionProblem, LabelEncoding

#: Geometry differences below these are header round-off, not a different grid.
_SPACING_ORIGIN_TOL_MM = 1e-3
_DIRECTION_TOL = 1e-4


def transfer_image(sources: tuple[Path, ...], dest: Path, case: str, components: int | None = None) -> dict:
    """Put one modality of a case at ``dest``; return its geometry (see :func:`geometry_of`)."""
    if len(sources) == 1 and split_extension(sources[0].name)[1] == split_extension(dest.name)[1]:
        header = read_image_header(sources[0], case)
        if components is None or header.GetNumberOfComponents() == components:
            with atomic_path(dest) as tmp:
                shutil.copyfile(sources[0], tmp)
            return geometry_of(header)
    image = load_image(sources, case)
    if components is not None:
        image = keep_components(image, components, sources[0], case)
    write_image(image, dest)
    return geometry_of(image)


def load_image(sources: tuple[Path, ...], case: str) -> sitk.Image:
    """Read one image from its file, or compose it from one file per component."""
    parts = [_read_any(path, case) for path in sources]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for path, part in zip(sources[1:], parts[1:]):
        if part.GetSize() != first.GetSize() or part.GetPixelID() != first.GetPixelID():
            raise ConversionProblem(Problem(
                f"component files disagree: {sources[0].name} is {first.GetSize()} "
                f"{first.GetPixelIDTypeAsString()}, {path.name} is {part.GetSize()} {part.GetPixelIDTypeAsString()}",
                file=str(path), case=case, fix="the component files of one image must have the same size and type",
            ))
    return sitk.Compose(parts)


def _read_any(path: Path, case: str) -> sitk.Image:
    """Read an image file with SimpleITK, or a NumPy array saved with ``numpy.save``."""
    if path.suffix.lower() != ".npy":
        return read_image(path, case)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist", case)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ImageReadError(path, f"not a readable .npy array ({e})", case) from None
    if array.ndim not in (2, 3):
        raise ImageReadError(path, f"expected a 2D array (H, W) or (H, W, C), got shape {array.shape}", case)
    return sitk.GetImageFromArray(array, isVector=array.ndim == 3)


def keep_components(image: sitk.Image, components: int, path: Path, case: str) -> sitk.Image:
    """Keep the first ``components`` components (RGBA -> RGB); fewer than asked is a problem."""
    found = image.GetNumberOfComponentsPerPixel()
    if found == components:
        return image
    if found < components:
        raise ConversionProblem(Problem(
            f"image has {found} component(s), expected {components}", file=str(path), case=case,
            fix="check that this is the right modality's file (an RGB image has 3 components)",
        ))
    return sitk.Compose([sitk.VectorIndexSelectionCast(image, i) for i in range(components)])


def read_label_array(path: Path, case: str, component: int | None) -> tuple[np.ndarray, sitk.Image]:
    """The integer label array of a label file (one component of it if it has several), and the image."""
    image = read_image(path, case)
    n = image.GetNumberOfComponentsPerPixel()
    if n > 1:
        if component is None:
            raise ConversionProblem(Problem(
                f"label file has {n} components per pixel, expected one", file=str(path), case=case,
                fix="labels must be single-channel images of class values",
            ))
        image = sitk.VectorIndexSelectionCast(image, component)
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ConversionProblem(Problem(
                "label file holds non-integer values", file=str(path), case=case,
                fix="labels must hold whole class values; re-export the label without interpolation",
            ))
        array = array.astype(np.int64)
    return array, image


def map_label_values(array: np.ndarray, encoding: LabelEncoding, labels: dict[str, int]) -> np.ndarray:
    """Original values -> consecutive label values (every value must be in ``encoding``)."""
    keys = np.array(sorted(encoding.values), dtype=np.int64)
    targets = np.array([labels[encoding.values[k]] for k in keys.tolist()])
    out_dtype = np.uint8 if max(labels.values()) < 256 else np.uint16
    return targets[np.searchsorted(keys, array.astype(np.int64))].astype(out_dtype)


def write_label(array: np.ndarray, like: sitk.Image, dest: Path) -> None:
    """Write a label array with the geometry of the source label image (atomically)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(like.GetSpacing())
    image.SetOrigin(like.GetOrigin())
    image.SetDirection(like.GetDirection())
    write_image(image, dest)


def grid_problems(label: dict, image: dict, label_path: Path, modality: str, case: str) -> list[Problem]:
    """Check that a label lies on its modality's grid: a size mismatch is an error, header drift a warning."""
    if label["size"] != image["size"]:
        return [Problem(
            f"label size {label['size']} differs from the {modality} image size {image['size']}",
            file=str(label_path), case=case,
            fix=f"the label must be drawn on the {modality} image's grid; check that it belongs to this case",
        )]
    drift = [
        key for key, tol in (("spacing", _SPACING_ORIGIN_TOL_MM), ("origin", _SPACING_ORIGIN_TOL_MM),
                             ("direction", _DIRECTION_TOL))
        if np.max(np.abs(np.subtract(label[key], image[key]))) > tol
    ]
    if not drift:
        return []
    return [Problem(
        f"label header differs from the {modality} image in {', '.join(drift)} (same size); kept as is",
        file=str(label_path), case=case, severity="warning",
        fix="check the label in a viewer; cmcseg assumes it lies on the image's grid",
    )]
