"""Bringing every modality of a case into one reference space, in physical coordinates.

nnU-Net needs all channels of a case on one grid and silently accepts a shifted origin or a
rotated direction. cmcseg instead resamples each modality into the reference modality's
physical space with SimpleITK (honouring spacing, origin and direction), marks the voxels
that lie outside a modality's field of view, and moves a label together with the modality
whose grid it lies on.

Conventions: a ``transform`` maps points of the reference (fixed) space to the modality's
(moving) space, as in SimpleITK's ``Resample``. Arrays are numpy order (z, y, x).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from cmcseg.errors import CmcsegError

#: 2D images become single-slice 3D images with this slice spacing (nnU-Net uses 999 too),
#: so that one code path serves 2D and 3D datasets.
SPACING_2D_SLICE = 999.0

_GRID_TOL = 1e-3


def as_3d(image: sitk.Image) -> sitk.Image:
    """Return a 3D image: 2D images become one slice of thickness SPACING_2D_SLICE."""
    if image.GetDimension() == 3:
        return image
    if image.GetDimension() != 2:
        raise CmcsegError(unsupported_dimension_message(image.GetSize()))
    join = sitk.JoinSeriesImageFilter()
    join.SetSpacing(SPACING_2D_SLICE)
    join.SetOrigin(0.0)
    vol = join.Execute([image])
    d2 = np.asarray(image.GetDirection()).reshape(2, 2)
    d3 = np.eye(3)
    d3[:2, :2] = d2
    vol.SetDirection(tuple(d3.ravel()))
    return vol


def unsupported_dimension_message(size) -> str:
    """Why an image that is not 2D or 3D (e.g. a 4D NIfTI holding several channels or time points) is refused."""
    return (f"{len(size)}D image of size {tuple(int(s) for s in size)} (x, y, z, ...): cmcseg reads one 2D or 3D "
            "volume per channel file. Fix: split it into one 3D file per channel or time point, named "
            "CASE_0000.nii.gz, CASE_0001.nii.gz, ... as nnU-Net expects, and declare each in dataset.json "
            "channel_names.")


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    is_label: bool = False,
    transform: sitk.Transform | None = None,
    default_value: float = 0.0,
    label_interpolation: str = "nearest",
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (size, spacing, origin, direction).

    Images use linear interpolation and come back as float32; labels use nearest neighbour
    (``label_interpolation="nearest"``) or SimpleITK's per-label linear interpolation
    (``"one_hot"``, smoother boundaries) and keep their integer type.
    """
    if is_label:
        interp = sitk.sitkNearestNeighbor if label_interpolation == "nearest" else sitk.sitkLabelLinear
        out_type = image.GetPixelID()
    else:
        interp = sitk.sitkLinear
        out_type = sitk.sitkVectorFloat32 if image.GetNumberOfComponentsPerPixel() > 1 else sitk.sitkFloat32
    tx = transform if transform is not None else sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(image, reference, tx, interp, default_value, out_type)


def field_of_view_mask(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """uint8 mask on ``reference``'s grid: 1 where the voxel centre lies inside ``image``'s field of view."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return resample_to_reference(ones, reference, is_label=True, transform=transform, default_value=0)


@dataclass(frozen=True)
class GridGeometry:
    """Size, spacing, origin and direction of an image grid, without pixels.

    Has the getters of ``sitk.Image`` that geometry code uses, so headers (read with
    ``sitk.ImageFileReader.ReadImageInformation``) and images are interchangeable here.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image) -> GridGeometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def as_3d(self) -> GridGeometry:
        if len(self.size) == 3:
            return self
        if len(self.size) != 2:
            raise CmcsegError(unsupported_dimension_message(self.size))
        d3 = np.eye(3)
        d3[:2, :2] = np.asarray(self.direction).reshape(2, 2)
        return GridGeometry((*self.size, 1), (*self.spacing, SPACING_2D_SLICE), (*self.origin, 0.0), tuple(d3.ravel()))

    def GetSize(self): return self.size  # noqa: E704,N802 - sitk.Image's names
    def GetSpacing(self): return self.spacing  # noqa: E704,N802
    def GetOrigin(self): return self.origin  # noqa: E704,N802
    def GetDirection(self): return self.direction  # noqa: E704,N802
    def GetDimension(self): return len(self.size)  # noqa: E704,N802


#: an image or its header alone: what the geometry functions below read (sizes, spacing, origin, direction)
Geometry = sitk.Image | GridGeometry


def same_grid(a: Geometry, b: Geometry, tol: float = _GRID_TOL) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol * max(1.0, max(a.GetSpacing())))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def _grid_points(image: Geometry, n: int = 12) -> np.ndarray:
    """n^d physical points at the centres of an n^d partition of the image's extent."""
    size = np.asarray(image.GetSize(), dtype=float)
    axes = [(np.arange(n) + 0.5) / n * s - 0.5 for s in size]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, image.GetDimension())
    return _index_to_physical(image, idx)


def _index_to_physical(image: Geometry, idx: np.ndarray) -> np.ndarray:
    d = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(d, d)
    return np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ direction.T


def _physical_to_index(image: Geometry, pts: np.ndarray) -> np.ndarray:
    d = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(d, d)
    return ((pts - np.asarray(image.GetOrigin())) @ direction) / np.asarray(image.GetSpacing())


def _fraction_inside(points: np.ndarray, image: Geometry) -> float:
    idx = _physical_to_index(image, points)
    size = np.asarray(image.GetSize())
    inside = np.all((idx >= -0.5 - 1e-6) & (idx <= size - 0.5 + 1e-6), axis=1)
    return float(inside.mean())


def physical_centre(image: Geometry) -> np.ndarray:
    """The physical position of the centre of the image's extent."""
    centre_idx = (np.asarray(image.GetSize(), dtype=float) - 1) / 2
    return _index_to_physical(image, centre_idx[None])[0]


@dataclass(frozen=True)
class ModalityRelation:
    """How a modality's grid relates to the reference modality's grid.

    ``kind`` is ``same_grid``, ``same_space`` (another grid over the same physical extent),
    ``misaligned`` (extents differ: see ``overlap_fraction``, the share of the reference's
    extent the modality covers, and ``centre_offset_mm``) or ``unpaired``.
    """

    kind: str
    overlap_fraction: float = 1.0
    centre_offset_mm: float = 0.0

    def as_dict(self) -> dict:
        return {"kind": self.kind, "overlap_fraction": round(self.overlap_fraction, 4),
                "centre_offset_mm": round(self.centre_offset_mm, 3)}


def modality_relation(image: Geometry, reference: Geometry) -> ModalityRelation:
    """Classify how ``image`` sits relative to ``reference`` (headers only, no pixels are read)."""
    if same_grid(image, reference):
        return ModalityRelation("same_grid")
    ref_pts, img_pts = _grid_points(reference), _grid_points(image)
    covers_ref = _fraction_inside(ref_pts, image)
    covered_by_ref = _fraction_inside(img_pts, reference)
    offset = float(np.linalg.norm(physical_centre(image) - physical_centre(reference)))
    tolerance = 0.5 * max(reference.GetSpacing())
    kind = "same_space" if (offset <= tolerance and covers_ref >= 0.95 and covered_by_ref >= 0.95) else "misaligned"
    return ModalityRelation(kind, covers_ref, offset)


def extents_disjoint(image: Geometry, reference: Geometry) -> bool:
    """True when the two physical extents do not overlap at all (headers only): no sample point of either
    extent lies inside the other. Resampling ``image`` into ``reference`` then leaves an empty field of view,
    which almost always means a wrong origin, spacing or direction in a header."""
    if same_grid(image, reference):
        return False
    return (_fraction_inside(_grid_points(reference), image) == 0.0
            and _fraction_inside(_grid_points(image), reference) == 0.0)


def image_to_array(image: sitk.Image) -> np.ndarray:
    """(C, z, y, x) float32 array: vector pixels (RGB) become channels.

    Exactly one copy of the pixels is made (read through a view of SimpleITK's buffer), so a
    CT-sized int16 image does not pass through an extra int16 copy on its way to float32.
    """
    view = sitk.GetArrayViewFromImage(image)
    view = np.moveaxis(view, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else view[None]
    return np.array(view, dtype=np.float32, order="C")


def _copy_pixels(image: sitk.Image, out: np.ndarray) -> None:
    """Write an image's pixels into ``out`` (C, z, y, x), converting on the fly (no intermediate copy)."""
    view = sitk.GetArrayViewFromImage(image)
    out[...] = np.moveaxis(view, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else view[None]


@dataclass
class AlignedCase:
    """A case in its reference space: data (C, z, y, x), field-of-view mask (M, z, y, x), seg (z, y, x)."""

    data: np.ndarray
    fov: np.ndarray
    seg: np.ndarray | None
    reference: sitk.Image
    channels_per_modality: dict[int, int]
    relations: dict[int, ModalityRelation] = field(default_factory=dict)


def align_case(
    images: Mapping[int, sitk.Image],
    reference_channel: int,
    label: sitk.Image | None = None,
    label_channel: int | None = None,
    transforms: Mapping[int, sitk.Transform] | None = None,
    label_interpolation: str = "nearest",
) -> AlignedCase:
    """Resample every modality (and the label, with the modality it lies on) into the reference space.

    ``transforms[k]`` (optional, e.g. from rigid registration) maps reference points into
    modality k's space. Voxels outside modality k's field of view are 0 in ``data`` and 0 in
    ``fov[k]``: the mask, not the value, tells them apart from real data.
    """
    transforms = dict(transforms or {})
    reference = as_3d(images[reference_channel])
    channels = sorted(images)
    comps = {ch: images[ch].GetNumberOfComponentsPerPixel() for ch in channels}
    spatial = tuple(reference.GetSize()[::-1])
    # Filled in place, channel by channel: no list of arrays to concatenate (a second copy of the case).
    data = np.empty((sum(comps.values()), *spatial), dtype=np.float32)
    fov = np.ones((len(channels), *spatial), dtype=np.uint8)
    relations, start = {}, 0
    for k, ch in enumerate(channels):
        img = as_3d(images[ch])
        relations[ch] = modality_relation(img, reference)
        tx = transforms.get(ch)
        out = data[start:start + comps[ch]]
        start += comps[ch]
        if ch == reference_channel or (relations[ch].kind == "same_grid" and tx is None):
            _copy_pixels(img, out)
        else:
            _copy_pixels(resample_to_reference(img, reference, transform=tx), out)
            mask = field_of_view_mask(img, reference, tx)  # keep the image alive while its view is read
            fov[k] = sitk.GetArrayViewFromImage(mask)
            del mask
            out *= fov[k][None]
    seg = None
    if label is not None:
        label = as_3d(label)
        owner = reference_channel if label_channel is None else label_channel
        tx = transforms.get(owner) if owner != reference_channel else None
        if tx is None and same_grid(label, reference):
            seg_img = label
        else:
            seg_img = resample_to_reference(label, reference, is_label=True, transform=tx,
                                            label_interpolation=label_interpolation)
        seg = sitk.GetArrayFromImage(seg_img)
    return AlignedCase(data, fov, seg, reference, comps, relations)
