"""Class probabilities of one preprocessed case: Gaussian sliding window, mirroring TTA, fold ensembling.

The inference primitives that the trainer's final validation and the predictor (``cmcseg predict``)
share, so a case is predicted exactly as it was validated. They sit below both stages: neither
imports the other for them.

* **Sliding window**: nnU-Net's own pieces, as its predictor uses them: ``compute_steps_for_sliding_window``
  (windows evenly spread, ``step`` = nnU-Net's ``tile_step_size``), ``compute_gaussian`` (importance
  weighting, sigma = 1/8 of the patch) and ``pad_nd_image`` (a case smaller than the patch is padded
  around its centre). Windows go through the network ``batch_size`` at a time and are blended on the
  CPU in float32. Without a ``batch_size``, a CPU takes as many windows per pass as keep it near
  :data:`CPU_PASS_VOXELS` (:func:`auto_window_batch`); a GPU takes one, as nnU-Net. A 2D patch
  predicts slice by slice, and the slices share the window batches. This
  replaced MONAI's ``sliding_window_inference``: MONAI loads every one of its modules (transformers
  included) on first import, which was most of a ``cmcseg predict`` run on a small case
  (``benchmarks/real_size_cost.py``).
* **Mirroring TTA** (nnU-Net's ``_internal_maybe_mirror_and_predict``): the prediction is the
  mean over the identity and every non-empty subset of the mirror axes (8 passes for 3 axes),
  each flipped back. Here the flipped copies of a window go through the network as one batch.
* **Fold ensembling**: the mean of the folds' probabilities, window by window. The Gaussian
  blend is linear, so this equals averaging whole-case predictions (nnU-Net's order) with one
  accumulator instead of one per fold.

Probabilities are averaged (not logits): a CMC network's output already is a FOV-weighted mean
of its heads' probabilities.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from torch import Tensor

from cmcseg.errors import CmcsegError

#: probabilities ``(B, K, *spatial)`` from an input ``(B, C + M, *spatial)``
Predict = Callable[[Tensor], Tensor]

#: nnU-Net's Gaussian: sigma is this fraction of the patch size along each axis
GAUSSIAN_SIGMA_SCALE = 1.0 / 8

#: voxels per forward pass that :func:`auto_window_batch` aims at on a CPU (one thread; myops_dev, no TTA): the
#: ResEnc-M 3d_fullres plan's [3, 160, 192] windows (92k voxels) took 73 s one per pass, 31-32 s four or eight per
#: pass; the PlainConvUNet plan's [4, 256, 256] (262k) 15.4 s one per pass, 14.1 s four per pass (+1 GB)
CPU_PASS_VOXELS = 2 ** 19


def auto_window_batch(patch_size: Sequence[int], device: torch.device, copies: int = 1) -> int:
    """Windows per forward pass when none is asked for: on a CPU as many as keep a pass of windows x ``copies``
    (e.g. each window's mirrored copies, batched with it) within :data:`CPU_PASS_VOXELS` voxels, at least one.
    Small windows one at a time leave a CPU's convolutions mostly idle. On a GPU: one, as nnU-Net (not measured
    here)."""
    if device.type != "cpu":
        return 1
    return max(1, CPU_PASS_VOXELS // (math.prod(int(p) for p in patch_size) * max(1, int(copies))))


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's mirroring: every non-empty subset of the spatial ``mirror_axes``, as tensor dims (axis + 2)."""
    dims = [int(a) + 2 for a in mirror_axes]
    return [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def with_mirroring(predict: Predict, mirror_axes: Sequence[int], batched: bool = True) -> Predict:
    """``predict`` averaged over the identity and every mirroring of ``mirror_axes`` (each flipped back).

    ``batched`` runs the flipped copies as one batch (fewer, larger forward passes); else one
    pass per mirroring, as nnU-Net does. Both give the same mean.
    """
    combos = mirror_combinations(mirror_axes)
    if not combos:
        return predict

    def mirrored(x: Tensor) -> Tensor:
        n = x.shape[0]
        if batched:
            out = predict(torch.cat([x, *(torch.flip(x, c) for c in combos)]))
            total = out[:n].clone()
            for i, c in enumerate(combos, start=1):
                total += torch.flip(out[i * n:(i + 1) * n], c)
        else:
            total = predict(x).clone()
            for c in combos:
                total += torch.flip(predict(torch.flip(x, c)), c)
        return total / (len(combos) + 1)

    return mirrored


def fold_ensemble(predictors: Sequence[Predict]) -> Predict:
    """The mean of several predictors' probabilities (one per fold)."""
    if not predictors:
        raise CmcsegError("no fold to predict with. Fix: pass -f with folds that have a checkpoint.")
    if len(predictors) == 1:
        return predictors[0]

    def ensemble(x: Tensor) -> Tensor:
        total = predictors[0](x).clone()
        for predict in predictors[1:]:
            total += predict(x)
        return total / len(predictors)

    return ensemble


def check_step(step: float) -> float:
    """nnU-Net's tile step size as a fraction of the patch, in (0, 1]."""
    if not 0 < step <= 1:
        raise CmcsegError(f"--step {step} is not in (0, 1]. Fix: pass e.g. --step 0.5 (nnU-Net's default; windows "
                          "overlap by half a patch) or 1 (no overlap, fastest).")
    return float(step)


def window_slices(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple[slice, ...]]:
    """The windows nnU-Net's predictor visits in an image of ``image_size`` (at least ``patch_size``)."""
    steps = compute_steps_for_sliding_window(tuple(int(s) for s in image_size), tuple(int(p) for p in patch_size),
                                             check_step(step))
    return [tuple(slice(s, s + int(p)) for s, p in zip(corner, patch_size)) for corner in itertools.product(*steps)]


def sliding_window(predict: Predict, images: Tensor, patch_size: Sequence[int], device: torch.device,
                   step: float = 0.5, batch_size: int | None = None) -> Tensor:
    """Probabilities ``(N, K, *spatial)`` (float32, CPU) of ``N`` images ``(N, C, *spatial)``.

    Every window of every image is predicted once (``batch_size`` windows per call of ``predict``,
    on ``device``; None: :func:`auto_window_batch`), weighted by nnU-Net's Gaussian, and the sum is divided by the
    summed weights.
    """
    patch = [int(p) for p in patch_size]
    if batch_size is None:
        batch_size = auto_window_batch(patch, device)
    if images.ndim != len(patch) + 2:
        raise ValueError(f"images of shape {tuple(images.shape)} do not match a {len(patch)}D patch {patch}")
    padded, slicer = pad_nd_image(images, patch, "constant", {"value": 0}, True)
    spatial = tuple(padded.shape[2:])
    windows = window_slices(spatial, patch, step)
    gaussian = compute_gaussian(tuple(patch), GAUSSIAN_SIGMA_SCALE, 1.0, torch.float32, torch.device("cpu"))
    weight = torch.zeros(spatial, dtype=torch.float32)
    for window in windows:
        weight[window] += gaussian
    jobs = [(n, window) for n in range(padded.shape[0]) for window in windows]
    total: Tensor | None = None
    for start in range(0, len(jobs), max(1, int(batch_size))):
        chunk = jobs[start:start + max(1, int(batch_size))]
        batch = torch.stack([padded[n][(slice(None), *window)] for n, window in chunk]).to(device)
        out = predict(batch).float().cpu()
        if total is None:
            total = torch.zeros((padded.shape[0], out.shape[1], *spatial), dtype=torch.float32)
        for (n, window), probabilities in zip(chunk, out):
            total[n][(slice(None), *window)] += probabilities * gaussian
    assert total is not None  # at least one window
    total /= weight
    return total[(slice(None), slice(None), *slicer[2:])]


def predict_case(predict: Predict, data: np.ndarray, fov: np.ndarray, patch_size: Sequence[int],
                 device: torch.device, step: float = 0.5, batch_size: int | None = None) -> Tensor:
    """Class probabilities ``(K, z, y, x)`` (float32, CPU) of one preprocessed case by Gaussian sliding window.

    The network input is the modality channels followed by the FOV masks, as in training. A 2D
    patch size predicts slice by slice (the slices are the images of :func:`sliding_window`).
    """
    inputs = torch.from_numpy(np.concatenate([np.asarray(data, dtype=np.float32),
                                              np.asarray(fov, dtype=np.float32)]))
    with torch.inference_mode():
        if len(patch_size) == 2:
            return sliding_window(predict, inputs.permute(1, 0, 2, 3), patch_size, device, step,
                                  batch_size).permute(1, 0, 2, 3)
        return sliding_window(predict, inputs[None], patch_size, device, step, batch_size)[0]
