"""The dataset fingerprint: nnU-Net's statistics, measured where cmcseg trains, in the reference space.

nnU-Net's ``DatasetFingerprintExtractor`` reads each case as stored, crops it to its nonzero
region and samples foreground intensities. cmcseg does the same on each case *after*
:func:`~cmcseg.preprocessing.case_loading.load_case_in_reference_space`, so that the
statistics describe the voxels the network will see: every modality resampled onto the
reference grid, and voxels outside a modality's field of view (FOV) left out of that
modality's statistics. The keys nnU-Net's planner reads (``spacings``, ``shapes_after_crop``,
``foreground_intensity_properties_per_channel``, ``median_relative_size_after_cropping``) keep
nnU-Net's names, order (numpy z, y, x) and sampling rule, so on co-registered, fully labelled
data the numbers equal nnU-Net's.

cmcseg adds: per case geometry and modality relations, label and unlabeled bookkeeping, and a
human-readable summary. Unlabeled cases count for shapes and spacings only. A modality that no
labelled case holds (possible in unpaired datasets) is sampled in its nonzero region instead,
and ``intensity_sampling_per_channel`` says so.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from tqdm import tqdm

from cmcseg.dataset import Case, Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import geometry_of, read_image_header, read_json, write_json_atomic
from cmcseg.parallel import process_pool
from cmcseg.plans.plans import input_channel_modalities
from cmcseg.preprocessing.alignment import SPACING_2D_SLICE
from cmcseg.preprocessing.case_loading import label_grid_channel, load_case_in_reference_space
from cmcseg.preprocessing.registration import load_transforms

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: nnU-Net's budget of foreground samples per channel over the whole dataset (DatasetFingerprintExtractor)
NUM_FOREGROUND_SAMPLES = 10e7
#: nnU-Net's per-case seed of the intensity sampling
_INTENSITY_SEED = 1234
_PERCENTILES = np.array((0.5, 50.0, 99.5))
#: how a channel's intensities were sampled
SAMPLED_FOREGROUND = "foreground"
SAMPLED_NONZERO = "nonzero"


@dataclass
class CaseAnalysis:
    """What one case contributes: nnU-Net's per-case values, intensity samples and cmcseg's case entry."""

    case_id: str
    spacing: list[float]
    shape_after_crop: list[int]
    relative_size_after_cropping: float
    intensities: list[CountedSample]
    channels_per_modality: dict[int, int]
    info: dict[str, Any]


# ---------------------------------------------------------------------------------------- per case
@dataclass
class CountedSample:
    """A sample drawn with replacement, stored as the distinct voxels drawn and how often each was drawn.

    nnU-Net materialises up to 1e8 values per channel (hundreds of MB, and most of the
    fingerprint's time); the counts describe the very same sample in the size of the region.
    """

    values: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls) -> CountedSample:
        return cls(np.empty(0, np.float32), np.empty(0, np.int64))

    @property
    def size(self) -> int:
        return int(self.counts.sum())


def sample_intensities(
    data: np.ndarray,
    regions: Sequence[np.ndarray | None],
    num_samples: Sequence[int],
    seed: int = _INTENSITY_SEED,
) -> list[CountedSample]:
    """nnU-Net's sampling: per channel, ``num_samples`` voxels drawn with replacement from its region.

    One RandomState serves the channels in order and an empty region draws nothing, exactly as in
    ``DatasetFingerprintExtractor.collect_foreground_intensities``; ``RandomState.choice(a, k,
    replace=True)`` draws ``randint(0, len(a), k)``, so drawing those indices and counting them
    gives nnU-Net's very samples without expanding them.
    """
    rs = np.random.RandomState(seed)
    out = []
    for c, region in enumerate(regions):
        pixels = data[c][region] if region is not None else np.empty(0, data.dtype)
        if not pixels.size or not num_samples[c]:
            out.append(CountedSample.empty())
            continue
        counts = np.bincount(rs.randint(0, pixels.size, size=num_samples[c]), minlength=pixels.size)
        drawn = counts > 0
        out.append(CountedSample(pixels[drawn], counts[drawn]))
    return out


def _modality_entries(dataset: Dataset, case: Case, relations: Mapping[int, dict]) -> dict[str, dict]:
    """Per modality of a case: its name, header geometry, components and relation to the reference."""
    out = {}
    for ch, path in case.images.items():
        header = read_image_header(path, case=case.case_id)
        out[str(ch)] = {"name": dataset.channel_names[ch], **geometry_of(header),
                        "components": int(header.GetNumberOfComponents()), "relation": relations[ch]}
    return out


def analyze_case(
    dataset: Dataset,
    case: Case,
    reference_channel: int,
    samples_per_modality: Mapping[int, int],
    nonzero_modalities: Iterable[int] = (),
    transforms_folder: Path | str | None = None,
) -> CaseAnalysis:
    """Fingerprint one case in its reference space (spawn-safe: plain picklable arguments).

    Crops to the nonzero region with nnU-Net's ``crop_to_nonzero`` (voxels outside a modality's
    FOV are already 0), then samples each input channel inside its modality's FOV: the labelled
    foreground, or for ``nonzero_modalities`` the nonzero voxels.
    """
    transforms = load_transforms(transforms_folder, case.case_id) if transforms_folder is not None else None
    aligned = load_case_in_reference_space(dataset, case, reference_channel, transforms)
    # int16: crop_to_nonzero writes -1 outside the nonzero mask, which an unsigned label type cannot hold
    seg = None if aligned.seg is None else aligned.seg[None].astype(np.int16)
    data, seg, bbox = crop_to_nonzero(aligned.data, seg)
    fov = aligned.fov[(slice(None), *(slice(lo, hi) for lo, hi in bbox))].astype(bool)

    nonzero = set(nonzero_modalities)
    modality_of = input_channel_modalities(aligned.channels_per_modality)
    regions: list[np.ndarray | None] = []
    for c, m in enumerate(modality_of):
        if m in nonzero:
            regions.append((data[c] != 0) & fov[m])
        elif case.labeled:
            regions.append((seg[0] > 0) & fov[m])
        else:
            regions.append(None)  # unlabeled cases add no foreground statistics
    intensities = sample_intensities(data, regions, [samples_per_modality.get(m, 0) for m in modality_of])

    if dataset.unpaired:
        relations = {ch: {"kind": "unpaired"} for ch in case.images}
        label_channel = case.channels[0] if case.labeled else None
    else:
        relations = {ch: r.as_dict() for ch, r in aligned.relations.items()}
        label_channel = label_grid_channel(case, reference_channel)
    info = {"labeled": case.labeled, "label_grid_channel": label_channel,
            "modalities": _modality_entries(dataset, case, relations)}
    shape_after = [int(s) for s in data.shape[1:]]
    return CaseAnalysis(case.case_id, [float(s) for s in aligned.reference.GetSpacing()[::-1]], shape_after,
                        float(np.prod(shape_after) / np.prod(aligned.data.shape[1:])), intensities,
                        dict(aligned.channels_per_modality), info)


# ---------------------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(dataset: Dataset, kwargs: dict) -> None:
    """Hand the dataset to a worker once, so that tasks carry only a case id."""
    _WORKER["dataset"], _WORKER["kwargs"] = dataset, kwargs


def _analyze_in_worker(case_id: str) -> CaseAnalysis:
    dataset = _WORKER["dataset"]
    try:
        return analyze_case(dataset, dataset.case(case_id), **_WORKER["kwargs"])
    except CmcsegError as e:
        # errors with their own __init__ signature (ImageReadError) cannot be unpickled in the parent
        raise CmcsegError(str(e)) from None


def _analyze_all(dataset: Dataset, kwargs: dict, num_workers: int, progress: bool) -> list[CaseAnalysis]:
    """Analyze every training case, in spawned processes when num_workers > 1 (as nnU-Net does), in case order."""
    cases = dataset.cases
    results: dict[str, CaseAnalysis] = {}
    with tqdm(total=len(cases), desc="fingerprint", unit="case", disable=not progress) as bar:
        if num_workers <= 1 or len(cases) <= 1:
            for case in cases:
                results[case.case_id] = analyze_case(dataset, case, **kwargs)
                bar.update()
        else:
            with process_pool(min(num_workers, len(cases)), initializer=_init_worker,
                              initargs=(dataset, kwargs)) as pool:
                futures = {pool.submit(_analyze_in_worker, c.case_id): c.case_id for c in cases}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
    return [results[c.case_id] for c in cases]


# ---------------------------------------------------------------------------------------- dataset level
def modality_components(results: Sequence[CaseAnalysis], channel_names: Mapping[int, str]) -> dict[int, int]:
    """Components per modality (RGB: 3), from the header of the first case holding each modality."""
    out: dict[int, int] = {}
    for r in results:
        for ch, entry in r.info["modalities"].items():
            out.setdefault(int(ch), int(entry["components"]))
    return {ch: out.get(ch, 1) for ch in sorted(channel_names)}


def unlabeled_modalities(dataset: Dataset) -> set[int]:
    """Modalities that no labelled training case holds: their statistics come from the nonzero region."""
    labeled = {ch for c in dataset.labeled_cases for ch in c.images}
    return set(dataset.channel_names) - labeled


def samples_per_case(dataset: Dataset, nonzero_modalities: set[int],
                     total: float = NUM_FOREGROUND_SAMPLES) -> dict[int, int]:
    """nnU-Net's rule: ``total // cases`` samples per case, counting the cases that contribute to a modality."""
    out = {}
    for m in dataset.channel_names:
        contributing = [c for c in dataset.cases if m in c.images and (c.labeled or m in nonzero_modalities)]
        out[m] = int(total // max(1, len(contributing)))
    return out


def intensity_statistics(sample: CountedSample) -> dict[str, float | None]:
    """nnU-Net's per-channel statistics of the pooled sample (None where a channel has none).

    Mean and std are count-weighted; the percentiles follow numpy's default (linear) rule on
    the expanded sample, read off the cumulative counts of the sorted values.
    """
    keys = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")
    if sample.size == 0:
        return dict.fromkeys(keys)
    order = np.argsort(sample.values, kind="stable")
    values = sample.values[order].astype(np.float64)
    counts = sample.counts[order]
    total = counts.sum()
    mean = float(np.dot(values, counts) / total)
    std = float(np.sqrt(np.dot((values - mean) ** 2, counts) / total))
    ends = np.cumsum(counts)  # expanded positions 0..ends[i]-1 hold values[i] (up to the previous end)

    def at(position: np.ndarray) -> np.ndarray:
        return values[np.searchsorted(ends, position, side="right")]

    positions = (total - 1) * _PERCENTILES / 100.0
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, total - 1)
    p005, median, p995 = at(lower) + (positions - lower) * (at(upper) - at(lower))
    stats = (mean, median, std, values[0], values[-1], p995, p005)
    return {k: float(v) for k, v in zip(keys, stats)}


def _pool_intensities(results: Sequence[CaseAnalysis], n_channels: int) -> list[CountedSample]:
    """Pool every case's samples per input channel; cases must agree on the channel layout."""
    pooled: list[list[CountedSample]] = [[] for _ in range(n_channels)]
    for r in results:
        if len(r.intensities) != n_channels:
            raise CmcsegError(
                f"case {r.case_id}: {len(r.intensities)} input channels after alignment, expected {n_channels} "
                f"(components per modality {r.channels_per_modality}). Fix: give each modality the same number of "
                "components (e.g. RGB vs grayscale) in every case."
            )
        for c, s in enumerate(r.intensities):
            pooled[c].append(s)
    return [CountedSample(np.concatenate([s.values for s in p]), np.concatenate([s.counts for s in p]))
            if p else CountedSample.empty() for p in pooled]


def extract_fingerprint(
    dataset: Dataset,
    reference_channel: int,
    num_workers: int = 2,
    transforms_folder: Path | str | None = None,
    num_foreground_samples: float = NUM_FOREGROUND_SAMPLES,
    progress: bool = True,
) -> dict:
    """Fingerprint every training case in the reference space of ``reference_channel``.

    Returns a JSON-ready dict with nnU-Net's keys plus cmcseg's (``schema_version``,
    ``reference_channel``, ``reference_modality``, ``pairing``, ``channels_per_modality``,
    ``intensity_sampling_per_channel``, ``cases``, ``summary``). ``transforms_folder`` holds
    the rigid transforms of ``--register rigid`` (:mod:`cmcseg.preprocessing.registration`).
    """
    if not dataset.cases:
        raise CmcsegError(f"dataset {dataset.name} has no training cases. Fix: add cases to imagesTr/.")
    nonzero = unlabeled_modalities(dataset)
    for m in sorted(nonzero):
        log.warning("no labelled case holds modality %s: its intensity statistics come from its nonzero region",
                    dataset.channel_names[m])
    kwargs = {"reference_channel": reference_channel,
              "samples_per_modality": samples_per_case(dataset, nonzero, num_foreground_samples),
              "nonzero_modalities": sorted(nonzero), "transforms_folder": transforms_folder}
    results = _analyze_all(dataset, kwargs, num_workers, progress)
    components = modality_components(results, dataset.channel_names)
    modality_of = input_channel_modalities(components)
    pooled = _pool_intensities(results, len(modality_of))
    stats = {str(c): intensity_statistics(p) for c, p in enumerate(pooled)}
    for c, s in stats.items():
        if s["mean"] is None:
            log.warning("input channel %s (%s) has no intensity samples: no labelled foreground inside its field "
                        "of view", c, dataset.channel_names[modality_of[int(c)]])
    fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "spacings": [r.spacing for r in results],
        "shapes_after_crop": [r.shape_after_crop for r in results],
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median([r.relative_size_after_cropping for r in results])),
        "reference_channel": int(reference_channel),
        "reference_modality": dataset.channel_names[reference_channel],
        "pairing": dataset.pairing,
        "modalities": dataset.modalities,
        "channels_per_modality": {str(m): n for m, n in components.items()},
        "intensity_sampling_per_channel": {
            str(c): SAMPLED_NONZERO if m in nonzero else SAMPLED_FOREGROUND for c, m in enumerate(modality_of)},
        "cases": {r.case_id: r.info for r in results},
    }
    fingerprint["summary"] = summarize(fingerprint, dataset.name)
    return fingerprint


# ---------------------------------------------------------------------------------------- summary
def _number(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _fmt(values: Iterable[float], digits: int = 2) -> str:
    """``5x1.25x1.25``: at most ``digits`` decimals, without trailing zeros."""
    return "x".join(_number(float(v), digits) for v in values)


def _relation_lines(fingerprint: dict) -> list[str]:
    """Per modality: how its grids relate to the reference; then the misaligned cases."""
    cases = fingerprint["cases"]
    if fingerprint["pairing"] == "unpaired":
        return ["Modalities are unpaired: each case is its own reference space."]
    if len(fingerprint["modalities"]) == 1:
        return []
    ref = fingerprint["reference_channel"]
    lines, misaligned, offsets, overlaps = ["Modality grids relative to the reference:"], set(), [], []
    for ch, name in enumerate(fingerprint["modalities"]):
        if ch == ref:
            continue
        kinds: dict[str, int] = {}
        for cid, info in cases.items():
            rel = info["modalities"].get(str(ch), {}).get("relation")
            if rel is None:
                continue
            kinds[rel["kind"]] = kinds.get(rel["kind"], 0) + 1
            if rel["kind"] == "misaligned":
                misaligned.add(cid)
                offsets.append(rel["centre_offset_mm"])
                overlaps.append(rel["overlap_fraction"])
        lines.append(f"  {name} vs {fingerprint['reference_modality']}: "
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if misaligned:
        lines.append(f"Misaligned modalities in {len(misaligned)} of {len(cases)} cases (max centre offset "
                     f"{max(offsets):.1f} mm, min overlap {min(overlaps):.0%}); they are resampled into the "
                     "reference space.")
    else:
        lines.append("No misaligned modalities.")
    return lines


def _channel_range(comps: dict, modality: int) -> str:
    """The input channel number(s) of a modality, e.g. ``1`` or ``3-5`` for an RGB modality."""
    first = sum(int(comps[str(i)]) for i in range(modality))
    n = int(comps[str(modality)])
    return f"{first}" if n == 1 else f"{first}-{first + n - 1}"


def summarize(fingerprint: dict, dataset_name: str = "") -> str:
    """A human-readable multi-line account of a fingerprint (cases, modalities, spacing, alignment, intensities)."""
    cases = fingerprint["cases"]
    n_labeled = sum(info["labeled"] for info in cases.values())
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    flat = bool(len(spacings)) and bool(np.all(spacings[:, 0] >= SPACING_2D_SLICE))  # 2D: the placeholder slice axis
    if flat:  # show (y, x) only: the z spacing of a 2D image is a placeholder, not a measurement
        spacings, shapes, axes = spacings[:, 1:], shapes[:, 1:], "(y, x)"
    else:
        axes = "(z, y, x)"
    median_spacing = np.median(spacings, 0)
    anisotropy = float(median_spacing.max() / median_spacing.min())
    n_aniso = int(np.sum(spacings.max(1) / spacings.min(1) >= 3))
    modalities = fingerprint["modalities"]
    comps = fingerprint["channels_per_modality"]
    lines = [
        f"Dataset {dataset_name}: {len(cases)} training cases, {n_labeled} labeled, {len(cases) - n_labeled} "
        f"unlabeled; pairing {fingerprint['pairing']}{'; 2D images' if flat else ''}",
        "Modalities (input channels): " + ", ".join(
            f"{m} ({_channel_range(comps, i)})" for i, m in enumerate(modalities))
        + f"; reference {fingerprint['reference_modality']}",
        f"Spacing {axes} mm: min {_fmt(spacings.min(0))}, median {_fmt(median_spacing)}, max {_fmt(spacings.max(0))}",
        f"Shape after crop {axes}: min {_fmt(shapes.min(0), 0)}, median {_fmt(np.median(shapes, 0), 0)}, "
        f"max {_fmt(shapes.max(0), 0)}; median relative size after cropping "
        f"{fingerprint['median_relative_size_after_cropping']:.2f}",
        f"Anisotropy of the median spacing: {anisotropy:.1f} ({n_aniso} of {len(cases)} cases at 3 or more)",
        *_relation_lines(fingerprint),
    ]
    channel_names = [m if comps[str(i)] == 1 else f"{m}[{k}]"
                     for i, m in enumerate(modalities) for k in range(comps[str(i)])]
    for c, s in fingerprint["foreground_intensity_properties_per_channel"].items():
        how = fingerprint["intensity_sampling_per_channel"][c]
        if s["mean"] is None:
            lines.append(f"Intensities of {channel_names[int(c)]} (input channel {c}): no samples")
            continue
        lines.append(f"Intensities of {channel_names[int(c)]} (input channel {c}, {how} inside its field of view): "
                     f"mean {s['mean']:.4g}, std {s['std']:.4g}, 0.5-99.5% [{s['percentile_00_5']:.4g}, "
                     f"{s['percentile_99_5']:.4g}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- files
def write_fingerprint(fingerprint: dict, path: Path | str) -> None:
    """Write fingerprint.json atomically."""
    write_json_atomic(fingerprint, path)


def load_fingerprint(path: Path | str) -> dict:
    """Read fingerprint.json, refusing a schema this version does not know."""
    fingerprint = read_json(path)
    if fingerprint.get("schema_version") != SCHEMA_VERSION:
        raise CmcsegError(f"{path}: fingerprint schema_version {fingerprint.get('schema_version')!r}, expected "
                          f"{SCHEMA_VERSION}. Fix: rerun `cmcseg plan` to recompute it.")
    return fingerprint
