"""The conversion every release goes through: find, check, write into a staging folder, publish.

1. The source must exist; the output must be empty (or ``overwrite``) and must not overlap it.
2. The converter finds the cases; the modalities present decide the channels (registry order),
   and a paired case missing one of them is an error. Every structural problem is collected
   before anything is written.
3. Cases are written into a hidden staging folder beside the output: images copied or
   re-written without resampling, labels mapped to consecutive values. Problems (unreadable
   files, unknown label values, a label off its image's grid) are collected across cases.
4. dataset.json is written, the staging folder must pass :meth:`Dataset.load`, and only then
   is it renamed into place. A failed conversion leaves nothing behind; the source is only read.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmcseg.dataset import Dataset, image_file, label_file, write_dataset_json
from cmcseg.errors import CmcsegError, DatasetError, ImageReadError, Problem
from cmcseg.image_io import geometry_of, make_folder
from cmcseg.preprocessing.converters.base import (
    IGNORE_LABEL,
    ConversionProblem,
    Converter,
    LabelEncoding,
    SourceCase,
)
from cmcseg.preprocessing.converters.transfer import (
    grid_problems,
    map_label_values,
    read_label_array,
    transfer_image,
    write_label,
)
from cmcseg.registry import KnownDataset

logger = logging.getLogger(__name__)

_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------- report
@dataclass(frozen=True)
class ConversionReport:
    """What a conversion wrote, for the user (``summary``) and for tests."""

    fmt: str
    source: Path
    out_folder: Path
    name: str
    modalities: tuple[str, ...]
    absent_modalities: tuple[str, ...]
    reference_modality: str
    pairing: str
    file_ending: str
    num_training: int
    num_labeled: int
    num_test: int
    num_test_labeled: int
    labels: dict[str, int]
    original_label_values: dict[str, int]
    label_encoding: str
    notes: tuple[str, ...] = ()
    warnings: tuple[Problem, ...] = ()

    @property
    def num_unlabeled(self) -> int:
        return self.num_training - self.num_labeled

    def summary(self) -> str:
        """A short human summary: cases, labeled/unlabeled, modalities, label mapping, where written."""
        channels = ", ".join(
            f"{i} {m}" + (" (reference)" if m == self.reference_modality else "") for i, m in enumerate(self.modalities)
        )
        mapping = ", ".join(
            f"{n} {v}<-{self.original_label_values.get(n, v)}"
            for n, v in sorted(self.labels.items(), key=lambda x: x[1])
        )
        lines = [
            f"converted {self.num_training + self.num_test} case(s) of '{self.fmt}' from {self.source}",
            f"  written to {self.out_folder} (dataset '{self.name}', {self.pairing}, files *{self.file_ending})",
            f"  training cases: {self.num_training} ({self.num_labeled} labeled, {self.num_unlabeled} unlabeled); "
            f"test cases (imagesTs): {self.num_test} ({self.num_test_labeled} with labels in labelsTs)",
            f"  channels: {channels}",
        ]
        if self.absent_modalities:
            lines.append(f"  not in the source, so not written: {', '.join(self.absent_modalities)}")
        lines.append(f"  labels (new<-original, encoding '{self.label_encoding}'): {mapping}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.warnings:
            lines.append(f"  {len(self.warnings)} warning(s):")
            lines += [f"    {w}" for w in self.warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ConversionPlan:
    """The channels to write: the registry's modalities present in the source, in registry order."""

    modalities: tuple[str, ...]
    absent: tuple[str, ...]
    reference: str
    pairing: str
    labels: dict[str, int] = field(default_factory=dict)

    def channel(self, modality: str) -> int:
        return self.modalities.index(modality)

    def modalities_of(self, case: SourceCase) -> tuple[str, ...]:
        """The modalities written for a case: all of them (paired) or the one it has (unpaired)."""
        if self.pairing == "paired":
            return self.modalities
        return tuple(m for m in self.modalities if _exists(case, m))

    def label_modality(self, case: SourceCase) -> str:
        """The modality whose grid a case's label must lie on."""
        return self.reference if self.pairing == "paired" else self.modalities_of(case)[0]


def _exists(case: SourceCase, modality: str) -> bool:
    return any(p.is_file() for p in case.images.get(modality, ()))


def make_plan(known: KnownDataset, cases: list[SourceCase], encodings: tuple[LabelEncoding, ...]) -> ConversionPlan:
    """Decide the channels (modalities present) and the reference modality."""
    present = tuple(m for m in known.modalities if any(_exists(c, m) for c in cases))
    absent = tuple(m for m in known.modalities if m not in present)
    reference = known.reference if known.reference in present else (present[0] if present else known.reference)
    return ConversionPlan(present, absent, reference, known.pairing, target_labels(known, encodings))


def target_labels(known: KnownDataset, encodings: tuple[LabelEncoding, ...]) -> dict[str, int]:
    """The registry's labels, plus names the release uses beyond them ("ignore", given the highest value)."""
    labels = dict(known.labels)
    extra = {n for e in encodings for n in e.values.values()} - set(labels)
    for name in sorted(extra, key=lambda n: (n == IGNORE_LABEL, n)):
        labels[name] = len(labels)
    return labels


def check_encodings_compatible(encodings: tuple[LabelEncoding, ...]) -> None:
    """Encodings that share a value must give it the same name, so that any fitting one maps a file alike."""
    for a in encodings:
        for b in encodings:
            clash = [v for v in set(a.values) & set(b.values) if a.values[v] != b.values[v]]
            if clash:
                raise ValueError(f"label encodings {a.name} and {b.name} disagree on values {sorted(clash)}")


def check_cases(cases: list[SourceCase], plan: ConversionPlan) -> list[Problem]:
    """Structural problems of the found cases: bad or repeated ids, missing modalities (paired), several (unpaired)."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for case in cases:
        cid = case.case_id
        if not _CASE_ID_RE.match(cid):
            problems.append(Problem(
                f"case id {cid!r} cannot be a file name prefix", case=cid,
                fix="case ids may use letters, digits, '.', '_' and '-' only; rename the case in the source",
            ))
        if cid.lower() in seen:
            problems.append(Problem(f"case id {cid!r} occurs twice (also as {seen[cid.lower()]!r})", case=cid,
                                    fix="give every case its own id (folder or file name) in the source"))
        seen.setdefault(cid.lower(), cid)
        if plan.pairing == "paired":
            problems += _missing_files(case, plan.modalities)
        elif len(plan.modalities_of(case)) != 1:
            problems.append(Problem(
                f"an unpaired case must hold exactly one modality, found {list(plan.modalities_of(case))}", case=cid,
                file=", ".join(str(p) for m in plan.modalities_of(case) for p in case.images[m]),
                fix="give each scan its own case id",
            ))
    return problems


def _missing_files(case: SourceCase, modalities: tuple[str, ...]) -> list[Problem]:
    """A paired case needs every modality present in the source; name each file that is not there."""
    return [
        Problem(
            f"{modality} image is missing (the dataset is paired: every case needs every modality present "
            f"in the source)", file=str(path) if path else "", case=case.case_id,
            fix=f"add the {modality} file, or remove this case from the source",
        )
        for modality in modalities
        for path in case.images.get(modality) or (None,)
        if path is None or not path.is_file()
    ]


# ---------------------------------------------------------------------- label encoding
class EncodingChoice:
    """Maps each label file with an encoding it fits, and checks at the end that all files agree on one."""

    def __init__(self, fmt: str, candidates: tuple[LabelEncoding, ...], labels: dict[str, int]):
        check_encodings_compatible(candidates)
        self.fmt, self.candidates, self.labels = fmt, candidates, labels
        self.fits: list[tuple[Path, set[str]]] = []

    def map(self, array: np.ndarray, path: Path, case: str) -> np.ndarray:
        found = [int(v) for v in np.unique(array)]
        fitting = [e for e in self.candidates if e.fits(found)]
        if not fitting:
            known = set().union(*(e.values for e in self.candidates))
            raise ConversionProblem(Problem(
                f"unknown label values {sorted(set(found) - known)} (values in the file: {found})",
                file=str(path), case=case,
                fix=f"a '{self.fmt}' label uses the values of "
                    + " or ".join(e.describe() for e in self.candidates)
                    + "; check that the file is a label of this release",
            ))
        self.fits.append((path, {e.name for e in fitting}))
        return map_label_values(array, fitting[0], self.labels)

    def chosen(self) -> tuple[LabelEncoding, list[Problem]]:
        """The encoding every label file fits (preferred first); a problem if the files disagree."""
        common = {e.name for e in self.candidates}
        for _, names in self.fits:
            common &= names
        for encoding in self.candidates:
            if encoding.name in common:
                return encoding, []
        by_encoding = {
            e.name: [str(p) for p, names in self.fits if names == {e.name}][:3] for e in self.candidates
        }
        return self.candidates[0], [Problem(
            "label files use different encodings: "
            + "; ".join(f"{n}: {', '.join(files)}" for n, files in by_encoding.items() if files),
            fix="convert the files of one encoding at a time, or re-encode the odd ones",
        )]


# ---------------------------------------------------------------------- writing
@dataclass
class _Tally:
    training: int = 0
    labeled: int = 0
    test: int = 0
    test_labeled: int = 0
    warnings: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _write_case(conv: Converter, case: SourceCase, plan: ConversionPlan, stage: Path, choice: EncodingChoice,
                tally: _Tally) -> None:
    """Write one case's images and label into the staging folder; count it."""
    split = "Ts" if case.test else "Tr"
    geometry = {
        modality: transfer_image(
            case.images[modality], image_file(stage, case.case_id, plan.channel(modality), conv.file_ending, split),
            case.case_id, conv.image_components.get(modality),
        )
        for modality in plan.modalities_of(case)
    }
    label_modality = plan.label_modality(case)
    label_path = case.labels.get(label_modality)
    if label_path is not None:
        array, image = read_label_array(label_path, case.case_id, conv.label_component)
        found = grid_problems(geometry_of(image), geometry[label_modality], label_path, label_modality, case.case_id)
        errors = [p for p in found if p.severity == "error"]
        if errors:
            raise ConversionProblem(errors[0])
        tally.warnings += found
        write_label(choice.map(array, label_path, case.case_id), image,
                    label_file(stage, case.case_id, conv.file_ending, split))
    if case.test:
        tally.test += 1
        tally.test_labeled += label_path is not None
    else:
        tally.training += 1
        tally.labeled += label_path is not None


def _write_cases(conv: Converter, cases: list[SourceCase], plan: ConversionPlan, stage: Path,
                 choice: EncodingChoice) -> _Tally:
    """Write every case, collecting problems instead of stopping at the first."""
    tally = _Tally()
    for case in tqdm(cases, desc=f"convert {conv.fmt}", unit="case", disable=None):
        try:
            _write_case(conv, case, plan, stage, choice, tally)
        except ConversionProblem as e:
            tally.problems.append(e.problem)
        except ImageReadError as e:
            tally.problems.append(Problem(
                f"cannot read the file: {e.reason}", file=e.path, case=case.case_id,
                fix="check that the file is complete and readable (re-download or re-export it)",
            ))
        except RuntimeError as e:  # SimpleITK could not convert or write what it read
            tally.problems.append(Problem(
                f"cannot convert the case: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}",
                file=", ".join(str(p) for paths in case.images.values() for p in paths), case=case.case_id,
                fix=f"check the files' pixel types; '{conv.fmt}' writes *{conv.file_ending}",
            ))
    return tally


# ---------------------------------------------------------------------- folders
def check_source(source: Path, conv: Converter) -> None:
    if not source.exists():
        raise CmcsegError(f"source folder {source} does not exist. Fix: pass the folder of the "
                          f"'{conv.fmt}' release ({conv.layout}).")
    if not source.is_dir():
        raise CmcsegError(f"source {source} is not a folder. Fix: pass the folder of the '{conv.fmt}' release "
                          f"({conv.layout}).")


def check_destination(out_folder: Path, source: Path, overwrite: bool) -> None:
    """The output must not overlap the source, and must be new or empty unless ``overwrite``."""
    if out_folder == source or out_folder.is_relative_to(source) or source.is_relative_to(out_folder):
        raise CmcsegError(f"output folder {out_folder} overlaps the source {source}; the source is never "
                          "modified. Fix: write the raw dataset outside the source folder (--raw).")
    if out_folder.exists() and not out_folder.is_dir():
        raise CmcsegError(f"output {out_folder} exists and is not a folder. Fix: remove it or choose another name.")
    if out_folder.is_dir() and any(out_folder.iterdir()) and not overwrite:
        raise CmcsegError(f"output folder {out_folder} exists and is not empty. Fix: pass --overwrite "
                          "(overwrite=True) to replace it, or choose another dataset name.")


@contextmanager
def staging_folder(out_folder: Path) -> Iterator[Path]:
    """A hidden folder beside ``out_folder`` that is removed unless it was published."""
    make_folder(out_folder.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{out_folder.name}-", dir=out_folder.parent))
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def publish(stage: Path, out_folder: Path) -> None:
    """Rename the finished staging folder into place, replacing an existing output only at the very end."""
    if not out_folder.exists():
        os.rename(stage, out_folder)
        return
    old = out_folder.with_name(f".old-{out_folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(out_folder, old)
    os.rename(stage, out_folder)
    shutil.rmtree(old)


# ---------------------------------------------------------------------- entry point
def run_conversion(conv: Converter, source: Path | str, out_folder: Path | str, name: str,
                   overwrite: bool = False) -> ConversionReport:
    """Convert the release at ``source`` into a raw dataset at ``out_folder`` (see the module docstring)."""
    source, out_folder = Path(source).expanduser().resolve(), Path(out_folder).expanduser().resolve()
    check_source(source, conv)
    check_destination(out_folder, source, overwrite)
    scan = conv.find_cases(source)
    if not scan.cases:
        raise DatasetError([Problem(f"no '{conv.fmt}' cases found", file=str(source),
                                    fix=f"point at the folder of the release; expected {conv.layout}")],
                           context=f"convert {source}")
    encodings = conv.label_encodings()
    plan = make_plan(conv.known, scan.cases, encodings)
    problems = check_cases(scan.cases, plan)
    if problems:
        raise DatasetError(problems, context=f"convert {source}")
    notes = list(scan.notes) + _plan_notes(plan, scan.cases, conv)
    for note in notes:
        logger.info("%s", note)
    logger.info("converting %d case(s) of '%s' from %s into %s", len(scan.cases), conv.fmt, source, out_folder)

    with staging_folder(out_folder) as stage:
        choice = EncodingChoice(conv.fmt, encodings, plan.labels)
        tally = _write_cases(conv, scan.cases, plan, stage, choice)
        encoding, disagreement = choice.chosen()
        if tally.problems or disagreement:
            raise DatasetError(tally.problems + disagreement, context=f"convert {source}")
        by_name = encoding.original_label_values()
        original = {n: by_name[n] for n in plan.labels if n in by_name}
        _write_json(conv, scan.cases, plan, stage, name, tally.training, encoding, original)
        Dataset.load(stage)
        publish(stage, out_folder)
    for warning in tally.warnings:
        logger.warning("%s", warning)
    report = ConversionReport(
        fmt=conv.fmt, source=source, out_folder=out_folder, name=name, modalities=plan.modalities,
        absent_modalities=plan.absent, reference_modality=plan.reference, pairing=plan.pairing,
        file_ending=conv.file_ending, num_training=tally.training, num_labeled=tally.labeled, num_test=tally.test,
        num_test_labeled=tally.test_labeled, labels=plan.labels, original_label_values=original,
        label_encoding=encoding.name, notes=tuple(notes), warnings=tuple(tally.warnings),
    )
    logger.info("wrote %d training and %d test case(s) into %s", tally.training, tally.test, out_folder)
    return report


def _plan_notes(plan: ConversionPlan, cases: list[SourceCase], conv: Converter) -> list[str]:
    """Facts about the plan worth telling the user: absent modalities, labels not used."""
    notes = []
    if plan.absent:
        notes.append(f"the source holds only {', '.join(plan.modalities)} of {', '.join(conv.known.modalities)}; "
                     f"the dataset is written with these channels only")
    if plan.reference != conv.known.reference:
        notes.append(f"reference modality {conv.known.reference} is not in the source; using {plan.reference}")
    unused: dict[str, int] = {}
    for case in cases:
        used = case.labels.get(plan.label_modality(case))
        for modality, path in case.labels.items():
            if path != used:
                unused[modality] = unused.get(modality, 0) + 1
    if unused:
        notes.append("labels drawn on other modalities' grids were not used (a case keeps the label of its "
                     f"{plan.reference} image): " + ", ".join(f"{n} {m}" for m, n in sorted(unused.items())))
    return notes


def _write_json(conv: Converter, cases: list[SourceCase], plan: ConversionPlan, stage: Path, name: str,
                num_training: int, encoding: LabelEncoding, original: dict[str, int]) -> None:
    extra = {
        "conversion": {"format": conv.fmt, "label_encoding": encoding.name,
                       "absent_modalities": list(plan.absent)},
        "official_split": {c.case_id: c.official_split for c in cases},
        **conv.dataset_extra(cases),
    }
    write_dataset_json(
        stage, name=name, channel_names=list(plan.modalities), labels=plan.labels, num_training=num_training,
        file_ending=conv.file_ending, pairing=plan.pairing, original_label_values=original,
        dimensionality=conv.known.dimensionality, reference_modality=plan.reference,
        description=conv.known.description, extra=extra,
    )

