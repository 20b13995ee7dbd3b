"""TAO (thyroid-associated ophthalmopathy orbit MRI, paired T1/T1c; private) -> raw dataset ``TAO``.

TAO has no public release, so cmcseg defines the layout it reads: one folder per case::

    SOURCE/
        CASE_ID/
            T1.nii.gz        T1-weighted (the reference: the label lies on its grid)
            T1c.nii.gz       contrast-enhanced T1-weighted, on its own grid if need be
            label.nii.gz     optional; 0 background, 1 eyeball, 2 optic nerve,
                             3 extraocular muscle, 4 orbital fat
        ...

File names are matched without regard to letter case, and ``.nii`` is accepted as well as
``.nii.gz``. The folder name is the case id (letters, digits, ``.``, ``_``, ``-``). Every case
is a training case; a case without ``label.nii.gz`` is an unlabeled training case. A case
without T1 or T1c is an error (the dataset is paired). Folders holding none of the three
files are skipped and reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmcseg.preprocessing.converters.base import (
    Converter,
    LabelEncoding,
    SourceCase,
    SourceScan,
    identity_encoding,
)

#: File stem (lower case) -> modality; "label" is the label.
_STEMS = {"t1": "T1", "t1c": "T1c"}
_LABEL_STEM = "label"
_ENDINGS = (".nii.gz", ".nii")


def _stem(path: Path) -> str | None:
    """``T1c.nii.gz`` -> ``t1c``; None for a file that is not NIfTI."""
    name = path.name.lower()
    return next((name[: -len(e)] for e in _ENDINGS if name.endswith(e)), None)


@dataclass(frozen=True)
class TaoConverter(Converter):
    """The cmcseg TAO layout: SOURCE/CASE/{T1,T1c,label}.nii.gz."""

    fmt = "tao"
    dataset = "TAO"
    layout = "SOURCE/CASE/T1.nii.gz, SOURCE/CASE/T1c.nii.gz and optionally SOURCE/CASE/label.nii.gz"

    def find_cases(self, source: Path) -> SourceScan:
        cases, skipped = [], []
        for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = {_stem(p): p for p in sorted(folder.iterdir()) if p.is_file() and _stem(p)}
            if not (set(files) & {*_STEMS, _LABEL_STEM}):
                skipped.append(folder.name)
                continue
            cases.append(SourceCase(
                case_id=folder.name,
                images={m: (files.get(stem, folder / f"{m}.nii.gz"),) for stem, m in _STEMS.items()},
                labels={self.known.reference: files[_LABEL_STEM]} if _LABEL_STEM in files else {},
            ))
        notes = [f"skipped {len(skipped)} folder(s) without T1/T1c/label files: {', '.join(skipped[:5])}"
                 + (" ..." if len(skipped) > 5 else "")] if skipped else []
        return SourceScan.of(cases, notes)

    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        return (identity_encoding(self.known.labels),)
