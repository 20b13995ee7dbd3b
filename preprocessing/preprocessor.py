"""Executing a plan: raw cases -> cropped, normalised, resampled arrays on disk.

Per case this does what nnU-Net's ``DefaultPreprocessor`` does, with nnU-Net's own functions,
plus the step nnU-Net lacks (alignment of misaligned modalities):

1. read every modality and resample it into the reference modality's physical space
   (:func:`cmcseg.preprocessing.case_loading.load_case_in_reference_space`), optionally with
   rigid registration transforms; a field-of-view (FOV) mask per modality marks where it has data;
2. transpose (``plans["transpose_forward"]``);
3. crop to the nonzero region (nnU-Net's ``crop_to_nonzero``; the seg gets -1 outside it);
4. normalise each input channel with its planned scheme (nnU-Net's classes), statistics from
   inside that modality's FOV only, 0 outside it;
5. resample data, seg and FOV to the configuration's spacing (nnU-Net's
   ``resample_data_or_seg_to_shape``; the FOV as a segmentation with order 0);
6. sample class locations for foreground oversampling (nnU-Net's sampler, fixed seed), write.

Each case is a pure function of (case files, plans, configuration), so it runs in worker
processes, and its content hash lets a rerun skip cases that did not change.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from tqdm import tqdm

from cmcseg.dataset import Case, Dataset
from cmcseg.errors import CmcsegError, WriteFaultError
from cmcseg.image_io import geometry_of, make_folder, read_image_header, write_fault
from cmcseg.parallel import process_pool
from cmcseg.plans.plans import Configuration, foreground_labels, input_channel_modalities, plan_configuration
from cmcseg.preprocessing.alignment import GridGeometry
from cmcseg.preprocessing.case_loading import load_case_in_reference_space
from cmcseg.preprocessing.normalization import normalize_channel
from cmcseg.preprocessing.registration import load_transforms, register_dataset
from cmcseg.preprocessing.storage import case_files, load_case, read_properties, write_case

__all__ = [
    "PREPROCESSOR_VERSION", "PreprocessReport", "PreprocessedCase", "PreprocessingError", "case_content_hash",
    "load_case", "preprocess_case", "preprocess_dataset",
]

logger = logging.getLogger(__name__)

#: Bump when the output of the preprocessor changes for the same inputs: every case is redone.
PREPROCESSOR_VERSION = "cmcseg-preprocessor-1"
#: nnU-Net's seed for sampling class locations.
CLASS_LOCATIONS_SEED = 1234
#: Folder (under the preprocessed dataset folder) for rigid transforms when none is given.
REGISTRATION_DIR = "registration"

#: Plan-level keys whose value changes the preprocessed arrays.
_PLAN_KEYS = ("labels", "pairing", "reference_channel", "modalities", "channels_per_modality", "register",
              "label_interpolation", "transpose_forward", "transpose_backward")
#: Configuration keys whose value changes the preprocessed arrays (patch_size: the blosc2 layout).
_CONFIG_KEYS = ("data_identifier", "spacing", "patch_size", "normalization_schemes", "use_mask_for_norm",
                "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")
#: Schemes that compute their statistics from the image itself; others (CT) use the dataset's intensity properties.
_SELF_CONTAINED_SCHEMES = {"ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                           "RGBTo01Normalization"}


class PreprocessingError(CmcsegError):
    """One or more cases could not be preprocessed; every failure is listed (case, file, reason)."""

    def __init__(self, failures: Mapping[str, str], report: PreprocessReport | None = None):
        self.failures = dict(failures)
        self.report = report
        lines = "\n".join(f"  case {cid}: {msg}" for cid, msg in sorted(self.failures.items()))
        done = f" ({report.summary()})" if report is not None else ""
        super().__init__(f"preprocessing failed for {len(self.failures)} case(s){done}:\n{lines}\n"
                         "Fix: repair or remove the files named above, then run again; finished cases are skipped.")


@dataclass
class PreprocessReport:
    """What one ``preprocess_dataset`` call did."""

    configuration: str
    folder: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        def n(k: int) -> str:
            return f"{k} case{'s' if k != 1 else ''}"
        parts = [f"{n(len(self.processed))} preprocessed", f"{n(len(self.skipped))} unchanged, skipped"]
        if self.failed:
            parts.append(f"{n(len(self.failed))} failed")
        return ", ".join(parts) + f" ({self.seconds:.1f} s) -> {self.folder}"

    def as_dict(self) -> dict:
        return {"configuration": self.configuration, "folder": str(self.folder), "processed": self.processed,
                "skipped": self.skipped, "failed": self.failed, "seconds": round(self.seconds, 2),
                "summary": self.summary()}


@dataclass
class PreprocessedCase:
    """Arrays and properties of one preprocessed case, before writing."""

    data: np.ndarray  # float32 (C, z, y, x)
    seg: np.ndarray | None  # int8/int16 (1, z, y, x)
    fov: np.ndarray  # uint8 (M, z, y, x)
    properties: dict


# ---------------------------------------------------------------------- plan helpers
# ---------------------------------------------------------------------- hashing
def _hash_file(h: hashlib._Hash, path: Path, block: int = 1 << 20) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)


def case_content_hash(case: Case, plans: Mapping, configuration: str,
                      transform_files: Sequence[Path] = ()) -> str:
    """sha256 of what determines a case's preprocessed output.

    The input files' bytes (images, label, rigid transforms), the configuration's keys that
    change the arrays, the plan-level keys that do, the intensity properties of channels
    whose scheme uses them (CT), and the preprocessor version. File names, not folders,
    enter the hash: a moved dataset is not redone.
    """
    cfg = plan_configuration(plans, configuration)
    schemes = cfg.get("normalization_schemes", [])
    props = plans.get("foreground_intensity_properties_per_channel", {})
    used_props = {str(c): props.get(str(c)) for c, s in enumerate(schemes) if s not in _SELF_CONTAINED_SCHEMES}
    settings = {
        "version": PREPROCESSOR_VERSION,
        "configuration": {k: cfg.get(k) for k in _CONFIG_KEYS},
        "plan": {k: plans.get(k) for k in _PLAN_KEYS},
        "intensity_properties": used_props,
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    files = [(f"image_{ch:04d}", p) for ch, p in sorted(case.images.items())]
    files += [("label", case.label)] if case.label is not None else []
    files += [("transform", Path(p)) for p in sorted(transform_files)]
    for role, path in files:
        h.update(f"\n{role}:{Path(path).name}\n".encode())
        _hash_file(h, Path(path))
    return h.hexdigest()


def is_up_to_date(folder: Path, case_id: str, content_hash: str) -> bool:
    """True when a case's outputs exist and its properties carry ``content_hash``."""
    files = case_files(folder, case_id)
    if not files["properties"].is_file():
        return False
    try:
        props = read_properties(files["properties"])
    except (OSError, ValueError):
        return False
    needed = ["data", "fov"] + (["seg"] if props.get("labeled") else [])
    return props.get("content_hash") == content_hash and all(files[k].is_file() for k in needed)


def _transform_files(transforms_folder: Path | None, case: Case) -> list[Path]:
    if transforms_folder is None:
        return []
    return [p for ch in case.channels if (p := Path(transforms_folder) / f"{case.case_id}_{ch:04d}.tfm").is_file()]


# ---------------------------------------------------------------------- one case
@dataclass
class _Geometry:
    """Shapes, spacings and the crop of one case, as preprocessing goes (numpy axis order)."""

    reference: GridGeometry
    spacing_zyx: list[float]
    transpose_forward: list[int]
    spacing: list[float] = field(default_factory=list)  # transposed
    shape_before_cropping: list[int] = field(default_factory=list)
    bbox: list[list[int]] = field(default_factory=list)
    shape_after_cropping: list[int] = field(default_factory=list)
    target_spacing: list[float] = field(default_factory=list)
    new_shape: list[int] = field(default_factory=list)


def preprocess_case(
    dataset: Dataset,
    case: Case,
    plans: Mapping,
    configuration: str,
    transforms: Mapping[int, sitk.Transform] | None = None,
) -> PreprocessedCase:
    """Align, transpose, crop, normalise and resample one case; nothing is written.

    Memory: the case's float32 data is held about once, plus what nnU-Net's resampling
    allocates (it works in float64, one channel at a time here).
    """
    cfg = plan_configuration(plans, configuration)
    reference_channel = next(iter(case.images)) if dataset.unpaired else int(plans["reference_channel"])
    aligned = load_case_in_reference_space(dataset, case, reference_channel, transforms,
                                           plans.get("label_interpolation", "nearest"))
    geo = _Geometry(GridGeometry.of(aligned.reference), [float(s) for s in aligned.reference.GetSpacing()[::-1]],
                    [int(a) for a in plans.get("transpose_forward", [0, 1, 2])])
    data, fov, seg = aligned.data, aligned.fov, aligned.seg
    comps = {int(k): int(v) for k, v in aligned.channels_per_modality.items()}
    relations = {int(k): r.as_dict() for k, r in aligned.relations.items()}
    del aligned  # drops the reference image's pixel buffer
    _check_channels(case, comps, plans, data.shape[0])

    data, fov, seg = _transpose(data, fov, seg, geo)
    data, fov, nonzero_seg = _crop(data, fov, seg, geo)
    _normalize(data, fov, nonzero_seg, comps, cfg, plans)
    target = [float(s) for s in cfg["spacing"]]
    geo.target_spacing = [geo.spacing[0], *target] if len(target) < len(geo.spacing) else target  # 2d keeps z
    geo.new_shape = [int(s) for s in compute_new_shape(data.shape[1:], geo.spacing, geo.target_spacing)]
    data = _resample_data(data, geo.new_shape, geo.spacing, geo.target_spacing, cfg)
    fov = _resample_fov(fov, geo.new_shape, geo.spacing, geo.target_spacing, cfg)
    _zero_outside_fov(data, fov, comps)
    class_locations = None
    if seg is not None:
        del seg  # the cropped seg (with nnU-Net's -1 outside the nonzero region) goes on
        seg, class_locations = _resample_seg(nonzero_seg, geo, cfg, plans)
    del nonzero_seg

    properties = _properties(dataset, case, configuration, cfg, reference_channel, geo, comps, relations, fov,
                             transforms)
    properties["labeled"] = seg is not None
    if class_locations is not None:
        properties["class_locations"] = class_locations
    return PreprocessedCase(data, seg, fov, properties)


def _transpose(data: np.ndarray, fov: np.ndarray, seg: np.ndarray | None,
               geo: _Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """plans' transpose_forward on the spatial axes (views); seg gains nnU-Net's channel axis."""
    axes = [0, *[a + 1 for a in geo.transpose_forward]]
    geo.spacing = [geo.spacing_zyx[a] for a in geo.transpose_forward]
    geo.shape_before_cropping = [int(data.shape[a]) for a in axes[1:]]
    seg = seg[None].astype(_seg_dtype(seg)).transpose(axes) if seg is not None else None
    return data.transpose(axes), fov.transpose(axes), seg


def _crop(data: np.ndarray, fov: np.ndarray, seg: np.ndarray | None,
          geo: _Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nnU-Net's crop to the nonzero region of all channels (outside a FOV they are 0 already).

    Returns contiguous data and fov, and the seg with -1 outside the nonzero region (for an
    unlabeled case, nnU-Net's 0/-1 mask, which ``use_mask_for_norm`` needs).
    """
    data, nonzero_seg, bbox = crop_to_nonzero(data, seg)
    fov = fov[(slice(None), *bounding_box_to_slice(bbox))]
    geo.bbox = [[int(a), int(b)] for a, b in bbox]
    geo.shape_after_cropping = [int(s) for s in data.shape[1:]]
    return np.ascontiguousarray(data), np.ascontiguousarray(fov), np.ascontiguousarray(nonzero_seg)


def _resample_seg(seg: np.ndarray, geo: _Geometry, cfg: Configuration, plans: Mapping) -> tuple[np.ndarray, dict]:
    """The seg on the target grid, and nnU-Net's class locations for foreground oversampling."""
    seg = cfg.resampling_fn_seg(seg, geo.new_shape, geo.spacing, geo.target_spacing)
    locations = DefaultPreprocessor._sample_foreground_locations(seg, foreground_labels(plans),
                                                                 seed=CLASS_LOCATIONS_SEED)
    return seg.astype(_seg_dtype(seg), copy=False), {str(k): np.asarray(v).tolist() for k, v in locations.items()}


def _properties(dataset: Dataset, case: Case, configuration: str, cfg: Mapping, reference_channel: int,
                geo: _Geometry, comps: Mapping[int, int], relations: Mapping[int, dict], fov: np.ndarray,
                transforms: Mapping[int, sitk.Transform] | None) -> dict:
    """Everything needed to revert a prediction to the reference modality's original grid, and provenance."""
    ref = geo.reference
    return {
        "case_id": case.case_id,
        "configuration": configuration,
        "data_identifier": cfg["data_identifier"],
        "preprocessor_version": PREPROCESSOR_VERSION,
        "reference_channel": reference_channel,
        "reference_modality": dataset.channel_names.get(reference_channel, str(reference_channel)),
        "reference_geometry": _original_reference_geometry(case, reference_channel),
        "reference_geometry_3d": {"size": list(ref.size), "spacing": list(ref.spacing), "origin": list(ref.origin),
                                  "direction": list(ref.direction)},
        "spacing": geo.spacing_zyx,
        "transpose_forward": geo.transpose_forward,
        "transpose_backward": [int(a) for a in np.argsort(geo.transpose_forward)],
        "shape_before_cropping": geo.shape_before_cropping,
        "bbox_used_for_cropping": geo.bbox,
        "shape_after_cropping_and_before_resampling": geo.shape_after_cropping,
        "spacing_before_resampling": geo.spacing,
        "spacing_after_resampling": geo.target_spacing,
        "shape_after_resampling": geo.new_shape,
        "channels_per_modality": {str(k): v for k, v in comps.items()},
        "modality_relations": {str(k): {"modality": dataset.channel_names.get(k, str(k)), **v}
                               for k, v in relations.items()},
        "fov_fraction": {str(m): round(float(fov[i].mean()), 6) for i, m in enumerate(sorted(comps))},
        "registered_channels": sorted(int(k) for k in (transforms or {})),
        "source_files": {"images": {str(ch): Path(p).name for ch, p in case.images.items()},
                         "label": Path(case.label).name if case.label is not None else None},
    }


def _seg_dtype(seg: np.ndarray) -> type:
    """int8 where the labels (and nnU-Net's -1 outside the nonzero region) fit, as nnU-Net stores them; else int16."""
    return np.int8 if int(seg.max(initial=0)) <= 127 and int(seg.min(initial=0)) >= -128 else np.int16


def _check_channels(case: Case, comps: Mapping[int, int], plans: Mapping, n_channels: int) -> None:
    planned = {int(k): int(v) for k, v in plans.get("channels_per_modality", {}).items()}
    if planned and planned != dict(comps):
        files = ", ".join(str(p) for p in case.images.values())
        raise CmcsegError(f"case {case.case_id}: components per modality {dict(comps)} differ from the plans' "
                          f"{planned} (files: {files}). Fix: every case must have the same pixel type per "
                          "modality (e.g. RGB everywhere); convert the odd file or re-plan.")


def _normalize(data: np.ndarray, fov: np.ndarray, nonzero_seg: np.ndarray, comps: Mapping[int, int],
               cfg: Mapping, plans: Mapping) -> None:
    """Normalise every input channel of ``data`` in place, with its modality's FOV."""
    modality_of = input_channel_modalities(comps)
    modalities = sorted(comps)
    schemes, use_mask = cfg["normalization_schemes"], cfg.get("use_mask_for_norm", [False] * len(modality_of))
    if len(schemes) != data.shape[0]:
        raise CmcsegError(f"the plans give {len(schemes)} normalisation schemes for {data.shape[0]} input channels. "
                          "Fix: re-plan the dataset.")
    props = plans.get("foreground_intensity_properties_per_channel", {})
    for c in range(data.shape[0]):
        m = modalities.index(modality_of[c])
        out = normalize_channel(data[c], schemes[c], props.get(str(c)), bool(use_mask[c]), fov[m], nonzero_seg[0])
        if not np.shares_memory(out, data[c]):
            data[c] = out


def _resample_data(data: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float],
                   target: Sequence[float], cfg: Configuration) -> np.ndarray:
    """nnU-Net's data resampling, one channel at a time (it works in float64), into one float32 array."""
    if list(data.shape[1:]) == list(new_shape):
        return data
    fn = cfg.resampling_fn_data  # nnU-Net's function with the plan's arguments
    if data.shape[0] == 1:
        return fn(data, new_shape, spacing, target).astype(np.float32, copy=False)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        out[c] = fn(data[c:c + 1], new_shape, spacing, target)[0]
    return out


def _resample_fov(fov: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float],
                  target: Sequence[float], cfg: Configuration) -> np.ndarray:
    """FOV masks resampled as segmentations with order 0 (a full mask stays full without work)."""
    if list(fov.shape[1:]) == list(new_shape):
        return fov
    fn = cfg.resampling_fn_seg  # the plan's arguments, with order 0 for masks
    force = cfg.get("resampling_fn_seg_kwargs", {}).get("force_separate_z")
    out = np.empty((fov.shape[0], *new_shape), dtype=np.uint8)
    for m in range(fov.shape[0]):
        if fov[m].all():
            out[m] = 1
        else:
            out[m] = fn(fov[m:m + 1], new_shape, spacing, target, is_seg=True, order=0, order_z=0,
                        force_separate_z=force)[0]
    return out


def _zero_outside_fov(data: np.ndarray, fov: np.ndarray, comps: Mapping[int, int]) -> None:
    """Interpolation bleeds values across a FOV border; outside a modality's FOV its channels stay 0."""
    modality_of, modalities = input_channel_modalities(comps), sorted(comps)
    for c in range(data.shape[0]):
        mask = fov[modalities.index(modality_of[c])]
        if not mask.all():
            data[c][mask == 0] = 0


def _original_reference_geometry(case: Case, reference_channel: int) -> dict:
    """The reference image's own header geometry (2D stays 2D): predictions are written back onto it."""
    geometry = geometry_of(read_image_header(case.images[reference_channel], case=case.case_id))
    return {**geometry, "dimension": len(geometry["size"])}


# ---------------------------------------------------------------------- dataset
def _run_case_job(dataset: Dataset, case: Case, plans: Mapping, configuration: str, out_dir: str,
                  transforms_folder: str | None, content_hash: str) -> tuple[str, str | None]:
    """Worker: preprocess and write one case; returns (case id, None) or (case id, error message).

    Errors come back as text: exceptions with custom constructors do not survive pickling.
    """
    try:
        transforms = load_transforms(transforms_folder, case.case_id) if transforms_folder else None
        result = preprocess_case(dataset, case, plans, configuration, transforms)
        result.properties["content_hash"] = content_hash
        cfg = plan_configuration(plans, configuration)
        write_case(out_dir, case.case_id, result.data, result.seg, result.fov, result.properties, cfg["patch_size"])
        return case.case_id, None
    except WriteFaultError:  # the output folder, not the case: stop, and do not blame the raw files
        raise
    except CmcsegError as e:  # already names the case and file
        return case.case_id, str(e)
    except Exception as e:  # noqa: BLE001 - every case is reported, not only the first
        fault = write_fault(out_dir, e)
        if fault is not None:
            raise fault from e
        files = ", ".join(str(p) for p in [*case.images.values(), *([case.label] if case.label else [])])
        logger.debug("case %s failed", case.case_id, exc_info=True)
        return case.case_id, f"{type(e).__name__}: {e} (files: {files})"


def _remove_stale_temporaries(folder: Path) -> None:
    """Hidden temporaries left by a killed run (finished files are never partial)."""
    if folder.is_dir():
        for p in folder.glob(".tmp-*"):
            p.unlink(missing_ok=True)


def preprocess_dataset(
    dataset: Dataset,
    plans: Mapping,
    configuration: str,
    out_folder: Path | str,
    num_workers: int = 2,
    transforms_folder: Path | str | None = None,
    cases: Sequence[Case] | None = None,
    progress: bool = True,
) -> PreprocessReport:
    """Preprocess the training cases (labeled and unlabeled) of ``dataset`` for one configuration.

    Writes into ``out_folder/<data_identifier>/``. Cases whose content hash matches their
    stored one are skipped. With ``plans["register"] == "rigid"`` the transforms come from
    ``transforms_folder`` (default ``out_folder/registration``; missing cases are registered
    first). Every case is attempted; failures then raise one PreprocessingError naming each
    case and file.
    """
    start = time.perf_counter()
    cfg = plan_configuration(plans, configuration)
    out_dir = Path(out_folder) / cfg["data_identifier"]
    make_folder(out_dir)
    _remove_stale_temporaries(out_dir)
    cases = list(dataset.cases if cases is None else cases)
    if plans.get("register", "none") == "rigid" and not dataset.unpaired:
        if transforms_folder is None:
            transforms_folder = Path(out_folder) / REGISTRATION_DIR
            register_dataset(dataset, int(plans["reference_channel"]), transforms_folder, num_workers,
                             cases=cases, progress=progress)
    tf_folder = Path(transforms_folder) if transforms_folder is not None else None

    report = PreprocessReport(configuration, out_dir)
    todo: list[tuple[Case, str]] = []
    for case in cases:
        h = case_content_hash(case, plans, configuration, _transform_files(tf_folder, case))
        if is_up_to_date(out_dir, case.case_id, h):
            report.skipped.append(case.case_id)
        else:
            todo.append((case, h))
    if report.skipped:
        logger.info("%s: %d case%s unchanged, skipped", configuration, len(report.skipped),
                    "" if len(report.skipped) == 1 else "s")

    jobs = [(dataset, case, plans, configuration, str(out_dir), str(tf_folder) if tf_folder else None, h)
            for case, h in todo]
    bar = tqdm(total=len(jobs), desc=f"preprocessing {configuration}", unit="case", disable=not progress or not jobs)
    for case_id, error in _run_jobs(jobs, num_workers):
        if error is None:
            report.processed.append(case_id)
        else:
            report.failed[case_id] = error
            logger.error("case %s: %s", case_id, error)
        bar.update(1)
    bar.close()
    report.processed.sort()
    report.seconds = time.perf_counter() - start
    logger.info("%s: %s", configuration, report.summary())
    if report.failed:
        raise PreprocessingError(report.failed, report)
    return report


def _run_jobs(jobs: list[tuple], num_workers: int):
    """Yield (case id, error) as jobs finish: in this process for one worker, else in spawned processes."""
    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _run_case_job(*job)
        return
    with process_pool(min(num_workers, len(jobs))) as pool:
        futures = [pool.submit(_run_case_job, *job) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()
