"""Loading a trained model folder for prediction, and refusing what does not fit.

A model folder is ``<results>/DatasetNNN_NAME/<Trainer>__<configuration>__labeled<F>/``::

    plans.json            the plans the trainer built its network from (written by the trainer at train start)
    dataset.json          the dataset's channels, labels and original label values
    fold_F/checkpoint_{final,best,latest}.pt
    fold_F/training_config.json

It is self-contained, as nnU-Net's is: the network is rebuilt from ``plans.json``, the
checkpoint's ``init`` (encoder options) and the fold's ``training_config.json`` (the trainer's
hyperparameters), without the preprocessed folder. Every checkpoint records the SHA-256 of
the plans it was trained with; a fold whose hash differs from ``plans.json`` is refused.

The network is rebuilt by the trainer class the checkpoint names
(``build_network_architecture``, as in nnU-Net the one place a network is built, for training and
inference; ``build_inference_network`` loads a fold's weights and wraps the network to give
probabilities). The class is looked up among the registered trainers and the trainer classes
already imported; a ``module:Class`` trainer of the user's own is named with ``cmcseg predict
--trainer`` (a checkpoint never makes cmcseg import a module).
A trainer class says whether it segments cases with missing modalities through its class
attribute ``accepts_missing_modalities`` (CMC: no; Any2Seg: yes), and may restrict the
mirroring axes of the test-time augmentation with ``inference_allowed_mirroring_axes``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cmcseg.checkpoint import CHECKPOINT_KINDS, FORMAT_VERSION, load_checkpoint
from cmcseg.dataset import Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json
from cmcseg.paths import check_file_ending, check_name, find_dataset_folder, parse_folder_name
from cmcseg.plans.files import DATASET_FILE, PLANS_FILE, TRAINING_CONFIG_FILE
from cmcseg.plans.plans import (
    check_plans,
    input_channel_modalities,
    plan_configuration,
    plans_hash,
)

if TYPE_CHECKING:  # for annotations only: prediction looks its trainer class up when a model is loaded
    from cmcseg.training.trainer import TrainerBase

log = logging.getLogger(__name__)

_FOLD_RE = re.compile(r"^fold_(\d+)$")



@dataclass
class FoldCheckpoint:
    """One fold of a model: its checkpoint file, weights and training record."""

    fold: int
    path: Path
    weights: Mapping[str, Tensor]
    training_config: dict = field(default_factory=dict)


@dataclass
class TrainedModel:
    """A model folder loaded for prediction: plans, dataset.json, trainer and the chosen folds' weights."""

    folder: Path
    plans: dict
    dataset_json: dict
    configuration: str
    trainer_name: str
    trainer_class: type[TrainerBase] | None
    init: dict
    hyperparameters: dict
    folds: list[FoldCheckpoint]
    checkpoint_kind: str = "final"

    # ------------------------------------------------------------------ what the model was trained on
    @property
    def dataset_folder_name(self) -> str:
        """``DatasetNNN_NAME`` of the training data."""
        return str(self.init.get("dataset") or self.folder.parent.name)

    @property
    def config(self) -> dict:
        return plan_configuration(self.plans, self.configuration)

    @property
    def patch_size(self) -> list[int]:
        return [int(p) for p in self.config["patch_size"]]

    @property
    def channel_names(self) -> dict[int, str]:
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return {int(k): str(v) for k, v in names.items()}

    @property
    def labels(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.dataset_json.get("labels", self.plans["labels"]).items()}

    @property
    def unpaired(self) -> bool:
        return str(self.plans.get("pairing", "paired")).lower() == "unpaired"

    @property
    def num_image_channels(self) -> int:
        return len(input_channel_modalities(self.plans["channels_per_modality"]))

    @property
    def accepts_missing_modalities(self) -> bool:
        """Whether the trainer's network segments a case with some modalities absent (CMC: no)."""
        return bool(getattr(self.trainer_class, "accepts_missing_modalities", False))

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """Spatial axes (of the patch) that test-time mirroring flips.

        The axes the checkpoint records (``init["mirror_axes"]``, e.g. Any2Seg on natural scenes: horizontal
        only), else the trainer class's ``inference_allowed_mirroring_axes`` when it sets one; else the axes the
        training augmentation mirrored, by nnU-Net's rule for the patch size (every axis, for 3D
        patches too when they are anisotropic, as nnU-Net does).
        """
        axes = self.init.get("mirror_axes", getattr(self.trainer_class, "inference_allowed_mirroring_axes", None))
        if axes is not None:
            return tuple(int(a) for a in axes)
        # checkpoints written before the trainer recorded its axes were trained with nnU-Net's rule
        # (configure_rotation_dummyDA_mirroring_and_inital_patch_size): every axis of the patch, 2D and 3D alike
        return tuple(range(len(self.patch_size)))

    def dataset(self) -> Dataset:
        """The dataset as the preprocessor sees it (channels, labels, pairing; no cases)."""
        meta = self.dataset_json
        dim = str(meta.get("tensorImageSize", "")).lower()
        return Dataset(
            folder=self.folder, name=str(meta.get("name") or self.dataset_folder_name),
            channel_names=self.channel_names, labels=self.labels, file_ending=str(meta.get("file_ending", ".nii.gz")),
            pairing=str(meta.get("pairing", self.plans.get("pairing", "paired"))),
            original_label_values={str(k): int(v) for k, v in meta.get("original_label_values", {}).items()},
            dimensionality="2d" if dim == "2d" else ("3d" if dim in ("3d", "4d") else None),
            reference_modality=meta.get("reference_modality"), metadata=dict(meta),
        )

    def describe(self) -> str:
        folds = ", ".join(str(f.fold) for f in self.folds)
        return (f"{self.trainer_name} {self.configuration} on {self.dataset_folder_name}, fold(s) {folds}, "
                f"checkpoint_{self.checkpoint_kind}")


# ---------------------------------------------------------------------------------------- folders
def has_checkpoints(folder: Path) -> bool:
    """True when ``folder`` has a ``fold_N`` sub-folder with a checkpoint."""
    return any(_FOLD_RE.match(f.name) and any(f.glob("checkpoint_*.pt")) for f in folder.iterdir() if f.is_dir())


def list_model_folders(dataset_results: Path) -> list[Path]:
    """The model folders (with at least one fold checkpoint) under ``<results>/DatasetNNN_NAME``."""
    if not dataset_results.is_dir():
        return []
    return [f for f in sorted(dataset_results.iterdir()) if f.is_dir() and has_checkpoints(f)]


def find_model_folder(results_root: Path, dataset_spec: str, plans: str | None = None) -> Path:
    """The single model folder of a dataset under the results root (of the plans identifier ``plans``, when given:
    ``cmcseg predict -p``); several or none is an error."""
    dataset_results = find_dataset_folder(results_root, dataset_spec)
    models = list_model_folders(dataset_results) if dataset_results is not None else []
    if plans is not None:
        models = [m for m in models if _model_plans_name(m) == plans]
    if not models:
        where = dataset_results or Path(results_root)
        raise CmcsegError(f"no trained model of dataset '{dataset_spec}' under {where}. Fix: train one with "
                          f"`cmcseg train -d {dataset_spec} -f 0 --labeled 0.2`, or pass the model folder with -m "
                          "(or the results root with --results).")
    if len(models) > 1:
        listing = "\n  ".join(str(m) for m in models)
        raise CmcsegError(f"dataset '{dataset_spec}' has {len(models)} trained models:\n  {listing}\n"
                          "Fix: choose one with -m MODEL_DIR (or -p PLANS).")
    return models[0]


def _model_plans_name(folder: Path) -> str | None:
    """The plans identifier a model folder was trained with (its plans.json's ``plans_name``)."""
    try:
        return str(read_json(folder / PLANS_FILE).get("plans_name"))
    except (OSError, ValueError, CmcsegError, AttributeError):
        return None


def check_model_dataset(model: TrainedModel, dataset_spec: str) -> None:
    """Refuse a model trained on another dataset than ``dataset_spec`` (name, id or folder name)."""
    folder_name = model.dataset_folder_name
    parsed = parse_folder_name(folder_name)
    spec = str(dataset_spec)
    same = spec == folder_name or (parsed is not None and (
        (spec.isdigit() and int(spec) == parsed[0]) or spec.lower() == parsed[1].lower()))
    if not same:
        raise CmcsegError(f"model {model.folder} was trained on {folder_name}, not on dataset '{spec}'. Fix: pass a "
                          f"model of {spec} with -m, or -d {folder_name} for this model.")


def _fold_folders(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): f for f in sorted(folder.iterdir()) if f.is_dir() and (m := _FOLD_RE.match(f.name))}


def select_folds(folder: Path, folds: Sequence[int] | None, checkpoint: str) -> dict[int, Path]:
    """Fold -> checkpoint file; ``None`` means every fold that has ``checkpoint_<kind>.pt``."""
    if checkpoint not in CHECKPOINT_KINDS:
        raise CmcsegError(f"unknown checkpoint {checkpoint!r}. Fix: pass one of {', '.join(CHECKPOINT_KINDS)}.")
    available = _fold_folders(folder)
    name = f"checkpoint_{checkpoint}.pt"
    with_checkpoint = {f: p / name for f, p in available.items() if (p / name).is_file()}
    if folds is None:
        if not with_checkpoint:
            others = {f: sorted(c.stem.removeprefix("checkpoint_") for c in p.glob("checkpoint_*.pt"))
                      for f, p in available.items()}
            have = "; ".join(f"fold_{f}: {', '.join(k) or 'none'}" for f, k in others.items()) or "no fold folder"
            raise CmcsegError(f"no fold of {folder} has {name} ({have}). Fix: pass --checkpoint with one that "
                              "exists (e.g. latest), or finish training.")
        return with_checkpoint
    missing = [f for f in folds if f not in with_checkpoint]
    if missing:
        raise CmcsegError(f"{folder} has no {name} for fold(s) {', '.join(map(str, missing))} (folds with it: "
                          f"{', '.join(map(str, sorted(with_checkpoint))) or 'none'}). Fix: pass -f with those "
                          "folds, another --checkpoint, or train the missing folds.")
    return {f: with_checkpoint[f] for f in folds}


# ---------------------------------------------------------------------------------------- loading
def _model_json(folder: Path, name: str, fallback: Path | None) -> dict:
    path = folder / name
    if path.is_file():
        return read_json(path)
    if fallback is not None and (fallback / name).is_file():
        log.warning("%s has no %s; using %s (checked against the checkpoints' plans hash)", folder, name,
                    fallback / name)
        return read_json(fallback / name)
    raise CmcsegError(f"{path} is missing: the model folder is incomplete. Fix: copy {name} of the preprocessed "
                      "dataset into the model folder, or pass --preprocessed with the root the model was trained "
                      "from (cmcseg train writes both files there at train start).")


def resolve_trainer_class(name: str) -> type[TrainerBase] | None:
    """The trainer class called ``name``: registered, or any TrainerBase subclass loaded in this process.

    ``name`` comes from a checkpoint, i.e. from whoever made the model folder, so it is only looked up: a
    ``module:Class`` name is never imported from here.
    """
    from cmcseg.training.registry import get_trainer_class, is_builtin_name
    from cmcseg.training.trainer import TrainerBase

    if is_builtin_name(name):
        return get_trainer_class(name)
    todo, seen = [TrainerBase], set()
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        seen.add(cls)
        todo.extend(c for c in cls.__subclasses__() if c not in seen)
    return None


def user_trainer_class(spec: str, trained_by: str, folder: Path) -> type[TrainerBase]:
    """The trainer class the user names (``--trainer NAME`` or ``module:Class``, imported: the user chose it), which
    must be the one the checkpoint says trained the model."""
    from cmcseg.training.registry import get_trainer_class

    cls = get_trainer_class(spec)
    if cls.__name__ != trained_by:
        raise CmcsegError(f"--trainer {spec} is {cls.__name__}, but {folder} was trained by {trained_by}. Fix: "
                          f"pass the trainer the model was trained with (module:{trained_by}), or leave --trainer "
                          "out for cmcseg's own trainers.")
    return cls


def load_trained_model(folder: Path | str, folds: Sequence[int] | None = None, checkpoint: str = "final",
                       preprocessed_dataset: Path | None = None, unsafe_allow_pickle: bool = False,
                       trainer: str | None = None) -> TrainedModel:
    """Load the chosen folds of a model folder; refuses inconsistent folds and plans with a clear error.

    A model folder may come from someone else, so it is read as data: plans.json and dataset.json are checked
    (file ending, modality names) before any checkpoint is opened, and checkpoints load with
    ``weights_only=True`` unless ``unsafe_allow_pickle`` (``--unsafe-allow-pickle``). ``trainer``
    (``--trainer``) names the user's own trainer class that rebuilds the network.
    ``preprocessed_dataset``: where plans.json and dataset.json are taken from when the model
    folder lacks them (models trained before the trainer wrote them); the plans hash still has to match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CmcsegError(f"model folder {folder} does not exist. Fix: pass the folder that holds fold_0, fold_1, "
                          "... (-m), or -d NAME to find it under the results root.")
    fold_name = _FOLD_RE.match(folder.name)
    if fold_name and not _fold_folders(folder):
        raise CmcsegError(f"{folder} is a fold folder. Fix: pass its parent, the model folder, with -m (and "
                          f"-f {fold_name.group(1)} for this fold only).")
    paths = select_folds(folder, folds, checkpoint)
    plans = check_plans(_model_json(folder, PLANS_FILE, preprocessed_dataset), folder / PLANS_FILE)
    dataset_json = _model_json(folder, DATASET_FILE, preprocessed_dataset)
    check_model_json(folder, plans, dataset_json)
    loaded = [_load_fold(fold, path, unsafe_allow_pickle) for fold, path in sorted(paths.items())]
    first_state, first = loaded[0]
    init = dict(first_state.get("init", {}))
    for state, fold in loaded[1:]:
        other = state.get("init", {})
        for key in ("configuration", "dataset", "encoder", "shared_encoder"):
            if other.get(key) != init.get(key):
                raise CmcsegError(f"fold_{fold.fold} of {folder} differs from fold_{first.fold} in {key} "
                                  f"({other.get(key)!r} vs {init.get(key)!r}). Fix: predict with folds of one model "
                                  "(-f).")
        if state.get("trainer") != first_state.get("trainer"):
            raise CmcsegError(f"fold_{fold.fold} of {folder} was trained by {state.get('trainer')}, fold_{first.fold} "
                              f"by {first_state.get('trainer')}. Fix: predict with folds of one trainer (-f).")
    digest = plans_hash(plans)
    for state, fold in loaded:
        if state.get("plans_sha256") not in (None, digest):
            raise CmcsegError(f"{fold.path} was trained with other plans than {folder / PLANS_FILE} holds (plans "
                              "hash differs). Fix: predict without that fold (-f), or retrain it with these plans.")
    configuration = str(init.get("configuration") or first.training_config.get("configuration", "3d_fullres"))
    trainer_name = check_name(first_state.get("trainer", "CMCTrainer"), "trainer name", str(first.path), 100)
    trainer_class = (user_trainer_class(trainer, trainer_name, folder) if trainer
                     else resolve_trainer_class(trainer_name))
    model = TrainedModel(folder, plans, dataset_json, configuration, trainer_name, trainer_class,
                         init, dict(first.training_config.get("hyperparameters", {})), [f for _, f in loaded],
                         checkpoint)
    _check_plans_and_dataset(model)
    log.debug("model: %s", model.describe())  # the CLI prints it
    return model


def check_model_json(folder: Path, plans: Mapping, dataset_json: Mapping) -> None:
    """The names in a model folder's JSON that become output paths are plain names (raises UnsafeNameError)."""
    source = str(folder / DATASET_FILE)
    if not isinstance(dataset_json, Mapping) or not isinstance(plans, Mapping):
        raise CmcsegError(f"{folder}: plans.json and dataset.json must each hold a JSON object. Fix: restore the "
                          "model folder's files.")
    check_file_ending(dataset_json.get("file_ending", ".nii.gz"), source)
    names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    for name in (names.values() if isinstance(names, Mapping) else []):
        check_name(name, "channel name", source, max_length=64)
    for name in plans.get("channels_per_modality", {}) or {}:
        check_name(name, "modality name", str(folder / PLANS_FILE), max_length=64)


def _load_fold(fold: int, path: Path, unsafe_allow_pickle: bool = False) -> tuple[dict, FoldCheckpoint]:
    state = load_checkpoint(path, map_location="cpu", unsafe_allow_pickle=unsafe_allow_pickle)
    config_path = path.parent / TRAINING_CONFIG_FILE
    training_config = read_json(config_path) if config_path.is_file() else {}
    return state, FoldCheckpoint(fold, path, state["network"], training_config)


def _check_plans_and_dataset(model: TrainedModel) -> None:
    """plans.json and dataset.json of one model agree on the modalities."""
    planned = len(model.plans.get("channels_per_modality", {}))
    if planned != len(model.channel_names):
        raise CmcsegError(f"{model.folder}: plans.json has {planned} modalities, dataset.json "
                          f"{len(model.channel_names)}. Fix: restore the model folder's plans.json and dataset.json.")


# ---------------------------------------------------------------------------------------- networks
def network_trainer(model: TrainedModel) -> type[TrainerBase]:
    """The trainer class whose ``build_inference_network`` rebuilds the model's network.

    The checkpoint's trainer class; for a CMC trainer subclass from a module that is not imported here (its
    hyperparameters say so), CMCTrainer itself, which rebuilds the network from plans.json and the stored options.
    """
    if model.trainer_class is not None:
        return model.trainer_class
    if "cac_weight" in model.hyperparameters:
        log.info("trainer %s is not importable here; its hyperparameters are CMCTrainer's, so it is rebuilt as a "
                 "CMC network from plans.json", model.trainer_name)
        cmc = resolve_trainer_class("CMCTrainer")
        assert cmc is not None
        return cmc
    raise CmcsegError(f"cmcseg predict does not know trainer {model.trainer_name} ({model.folder}), so it cannot "
                      "rebuild the network. Fix: pass --trainer module:ClassName, the trainer class the model was "
                      "trained with (its build_network_architecture builds the network).")


def build_inference_networks(model: TrainedModel, device: torch.device) -> list[nn.Module]:
    """One probability network per fold, on ``device``, in eval mode, built by the model's trainer class (the one
    place its network is built, for training and for inference)."""
    trainer = network_trainer(model)
    options = {**model.hyperparameters, **model.init}
    networks = []
    for fold in model.folds:
        try:
            network = trainer.build_inference_network(model.plans, model.configuration, options, fold.weights)
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys, shape mismatch
            fix = ("restore the plans.json the model was trained with" if model.trainer_class is not None else
                   f"pass --trainer module:{model.trainer_name}, the trainer class that built this network")
            raise CmcsegError(f"{fold.path} does not fit the network {trainer.__name__} rebuilt from "
                              f"{model.folder / PLANS_FILE} ({' '.join(str(e).split())[:400]}). Fix: {fix}.") from e
        networks.append(network.to(device).eval())
    return networks


# ---------------------------------------------------------------------------------------- writing
def write_model_folder(folder: Path | str, plans: Mapping, dataset_json: Mapping, fold_weights: Mapping[int, Mapping],
                       trainer_name: str = "CMCTrainer", init: Mapping | None = None,
                       hyperparameters: Mapping | None = None, checkpoint: str = "final") -> Path:
    """Write a model folder in the layout the trainer writes and :func:`load_trained_model` reads.

    For weights that did not come from ``cmcseg train`` (benchmarks with random weights, tests,
    imported models): plans.json, dataset.json, and per fold ``checkpoint_<kind>.pt`` (weights,
    trainer name, plans hash, ``init``) and ``training_config.json`` (hyperparameters). Atomic writes.
    """
    from cmcseg.checkpoint import save_checkpoint
    from cmcseg.image_io import write_json_atomic

    folder = Path(folder)
    write_json_atomic(dict(plans), folder / PLANS_FILE)
    write_json_atomic(dict(dataset_json), folder / DATASET_FILE)
    digest = plans_hash(plans)
    for fold, weights in fold_weights.items():
        fold_init = {"dataset": folder.parent.name, "configuration": "3d_fullres", "fold": int(fold),
                     "encoder": "residual", "shared_encoder": False, **dict(init or {})}
        state = {"format_version": FORMAT_VERSION, "kind": checkpoint, "trainer": trainer_name,
                 "network": dict(weights),
                 "plans_sha256": digest, "init": fold_init, "epoch": 0}
        save_checkpoint(state, folder / f"fold_{fold}" / f"checkpoint_{checkpoint}.pt")
        write_json_atomic({"trainer": trainer_name, "dataset": fold_init["dataset"],
                           "configuration": fold_init["configuration"], "fold": int(fold), "plans_sha256": digest,
                           "hyperparameters": dict(hyperparameters or {})},
                          folder / f"fold_{fold}" / TRAINING_CONFIG_FILE)
    return folder
