"""The prediction batch loop: preprocess in the background, predict, revert and write in the background.

Per case (:func:`predict_cases`):

1. **prepare** (a background thread, ``num_workers`` of them, one case ahead per worker): check
   the case's files (a truncated ``.gz`` is an error, not silent zeros), refuse a missing
   modality unless the trainer accepts it, optionally register rigidly (when the plans say
   ``register: rigid``), and run the training preprocessor
   (:func:`cmcseg.preprocessing.preprocessor.preprocess_case`) with the model's plans: the same
   alignment of misaligned modalities, crop, normalisation and resampling as in training;
2. **predict** (this thread): Gaussian sliding window, mirroring TTA, fold ensemble
   (:mod:`.sliding_window`);
3. **export** (one background thread, overlapping the next case's prediction): revert to the
   reference modality's original grid and write atomically (:mod:`.revert`); the segmentation
   is written last, so its presence marks a finished case for ``--continue``.

A failure in any step is recorded for that case (named, with the reason) and the batch goes
on; :class:`PredictionReport` lists what was written, skipped and failed.
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from cmcseg.dataset import Case, Dataset
from cmcseg.devices import (
    autocast_context,
    precision_name,
    resolve_device,
    resolve_precision,
    reuse_cpu_allocations,
)
from cmcseg.errors import CmcsegError
from cmcseg.image_io import make_folder, write_json_atomic
from cmcseg.paths import check_file_ending, check_name, contained
from cmcseg.plans.plans import input_channel_modalities
from cmcseg.prediction.cases import InputCase, find_input_cases
from cmcseg.prediction.model import (
    TrainedModel,
    build_inference_networks,
    check_model_dataset,
    load_trained_model,
)
from cmcseg.prediction.revert import original_value_table, revert_case, write_probabilities, write_segmentation
from cmcseg.preprocessing.preprocessor import PreprocessedCase, preprocess_case
from cmcseg.sliding_window import (
    Predict,
    auto_window_batch,
    check_step,
    fold_ensemble,
    mirror_combinations,
    predict_case,
    with_mirroring,
)

log = logging.getLogger(__name__)

REPORT_FILE = "prediction.json"
PROBABILITIES_SUFFIX = ".npz"


@dataclass
class PredictionOptions:
    """How to predict (the ``cmcseg predict`` flags)."""

    folds: Sequence[int] | None = None  # None: every fold with the checkpoint
    checkpoint: str = "final"
    tta: bool = True
    step: float = 0.5
    save_probabilities: bool = False
    save_heads: bool = False  # also one segmentation per modality head (CMC models)
    original_labels: bool = False
    device: str = "auto"
    continue_prediction: bool = False
    num_workers: int = 1  # background preprocessing threads; 0: everything in this thread, one step after another
    sw_batch_size: int | None = None  # None: sliding_window.auto_window_batch (several small windows per pass on a CPU)
    #: a window's mirrored copies in one forward pass; None: on a GPU, and on a CPU one copy at a time with the windows
    #: batched instead (:func:`cmcseg.sliding_window.auto_window_batch`). myops_dev 3d_fullres with TTA, 1 thread:
    #: PlainConvUNet plan, two cases 215 s at 1.8 GB against 230 s at 4.5 GB batched; ResEnc-M plan, one case 240 s at
    #: 2.1 GB against 220 s at 2.4 GB
    batched_tta: bool | None = None
    #: on a CPU, freed blocks stay in the process for the next window (:func:`cmcseg.devices.reuse_cpu_allocations`,
    #: process-wide): a 3D case's TTA prediction took 71 s instead of 102 s, at 1.24 GB peak RSS instead of 1.14
    reuse_cpu_allocations: bool = True
    #: the dtype the networks compute in (:func:`cmcseg.devices.resolve_precision`): ``auto`` is float16 on CUDA,
    #: bfloat16 on a CPU with native bfloat16 instructions (about 2x faster there, same Dice), else
    #: float32
    precision: str = "auto"
    progress: bool = True
    unsafe_allow_pickle: bool = False  # --unsafe-allow-pickle: checkpoints may unpickle objects (runs their code)
    trainer: str | None = None  # --trainer module:Class: the user's trainer class that rebuilds the network


@dataclass
class PredictionReport:
    """What one prediction run did."""

    output_folder: Path
    model: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    case_seconds: dict[str, float] = field(default_factory=dict)  # preparation wait + sliding window, per case
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        parts = [f"{len(self.written)} case(s) predicted"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} already done, skipped")
        if self.failed:
            parts.append(f"{len(self.failed)} failed ({', '.join(sorted(self.failed))})")
        return ", ".join(parts) + f" in {self.seconds:.1f} s -> {self.output_folder}"

    def as_dict(self) -> dict:
        return {"model": self.model, "output_folder": str(self.output_folder), "settings": self.settings,
                "written": self.written, "skipped": self.skipped, "failed": self.failed,
                "case_seconds": {k: round(v, 3) for k, v in self.case_seconds.items()},
                "seconds": round(self.seconds, 3), "summary": self.summary()}


@dataclass
class PreparedCase:
    """A case preprocessed for the network, with what is needed to revert its prediction."""

    case: InputCase
    data: np.ndarray
    fov: np.ndarray
    properties: dict


# ============================================================================================ input checks
def check_cases_fit_model(cases: Sequence[InputCase], model: TrainedModel) -> None:
    """Refuse input whose modalities the model was not trained on, or that never has one it needs."""
    expected = model.channel_names
    found = sorted(set().union(*(c.images for c in cases))) if cases else []
    extra = [c for c in found if c not in expected]
    trained = ", ".join(f"{c:04d} {n}" for c, n in sorted(expected.items()))
    if extra:
        example = next(c for c in cases if set(c.images) & set(extra))
        raise CmcsegError(f"the input cases have {len(found)} modalities "
                          f"(channels {', '.join(f'{c:04d}' for c in found)}"
                          f"; e.g. {example.images[extra[0]].name}) but model {model.folder} was trained on "
                          f"{len(expected)} ({trained}). Fix: predict with a model trained on these modalities, or "
                          "remove the files of the channels it does not know.")
    if model.unpaired or model.accepts_missing_modalities:
        return
    absent = [c for c in expected if c not in found]
    if absent and cases:
        names = ", ".join(f"{expected[c]} (channel {c:04d}, e.g. {cases[0].case_id}_{c:04d})" for c in absent)
        raise CmcsegError(f"model {model.folder} ({model.trainer_name}) needs all {len(expected)} modalities it was "
                          f"trained on ({trained}), but none of the {len(cases)} input case(s) has {names}. Fix: add "
                          "those files, or predict with a model trained on the modalities you have.")


def missing_modality_error(case: InputCase, missing: Sequence[int], model: TrainedModel, ending: str) -> CmcsegError:
    """The error for a case without some modality, for a model that needs every modality."""
    folder = next(iter(case.images.values())).parent
    what = ", ".join(f"{model.channel_names[c]} (channel {c:04d}, "
                     f"expected {folder / f'{case.case_id}_{c:04d}{ending}'})"
                     for c in missing)
    return CmcsegError(f"case {case.case_id}: modality {what} is missing. The {model.trainer_name} model needs every "
                       f"modality it was trained on ({', '.join(model.channel_names.values())}). Fix: add the file, "
                       "or predict this case with a model that accepts missing modalities.")


def check_readable(case: InputCase) -> None:
    """Decompress each ``.gz`` input to its end: ITK reads a truncated file as zeros without complaint."""
    from cmcseg.errors import ImageReadError

    for path in case.files:
        if path.name.endswith(".gz"):
            try:
                with gzip.open(path, "rb") as f:
                    while f.read(1 << 24):
                        pass
            except (OSError, EOFError, zlib.error) as e:
                raise ImageReadError(path, f"compressed stream is truncated or corrupt ({e})", case.case_id) from None


# ============================================================================================ preprocessing
def grid_channel(plans: Mapping, present: Sequence[int]) -> int:
    """The modality whose grid a partial case is preprocessed on and written to: the reference when present, else
    the first present one in the plan's order."""
    reference = int(plans["reference_channel"])
    return reference if reference in present else int(sorted(present)[0])


def subset_plans(plans: Mapping, configuration: str, present: Sequence[int]) -> dict:
    """The plans restricted to the ``present`` modalities (their channels, schemes and intensity properties)."""
    plans = dict(plans)
    cpm = {int(k): int(v) for k, v in plans["channels_per_modality"].items()}
    modality_of = input_channel_modalities(plans["channels_per_modality"])
    keep = [i for i, m in enumerate(modality_of) if m in present]
    config = dict(plans["configurations"][configuration])
    for key in ("normalization_schemes", "use_mask_for_norm"):
        if key in config:
            config[key] = [config[key][i] for i in keep]
    props = plans.get("foreground_intensity_properties_per_channel", {})
    plans["foreground_intensity_properties_per_channel"] = {str(new): props[str(old)] for new, old in enumerate(keep)
                                                            if str(old) in props}
    plans["channels_per_modality"] = {str(m): cpm[m] for m in sorted(present)}
    plans["reference_channel"] = grid_channel(plans, present)
    plans["configurations"] = {**plans["configurations"], configuration: config}
    return plans


def preprocess_partial_case(dataset: Dataset, case: Case, plans: Mapping, configuration: str) -> PreprocessedCase:
    """A case without some modalities, for a model that accepts that.

    The present modalities are preprocessed as a dataset of their own (the reference modality,
    or the first present one, is the grid); each absent modality becomes zero channels with an
    empty field of view, which is how the network sees a dropped modality.
    """
    present = sorted(case.images)
    sub_dataset = dataclasses.replace(dataset, channel_names={c: dataset.channel_names[c] for c in present})
    result = preprocess_case(sub_dataset, case, subset_plans(plans, configuration, present), configuration)
    cpm = {int(k): int(v) for k, v in plans["channels_per_modality"].items()}
    spatial = result.data.shape[1:]
    data, fov, start = [], [], 0
    for m in sorted(cpm):
        if m in present:
            data.append(result.data[start:start + cpm[m]])
            fov.append(result.fov[present.index(m)][None])
            start += cpm[m]
        else:
            data.append(np.zeros((cpm[m], *spatial), np.float32))
            fov.append(np.zeros((1, *spatial), np.uint8))
    properties = {**result.properties, "channels_per_modality": {str(k): v for k, v in cpm.items()},
                  "absent_modalities": [dataset.channel_names[m] for m in sorted(cpm) if m not in present]}
    return PreprocessedCase(np.concatenate(data), None, np.concatenate(fov), properties)


def rigid_transforms(dataset: Dataset, case: Case, plans: Mapping) -> dict | None:
    """The rigid registration of the case's modalities onto the reference, when the plans ask for it."""
    if plans.get("register", "none") != "rigid" or dataset.unpaired:
        return None
    from cmcseg.preprocessing.registration import register_case

    results = register_case(dataset, case, int(plans["reference_channel"]))
    return {ch: r.transform for ch, r in results.items() if r.success}


def prepare_case(case: InputCase, model: TrainedModel, dataset: Dataset) -> PreparedCase:
    """Check and preprocess one input case exactly as training preprocessed its cases."""
    check_readable(case)
    raw_case = Case(case.case_id, dict(case.images))
    if model.unpaired:
        if len(case.images) != 1:
            raise CmcsegError(f"case {case.case_id}: {len(case.images)} modalities in an unpaired model's input "
                              f"({', '.join(p.name for p in case.files)}). Fix: give each modality's image its own "
                              "case id (unpaired: one modality per case).")
        result = preprocess_case(dataset, raw_case, model.plans, model.configuration)
    else:
        missing = case.missing(sorted(model.channel_names))
        if missing and not model.accepts_missing_modalities:
            raise missing_modality_error(case, missing, model, dataset.file_ending)
        if missing:
            grid = grid_channel(model.plans, sorted(case.images))
            log.info("case %s: %s absent; the %s model segments it from %s, written on the %s grid", case.case_id,
                     ", ".join(model.channel_names[c] for c in missing), model.trainer_name,
                     ", ".join(model.channel_names[c] for c in sorted(case.images)), model.channel_names[grid])
            result = preprocess_partial_case(dataset, raw_case, model.plans, model.configuration)
        else:
            transforms = rigid_transforms(dataset, raw_case, model.plans)
            result = preprocess_case(dataset, raw_case, model.plans, model.configuration, transforms)
    return PreparedCase(case, result.data, result.fov, result.properties)


# ============================================================================================ prediction


def _float_output(network: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Predict:
    """The network's probabilities in float32, computed under autocast to ``dtype`` (float32: none)."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, dtype):
            return network(x).float()

    return predict


class CasePredictor:
    """The folds' networks of a model, ensembled and mirrored, as a function of a prepared case."""

    def __init__(self, model: TrainedModel, device: torch.device, tta: bool = True, step: float = 0.5,
                 sw_batch_size: int | None = None, batched_tta: bool | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.patch_size = model.patch_size
        self.device = device
        self.dtype = dtype
        self.step = check_step(step)
        self.mirror_axes = tuple(model.mirror_axes) if tta else ()
        if batched_tta is None:
            batched_tta = device.type != "cpu"
        copies = len(mirror_combinations(self.mirror_axes)) + 1 if batched_tta else 1
        self.sw_batch_size = (auto_window_batch(self.patch_size, device, copies) if sw_batch_size is None
                              else int(sw_batch_size))
        self.networks = build_inference_networks(model, device)
        self.head_names: list[str] = []
        ensemble = fold_ensemble([_float_output(n, device, dtype) for n in self.networks])
        self.predict: Predict = with_mirroring(ensemble, self.mirror_axes, batched_tta) if tta else ensemble

    def enable_heads(self, names: Sequence[str]) -> bool:
        """Make every network also return each head's probabilities after the fused ones (K channels each);
        False when the model's networks have no modality heads to show."""
        if not all(getattr(n, "supports_heads", False) for n in self.networks):
            return False
        for network in self.networks:
            cast(Any, network).with_heads = True
        self.head_names = [str(n) for n in names]
        return True

    def __call__(self, prepared: PreparedCase) -> np.ndarray:
        probabilities = predict_case(self.predict, prepared.data, prepared.fov, self.patch_size, self.device,
                                     self.step, self.sw_batch_size)
        return probabilities.numpy()


# ============================================================================================ export
#: key prefix of a head's segmentation in :func:`output_paths`; the file is ``CASE_head-NAME<ending>``
HEAD_KEY = "head:"


def output_paths(output_folder: Path, case_id: str, file_ending: str, save_probabilities: bool,
                 head_names: Sequence[str] = ()) -> dict[str, Path]:
    """Where a case's segmentation (and probabilities, and each head's segmentation) go.

    The case id, file ending and head names come from file names and the model folder's JSON (someone else's
    files): each is checked, and every path must lie inside ``output_folder``.
    """
    check_name(case_id, "case id", f"input case {case_id!r}")
    check_file_ending(file_ending, "the model's dataset.json")
    paths = {"segmentation": output_folder / f"{case_id}{file_ending}"}
    if save_probabilities:
        paths["probabilities"] = output_folder / f"{case_id}{PROBABILITIES_SUFFIX}"
    for name in head_names:
        check_name(name, "head (modality) name", "the model's plans.json", max_length=64)
        paths[f"{HEAD_KEY}{name}"] = output_folder / f"{case_id}_head-{name}{file_ending}"
    for path in paths.values():
        contained(output_folder, path)
    return paths


def is_finished(paths: Mapping[str, Path]) -> bool:
    return all(p.is_file() for p in paths.values())


class Exporter:
    """Reverting and writing one case's prediction (run in a background thread)."""

    def __init__(self, model: TrainedModel, dataset: Dataset, original_labels: bool) -> None:
        self.config = model.config
        self.labels = labels = dataset.labels
        self.class_names = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        self.value_table = original_value_table(labels, dataset.original_label_values) if original_labels else None
        if original_labels and not dataset.original_label_values:
            log.warning("--original-labels: dataset.json of the model records no original_label_values; the labels "
                        "are written as they are")

    def __call__(self, probabilities: np.ndarray, properties: Mapping, paths: Mapping[str, Path],
                 reference_file: Path | None = None) -> None:
        heads = [key for key in paths if key.startswith(HEAD_KEY)]
        k = probabilities.shape[0] // (1 + len(heads))
        labels, full = revert_case(probabilities[:k], properties, self.config, "probabilities" in paths,
                                   self.labels)
        if full is not None:
            write_probabilities(full, properties, paths["probabilities"], self.class_names)
        write_segmentation(labels, properties, paths["segmentation"], self.value_table, reference_file)
        for index, key in enumerate(heads, start=1):
            head_labels, _ = revert_case(probabilities[index * k:(index + 1) * k], properties, self.config, False,
                                         self.labels)
            write_segmentation(head_labels, properties, paths[key], self.value_table, reference_file)


# ============================================================================================ the loop
def _describe_error(error: BaseException, case: InputCase) -> str:
    if isinstance(error, CmcsegError):
        return str(error)
    files = ", ".join(str(p) for p in case.files)
    return f"{type(error).__name__}: {error} (files: {files})"


def _prepared_ahead(cases: Sequence[InputCase], prepare: Callable[[InputCase], PreparedCase],
                    pool: ThreadPoolExecutor | None, lookahead: int) -> Iterator[tuple[InputCase, Future]]:
    """Yield (case, future of its preparation), keeping ``lookahead`` cases in preparation ahead."""
    if pool is None:
        for case in cases:
            yield case, _run_now(prepare, case)
        return
    pending: deque[tuple[InputCase, Future]] = deque()
    queue = iter(cases)
    for case in queue:
        pending.append((case, pool.submit(prepare, case)))
        if len(pending) >= lookahead:
            break
    while pending:
        case, future = pending.popleft()
        following = next(queue, None)
        if following is not None:
            pending.append((following, pool.submit(prepare, following)))
        yield case, future


def _output_paths_of(cases: Sequence[InputCase], output_folder: Path, file_ending: str,
                     save_probabilities: bool, head_names: Sequence[str] = ()) -> dict[str, dict[str, Path]]:
    """Each case's output paths; refuses to overwrite an input; creates the folder, drops stale temporaries."""
    inputs = {p.resolve() for c in cases for p in c.files}
    paths = {c.case_id: output_paths(output_folder, c.case_id, file_ending, save_probabilities, head_names)
             for c in cases}
    for case_id, outputs in paths.items():
        for path in outputs.values():
            if path.resolve() in inputs:
                raise CmcsegError(f"writing case {case_id} would overwrite the input {path}. Fix: pass another "
                                  "output folder (-o).")
    make_folder(output_folder)
    for stale in output_folder.glob(".tmp-*"):  # left by a killed run; finished files are never partial
        stale.unlink(missing_ok=True)
    return paths


def _run_batch(todo: Sequence[InputCase], paths: Mapping[str, Mapping[str, Path]],
               prepare: Callable[[InputCase], PreparedCase], predictor: CasePredictor, export: Exporter,
               options: PredictionOptions, report: PredictionReport) -> None:
    """Prepare ahead in background threads, predict here, export in a background thread; record each case."""
    workers = max(0, int(options.num_workers))
    prep_pool = ThreadPoolExecutor(workers, thread_name_prefix="cmcseg-prepare") if workers else None
    export_pool = ThreadPoolExecutor(1, thread_name_prefix="cmcseg-export") if workers else None
    exporting: tuple[InputCase, Future] | None = None
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not options.progress or not todo)
    try:
        for case, future in _prepared_ahead(todo, prepare, prep_pool, max(1, workers)):
            case_start = time.perf_counter()
            try:
                prepared = future.result()
                probabilities = predictor(prepared)
            except Exception as e:  # noqa: BLE001 - reported per case, the batch goes on
                _record_failure(report, case, e)
                bar.update(1)
                continue
            report.case_seconds[case.case_id] = time.perf_counter() - case_start
            if exporting is not None:  # one export in flight at most: memory stays bounded
                _finish_export(report, *exporting)
            reference_file = case.images.get(int(prepared.properties.get("reference_channel", -1)))
            job = (probabilities, prepared.properties, paths[case.case_id], reference_file)
            exporting = (case, export_pool.submit(export, *job) if export_pool else _run_now(export, *job))
            del prepared, probabilities, job
            bar.update(1)
        if exporting is not None:
            _finish_export(report, *exporting)
    finally:
        bar.close()
        for pool in (prep_pool, export_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def predict_cases(cases: Sequence[InputCase], output_folder: Path | str, model: TrainedModel,
                  options: PredictionOptions | None = None) -> PredictionReport:
    """Predict ``cases`` with ``model`` into ``output_folder``; one failing case does not stop the others."""
    options = options or PredictionOptions()
    start = time.perf_counter()
    output_folder = Path(output_folder)
    dataset = model.dataset()
    check_cases_fit_model(cases, model)
    device = resolve_device(options.device)
    if device.type == "cpu" and options.reuse_cpu_allocations and reuse_cpu_allocations():
        log.debug("CPU allocator: freed blocks are kept for reuse (no block of its own mapping, no heap trimming)")
    predictor = CasePredictor(model, device, options.tta, options.step, options.sw_batch_size, options.batched_tta,
                              resolve_precision(options.precision, device))
    log.info("predicting on %s in %s (--precision %s)", device, precision_name(predictor.dtype),
             options.precision)
    if options.save_heads and not predictor.enable_heads(model.plans.get("modalities", [])):
        log.warning("--save-heads: the %s model has no per-modality heads; only the fused segmentation is written",
                    model.trainer_name)
    paths = _output_paths_of(cases, output_folder, dataset.file_ending, options.save_probabilities,
                             predictor.head_names)
    report = PredictionReport(output_folder, model.describe(), settings=_settings(model, options, predictor, device))
    todo = [c for c in cases if not (options.continue_prediction and is_finished(paths[c.case_id]))]
    report.skipped = [c.case_id for c in cases if c not in todo]
    if report.skipped:
        log.info("--continue: %d case(s) already predicted, skipped", len(report.skipped))
    _run_batch(todo, paths, lambda case: prepare_case(case, model, dataset), predictor,
               Exporter(model, dataset, options.original_labels), options, report)
    report.seconds = time.perf_counter() - start
    write_json_atomic(report.as_dict(), output_folder / REPORT_FILE)
    log.debug("%s", report.summary())  # the CLI prints it
    return report


def _run_now(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn`` in this thread; its result or exception in a completed Future (as a pool would give)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - delivered through the future
        future.set_exception(e)
    return future


def _record_failure(report: PredictionReport, case: InputCase, error: BaseException) -> None:
    message = _describe_error(error, case)
    report.failed[case.case_id] = message
    report.case_seconds.pop(case.case_id, None)
    log.error("case %s failed: %s", case.case_id, message)
    log.debug("case %s", case.case_id, exc_info=error)


def _finish_export(report: PredictionReport, case: InputCase, future: Future) -> None:
    """Wait for a case's export; record it as written or failed."""
    try:
        future.result()
    except Exception as e:  # noqa: BLE001
        _record_failure(report, case, e)
        return
    report.written.append(case.case_id)
    log.info("case %s predicted in %.1f s", case.case_id, report.case_seconds.get(case.case_id, float("nan")))


def _settings(model: TrainedModel, options: PredictionOptions, predictor: CasePredictor,
              device: torch.device) -> dict[str, Any]:
    return {"model_folder": str(model.folder), "trainer": model.trainer_name, "configuration": model.configuration,
            "folds": [f.fold for f in model.folds], "checkpoint": options.checkpoint, "tta": options.tta,
            "mirror_axes": list(predictor.mirror_axes), "step": options.step, "patch_size": model.patch_size,
            "device": str(device), "precision": precision_name(predictor.dtype),
            "save_probabilities": options.save_probabilities,
            "save_heads": list(predictor.head_names),
            "original_labels": options.original_labels}


def predict_folder(input_folder: Path | str, output_folder: Path | str, model_folder: Path | str,
                   options: PredictionOptions | None = None, dataset_spec: str | None = None,
                   preprocessed_dataset: Path | None = None) -> PredictionReport:
    """Find the cases of ``input_folder`` and predict them with the model of ``model_folder``.

    ``dataset_spec`` (the user's ``-d``) must name the dataset the model was trained on.
    """
    options = options or PredictionOptions()
    model = load_trained_model(model_folder, options.folds, options.checkpoint, preprocessed_dataset,
                               options.unsafe_allow_pickle, trainer=options.trainer)
    if dataset_spec is not None:
        check_model_dataset(model, dataset_spec)
    cases = find_input_cases(input_folder, model.channel_names, model.dataset_json)
    log.info("%d case(s) in %s", len(cases), input_folder)
    return predict_cases(cases, output_folder, model, options)
