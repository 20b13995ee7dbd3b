"""Converters from the official layouts of the datasets cmcseg was designed for into the raw layout.

``cmcseg convert --from FORMAT SOURCE -d NAME`` calls :func:`convert`. Each format has its own
module that records the official file naming it reads (and where that naming was found);
the shared steps (checks, writing, dataset.json, report) are in :mod:`.pipeline`.

=========  =============  ==================================================================
format     dataset        source
=========  =============  ==================================================================
mscmr      MSCMR          MS-CMRSeg 2019 (official tree, or the LGE-only CycleMix copy)
myops      MYOPS          MyoPS 2020 (official tree, or ``CaseNNNN/`` folders as in myops_dev)
amos       AMOS           AMOS22 (CT and MRI, unpaired)
tao        TAO            cmcseg's own layout for the private TAO orbit MRI data
deliver    DELIVER        DELIVER (2D, ``.png``)
mcubes     MCUBES         MCubeS (2D, ``.nii.gz`` because AoLP/DoLP are floats)
=========  =============  ==================================================================
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cmcseg.errors import CmcsegError
from cmcseg.preprocessing.converters.amos import AmosConverter
from cmcseg.preprocessing.converters.base import Converter, LabelEncoding, SourceCase, SourceScan
from cmcseg.preprocessing.converters.deliver import DeliverConverter
from cmcseg.preprocessing.converters.mcubes import McubesConverter
from cmcseg.preprocessing.converters.mscmr import MscmrConverter
from cmcseg.preprocessing.converters.myops import MyopsConverter
from cmcseg.preprocessing.converters.pipeline import ConversionReport, run_conversion
from cmcseg.preprocessing.converters.tao import TaoConverter

#: Format name -> converter with default options.
CONVERTERS: dict[str, Converter] = {
    c.fmt: c
    for c in (MscmrConverter(), MyopsConverter(), AmosConverter(), TaoConverter(), DeliverConverter(),
              McubesConverter())
}

__all__ = [
    "CONVERTERS", "ConversionReport", "Converter", "LabelEncoding", "SourceCase", "SourceScan", "convert",
    "converter_for",
]


def converter_for(fmt: str, **options: Any) -> Converter:
    """The converter of ``fmt`` with ``options`` set (e.g. ``label_encoding="cyclemix"`` for mscmr)."""
    converter = CONVERTERS.get(fmt.lower())
    if converter is None:
        raise CmcsegError(f"unknown source format {fmt!r}. Fix: use one of {', '.join(sorted(CONVERTERS))}.")
    if not options:
        return converter
    allowed = [f.name for f in dataclasses.fields(converter)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CmcsegError(f"format '{fmt}' has no option(s) {', '.join(unknown)}. Fix: use "
                          + (", ".join(allowed) if allowed else "no options") + ".")
    return dataclasses.replace(converter, **options)  # type: ignore[type-var]


def convert(fmt: str, source: Path, out_folder: Path, name: str, overwrite: bool = False,
            **options: Any) -> ConversionReport:
    """Convert the ``fmt`` release at ``source`` into the raw dataset folder ``out_folder``.

    ``options`` are the converter's own (mscmr: ``label_encoding``; amos: ``mri_first_id``).
    Raises CmcsegError/DatasetError naming every problem; writes nothing unless it succeeds.
    """
    return run_conversion(converter_for(fmt, **options), source, out_folder, name, overwrite)
