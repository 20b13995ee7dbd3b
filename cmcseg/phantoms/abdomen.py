"""AMOS-like phantom: abdominal CT and MRI of *different* synthetic patients (unpaired modalities).

Every case is its own patient with independent random anatomy in world coordinates (mm, LPS:
+x patient left, +y posterior, +z superior): a body ellipse with subcutaneous fat and an
abdominal-wall muscle ring, visceral fat with bowel loops (some holding gas), spine, and the
labeled organs liver, spleen, right and left kidney and aorta (plus an unlabeled IVC).

CT cases are in Hounsfield units (air -1000, fat -100, soft tissue ~40, enhanced organs, a
contrast-filled aorta, bone) and are named ``amos_0001...`` (ids < 500) with channel 0 only; MRI
cases are T1-like arbitrary units under a strong multiplicative bias field, named
``amos_0500...`` with channel 1 only, as in AMOS22. Labels are consecutive; their AMOS22 values
are in ``original_label_values``. Every third case of each modality is unlabeled.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from cmcseg.phantoms.contrast import ct_hounsfield, mr_magnitude, tissue_table
from cmcseg.phantoms.geometry import (
    Bounds,
    Grid,
    grid_centered_on,
    inside_ellipsoid,
    point_bounds,
    render,
    rotation_matrix,
    sample_labels,
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

_REGISTRY = KNOWN_DATASETS["AMOS"]
MODALITIES: tuple[str, ...] = _REGISTRY.modalities  # ("CT", "MRI")
#: the phantom's own consecutive labels; their AMOS22 values come from the registry
ORGANS: tuple[str, ...] = ("spleen", "right_kidney", "left_kidney", "liver", "aorta")
LABELS: dict[str, int] = {"background": 0, **{organ: i + 1 for i, organ in enumerate(ORGANS)}}
ORIGINAL_LABEL_VALUES: dict[str, int] = {"background": 0, **{o: _REGISTRY.labels[o] for o in ORGANS}}
#: AMOS22 numbering: CT ids below 500, MRI ids from 500
FIRST_MRI_ID = 500


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    BOWEL = 3
    GAS = 4
    BONE = 5
    IVC = 6
    SPLEEN = 7
    RIGHT_KIDNEY = 8
    LEFT_KIDNEY = 9
    LIVER = 10
    AORTA = 11


TISSUE_TO_LABEL = np.zeros(len(Tissue), dtype=np.uint8)
for _organ in ORGANS:
    TISSUE_TO_LABEL[Tissue[_organ.upper()]] = LABELS[_organ]

#: portal-venous CT in HU
CT_HU = tissue_table(Tissue, air=-1000, fat=-100, muscle=50, bowel=35, gas=-950, bone=650, ivc=150,
                     spleen=115, right_kidney=170, left_kidney=170, liver=95, aorta=230)
CT_NOISE_HU = 15.0
#: T1-weighted MRI, arbitrary units (fat bright, flowing blood dark)
MRI_SIGNAL = tissue_table(Tissue, air=0, fat=650, muscle=180, bowel=220, gas=0, bone=300, ivc=110,
                          spleen=300, right_kidney=280, left_kidney=280, liver=420, aorta=80)
MRI_NOISE_SIGMA = 12.0
MRI_BIAS_STRENGTH = 0.35


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle_deg: float = 0.0  # rotation about z

    def contains(self, points: np.ndarray, bounds: Bounds | None = None) -> np.ndarray:
        return inside_ellipsoid(points, self.center, self.semi_axes, rotation_matrix((0, 0, self.angle_deg)), bounds)

    def as_dict(self) -> dict[str, Any]:
        return {"center_mm": list(self.center), "semi_axes_mm": list(self.semi_axes), "angle_deg": self.angle_deg}


@dataclass(frozen=True)
class AbdomenAnatomy:
    """One synthetic patient's abdomen in world coordinates (mm). Call it on points to get tissue codes."""

    body_center: tuple[float, float, float]
    body_semi_axes: tuple[float, float]
    fat_mm: float
    wall_mm: float
    spine_radius: float
    aorta_xy: tuple[float, float]
    aorta_radius: float
    ivc_xy: tuple[float, float]
    organs: Mapping[str, Ellipsoid]  # liver, spleen, right_kidney, left_kidney
    bowel: tuple[Ellipsoid, ...]
    gas: tuple[Ellipsoid, ...]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        tissue = np.full(points.shape[:-1], Tissue.AIR, dtype=np.uint8)
        bounds = point_bounds(points)
        dx = points[..., 0] - self.body_center[0]
        dy = points[..., 1] - self.body_center[1]
        ax, ay = self.body_semi_axes
        tissue[(dx / ax) ** 2 + (dy / ay) ** 2 <= 1] = Tissue.FAT
        wall_outer = (dx / (ax - self.fat_mm)) ** 2 + (dy / (ay - self.fat_mm)) ** 2 <= 1
        inside = wall_outer & ((dx / (ax - self.fat_mm - self.wall_mm)) ** 2
                               + (dy / (ay - self.fat_mm - self.wall_mm)) ** 2 <= 1)
        tissue[wall_outer & ~inside] = Tissue.MUSCLE
        tissue[inside] = Tissue.FAT  # visceral fat around everything else
        for loop in self.bowel:
            tissue[inside & loop.contains(points, bounds)] = Tissue.BOWEL
        for bubble in self.gas:
            tissue[inside & bubble.contains(points, bounds)] = Tissue.GAS
        spine_y = 0.55 * ay
        for side in (-1.0, 1.0):  # paraspinal muscles
            tissue[((dx - side * 35) / 22) ** 2 + ((dy - spine_y - 10) / 25) ** 2 <= 1] = Tissue.MUSCLE
        tissue[dx**2 + (dy - spine_y) ** 2 <= self.spine_radius**2] = Tissue.BONE
        for organ in ("liver", "spleen", "right_kidney", "left_kidney"):
            tissue[inside & self.organs[organ].contains(points, bounds)] = Tissue[organ.upper()]
        tissue[self._tube(dx, dy, self.ivc_xy, (12.0, 9.0))] = Tissue.IVC
        tissue[self._tube(dx, dy, self.aorta_xy, (self.aorta_radius, self.aorta_radius))] = Tissue.AORTA
        return tissue

    @staticmethod
    def _tube(dx: np.ndarray, dy: np.ndarray, xy: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
        return ((dx - xy[0]) / radii[0]) ** 2 + ((dy - xy[1]) / radii[1]) ** 2 <= 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "body_center_mm": list(self.body_center), "body_semi_axes_mm": list(self.body_semi_axes),
            "fat_mm": self.fat_mm, "wall_mm": self.wall_mm, "spine_radius_mm": self.spine_radius,
            "aorta_xy_mm": list(self.aorta_xy), "aorta_radius_mm": self.aorta_radius,
            "ivc_xy_mm": list(self.ivc_xy), "organs": {k: e.as_dict() for k, e in self.organs.items()},
            "bowel_loops": len(self.bowel), "gas_pockets": len(self.gas),
        }


def random_anatomy(rng: np.random.Generator) -> AbdomenAnatomy:
    """Draw one patient: organ sizes and positions vary; relative to the body centre (x, y) and z."""
    cx, cy, cz = rng.uniform(-15, 15), rng.uniform(-10, 10), rng.uniform(-20, 20)
    ax, ay = rng.uniform(140, 170), rng.uniform(100, 125)
    fat, wall = rng.uniform(10, 30), rng.uniform(8, 12)

    def at(x: float, y: float, z: float) -> tuple[float, float, float]:
        return (cx + x, cy + y, cz + z)

    kidney_z = rng.uniform(-30, -10)
    organs = {
        "liver": Ellipsoid(at(-0.42 * ax + rng.uniform(-8, 8), -0.05 * ay, 45 + rng.uniform(-10, 10)),
                           (0.42 * ax * rng.uniform(0.9, 1.1), 0.55 * ay * rng.uniform(0.9, 1.1), rng.uniform(65, 85)),
                           rng.uniform(-15, 15)),
        "spleen": Ellipsoid(at(0.55 * ax + rng.uniform(-6, 6), 0.3 * ay, 45 + rng.uniform(-10, 10)),
                            (rng.uniform(20, 28), rng.uniform(40, 55), rng.uniform(45, 60)), rng.uniform(20, 40)),
        "right_kidney": Ellipsoid(at(-0.4 * ax, 0.42 * ay, kidney_z - rng.uniform(5, 20)),
                                  (rng.uniform(24, 30), rng.uniform(22, 27), rng.uniform(48, 60)), rng.uniform(15, 30)),
        "left_kidney": Ellipsoid(at(0.4 * ax, 0.42 * ay, kidney_z),
                                 (rng.uniform(24, 30), rng.uniform(22, 27), rng.uniform(48, 60)), -rng.uniform(15, 30)),
    }
    bowel = tuple(
        Ellipsoid(at(rng.uniform(-0.5, 0.5) * ax, rng.uniform(-0.6, 0.1) * ay, rng.uniform(-90, 20)),
                  tuple(rng.uniform(15, 35, 3)), rng.uniform(0, 180))
        for _ in range(int(rng.integers(6, 11)))
    )
    gas = tuple(
        Ellipsoid(loop.center, tuple(np.asarray(loop.semi_axes) * rng.uniform(0.3, 0.6)), loop.angle_deg)
        for loop in bowel if rng.random() < 0.4
    )
    return AbdomenAnatomy(
        body_center=(cx, cy, cz), body_semi_axes=(ax, ay), fat_mm=fat, wall_mm=wall,
        spine_radius=rng.uniform(16, 20), aorta_xy=(rng.uniform(10, 22), 0.55 * ay - rng.uniform(28, 36)),
        aorta_radius=rng.uniform(9, 13), ivc_xy=(-rng.uniform(18, 28), 0.55 * ay - rng.uniform(30, 40)),
        organs=organs, bowel=bowel, gas=gas,
    )


# ---------------------------------------------------------------------- acquisition
@dataclass(frozen=True)
class Protocol:
    in_plane_mm: float
    fov_mm: float
    thickness_mm: tuple[float, float]
    coverage_mm: float = 240.0  # along z, centred on the upper abdomen


@dataclass(frozen=True)
class AbdomenSize:
    cases: int
    protocols: Mapping[str, Protocol]


SIZE_PRESETS: dict[str, AbdomenSize] = {
    "tiny": AbdomenSize(6, {"CT": Protocol(8.0, 320.0, (16.0, 16.0)), "MRI": Protocol(9.0, 324.0, (18.0, 20.0))}),
    "small": AbdomenSize(12, {"CT": Protocol(3.6, 345.0, (8.0, 8.0)), "MRI": Protocol(4.2, 355.0, (9.0, 10.0))}),
    "default": AbdomenSize(60, {"CT": Protocol(1.4, 358.0, (3.0, 5.0)), "MRI": Protocol(1.6, 360.0, (5.0, 7.0))}),
}


def acquisition_grid(anatomy: AbdomenAnatomy, protocol: Protocol, rng: np.random.Generator) -> Grid:
    """An axial grid around the upper abdomen with per-patient spacing, thickness and table position."""
    spacing_xy = protocol.in_plane_mm * rng.uniform(0.95, 1.05)
    size_xy = int(round(protocol.fov_mm / spacing_xy))
    thickness = float(np.round(rng.uniform(*protocol.thickness_mm) * 2) / 2)
    size_z = int(np.ceil(protocol.coverage_mm / thickness))
    center = np.asarray(anatomy.body_center) + (rng.uniform(-10, 10), rng.uniform(-10, 10), 10 + rng.uniform(-10, 10))
    return grid_centered_on(center, (size_xy, size_xy, size_z), (spacing_xy, spacing_xy, thickness),
                            slice_thickness=thickness)


def generate_case(case_id: str, modality: str, stream: int, seed: int, size: str, labeled: bool) -> PhantomCase:
    """One unpaired case: a new patient imaged with ``modality`` only."""
    anatomy = random_anatomy(case_rng(seed, stream, 0))
    grid = acquisition_grid(anatomy, SIZE_PRESETS[size].protocols[modality], case_rng(seed, stream, 1))
    noise_rng = case_rng(seed, stream, 2)
    channel = MODALITIES.index(modality)
    if modality == "CT":
        pixels = ct_hounsfield(render(anatomy, grid, CT_HU), noise_rng, CT_NOISE_HU)
    else:
        pixels = mr_magnitude(render(anatomy, grid, MRI_SIGNAL), grid, noise_rng, MRI_NOISE_SIGMA, MRI_BIAS_STRENGTH)
    truth = TISSUE_TO_LABEL[sample_labels(anatomy, grid)]
    truth_entry = {
        "labeled": labeled, "anatomy": anatomy.as_dict(),
        "modalities": {modality: {
            "channel": channel, "geometry": grid.as_dict(), "motion": None,
            "truth_label": truth_label_file(Path("."), case_id, channel).as_posix(),
        }},
    }
    return PhantomCase(
        case_id, {channel: grid.to_image(to_int16(pixels))}, grid.to_image(truth) if labeled else None,
        {channel: grid.to_image(truth)}, truth_entry,
    )


def split_counts(count: int) -> tuple[int, int]:
    """(CT cases, MRI cases): a third MRI, at least one of each from two cases on."""
    n_mri = 0 if count < 2 else max(1, int(round(count / 3)))
    return count - n_mri, n_mri


def iter_cases(count: int, seed: int, size: str) -> Iterator[PhantomCase]:
    n_ct, n_mri = split_counts(count)
    for modality, n, first_id, stream0 in (("CT", n_ct, 1, 0), ("MRI", n_mri, FIRST_MRI_ID, 100_000)):
        unlabeled = unlabeled_indices(n)
        for i in range(n):
            case_id = f"amos_{first_id + i:04d}"
            yield generate_case(case_id, modality, stream0 + i, seed, size, labeled=i not in unlabeled)


INFO = PhantomInfo(
    kind="AMOS", channel_names=dict(enumerate(MODALITIES)), labels=LABELS, reference_modality=_REGISTRY.reference,
    pairing="unpaired", original_label_values=ORIGINAL_LABEL_VALUES,
    description="AMOS-like phantom (cmcseg synth): unpaired abdominal CT (ids < 500, channel 0) and MRI "
                "(ids >= 500, channel 1) of different synthetic patients; ground truth in phantom_truth/",
)


def write_amos(folder: Path | str, *, cases: int | None = None, seed: int = 0, size: str = "small",
               name: str = "AMOS") -> Path:
    """Write an AMOS-like unpaired CT/MRI dataset (a third of the cases MRI)."""
    count = SIZE_PRESETS[size].cases if cases is None else cases
    if count > FIRST_MRI_ID - 1 + split_counts(count)[1]:
        raise ValueError(f"at most {FIRST_MRI_ID - 1} CT cases fit below id {FIRST_MRI_ID}")
    return write_phantom(folder, INFO, iter_cases(count, seed, size), count, name=name, seed=seed, size=size)
