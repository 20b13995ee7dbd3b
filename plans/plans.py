"""plans.json, read in one place: every stage asks this module what the plans say.

The plans are the contract between stages (as in nnU-Net): ``cmcseg plan`` writes them, and the
preprocessor, the trainers, the memory estimate and the predictor read them through these
functions only, so that a key is interpreted one way everywhere:

* :func:`load_plans` opens ``plans.json`` with a clear error when it is missing or not JSON;
* :class:`Plans` and :class:`Configuration` are nnU-Net's ``PlansManager`` and ``ConfigurationManager`` with
  cmcseg's keys: :func:`plan_configuration` resolves a configuration (``inherits_from``) by nnU-Net's code, and
  the result is both the plain dict the stages index and nnU-Net's accessors on it (``patch_size``,
  ``resampling_fn_probabilities``, ...), so it can be handed to nnU-Net's functions;
* :meth:`Configuration.network_architecture` gives the network class and its arguments, after checking that
  every name it will import is one of torch's or dynamic_network_architectures' modules (a plans file from
  someone else is data: it cannot make cmcseg import or call anything else);
* :func:`plan_channels_per_modality` and :func:`input_channel_modalities` say which input channel
  belongs to which modality (an RGB modality has three);
* :func:`plan_num_classes`, :func:`foreground_labels` and :class:`LabelInfo` interpret the labels
  through nnU-Net's ``LabelManager`` (an ``ignore`` label is not predicted);
* :func:`plans_hash` is what every checkpoint records, so prediction can refuse other plans.
"""
from __future__ import annotations

import hashlib
import json
import pydoc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

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


#: where a plan may name its network's classes from: what nnU-Net's planners write. Any other name in
#: ``architecture`` is refused before it is imported (``pydoc.locate`` imports modules, and nnU-Net calls the
#: classes it finds with the plan's keyword arguments: ``"nonlin": "subprocess.call"`` would run a command).
ARCHITECTURE_PACKAGES = ("torch.nn.", "dynamic_network_architectures.architectures.")


class Configuration(dict, ConfigurationManager):
    """One resolved configuration: the dict plans.json holds, which the stages index (``config["patch_size"]``),
    and nnU-Net's ``ConfigurationManager`` on the same dict (``config.patch_size``,
    ``config.resampling_fn_probabilities``, ...), so nnU-Net's functions that take one can be given it."""

    def __init__(self, name: str, values: Mapping[str, Any]):
        dict.__init__(self, values)
        if not isinstance(self.get("architecture"), Mapping):
            raise CmcsegError(f"plans.json: configuration {name!r} has no 'architecture' (the network topology). "
                              "Fix: rerun `cmcseg plan` to write a complete plans.json.")
        ConfigurationManager.__init__(self, self)  # nnU-Net's accessors read self.configuration
        self.name = name

    #: nnU-Net caches some accessors (``lru_cache``) by the manager; a dict has no hash, a manager has its identity
    __hash__ = object.__hash__  # type: ignore[assignment]

    def network_architecture(self) -> tuple[str, dict[str, Any]]:
        """``(network class path, arch_kwargs with its class paths imported)``, for nnU-Net's
        ``get_network_from_plans`` (with no kwargs left to import).

        Every class path is checked before and after it is imported: it must name, inside
        :data:`ARCHITECTURE_PACKAGES`, a class that is a ``torch.nn.Module`` (a clear error names the key).
        """
        architecture = self["architecture"]
        try:
            name = str(architecture["network_class_name"])
            kwargs = dict(architecture["arch_kwargs"])
            requires_import = [str(k) for k in architecture.get("_kw_requires_import", ())]
        except (KeyError, TypeError) as e:
            raise CmcsegError(f"plans.json: configuration {self.name!r} has no usable architecture ({e!r}). "
                              "Fix: rerun `cmcseg plan` to write a complete plans.json.") from e
        _module_class(self.name, "network_class_name", name)
        for key in requires_import:
            if kwargs.get(key) is not None:
                kwargs[key] = _module_class(self.name, key, kwargs[key])
        return name, kwargs


def _module_class(configuration: str, key: str, path: Any) -> type:
    """The ``torch.nn.Module`` class at ``path``, imported only if ``path`` lies in :data:`ARCHITECTURE_PACKAGES`."""
    located = pydoc.locate(path) if isinstance(path, str) and path.startswith(ARCHITECTURE_PACKAGES) else None
    if not (isinstance(located, type) and issubclass(located, nn.Module)):
        raise CmcsegError(
            f"plans.json: configuration {configuration!r} names {key}={path!r}, which is not a torch.nn.Module "
            f"class of {' or '.join(p.rstrip('.') for p in ARCHITECTURE_PACKAGES)}; cmcseg imports nothing else "
            "that a plans file names. Fix: use a plans.json written by `cmcseg plan`.")
    return located


class Plans(PlansManager):
    """nnU-Net's ``PlansManager`` over a cmcseg plans dict, with the keys cmcseg adds (modalities, labels)."""

    def __init__(self, plans: Mapping[str, Any]):
        super().__init__(plans if isinstance(plans, dict) else dict(plans))

    def get_configuration(self, configuration_name: str) -> Configuration:
        """The configuration with ``inherits_from`` resolved by nnU-Net's code; a clear error if it is unknown or
        its inheritance is circular."""
        configs = self.plans.get("configurations", {})
        if configuration_name not in configs:
            raise CmcsegError(f"plans.json has no configuration {configuration_name!r}. Fix: choose one of "
                              f"{sorted(configs)} or plan it with `cmcseg plan -c`.")
        try:
            values = self._internal_resolve_configuration_inheritance(configuration_name)
        except (ValueError, RuntimeError) as e:
            raise CmcsegError(f"plans.json: configuration {configuration_name!r} inherits from an unknown or "
                              f"circular parent ({e}). Fix: correct 'inherits_from' or rerun `cmcseg plan`.") from e
        values.pop("inherits_from", None)
        return Configuration(configuration_name, values)

    @property
    def channels_per_modality(self) -> list[int]:
        return plan_channels_per_modality(self.plans)

    @property
    def label_manager(self) -> LabelManager:
        return _label_manager(self.plans)


def plan_configuration(plans: Mapping[str, Any], configuration: str | Configuration) -> Configuration:
    """``plans["configurations"][configuration]`` resolved (``inherits_from``), as :class:`Configuration`; a
    configuration already resolved is returned as it is (the trainer resolves once and passes it down)."""
    if isinstance(configuration, Configuration):
        return configuration
    return Plans(plans).get_configuration(configuration)


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
