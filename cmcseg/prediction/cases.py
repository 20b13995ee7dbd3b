"""Finding the cases of an input folder for ``cmcseg predict``.

Two namings are understood, tried in this order:

1. **nnU-Net naming**: ``CASE_XXXX<ext>``, one file per case and channel ``XXXX``, in any format
   SimpleITK reads (``.nii.gz``, ``.nrrd``, ``.mha``, ``.png``, ...), directly in the folder.
2. **the dataset's native naming**, read by the dataset's converter from
   :mod:`cmcseg.preprocessing.converters` (the format recorded in dataset.json ``conversion``, else
   the registry's converter of the dataset name): e.g. MS-CMRSeg ``patientN_{C0,LGE,T2}.nii.gz`` or
   the CycleMix ``subjectN_DE.nii.gz``, anywhere below the folder. Sequences the model was not
   trained on are ignored (an LGE-only model reads the LGE file of a full MS-CMRSeg case).

Nothing here reads pixels; the preprocessor reads (and checks) the files case by case.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cmcseg.errors import CmcsegError
from cmcseg.image_io import case_id_of
from cmcseg.registry import known_dataset

log = logging.getLogger(__name__)

NNUNET_NAMING = "nnunet"
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its image file per channel, and how its files were named."""

    case_id: str
    images: Mapping[int, Path]
    naming: str = NNUNET_NAMING

    @property
    def channels(self) -> list[int]:
        return sorted(self.images)

    def missing(self, channels: Sequence[int]) -> list[int]:
        """The channels of ``channels`` this case has no file for."""
        return [c for c in channels if c not in self.images]

    @property
    def files(self) -> list[Path]:
        return [self.images[c] for c in self.channels]


def find_nnunet_cases(folder: Path) -> list[InputCase]:
    """Cases named ``CASE_XXXX<ext>`` directly in ``folder`` (every channel index found, known or not)."""
    found: dict[str, dict[int, Path]] = {}
    problems: list[str] = []
    for path in sorted(folder.iterdir()):
        stem = case_id_of(path) if path.is_file() else None  # the name without its image extension
        match = _CHANNEL_RE.match(stem) if stem else None
        if match is None:
            continue
        case_id, channel = match["case"], int(match["channel"])
        channels = found.setdefault(case_id, {})
        if channel in channels:
            problems.append(f"case {case_id}: channel {channel:04d} twice ({channels[channel].name}, {path.name})")
            continue
        channels[channel] = path
    if problems:
        raise CmcsegError("the input folder holds more than one file for a case's channel:\n  "
                          + "\n  ".join(problems) + "\nFix: keep one file per case and channel.")
    return [InputCase(case_id, dict(sorted(images.items()))) for case_id, images in sorted(found.items())]


def native_format(dataset_json: Mapping) -> str | None:
    """The converter format of a dataset: dataset.json ``conversion.format``, else the registry's for its name."""
    conversion = dataset_json.get("conversion")
    if isinstance(conversion, Mapping) and conversion.get("format"):
        return str(conversion["format"])
    known = known_dataset(str(dataset_json.get("name", "")))
    return known.converter if known is not None and known.converter else None


def find_native_cases(folder: Path, fmt: str, channel_names: Mapping[int, str]) -> list[InputCase]:
    """Cases in the native naming of converter ``fmt``, mapped onto the model's channels by modality name."""
    from cmcseg.preprocessing.converters import converter_for  # the converters load only when needed

    scan = converter_for(fmt).find_cases(folder)
    by_name = {name.lower(): channel for channel, name in channel_names.items()}
    cases = []
    for source in scan.cases:
        images: dict[int, Path] = {}
        ignored = []
        for modality, paths in source.images.items():
            existing = [Path(p) for p in paths if Path(p).is_file()]
            channel = by_name.get(modality.lower())
            if not existing:
                continue
            if channel is None:
                ignored.append(f"{modality} ({existing[0].name}: the model has no {modality} channel)")
                continue
            if len(existing) != 1:
                raise CmcsegError(f"case {source.case_id}: {modality} is stored in {len(existing)} files "
                                  f"({', '.join(p.name for p in existing)}); cmcseg predict reads one file per "
                                  "modality. Fix: convert the case with `cmcseg convert` and predict the imagesTs "
                                  "folder it writes.")
            images[channel] = existing[0]
        if ignored:
            log.info("case %s: ignored %s", source.case_id, "; ".join(ignored))
        if images:
            cases.append(InputCase(source.case_id, dict(sorted(images.items())), f"native:{fmt}"))
    return cases


def find_input_cases(folder: Path | str, channel_names: Mapping[int, str],
                     dataset_json: Mapping | None = None) -> list[InputCase]:
    """The cases of ``folder``: nnU-Net naming if any file has it, else the dataset's native naming.

    Raises CmcsegError when the folder does not exist or holds no case in either naming.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CmcsegError(f"input folder {folder} does not exist. Fix: pass the folder that holds the images (-i).")
    cases = find_nnunet_cases(folder)
    if cases:
        return cases
    fmt = native_format(dataset_json or {})
    if fmt is not None:
        cases = find_native_cases(folder, fmt, channel_names)
        if cases:
            log.info("%d case(s) found in %s by the %s naming", len(cases), folder, fmt)
            return cases
    native = f" or the {fmt} naming of the dataset" if fmt else ""
    example = "".join(f" CASE_{c:04d}.nii.gz ({n})" for c, n in sorted(channel_names.items()))
    raise CmcsegError(f"no case found in {folder}: no file named CASE_XXXX.<ext> (nnU-Net naming){native}. "
                      f"Fix: name the files per case and channel, e.g.{example}.")
