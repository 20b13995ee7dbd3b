"""The integrity check that runs before any work: every file of a dataset is read once.

:meth:`cmcseg.dataset.Dataset.load` already checked the structure (dataset.json, file
names, missing channels, labels without images, duplicate ids). This pass reads the pixels
and collects, over the whole dataset, every problem that would break later stages: an empty
imagesTr, unreadable or corrupt files, broken symbolic links and link loops, 4D images, NaN/inf,
2D images in a 3D dataset, non-integer labels, label values that dataset.json does not declare,
labels on no modality's grid, and modalities whose extent does not overlap the reference's at all
(a header error; ``accept_no_overlap`` makes that a warning). Misaligned modalities that do
overlap are reported as findings: cmcseg handles them.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from cmcseg.dataset import Case, Dataset
from cmcseg.errors import CmcsegError, DatasetError, Problem, format_problem_table
from cmcseg.image_io import read_image_header, read_stored_values
from cmcseg.parallel import process_pool
from cmcseg.preprocessing.alignment import GridGeometry, extents_disjoint, modality_relation
from cmcseg.preprocessing.case_loading import label_grid_channel

log = logging.getLogger(__name__)


@dataclass
class CaseCheck:
    """What checking one case found: problems, and the dimensionality of each file (2 or 3)."""

    case_id: str
    problems: list[Problem] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    multi_component: set[str] = field(default_factory=set)
    #: (modality, reference, overlap fraction, centre offset mm) of each modality on another grid (resampled)
    misaligned: list[tuple[str, str, float, float]] = field(default_factory=list)


@dataclass
class IntegrityReport:
    """Every problem and finding of a dataset, and its dimensionality ("2d" or "3d")."""

    dataset: str
    problems: list[Problem]
    dimensionality: str
    num_cases: int

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self) -> str:
        return format_problem_table(self.problems)

    def verdict(self) -> str:
        """One line: the counts, and whether planning can go on."""
        counts = {sev: sum(p.severity == sev for p in self.problems) for sev in ("error", "warning", "finding")}
        tally = ", ".join(f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in counts.items())
        if counts["error"]:
            return f"verdict: {tally} in {self.num_cases} case(s): fix the errors above, then run cmcseg plan again"
        return f"verdict: {tally} in {self.num_cases} case(s): ready to plan"

    def raise_if_fatal(self) -> None:
        if self.errors:
            raise DatasetError(self.problems, context=f"integrity check of {self.dataset}")


def check_case(case: Case, label_values: tuple[int, ...], channel_names: dict[int, str], unpaired: bool,
               preferred_label_channel: int | None = None, accept_no_overlap: bool = False) -> CaseCheck:
    """Read every file of one case and report what is wrong with it (spawn-safe: runs in workers).

    A file that cannot be read is reported once, as that: the checks that would need it (the label's
    grid, the relations between modalities) look at the readable files only.
    """
    result = CaseCheck(case.case_id)
    grids: dict[int, GridGeometry] = {}
    for ch, path in case.images.items():
        loaded = _read_or_report(path, case.case_id, result)
        if loaded is None:
            continue
        grids[ch], values = loaded
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            n_bad = int(values.size - np.isfinite(values).sum())
            result.problems.append(Problem(
                f"{n_bad} NaN/inf voxel(s) in the {channel_names[ch]} image", file=str(path), case=case.case_id,
                fix="replace NaN/inf (e.g. with 0 or the background value) before planning; cmcseg will not guess",
            ))
    if case.label is not None:
        loaded = _read_or_report(case.label, case.case_id, result, is_label=True)
        if loaded is not None and str(case.label) in result.multi_component:
            result.problems.append(Problem("label has several components per pixel (e.g. RGB)", file=str(case.label),
                                           case=case.case_id, fix="save the label as a single-channel integer image"))
        elif loaded is not None:
            result.problems.extend(_check_label_values(loaded[1], case, label_values))
            try:
                readable = dataclasses.replace(case, images={ch: p for ch, p in case.images.items() if ch in grids})
                if readable.images:  # else every channel is already reported as unreadable
                    label_grid_channel(readable, preferred_label_channel)
            except CmcsegError:
                result.problems.append(Problem(
                    "the label lies on no modality's grid or physical extent", file=str(case.label),
                    case=case.case_id, fix="give the label the geometry of the image it was drawn on",
                ))
    if not unpaired and len(grids) > 1:
        ref_ch = preferred_label_channel if preferred_label_channel in grids else min(grids)
        result.problems.extend(_misalignment_findings(case, grids, channel_names, ref_ch, accept_no_overlap,
                                                      result.misaligned))
    return result


def _read_or_report(path, case_id: str, result: CaseCheck,
                    is_label: bool = False) -> tuple[GridGeometry, np.ndarray] | None:
    """Header geometry and stored values of a file; an unreadable file becomes a problem."""
    link_problem = _symlink_problem(path, case_id)
    if link_problem is not None:
        result.problems.append(link_problem)
        return None
    try:
        header = read_image_header(path, case=case_id)
        if header.GetDimension() not in (2, 3):  # checked before the pixels: a 4D file can be large
            result.problems.append(_dimension_problem(path, case_id, header.GetSize(), is_label))
            return None
        values = read_stored_values(path, case=case_id)
    except CmcsegError as e:
        result.problems.append(Problem(
            f"unreadable or corrupt file ({getattr(e, 'reason', e)})", file=str(path), case=case_id,
            fix="re-export or re-copy the file; check that it opens in a viewer",
        ))
        return None
    geometry = GridGeometry.of(header)
    result.dims[str(path)] = _dimensionality(geometry)
    if header.GetNumberOfComponents() > 1:
        result.multi_component.add(str(path))
    return geometry, values


def _symlink_problem(path, case_id: str) -> Problem | None:
    """A symbolic link that leads nowhere: a loop (a link that points back to itself), or a dangling link."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
        return None
    except OSError as e:
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        if e.errno == errno.ELOOP:
            return Problem(
                f"symbolic link loop: the link points to {target!r}, which leads back to the link itself, so there "
                "is no image to read", file=str(path), case=case_id,
                fix=f"replace the link {path} with the image file, or point it at the real file "
                    f"(ln -sfn /path/to/the/real/{os.path.basename(path)} {path})",
            )
        return Problem(
            f"broken symbolic link: it points to {target!r}, which does not exist", file=str(path), case=case_id,
            fix="restore the file the link points to, or re-create the link to the real image file",
        )


def _dimension_problem(path, case_id: str, size, is_label: bool) -> Problem:
    """A 4D (or higher) file: several channels or time points in one file, which cmcseg does not split itself."""
    size = tuple(int(s) for s in size)
    if is_label:
        fix = "save the label as one 2D or 3D integer volume on the grid of the image it was drawn on"
    else:
        fix = ("split it into one 3D file per channel (or time point), named as nnU-Net expects: "
               "CASE_0000.nii.gz, CASE_0001.nii.gz, ...; and declare each channel in dataset.json channel_names")
    return Problem(
        f"{len(size)}D image of size {size} (x, y, z, ...): cmcseg reads one 2D or 3D volume per file",
        file=str(path), case=case_id, fix=fix,
    )


def _dimensionality(geometry: GridGeometry) -> int:
    return 2 if len(geometry.size) == 2 or geometry.size[2] == 1 else 3


def _check_label_values(arr: np.ndarray, case: Case, label_values: tuple[int, ...]) -> list[Problem]:
    problems = []
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all() or not np.all(np.mod(arr[finite], 1) == 0):
            return [Problem("label holds non-integer values", file=str(case.label), case=case.case_id,
                            fix="labels must be integer class values; round or re-export the label map")]
    values = np.unique(arr).astype(np.int64)
    unknown = sorted(set(values.tolist()) - set(label_values))
    if unknown:
        problems.append(Problem(
            f"label values {unknown} are not declared in dataset.json (declared: {sorted(label_values)})",
            file=str(case.label), case=case.case_id,
            fix="declare them in dataset.json 'labels', or map them (cmcseg convert maps official values)",
        ))
    return problems


def _misalignment_findings(case: Case, grids: dict[int, GridGeometry], channel_names: dict[int, str],
                           ref_ch: int, accept_no_overlap: bool = False,
                           misaligned: list[tuple[str, str, float, float]] | None = None) -> list[Problem]:
    """Errors (or warnings) for modalities that miss the reference entirely; the overlapping ones on another grid
    go to ``misaligned`` (summarised over the dataset by :func:`_resampling_findings`)."""
    misaligned = [] if misaligned is None else misaligned
    ref = grids[ref_ch].as_3d()
    out = []
    for ch, grid in sorted(grids.items()):
        if ch == ref_ch:
            continue
        rel = modality_relation(grid.as_3d(), ref)
        if rel.kind == "misaligned" and extents_disjoint(grid.as_3d(), ref):
            ref_name = channel_names[ref_ch]
            problem = (f"{channel_names[ch]} does not overlap {ref_name} at all (covers 0% of {ref_name}'s extent; "
                       f"centres {rel.centre_offset_mm:.1f} mm apart): after resampling into the reference space its "
                       "field of view is empty. This is almost always a header error (origin, spacing or direction)")
            if accept_no_overlap:
                out.append(Problem(problem + "; accepted with --accept-no-overlap: the modality counts as "
                                   "missing in this case", file=str(case.images[ch]), case=case.case_id,
                                   severity="warning"))
            else:
                out.append(Problem(
                    problem, file=str(case.images[ch]), case=case.case_id,
                    fix=f"correct the header of this file (compare its origin and direction with "
                        f"{case.images[ref_ch]}); if the modalities truly do not overlap, rerun with "
                        "--accept-no-overlap (the modality then counts as missing in this case)",
                ))
        elif rel.kind == "misaligned":
            misaligned.append((channel_names[ch], channel_names[ref_ch], rel.overlap_fraction, rel.centre_offset_mm))
    return out


def _resampling_findings(results: Iterable[CaseCheck], num_cases: int) -> list[Problem]:
    """One finding per (modality, reference) pair on different grids, with how many cases and the ranges: an
    expected fact that cmcseg handles, summarised once instead of once per case."""
    pairs: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for r in results:
        for modality, reference, overlap, offset in r.misaligned:
            pairs.setdefault((modality, reference), []).append((r.case_id, overlap, offset))
    out = []
    for (modality, reference), cases in sorted(pairs.items()):
        overlaps, offsets = [c[1] for c in cases], [c[2] for c in cases]
        out.append(Problem(
            f"{modality} is on another grid than {reference} in {len(cases)} of {num_cases} case(s) (its extent covers "
            f"{min(overlaps):.0%}-{max(overlaps):.0%} of {reference}'s, centres {min(offsets):.1f}-{max(offsets):.1f} "
            f"mm apart); it will be resampled into the reference space",
            case=f"{len(cases)} cases" if len(cases) > 1 else cases[0][0], severity="finding",
            fix="nothing to do: cmcseg resamples it by the headers; add --register rigid if the headers disagree "
                "with the anatomy"))
    return out


def verify_dataset(dataset: Dataset, num_workers: int = 1, progress: bool = True,
                   reference_channel: int | None = None, accept_no_overlap: bool = False) -> IntegrityReport:
    """Read every file of ``dataset`` and collect every problem (nothing is raised here).

    Misalignment findings are relative to ``reference_channel`` (pass the planner's choice so
    the report and the fingerprint describe the same relations); by default the declared
    reference modality, else the lowest channel of each case. A modality that does not overlap
    the reference at all is an error, or a warning with ``accept_no_overlap``.
    """
    cases = dataset.cases + dataset.test_cases
    label_values = tuple(sorted(dataset.labels.values()))
    preferred = reference_channel
    if preferred is None and dataset.reference_modality:
        preferred = dataset.channel_index(dataset.reference_modality)
    args = [(c, label_values, dataset.channel_names, dataset.unpaired, preferred, accept_no_overlap) for c in cases]
    results = _map(check_case, args, num_workers, progress, desc="integrity check")
    problems = list(dataset.warnings)
    if not dataset.cases:
        problems.append(_no_training_cases(dataset))
    for r in results:
        problems.extend(r.problems)
    problems.extend(_resampling_findings(results, len(cases)))
    dim, dim_problems = _dataset_dimensionality(dataset, results)
    problems.extend(dim_problems)
    order = {"error": 0, "warning": 1, "finding": 2}
    problems.sort(key=lambda p: (order.get(p.severity, 3), p.case, p.file))
    return IntegrityReport(dataset.name, problems, dim, len(cases))


def _no_training_cases(dataset: Dataset) -> Problem:
    """imagesTr holds no case: nothing to plan or train on."""
    images_dir = dataset.folder / "imagesTr"
    others = sorted(f.name for f in images_dir.iterdir() if not f.name.startswith(".")) if images_dir.is_dir() else []
    seen = (f"it holds {len(others)} file(s), none named CASE_XXXX{dataset.file_ending} "
            f"(e.g. {', '.join(others[:3])})" if others else "the folder is empty")
    return Problem(
        f"imagesTr holds no training cases: {seen}", file=str(images_dir),
        fix=f"put the training images in {images_dir} as CASE_XXXX{dataset.file_ending}, one file per channel "
            f"(e.g. case01_0000{dataset.file_ending}), and their labels in labelsTr/CASE{dataset.file_ending}; "
            f"file_ending in dataset.json must match the files",
    )


def _dataset_dimensionality(dataset: Dataset, results: Iterable[CaseCheck]) -> tuple[str, list[Problem]]:
    """Declared (tensorImageSize) or inferred: all single-slice images make a 2D dataset."""
    dims = {f: d for r in results for f, d in r.dims.items()}
    if not dims:
        return dataset.dimensionality or "3d", []
    declared = dataset.dimensionality
    inferred = "2d" if all(d == 2 for d in dims.values()) else "3d"
    dim = declared or inferred
    problems = []
    if dim == "3d":
        case_of = {str(p): c.case_id for c in dataset.cases + dataset.test_cases
                   for p in [*c.images.values(), *([c.label] if c.label else [])]}
        for f, d in sorted(dims.items()):
            if d == 2:
                problems.append(Problem(
                    "2D image (a single slice) in a 3D dataset", file=f, case=case_of.get(f, ""),
                    fix='remove or replace it with the 3D volume; for a 2D dataset set "tensorImageSize": "2D"',
                ))
    return dim, problems


def _map(fn, arg_tuples: list[tuple], num_workers: int, progress: bool, desc: str) -> list:
    """Run ``fn(*args)`` over the tuples, in processes when num_workers > 1, with a progress bar."""
    bar = tqdm(total=len(arg_tuples), desc=desc, unit="case", disable=not progress)
    out = []
    try:
        if num_workers <= 1 or len(arg_tuples) <= 1:
            for a in arg_tuples:
                out.append(fn(*a))
                bar.update()
        else:
            with process_pool(num_workers) as pool:
                for r in pool.map(fn, *zip(*arg_tuples)):
                    out.append(r)
                    bar.update()
    finally:
        bar.close()
    return out
