"""Plans: nnU-Net's own planning rules, fed from cmcseg's fingerprint, under a memory budget per device.

The rules (target spacing with the anisotropy rule, transpose, patch and batch size from the
VRAM estimate, network topology, normalisation by channel name, resampling) are nnU-Net's
methods, run unchanged: the planner classes here subclass nnU-Net's planners and replace only
their ``__init__``, which would read ``nnUNet_raw``/``nnUNet_preprocessed``. The default
topology is nnU-Net's ResidualEncoderUNet as planned by ``nnUNetPlannerResEncM``; nnU-Net's
original PlainConvUNet planner is the other choice.

Where cmcseg departs from nnU-Net (each is marked ``departs from nnU-Net`` below):

* the memory budget defaults per device, not always 8 GB, and it bounds an estimate of everything
  the training step holds (:mod:`cmcseg.plans.memory`), not only nnU-Net's feature-map count;
* modalities with several components (RGB) expand into several input channels;
* no ``3d_lowres``/cascade configuration (cmcseg's trainers do not cascade);
* ``data_identifier`` is the configuration name for the default plans (``plans.json``), and
  ``<plans identifier>_<configuration>`` for a planner variant (``-pl``), as in nnU-Net.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

from cmcseg.dataset import Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import write_json_atomic
from cmcseg.plans.files import DEFAULT_PLANS
from cmcseg.plans.fingerprint import SCHEMA_VERSION as FINGERPRINT_SCHEMA_VERSION
from cmcseg.plans.memory import (
    ActivationCount,
    MemoryEstimate,
    estimate_step,
    plan_activation_count,
    unlabeled_rows_for,
)
from cmcseg.plans.plans import SCHEMA_VERSION, input_channel_modalities

log = logging.getLogger(__name__)

CONFIGURATIONS = ("2d", "3d_fullres")
REGISTER_CHOICES = ("none", "rigid")

#: nnU-Net's default VRAM target (GB) for a CUDA device
NNUNET_DEFAULT_MEMORY_GB = 8.0
#: departs from nnU-Net: the default budget on a CPU-only machine. nnU-Net always assumes an 8 GB GPU.
#: On a CPU the budget's activations live in RAM beside the data-loader workers, and the time of a
#: step, not memory, is what limits: it grows with the voxels per batch, which the budget sets.
#: Half of nnU-Net's budget halves those voxels (nnU-Net's 8 GB plan trains at 17-19 s per 3D step on
#: 2 cores, see ENVIRONMENT.md), and it is capped at a quarter of the machine's RAM.
CPU_DEFAULT_MEMORY_GB = 4.0

#: The attributes nnU-Net's ``ExperimentPlanner.__init__`` sets (nnunetv2 2.8.1) and its planning
#: methods read. That ``__init__`` also reads files, so it is not called; tests check these values
#: against a real nnU-Net planner so that a change in nnU-Net shows up.
_EXPERIMENT_PLANNER_ATTRIBUTES: dict[str, Any] = {
    "anisotropy_threshold": ANISO_THRESHOLD,
    "UNet_base_num_features": 32,
    "UNet_class": PlainConvUNet,
    "UNet_reference_val_3d": 560000000,
    "UNet_reference_val_2d": 85000000,
    "UNet_reference_com_nfeatures": 32,
    "UNet_reference_val_corresp_GB": 8,
    "UNet_reference_val_corresp_bs_2d": 12,
    "UNet_reference_val_corresp_bs_3d": 2,
    "UNet_featuremap_min_edge_length": 4,
    "UNet_blocks_per_stage_encoder": (2,) * 14,
    "UNet_blocks_per_stage_decoder": (2,) * 13,
    "UNet_min_batch_size": 2,
    "UNet_max_features_2d": 512,
    "UNet_max_features_3d": 320,
    "max_dataset_covered": 0.05,
    "lowres_creation_threshold": 0.25,
    "preprocessor_name": "DefaultPreprocessor",
}
#: What ``ResEncUNetPlanner`` and ``nnUNetPlannerResEncM`` change (their ``__init__``s).
_RESENC_M_ATTRIBUTES: dict[str, Any] = {
    "UNet_class": ResidualEncoderUNet,
    "UNet_reference_val_3d": 680000000,
    "UNet_reference_val_2d": 135000000,
    "UNet_blocks_per_stage_encoder": (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6),
    "UNet_blocks_per_stage_decoder": (1,) * 12,
    "UNet_reference_val_corresp_GB": 8,
    "max_dataset_covered": 1,
}


class _InMemoryPlanner:
    """Mixin that feeds an nnU-Net planner from dicts instead of nnUNet_raw/nnUNet_preprocessed.

    Put it before an nnU-Net planner class; ``NNUNET_ATTRIBUTES`` are that class's constants.
    """

    NNUNET_ATTRIBUTES: Mapping[str, Any] = _EXPERIMENT_PLANNER_ATTRIBUTES

    def __init__(self, fingerprint: dict, dataset_json: dict, memory_gb: float = NNUNET_DEFAULT_MEMORY_GB,
                 plans_name: str | None = None, overwrite_target_spacing: Sequence[float] | None = None,
                 suppress_transpose: bool = False) -> None:
        for name, value in self.NNUNET_ATTRIBUTES.items():
            setattr(self, name, value)
        self.dataset_fingerprint = fingerprint
        self.dataset_json = dataset_json
        self.dataset_name = dataset_json.get("name", "")
        self.UNet_vram_target_GB = float(memory_gb)
        self.plans_identifier = plans_name or self.default_plans_name
        self.overwrite_target_spacing = overwrite_target_spacing
        self.suppress_transpose = suppress_transpose
        self.plans = None

    #: the plans identifier this planner writes (``cmcseg plan -pl``, ``cmcseg train -p``)
    default_plans_name: str = DEFAULT_PLANS

    def generate_data_identifier(self, configuration_name: str) -> str:
        """departs from nnU-Net: the configuration name alone for the default plans (the layout of datasets
        planned before variants existed); ``<identifier>_<configuration>`` for a variant, as nnU-Net names it."""
        if self.plans_identifier == DEFAULT_PLANS:
            return configuration_name
        return f"{self.plans_identifier}_{configuration_name}"


class ResEncMPlanner(_InMemoryPlanner, nnUNetPlannerResEncM):
    """nnU-Net's ResEnc-M planner (ResidualEncoderUNet) on an in-memory fingerprint: cmcseg's default."""

    NNUNET_ATTRIBUTES = {**_EXPERIMENT_PLANNER_ATTRIBUTES, **_RESENC_M_ATTRIBUTES}


class PlainConvUNetPlanner(_InMemoryPlanner, ExperimentPlanner):
    """nnU-Net's original planner (PlainConvUNet) on an in-memory fingerprint."""

    default_plans_name = "cmcsegPlainConvUNetPlans"


#: network topologies the planner can plan for (``cmcseg plan -pl NAME``), each with its own plans identifier
PLANNERS: dict[str, type[_InMemoryPlanner]] = {"ResEncM": ResEncMPlanner, "PlainConvUNet": PlainConvUNetPlanner}


# ---------------------------------------------------------------------------------------- memory budget
def _system_ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    except (AttributeError, ValueError, OSError):
        return None


def default_memory_gb() -> float:
    """The budget nnU-Net's patch/batch rule plans for: 8 GB capped by the GPU's memory; on CPU, see
    CPU_DEFAULT_MEMORY_GB (capped at a quarter of the RAM)."""
    if torch.cuda.is_available():
        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
        return float(min(NNUNET_DEFAULT_MEMORY_GB, gpu_gb))
    ram = _system_ram_gb()
    return float(CPU_DEFAULT_MEMORY_GB if ram is None else min(CPU_DEFAULT_MEMORY_GB, ram / 4))


# ---------------------------------------------------------------------------------------- channels
#: largest value nnU-Net's ``RGBTo01Normalization`` accepts (it divides by 255 and asserts 8-bit input)
RGB_8BIT_MAX = 255.0


def normalization_channel_name(modality: str, components: int, max_value: float | None = None) -> str:
    """The name nnU-Net's ``get_normalization_scheme`` sees for each input channel of a modality.

    nnU-Net maps channel names (CT -> CTNormalization, others -> ZScoreNormalization). Departs
    from nnU-Net: the components of an RGB modality map to its ``rgb_to_0_1`` scheme, unless the
    fingerprint saw values above 255 (16-bit colour, e.g. MCubeS): those are z-scored, since
    ``RGBTo01Normalization`` refuses them.
    """
    if components > 1 and "rgb" in modality.casefold():
        if max_value is None or max_value <= RGB_8BIT_MAX:
            return "rgb_to_0_1"
        log.info("%s holds values up to %g (not 8-bit colour): z-score normalisation instead of rgb_to_0_1",
                 modality, max_value)
    return modality


def nnunet_dataset_json(dataset: Dataset, channels_per_modality: Mapping[str, int], num_training: int,
                        intensity_properties: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """The dataset.json nnU-Net's planner reads, with one channel name per *input* channel.

    ``intensity_properties``: the fingerprint's ``foreground_intensity_properties_per_channel``
    (per input channel), which decides whether an RGB modality is 8-bit."""
    modality_of = input_channel_modalities(channels_per_modality)
    props = intensity_properties or {}
    names = [normalization_channel_name(dataset.channel_names[m], int(channels_per_modality[str(m)]),
                                        props.get(str(i), {}).get("max"))
             for i, m in enumerate(modality_of)]
    return {"name": dataset.name, "channel_names": {str(i): n for i, n in enumerate(names)},
            "labels": dict(dataset.labels), "numTraining": int(num_training), "file_ending": dataset.file_ending}


# ---------------------------------------------------------------------------------------- planning
def _plain(obj: Any) -> Any:
    """JSON types (lists, ints, floats) all the way down, so a plan equals the plan read back from disk."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _check_inputs(fingerprint: dict, configurations: Sequence[str], register: str, topology: str,
                  reference_channel: int | None) -> None:
    if fingerprint.get("schema_version") != FINGERPRINT_SCHEMA_VERSION:
        raise CmcsegError(f"fingerprint schema_version {fingerprint.get('schema_version')!r}, expected "
                          f"{FINGERPRINT_SCHEMA_VERSION}. Fix: rerun `cmcseg plan` to recompute the fingerprint.")
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown or not configurations:
        raise CmcsegError(f"unknown configuration(s) {unknown or list(configurations)}. Fix: choose from "
                          f"{CONFIGURATIONS}.")
    if register not in REGISTER_CHOICES:
        raise CmcsegError(f"register={register!r}. Fix: choose one of {REGISTER_CHOICES}.")
    if topology not in PLANNERS:
        raise CmcsegError(f"unknown network topology {topology!r}. Fix: choose one of {sorted(PLANNERS)}.")
    if reference_channel is not None and int(reference_channel) != fingerprint["reference_channel"]:
        raise CmcsegError(
            f"reference channel {reference_channel} differs from the fingerprint's "
            f"({fingerprint['reference_channel']}, "
            f"{fingerprint['reference_modality']}), which was measured in that reference space. Fix: recompute the "
            "fingerprint with the new reference.")


def plan_configurations(planner: ExperimentPlanner, configurations: Sequence[str], num_training: int,
                        cache: dict | None = None) -> dict:
    """nnU-Net's ``plan_experiment`` without lowres, file writes and prints: transpose, spacing and configurations.

    A dataset of single-slice images (median shape 1 on the slice axis) gets only ``2d``, as in nnU-Net.
    ``cache`` keeps nnU-Net's feature-map estimates per patch between calls (they do not depend on the budget).
    """
    fingerprint = planner.dataset_fingerprint
    transpose_forward, transpose_backward = planner.determine_transpose()
    fullres_spacing = planner.determine_fullres_target_spacing()
    spacing_t = fullres_spacing[transpose_forward]
    new_shapes = [compute_new_shape(shape, spacing, fullres_spacing)
                  for spacing, shape in zip(fingerprint["spacings"], fingerprint["shapes_after_crop"])]
    median_shape_t = np.median(new_shapes, 0)[transpose_forward]
    n_voxels = float(np.prod(median_shape_t, dtype=np.float64) * num_training)
    is_2d_data = median_shape_t[0] == 1

    cache = {} if cache is None else cache
    out: dict[str, dict] = {}
    # nnU-Net builds each candidate network only to count its feature maps (arithmetic on the module tree): on
    # the meta device the weights are neither allocated nor initialised, which was most of the planning time
    with torch.device("meta"):
        if "3d_fullres" in configurations and not is_2d_data:
            out["3d_fullres"] = planner.get_plans_for_configuration(
                spacing_t, median_shape_t, planner.generate_data_identifier("3d_fullres"), n_voxels, cache)
            out["3d_fullres"]["batch_dice"] = False  # nnU-Net's value when there is no 3d_lowres
        if "2d" in configurations:
            out["2d"] = planner.get_plans_for_configuration(
                spacing_t[1:], median_shape_t[1:], planner.generate_data_identifier("2d"), n_voxels, cache)
            out["2d"]["batch_dice"] = True
    if not out:
        raise CmcsegError(f"the dataset holds single-slice (2D) images: only the 2d configuration applies, but "
                          f"{list(configurations)} was asked for. Fix: plan with -c 2d.")
    for c in out.values():
        c.pop("preprocessor_name", None)  # cmcseg's own preprocessor executes the plan
    return {
        "dimensionality": "2d" if is_2d_data else "3d",
        "transpose_forward": [int(i) for i in transpose_forward],
        "transpose_backward": [int(i) for i in transpose_backward],
        "original_median_spacing_after_transp": [float(i) for i in
                                                 np.median(fingerprint["spacings"], 0)[transpose_forward]],
        "original_median_shape_after_transp": [int(round(i)) for i in
                                               np.median(fingerprint["shapes_after_crop"], 0)[transpose_forward]],
        "configurations": out,
    }


def plan_experiment(
    fingerprint: dict,
    dataset: Dataset,
    configurations: Sequence[str] = CONFIGURATIONS,
    memory_gb: float | None = None,
    reference_channel: int | None = None,
    register: str = "none",
    topology: str = "ResEncM",
    branches: int = 1,
    fit_memory: bool = True,
    memory_device: str | None = None,
    patch_multiple_of: int = 1,
) -> dict:
    """Plan ``configurations`` for a dataset from its fingerprint; returns the JSON-ready plans.json content.

    ``memory_gb`` is the total memory budget (default: :func:`default_memory_gb`). Departure from
    nnU-Net: nnU-Net's patch/batch rule proposes, then, with ``fit_memory``, the estimate of what the
    default CMC trainer holds (:mod:`cmcseg.plans.memory`: its network with ``branches`` branches, the
    labeled batch plus ``DEFAULT_UNLABELED_RATIO`` unlabeled rows per labeled row, the EMA teacher, fp32 on a
    CPU) must fit ``memory_gb`` on ``memory_device`` (default: CUDA if available, else CPU); if it does not,
    nnU-Net's rule runs again on a smaller budget until it does. ``fit_memory=False`` is nnU-Net's rule unchanged on
    ``memory_gb / branches``. ``reference_channel`` defaults to the fingerprint's and must agree with
    it. ``topology`` picks the network family (see ``PLANNERS``). ``patch_multiple_of`` rounds every patch up
    to a multiple of it on each axis (:func:`patch_for_encoder`), for an encoder that needs one (a ViT's 16).
    """
    _check_inputs(fingerprint, configurations, register, topology, reference_channel)
    memory = default_memory_gb() if memory_gb is None else float(memory_gb)
    if memory <= 0:
        raise CmcsegError(f"memory budget {memory} GB must be positive. Fix: pass e.g. --memory-gb 8.")
    branches = int(branches)
    if branches not in (1, len(dataset.modalities)):
        raise CmcsegError(f"branches must be 1 (one network) or {len(dataset.modalities)} (one per modality), "
                          f"got {branches}")
    per_branch = memory / branches
    num_training = len(fingerprint["spacings"])
    channels_per_modality = fingerprint["channels_per_modality"]
    dataset_json = nnunet_dataset_json(dataset, channels_per_modality, num_training,
                                       fingerprint.get("foreground_intensity_properties_per_channel"))

    cache: dict = {}  # nnU-Net's feature-map counts per patch: the same at every budget

    def plan_at(budget_gb: float, names: Sequence[str]) -> dict:
        planner = PLANNERS[topology](fingerprint, dataset_json, budget_gb)
        return plan_configurations(planner, names, num_training, cache)

    planned = plan_at(memory if fit_memory else per_branch, configurations)
    device = memory_device or ("cuda" if torch.cuda.is_available() else "cpu")
    estimates: dict[str, dict] = {}
    if fit_memory:
        context = {"channels_per_modality": dict(channels_per_modality), "labels": dict(dataset.labels)}
        counts: dict[str, ActivationCount] = {}  # per network and patch; the batch only scales them
        for name in list(planned["configurations"]):
            def planned_at(budget: float, name: str = name) -> dict:
                return plan_at(budget, [name])["configurations"][name]

            def estimated(cfg: dict, name: str = name) -> MemoryEstimate:
                return configuration_estimate(context, name, cfg, device, branches, counts)

            cfg, estimate = fit_to_budget(planned_at, estimated, memory)
            planned["configurations"][name] = cfg
            estimates[name] = {"device": device, **estimate.as_dict()}
    if patch_multiple_of > 1:
        for name, cfg in planned["configurations"].items():
            before = list(cfg["patch_size"])
            cfg["patch_size"] = patch_for_encoder(before, cfg["architecture"]["arch_kwargs"]["strides"],
                                                  patch_multiple_of)
            log.info("%s: patch %s rounded up to %s (multiples of %d for the encoder; the memory estimate is the "
                     "default encoder's)", name, before, cfg["patch_size"], patch_multiple_of)
    plans = {
        "schema_version": SCHEMA_VERSION,
        "plans_name": PLANNERS[topology].default_plans_name,
        "dataset_name": dataset.folder.name,
        "labels": dict(dataset.labels),
        "pairing": dataset.pairing,
        "dimensionality": planned["dimensionality"],
        "reference_channel": int(fingerprint["reference_channel"]),
        "reference_modality": fingerprint["reference_modality"],
        "modalities": dataset.modalities,
        "channels_per_modality": dict(channels_per_modality),
        "register": register,
        "label_interpolation": "nearest",
        "memory_budget_gb": memory,
        "network_branches": branches,
        "memory_rule": "cmcseg estimate" if fit_memory else "nnU-Net, budget / branches",
        "memory_estimate_gb": estimates,
        "network_topology": topology,
        "patch_multiple_of": int(patch_multiple_of),
        "experiment_planner_used": PLANNERS[topology].__name__,
        "image_reader_writer": "SimpleITKIO",
        "label_manager": "LabelManager",
        **{k: v for k, v in planned.items() if k != "dimensionality"},
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
    }
    for name, cfg in planned["configurations"].items():
        log.info("%s: spacing %s, patch %s, batch %d: %s", name, [round(float(s), 3) for s in cfg["spacing"]],
                 [int(p) for p in cfg["patch_size"]], cfg["batch_size"], budget_summary(plans, name))
    return _plain(plans)


def patch_for_encoder(patch: Sequence[int], strides: Sequence[Sequence[int]], multiple: int) -> list[int]:
    """``patch`` rounded up, on each axis, to the least common multiple of ``multiple`` (an encoder's need, e.g. a
    ViT's patch size 16) and the plan network's total stride on that axis (which the plan's own network needs)."""
    out = []
    for axis, size in enumerate(patch):
        step = math.lcm(int(multiple), math.prod(int(s[axis]) for s in strides))
        out.append(-(-int(size) // step) * step)
    return out


def configuration_estimate(context: Mapping[str, Any], name: str, cfg: Mapping[str, Any], device: str,
                           branches: int, counts: dict[str, ActivationCount] | None = None) -> MemoryEstimate:
    """The training-step estimate of configuration ``cfg`` (default trainer: labeled batch + its unlabeled
    rows, EMA teacher); ``counts`` memoises the activation counts by network and patch."""
    key = json.dumps([name, cfg["patch_size"], cfg["architecture"], branches], sort_keys=True, default=str)
    if counts is None or key not in counts:
        plans = {**context, "configurations": {name: dict(cfg)}}
        count = plan_activation_count(plans, name, single_branch=branches == 1, deep_supervision=True)
        if counts is None:
            counts = {}
        counts[key] = count
    batch = int(cfg["batch_size"])
    return estimate_step(counts[key], batch, unlabeled_rows_for(batch), device)


#: nnU-Net's smallest batch: its planner fits the patch at this batch before it raises the batch to fill the budget
MIN_BATCH_SIZE = 2


def fit_to_budget(plan_at: Callable[[float], dict], estimate: Callable[[dict], MemoryEstimate],
                  budget_gb: float, steps: int = 6, fill: float = 0.85) -> tuple[dict, MemoryEstimate]:
    """The configuration nnU-Net's rule plans at the largest budget whose training estimate fits ``budget_gb``.

    nnU-Net's own plan is kept if it fits. If not, its batch is lowered first (down to nnU-Net's minimum of 2),
    because nnU-Net's rule ranks the patch above the batch: it fits the patch at the smallest batch, then raises
    the batch to fill the budget. Only when the smallest batch does not fit either is the budget handed to
    nnU-Net's rule scaled (a smaller patch), by how the room left for activations (``budget_gb`` minus the
    process and the weights) compares with what the plan's activations need at the smallest batch (halved when
    there is no room), at
    most ``steps`` times; each plan then gets the largest batch that fits, the largest plan wins, and the search
    stops once a plan fills ``fill`` of the budget. If nothing fits (the process and the weights alone exceed the
    budget), the smallest plan tried, with a warning.
    """
    nnunet_budget = budget_gb
    best: tuple[dict, MemoryEstimate] | None = None
    smallest: tuple[dict, MemoryEstimate] | None = None
    for _ in range(steps):
        cfg = plan_at(nnunet_budget)
        found = estimate(cfg)
        fitted = (cfg, found) if found.total_gb <= budget_gb else largest_batch_that_fits(cfg, estimate, budget_gb)
        if fitted is not None:
            if best is None or fitted[1].total_gb > best[1].total_gb:
                best = fitted
            if nnunet_budget == budget_gb or fitted[1].total_gb >= fill * budget_gb:
                break
        elif smallest is None or found.total_gb < smallest[1].total_gb:
            smallest = cfg, found
        # what the patch needs at the smallest batch decides how far to shrink it: the batch is lowered anyway
        low = found if found.total_gb <= budget_gb else estimate({**cfg, "batch_size": MIN_BATCH_SIZE})
        fixed = low.baseline_gb + low.parameters_gb
        room, needs = budget_gb - fixed, low.total_gb - fixed
        # no room at all: a smaller patch also means a shallower network (fewer weights); halve and look again
        scale = 0.5 if room <= 0 else min(1.0, 0.97 * room / max(needs, 1e-6))
        nnunet_budget *= scale
    if best is None:
        best = smallest if smallest is not None else (cfg, found)
        log.warning("a training step needs about %.2f GB even at the smallest patch tried (patch %s, batch %d), more "
                    "than the %g GB budget; planned that patch (fix: plan with a larger --memory-gb)",
                    best[1].total_gb, [int(p) for p in best[0]["patch_size"]], best[0]["batch_size"], budget_gb)
    return best


def largest_batch_that_fits(cfg: dict, estimate: Callable[[dict], MemoryEstimate], budget_gb: float
                            ) -> tuple[dict, MemoryEstimate] | None:
    """``cfg`` with the largest batch below its own (at least :data:`MIN_BATCH_SIZE`) whose estimate fits; None
    when even the smallest does not. The estimate is linear in the rows, so each try costs no network count."""
    for batch in range(int(cfg["batch_size"]) - 1, MIN_BATCH_SIZE - 1, -1):
        smaller = {**cfg, "batch_size": batch}
        found = estimate(smaller)
        if found.total_gb <= budget_gb:
            return smaller, found
    return None


def budget_summary(plans: Mapping[str, Any], name: str) -> str:
    """What the budget bought for configuration ``name``, in one line (the plan command prints it)."""
    estimate = plans.get("memory_estimate_gb", {}).get(name)
    budget = float(plans["memory_budget_gb"])
    if not estimate:
        return f"nnU-Net's rule on {budget:g} GB / {plans.get('network_branches', 1)} branch(es)"
    return (f"estimated training peak {estimate['total_gb']:.2f} GB of the {budget:g} GB budget on "
            f"{estimate['device']} (weights+optimizer+teacher {estimate['parameters_gb']:.2f}, activations "
            f"{estimate['activations_gb']:.2f}, transients {estimate['transients_gb']:.2f}, batch "
            f"{estimate['batch_gb']:.2f}, process {estimate['baseline_gb']:.2f})")


def write_plans(plans: dict, path) -> None:
    """Write plans.json atomically."""
    write_json_atomic(plans, path)
