"""Optional rigid registration of each modality to the reference modality (``--register rigid``).

Alignment by headers (:mod:`cmcseg.preprocessing.alignment`) is exact when the headers tell
the truth. When the patient moved between sequences, or a header is wrong, a rigid
correction on top of the headers helps. cmcseg estimates it with SimpleITK: Mattes mutual
information (works across contrasts), a centred Euler transform (CenteredTransformInitializer),
multi-resolution gradient descent with a line search on a near-isotropic working grid over
the reference (thick-slice MR), and seeded random sampling on one ITK thread, so the same
images always give bitwise the same transform.

The transform maps reference (fixed) points to modality (moving) points, which is what
:func:`cmcseg.preprocessing.alignment.resample_to_reference` takes. A result whose metric did
not improve, whose images share almost no information, or whose correction is implausibly
large for a correction of the headers is reported as not successful, with the reason;
the preprocessor then falls back to the headers for that modality.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from cmcseg.dataset import Case, Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import atomic_path, json_safe, make_folder, read_json, write_json_atomic
from cmcseg.parallel import process_pool
from cmcseg.preprocessing.alignment import as_3d, physical_centre
from cmcseg.preprocessing.case_loading import read_case_images

logger = logging.getLogger(__name__)

#: Default plausibility bounds of a rigid correction on top of the headers.
MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION_MM = 30.0
#: Below this mutual information (nats, Mattes estimate) the two images share too little
#: structure for the registration to mean anything (e.g. one of them is noise).
MIN_MUTUAL_INFORMATION = 0.05
DEFAULT_SEED = 12345
#: ITK threads per registration: results then do not depend on the machine's core count.
NUM_THREADS = 1


@dataclass
class RegistrationResult:
    """A rigid registration: the transform (reference -> modality points) and how much to trust it."""

    transform: sitk.Transform
    metric_before: float
    metric_after: float
    iterations: int
    stop_condition: str
    success: bool
    reason: str
    rotation_deg: float
    translation_mm: float
    parameters: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready summary (the transform itself goes to a .tfm file)."""
        return {
            "success": self.success,
            "reason": self.reason,
            "metric": "mattes_mutual_information (negative; lower is better)",
            "metric_before": json_safe(round(float(self.metric_before), 6)),
            "metric_after": json_safe(round(float(self.metric_after), 6)),
            "iterations": self.iterations,
            "stop_condition": self.stop_condition,
            "rotation_deg": round(self.rotation_deg, 4),
            "translation_mm": round(self.translation_mm, 4),
            "transform_parameters": [float(p) for p in self.transform.GetParameters()],
            "transform_fixed_parameters": [float(p) for p in self.transform.GetFixedParameters()],
            "settings": self.parameters,
        }




# ---------------------------------------------------------------------- image helpers
def _scalar_float(image: sitk.Image) -> sitk.Image:
    """3D float32 scalar image: vector pixels (RGB) are averaged."""
    image = as_3d(image)
    n = image.GetNumberOfComponentsPerPixel()
    if n == 1:
        return sitk.Cast(image, sitk.sitkFloat32)
    total = sitk.VectorIndexSelectionCast(image, 0, sitk.sitkFloat32)
    for i in range(1, n):
        total = total + sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32)
    return total / float(n)


def working_grid(fixed: sitk.Image, max_isotropic_mm: float = 2.0) -> sitk.Image:
    """An empty grid over ``fixed``'s extent with near-isotropic spacing, where the metric is sampled.

    Thick-slice MR (0.5 x 0.5 x 3 mm) is coarsened in-plane towards the slice thickness
    (capped at ``max_isotropic_mm``), so that in-plane and through-plane detail weigh alike
    and the metric is cheap; grids already coarser than that are kept.
    """
    spacing = np.asarray(fixed.GetSpacing(), float)
    iso = min(float(spacing.max()), max_isotropic_mm)
    new_spacing = np.maximum(spacing, iso)
    size = np.maximum(1, np.round(np.asarray(fixed.GetSize()) * spacing / new_spacing)).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in new_spacing))
    grid.SetDirection(fixed.GetDirection())
    # keep the physical centre: first voxel centre moves by half the change of voxel size
    centre = physical_centre(fixed)
    d = np.asarray(fixed.GetDirection()).reshape(3, 3)
    grid.SetOrigin(tuple(centre - d @ ((size - 1) / 2.0 * new_spacing)))
    return grid


def overlap_mask(moving: sitk.Image, grid: sitk.Image, margin_mm: float) -> sitk.Image | None:
    """uint8 mask on ``grid`` of where ``moving`` has data by its header, shrunk by ``margin_mm``.

    Sampling the metric only there keeps the sample set the same while the transform moves,
    so the optimiser cannot gain by pushing points out of the overlap. None when the
    overlap is (nearly) everything or too small to shrink.
    """
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    mask = sitk.Resample(ones, grid, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    radius = [int(round(margin_mm / s)) for s in grid.GetSpacing()]
    if any(r > 0 for r in radius):
        mask = sitk.BinaryErode(mask, radius, sitk.sitkBox, 0, 1, boundaryToForeground=True)
    n = int(sitk.GetArrayViewFromImage(mask).sum())
    return mask if n >= 1000 else None


def _resample_onto(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    return sitk.Resample(image, grid, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def rotation_angle_deg(transform: sitk.Transform) -> float:
    """Rotation angle of a rigid transform's matrix, in degrees."""
    m = np.asarray(sitk.Euler3DTransform(transform).GetMatrix()).reshape(3, 3)
    cos = np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def displacement_at(transform: sitk.Transform, point: Sequence[float] | np.ndarray) -> float:
    """How far (mm) the transform moves ``point``."""
    p = np.asarray(point, float)
    return float(np.linalg.norm(np.asarray(transform.TransformPoint(tuple(p))) - p))


# ---------------------------------------------------------------------- registration
def _metric_method(bins: int, sampling_percentage: float, seed: int,
                   fixed_mask: sitk.Image | None = None) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(NUM_THREADS)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling_percentage, seed)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def evaluate_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, bins: int = 32,
                    sampling_percentage: float = 0.5, seed: int = DEFAULT_SEED,
                    fixed_mask: sitk.Image | None = None) -> float:
    """Mattes mutual information (negative, lower is better) of ``moving`` seen through ``transform`` on ``fixed``."""
    method = _metric_method(bins, sampling_percentage, seed, fixed_mask)
    method.SetInitialTransform(sitk.Transform(transform), inPlace=True)
    return float(method.MetricEvaluate(fixed, moving))


def _initial_transform(fixed: sitk.Image, moving: sitk.Image, initialization: str) -> sitk.Euler3DTransform:
    """Centred Euler transform: rotation about the fixed image's centre.

    ``header`` starts from the headers (zero translation; the usual case, where headers are
    roughly right); ``geometry`` starts with the centres of the two extents on top of each
    other (CenteredTransformInitializer GEOMETRY; for headers that are far off).
    """
    tx = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                           sitk.CenteredTransformInitializerFilter.GEOMETRY)
    tx = sitk.Euler3DTransform(tx)
    if initialization == "header":
        tx.SetTranslation((0.0, 0.0, 0.0))
    elif initialization != "geometry":
        raise ValueError(f"initialization must be 'header' or 'geometry', got {initialization!r}")
    return tx


def register_rigid(
    moving: sitk.Image,
    fixed: sitk.Image,
    *,
    initialization: str = "header",
    histogram_bins: int = 32,
    sampling_percentage: float = 0.2,
    min_samples: int = 5000,
    seed: int = DEFAULT_SEED,
    iterations: int = 100,
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_sigmas_mm: Sequence[float] = (2.0, 0.0),
    max_isotropic_mm: float = 2.0,
    use_overlap_mask: bool = True,
    margin_mm: float = 5.0,
    max_rotation_deg: float = MAX_ROTATION_DEG,
    max_translation_mm: float = MAX_TRANSLATION_MM,
    min_mutual_information: float = MIN_MUTUAL_INFORMATION,
) -> RegistrationResult:
    """Rigidly register ``moving`` to ``fixed`` (both in physical space, headers honoured).

    Returns the transform that maps fixed points to moving points, the metric before and
    after, the optimiser's iterations and stop condition, and a verdict with its reason.
    Runs ITK single-threaded, so that the result is bitwise the same on every machine.
    """
    fixed_f, moving_f = _scalar_float(fixed), _scalar_float(moving)
    fixed_w = _resample_onto(fixed_f, working_grid(fixed_f, max_isotropic_mm))
    identity = _initial_transform(fixed_w, moving_f, "header")
    settings = {"initialization": initialization, "histogram_bins": histogram_bins, "seed": seed,
                "iterations": iterations, "working_spacing": [float(s) for s in fixed_w.GetSpacing()]}
    too_small = _too_small(fixed_w, moving_f)
    if too_small:
        return RegistrationResult(identity, math.nan, math.nan, 0, "not run", False, too_small, 0.0, 0.0, settings)
    mask = overlap_mask(moving_f, fixed_w, margin_mm) if use_overlap_mask else None
    n_samples = int(sitk.GetArrayViewFromImage(mask).sum()) if mask is not None else int(np.prod(fixed_w.GetSize()))
    percentage = float(min(1.0, max(sampling_percentage, min_samples / max(n_samples, 1))))
    levels = [(f, s) for f, s in zip(shrink_factors, smoothing_sigmas_mm) if min(fixed_w.GetSize()) // f >= 4]
    levels = levels or [(1, 0.0)]
    settings.update(sampling_percentage=percentage, shrink_factors=[f for f, _ in levels],
                    smoothing_sigmas_mm=[s for _, s in levels])

    with _single_threaded():
        method = _metric_method(histogram_bins, percentage, seed, mask)
        _set_optimizer(method, iterations)
        method.SetShrinkFactorsPerLevel([f for f, _ in levels])
        method.SetSmoothingSigmasPerLevel([s for _, s in levels])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(_initial_transform(fixed_w, moving_f, initialization), inPlace=False)
        iterations_done = [0]
        method.AddCommand(sitk.sitkIterationEvent, lambda: iterations_done.__setitem__(0, iterations_done[0] + 1))
        try:
            transform = _as_euler(method.Execute(fixed_w, moving_f))
            stop = method.GetOptimizerStopConditionDescription()
        except RuntimeError as e:  # e.g. too few samples in the overlap
            transform = sitk.Euler3DTransform(identity)
            stop = f"registration failed: {str(e).strip().splitlines()[-1]}"
        before = evaluate_metric(fixed_w, moving_f, identity, histogram_bins, seed=seed, fixed_mask=mask)
        after = evaluate_metric(fixed_w, moving_f, transform, histogram_bins, seed=seed, fixed_mask=mask)
    rotation = rotation_angle_deg(transform)
    translation = displacement_at(transform, physical_centre(fixed_f))
    success, reason = _verdict(before, after, rotation, translation, stop, max_rotation_deg, max_translation_mm,
                               min_mutual_information)
    return RegistrationResult(transform, before, after, iterations_done[0], stop, success, reason, rotation,
                              translation, settings)


def _too_small(fixed_w: sitk.Image, moving: sitk.Image) -> str:
    """Why the images are too small to register (ITK's smoothing needs 4 voxels per axis), or ''."""
    for name, img in (("reference (on the working grid)", fixed_w), ("moving image", moving)):
        if min(img.GetSize()) < 4:
            return (f"the {name} has only {min(img.GetSize())} voxel(s) along an axis (size {list(img.GetSize())}); "
                    "rigid registration needs at least 4, so the headers are used")
    return ""


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run ITK filters single-threaded inside the block (ITK's multi-threaded sums are not bitwise reproducible)."""
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def _set_optimizer(method: sitk.ImageRegistrationMethod, iterations: int) -> None:
    """Gradient descent with a line search, scaled so one unit of every parameter moves voxels alike.

    On real prostate T2W/ADC pairs the regular-step variant wandered off the optimum of a
    shallow mutual-information landscape; the line search keeps the metric decreasing.
    """
    method.SetOptimizerAsGradientDescentLineSearch(learningRate=1.0, numberOfIterations=iterations,
                                                   convergenceMinimumValue=1e-6, convergenceWindowSize=10)
    method.SetOptimizerScalesFromPhysicalShift()


def _as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The optimised Euler transform out of what Execute returns (possibly wrapped in a composite)."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise RuntimeError("unexpected composite transform from rigid registration")
        transform = composite.GetNthTransform(0)
    return sitk.Euler3DTransform(transform)


def _verdict(before: float, after: float, rotation: float, translation: float, stop: str, max_rotation: float,
             max_translation: float, min_mi: float) -> tuple[bool, str]:
    """Success and the reason for the verdict."""
    problems = []
    if stop.startswith("registration failed"):
        problems.append(stop)
    if not math.isfinite(after) or after > before + 1e-6:
        problems.append(f"the metric did not improve ({before:.4f} -> {after:.4f})")
    if -after < min_mi:
        problems.append(f"the images share too little information (mutual information {-after:.4f} < {min_mi})")
    if rotation > max_rotation:
        problems.append(f"rotation {rotation:.1f} deg exceeds the plausible {max_rotation:.1f} deg")
    if translation > max_translation:
        problems.append(f"translation {translation:.1f} mm exceeds the plausible {max_translation:.1f} mm")
    if problems:
        return False, "; ".join(problems)
    return True, (f"metric improved {before:.4f} -> {after:.4f}; rotation {rotation:.2f} deg, "
                  f"translation {translation:.2f} mm")


# ---------------------------------------------------------------------- cases and files
def register_case(dataset: Dataset, case: Case, reference_channel: int, **kwargs) -> dict[int, RegistrationResult]:
    """Register every non-reference channel of a case to its reference channel (none for unpaired datasets)."""
    if dataset.unpaired or reference_channel not in case.images:
        return {}
    images = read_case_images(case)
    fixed = images[reference_channel]
    results = {}
    for ch in sorted(images):
        if ch == reference_channel:
            continue
        res = register_rigid(images[ch], fixed, **kwargs)
        level = logging.INFO if res.success else logging.WARNING
        logger.log(level, "case %s: rigid registration of channel %d (%s) to %d (%s): %s; %s", case.case_id, ch,
                   dataset.channel_names.get(ch, "?"), reference_channel,
                   dataset.channel_names.get(reference_channel, "?"),
                   "success" if res.success else "NOT successful, the headers are used", res.reason)
        results[ch] = res
    return results


def transform_file(folder: Path | str, case_id: str, channel: int) -> Path:
    return Path(folder) / f"{case_id}_{channel:04d}.tfm"


def report_file(folder: Path | str, case_id: str) -> Path:
    return Path(folder) / f"{case_id}_registration.json"


def save_transforms(results: Mapping[int, RegistrationResult], folder: Path | str, case_id: str) -> Path:
    """Write ``CASE_XXXX.tfm`` for each successful registration and ``CASE_registration.json`` with every verdict.

    A channel whose registration failed gets no .tfm (a stale one is removed): the headers are used for it.
    The report is written last; it marks the case as registered.
    """
    folder = Path(folder)
    make_folder(folder)
    report_file(folder, case_id).unlink(missing_ok=True)
    channels = {}
    for ch, res in sorted(results.items()):
        path = transform_file(folder, case_id, ch)
        if res.success:
            with atomic_path(path) as tmp:
                sitk.WriteTransform(res.transform, str(tmp))
        else:
            path.unlink(missing_ok=True)
        channels[str(ch)] = {**res.as_dict(), "applied": res.success, "file": path.name if res.success else None}
    write_json_atomic({"case_id": case_id, "method": "rigid", "channels": channels}, report_file(folder, case_id))
    return report_file(folder, case_id)


def load_transforms(folder: Path | str, case_id: str) -> dict[int, sitk.Transform]:
    """The transforms saved for a case, keyed by channel (empty when there are none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    pattern = re.compile(rf"^{re.escape(case_id)}_(\d{{4}})\.tfm$")
    out = {}
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m:
            try:
                out[int(m.group(1))] = sitk.ReadTransform(str(path))
            except RuntimeError as e:
                raise CmcsegError(f"case {case_id}: cannot read transform {path}: {str(e).strip().splitlines()[-1]}. "
                                  "Fix: delete the file and its CASE_registration.json to register again.") from None
    return out


def is_registered(folder: Path | str, case_id: str) -> bool:
    """True when a case's registration report exists (its transforms are complete)."""
    return report_file(folder, case_id).is_file()


def read_registration_report(folder: Path | str, case_id: str) -> dict:
    return read_json(report_file(folder, case_id))


def _register_and_save(dataset: Dataset, case: Case, reference_channel: int, folder: str) -> tuple[str, str | None]:
    """Worker: register one case and save its transforms; returns (case id, error message or None)."""
    try:
        save_transforms(register_case(dataset, case, reference_channel), folder, case.case_id)
        return case.case_id, None
    except Exception as e:  # noqa: BLE001 - reported per case; custom exceptions do not survive pickling
        return case.case_id, f"{type(e).__name__}: {e}"


def registration_summary(folder: Path | str, case_id: str) -> dict:
    """Per-case summary from its report: overall success, and per channel whether its transform is applied."""
    report = read_registration_report(folder, case_id)
    channels = report.get("channels", {})
    return {
        "success": all(c.get("success") for c in channels.values()),
        "applied_channels": sorted(int(k) for k, c in channels.items() if c.get("applied")),
        "failed_channels": {k: c.get("reason", "") for k, c in channels.items() if not c.get("success")},
    }


def register_dataset(
    dataset: Dataset,
    reference_channel: int,
    folder: Path | str,
    num_workers: int = 1,
    cases: Sequence[Case] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Rigidly register every case's modalities to its reference; cases already registered are kept.

    Returns case id -> :func:`registration_summary` for every case (registered now or before).
    Unpaired datasets have nothing to register. Failures of single cases are collected and
    raised together after the others are done.
    """
    if dataset.unpaired:
        return {}
    cases = list(dataset.cases + dataset.test_cases if cases is None else cases)
    todo = [c for c in cases if overwrite or not is_registered(folder, c.case_id)]
    if len(todo) < len(cases):
        logger.info("rigid registration: %d case(s) already registered, kept", len(cases) - len(todo))
    errors: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="rigid registration", unit="case", disable=not progress or not todo)
    if num_workers <= 1 or len(todo) <= 1:
        for case in todo:
            cid, err = _register_and_save(dataset, case, reference_channel, str(folder))
            if err:
                errors[cid] = err
            bar.update(1)
    else:
        with process_pool(min(num_workers, len(todo))) as pool:
            futures = [pool.submit(_register_and_save, dataset, c, reference_channel, str(folder)) for c in todo]
            for fut in as_completed(futures):
                cid, err = fut.result()
                if err:
                    errors[cid] = err
                bar.update(1)
    bar.close()
    if errors:
        lines = "\n".join(f"  case {cid}: {msg}" for cid, msg in sorted(errors.items()))
        raise CmcsegError(f"rigid registration failed for {len(errors)} case(s):\n{lines}\n"
                          "Fix: repair the files named above, or run without --register rigid.")
    return {c.case_id: registration_summary(folder, c.case_id) for c in cases}
