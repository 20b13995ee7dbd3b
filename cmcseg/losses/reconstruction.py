"""Masked image modelling: the reconstruction loss of self-supervised pretraining (``cmcseg pretrain``).

    L = sum_{c, x} fov_c(x) |f(x~)_c(x) - x_c(x)| / sum_{c, x} fov_c(x)

with ``x~`` the corrupted input (holes dropped or filled with noise, blocks shuffled; see
:class:`cmcseg.training.augmentation.MaskedImageView`), ``x`` the original image channels and ``fov_c`` the field
of view of channel ``c``'s modality: outside it the image is empty, and there is nothing to learn. L1, as in the
inpainting term of SwinUNETR's and MONAI's self-supervised recipes.
"""
from __future__ import annotations

from torch import Tensor


def masked_reconstruction_loss(reconstruction: Tensor, target: Tensor, fov: Tensor) -> Tensor:
    """Mean absolute error of ``(B, C, *)`` ``reconstruction`` against ``target`` where ``fov`` (``(B, C, *)``, 0/1)
    is set; 0 (attached) where no voxel is in view."""
    weight = fov.to(reconstruction.dtype)
    return ((reconstruction - target).abs() * weight).sum() / weight.sum().clamp_min(1.0)
