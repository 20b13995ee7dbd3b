"""DELIVER-like phantom: 2D driving scenes with RGB, depth, event and LiDAR, under four conditions.

Each scene is a street seen by a pinhole camera: a ground plane (road, sidewalks, verge),
building facades along both sides in blocks of random height, and cars and pedestrians as
upright boxes, all placed in metres and projected, with a depth buffer for occlusion. The
same geometry gives every modality, so they are pixel-aligned like DELIVER's CARLA renders:

* RGB (3-component uint8 PNG), changed by the case's condition: ``sun`` as rendered, ``night``
  dark with lit windows and headlights, ``fog`` washed out with distance and blurred, ``rain``
  darker, desaturated, with streaks;
* depth (uint16 PNG, centimetres; 65535 = sky/far);
* event (uint8 PNG: 255 positive, 128 negative polarity, 0 none), from log-brightness edges
  under the radial flow of forward motion, noisier at night and in rain;
* LiDAR (uint8 PNG): sparse beam rows (+2 to -25 degrees) with returns coded by range (255 near, 1 at 100 m, 0 no
  return); fog and rain drop returns.

The condition of every case is recorded in dataset.json under ``"conditions"``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from cmcseg.phantoms.writing import (
    PhantomCase,
    PhantomInfo,
    case_rng,
    truth_label_file,
    unlabeled_indices,
    write_phantom,
)
from cmcseg.registry import KNOWN_DATASETS

logger = logging.getLogger(__name__)

_REGISTRY = KNOWN_DATASETS["DELIVER"]
MODALITIES: tuple[str, ...] = _REGISTRY.modalities  # ("RGB", "depth", "event", "lidar")
#: the phantom's own consecutive classes (background: sky and everything unlabeled)
CLASSES: tuple[str, ...] = ("background", "road", "sidewalk", "building", "car", "pedestrian")
LABELS: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
CONDITIONS: tuple[str, ...] = ("sun", "night", "fog", "rain")
FILE_ENDING = ".png"
#: LiDAR range coded into uint8 (metres)
LIDAR_RANGE_M = 100.0
#: depth PNG unit and the code for "no depth" (sky)
DEPTH_UNITS_PER_M = 100.0
DEPTH_FAR = 65535

SKY_RGB = np.array([0.53, 0.71, 0.92])
ROAD_RGB = np.array([0.28, 0.28, 0.30])
SIDEWALK_RGB = np.array([0.60, 0.57, 0.55])
VERGE_RGB = np.array([0.35, 0.47, 0.24])
FOG_RGB = np.array([0.78, 0.78, 0.80])


# ---------------------------------------------------------------------- the scene in metres
@dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``height_m`` above flat ground, looking along the street (+Z)."""

    width: int
    height: int
    focal_px: float
    horizon_row: float
    height_m: float

    def ray_slopes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel: lateral slope X/Z and downward slope (-Y)/Z of the ray through its centre."""
        rows, cols = np.mgrid[0:self.height, 0:self.width].astype(np.float64) + 0.5
        return (cols - self.width / 2) / self.focal_px, (rows - self.horizon_row) / self.focal_px

    def column(self, x_m: float, z_m: float) -> float:
        return self.width / 2 + self.focal_px * x_m / z_m

    def row(self, y_m: float, z_m: float) -> float:
        """Image row of a point ``y_m`` above the ground at distance ``z_m``."""
        return self.horizon_row + self.focal_px * (self.height_m - y_m) / z_m


@dataclass(frozen=True)
class Block:
    """A building facade on one side of the street between two distances."""

    side: int  # -1 left, +1 right
    z_start: float
    z_end: float
    height_m: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Agent:
    """A car or a pedestrian: an upright box facing the camera."""

    kind: str  # "car" | "pedestrian"
    x_m: float
    z_m: float
    width_m: float
    height_m: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Street:
    road_offset: float
    road_half_width: float
    sidewalk_width: float
    facade_gap: float
    blocks: tuple[Block, ...]
    agents: tuple[Agent, ...]

    def facade_x(self, side: int) -> float:
        return self.road_offset + side * (self.road_half_width + self.sidewalk_width + self.facade_gap)


def random_camera(rng: np.random.Generator, image_size: int) -> Camera:
    return Camera(image_size, image_size, image_size * rng.uniform(0.45, 0.55),
                  image_size * rng.uniform(0.42, 0.5), rng.uniform(1.4, 1.8))


def random_street(rng: np.random.Generator) -> Street:
    """Road, sidewalks, building blocks on both sides, 1-4 cars and 1-3 pedestrians (the first one near)."""
    half, walk = rng.uniform(3.5, 6.0), rng.uniform(1.5, 3.0)
    offset = rng.uniform(-1.5, 1.5)
    blocks = []
    for side in (-1, 1):
        z = rng.uniform(0.0, 4.0)
        while z < 250.0:
            length = rng.uniform(8, 25)
            if rng.random() > 0.25:  # otherwise a gap between buildings
                blocks.append(Block(side, z, z + length, rng.uniform(5, 35), tuple(rng.uniform(0.3, 0.8, 3))))
            z += length
    agents = []
    for _ in range(int(rng.integers(1, 5))):
        agents.append(Agent("car", offset + rng.uniform(-half + 1.0, half - 1.0), rng.uniform(5, 30),
                            rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.6), tuple(rng.uniform(0.05, 0.95, 3))))
    for i in range(int(rng.integers(1, 4))):
        side = rng.choice([-1, 1])
        z = rng.uniform(3, 8) if i == 0 else rng.uniform(3, 18)
        agents.append(Agent("pedestrian", offset + side * (half + rng.uniform(0.4, walk - 0.4)), z,
                            rng.uniform(0.45, 0.6), rng.uniform(1.6, 1.9), tuple(rng.uniform(0.1, 0.9, 3))))
    return Street(offset, half, walk, rng.uniform(0.0, 2.0), tuple(blocks), tuple(agents))


# ---------------------------------------------------------------------- rendering
@dataclass
class Render:
    """Per-pixel class, depth (m, inf for sky) and sunlit colour (0-1) of a scene."""

    labels: np.ndarray
    depth: np.ndarray
    rgb: np.ndarray
    window_lit: np.ndarray  # pixels of lit windows (visible at night)


def render_scene(camera: Camera, street: Street) -> Render:
    """Ray-cast ground and facades, then paint agents far to near with a depth test."""
    lateral, down = camera.ray_slopes()
    shape = lateral.shape
    labels = np.full(shape, LABELS["background"], dtype=np.uint8)
    depth = np.full(shape, np.inf)
    sky_shade = 1.0 - 0.35 * np.clip(-down * 2, 0, 1)[..., None]
    rgb = SKY_RGB * sky_shade
    lit = np.zeros(shape, dtype=bool)

    with np.errstate(divide="ignore", invalid="ignore"):
        ground_z = np.where(down > 0, camera.height_m / down, np.inf)
    ground = np.isfinite(ground_z)
    ground_z_finite = np.where(ground, ground_z, 0.0)
    lateral_m = np.where(ground, lateral * ground_z_finite - street.road_offset, np.inf)
    road = ground & (np.abs(lateral_m) <= street.road_half_width)
    walk = ground & ~road & (np.abs(lateral_m) <= street.road_half_width + street.sidewalk_width)
    marking = road & (np.abs(lateral_m) < 0.12) & (np.mod(ground_z_finite, 9.0) < 4.0)
    depth[ground] = ground_z[ground]
    rgb[ground] = VERGE_RGB
    rgb[walk] = SIDEWALK_RGB
    rgb[road] = ROAD_RGB
    rgb[marking] = 0.9
    labels[road] = LABELS["road"]
    labels[walk] = LABELS["sidewalk"]

    for side in (-1, 1):
        on_side = np.sign(lateral) == side
        with np.errstate(divide="ignore", invalid="ignore"):
            facade_z = np.where(on_side, street.facade_x(side) / np.where(on_side, lateral, 1.0), np.inf)
        up = camera.height_m - down * np.where(on_side, facade_z, 0.0)
        windows, window_is_lit = _windows(np.where(on_side, facade_z, 0.0), up)
        for block in (b for b in street.blocks if b.side == side):
            hit = (facade_z >= block.z_start) & (facade_z < block.z_end) & (up >= 0) & (up <= block.height_m)
            hit &= facade_z < depth
            rgb[hit] = np.asarray(block.color) * np.where(windows[hit], 0.45, 1.0)[:, None]
            labels[hit] = LABELS["building"]
            depth[hit] = facade_z[hit]
            lit[hit] = windows[hit] & window_is_lit[hit]

    for agent in sorted(street.agents, key=lambda a: -a.z_m):
        mask = _agent_mask(camera, agent) & (agent.z_m < depth)
        rgb[mask] = np.asarray(agent.color)
        labels[mask] = LABELS[agent.kind]
        depth[mask] = agent.z_m
        lit &= ~mask
    return Render(labels, depth, np.ascontiguousarray(rgb), lit)


def _windows(facade_z: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window pattern on a facade (3 m grid) and which windows are lit (a fixed hash of the window).

    ``facade_z`` and ``up`` must be finite (distance along the street and height on the facade).
    """
    along, height = np.mod(facade_z, 3.0), np.mod(up, 3.0)
    in_window = (along > 0.6) & (along < 2.1) & (height > 0.9) & (height < 2.3) & (up > 2.5)
    column = np.floor(facade_z / 3.0).astype(np.int64)
    floor = np.floor(np.clip(up, -1e6, 1e6) / 3.0).astype(np.int64)
    lit = ((column * 73856093) ^ (floor * 19349663)) % 10 < 3
    return in_window, lit


def _agent_mask(camera: Camera, agent: Agent) -> np.ndarray:
    """Pixels covered by a car (body plus narrower cabin) or a pedestrian (body plus head)."""
    rows, cols = np.mgrid[0:camera.height, 0:camera.width].astype(np.float64) + 0.5

    def box(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        c0, c1 = camera.column(x0, agent.z_m), camera.column(x1, agent.z_m)
        r_top, r_bottom = camera.row(y1, agent.z_m), camera.row(y0, agent.z_m)
        # at least one pixel wide and tall, so distant agents do not vanish between pixel centres
        c0, c1 = min(c0, (c0 + c1) / 2 - 0.5), max(c1, (c0 + c1) / 2 + 0.5)
        r_top, r_bottom = min(r_top, (r_top + r_bottom) / 2 - 0.5), max(r_bottom, (r_top + r_bottom) / 2 + 0.5)
        return (cols >= c0) & (cols <= c1) & (rows >= r_top) & (rows <= r_bottom)

    half, height = agent.width_m / 2, agent.height_m
    if agent.kind == "car":
        return box(agent.x_m - half, agent.x_m + half, 0.0, 0.6 * height) | \
            box(agent.x_m - 0.75 * half, agent.x_m + 0.75 * half, 0.6 * height, height)
    head = 0.12 * height
    return box(agent.x_m - half, agent.x_m + half, 0.0, height - head) | \
        box(agent.x_m - 0.4 * half, agent.x_m + 0.4 * half, height - head, height)


# ---------------------------------------------------------------------- conditions and sensors
def apply_condition(scene: Render, camera: Camera, street: Street, condition: str,
                    rng: np.random.Generator, visibility_m: float = 40.0) -> np.ndarray:
    """The RGB image (float 0-1) of the scene under ``condition`` (``visibility_m`` sets the fog)."""
    rgb = scene.rgb * (1.0 + 0.06 * rng.normal(size=scene.rgb.shape[:2]))[..., None]  # surface texture
    blur = camera.width / 256.0
    if condition == "night":
        rgb = rgb * 0.12 + np.array([0.01, 0.01, 0.04])
        rgb = np.where(scene.window_lit[..., None], np.array([0.9, 0.8, 0.45]), rgb)
        rgb = rgb + _headlights(camera, street)[..., None] * np.array([1.0, 0.95, 0.8])
        noise = 0.04
    elif condition == "fog":
        transmission = np.exp(-np.nan_to_num(scene.depth, posinf=1e6) / visibility_m)[..., None]
        rgb = rgb * transmission + FOG_RGB * (1 - transmission)
        rgb = gaussian_filter(rgb, sigma=(1.2 * blur, 1.2 * blur, 0))
        noise = 0.02
    elif condition == "rain":
        grey = rgb.mean(axis=-1, keepdims=True)
        rgb = 0.65 * (0.6 * rgb + 0.4 * grey)
        rgb = rgb + 0.35 * _rain_streaks(camera, rng)[..., None]
        rgb = gaussian_filter(rgb, sigma=(0.5 * blur, 0.5 * blur, 0))
        noise = 0.03
    elif condition == "sun":
        noise = 0.02
    else:
        raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS}")
    return np.clip(rgb + rng.normal(0.0, noise, rgb.shape), 0.0, 1.0)


def _headlights(camera: Camera, street: Street) -> np.ndarray:
    """Glow of the cars' headlights (Gaussian spots at the lower corners of each car)."""
    rows, cols = np.mgrid[0:camera.height, 0:camera.width].astype(np.float64) + 0.5
    glow = np.zeros((camera.height, camera.width))
    for car in (a for a in street.agents if a.kind == "car"):
        radius = max(0.6, camera.focal_px * 0.25 / car.z_m)
        row = camera.row(0.5, car.z_m)
        for dx in (-0.35, 0.35):
            col = camera.column(car.x_m + dx * car.width_m, car.z_m)
            glow += np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * radius**2))
    return np.clip(glow, 0.0, 1.0)


def _rain_streaks(camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Short slanted bright streaks at random places."""
    streaks = np.zeros((camera.height, camera.width))
    count = camera.width * camera.height // 150
    length = max(2, camera.height // 25)
    rows = rng.integers(0, camera.height, count)
    cols = rng.integers(0, camera.width, count)
    for step in range(length):
        streaks[np.clip(rows + step, 0, camera.height - 1), np.clip(cols + step // 3, 0, camera.width - 1)] = 1.0
    return streaks


def depth_png(depth_m: np.ndarray) -> np.ndarray:
    """Depth in centimetres as uint16; sky and anything beyond 655 m is DEPTH_FAR."""
    coded = np.where(np.isfinite(depth_m), np.rint(depth_m * DEPTH_UNITS_PER_M), DEPTH_FAR)
    return np.clip(coded, 0, DEPTH_FAR).astype(np.uint16)


def event_frame(rgb: np.ndarray, camera: Camera, condition: str, rng: np.random.Generator) -> np.ndarray:
    """Events of forward motion: log-brightness change along the radial flow, thresholded, plus noise events."""
    log_luma = np.log(gaussian_filter(rgb.mean(axis=-1), 0.7) + 0.05)
    grad_row, grad_col = np.gradient(log_luma)
    rows, cols = np.mgrid[0:camera.height, 0:camera.width].astype(np.float64) + 0.5
    flow_row, flow_col = rows - camera.horizon_row, cols - camera.width / 2
    norm = np.hypot(flow_row, flow_col) + 1e-6
    change = -(grad_row * flow_row + grad_col * flow_col) / norm  # brightness change as the scene expands
    events = np.zeros(change.shape, dtype=np.uint8)
    threshold = 0.15
    events[change > threshold] = 255
    events[change < -threshold] = 128
    noise_rate = {"sun": 0.002, "night": 0.02, "fog": 0.004, "rain": 0.015}[condition]
    noisy = rng.random(change.shape) < noise_rate
    events[noisy] = rng.choice(np.array([128, 255], dtype=np.uint8), int(noisy.sum()))
    return events


def lidar_frame(depth_m: np.ndarray, camera: Camera, condition: str, rng: np.random.Generator,
                visibility_m: float = 40.0) -> np.ndarray:
    """Sparse LiDAR returns: beam rows between +2 and -25 degrees elevation, every other column."""
    beams = int(np.clip(camera.height // 16, 16, 64))
    elevations = np.deg2rad(np.linspace(2.0, -25.0, beams))
    rows = np.unique(np.rint(camera.horizon_row - camera.focal_px * np.tan(elevations)).astype(int))
    rows = rows[(rows >= 0) & (rows < camera.height)]
    sample = np.zeros(depth_m.shape, dtype=bool)
    sample[np.ix_(rows, np.arange(0, camera.width, 2))] = True
    valid = sample & np.isfinite(depth_m) & (depth_m < LIDAR_RANGE_M)
    if condition == "fog":
        valid &= rng.random(depth_m.shape) < np.exp(-2 * np.nan_to_num(depth_m, posinf=1e6) / visibility_m)
    elif condition == "rain":
        valid &= rng.random(depth_m.shape) > 0.15
    frame = np.zeros(depth_m.shape, dtype=np.uint8)
    ranges = np.clip(depth_m[valid], 0.0, LIDAR_RANGE_M)
    frame[valid] = np.rint(1 + 254 * (1 - ranges / LIDAR_RANGE_M)).astype(np.uint8)
    return frame


def image_2d(array: np.ndarray, vector: bool = False) -> sitk.Image:
    """A 2D SimpleITK image (unit spacing) from a (rows, cols) or (rows, cols, components) array."""
    return sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class SceneSize:
    cases: int
    image_size: int


SIZE_PRESETS: dict[str, SceneSize] = {
    "tiny": SceneSize(6, 64),
    "small": SceneSize(16, 256),
    "default": SceneSize(100, 1042),  # DELIVER's 1042 x 1042
}


def generate_case(index: int, seed: int, size: str, labeled: bool) -> PhantomCase:
    """One scene under the condition ``CONDITIONS[index % 4]`` (all four appear from four cases on)."""
    case_id = f"scene{index + 1:04d}"
    condition = CONDITIONS[index % len(CONDITIONS)]
    scene_rng = case_rng(seed, index, 0)
    camera = random_camera(scene_rng, SIZE_PRESETS[size].image_size)
    street = random_street(scene_rng)
    scene = render_scene(camera, street)
    sensor_rng = case_rng(seed, index, 2)
    visibility = float(sensor_rng.uniform(25.0, 60.0))
    rgb = apply_condition(scene, camera, street, condition, sensor_rng, visibility)
    images = {
        0: image_2d(np.rint(rgb * 255).astype(np.uint8), vector=True),
        1: image_2d(depth_png(scene.depth)),
        2: image_2d(event_frame(rgb, camera, condition, sensor_rng)),
        3: image_2d(lidar_frame(scene.depth, camera, condition, sensor_rng, visibility)),
    }
    label = image_2d(scene.labels)
    modalities = {
        modality: {"channel": channel, "geometry": {"size": [camera.width, camera.height], "spacing": [1.0, 1.0]},
                   "motion": None, "truth_label": truth_label_file(Path("."), case_id, channel, FILE_ENDING).as_posix()}
        for channel, modality in enumerate(MODALITIES)
    }
    truth = {
        "labeled": labeled, "condition": condition,
        "fog_visibility_m": visibility if condition == "fog" else None,
        "camera": {"focal_px": camera.focal_px, "horizon_row": camera.horizon_row, "height_m": camera.height_m},
        "street": {"road_half_width_m": street.road_half_width, "sidewalk_width_m": street.sidewalk_width,
                   "road_offset_m": street.road_offset, "blocks": len(street.blocks)},
        "agents": [{"kind": a.kind, "x_m": a.x_m, "z_m": a.z_m} for a in street.agents],
        "class_pixels": {name: int((scene.labels == value).sum()) for name, value in LABELS.items()},
        "modalities": modalities,
    }
    return PhantomCase(case_id, images, label if labeled else None,
                       {channel: label for channel in range(len(MODALITIES))}, truth, condition)


def iter_cases(count: int, seed: int, size: str) -> Iterator[PhantomCase]:
    unlabeled = unlabeled_indices(count)
    for index in range(count):
        yield generate_case(index, seed, size, labeled=index not in unlabeled)


INFO = PhantomInfo(
    kind="DELIVER", channel_names=dict(enumerate(MODALITIES)), labels=LABELS, reference_modality=_REGISTRY.reference,
    file_ending=FILE_ENDING, dimensionality="2d",
    description="DELIVER-like phantom (cmcseg synth): 2D street scenes, RGB/depth/event/LiDAR PNGs, conditions "
                "sun/night/fog/rain (see 'conditions'); ground truth in phantom_truth/",
)


def write_deliver(folder: Path | str, *, cases: int | None = None, seed: int = 0, size: str = "small",
                  name: str = "DELIVER") -> Path:
    """Write a DELIVER-like 2D multimodal scene dataset."""
    count = SIZE_PRESETS[size].cases if cases is None else cases
    return write_phantom(folder, INFO, iter_cases(count, seed, size), count, name=name, seed=seed, size=size)

