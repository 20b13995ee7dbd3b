"""The raw dataset model: nnU-Net's raw layout plus cmcseg's three extensions.

A raw dataset is a folder ``DatasetNNN_NAME`` with::

    dataset.json                      channel_names (or v1 "modality"), labels, numTraining, file_ending
    imagesTr/CASE_XXXX<file_ending>   one file per case and channel XXXX
    labelsTr/CASE<file_ending>        optional: a case without a label is an unlabeled training case
    imagesTs/CASE_XXXX<file_ending>   optional test cases

Extensions over nnU-Net (documented in README.md):

* the channels of one case may each have their own geometry (shape, spacing, origin, direction);
* training cases with images and no label are unlabeled cases;
* ``"pairing": "unpaired"`` declares modalities from different patients (AMOS CT vs MRI): each
  case then holds exactly one channel, and its ``_XXXX`` suffix says which.

Optional keys cmcseg writes and reads: ``original_label_values`` (label name -> value in the
official release, so predictions can be written back in those values), ``reference_modality``
and ``tensorImageSize`` ("2D"/"3D").

:meth:`Dataset.load` checks the structure and raises one :class:`DatasetError` listing every
problem. Checks that need the pixels (NaN, label values, dimensionality, corrupt files) live
in :mod:`cmcseg.plans.integrity`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmcseg.errors import DatasetError, Problem
from cmcseg.image_io import write_json_atomic
from cmcseg.paths import FILE_ENDING_RE, UnsafeNameError, check_file_ending, check_name

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
PAIRINGS = ("paired", "unpaired")


@dataclass(frozen=True)
class Case:
    """One case: its channel files (channel index -> path) and its label file, if any."""

    case_id: str
    images: Mapping[int, Path]
    label: Path | None = None
    is_test: bool = False

    @property
    def labeled(self) -> bool:
        return self.label is not None

    @property
    def channels(self) -> list[int]:
        return sorted(self.images)


@dataclass
class Dataset:
    """A raw dataset, structurally checked. Build it with :meth:`Dataset.load`."""

    folder: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    pairing: str = "paired"
    original_label_values: dict[str, int] = field(default_factory=dict)
    dimensionality: str | None = None  # "2d", "3d", or None: decided from the images
    reference_modality: str | None = None
    cases: list[Case] = field(default_factory=list)
    test_cases: list[Case] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def modalities(self) -> list[str]:
        return [self.channel_names[i] for i in sorted(self.channel_names)]

    @property
    def labeled_cases(self) -> list[Case]:
        return [c for c in self.cases if c.labeled]

    @property
    def unlabeled_cases(self) -> list[Case]:
        return [c for c in self.cases if not c.labeled]

    @property
    def unpaired(self) -> bool:
        return self.pairing == "unpaired"

    def case(self, case_id: str) -> Case:
        for c in self.cases + self.test_cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)

    def channel_index(self, modality: str) -> int:
        """Channel index of a modality given by name (case-insensitive) or by index."""
        for i, n in self.channel_names.items():
            if n.lower() == str(modality).lower():
                return i
        if str(modality).isdigit() and int(modality) in self.channel_names:
            return int(modality)
        raise KeyError(
            f"modality '{modality}' is not in dataset {self.name} (modalities: {', '.join(self.modalities)})"
        )

    def label_value_to_original(self) -> dict[int, int]:
        """Consecutive label value -> value in the original release (identity where none is recorded)."""
        return {v: int(self.original_label_values.get(k, v)) for k, v in self.labels.items()}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: Path | str) -> Dataset:
        """Read ``dataset.json`` and scan the case files; raise DatasetError listing every structural problem."""
        folder = Path(folder)
        problems: list[Problem] = []
        meta = _read_dataset_json(folder, problems)
        if meta is None:
            raise DatasetError(problems, context=f"dataset {folder}")
        djson = str(folder / "dataset.json")
        channel_names = _parse_channel_names(meta, djson, problems)
        labels = _parse_labels(meta, djson, problems)
        file_ending = meta.get("file_ending", ".nii.gz" if "modality" in meta else None)
        if not isinstance(file_ending, str) or not FILE_ENDING_RE.match(file_ending):
            problems.append(Problem(
                f"'file_ending' is missing or not a file extension ({file_ending!r})", file=djson,
                fix='set e.g. "file_ending": ".nii.gz" in dataset.json (one or two dotted parts of letters and '
                    'digits)',
            ))
            file_ending = ".nii.gz"
        pairing = meta.get("pairing", "paired")
        if pairing not in PAIRINGS:
            problems.append(Problem(f"'pairing' must be one of {PAIRINGS}, got {pairing!r}", file=djson,
                                    fix='set "pairing" to "paired" (default) or "unpaired"'))
        dim = _parse_dimensionality(meta, djson, problems)
        original = meta.get("original_label_values", {}) or {}
        if not isinstance(original, dict) or any(k not in labels for k in original):
            problems.append(Problem(
                "'original_label_values' must map label names from 'labels' to integers", file=djson,
                fix="use the same keys as 'labels', e.g. {\"LV\": 500}",
            ))
            original = {}
        if problems:  # without a readable header the file scan would only add noise
            raise DatasetError(problems, context=f"dataset {folder}")

        ds = cls(
            folder=folder, name=meta.get("name") or folder.name, channel_names=channel_names, labels=labels,
            file_ending=file_ending, pairing=pairing, original_label_values={k: int(v) for k, v in original.items()},
            dimensionality=dim, reference_modality=meta.get("reference_modality"), metadata=meta,
        )
        ds.cases = _scan_split(ds, "Tr", problems)
        ds.test_cases = _scan_split(ds, "Ts", problems)
        _check_cross_split(ds, meta, problems)
        if ds.reference_modality is not None and ds.reference_modality not in ds.modalities:
            problems.append(Problem(
                f"'reference_modality' {ds.reference_modality!r} is not one of the channel names {ds.modalities}",
                file=djson, fix="name one of the channel_names, or remove the key",
            ))
        errors = [p for p in problems if p.severity == "error"]
        ds.warnings = [p for p in problems if p.severity != "error"]
        if errors:
            raise DatasetError(problems, context=f"dataset {folder}")
        return ds


# ---------------------------------------------------------------------- parsing helpers
def _read_dataset_json(folder: Path, problems: list[Problem]) -> dict | None:
    path = folder / "dataset.json"
    if not folder.is_dir():
        problems.append(Problem("dataset folder does not exist", file=str(folder),
                                fix="check the path, or the raw root (--raw / CMCSEG_RAW / nnUNet_raw)"))
        return None
    if not path.is_file():
        problems.append(Problem("dataset.json is missing", file=str(path),
                                fix="write a dataset.json with channel_names, labels, numTraining and file_ending "
                                    "(see README, 'Dataset layout')"))
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        problems.append(Problem(f"dataset.json is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                                file=str(path), fix="repair the JSON syntax"))
        return None
    if not isinstance(meta, dict):
        problems.append(Problem("dataset.json must hold a JSON object", file=str(path),
                                fix="write {\"channel_names\": ..., \"labels\": ..., ...}"))
        return None
    return meta


def _parse_channel_names(meta: dict, djson: str, problems: list[Problem]) -> dict[int, str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem("'channel_names' (or v1 'modality') is missing or empty", file=djson,
                                fix='add e.g. "channel_names": {"0": "bSSFP", "1": "LGE", "2": "T2"}'))
        return {}
    try:
        out = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        problems.append(Problem(f"'channel_names' keys must be channel indices, got {list(raw)}", file=djson,
                                fix='use "0", "1", ... as keys'))
        return {}
    if sorted(out) != list(range(len(out))):
        problems.append(Problem(f"channel indices must be 0..{len(out) - 1}, got {sorted(out)}", file=djson,
                                fix="number the channels consecutively from 0"))
    for name in out.values():
        try:
            check_name(name, "channel name", djson, max_length=64)
        except UnsafeNameError as e:
            problems.append(Problem(str(e), file=djson, fix="name the channel with letters, digits, '_', '-', '.'"))
    return out


def nnunet_label_dict(labels: Mapping[str, Any]) -> dict[str, Any]:
    """``labels`` as nnU-Net's ``LabelManager`` accepts them: value 0 named ``background``.

    cmcseg keeps a dataset's own name for class 0 (DELIVER's ``Building``, MCubeS' ``asphalt``:
    scene datasets have no background class); nnU-Net refuses a label dict without the name
    ``background``. Only that key is renamed; values, order and the ``ignore`` label stay.
    """
    if "background" in labels:
        return dict(labels)
    return {("background" if not isinstance(v, (list, tuple)) and int(v) == 0 and k != "ignore" else k): v
            for k, v in labels.items()}


def _parse_labels(meta: dict, djson: str, problems: list[Problem]) -> dict[str, int]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem("'labels' is missing or empty", file=djson,
                                fix='add e.g. "labels": {"background": 0, "LV": 1}'))
        return {}
    keys = list(raw)
    if all(str(k).lstrip("-").isdigit() for k in keys) and not all(str(v).lstrip("-").isdigit() for v in raw.values()):
        labels = {str(v): int(k) for k, v in raw.items()}  # nnU-Net v1: {"0": "background", ...}
    else:
        labels = {}
        for k, v in raw.items():
            if isinstance(v, (list, tuple)):
                problems.append(Problem(f"label '{k}' is a region {v}; region-based labels are not supported",
                                        file=djson, fix="give each label one integer value"))
                continue
            try:
                labels[str(k)] = int(v)
            except (TypeError, ValueError):
                problems.append(Problem(f"label '{k}' has non-integer value {v!r}", file=djson,
                                        fix="label values must be integers"))
    values = sorted(labels.values())
    if labels and values[0] != 0:
        problems.append(Problem("labels must include background with value 0", file=djson,
                                fix='add "background": 0'))
    if labels and values != list(range(len(values))):
        problems.append(Problem(
            f"label values must be consecutive integers 0..{len(values) - 1}, got {values}", file=djson,
            fix="renumber the labels (cmcseg convert does this and records the originals in original_label_values)",
        ))
    return labels


def _parse_dimensionality(meta: dict, djson: str, problems: list[Problem]) -> str | None:
    value = meta.get("tensorImageSize")
    if value is None:
        return None
    v = str(value).lower()
    if v in ("2d",):
        return "2d"
    if v in ("3d", "4d"):
        return "3d"
    problems.append(Problem(f"'tensorImageSize' must be 2D or 3D, got {value!r}", file=djson,
                            fix='set "tensorImageSize": "3D" (or "2D"), or remove the key'))
    return None


def _scan_split(ds: Dataset, split: str, problems: list[Problem]) -> list[Case]:
    images_dir = ds.folder / f"images{split}"
    labels_dir = ds.folder / f"labels{split}"
    if not images_dir.is_dir():
        if split == "Tr":
            problems.append(Problem("imagesTr/ is missing", file=str(images_dir),
                                    fix="put the training images in imagesTr/CASE_XXXX" + ds.file_ending))
        return []
    ending = ds.file_ending
    images: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
        if not m:
            problems.append(Problem(
                "file name does not end in a 4-digit channel suffix", file=str(f), severity="warning",
                fix=f"name images CASE_XXXX{ending} (e.g. case01_0000{ending}); this file is ignored",
            ))
            continue
        cid, ch = m.group("case"), int(m.group("channel"))
        try:
            check_name(cid, "case id", str(f))
        except UnsafeNameError as e:
            problems.append(Problem(str(e), file=str(f), fix="rename the file (letters, digits, '_', '-', '.')"))
            continue
        if ch not in ds.channel_names:
            problems.append(Problem(
                f"channel {ch:04d} is not declared in dataset.json channel_names ({sorted(ds.channel_names)})",
                file=str(f), case=cid, fix="declare the channel in channel_names or remove the file",
            ))
            continue
        images.setdefault(cid, {})[ch] = f

    _check_duplicate_ids(images, images_dir, problems)
    cases: list[Case] = []
    for cid, chans in sorted(images.items()):
        if ds.unpaired:
            if len(chans) != 1:
                problems.append(Problem(
                    f"case id appears {len(chans)} times (channels {sorted(chans)}) in an unpaired dataset",
                    file=", ".join(str(p) for p in chans.values()), case=cid,
                    fix="in an unpaired dataset each case holds one modality: give each file its own case id",
                ))
                continue
        else:
            for ch in sorted(set(ds.channel_names) - set(chans)):
                problems.append(Problem(
                    f"channel {ch:04d} ({ds.channel_names[ch]}) is missing",
                    file=str(images_dir / f"{cid}_{ch:04d}{ending}"), case=cid,
                    fix="add the missing file, or remove the case; for a dataset whose modalities come from "
                        'different patients declare "pairing": "unpaired"',
                ))
        label = labels_dir / f"{cid}{ending}"
        if label.is_symlink() and not label.is_file():  # a broken link or a loop: not "no label"
            problems.append(Problem(
                "the label is a symbolic link that leads to no file (broken, or a loop)", file=str(label), case=cid,
                fix="replace the link with the label file, or point it at the real file"))
        cases.append(Case(cid, dict(sorted(chans.items())), label if label.is_file() else None, split == "Ts"))

    if labels_dir.is_dir():
        for f in sorted(labels_dir.iterdir()):
            if f.name.startswith(".") or not f.name.endswith(ending):
                continue
            cid = f.name[: -len(ending)]
            if cid not in images:
                problems.append(Problem(
                    "label has no images", file=str(f), case=cid,
                    fix=f"add images{split}/{cid}_0000{ending} (one per channel) or remove the label",
                ))
    return cases


def _check_duplicate_ids(images: dict[str, dict[int, Path]], images_dir: Path, problems: list[Problem]) -> None:
    """Case ids that differ only in letter case collide on many file systems and in every report."""
    seen: dict[str, str] = {}
    for cid in sorted(images):
        key = cid.lower()
        if key in seen:
            problems.append(Problem(
                f"case id appears twice: '{seen[key]}' and '{cid}' differ only in letter case",
                file=str(images_dir), case=cid, fix="rename one of the cases",
            ))
        else:
            seen[key] = cid


def _check_cross_split(ds: Dataset, meta: dict, problems: list[Problem]) -> None:
    djson = str(ds.folder / "dataset.json")
    both = {c.case_id for c in ds.cases} & {c.case_id for c in ds.test_cases}
    for cid in sorted(both):
        problems.append(Problem("case id appears twice: in imagesTr and in imagesTs", case=cid,
                                file=str(ds.folder / "imagesTs"), fix="rename the test case"))
    listed = meta.get("training")  # nnU-Net v1 lists the training cases
    if isinstance(listed, list):
        names = [Path(str(e.get("image", ""))).name if isinstance(e, dict) else "" for e in listed]
        for name in sorted({n for n in names if n and names.count(n) > 1}):
            problems.append(Problem(f"case '{name}' is listed twice in 'training'", file=djson,
                                    case=name, fix="remove the duplicate entry"))
    n = meta.get("numTraining")
    if isinstance(n, int) and n != len(ds.cases) and ds.cases:  # no cases at all is reported as an error
        problems.append(Problem(
            f"numTraining is {n} but imagesTr holds {len(ds.cases)} cases", file=djson, severity="warning",
            fix=f'set "numTraining": {len(ds.cases)}',
        ))


# ---------------------------------------------------------------------- writing
def image_file(folder: Path | str, case_id: str, channel: int, file_ending: str = ".nii.gz", split: str = "Tr") -> Path:
    """Where channel ``channel`` of ``case_id`` lives in a raw dataset (the names are checked: no path parts)."""
    check_name(case_id, "case id", str(folder))
    check_file_ending(file_ending, str(folder))
    return Path(folder) / f"images{split}" / f"{case_id}_{channel:04d}{file_ending}"


def label_file(folder: Path | str, case_id: str, file_ending: str = ".nii.gz", split: str = "Tr") -> Path:
    """Where the label of ``case_id`` lives in a raw dataset (the names are checked: no path parts)."""
    check_name(case_id, "case id", str(folder))
    check_file_ending(file_ending, str(folder))
    return Path(folder) / f"labels{split}" / f"{case_id}{file_ending}"


def write_dataset_json(
    folder: Path | str,
    *,
    name: str,
    channel_names: Mapping[int, str] | Mapping[str, str] | Iterable[str],
    labels: Mapping[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    pairing: str = "paired",
    original_label_values: Mapping[str, int] | None = None,
    dimensionality: str = "3d",
    reference_modality: str | None = None,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ``dataset.json`` that both nnU-Net v2 and cmcseg read (atomically)."""
    names: Mapping[Any, str] = channel_names if isinstance(channel_names, Mapping) else dict(enumerate(channel_names))
    meta: dict[str, Any] = {
        "name": name,
        "description": description,
        "channel_names": {str(k): v for k, v in names.items()},
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
        "tensorImageSize": "2D" if dimensionality == "2d" else "3D",
        "pairing": pairing,
    }
    if original_label_values:
        meta["original_label_values"] = dict(original_label_values)
    if reference_modality:
        meta["reference_modality"] = reference_modality
    if extra:
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"extra dataset.json keys {clash} would overwrite keys write_dataset_json owns")
        meta.update(extra)
    path = Path(folder) / "dataset.json"
    write_json_atomic(meta, path)
    return path
