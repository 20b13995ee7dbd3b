"""MCubeS (multimodal material segmentation: RGB, AoLP, DoLP, NIR; 20 materials; 2D) -> raw dataset ``MCUBES``.

Official naming (github.com/kyotovision-public/multimodal-material-segmentation, README and
``dataloaders/datasets/multimodal_dataset.py``; the same names in jamycheung/DELIVER
``semseg/datasets/mcubes.py``)::

    multimodal_dataset/
        polL_color/NAME.png          RGB (8 or 16 bit)
        polL_aolp_sin/NAME.npy       sin of the angle of linear polarisation
        polL_aolp_cos/NAME.npy       cos of the angle of linear polarisation
        polL_dolp/NAME.npy           degree of linear polarisation
        NIR_warped/NAME.png          near infrared, warped onto the RGB view
        NIR_warped_mask/NAME.png     invalid NIR region (not converted)
        GT/NAME.png                  material class 0..19, 255 = unlabelled (ignore index)
        SS/, SSGT4MS/                Cityscapes-style semantics (not converted)
        list_folder/{all,train,val,test}.txt   one NAME per line

Class order (0..19): asphalt, concrete, metal, road_marking, fabric, glass, plaster, plastic,
rubber, sand, gravel, ceramic, cobblestone, brick, grass, wood, leaf, water, human, sky.

What this converter does:

* one case per NAME; ``train`` and ``val`` are training cases, ``test`` goes to imagesTs with
  labels in labelsTs (the official benchmark split stays held out). Without ``list_folder``
  every ``polL_color`` image is a training case;
* AoLP is one 2-component float image (sin, cos), as the official loader stacks it; DoLP a
  1-component float image. PNG cannot hold floats, so the whole dataset is written as 2D
  ``.nii.gz`` (``file_ending`` ".nii.gz", dimensionality 2d): RGB stays 3 components, NIR
  keeps its bit depth. The .npy arrays get the PNGs' geometry (spacing 1, origin 0);
* nothing is cropped or resized (the loaders' 192-pixel left crop is a training choice);
* 255 becomes the label ``"ignore"`` (value 20); classes keep the registry values 0..19.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmcseg.errors import DatasetError, Problem
from cmcseg.preprocessing.converters.base import (
    IGNORE_LABEL,
    Converter,
    LabelEncoding,
    SourceCase,
    SourceScan,
)

#: Registry modality -> the (folder, extension) of each of its component files.
_MODALITY_FILES = {
    "RGB": (("polL_color", ".png"),),
    "AoLP": (("polL_aolp_sin", ".npy"), ("polL_aolp_cos", ".npy")),
    "DoLP": (("polL_dolp", ".npy"),),
    "NIR": (("NIR_warped", ".png"),),
}
_LABEL_FOLDER = "GT"
#: Official split list -> goes to imagesTs.
_SPLITS = {"train": False, "val": False, "test": True}


@dataclass(frozen=True)
class McubesConverter(Converter):
    """MCubeS ``multimodal_dataset`` as released."""

    fmt = "mcubes"
    dataset = "MCUBES"
    layout = ("polL_color/NAME.png, polL_aolp_{sin,cos}/NAME.npy, polL_dolp/NAME.npy, NIR_warped/NAME.png, "
              "GT/NAME.png and list_folder/{train,val,test}.txt")
    image_components = {"RGB": 3}

    def find_cases(self, source: Path) -> SourceScan:
        if not (source / "polL_color").is_dir():
            raise DatasetError([Problem("polL_color/ (the RGB folder) is not in the source",
                                        file=str(source / "polL_color"),
                                        fix=f"pass the multimodal_dataset folder, laid out as {self.layout}")],
                               context=f"convert {source}")
        splits, notes = self._split_lists(source)
        cases = [
            SourceCase(
                case_id=name,
                images={m: tuple(source / folder / f"{name}{ext}" for folder, ext in files)
                        for m, files in _MODALITY_FILES.items()},
                labels=_label(source, name, self.known.reference),
                test=_SPLITS.get(split, False), official_split=split,
            )
            for name, split in splits.items()
        ]
        return SourceScan.of(cases, notes)

    def _split_lists(self, source: Path) -> tuple[dict[str, str], list[str]]:
        """NAME -> official split, from list_folder (or every polL_color image when it is absent)."""
        lists = {split: source / "list_folder" / f"{split}.txt" for split in _SPLITS}
        if not any(path.is_file() for path in lists.values()):
            names = {p.stem: "" for p in sorted((source / "polL_color").glob("*.png"))}
            return names, ["no list_folder/{train,val,test}.txt: every polL_color image is a training case"]
        splits: dict[str, str] = {}
        problems = []
        for split, path in lists.items():
            lines = path.read_text().splitlines() if path.is_file() else []
            for name in (line.split()[0] for line in lines if line.strip()):
                if name in splits:
                    problems.append(Problem(f"{name} is listed in both {splits[name]}.txt and {split}.txt",
                                            file=str(path), case=name, fix="list every image in one split only"))
                splits.setdefault(name, split)
        if problems:
            raise DatasetError(problems, context=f"convert {source}")
        return splits, []

    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        classes = {value: name for name, value in self.known.labels.items()}
        return (LabelEncoding("official", {**classes, 255: IGNORE_LABEL}),)


def _label(source: Path, name: str, modality: str) -> dict[str, Path]:
    path = source / _LABEL_FOLDER / f"{name}.png"
    return {modality: path} if path.is_file() else {}
