"""AMOS22 (abdominal multi-organ, CT and MRI from different patients) -> raw dataset ``AMOS``.

Official naming (amos22.grand-challenge.org; zenodo.org/record/7262581, ``amos22.zip``), an
nnU-Net v1-style tree without channel suffixes::

    dataset.json
    imagesTr/amos_XXXX.nii.gz   labelsTr/amos_XXXX.nii.gz
    imagesVa/amos_XXXX.nii.gz   labelsVa/amos_XXXX.nii.gz
    imagesTs/amos_XXXX.nii.gz   (no labels)

Labels 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
7 stomach, 8 aorta, 9 postcava (IVC), 10 pancreas, 11 right adrenal gland, 12 left adrenal
gland, 13 duodenum, 14 bladder, 15 prostate/uterus (already consecutive).

The modality is given by the id: 500 CT and 100 MRI scans, ``amos_0001``-``amos_0500`` CT and
``amos_0501``-``amos_0600`` MRI. Sources: nnU-Net's own AMOS conversion
(``nnunetv2/dataset_conversion/Dataset218_Amos2022_task1.py`` keeps test ids ``<= 500`` as CT);
the tree as listed in openmedlab/Awesome-Medical-Dataset ``resources/AMOS.md`` and
qiumuyang/PLDG ``AbdomenPrepare/data/raw/amos/README.md``. The AMOS readme's "ids smaller than
500 are CT" is off by one against its own "500 CT": ``mri_first_id`` (default 501) sets it.

What this converter does: writes an *unpaired* dataset (``pairing: "unpaired"``): each case
holds one file, ``_0000`` for CT and ``_0001`` for MRI (channels = the modalities present, in
registry order). ``imagesTr`` and ``imagesVa`` are training cases (as nnU-Net does: AMOS gives
no rule for its validation set); an image without a label is an unlabeled training case;
``imagesTs`` goes to imagesTs. Images are copied byte for byte.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cmcseg.errors import DatasetError, Problem
from cmcseg.preprocessing.converters.base import (
    Converter,
    LabelEncoding,
    SourceCase,
    SourceScan,
    duplicate_problem,
    identity_encoding,
)

_AMOS_FILE = re.compile(r"^(?P<case>amos_(?P<id>\d+))\.nii\.gz$")
#: (image folder, label folder, is the test split)
_SPLITS = (("imagesTr", "labelsTr", False), ("imagesVa", "labelsVa", False), ("imagesTs", "labelsTs", True))


@dataclass(frozen=True)
class AmosConverter(Converter):
    """AMOS22 as released. ``mri_first_id``: the smallest id that is an MRI scan."""

    mri_first_id: int = 501

    fmt = "amos"
    dataset = "AMOS"
    layout = "imagesTr/amos_XXXX.nii.gz + labelsTr/, imagesVa/ + labelsVa/, imagesTs/ (CT ids <= 500, MRI above)"

    def modality_of(self, amos_id: int) -> str:
        return "CT" if amos_id < self.mri_first_id else "MRI"

    def find_cases(self, source: Path) -> SourceScan:
        if not any((source / images).is_dir() for images, _, _ in _SPLITS):
            raise DatasetError([Problem(
                "none of imagesTr/, imagesVa/, imagesTs/ is in the source", file=str(source),
                fix="pass the folder that holds the AMOS22 release's imagesTr/ (unzipped amos22.zip)",
            )], context=f"convert {source}")
        found: dict[str, list[SourceCase]] = {}
        for images, labels, test in _SPLITS:
            for path in sorted((source / images).glob("amos_*.nii.gz")):
                m = _AMOS_FILE.match(path.name)
                if not m:
                    continue
                label = source / labels / path.name
                found.setdefault(m["case"], []).append(SourceCase(
                    case_id=m["case"], images={self.modality_of(int(m["id"])): (path,)},
                    labels={self.modality_of(int(m["id"])): label} if label.is_file() else {},
                    test=test, official_split=images,
                ))
        problems = [
            duplicate_problem(cid, "the image", [p for c in copies for paths in c.images.values() for p in paths])
            for cid, copies in sorted(found.items()) if len(copies) > 1
        ]
        if problems:
            raise DatasetError(problems, context=f"convert {source}")
        return SourceScan.of(copies[0] for copies in found.values())

    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        return (identity_encoding(self.known.labels),)
