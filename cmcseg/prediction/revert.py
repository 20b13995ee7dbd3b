"""Back from the preprocessed grid to the reference modality's original grid, and writing the result.

The preprocessor recorded in each case's properties what it did (nnU-Net's names): transpose
(``transpose_forward``), crop to the nonzero box (``bbox_used_for_cropping``,
``shape_before_cropping``) and resample (``spacing_before_resampling`` ->
``spacing_after_resampling``, ``shape_after_cropping_and_before_resampling``). Reverting undoes
them in reverse order. Steps 1-3 are nnU-Net's own
``convert_predicted_logits_to_segmentation_with_correct_shape``, fed the recorded geometry
(:func:`_nnunet_properties`) and, as our predictor hands over probabilities, not logits, a
``LabelManager`` whose inference nonlinearity is the identity:

1. resample the probabilities to the cropped shape with the plan's ``resampling_fn_probabilities``
   and its kwargs, one class at a time into float32 (:class:`_RevertConfiguration`);
2. argmax, then put the labels into the full (transposed) array: background outside the box;
   probabilities get background 1 there;
3. transpose back, which gives the reference modality's own 3D grid;
4. write with the reference image's exact header (size, spacing, origin, direction): a NIfTI
   reference's header is copied as stored, other formats get the recorded geometry through
   SimpleITK; a 2D reference (``dimension`` 2) is written as a 2D image again.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from cmcseg.dataset import nnunet_label_dict
from cmcseg.errors import CmcsegError
from cmcseg.image_io import atomic_path, write_image


def _resample_each_class(fn: Callable[..., np.ndarray], probabilities: np.ndarray, new_shape: Sequence[int],
                         current_spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """``(K, *)`` probabilities resampled to ``new_shape``, float32; unchanged where the shape already fits.

    One class at a time: nnU-Net's resampling copies its input to float64, all classes at once otherwise.
    """
    if list(probabilities.shape[1:]) == [int(s) for s in new_shape]:
        return probabilities
    out = np.empty((probabilities.shape[0], *new_shape), dtype=np.float32)
    for k in range(probabilities.shape[0]):
        out[k] = fn(probabilities[k:k + 1], new_shape, current_spacing, new_spacing)[0]
    return out


class _RevertConfiguration(ConfigurationManager):
    """nnU-Net's configuration, resampling probabilities one class at a time into float32 (less memory)."""

    @property
    def resampling_fn_probabilities(self) -> Callable[..., np.ndarray]:
        fn = ConfigurationManager.resampling_fn_probabilities.fget(self)  # nnU-Net's, with the plan's arguments
        return partial(_resample_each_class, fn)


def _revert_configuration(properties: Mapping, config: Mapping) -> ConfigurationManager:
    """The configuration with the case's recorded target spacing: the spacing the probabilities are on."""
    return _RevertConfiguration({
        **config,
        "spacing": [float(s) for s in properties["spacing_after_resampling"]],
        "resampling_fn_probabilities_kwargs": dict(config.get("resampling_fn_probabilities_kwargs", {})),
        # nnU-Net rebuilds a configuration without it from its old plans format; reverting never reads it
        "architecture": config.get("architecture", {}),
    })


def _revert_plans(properties: Mapping) -> PlansManager:
    """The transposes the case was preprocessed with (recorded per case: old cases keep theirs)."""
    backward = [int(a) for a in properties["transpose_backward"]]
    return PlansManager({"transpose_forward": [int(a) for a in np.argsort(backward)], "transpose_backward": backward})


def _nnunet_properties(properties: Mapping) -> dict:
    """Our properties under nnU-Net's keys: ``spacing`` is the original (untransposed) spacing.

    nnU-Net transposes ``spacing`` forward to get the spacing before resampling; ours records that
    transposed spacing (``spacing_before_resampling``), so it is transposed back here.
    """
    before = [float(s) for s in properties["spacing_before_resampling"]]
    return {"spacing": [before[int(a)] for a in properties["transpose_backward"]],
            "shape_after_cropping_and_before_resampling":
                [int(s) for s in properties["shape_after_cropping_and_before_resampling"]],
            "bbox_used_for_cropping": [[int(a), int(b)] for a, b in properties["bbox_used_for_cropping"]],
            "shape_before_cropping": [int(s) for s in properties["shape_before_cropping"]]}


def _unchanged(probabilities: torch.Tensor) -> torch.Tensor:
    """The inference nonlinearity for input that already is probabilities (softmaxed and fused)."""
    return probabilities


def _probability_label_manager(labels: Mapping[str, Any] | None, num_classes: int) -> LabelManager:
    """nnU-Net's label manager for ``num_classes`` probability channels, identity nonlinearity.

    ``labels``: the plans' labels; None gives consecutive labels 0..K-1 (what a label-based plan predicts).
    """
    label_dict = nnunet_label_dict(labels) if labels is not None else \
        {"background": 0, **{str(k): k for k in range(1, num_classes)}}
    manager = LabelManager(label_dict, None, inference_nonlin=_unchanged)
    if manager.has_regions:
        raise CmcsegError("region-based labels are not supported when reverting predictions.")
    if manager.num_segmentation_heads != num_classes:
        raise CmcsegError(f"{num_classes} probability channels for {manager.num_segmentation_heads} classes in the "
                          "plans' labels.")
    return manager


def label_dtype(max_value: int) -> type:
    """The smallest unsigned type that holds ``max_value`` (uint8 for consecutive labels, uint16 for 600)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise CmcsegError(f"label value {max_value} does not fit a 32-bit label image.")


def original_value_table(labels: Mapping[str, int], original: Mapping[str, int]) -> np.ndarray:
    """Lookup table consecutive label -> the release's original value (identity where none is recorded)."""
    table = np.arange(max(labels.values()) + 1, dtype=np.int64)
    for name, value in labels.items():
        table[int(value)] = int(original.get(name, value))
    return table


def reference_geometry(properties: Mapping) -> dict:
    """The reference image's own header geometry (2D stays 2D) as the preprocessor recorded it."""
    geometry = properties.get("reference_geometry")
    if not geometry:
        raise CmcsegError(f"case {properties.get('case_id')}: the preprocessed properties hold no reference_geometry. "
                          "Fix: preprocess the case with this version of cmcseg.")
    return dict(geometry)


def spatial_array_for(array: np.ndarray, geometry: Mapping, leading: int = 0) -> np.ndarray:
    """A reverted ``(..., z, y, x)`` array shaped as the reference image (``(..., y, x)`` for a 2D reference)."""
    size = [int(s) for s in geometry["size"]]
    spatial = array.shape[leading:]
    if int(geometry.get("dimension", len(size))) == 2:
        if spatial[0] != 1 or list(spatial[1:]) != size[::-1]:
            raise CmcsegError(f"reverted array {spatial} does not match the 2D reference size {size}.")
        return array[(slice(None),) * leading + (0,)]
    if list(spatial) != size[::-1]:
        raise CmcsegError(f"reverted array {spatial} does not match the reference size {size} (x, y, z).")
    return array


def image_on_reference(array: np.ndarray, geometry: Mapping) -> sitk.Image:
    """An image of ``array`` (numpy order) with the reference header's size, spacing, origin and direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in geometry["spacing"]])
    image.SetOrigin([float(o) for o in geometry["origin"]])
    image.SetDirection([float(d) for d in geometry["direction"]])
    return image


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def write_nifti_like(array_zyx: np.ndarray, reference_file: Path, path: Path) -> bool:
    """Write ``array_zyx`` with the reference NIfTI's own header (qform, sform, pixdim as stored); True if done.

    Decoding a NIfTI header gives float32-rounded geometry; SimpleITK would encode it again and
    the re-read direction could move in the 8th digit. Copying the header keeps the geometry
    bit-identical to the reference's. Only for a scalar 3D NIfTI reference; else False.
    """
    import nibabel as nib

    reference = cast("nib.Nifti1Image", nib.load(str(reference_file)))  # a .nii(.gz) file: a NIfTI image
    if len(reference.shape) != 3 or tuple(reference.shape) != array_zyx.shape[::-1]:
        return False
    header = reference.header.copy()
    header.set_data_dtype(array_zyx.dtype)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0.0, float(array_zyx.max(initial=0))
    header["intent_code"] = 0
    image = type(reference)(np.ascontiguousarray(array_zyx.transpose()), None, header)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return True


def write_segmentation(labels_zyx: np.ndarray, properties: Mapping, path: Path,
                       value_table: np.ndarray | None = None, reference_file: Path | None = None) -> None:
    """Write a label map on the reference grid (atomically); ``value_table`` maps labels to other values.

    With the reference image file given, a NIfTI output of a NIfTI reference copies its header
    (:func:`write_nifti_like`); other formats go through SimpleITK with the recorded geometry.
    """
    if value_table is not None:
        labels_zyx = value_table[labels_zyx]
    labels_zyx = labels_zyx.astype(label_dtype(int(labels_zyx.max(initial=0))), copy=False)
    geometry = reference_geometry(properties)
    array = spatial_array_for(labels_zyx, geometry)
    if reference_file is not None and _is_nifti(Path(reference_file)) and _is_nifti(path) and array.ndim == 3:
        if write_nifti_like(array, Path(reference_file), path):
            return
    write_image(image_on_reference(array, geometry), path)


def write_probabilities(probabilities_kzyx: np.ndarray, properties: Mapping, path: Path,
                        class_names: Sequence[str]) -> None:
    """Write ``.npz`` (atomically): ``probabilities`` ``(K, [z,] y, x)`` in the written image's numpy order,
    the class names, and the reference header (SimpleITK x, y, z order)."""
    geometry = reference_geometry(properties)
    array = spatial_array_for(probabilities_kzyx, geometry, leading=1)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=array.astype(np.float32, copy=False),
                                class_names=np.asarray(list(class_names)),
                                spacing=np.asarray(geometry["spacing"], float),
                                origin=np.asarray(geometry["origin"], float),
                                direction=np.asarray(geometry["direction"], float))


def revert_case(probabilities: np.ndarray, properties: Mapping, config: Mapping,
                with_probabilities: bool = False,
                labels: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed-grid probabilities -> (labels ``(z, y, x)``, probabilities ``(K, z, y, x)`` or None)
    on the reference modality's original 3D grid, by nnU-Net's export function.

    ``labels``: the plans' labels, checked against the channels (None: consecutive, one per channel).
    The torch thread count is left as it was (nnU-Net's function sets it).
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    num_classes = probabilities.shape[0]
    threads = torch.get_num_threads()
    try:
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            probabilities, _revert_plans(properties), _revert_configuration(properties, config),
            _probability_label_manager(labels, num_classes), _nnunet_properties(properties),
            return_probabilities=with_probabilities, num_threads_torch=threads)
    finally:
        torch.set_num_threads(threads)
    segmentation, full = result if with_probabilities else (result, None)
    segmentation = np.ascontiguousarray(np.asarray(segmentation).astype(label_dtype(num_classes - 1), copy=False))
    if full is not None:
        full = np.ascontiguousarray(np.asarray(full, dtype=np.float32))
    return segmentation, full
