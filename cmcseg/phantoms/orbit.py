"""TAO-like phantom: orbit MRI, T1 and contrast-enhanced T1c, paired and registered on one grid.

The anatomy lives in world coordinates (mm, LPS: +x patient left, +y posterior, +z superior):
a head ellipse with brain behind the orbits and ethmoid air between them, and in each orbit a
bony cone from the apex to the rim filled with orbital fat, the eyeball (vitreous plus lens),
the optic nerve from the back of the globe to the apex, and the four rectus muscles as
spindles from the apex to their insertions on the globe. Thyroid-associated ophthalmopathy is
mimicked by a per-case muscle thickening and a per-case muscle enhancement in T1c.

Both sequences share one axial grid (thin in-plane, thicker slices); every other case the head
is tilted a little (non-identity direction, the same for both sequences).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from cmcseg.phantoms.contrast import mr_magnitude, tissue_table
from cmcseg.phantoms.geometry import (
    Grid,
    distance_to_segment,
    grid_centered_on,
    paint_in_box,
    render_many,
    rotation_matrix,
    sample_labels,
    squared_norm,
)
from cmcseg.phantoms.writing import (
    PhantomCase,
    PhantomInfo,
    case_rng,
    to_int16,
    truth_label_file,
    unlabeled_indices,
    write_phantom,
)
from cmcseg.registry import KNOWN_DATASETS

logger = logging.getLogger(__name__)

_REGISTRY = KNOWN_DATASETS["TAO"]
MODALITIES: tuple[str, ...] = _REGISTRY.modalities  # ("T1", "T1c")


class Tissue(IntEnum):
    AIR = 0
    SOFT = 1
    BONE = 2
    BRAIN = 3
    FAT = 4
    VITREOUS = 5
    LENS = 6
    NERVE = 7
    MUSCLE = 8


TISSUE_TO_LABEL = np.zeros(len(Tissue), dtype=np.uint8)
TISSUE_TO_LABEL[[Tissue.VITREOUS, Tissue.LENS]] = _REGISTRY.labels["eyeball"]
TISSUE_TO_LABEL[Tissue.NERVE] = _REGISTRY.labels["optic_nerve"]
TISSUE_TO_LABEL[Tissue.MUSCLE] = _REGISTRY.labels["extraocular_muscle"]
TISSUE_TO_LABEL[Tissue.FAT] = _REGISTRY.labels["orbital_fat"]

T1_SIGNAL = tissue_table(Tissue, air=0, soft=260, bone=40, brain=330, fat=620, vitreous=70, lens=300,
                         nerve=340, muscle=230)
#: T1c before the per-case muscle enhancement is applied
T1C_SIGNAL = tissue_table(Tissue, air=0, soft=320, bone=45, brain=350, fat=600, vitreous=75, lens=310,
                          nerve=360, muscle=230)
NOISE_SIGMA = 10.0
BIAS_STRENGTH = 0.1
#: the field of view (x, y, z) in mm: both orbits, from the face to behind the apex
FOV_MM = (112.0, 84.0, 40.0)


@dataclass(frozen=True)
class Orbit:
    """One orbit (side -1 right, +1 left) in world coordinates."""

    globe_center: tuple[float, float, float]
    globe_radius: float
    apex: tuple[float, float, float]
    rim_y: float  # the orbital rim plane (anterior end of the bony cone)
    cone_tan: float  # cone radius per mm from the apex
    nerve_radius: float
    muscle_radius: float  # belly radius, thickening included

    @property
    def cone_axis(self) -> np.ndarray:
        axis = np.asarray(self.globe_center) - np.asarray(self.apex)
        return axis / np.linalg.norm(axis)

    def muscle_segments(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(origin at the apex ring, insertion on the globe) of the superior, inferior, medial and lateral recti."""
        centre, apex, r = np.asarray(self.globe_center), np.asarray(self.apex), self.globe_radius
        side = np.sign(centre[0])
        segments = []
        for offset in ((0, 0, 1), (0, 0, -1), (-side, 0, 0), (side, 0, 0)):
            direction = np.asarray(offset, dtype=float)
            insertion = centre + direction * r * 0.95 + np.array([0.0, -0.3 * r, 0.0])
            segments.append((apex + direction * 3.0, insertion))
        return segments

    @property
    def rim_along(self) -> float:
        """Distance from the apex to the rim plane along the cone axis."""
        return (self.rim_y - self.apex[1]) / self.cone_axis[1]

    def bounding_box(self) -> tuple[np.ndarray, np.ndarray]:
        """An axis-aligned box holding the cone with its wall, the globe and the lens."""
        apex = np.asarray(self.apex)
        rim_centre = apex + self.rim_along * self.cone_axis
        rim_reach = self.cone_tan * self.rim_along + 6.0
        corners = np.stack([apex - 6.0, apex + 6.0, rim_centre - rim_reach, rim_centre + rim_reach,
                            np.asarray(self.globe_center) - self.globe_radius - 1.0,
                            np.asarray(self.globe_center) + self.globe_radius + 1.0])
        return corners.min(axis=0), corners.max(axis=0)

    def paint(self, points: np.ndarray, tissue: np.ndarray) -> None:
        apex = np.asarray(self.apex)
        rel = points - apex
        along = rel @ self.cone_axis
        radial = np.sqrt(squared_norm(rel - along[..., None] * self.cone_axis))
        rim_along = self.rim_along
        in_cone = (along >= 0) & (along <= rim_along) & (radial <= self.cone_tan * along + 2.0)
        wall = (along >= -3) & (along <= rim_along) & (radial <= self.cone_tan * along + 5.0) & ~in_cone
        tissue[wall] = Tissue.BONE
        tissue[in_cone] = Tissue.FAT
        for origin, insertion in self.muscle_segments():
            distance, t = distance_to_segment(points, origin, insertion)
            spindle = 0.8 + (self.muscle_radius - 0.8) * np.sin(np.pi * t) ** 0.8
            tissue[(distance <= spindle) & (along >= -1)] = Tissue.MUSCLE
        back = np.asarray(self.globe_center) + np.array([0.0, self.globe_radius * 0.9, 0.0])
        distance, _ = distance_to_segment(points, back, apex)
        tissue[distance <= self.nerve_radius] = Tissue.NERVE
        globe = squared_norm(points - np.asarray(self.globe_center)) <= self.globe_radius**2
        tissue[globe] = Tissue.VITREOUS
        lens_center = np.asarray(self.globe_center) - np.array([0.0, self.globe_radius - 2.2, 0.0])
        lens = squared_norm((points - lens_center) / (4.5, 1.8, 4.5)) <= 1
        tissue[lens] = Tissue.LENS

    def as_dict(self) -> dict[str, Any]:
        return {
            "globe_center_mm": list(self.globe_center), "globe_radius_mm": self.globe_radius,
            "apex_mm": list(self.apex), "rim_y_mm": self.rim_y, "cone_tan": self.cone_tan,
            "nerve_radius_mm": self.nerve_radius, "muscle_radius_mm": self.muscle_radius,
        }


@dataclass(frozen=True)
class OrbitAnatomy:
    """Head and both orbits. Call it on world points to get tissue codes."""

    head_center: tuple[float, float, float]
    orbits: tuple[Orbit, Orbit]
    muscle_thickening: float
    muscle_enhancement: float  # relative T1c signal gain of the muscles

    def __call__(self, points: np.ndarray) -> np.ndarray:
        tissue = np.full(points.shape[:-1], Tissue.AIR, dtype=np.uint8)
        d = points - np.asarray(self.head_center)
        head = (d[..., 0] / 72.0) ** 2 + ((d[..., 1] - 35.0) / 92.0) ** 2 + (d[..., 2] / 110.0) ** 2 <= 1
        tissue[head] = Tissue.SOFT
        tissue[head & (d[..., 1] > 12.0)] = Tissue.BRAIN
        sinus = (np.abs(d[..., 0]) < 11.0) & (d[..., 1] > -38.0) & (d[..., 1] < 2.0) & (np.abs(d[..., 2]) < 16.0)
        tissue[sinus] = Tissue.AIR
        for orbit in self.orbits:
            lower, upper = orbit.bounding_box()
            paint_in_box(points, tissue, lower, upper, orbit.paint)
        return tissue

    def as_dict(self) -> dict[str, Any]:
        return {
            "head_center_mm": list(self.head_center), "orbits": [o.as_dict() for o in self.orbits],
            "muscle_thickening": self.muscle_thickening, "muscle_enhancement": self.muscle_enhancement,
        }


def random_anatomy(rng: np.random.Generator) -> OrbitAnatomy:
    """Draw one patient: head position, globe size, orbit spacing, disease severity."""
    head = np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-3, 3)])
    spread = rng.uniform(0.95, 1.05)
    thickening = rng.uniform(1.0, 1.8)
    orbits = []
    for side in (-1.0, 1.0):
        globe = head + np.array([side * 32.0 * spread, -40.0 + rng.uniform(-1.5, 1.5), rng.uniform(-1, 1)])
        apex = head + np.array([side * 14.0 * spread, 5.0, rng.uniform(-1, 1)])
        orbits.append(Orbit(
            globe_center=tuple(globe), globe_radius=rng.uniform(11.5, 12.5), apex=tuple(apex),
            rim_y=float(head[1] - 36.0), cone_tan=rng.uniform(0.42, 0.5), nerve_radius=rng.uniform(2.0, 2.5),
            muscle_radius=rng.uniform(2.0, 2.6) * thickening,
        ))
    return OrbitAnatomy(tuple(head), (orbits[0], orbits[1]), thickening, rng.uniform(0.3, 0.9) * thickening)


# ---------------------------------------------------------------------- acquisition
@dataclass(frozen=True)
class OrbitSize:
    cases: int
    in_plane_mm: float
    thickness_mm: float


SIZE_PRESETS: dict[str, OrbitSize] = {
    "tiny": OrbitSize(4, 2.5, 5.0),
    "small": OrbitSize(10, 1.0, 2.5),
    "default": OrbitSize(40, 0.5, 2.0),
}


def acquisition_grid(anatomy: OrbitAnatomy, preset: OrbitSize, rng: np.random.Generator, tilted: bool) -> Grid:
    """The shared axial grid: FOV over both orbits, own shift, a small head tilt every other case."""
    spacing_xy = preset.in_plane_mm * rng.uniform(0.95, 1.05)
    size = (int(round(FOV_MM[0] / spacing_xy)), int(round(FOV_MM[1] / spacing_xy)),
            int(np.ceil(FOV_MM[2] / preset.thickness_mm)))
    direction = np.eye(3)
    if tilted:
        direction = rotation_matrix(rng.uniform(-6, 6, 3))
    center = np.asarray(anatomy.head_center) + (0.0, -18.0, 0.0) + rng.uniform(-3, 3, 3)
    return grid_centered_on(center, size, (spacing_xy, spacing_xy, preset.thickness_mm), direction,
                            preset.thickness_mm)


def generate_case(index: int, seed: int, size: str, labeled: bool) -> PhantomCase:
    """One paired case: T1 and T1c on the same grid, label on that grid."""
    case_id = f"orbit{index + 1:03d}"
    anatomy = random_anatomy(case_rng(seed, index, 0))
    tilted = index % 2 == 1
    grid = acquisition_grid(anatomy, SIZE_PRESETS[size], case_rng(seed, index, 1), tilted)
    t1c_signal = T1C_SIGNAL.copy()
    t1c_signal[Tissue.MUSCLE] *= 1.0 + anatomy.muscle_enhancement
    images = {}
    for channel, clean in enumerate(render_many(anatomy, grid, (T1_SIGNAL, t1c_signal))):
        images[channel] = grid.to_image(to_int16(
            mr_magnitude(clean, grid, case_rng(seed, index, 2, channel), NOISE_SIGMA, BIAS_STRENGTH, 150.0)))
    truth = TISSUE_TO_LABEL[sample_labels(anatomy, grid)]
    modalities = {
        modality: {"channel": channel, "geometry": grid.as_dict(), "motion": None,
                   "truth_label": truth_label_file(Path("."), case_id, channel).as_posix()}
        for channel, modality in enumerate(MODALITIES)
    }
    truth_entry = {"labeled": labeled, "rotated": tilted, "anatomy": anatomy.as_dict(), "modalities": modalities}
    return PhantomCase(
        case_id, images, grid.to_image(truth) if labeled else None,
        {channel: grid.to_image(truth) for channel in range(len(MODALITIES))}, truth_entry,
    )


def iter_cases(count: int, seed: int, size: str) -> Iterator[PhantomCase]:
    unlabeled = unlabeled_indices(count)
    for index in range(count):
        yield generate_case(index, seed, size, labeled=index not in unlabeled)


INFO = PhantomInfo(
    kind="TAO", channel_names=dict(enumerate(MODALITIES)), labels=dict(_REGISTRY.labels),
    reference_modality=_REGISTRY.reference,
    description="TAO-like phantom (cmcseg synth): orbit T1 and T1c, paired and registered on one grid; "
                "ground truth in phantom_truth/",
)


def write_tao(folder: Path | str, *, cases: int | None = None, seed: int = 0, size: str = "small",
              name: str = "TAO") -> Path:
    """Write a TAO-like paired T1/T1c orbit dataset."""
    count = SIZE_PRESETS[size].cases if cases is None else cases
    return write_phantom(folder, INFO, iter_cases(count, seed, size), count, name=name, seed=seed, size=size)

