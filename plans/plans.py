"""plans.json, read in one place: every stage asks this module what the plans say.

The plans are the contract between stages (as in nnU-Net): ``cmcseg plan`` writes them, and the
preprocessor, the trainers, the memory estimate and the predictor read them through these
functions only, so that a key is interpreted one way everywhere:

* :func:`load_plans` opens ``plans.json`` with a clear error when it is missing or not JSON;
* :func:`plan_configuration` resolves a configuration (``inherits_from`` as nnU-Net does);
* :func:`plan_channels_per_modality` and :func:`input_channel_modalities` say which input channel
  belongs to which modality (an RGB modality has three);
* :func:`plan_num_classes`, :func:`foreground_labels` and :class:`LabelInfo` interpret the labels
  through nnU-Net's ``LabelManager`` (an ``ignore`` label is not predicted);
* :func:`plans_hash` is what every checkpoint records, so prediction can refuse other plans.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunetv2.utilities.label_handling.label_handling import LabelManager

from cmcseg.dataset import nnunet_label_dict
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json
from cmcseg.plans.files import PLANS_FILE

#: the plans.json layout this version writes and reads
SCHEMA_VERSION = 1


def load_plans(path: Path | str) -> dict:
    """plans.json at ``path``, or in the folder ``path`` (a preprocessed dataset or a model folder), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANS_FILE
    if not path.is_file():
        raise CmcsegError(f"{path} does not exist. Fix: run `cmcseg plan` for this dataset first (or pass the folder "
                          "that holds plans.json).")
    return check_plans(read_json(path), path)


def check_plans(plans: Any, source: Path | str) -> dict:
    """``plans`` if it is a plans file of the layout this version knows; a clear error naming ``source`` if not."""
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise CmcsegError(f"{source} is not a cmcseg plans file (no 'configurations'). Fix: rerun `cmcseg plan`.")
    if plans.get("schema_version") != SCHEMA_VERSION:
        raise CmcsegError(f"{source}: plans schema_version {plans.get('schema_version')!r}, expected {SCHEMA_VERSION}. "
                          "Fix: rerun `cmcseg plan`.")
    return plans


def plans_hash(plans: Mapping) -> str:
    """SHA-256 of the plans as canonical JSON (what the network and the data were built from); every checkpoint
    records it, and prediction refuses a fold whose plans differ."""
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


def plan_configuration(plans: Mapping[str, Any], configuration: str) -> dict:
    """``plans["configurations"][configuration]``, with ``inherits_from`` resolved as nnU-Net does."""
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise CmcsegError(f"plans.json has no configuration {configuration!r}. Fix: choose one of {sorted(configs)} "
                          "or plan it with `cmcseg plan -c`.")
    config = dict(configs[configuration])
    seen = {configuration}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise CmcsegError(f"plans.json: configuration {configuration!r} inherits from unknown or circular "
                              f"{parent!r}.")
        seen.add(parent)
        config = {**configs[parent], **config}
    return config


def plan_encoder(config: Mapping[str, Any]) -> str:
    """The encoder family of a configuration's network topology: ``residual`` for nnU-Net's ResEnc plans (blocks
    per stage), ``plain`` for PlainConvUNet plans (``cmcseg plan -pl PlainConvUNet``)."""
    return "residual" if "n_blocks_per_stage" in config.get("architecture", {}).get("arch_kwargs", {}) else "plain"


def plan_channels_per_modality(plans: Mapping[str, Any]) -> list[int]:
    """Components per modality in modality order, from ``plans["channels_per_modality"]``."""
    try:
        cpm = plans["channels_per_modality"]
        return [int(cpm[k]) for k in sorted(cpm, key=int)]
    except (KeyError, TypeError, ValueError) as e:
        raise CmcsegError(f"plans.json has no usable channels_per_modality ({e!r}). Fix: rerun `cmcseg plan`.") from e


def input_channel_modalities(channels_per_modality: Mapping[Any, int]) -> list[int]:
    """The modality of each input channel (a modality with 3 components, RGB, gives 3 channels)."""
    return [int(m) for m in sorted(channels_per_modality, key=int) for _ in range(int(channels_per_modality[m]))]


def _label_manager(plans: Mapping[str, Any]) -> LabelManager:
    if "labels" not in plans:
        raise CmcsegError("plans.json has no labels. Fix: rerun `cmcseg plan`.")
    return LabelManager(nnunet_label_dict(plans["labels"]), plans.get("regions_class_order"))


def plan_num_classes(plans: Mapping[str, Any]) -> int:
    """Output channels, by nnU-Net's ``LabelManager`` (an ``ignore`` label is not predicted; regions count as heads)."""
    return _label_manager(plans).num_segmentation_heads


def foreground_labels(plans: Mapping) -> list[int]:
    """Label values to sample locations for: every label but background (and an 'ignore' label)."""
    return sorted(int(v) for k, v in plans["labels"].items() if int(v) != 0 and k != "ignore")


@dataclass(frozen=True)
class LabelInfo:
    """The classes scored: foreground label values and names, the number of outputs, the ignore label."""

    names: tuple[str, ...]
    values: tuple[int, ...]
    num_classes: int
    ignore_label: int | None

    @classmethod
    def from_plans(cls, plans: Mapping) -> LabelInfo:
        """From ``plans["labels"]`` via nnU-Net's ``LabelManager`` (region-based labels are not supported here)."""
        manager = _label_manager(plans)
        if manager.has_regions:
            raise NotImplementedError("region-based labels are not supported by cmcseg's validation")
        values = tuple(int(v) for v in manager.foreground_labels)
        names = _names_by_value(plans)
        return cls(tuple(names.get(v, str(v)) for v in values), values, manager.num_segmentation_heads,
                   manager.ignore_label)

    @classmethod
    def every_class(cls, plans: Mapping) -> LabelInfo:
        """Every class including value 0, as scene benchmarks score mIoU (in the DELIVER release class 0 is
        Building)."""
        info = cls.from_plans(plans)
        names = _names_by_value(plans)
        values = tuple(range(info.num_classes))
        return cls(tuple(names.get(v, str(v)) for v in values), values, info.num_classes, info.ignore_label)


def _names_by_value(plans: Mapping) -> dict[int, str]:
    return {int(v): k for k, v in plans["labels"].items() if k != "ignore" and not isinstance(v, (list, tuple))}
