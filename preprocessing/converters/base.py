"""What every raw-layout converter shares: a found case, a label encoding, and the converter ABC.

A converter only *describes* a release: where its cases and their modality files are
(:meth:`Converter.find_cases`) and how its label files encode the classes
(:meth:`Converter.label_encodings`). Reading, checking, writing and reporting are the same
for every release and live in :mod:`cmcseg.preprocessing.converters.pipeline`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cmcseg.errors import CmcsegError, Problem
from cmcseg.registry import KNOWN_DATASETS, KnownDataset

#: Label name nnU-Net v2 leaves out of the loss (unlabelled pixels); it must have the highest value.
IGNORE_LABEL = "ignore"


@dataclass(frozen=True)
class SourceCase:
    """One case as it lies in the source release, before conversion.

    ``images`` maps a modality (registry spelling) to the file(s) holding it; several files are
    the components of one image (MCubeS AoLP = sin, cos). Paths may be missing on disk: the
    pipeline checks them, so a missing modality is reported with the file that was expected.
    ``labels`` maps a modality to a label drawn on that modality's grid (MS-CMRSeg ships one
    per sequence); the pipeline keeps the label of the dataset's reference modality.
    ``test`` sends the case to imagesTs/labelsTs; ``official_split`` is recorded as found.
    """

    case_id: str
    images: Mapping[str, tuple[Path, ...]]
    labels: Mapping[str, Path] = field(default_factory=dict)
    test: bool = False
    official_split: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceScan:
    """What :meth:`Converter.find_cases` found: the cases, and notes for the report (e.g. files ignored)."""

    cases: list[SourceCase]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cases: Iterable[SourceCase], notes: Iterable[str] = ()) -> SourceScan:
        """The cases sorted by id (a stable order for the progress bar and the report)."""
        return cls(sorted(cases, key=lambda c: c.case_id), list(notes))


@dataclass(frozen=True)
class LabelEncoding:
    """How a release writes its classes: original voxel value -> label name.

    Several values may share a name (DELIVER writes "unlabelled" as 0 or 255); the first one
    listed is the value recorded in dataset.json ``original_label_values``.
    """

    name: str
    values: Mapping[int, str]

    def fits(self, found: Iterable[int]) -> bool:
        """True when every value found in a label file belongs to this encoding."""
        return set(found) <= set(self.values)

    def original_label_values(self) -> dict[str, int]:
        """Label name -> the value written in the release (first value listed per name)."""
        out: dict[str, int] = {}
        for value, label in self.values.items():
            out.setdefault(label, int(value))
        return out

    def describe(self) -> str:
        return f"{self.name} ({', '.join(f'{v} {n}' for v, n in sorted(self.values.items()))})"


def identity_encoding(labels: Mapping[str, int], name: str = "official") -> LabelEncoding:
    """The encoding of a release whose values already are the registry's consecutive labels."""
    return LabelEncoding(name, {int(v): k for k, v in labels.items()})


class ConversionProblem(CmcsegError):
    """One problem with one case or file; the pipeline collects them and raises a DatasetError."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(str(problem))


class Converter(ABC):
    """Describes one release layout. Subclasses are frozen dataclasses whose fields are options.

    Class attributes a subclass sets:

    * ``fmt``: the name users pass to ``cmcseg convert --from``;
    * ``dataset``: its entry in :data:`cmcseg.registry.KNOWN_DATASETS` (modalities, labels, ...);
    * ``file_ending``: the ending of every file written (one per dataset);
    * ``layout``: a one-line description of the expected source layout, quoted in errors;
    * ``image_components``: modality -> number of components kept (RGB: 3, dropping alpha);
    * ``label_component``: which component of a multi-component label file holds the class.
    """

    fmt: ClassVar[str]
    dataset: ClassVar[str]
    file_ending: ClassVar[str] = ".nii.gz"
    layout: ClassVar[str] = ""
    image_components: ClassVar[Mapping[str, int]] = {}
    label_component: ClassVar[int | None] = None

    @property
    def known(self) -> KnownDataset:
        return KNOWN_DATASETS[self.dataset]

    @abstractmethod
    def find_cases(self, source: Path) -> SourceScan:
        """Find the cases under ``source``; raise DatasetError listing every layout problem."""

    @abstractmethod
    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        """Encodings a label file of this release may use, preferred first (usually one)."""

    def dataset_extra(self, cases: list[SourceCase]) -> dict[str, Any]:
        """Extra dataset.json keys of this release (DELIVER: the weather condition of each case)."""
        return {}


def walk_files(source: Path) -> Iterator[Path]:
    """Every regular file under ``source``, in a stable (sorted) order, skipping hidden entries."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts):
            yield path


def top_folder(path: Path, source: Path) -> str:
    """The first folder of ``path`` below ``source`` (the release's split folder), or ""."""
    parts = path.relative_to(source).parts
    return parts[0] if len(parts) > 1 else ""


def duplicate_problem(case_id: str, what: str, paths: Iterable[Path]) -> Problem:
    """The problem of one file of a case found more than once in the source."""
    return Problem(
        f"{what} of the case was found more than once", file=", ".join(str(p) for p in paths), case=case_id,
        fix="keep one copy of the release under the source folder (remove the duplicate or point at a sub-folder)",
    )
