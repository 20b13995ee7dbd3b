"""Training and validation batches from preprocessed cases: two-stream sampling, patches, augmentation.

Each batch is built the way nnU-Net's ``nnUNetDataLoader.generate_train_batch`` builds one, with
nnU-Net's own pieces: its patch-location rule (``nnUNetDataLoader.get_bbox``: padding, the
larger initial patch for rotation, foreground oversampling of the last ``round(B * p)`` items from
the stored ``class_locations``), ``crop_and_pad_nd`` on the memory-mapped blosc2 arrays, and its
transform pipelines (:mod:`cmcseg.training.augmentation`). cmcseg adds:

* the composition of a batch comes from :class:`~cmcseg.training.sampler.TwoStreamBatchSampler`:
  labeled items first, then unlabeled ones. Unlabeled items never read a label, even where one
  is on disk (``--labeled 0.2`` keeps labels of only 20% of the training cases); their patches
  are placed uniformly and their target rows are the ignore value -1;
* the field-of-view masks follow the images through every spatial transform and are appended
  to the input channels: ``data`` is ``(B, C + M, *patch)``;
* a batch is a pure function of (seed, batch number): its random state is seeded from them, so
  the same run gives the same batches whatever the number of workers.

Batches are built in torch ``DataLoader`` worker processes (one whole batch per task, as nnU-Net's
augmenter does) and streamed forever, so the training loop rarely waits.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Sampler

from cmcseg.errors import CmcsegError
from cmcseg.plans.plans import Configuration, input_channel_modalities, plan_configuration
from cmcseg.preprocessing.storage import case_files, read_array, read_properties
from cmcseg.training.augmentation import (
    SpatialAugmentation,
    configure_spatial_augmentation,
    deep_supervision_scales,
    training_transforms,
    validation_transforms,
)
from cmcseg.training.sampler import TwoStreamBatchSampler, endless_batches

__all__ = [
    "IGNORE_VALUE", "BatchBuilder", "PatchCropper", "TrainingBatches", "build_training_loader",
    "build_validation_patches", "input_channels", "plan_deep_supervision_scales",
]

logger = logging.getLogger(__name__)

#: Target value of voxels that carry no label: rows of unlabeled items, never used as a label.
IGNORE_VALUE = -1
#: Seed-stream tags, so training and validation batches with the same number differ.
_TRAIN_STREAM, _VALIDATION_STREAM = 0, 1


# ------------------------------------------------------------------------------------- plan helpers
def _modalities(plans: Mapping[str, Any]) -> list[int]:
    try:
        return sorted(int(m) for m in plans["channels_per_modality"])
    except (KeyError, TypeError, ValueError) as e:
        raise CmcsegError(f"plans.json has no usable channels_per_modality ({e!r}). Fix: rerun `cmcseg plan`.") from e


def input_channels(plans: Mapping[str, Any]) -> int:
    """Network input channels: every modality's components, then one FOV mask per modality."""
    return sum(int(v) for v in plans["channels_per_modality"].values()) + len(_modalities(plans))


def plan_deep_supervision_scales(plans: Mapping[str, Any], configuration: str | Configuration) -> list[list[float]]:
    """Deep-supervision scales of a configuration, from its network strides (full resolution first)."""
    config = plan_configuration(plans, configuration)
    try:
        strides = config["architecture"]["arch_kwargs"]["strides"]
    except KeyError as e:
        raise CmcsegError(f"plans.json: configuration {config.name!r} has no architecture strides. "
                          "Fix: rerun `cmcseg plan`.") from e
    return deep_supervision_scales(strides)


def _channel_fov_index(plans: Mapping[str, Any]) -> list[int]:
    """For each input channel, the index of its modality's FOV mask."""
    modalities = _modalities(plans)
    return [modalities.index(m) for m in input_channel_modalities(plans["channels_per_modality"])]


# ------------------------------------------------------------------------------------- patches
class PatchCropper:
    """Where to cut a patch and how to pad it: nnU-Net's ``nnUNetDataLoader`` rule, reused as is.

    ``patch_size`` is the size the cut is made at (the larger initial patch in training), and
    ``final_patch_size`` what the network gets; the difference is padding so that final patches
    also cover the image border. 2D patches become pseudo-3D ``(1, y, x)`` cuts of a 3D case.
    """

    #: nnU-Net's patch-location function; it only reads the attributes set in ``__init__``.
    get_bbox = nnUNetDataLoader.get_bbox

    def __init__(self, patch_size: Sequence[int], final_patch_size: Sequence[int],
                 oversample_foreground_percent: float) -> None:
        self.is_2d = len(final_patch_size) == 2
        lead = (1,) if self.is_2d else ()
        self.patch_size = np.array([*lead, *patch_size], dtype=int)
        self.final_patch_size = np.array([*lead, *final_patch_size], dtype=int)
        self.need_to_pad = (self.patch_size - self.final_patch_size).astype(int)
        self.oversample_foreground_percent = float(oversample_foreground_percent)
        # cmcseg stores class locations of the foreground labels only: no ignore-label sampling.
        self.has_ignore = False
        self.annotated_classes_key = ()

    def force_foreground(self, position: int, n_labeled: int) -> bool:
        """nnU-Net's ``_oversample_last_XX_percent`` on the labeled stream of a batch: the last
        ``round(n * p)`` of the ``n_labeled`` items must hold foreground, and at least one when ``p > 0``.

        nnU-Net's own rule forces none in a batch of one (``round(1 * 0.67) = 1`` free item), so a
        single labeled row would never be sure to see the thin classes."""
        if self.oversample_foreground_percent <= 0 or n_labeled < 1:
            return False
        forced = max(1, int(round(n_labeled * self.oversample_foreground_percent)))
        return position >= n_labeled - forced

    def bbox(self, shape: Sequence[int], force_fg: bool,
             class_locations: Mapping[int, np.ndarray] | None) -> list[list[int]]:
        """``[[lo, hi], ...]`` of a patch in a case of spatial ``shape`` (may reach outside: padded)."""
        lbs, ubs = self.get_bbox(np.asarray(shape), force_fg and class_locations is not None, class_locations)
        return [[int(lo), int(hi)] for lo, hi in zip(lbs, ubs)]


@dataclass(frozen=True)
class Item:
    """One case of a loader: its id and whether its label is used."""

    case_id: str
    labeled: bool


class BatchBuilder:
    """Builds whole batches from item indices (a map-style dataset whose keys are batches).

    ``self[(batch_number, indices)]`` gives the batch dict. Its random state (patch locations,
    augmentation) is seeded from ``(seed, stream, batch_number)``.
    """

    def __init__(self, folder: Path, items: Sequence[Item], cropper: PatchCropper, transforms: BasicTransform,
                 use_mask_for_norm: Sequence[bool] | None, seed: int, stream: int = _TRAIN_STREAM) -> None:
        self.folder = Path(folder)
        self.items = list(items)
        self.cropper = cropper
        self.transforms = transforms
        self.needs_nonzero_mask = use_mask_for_norm is not None and any(use_mask_for_norm)
        self.seed = int(seed)
        self.stream = int(stream)
        self.class_locations = {item.case_id: self._read_class_locations(item) for item in self.items if item.labeled}

    def _read_class_locations(self, item: Item) -> dict[int, np.ndarray]:
        """The stored foreground locations of a labeled case, read once (they can be long)."""
        files = case_files(self.folder, item.case_id)
        if not files["properties"].is_file():
            raise CmcsegError(f"preprocessed case {item.case_id} is missing in {self.folder} (no "
                              f"{files['properties'].name}). Fix: run `cmcseg plan` for this configuration.")
        props = read_properties(files["properties"])
        if not props.get("labeled", files["seg"].is_file()):
            raise CmcsegError(f"case {item.case_id} is used as a labeled case but {self.folder} has no label for it "
                              f"({files['seg'].name}). Fix: check the split's labeled cases, or preprocess the label.")
        locations = props.get("class_locations") or {}
        return {int(k): np.asarray(v, dtype=np.int64).reshape(-1, 4) for k, v in locations.items()}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, Sequence[int]]) -> dict:
        number, indices = key
        with _seeded(self.seed, self.stream, number), torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            return self.build(indices)

    def build(self, indices: Sequence[int]) -> dict:
        """The batch of items ``indices`` with the current random state.

        As nnU-Net does, each transformed sample is written straight into preallocated batch tensors.
        """
        items = [self.items[i] for i in indices]
        n_labeled = sum(item.labeled for item in items)
        labeled_position = 0
        batch = _BatchTensors(len(items))
        for j, item in enumerate(items):
            force_fg = False
            if item.labeled:
                force_fg = self.cropper.force_foreground(labeled_position, n_labeled)
                labeled_position += 1
            batch.put(j, self._sample(item, force_fg), item.labeled)
        return {"data": batch.data, "target": batch.target,
                "labeled": torch.tensor([item.labeled for item in items], dtype=torch.bool),
                "keys": [item.case_id for item in items]}

    def _sample(self, item: Item, force_fg: bool) -> dict:
        """One transformed sample: ``image`` (C + M channels) and ``segmentation`` (label or list over scales)."""
        data, seg, fov = self._arrays(item)
        locations = self.class_locations.get(item.case_id) if item.labeled else None
        bbox = self.cropper.bbox(data.shape[1:], force_fg, locations)
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        fov_patch = torch.from_numpy(crop_and_pad_nd(fov, bbox, 0, cast_cropped_to=np.int16)).to(torch.int16)
        if item.labeled:
            label = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        else:
            label = self._unlabeled_mask(image)
        segmentation = torch.cat((label, fov_patch), dim=0)
        if self.cropper.is_2d:
            image, segmentation = image[:, 0], segmentation[:, 0]
        return self.transforms(image=image, segmentation=segmentation)

    def _arrays(self, item: Item) -> tuple[Any, Any, Any]:
        """Memory-mapped (data, seg or None, fov) of an item; the seg is never opened for an unlabeled item.

        (``storage.load_case`` would also parse the properties JSON, which is long and read once in ``__init__``.)
        """
        files = case_files(self.folder, item.case_id)
        seg = read_array(files["seg"]) if item.labeled else None
        return read_array(files["data"]), seg, read_array(files["fov"])

    def _unlabeled_mask(self, image: torch.Tensor) -> torch.Tensor:
        """Label channel of an unlabeled item: 0 inside the image's nonzero region, -1 outside (padding).

        Only nnU-Net's ``use_mask_for_norm`` masking reads it; the target rows become -1 anyway.
        """
        if not self.needs_nonzero_mask:
            return torch.zeros((1, *image.shape[1:]), dtype=torch.int16)
        inside = (image != 0).any(dim=0, keepdim=True)
        return torch.where(inside, 0, -1).to(torch.int16)


class _BatchTensors:
    """Batch tensors, allocated from the first sample's shapes; target rows of unlabeled items are ``IGNORE_VALUE``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: torch.Tensor | None = None
        self.target: list[torch.Tensor] | torch.Tensor | None = None

    def put(self, j: int, sample: dict, labeled: bool) -> None:
        image, seg = sample["image"], sample["segmentation"]
        scales = list(seg) if isinstance(seg, (list, tuple)) else [seg]
        if self.data is None:
            self.data = torch.empty((self.size, *image.shape), dtype=torch.float32)
            targets = [torch.empty((self.size, *s.shape), dtype=s.dtype) for s in scales]
            self.target = targets if isinstance(seg, (list, tuple)) else targets[0]
        self.data[j] = image
        outputs = self.target if isinstance(self.target, list) else [self.target]
        for out, s in zip(outputs, scales):
            assert out is not None
            out[j] = s if labeled else IGNORE_VALUE


@contextlib.contextmanager
def _seeded(*seed_parts: int) -> Iterator[None]:
    """Seed numpy's and torch's global CPU generators (which nnU-Net's code uses) from ``seed_parts``;
    restore their previous state afterwards, so the caller's random state is untouched."""
    seed = int(np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seed_parts]).generate_state(1)[0])
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


# ------------------------------------------------------------------------------------- training loader
class _EndlessSampler(Sampler):
    """(batch number, indices) keys from pass after pass of a batch sampler; never ends."""

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        return endless_batches(self.batch_sampler)


def _as_is(batch: dict) -> dict:
    """Collate function of the loader: the builder returns finished batches."""
    return batch


class TrainingBatches(Iterator[dict]):
    """The endless stream of training batches; ``close()`` stops the worker processes."""

    def __init__(self, loader: DataLoader, sampler: TwoStreamBatchSampler, augmentation: SpatialAugmentation,
                 ds_scales: list[list[float]] | None) -> None:
        self.loader = loader
        self.sampler = sampler
        self.augmentation = augmentation
        self.deep_supervision_scales = ds_scales
        self._iterator: Iterator[dict] | None = iter(loader)

    @property
    def batches_per_pass(self) -> int:
        """Batches in one pass over the labeled cases."""
        return len(self.sampler)

    def __iter__(self) -> TrainingBatches:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        """Stop the background workers (also done when the object is garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> TrainingBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _data_folder(preprocessed_dataset_folder: Path, config: Mapping[str, Any]) -> Path:
    folder = Path(preprocessed_dataset_folder) / config["data_identifier"]
    if not folder.is_dir():
        raise CmcsegError(f"no preprocessed data at {folder}. Fix: run `cmcseg plan` for this configuration.")
    return folder


def build_training_loader(
    preprocessed_dataset_folder: Path,
    plans: dict,
    configuration: str | Configuration,
    labeled_ids: list[str],
    unlabeled_ids: list[str],
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    *,
    deep_supervision: bool = True,
    oversample_foreground_percent: float = 0.33,
    num_workers: int = 1,
    seed: int = 0,
    augment: bool = True,
    spatial_only: bool = False,
    prefetch_factor: int = 4,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    spatial_augmentation: SpatialAugmentation | None = None,
    ds_scales: Sequence[Sequence[float]] | None = None,
) -> TrainingBatches:
    """An endless iterator of training batches (see the module docstring for the batch dict).

    ``num_workers=0`` builds batches in this process (tests, debugging). ``augment=False``
    cuts patches at the final size with no augmentation; ``spatial_only`` keeps only nnU-Net's
    spatial transforms. A case id in ``unlabeled_ids`` is used without its label even where one
    exists. Call ``close()`` on the result (or use it as a context manager) to stop the workers.
    ``spatial_augmentation`` replaces nnU-Net's rule (:func:`configure_spatial_augmentation`), e.g.
    to keep driving scenes upright.
    """
    config = plan_configuration(plans, configuration)
    folder = _data_folder(preprocessed_dataset_folder, config)
    items = [Item(c, True) for c in labeled_ids] + [Item(c, False) for c in unlabeled_ids]
    sampler = TwoStreamBatchSampler(range(len(labeled_ids)), range(len(labeled_ids), len(items)),
                                    labeled_batch_size, unlabeled_batch_size, seed=seed)
    patch_size = [int(p) for p in config["patch_size"]]
    augmentation = spatial_augmentation or configure_spatial_augmentation(patch_size)
    if deep_supervision and ds_scales is None:
        ds_scales = plan_deep_supervision_scales(plans, config)
    ds_scales = ds_scales if deep_supervision else None
    fov_index = _channel_fov_index(plans)
    use_mask = config.get("use_mask_for_norm")
    if augment:
        transforms = training_transforms(augmentation, ds_scales, fov_index, use_mask, spatial_only=spatial_only)
        cropper = PatchCropper(augmentation.initial_patch_size, patch_size, oversample_foreground_percent)
    else:
        transforms = validation_transforms(ds_scales, fov_index)
        cropper = PatchCropper(patch_size, patch_size, oversample_foreground_percent)
    builder = BatchBuilder(folder, items, cropper, transforms, use_mask, seed, _TRAIN_STREAM)
    workers = max(0, int(num_workers))
    # a map-style dataset whose keys are whole batches, collated as they are (torch's stubs expect items)
    loader: DataLoader[dict] = DataLoader(cast(Any, builder), batch_size=None, sampler=_EndlessSampler(sampler),
                        collate_fn=cast(Any, _as_is),
                        num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if workers > 0 else None,
                        persistent_workers=workers > 0, multiprocessing_context=multiprocessing_context if workers
                        else None)
    initial = [int(p) for p in cropper.patch_size[-len(patch_size):]]
    logger.info("training loader %s: %d labeled + %d unlabeled cases, batches of %d + %d, patch %s (cut at %s), "
                "%d worker(s), %d batches per labeled pass", config.name, len(labeled_ids), len(unlabeled_ids),
                labeled_batch_size, unlabeled_batch_size, patch_size, initial, workers, len(sampler))
    return TrainingBatches(loader, sampler, augmentation,
                           None if ds_scales is None else [list(s) for s in ds_scales])


# ------------------------------------------------------------------------------------- validation patches
def build_validation_patches(
    preprocessed_dataset_folder: Path,
    plans: dict,
    configuration: str | Configuration,
    val_ids: list[str],
    *,
    num_patches: int,
    seed: int = 0,
    batch_size: int | None = None,
    deep_supervision: bool = True,
    oversample_foreground_percent: float = 0.33,
    ds_scales: Sequence[Sequence[float]] | None = None,
) -> list[dict]:
    """A fixed list of validation batches holding ``num_patches`` patches in all (no augmentation).

    The cases cycle through ``val_ids`` in a seeded order; within each batch (of the plan's batch
    size unless given) nnU-Net's foreground oversampling applies. The batch dicts are those of
    the training loader (``target`` a list over deep-supervision scales unless
    ``deep_supervision=False``; use ``target[0]`` for the full resolution). Built in this
    process and held in memory; the same arguments always give the same batches.
    """
    if not val_ids:
        raise CmcsegError("no validation cases given. Fix: check the fold's \"val\" list in splits.json.")
    config = plan_configuration(plans, configuration)
    folder = _data_folder(preprocessed_dataset_folder, config)
    patch_size = [int(p) for p in config["patch_size"]]
    batch_size = int(batch_size or config["batch_size"])
    if deep_supervision and ds_scales is None:
        ds_scales = plan_deep_supervision_scales(plans, config)
    ds_scales = ds_scales if deep_supervision else None
    fov_index = _channel_fov_index(plans)
    items = [Item(c, True) for c in val_ids]
    builder = BatchBuilder(folder, items, PatchCropper(patch_size, patch_size, oversample_foreground_percent),
                           validation_transforms(ds_scales, fov_index), config.get("use_mask_for_norm"),
                           seed, _VALIDATION_STREAM)
    order = np.random.default_rng([int(seed), _VALIDATION_STREAM]).permutation(len(items))
    sequence = [int(order[k % len(items)]) for k in range(int(num_patches))]
    return [builder[(number, sequence[start:start + batch_size])]
            for number, start in enumerate(range(0, len(sequence), batch_size))]
