"""Known-dataset registry: what cmcseg knows about the datasets it was designed for.

Each entry gives the modalities (channel order), the reference modality, the labels (as
consecutive integers, with the values of the official release), the pairing, the
dimensionality, and the name of the converter that reads the official layout
(``cmcseg convert --from FORMAT``).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KnownDataset:
    """A dataset cmcseg knows by name."""

    name: str
    dataset_id: int
    modalities: tuple[str, ...]
    reference: str
    labels: dict[str, int]
    original_label_values: dict[str, int] = field(default_factory=dict)
    pairing: str = "paired"  # "paired" | "unpaired"
    dimensionality: str = "3d"  # "3d" | "2d"
    converter: str = ""
    description: str = ""

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    def channel_names(self) -> dict[str, str]:
        return {str(i): m for i, m in enumerate(self.modalities)}


_CARDIAC = {"background": 0, "myocardium": 1, "LV": 2, "RV": 3}
_CARDIAC_ORIGINAL = {"background": 0, "myocardium": 200, "LV": 500, "RV": 600}

_AMOS_ORGANS = (
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "postcava", "pancreas", "right_adrenal_gland", "left_adrenal_gland", "duodenum", "bladder",
    "prostate_uterus",
)

_DELIVER_CLASSES = (
    "Building", "Fence", "Other", "Pedestrian", "Pole", "RoadLine", "Road", "SideWalk", "Vegetation",
    "Cars", "Wall", "TrafficSign", "Sky", "Ground", "Bridge", "RailTrack", "GroundRail", "TrafficLight",
    "Static", "Dynamic", "Water", "Terrain", "TwoWheeler", "Bus", "Truck",
)

_MCUBES_CLASSES = (
    "asphalt", "concrete", "metal", "road_marking", "fabric", "glass", "plaster", "plastic", "rubber",
    "sand", "gravel", "ceramic", "cobblestone", "brick", "grass", "wood", "leaf", "water", "human", "sky",
)


def _consecutive(names) -> dict[str, int]:
    return {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}


KNOWN_DATASETS: dict[str, KnownDataset] = {
    d.name: d
    for d in (
        KnownDataset(
            "MSCMR", 501, ("bSSFP", "LGE", "T2"), "LGE", dict(_CARDIAC), dict(_CARDIAC_ORIGINAL),
            converter="mscmr", description="MS-CMRSeg 2019 multi-sequence cardiac MRI (bSSFP/C0, LGE/DE, T2)",
        ),
        KnownDataset(
            "MYOPS", 502, ("bSSFP", "LGE", "T2"), "LGE",
            {**_CARDIAC, "edema": 4, "scar": 5}, {**_CARDIAC_ORIGINAL, "edema": 1220, "scar": 2221},
            converter="myops", description="MyoPS 2020 myocardial pathology segmentation (C0, DE, T2)",
        ),
        KnownDataset(
            "AMOS", 503, ("CT", "MRI"), "CT", _consecutive(_AMOS_ORGANS), pairing="unpaired",
            converter="amos", description="AMOS22 abdominal organs, CT (ids < 500) and MRI (ids >= 500), unpaired",
        ),
        KnownDataset(
            "TAO", 504, ("T1", "T1c"), "T1",
            _consecutive(("eyeball", "optic_nerve", "extraocular_muscle", "orbital_fat")),
            converter="tao", description="thyroid-associated ophthalmopathy orbit MRI, paired T1/T1c (private)",
        ),
        KnownDataset(
            "DELIVER", 505, ("RGB", "depth", "event", "lidar"), "RGB", {n: i for i, n in enumerate(_DELIVER_CLASSES)},
            dimensionality="2d", converter="deliver",
            description="DELIVER driving scenes (CARLA), RGB/depth/event/LiDAR, 25 classes",
        ),
        KnownDataset(
            "MCUBES", 506, ("RGB", "AoLP", "DoLP", "NIR"), "RGB", {n: i for i, n in enumerate(_MCUBES_CLASSES)},
            dimensionality="2d", converter="mcubes",
            description="MCubeS multimodal material segmentation, RGB/AoLP/DoLP/NIR, 20 classes",
        ),
    )
}


def known_dataset(name: str) -> KnownDataset | None:
    """The registry entry for ``name`` (case-insensitive), or None."""
    for key, entry in KNOWN_DATASETS.items():
        if key.lower() == name.lower():
            return entry
    return None
