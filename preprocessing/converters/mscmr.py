"""MS-CMRSeg 2019 (multi-sequence cardiac MR: bSSFP/C0, LGE, T2) -> raw dataset ``MSCMR``.

Official naming, as the challenge released it (zmiclab.github.io/zxh/0/mscmrseg19)::

    C0LET2_nii45_for_challenge19/
        c0t2lge/patient{1..45}_{C0,LGE,T2}.nii.gz     images of all 45 patients
        c0gt/patient{N}_C0_manual.nii.gz               C0 labels (patients 1-35)
        t2gt/patient{N}_T2_manual.nii.gz               T2 labels (patients 1-35)
        lgegt/patient{N}_LGE_manual.nii.gz             LGE labels (patients 1-5)
    C0LET2_gt_for_challenge19/                         released after the challenge
        LGE_manual_35_TestData/patient{N}_LGE_manual.nii.gz   (patients 6-45)
        C0_manual_10/, T2_manual_10/                           (patients 36-45)

Label values 200 = LV myocardium, 500 = LV blood pool, 600 = RV blood pool.

Sources: the folder tree and file names are quoted in the README of the code of "Gradient-Map-
Guided Adaptive Domain Generalization for Cross Modality MRI Segmentation" (Li et al.,
arXiv 2311.09737) and used by MS-CMR 2019 participants' scripts (``c0t2lge/patient`` +
``_LGE.nii.gz``, ``lgegt/patient`` + ``_LGE_manual.nii.gz``, ``_C0_manual.nii.gz``,
``_T2_manual.nii.gz``), found with code search; the values 200/500/600 are the ones the
organisers give for MyoPS 2020, which reuses them.

The CycleMix copy (github.com/BWGZK/CycleMix, ``MSCMR_dataset/``, the copy in
``shared/data/mscmr_lge``) holds LGE only::

    {train,val,TestSet}/images/subject{N}_DE.nii.gz
    {val,TestSet}/labels/subject{N}_DE_manual.nii.gz     1 = RV, 2 = myocardium, 3 = LV
    train/labels/subject{N}_DE_scribble.nii.gz           scribbles (not converted)

(encoding from CycleMix ``inference.py``: ``structures_dict = {1: 'RV', 2: 'Myo', 3: 'LV'}``).

What this converter does:

* files are found anywhere under the source by name (``patient`` or ``subject`` + number,
  sequence ``C0``/``LGE``/``DE``/``T2``), so both trees above convert;
* each sequence keeps its own grid; a case's label is the label of the reference
  modality (LGE) because every sequence has its own label on its own grid. C0/T2 labels
  are reported as not used; if the source has no LGE at all, the first present sequence is
  the reference and its labels are used;
* only the sequences present are written (LGE only for the CycleMix copy), in registry order;
* every case is a training case (the release has no test folder; CycleMix's ``val`` and
  ``TestSet`` are its own splits, recorded in dataset.json ``official_split``); a case
  without an LGE label is an unlabeled training case; scribbles are ignored;
* the label encoding is detected from the values in the files (official 200/500/600 or
  CycleMix 1/2/3; all files must agree) unless ``label_encoding`` names one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cmcseg.errors import CmcsegError
from cmcseg.preprocessing.converters.base import LabelEncoding
from cmcseg.preprocessing.converters.cardiac import NamedSequenceConverter

OFFICIAL = LabelEncoding("official", {0: "background", 200: "myocardium", 500: "LV", 600: "RV"})
CYCLEMIX = LabelEncoding("cyclemix", {0: "background", 1: "RV", 2: "myocardium", 3: "LV"})
ENCODINGS = {e.name: e for e in (OFFICIAL, CYCLEMIX)}

_CASE = r"(?P<case>(?:patient|subject)\d+)_(?P<seq>C0|LGE|DE|T2)"


@dataclass(frozen=True)
class MscmrConverter(NamedSequenceConverter):
    """MS-CMRSeg 2019, official tree or CycleMix copy. ``label_encoding``: "official", "cyclemix" or None (detect)."""

    label_encoding: str | None = None

    fmt = "mscmr"
    dataset = "MSCMR"
    layout = ("patientN_{C0,LGE,T2}.nii.gz with *_manual.nii.gz labels (official), or "
              "{val,TestSet}/images/subjectN_DE.nii.gz with labels/subjectN_DE_manual.nii.gz (CycleMix)")
    image_pattern = re.compile(rf"^{_CASE}\.nii(?:\.gz)?$")
    label_pattern = re.compile(rf"^{_CASE}_manual\.nii(?:\.gz)?$")
    ignored_pattern = re.compile(rf"^{_CASE}_scribble\.nii(?:\.gz)?$")
    ignored_what = "scribble label (*_scribble.nii.gz, not full labels; their cases stay unlabeled)"

    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        if self.label_encoding is None:
            return (OFFICIAL, CYCLEMIX)
        if self.label_encoding not in ENCODINGS:
            raise CmcsegError(f"unknown MS-CMRSeg label encoding {self.label_encoding!r}. Fix: use one of "
                              f"{', '.join(ENCODINGS)} or leave it out to detect it from the label values.")
        return (ENCODINGS[self.label_encoding],)
