"""MSCMR-like phantom: multi-sequence cardiac MRI (bSSFP, LGE, T2), each sequence on its own grid.

The anatomy is analytic and lives in world coordinates (mm): a torso ellipse with a fat layer,
lungs and spine, and a heart built in its own frame (u, v in the short-axis plane, w along the
long axis from apex to base): the LV blood pool is a half-ellipsoid, the myocardium a shell of
constant thickness around it with an apical cap, the RV a crescent (an ellipse beside the LV
minus the LV) that ends before the apex, with an unlabeled thin RV wall, and above the base
plane some unlabeled atrial blood. Some cases carry a bright LGE scar (a sector of the wall).

Each sequence is sampled on its own grid, like the real data: its own in-plane spacing and
size, slice thickness (LGE thin, bSSFP/T2 12-20 mm; thick slices are the average of sub-samples
along the slice normal), an origin shift of several mm and, for every other case, a small
rotation of the stack. The headers tell the truth, so resampling by the headers aligns the
sequences; the optional ``motion`` displaces the anatomy of a non-reference sequence without
telling the header (what registration must recover).

Labels (consecutive, MS-CMRSeg values in ``original_label_values``) exist on the LGE grid only,
evaluated exactly at voxel centres, and every third case is unlabeled.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from cmcseg.phantoms.contrast import mr_magnitude, tissue_table
from cmcseg.phantoms.geometry import (
    Anatomy,
    Grid,
    RigidMotion,
    grid_centered_on,
    moved,
    paint_in_box,
    render,
    rotation_matrix,
    sample_labels,
    slices_to_cover,
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

_REGISTRY = KNOWN_DATASETS["MSCMR"]
MODALITIES: tuple[str, ...] = _REGISTRY.modalities  # ("bSSFP", "LGE", "T2")
REFERENCE = _REGISTRY.reference  # "LGE"


class Tissue(IntEnum):
    """Tissue codes of the cardiac anatomy (more tissues than labels: contrast needs them)."""

    AIR = 0
    MUSCLE = 1
    FAT = 2
    LUNG = 3
    BONE = 4
    MYOCARDIUM = 5
    SCAR = 6
    LV_BLOOD = 7
    RV_BLOOD = 8
    RV_WALL = 9
    ATRIAL_BLOOD = 10


#: tissue code -> consecutive label (0 background, 1 myocardium, 2 LV, 3 RV)
TISSUE_TO_LABEL = np.zeros(len(Tissue), dtype=np.uint8)
TISSUE_TO_LABEL[[Tissue.MYOCARDIUM, Tissue.SCAR]] = _REGISTRY.labels["myocardium"]
TISSUE_TO_LABEL[Tissue.LV_BLOOD] = _REGISTRY.labels["LV"]
TISSUE_TO_LABEL[Tissue.RV_BLOOD] = _REGISTRY.labels["RV"]


#: mean signal per tissue: bSSFP bright blood; LGE nulled (dark) myocardium, bright scar; T2 brighter myocardium
INTENSITY: dict[str, np.ndarray] = {
    "bSSFP": tissue_table(Tissue, muscle=160, fat=380, lung=25, bone=60, myocardium=130, scar=140,
                          lv_blood=520, rv_blood=500, rv_wall=130, atrial_blood=480),
    "LGE": tissue_table(Tissue, muscle=110, fat=260, lung=20, bone=40, myocardium=45, scar=520,
                        lv_blood=300, rv_blood=290, rv_wall=60, atrial_blood=280),
    "T2": tissue_table(Tissue, muscle=140, fat=250, lung=20, bone=40, myocardium=230, scar=330,
                       lv_blood=150, rv_blood=150, rv_wall=210, atrial_blood=150),
}
#: Rician noise sigma per sequence (signal units)
NOISE_SIGMA: dict[str, float] = {"bSSFP": 12.0, "LGE": 14.0, "T2": 12.0}
#: log-amplitude of the smooth coil bias field over 200 mm
BIAS_STRENGTH = 0.2
#: unlabeled atrial blood above the base plane (mm along the long axis)
ATRIUM_LENGTH_MM = 10.0
#: margin (mm) beyond apex and atrium that every stack covers
STACK_MARGIN_MM = 5.0


# ---------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class Scar:
    """A bright LGE scar: an angular sector of the wall, from the endocardium outwards."""

    angle_deg: float
    width_deg: float
    depth_range_mm: tuple[float, float]  # distance from the base plane towards the apex
    transmurality: float  # fraction of the wall thickness, from the endocardium


@dataclass(frozen=True)
class CardiacAnatomy:
    """One synthetic patient's chest, in world coordinates (mm). Call it on points to get tissue codes."""

    torso_center: tuple[float, float, float]
    torso_semi_axes: tuple[float, float]
    fat_mm: float
    heart_center: tuple[float, float, float]
    heart_axes: np.ndarray  # columns: u, v, w (long axis, apex -> base) in world coordinates
    lv_radius: float
    lv_ellipticity: float
    myo_thickness: float
    lv_length: float
    rv_thickness: float  # widest extent of the RV crescent beyond the LV epicardium
    rv_radial: float  # semi-axis of the RV ellipse towards the LV (larger than the thickness: it overlaps the LV)
    rv_tangential: float
    rv_length: float
    scar: Scar | None

    @property
    def outer_length(self) -> float:
        """Apex (epicardium) to base plane."""
        return self.lv_length + self.myo_thickness

    @property
    def base_w(self) -> float:
        """Position of the base plane on the long axis; the heart centre is halfway to the apex."""
        return self.outer_length / 2

    def to_world(self, local: Sequence[float]) -> np.ndarray:
        return np.asarray(self.heart_center) + self.heart_axes @ np.asarray(local, dtype=float)

    def lv_centroid(self) -> np.ndarray:
        """World centroid of the LV blood pool (a half-ellipsoid's centroid is 3/8 of its length from the base)."""
        return self.to_world((0.0, 0.0, self.base_w - 3 * self.lv_length / 8))

    def coverage_center(self) -> np.ndarray:
        """Middle of the stretch a short-axis stack must cover: apex to the top of the atrial blood."""
        return self.to_world((-self.lv_radius / 4, 0.0, ATRIUM_LENGTH_MM / 2))

    def coverage_extent(self) -> float:
        return self.outer_length + ATRIUM_LENGTH_MM + 2 * STACK_MARGIN_MM

    def __call__(self, points: np.ndarray) -> np.ndarray:
        tissue = np.full(points.shape[:-1], Tissue.AIR, dtype=np.uint8)
        self._paint_torso(points, tissue)
        centre = np.asarray(self.heart_center)
        reach = np.hypot(self.outer_length / 2 + ATRIUM_LENGTH_MM,
                         max(self.lv_radius + self.myo_thickness + self.rv_thickness, self.rv_tangential) + 8.0)
        paint_in_box(points, tissue, centre - reach, centre + reach, self._paint_heart)
        return tissue

    # -------------------------------------------------------------- parts
    def _paint_torso(self, points: np.ndarray, tissue: np.ndarray) -> None:
        dx = points[..., 0] - self.torso_center[0]
        dy = points[..., 1] - self.torso_center[1]
        ax, ay = self.torso_semi_axes
        tissue[(dx / ax) ** 2 + (dy / ay) ** 2 <= 1] = Tissue.FAT
        inner = (dx / (ax - self.fat_mm)) ** 2 + (dy / (ay - self.fat_mm)) ** 2 <= 1
        tissue[inner] = Tissue.MUSCLE
        for side in (-1.0, 1.0):  # lungs, left and right, posterior to the heart
            lung = ((dx - side * 0.42 * ax) / (0.36 * ax)) ** 2 + ((dy - 0.1 * ay) / (0.75 * ay)) ** 2 <= 1
            tissue[lung & inner] = Tissue.LUNG
        spine = (dx**2 + (dy - 0.72 * ay) ** 2) <= (0.14 * ay) ** 2
        tissue[spine & inner] = Tissue.BONE

    def _paint_heart(self, points: np.ndarray, tissue: np.ndarray) -> None:
        local = (points - np.asarray(self.heart_center)) @ self.heart_axes
        u, v, w = local[..., 0], local[..., 1], local[..., 2]
        depth = self.base_w - w  # 0 at the base plane, growing towards the apex
        ecc = self.lv_ellipticity
        r = np.sqrt(u**2 + (v / ecc) ** 2)  # elliptical radius in the short-axis plane

        epi = (self.lv_radius + self.myo_thickness) * _taper(depth, self.outer_length)
        endo = self.lv_radius * _taper(depth, self.lv_length)
        in_heart = (depth >= 0) & (depth <= self.outer_length)
        in_epi = in_heart & (r <= epi)

        rv_scale = _taper(depth, self.rv_length)
        rv_a, rv_b = self.rv_radial * rv_scale, self.rv_tangential * rv_scale
        rv_u = -(epi + self.rv_thickness * rv_scale - rv_a)  # outer edge of the RV: thickness beyond the LV
        with np.errstate(divide="ignore", invalid="ignore"):
            rv_cavity = ((u - rv_u) / rv_a) ** 2 + (v / rv_b) ** 2 <= 1
            rv_outer = ((u - rv_u) / (rv_a + 3)) ** 2 + (v / (rv_b + 3)) ** 2 <= 1
        in_rv_range = (depth >= 0) & (depth <= self.rv_length)
        pericardial = in_heart & (r <= epi + 4) & (tissue != Tissue.AIR)

        tissue[pericardial] = Tissue.FAT
        tissue[in_rv_range & rv_outer & ~in_epi] = Tissue.RV_WALL
        tissue[in_rv_range & rv_cavity & ~in_epi] = Tissue.RV_BLOOD
        atrium = (depth < 0) & (depth >= -ATRIUM_LENGTH_MM) & (r <= 0.8 * self.lv_radius)
        tissue[atrium] = Tissue.ATRIAL_BLOOD
        tissue[in_epi] = Tissue.MYOCARDIUM
        if self.scar is not None:
            tissue[in_epi & self._scar_mask(u, v, depth, r, endo, epi)] = Tissue.SCAR
        tissue[in_heart & (r <= endo) & (depth <= self.lv_length)] = Tissue.LV_BLOOD

    def _scar_mask(self, u: np.ndarray, v: np.ndarray, depth: np.ndarray, r: np.ndarray,
                   endo: np.ndarray, epi: np.ndarray) -> np.ndarray:
        scar = self.scar
        assert scar is not None, "called only for a heart with a scar"
        angle = np.degrees(np.arctan2(v, u))
        in_sector = np.mod(angle - scar.angle_deg, 360.0) <= scar.width_deg
        lo, hi = scar.depth_range_mm
        with np.errstate(divide="ignore", invalid="ignore"):
            transmural = (r - endo) / np.maximum(epi - endo, 1e-6)
        return in_sector & (depth >= lo) & (depth <= hi) & (transmural <= scar.transmurality)

    def as_dict(self) -> dict[str, Any]:
        return {
            "torso_center_mm": list(self.torso_center), "torso_semi_axes_mm": list(self.torso_semi_axes),
            "fat_mm": self.fat_mm, "heart_center_mm": list(self.heart_center),
            "heart_axes": self.heart_axes.tolist(), "lv_radius_mm": self.lv_radius,
            "lv_ellipticity": self.lv_ellipticity, "myo_thickness_mm": self.myo_thickness,
            "lv_length_mm": self.lv_length, "rv_thickness_mm": self.rv_thickness, "rv_radial_mm": self.rv_radial,
            "rv_tangential_mm": self.rv_tangential, "rv_length_mm": self.rv_length,
            "lv_centroid_mm": self.lv_centroid().tolist(),
            "scar": None if self.scar is None else {
                "angle_deg": self.scar.angle_deg, "width_deg": self.scar.width_deg,
                "depth_range_mm": list(self.scar.depth_range_mm), "transmurality": self.scar.transmurality,
            },
        }


def _taper(depth: np.ndarray, length: float) -> np.ndarray:
    """Half-ellipsoid profile: 1 at the base plane (depth 0), 0 at ``depth == length``, 0 outside."""
    ratio = depth / length
    return np.sqrt(np.clip(1.0 - ratio**2, 0.0, None)) * ((ratio >= 0) & (ratio <= 1))


def random_anatomy(rng: np.random.Generator) -> CardiacAnatomy:
    """Draw one patient: sizes and positions vary within adult ranges."""
    torso_center = tuple(rng.uniform(-10, 10, 3) * (1, 1, 2))
    heart_center = (torso_center[0] + 25 + rng.uniform(-8, 8), torso_center[1] - 30 + rng.uniform(-8, 8),
                    torso_center[2] + rng.uniform(-5, 5))
    axes = rotation_matrix((rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-20, 20)))
    lv_length = rng.uniform(50, 65)
    rv_thickness = rng.uniform(14, 22)
    scar = None
    if rng.random() < 0.6:
        lo = rng.uniform(5, 0.4 * lv_length)
        scar = Scar(angle_deg=rng.uniform(0, 360), width_deg=rng.uniform(40, 100),
                    depth_range_mm=(lo, lo + rng.uniform(15, 0.5 * lv_length)),
                    transmurality=rng.uniform(0.4, 1.0))
    return CardiacAnatomy(
        torso_center=torso_center, torso_semi_axes=(rng.uniform(150, 175), rng.uniform(100, 120)),
        fat_mm=rng.uniform(8, 20), heart_center=heart_center, heart_axes=axes,
        lv_radius=rng.uniform(18, 25), lv_ellipticity=rng.uniform(0.85, 1.0),
        myo_thickness=rng.uniform(7, 10), lv_length=lv_length, rv_thickness=rv_thickness,
        rv_radial=rv_thickness * rng.uniform(1.5, 1.8), rv_tangential=rng.uniform(35, 45),
        rv_length=lv_length * rng.uniform(0.75, 0.9), scar=scar,
    )


# ---------------------------------------------------------------------- acquisition protocols
@dataclass(frozen=True)
class SequenceProtocol:
    """How one sequence is acquired: nominal in-plane spacing, in-plane field of view, slice thickness range."""

    in_plane_mm: float
    fov_mm: float
    thickness_mm: tuple[float, float]


@dataclass(frozen=True)
class CardiacSize:
    cases: int
    protocols: Mapping[str, SequenceProtocol]


SIZE_PRESETS: dict[str, CardiacSize] = {
    "tiny": CardiacSize(5, {
        "LGE": SequenceProtocol(3.2, 128.0, (10.0, 10.0)),
        "bSSFP": SequenceProtocol(3.7, 145.0, (12.0, 14.0)),
        "T2": SequenceProtocol(4.0, 150.0, (16.0, 20.0)),
    }),
    "small": CardiacSize(12, {
        "LGE": SequenceProtocol(2.0, 192.0, (7.0, 7.0)),
        "bSSFP": SequenceProtocol(2.3, 215.0, (12.0, 14.0)),
        "T2": SequenceProtocol(2.6, 210.0, (15.0, 20.0)),
    }),
    "default": CardiacSize(45, {
        "LGE": SequenceProtocol(1.4, 358.0, (5.0, 5.0)),
        "bSSFP": SequenceProtocol(1.6, 380.0, (12.0, 14.0)),
        "T2": SequenceProtocol(1.8, 370.0, (15.0, 20.0)),
    }),
}


def sequence_grid(anatomy: CardiacAnatomy, protocol: SequenceProtocol, rng: np.random.Generator,
                  rotated: bool) -> Grid:
    """The grid of one sequence: centred near the heart with its own shift, spacing, size and tilt."""
    spacing_xy = protocol.in_plane_mm * rng.uniform(0.95, 1.05)
    size_xy = int(round(protocol.fov_mm / spacing_xy))
    thickness = float(np.round(rng.uniform(*protocol.thickness_mm) * 2) / 2)  # 0.5 mm steps, like scanners
    size_z = slices_to_cover(anatomy.coverage_extent(), thickness)
    in_plane_angle = rng.uniform(0, 2 * np.pi)
    shift = np.array([np.cos(in_plane_angle), np.sin(in_plane_angle), 0.0]) * rng.uniform(3, 8)
    shift[2] = rng.uniform(-4, 4)
    direction = np.eye(3)
    if rotated:
        signs = rng.choice([-1.0, 1.0], 3)
        direction = rotation_matrix(signs * rng.uniform((1.5, 1.5, 3.0), (5.0, 5.0, 10.0)))
    return grid_centered_on(anatomy.coverage_center() + shift, (size_xy, size_xy, size_z),
                            (spacing_xy, spacing_xy, thickness), direction, thickness)


# ---------------------------------------------------------------------- images
def acquire(anatomy: Anatomy, grid: Grid, sequence: str, rng: np.random.Generator) -> np.ndarray:
    """Signal of ``sequence`` on ``grid``: tissue contrast averaged over thick slices, bias field, Rician noise."""
    clean = render(anatomy, grid, INTENSITY[sequence])
    return mr_magnitude(clean, grid, rng, NOISE_SIGMA[sequence], BIAS_STRENGTH)


def _resolve_motion(
    motion: Mapping[str, RigidMotion | Sequence[float] | dict] | None,
) -> dict[str, RigidMotion]:
    """Validate the ``motion`` option: known, non-reference sequences only."""
    resolved: dict[str, RigidMotion] = {}
    for key, value in (motion or {}).items():
        matches = [m for m in MODALITIES if m.lower() == str(key).lower()]
        if not matches:
            raise ValueError(f"motion given for unknown sequence {key!r}; sequences are {MODALITIES}")
        if matches[0] == REFERENCE:
            raise ValueError(f"the reference sequence {REFERENCE} cannot move: its grid carries the labels. "
                             f"Move {[m for m in MODALITIES if m != REFERENCE]} instead.")
        coerced = RigidMotion.coerce(value)
        if coerced is not None:
            resolved[matches[0]] = coerced
    return resolved


def _random_motion(rng: np.random.Generator, translation_mm: float, rotation_deg: float) -> RigidMotion:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    translation = direction * translation_mm * rng.uniform(0.5, 1.0)
    rotation = rng.uniform(-1, 1, 3) * rotation_deg
    return RigidMotion(tuple(translation), tuple(rotation))


def generate_case(
    index: int, seed: int, size: str, labeled: bool,
    motion: Mapping[str, RigidMotion] | None = None,
    random_motion_mm: float = 0.0, random_rotation_deg: float = 0.0,
) -> PhantomCase:
    """One MSCMR-like case: three sequences on their own grids, the LGE label, the truth on every grid."""
    preset = SIZE_PRESETS[size]
    case_id = f"patient{index + 1:03d}"
    anatomy = random_anatomy(case_rng(seed, index, 0))
    grid_rng = case_rng(seed, index, 1)
    motion_rng = case_rng(seed, index, 3)
    rotated = index % 2 == 1
    images, truth_labels, modalities = {}, {}, {}
    label = None
    for channel, sequence in enumerate(MODALITIES):
        grid = sequence_grid(anatomy, preset.protocols[sequence], grid_rng, rotated)
        seq_motion = (motion or {}).get(sequence)
        if seq_motion is None and sequence != REFERENCE and (random_motion_mm or random_rotation_deg):
            seq_motion = _random_motion(motion_rng, random_motion_mm, random_rotation_deg)
        if seq_motion is not None:
            seq_motion = seq_motion.resolved(anatomy.heart_center)
        seen = moved(anatomy, seq_motion)
        signal = acquire(seen, grid, sequence, case_rng(seed, index, 2, channel))
        images[channel] = grid.to_image(to_int16(signal))
        truth = TISSUE_TO_LABEL[sample_labels(seen, grid)]
        truth_labels[channel] = grid.to_image(truth)
        if sequence == REFERENCE and labeled:
            label = grid.to_image(truth)
        centroid = anatomy.lv_centroid() if seq_motion is None else seq_motion.apply(anatomy.lv_centroid())
        modalities[sequence] = {
            "channel": channel, "geometry": grid.as_dict(),
            "motion": None if seq_motion is None else seq_motion.as_dict(),
            "lv_centroid_mm": centroid.tolist(),
            "truth_label": truth_label_file(Path("."), case_id, channel).as_posix(),
        }
    truth = {"labeled": labeled, "rotated": rotated, "anatomy": anatomy.as_dict(), "modalities": modalities}
    return PhantomCase(case_id, images, label, truth_labels, truth)


def iter_cases(count: int, seed: int, size: str, **options: Any) -> Iterator[PhantomCase]:
    unlabeled = unlabeled_indices(count)
    for index in range(count):
        yield generate_case(index, seed, size, labeled=index not in unlabeled, **options)


INFO = PhantomInfo(
    kind="MSCMR", channel_names=dict(enumerate(MODALITIES)), labels=dict(_REGISTRY.labels),
    reference_modality=REFERENCE, original_label_values=dict(_REGISTRY.original_label_values),
    description="MSCMR-like phantom (cmcseg synth): bSSFP, LGE and T2 on their own grids, thick slices, "
                "labels on the LGE grid; ground truth in phantom_truth/",
)


def write_mscmr(
    folder: Path | str,
    *,
    cases: int | None = None,
    seed: int = 0,
    size: str = "small",
    name: str = "MSCMR",
    motion: Mapping[str, RigidMotion | Sequence[float] | dict] | None = None,
    random_motion_mm: float = 0.0,
    random_rotation_deg: float = 0.0,
) -> Path:
    """Write an MSCMR-like dataset.

    ``motion`` maps a non-reference sequence ("bSSFP", "T2") to a :class:`RigidMotion` (or a
    translation in mm) applied to its anatomy in every case; ``random_motion_mm`` and
    ``random_rotation_deg`` instead draw a random rigid motion per case for each non-reference
    sequence. Neither shows in the headers. Both default to off.
    """
    count = SIZE_PRESETS[size].cases if cases is None else cases
    resolved = _resolve_motion(motion)
    if resolved and (random_motion_mm or random_rotation_deg):
        raise ValueError("give either an explicit motion or a random one, not both")
    options = {
        "motion": {k: m.as_dict() for k, m in resolved.items()},
        "random_motion_mm": random_motion_mm, "random_rotation_deg": random_rotation_deg,
    }
    generated = iter_cases(count, seed, size, motion=resolved, random_motion_mm=random_motion_mm,
                           random_rotation_deg=random_rotation_deg)
    return write_phantom(folder, INFO, generated, count, name=name, seed=seed, size=size, options=options)
