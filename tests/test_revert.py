"""Reverting predictions by nnU-Net's export function gives what cmcseg's hand-written revert gave."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.utils import recursive_find_resampling_fn_by_name

from cmcseg.errors import CmcsegError
from cmcseg.prediction.revert import label_dtype, revert_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"spacing": [1.2, 1.5, 1.0], "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
          "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}


def old_revert_case(probabilities: np.ndarray, properties: Mapping, config: Mapping,
                    with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference: cmcseg's hand-written revert before it called nnU-Net (resample, argmax, uncrop, transpose)."""
    target = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    cropped = np.asarray(probabilities, dtype=np.float32)
    if list(cropped.shape[1:]) != target:
        fn = recursive_find_resampling_fn_by_name(config["resampling_fn_probabilities"])
        kwargs = dict(config.get("resampling_fn_probabilities_kwargs", {}))
        current, new = properties["spacing_after_resampling"], properties["spacing_before_resampling"]
        out = np.empty((cropped.shape[0], *target), dtype=np.float32)
        for k in range(cropped.shape[0]):
            out[k] = fn(cropped[k:k + 1], target, current, new, **kwargs)[0]
        cropped = out
    box = tuple(slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])
    backward = [int(a) for a in properties["transpose_backward"]]
    shape = [int(s) for s in properties["shape_before_cropping"]]
    labels = np.zeros(shape, dtype=label_dtype(cropped.shape[0] - 1))
    labels[box] = cropped.argmax(0)
    labels = np.ascontiguousarray(labels.transpose(backward))
    if not with_probabilities:
        return labels, None
    full = np.zeros((cropped.shape[0], *shape), np.float32)
    full[0] = 1.0
    full[(slice(None), *box)] = cropped
    return labels, np.ascontiguousarray(full.transpose([0, *(a + 1 for a in backward)]))


def phantom_case(num_classes: int, original_zyx: tuple[int, int, int], forward: list[int], bbox: list[list[int]],
                 spacing_zyx: list[float], target: list[float], seed: int = 0) -> tuple[np.ndarray, dict]:
    """Probabilities on a preprocessed grid (smooth blobs, softmaxed) and the properties the preprocessor records."""
    spacing = [spacing_zyx[a] for a in forward]
    cropped = [b - a for a, b in bbox]
    new_shape = [int(round(c * s / t)) for c, s, t in zip(cropped, spacing, target)]
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in new_shape], indexing="ij"))
    centres = rng.uniform(0, 1, size=(num_classes, 3, 1, 1, 1))
    logits = -8 * ((grid[None] - centres) ** 2).sum(1) + 0.3 * rng.normal(size=(num_classes, *new_shape))
    probabilities = torch.softmax(torch.from_numpy(logits), 0).numpy().astype(np.float32)
    properties = {
        "case_id": "phantom", "spacing": spacing_zyx, "transpose_forward": forward,
        "transpose_backward": [int(a) for a in np.argsort(forward)],
        "shape_before_cropping": [original_zyx[a] for a in forward], "bbox_used_for_cropping": bbox,
        "shape_after_cropping_and_before_resampling": cropped, "spacing_before_resampling": spacing,
        "spacing_after_resampling": target, "shape_after_resampling": new_shape,
    }
    return probabilities, properties


CASES = {
    # transposed (z last), cropped on every axis, resampled; the new spacing is anisotropic (separate-z path)
    "3d_anisotropic": (4, (9, 11, 14), [2, 0, 1], [[2, 12], [1, 8], [0, 11]], [3.0, 0.8, 0.9], [1.2, 1.5, 1.0]),
    # isotropic-ish spacings: plain 3D interpolation
    "3d_isotropic": (3, (10, 12, 9), [1, 2, 0], [[1, 11], [0, 9], [2, 9]], [1.1, 0.9, 1.0], [0.7, 1.3, 0.8]),
    # the shapes already match (the spacing does not change): no resampling
    "shapes_match": (3, (6, 10, 8), [0, 2, 1], [[1, 5], [2, 7], [0, 10]], [2.0, 1.0, 1.0], [2.0, 1.0, 1.0]),
}


@pytest.mark.parametrize("with_probabilities", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_revert_equals_the_hand_written_revert(name, with_probabilities):
    probabilities, properties = phantom_case(*CASES[name])
    if name == "shapes_match":
        assert list(probabilities.shape[1:]) == properties["shape_after_cropping_and_before_resampling"]
    expected_labels, expected_full = old_revert_case(probabilities, properties, CONFIG, with_probabilities)
    before = probabilities.copy()
    labels, full = revert_case(probabilities, properties, CONFIG, with_probabilities)
    np.testing.assert_array_equal(probabilities, before)  # the input is not modified
    assert isinstance(labels, np.ndarray) and labels.dtype == expected_labels.dtype == np.uint8
    assert labels.flags.c_contiguous and labels.shape == CASES[name][1]
    np.testing.assert_array_equal(labels, expected_labels)
    assert len(np.unique(labels)) > 1  # a real segmentation, not background only
    if not with_probabilities:
        assert full is None
        return
    assert isinstance(full, np.ndarray) and expected_full is not None
    assert full.dtype == np.float32 and full.flags.c_contiguous
    np.testing.assert_array_equal(full, expected_full)
    assert torch.get_num_threads() == 1  # nnU-Net's function sets the thread count; it is left as it was


def test_the_configuration_spacing_is_not_read():
    """The recorded spacings decide the resampling, as before: a 2d configuration's spacing changes nothing."""
    probabilities, properties = phantom_case(*CASES["3d_anisotropic"])
    expected, _ = revert_case(probabilities, properties, CONFIG)
    labels, _ = revert_case(probabilities, properties, {**CONFIG, "spacing": [0.3, 0.4]})
    np.testing.assert_array_equal(labels, expected)


def test_plans_labels_are_checked_against_the_channels():
    probabilities, properties = phantom_case(*CASES["3d_isotropic"])
    expected, _ = revert_case(probabilities, properties, CONFIG)
    scene = {"asphalt": 0, "car": 1, "person": 2, "ignore": 3}  # class 0 not named background; ignore not predicted
    np.testing.assert_array_equal(revert_case(probabilities, properties, CONFIG, labels=scene)[0], expected)
    with pytest.raises(CmcsegError, match="3 probability channels for 2 classes"):
        revert_case(probabilities, properties, CONFIG, labels={"background": 0, "heart": 1})


def test_many_classes_keep_the_label_dtype():
    """255 foreground classes still fit uint8 (nnU-Net would give uint16); 300 classes give uint16."""
    for num_classes, dtype in ((256, np.uint8), (301, np.uint16)):
        probabilities, properties = phantom_case(num_classes, (3, 4, 5), [0, 1, 2], [[0, 3], [1, 4], [0, 5]],
                                                 [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
        expected, _ = old_revert_case(probabilities, properties, CONFIG, False)
        labels, _ = revert_case(probabilities, properties, CONFIG)
        assert labels.dtype == expected.dtype == dtype
        np.testing.assert_array_equal(labels, expected)
