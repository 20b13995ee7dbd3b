"""Class probabilities of one preprocessed case: Gaussian sliding window, mirroring TTA, fold ensembling.

* **Sliding window**: MONAI's ``sliding_window_inference`` with ``mode="gaussian"`` (nnU-Net's
  importance weighting, sigma = 1/8 of the patch) through
  :func:`cmcseg.training.validation.predict_case`, the function the trainer's final validation
  uses, so a case is predicted exactly as it was validated. nnU-Net's ``tile_step_size`` is
  ``step``; MONAI's overlap is ``1 - step``. A 2D patch predicts slice by slice.
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
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cmcseg.errors import CmcsegError
from cmcseg.training.validation import predict_case

#: probabilities ``(B, K, *spatial)`` from an input ``(B, C + M, *spatial)``
Predict = Callable[[Tensor], Tensor]


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


def sliding_window_probabilities(predict: Predict, data: np.ndarray, fov: np.ndarray, patch_size: Sequence[int],
                                 device: torch.device, step: float = 0.5, sw_batch_size: int = 1) -> Tensor:
    """Probabilities ``(K, *spatial)`` (float32, CPU) of one preprocessed case (data ``(C, *)``, fov ``(M, *)``)."""
    overlap = 1.0 - check_step(step)
    with torch.inference_mode():
        return predict_case(predict, data, fov, patch_size, device, overlap=overlap, sw_batch_size=sw_batch_size)
