"""The shared sliding window (:mod:`cmcseg.sliding_window`) on predictors whose answer is known.

A pointwise predictor (a 1x1 convolution and a softmax) gives the same value at a voxel whatever window
it sees, so any correct Gaussian blend of windows must reproduce it applied to the whole case exactly; a
wrong weight sum, a window missed or shifted, or padding left in the output would not.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

from cmcseg.errors import CmcsegError
from cmcseg.sliding_window import CPU_PASS_VOXELS, auto_window_batch, predict_case, sliding_window, window_slices


def pointwise(in_channels: int, classes: int = 3, seed: int = 0):
    weight = torch.randn(classes, in_channels, generator=torch.Generator().manual_seed(seed))
    calls: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.softmax(torch.einsum("kc,bc...->bk...", weight, x), dim=1)

    return predict, calls


@pytest.mark.parametrize("shape,patch", [((9, 23, 17), (4, 8, 8)), ((3, 5, 6), (4, 8, 8)), ((4, 8, 8), (4, 8, 8))])
def test_a_pointwise_predictor_is_reproduced_exactly_in_3d(shape, patch):
    data = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    fov = np.ones((1, *shape), np.float32)
    predict, calls = pointwise(3)
    got = predict_case(predict, data, fov, patch, torch.device("cpu"), step=0.5, batch_size=3)
    whole = predict(torch.from_numpy(np.concatenate([data, fov]))[None])[0]
    assert got.shape == (3, *shape)  # padding (a case smaller than the patch) is cropped away again
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    padded = [max(s, p) for s, p in zip(shape, patch)]
    windows = int(np.prod([len(s) for s in compute_steps_for_sliding_window(padded, patch, 0.5)]))
    assert sum(calls[:-1]) == windows and max(calls[:-1]) <= 3  # every window once, at most batch_size at a time


def test_two_dimensional_patches_predict_slice_by_slice_and_batch_sizes_agree():
    data = np.random.default_rng(1).normal(size=(1, 5, 20, 13)).astype(np.float32)
    fov = (np.random.default_rng(2).random((1, 5, 20, 13)) > 0.3).astype(np.float32)
    predict, _ = pointwise(2, seed=3)
    one = predict_case(predict, data, fov, (8, 8), torch.device("cpu"), step=0.5, batch_size=1)
    many = predict_case(predict, data, fov, (8, 8), torch.device("cpu"), step=0.5, batch_size=7)
    whole = predict(torch.from_numpy(np.concatenate([data, fov]))[None])[0]
    torch.testing.assert_close(one, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many, one, atol=1e-6, rtol=1e-6)


def test_overlapping_windows_are_blended_by_the_gaussian():
    """A predictor that answers 1 at the first window and 0 elsewhere: the blend is 1 where only the first
    window reaches, 0 where it does not, and strictly between where the windows overlap."""
    images = torch.zeros((1, 1, 16))

    def first_window_only(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 1, *x.shape[2:]))
        out[0] = 1.0  # batch_size 1: the first call is the first window
        first_window_only.calls += 1
        return out if first_window_only.calls == 1 else torch.zeros_like(out)

    first_window_only.calls = 0
    # patch 8, step 0.5 on 16 voxels: windows at 0, 4, 8
    assert [w[0].start for w in window_slices([16], [8], 0.5)] == [0, 4, 8]
    got = sliding_window(first_window_only, images, [8], torch.device("cpu"), 0.5, 1)[0, 0]
    assert torch.allclose(got[:4], torch.ones(4)) and torch.allclose(got[8:], torch.zeros(8))
    assert bool(((got[4:8] > 0) & (got[4:8] < 1)).all())


def test_a_step_outside_0_1_is_a_clear_error():
    with pytest.raises(CmcsegError, match="--step 0"):
        window_slices([8], [4], 0.0)


def test_prediction_imports_neither_training_nor_monai():
    """``cmcseg predict`` starts fast: its modules load without the trainer (nnU-Net's trainer, seaborn,
    torch._dynamo) and without MONAI (which loads all of its modules, transformers included)."""
    code = ("import sys, cmcseg.prediction.predictor, cmcseg.prediction.model; "
            "print(sorted({m.split('.')[0] if m.split('.')[0] != 'cmcseg' else '.'.join(m.split('.')[:2]) "
            "for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "monai" not in loaded and "cmcseg.training" not in loaded and "seaborn" not in loaded, loaded


def test_without_a_batch_size_a_cpu_batches_small_windows_up_to_its_voxel_budget():
    cpu = torch.device("cpu")
    assert auto_window_batch([3, 160, 192], cpu) == 5  # myops_dev's ResEnc-M 3d_fullres windows: 92k voxels each
    assert auto_window_batch([3, 160, 192], cpu, copies=8) == 1  # each window's 7 mirrored copies batched with it
    assert auto_window_batch([4, 256, 256], cpu) == 2
    assert auto_window_batch([8, 512, 512], cpu) == 1  # a window above the budget still goes through, alone
    assert auto_window_batch([320, 320], cpu, copies=4) == 1
    assert auto_window_batch([3, 160, 192], torch.device("cuda")) == 1  # a GPU keeps nnU-Net's one window per pass
    # the default then sends those windows through together, and the blend is the same
    data = np.random.default_rng(4).normal(size=(2, 6, 40, 36)).astype(np.float32)
    fov = np.ones((1, 6, 40, 36), np.float32)
    patch = (2, 16, 16)
    predict, calls = pointwise(3, seed=5)
    auto = predict_case(predict, data, fov, patch, torch.device("cpu"), step=0.5)
    expected = min(CPU_PASS_VOXELS // int(np.prod(patch)), sum(calls))
    assert calls[0] == expected > 1
    one = predict_case(predict, data, fov, patch, torch.device("cpu"), step=0.5, batch_size=1)
    torch.testing.assert_close(auto, one, atol=1e-6, rtol=1e-6)
