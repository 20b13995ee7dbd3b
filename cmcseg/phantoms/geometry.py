"""Geometry shared by the phantoms: image grids, world coordinates, rigid motions, analytic shapes.

Every phantom defines its anatomy in world coordinates (mm, SimpleITK/LPS convention) and
samples it on grids that each have their own size, spacing, origin and direction. Because the
anatomy lives in the world and not in any grid, the headers of the written images tell the
truth: resampling by the headers aligns the modalities exactly (unless a rigid "motion" was
applied on purpose, which the headers do not show).

Array conventions: numpy arrays are in SimpleITK's (z, y, x) index order; vectors and points
are in (x, y, z) world order. Point arrays have shape ``(..., 3)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike

#: An anatomy: world points ``(..., 3)`` -> integer tissue codes ``(...)``.
Anatomy = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------- rotations and rigid motion
def rotation_matrix(angles_deg: ArrayLike) -> np.ndarray:
    """Rotation about x, then y, then z (angles in degrees): ``Rz @ Ry @ Rx``."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class RigidMotion:
    """A rigid displacement of the anatomy in world space: ``x -> R (x - c) + c + t``.

    ``rotation_deg`` are angles about x, y, z (see :func:`rotation_matrix`); ``center_mm`` is the
    centre of rotation, and ``None`` means "the phantom's own anatomy centre" (the heart centre
    for MSCMR), resolved with :meth:`resolved`. The motion moves the anatomy, not the grid: an
    image generated with it has a header that no longer agrees with the anatomy, which is what a
    registration step has to recover.
    """

    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    center_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:  # accept any 3-sequences (lists, arrays), store float tuples
        object.__setattr__(self, "translation_mm", _triple(self.translation_mm))
        object.__setattr__(self, "rotation_deg", _triple(self.rotation_deg))
        if self.center_mm is not None:
            object.__setattr__(self, "center_mm", _triple(self.center_mm))

    @property
    def is_identity(self) -> bool:
        return not np.any(self.translation_mm) and not np.any(self.rotation_deg)

    def resolved(self, default_center: ArrayLike) -> RigidMotion:
        """The same motion with an explicit centre of rotation."""
        center = self.center_mm if self.center_mm is not None else _triple(default_center)
        return RigidMotion(self.translation_mm, self.rotation_deg, center)

    def matrix(self) -> np.ndarray:
        return rotation_matrix(self.rotation_deg)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Where the anatomy at ``points`` ends up after the motion."""
        c = np.asarray(self.center_mm if self.center_mm is not None else (0.0, 0.0, 0.0))
        return (points - c) @ self.matrix().T + c + np.asarray(self.translation_mm)

    def apply_inverse(self, points: np.ndarray) -> np.ndarray:
        """Where the anatomy seen at ``points`` came from (used to sample a moved anatomy)."""
        c = np.asarray(self.center_mm if self.center_mm is not None else (0.0, 0.0, 0.0))
        return (points - c - np.asarray(self.translation_mm)) @ self.matrix() + c

    def as_dict(self) -> dict:
        return {
            "translation_mm": list(self.translation_mm),
            "rotation_deg": list(self.rotation_deg),
            "center_mm": None if self.center_mm is None else list(self.center_mm),
        }

    @classmethod
    def coerce(cls, value: RigidMotion | ArrayLike | dict | None) -> RigidMotion | None:
        """Accept a RigidMotion, a translation ``(dx, dy, dz)`` or a dict of the constructor's fields."""
        if value is None or isinstance(value, RigidMotion):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(translation_mm=_triple(value))


def moved(anatomy: Anatomy, motion: RigidMotion | None) -> Anatomy:
    """The anatomy displaced by ``motion`` (identity when ``motion`` is None)."""
    if motion is None or motion.is_identity:
        return anatomy
    return lambda points: anatomy(motion.apply_inverse(points))


def _triple(values: ArrayLike) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in np.asarray(values, dtype=float).reshape(3))
    return (x, y, z)


# ---------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Grid:
    """An image grid: size and spacing in (x, y, z), origin in mm, direction as a 3x3 matrix.

    ``slice_thickness`` is the extent of the acquisition along the slice normal (the third
    direction column); it may exceed the in-plane spacing many times (anisotropic MRI).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    slice_thickness: float | None = None

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape of an array on this grid (reversed size)."""
        return tuple(reversed(self.size))

    @property
    def thickness(self) -> float:
        return float(self.slice_thickness if self.slice_thickness is not None else self.spacing[-1])

    @property
    def normal(self) -> np.ndarray:
        """Unit vector along the slice axis in world coordinates."""
        return np.asarray(self.direction)[:, -1]

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices ``(..., 3)`` -> world points, as SimpleITK computes them."""
        scaled = np.asarray(index, dtype=float) * np.asarray(self.spacing)
        return scaled @ np.asarray(self.direction).T + np.asarray(self.origin)

    def world_points(self) -> np.ndarray:
        """World coordinates of every voxel centre, shape ``(*self.shape, ndim)``.

        Built as a broadcast sum of one row of points per axis (origin + i * spacing * direction
        column), which is exact and much faster than a matrix product over every voxel.
        """
        direction = np.asarray(self.direction, dtype=float)
        points = np.asarray(self.origin, dtype=float).copy()
        ndim = self.ndim
        for axis in range(ndim):  # axis 0 = x, the last numpy axis
            steps = np.arange(self.size[axis], dtype=float)[:, None] * (self.spacing[axis] * direction[:, axis])
            shape = [1] * ndim + [ndim]
            shape[ndim - 1 - axis] = self.size[axis]
            points = points + steps.reshape(shape)
        return points

    def center(self) -> np.ndarray:
        """World position of the grid's centre."""
        return self.index_to_world((np.asarray(self.size, dtype=float) - 1) / 2)

    def to_image(self, array: np.ndarray) -> sitk.Image:
        """An image with this grid's geometry holding ``array`` (numpy order)."""
        if array.shape != self.shape:
            raise ValueError(f"array shape {array.shape} does not match grid shape {self.shape}")
        img = sitk.GetImageFromArray(array)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in np.asarray(self.direction).ravel()])
        return img

    def as_dict(self) -> dict:
        """JSON-ready geometry, in SimpleITK's conventions (direction row-major)."""
        return {
            "size": [int(s) for s in self.size],
            "spacing": [float(s) for s in self.spacing],
            "origin": [float(o) for o in self.origin],
            "direction": [float(d) for d in np.asarray(self.direction).ravel()],
            "slice_thickness_mm": self.thickness,
        }


def grid_centered_on(
    center: ArrayLike,
    size: Sequence[int],
    spacing: ArrayLike,
    direction: np.ndarray | None = None,
    slice_thickness: float | None = None,
) -> Grid:
    """A grid whose centre lies at the world point ``center``; the origin follows from the direction."""
    direction = np.eye(len(size)) if direction is None else np.asarray(direction, dtype=float)
    half_extent = (np.asarray(size, dtype=float) - 1) / 2 * np.asarray(spacing, dtype=float)
    origin = np.asarray(center, dtype=float) - direction @ half_extent
    return Grid(
        tuple(int(s) for s in size), tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1)),
        tuple(float(o) for o in origin),
        direction, slice_thickness,
    )


def slices_to_cover(extent_mm: float, thickness_mm: float) -> int:
    """How many contiguous slices of ``thickness_mm`` cover ``extent_mm``."""
    return max(1, int(np.ceil(extent_mm / thickness_mm)))


# ---------------------------------------------------------------------- sampling
def slab_offsets(thickness: float, in_plane_spacing: float) -> np.ndarray:
    """Offsets (mm) along the slice normal at which a thick slice is sub-sampled.

    One sample per ~in-plane voxel of thickness (at most 8), centred on the slice: averaging
    them gives the partial-volume blur of a thick MR slice.
    """
    count = int(np.clip(np.ceil(thickness / max(in_plane_spacing, 1e-6)), 1, 8))
    return thickness * ((np.arange(count) + 0.5) / count - 0.5)


def evaluate(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """``anatomy(points)`` one slice (first array axis) at a time.

    Each slice covers a thin slab of the world, so organs that miss it are skipped cheaply
    (see :func:`box_overlaps`), and memory stays small.
    """
    if points.ndim <= 3:  # a 2D grid (or a single slice): nothing to split
        return anatomy(points)
    return np.stack([anatomy(points[k]) for k in range(points.shape[0])])


def sample_labels(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Tissue codes at the voxel centres (nearest evaluation, no partial volume): the exact label map."""
    return evaluate(anatomy, grid.world_points())


def render(anatomy: Anatomy, grid: Grid, tissue_values: np.ndarray) -> np.ndarray:
    """Mean tissue intensity over each voxel's slab (thick-slice partial volume), float32.

    ``tissue_values[code]`` is the intensity of tissue ``code``.
    """
    return render_many(anatomy, grid, [tissue_values])[0]


def render_many(anatomy: Anatomy, grid: Grid, tables: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Like :func:`render` for several contrasts of one anatomy, evaluating the anatomy only once per sub-sample."""
    centres = grid.world_points()
    offsets = slab_offsets(grid.thickness, min(grid.spacing[:-1])) if grid.ndim == 3 else np.zeros(1)
    totals = [np.zeros(grid.shape, dtype=np.float64) for _ in tables]
    for offset in offsets:
        tissue = evaluate(anatomy, centres + offset * grid.normal)
        for total, table in zip(totals, tables):
            total += table[tissue]
    return [(total / len(offsets)).astype(np.float32) for total in totals]


def paint_in_box(points: np.ndarray, tissue: np.ndarray, lower: ArrayLike, upper: ArrayLike,
                 paint: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """Run ``paint(points, tissue)`` on the points inside an axis-aligned box only, writing back in place.

    A small organ covers a small part of the field of view; skipping the rest keeps the
    phantoms fast at realistic sizes.
    """
    if not box_overlaps(point_bounds(points), lower, upper):
        return
    inside = in_box(points, lower, upper)
    if not inside.any():
        return
    sub_tissue = tissue[inside]
    paint(points[inside], sub_tissue)
    tissue[inside] = sub_tissue


# ---------------------------------------------------------------------- analytic shapes
Bounds = tuple[np.ndarray, np.ndarray]


def point_bounds(points: np.ndarray) -> Bounds:
    """(min, max) corner of the bounding box of ``points``; compute once, test many shapes against it."""
    if points.size == 0:
        return np.full(points.shape[-1], np.inf), np.full(points.shape[-1], -np.inf)
    axes = range(points.shape[-1])  # one 1D reduction per axis: much faster than reducing (N, 3) arrays
    return np.array([points[..., k].min() for k in axes]), np.array([points[..., k].max() for k in axes])


def in_box(points: np.ndarray, lower: ArrayLike, upper: ArrayLike) -> np.ndarray:
    """Boolean mask of points inside the axis-aligned box [lower, upper] (per-axis tests: fast in numpy)."""
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    mask = (points[..., 0] >= lower[0]) & (points[..., 0] <= upper[0])
    for axis in range(1, points.shape[-1]):
        mask &= (points[..., axis] >= lower[axis]) & (points[..., axis] <= upper[axis])
    return mask


def box_overlaps(bounds: Bounds, lower: ArrayLike, upper: ArrayLike) -> bool:
    """Whether the box ``bounds`` meets the box [lower, upper] (a cheap rejection test)."""
    low, high = bounds
    return bool(np.all(high >= np.asarray(lower)) and np.all(low <= np.asarray(upper)))


def inside_ellipsoid(points: np.ndarray, center: ArrayLike, semi_axes: ArrayLike,
                     rotation: np.ndarray | None = None, bounds: Bounds | None = None) -> np.ndarray:
    """Boolean mask of points inside an ellipsoid whose axes are the columns of ``rotation``.

    Only points in the bounding cube are tested exactly (most points are far away); pass the
    ``bounds`` of ``points`` to skip an ellipsoid that misses them altogether.
    """
    center = np.asarray(center, dtype=float)
    reach = float(np.max(semi_axes))
    inside = np.zeros(points.shape[:-1], dtype=bool)
    if bounds is not None and not box_overlaps(bounds, center - reach, center + reach):
        return inside
    candidate = in_box(points, center - reach, center + reach)
    local = points[candidate] - center
    if rotation is not None:
        local = local @ np.asarray(rotation)
    inside[candidate] = squared_norm(local / np.asarray(semi_axes, dtype=float)) <= 1.0
    return inside


def distance_to_segment(points: np.ndarray, start: ArrayLike,
                        end: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each point to the segment start-end, and the position ``t`` in [0, 1] of the closest point."""
    a = np.asarray(start, dtype=float)
    ab = np.asarray(end, dtype=float) - a
    t = np.clip(((points - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.sqrt(squared_norm(points - closest)), t


def squared_norm(vectors: np.ndarray) -> np.ndarray:
    """Squared length of each vector ``(..., d)``, summing components explicitly (fast for small d)."""
    total = vectors[..., 0] ** 2
    for k in range(1, vectors.shape[-1]):
        total += vectors[..., k] ** 2
    return total
