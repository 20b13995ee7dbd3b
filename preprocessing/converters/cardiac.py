"""Shared reader for cardiac MRI releases that name files ``<case>_<sequence>[_<label kind>].nii.gz``.

MS-CMRSeg 2019 and MyoPS 2020 (both from the Zhuang lab, Fudan) name each file by case and
sequence token: ``C0`` is bSSFP cine, ``LGE`` or ``DE`` late gadolinium enhancement, ``T2``
T2-weighted. The files are found anywhere below the source folder, so the official folder
tree and the re-packaged copies (CycleMix) are read alike. The differences between the two
releases (file name patterns, which labels exist, which cases are test cases, label values)
are the class attributes of :mod:`.mscmr` and :mod:`.myops`.
"""
from __future__ import annotations

import re
from abc import ABC
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from cmcseg.errors import DatasetError, Problem
from cmcseg.preprocessing.converters.base import (
    Converter,
    SourceCase,
    SourceScan,
    duplicate_problem,
    top_folder,
    walk_files,
)

#: Sequence token in a file name -> registry modality.
SEQUENCE_MODALITY: Mapping[str, str] = {"C0": "bSSFP", "LGE": "LGE", "DE": "LGE", "T2": "T2"}

_Found = dict[str, dict[str, list[Path]]]  # case -> modality -> files


class NamedSequenceConverter(Converter, ABC):
    """A release whose files are named ``<case>_<sequence>...``; subclasses give the patterns.

    * ``image_pattern`` matches image names; groups ``case`` and ``seq``.
    * ``label_pattern`` matches label names; group ``case`` and, when each sequence has its own
      label on its own grid, ``seq``. Without ``seq`` one label serves every (co-registered) sequence.
    * ``ignored_pattern`` matches files of the release that are deliberately not converted,
      described by ``ignored_what`` in the report.
    * ``default_tokens`` names the file a missing sequence was expected at (see :meth:`sequence_token`).
    """

    image_pattern: ClassVar[re.Pattern[str]]
    label_pattern: ClassVar[re.Pattern[str]]
    ignored_pattern: ClassVar[re.Pattern[str] | None] = None
    ignored_what: ClassVar[str] = ""
    default_tokens: ClassVar[Mapping[str, str]] = {"bSSFP": "C0", "LGE": "LGE", "T2": "T2"}

    def is_test(self, case_id: str) -> bool:
        """Whether a case belongs to the release's test split (goes to imagesTs)."""
        return False

    def sequence_token(self, case_id: str, modality: str) -> str:
        """The sequence token of a file name a missing ``modality`` of ``case_id`` was expected under."""
        return self.default_tokens[modality]

    def find_cases(self, source: Path) -> SourceScan:
        images: _Found = defaultdict(lambda: defaultdict(list))
        labels: _Found = defaultdict(lambda: defaultdict(list))
        ignored: list[Path] = []
        for path in walk_files(source):
            if m := self.image_pattern.match(path.name):
                images[m["case"]][SEQUENCE_MODALITY[m["seq"]]].append(path)
            elif m := self.label_pattern.match(path.name):
                seq = m.groupdict().get("seq")
                for modality in (SEQUENCE_MODALITY[seq],) if seq else self.known.modalities:
                    labels[m["case"]][modality].append(path)
            elif self.ignored_pattern is not None and self.ignored_pattern.match(path.name):
                ignored.append(path)
        problems = _duplicates(images, "image") + _duplicates(labels, "label") + _orphan_labels(images, labels)
        if problems:
            raise DatasetError(problems, context=f"convert {source}")
        cases = [self._case(cid, images[cid], labels.get(cid, {}), source) for cid in images]
        notes = [f"ignored {len(ignored)} {self.ignored_what} file(s)"] if ignored else []
        return SourceScan.of(cases, notes)

    def _case(self, case_id: str, images: dict[str, list[Path]], labels: dict[str, list[Path]],
              source: Path) -> SourceCase:
        example = next(iter(images.values()))[0]
        return SourceCase(
            case_id=case_id,
            images={m: (images[m][0],) if images.get(m) else (self._expected(example, m),)
                    for m in self.known.modalities},
            labels={m: paths[0] for m, paths in labels.items()},
            test=self.is_test(case_id),
            official_split=top_folder(example, source),
        )

    def _expected(self, example: Path, modality: str) -> Path:
        """Where a sequence missing from a case would be: beside a sequence it has, same naming style."""
        m = self.image_pattern.match(example.name)
        assert m is not None
        token = self.sequence_token(m["case"], modality)
        return example.with_name(example.name[: m.start("seq")] + token + example.name[m.end("seq"):])


def _duplicates(found: _Found, what: str) -> list[Problem]:
    return [
        duplicate_problem(cid, f"the {modality} {what}", paths)
        for cid, by_modality in sorted(found.items())
        for modality, paths in sorted(by_modality.items())
        if len(set(paths)) > 1
    ]


def _orphan_labels(images: _Found, labels: _Found) -> list[Problem]:
    return [
        Problem("label has no image of its case", file=str(next(iter(by_modality.values()))[0]), case=cid,
                fix="add the case's images, or remove the label from the source")
        for cid, by_modality in sorted(labels.items())
        if cid not in images
    ]
