"""DELIVER (CARLA driving scenes: RGB, depth, event, LiDAR; 25 classes; 2D) -> raw dataset ``DELIVER``.

Official naming (github.com/jamycheung/DELIVER, README "Data folder structure" and
``semseg/datasets/deliver.py``)::

    DELIVER/
        img/{cloud,fog,night,rain,sun}/{train,val,test}/SCENE/FRAME_rgb_VIEW.png
        depth/.../SCENE/FRAME_depth_VIEW.png      (e.g. depth/cloud/test/MAP_10_point102/045050_depth_front.png)
        event/.../SCENE/FRAME_event_VIEW.png
        lidar/.../SCENE/FRAME_lidar_VIEW.png
        semantic/.../SCENE/FRAME_semantic_VIEW.png
        hha/...                                   (HHA-encoded depth; not converted)

The other files of a sample are the RGB path with the folder and the ``_rgb`` token
replaced, as the official loader does. Class ids: the loader reads the first (red) channel
of the semantic PNG, sets 255 to 0 and subtracts 1, so red value v in 1..25 is class v-1 of
``Building, Fence, Other, Pedestrian, Pole, RoadLine, Road, SideWalk, Vegetation, Cars, Wall,
TrafficSign, Sky, Ground, Bridge, RailTrack, GroundRail, TrafficLight, Static, Dynamic, Water,
Terrain, TwoWheeler, Bus, Truck`` and 0 / 255 are unlabelled (the loader's ignore index 255).
These are CARLA's semantic tags (0 = unlabelled), which CARLA writes in the red channel.

What this converter does:

* case id ``CONDITION_SCENE_FRAME_VIEW``; the weather condition of every case is recorded in
  dataset.json ``"conditions"`` (case id -> condition);
* the 25 classes keep the registry's values 0..24; unlabelled pixels become the label
  ``"ignore"`` (value 25, nnU-Net's convention: excluded from the loss); original values
  ``v + 1`` (and ``ignore`` <- 0) are recorded;
* ``train`` and ``val`` are training cases; ``test`` goes to imagesTs with its labels in
  labelsTs (the official benchmark split stays held out);
* every file is a ``.png`` (``file_ending`` ".png", 2D); RGB is kept as 3 components (an
  alpha channel is dropped); depth, event and LiDAR PNGs are copied unchanged (byte for
  byte, so their bit depth and channels stay as released); no image is resized (the event
  images of the low-resolution corner case keep their own size).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmcseg.errors import DatasetError, Problem
from cmcseg.preprocessing.converters.base import (
    IGNORE_LABEL,
    Converter,
    LabelEncoding,
    SourceCase,
    SourceScan,
)

CONDITIONS = ("cloud", "fog", "night", "rain", "sun")
#: Registry modality -> (folder, file token).
_MODALITY_FILES = {"RGB": ("img", "rgb"), "depth": ("depth", "depth"), "event": ("event", "event"),
                   "lidar": ("lidar", "lidar")}
_LABEL_FILES = ("semantic", "semantic")
_RGB_NAME = re.compile(r"^(?P<frame>.+?)_rgb(?P<view>_[^.]+)?\.png$")


@dataclass(frozen=True)
class DeliverConverter(Converter):
    """DELIVER as released (front view or all views)."""

    fmt = "deliver"
    dataset = "DELIVER"
    file_ending = ".png"
    layout = (
        "{img,depth,event,lidar,semantic}/{cloud,fog,night,rain,sun}/{train,val,test}/SCENE/FRAME_{rgb,...}_VIEW.png"
    )
    image_components = {"RGB": 3}
    label_component = 0

    def find_cases(self, source: Path) -> SourceScan:
        rgb_root = source / _MODALITY_FILES["RGB"][0]
        if not rgb_root.is_dir():
            raise DatasetError([Problem("img/ (the RGB folder) is not in the source", file=str(rgb_root),
                                        fix=f"pass the DELIVER folder, laid out as {self.layout}")],
                               context=f"convert {source}")
        cases, notes = [], []
        for rgb in sorted(rgb_root.glob("*/*/*/*.png")):
            m = _RGB_NAME.match(rgb.name)
            if not m:
                continue
            condition, split, scene = rgb.relative_to(rgb_root).parts[:3]
            label = _sibling(source, rgb, *_LABEL_FILES, m)
            cases.append(SourceCase(
                case_id=f"{condition}_{scene}_{m['frame']}{m['view'] or ''}",
                images={mod: (_sibling(source, rgb, folder, token, m),) for mod, (folder, token) in
                        _MODALITY_FILES.items()},
                labels={self.known.reference: label} if label.is_file() else {},
                test=split == "test", official_split=split, attributes={"condition": condition},
            ))
        odd = sorted({c.attributes["condition"] for c in cases} - set(CONDITIONS))
        if odd:
            notes.append(f"condition folder(s) other than {', '.join(CONDITIONS)}: {', '.join(odd)}")
        return SourceScan.of(cases, notes)

    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        classes = {value + 1: name for name, value in self.known.labels.items()}
        return (LabelEncoding("official", {0: IGNORE_LABEL, 255: IGNORE_LABEL, **classes}),)

    def dataset_extra(self, cases: list[SourceCase]) -> dict[str, Any]:
        return {"conditions": {c.case_id: c.attributes["condition"] for c in cases}}


def _sibling(source: Path, rgb: Path, folder: str, token: str, m: re.Match[str]) -> Path:
    """The file of another modality of the sample at ``rgb``: other top folder, other token."""
    rel = rgb.relative_to(source / _MODALITY_FILES["RGB"][0]).parent
    return source / folder / rel / f"{m['frame']}_{token}{m['view'] or ''}.png"
