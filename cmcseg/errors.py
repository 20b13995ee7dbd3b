"""Errors that tell the user what is wrong, where, and what to do about it."""
from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


class CmcsegError(Exception):
    """Base class of every error cmcseg raises on purpose (the CLI prints these without a traceback)."""


@dataclass(frozen=True)
class Problem:
    """One finding about the input.

    ``severity`` is ``error`` (stops the work), ``warning`` (work goes on) or ``finding``
    (a fact worth reporting, e.g. misaligned modalities, which cmcseg handles).
    """

    problem: str
    fix: str = ""
    file: str = ""
    case: str = ""
    severity: str = "error"

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = ", ".join(x for x in (f"case {self.case}" if self.case else "", self.file) if x)
        text = f"[{self.severity}] {where + ': ' if where else ''}{self.problem}"
        return text + (f" Fix: {self.fix}" if self.fix else "")


def format_problem_table(problems: Sequence[Problem]) -> str:
    """Render problems as one plain-text table: severity, case and file, then the problem and its fix."""
    if not problems:
        return "no problems found"
    sev_w = max(len("SEVERITY"), *(len(p.severity) for p in problems))
    case_w = max(len("CASE"), *(len(p.case or "-") for p in problems))
    lines = [f"{'SEVERITY':<{sev_w}}  {'CASE':<{case_w}}  FILE / PROBLEM / FIX"]
    for p in problems:
        lines.append(f"{p.severity:<{sev_w}}  {p.case or '-':<{case_w}}  {p.file or '-'}")
        pad = " " * (sev_w + case_w + 4)
        lines.append(f"{pad}problem: {p.problem}")
        if p.fix:
            lines.append(f"{pad}fix:     {p.fix}")
    return "\n".join(lines)


class DatasetError(CmcsegError):
    """The input dataset has one or more fatal problems. All of them are listed, not just the first."""

    def __init__(self, problems: Iterable[Problem], context: str = ""):
        self.problems = list(problems)
        self.context = context
        n = sum(p.severity == "error" for p in self.problems)
        head = f"{context}: " if context else ""
        super().__init__(f"{head}{n} problem(s) found\n" + format_problem_table(self.problems))

    def __reduce__(self):  # picklable, so a worker process can hand it back intact
        return (type(self), (self.problems, self.context))


class ImageReadError(CmcsegError):
    """A file could not be read as an image."""

    def __init__(self, path: Path | str, reason: str, case: str = ""):
        self.path, self.reason, self.case = str(path), reason, case
        where = f" (case {case})" if case else ""
        super().__init__(
            f"cannot read image {path}{where}: {reason}. Fix: check that the file is complete and in a format "
            "SimpleITK reads (NIfTI, NRRD, MHA, ...); re-export or re-download it."
        )

    def __reduce__(self):  # picklable, so a worker process can hand it back intact
        return (type(self), (self.path, self.reason, self.case))


#: errno -> what it says about the folder written to
WRITE_FAULTS = {
    errno.ENOSPC: "is full (no space left on the device)",
    errno.EDQUOT: "is over its disk quota",
    errno.EROFS: "is on a read-only file system",
    errno.EACCES: "is not writable by this user (permission denied)",
    errno.EPERM: "is not writable by this user (operation not permitted)",
}


class WriteFaultError(CmcsegError):
    """A write failed because of the folder (full, read-only, no permission), not because of the data."""

    def __init__(self, folder: Path | str, reason: str, path: Path | str | None = None):
        self.folder, self.reason, self.path = str(folder), reason, None if path is None else str(path)
        full = "full" in reason or "quota" in reason
        fix = ("free space there, or point the root (--raw/--preprocessed/--results, -o) at a disk with room"
               if full else "make it writable, or point the root (--raw/--preprocessed/--results, -o) at a "
                            "writable folder")
        what = f"cannot write {path}: " if path is not None else f"cannot create or write into {folder}: "
        unfinished = " (the unfinished one was removed)" if path is not None else ""
        super().__init__(
            f"{what}the folder {folder} {reason}. Your input files are untouched and the files finished before "
            f"are kept{unfinished}. Fix: {fix}, then run the same command again (cmcseg plan "
            "skips finished cases; add --continue to cmcseg train or cmcseg predict).")

    def __reduce__(self):  # picklable, so a worker process can hand it back intact
        return (type(self), (self.folder, self.reason, self.path))
