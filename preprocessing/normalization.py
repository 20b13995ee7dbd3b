"""Per-channel intensity normalisation: nnU-Net's schemes, restricted to a modality's field of view.

nnU-Net computes a channel's statistics over the whole image (or the nonzero region with
``use_mask_for_norm``). After alignment a modality may cover only part of the reference
space; the zeros outside its field of view are not data and must not enter its mean, std,
min or max. Inside the field of view cmcseg applies nnU-Net's own normalisation class
unchanged; outside it sets 0, so that "no data" reads as the normalised mean.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.preprocessing.normalization import default_normalization_schemes
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization

from cmcseg.preprocessing.nnunet_members import find_nnunet_member


def normalization_class(name: str) -> type[ImageNormalization]:
    """nnU-Net's normalisation class called ``name`` (ZScoreNormalization, CTNormalization, ...)."""
    cls = find_nnunet_member(default_normalization_schemes, "normalization", name)
    if cls is None:
        raise ValueError(f"unknown normalisation scheme {name!r}: not found in nnunetv2.preprocessing.normalization")
    return cls


def normalize_channel(
    image: np.ndarray,
    scheme: str,
    intensity_properties: dict | None,
    use_mask_for_norm: bool,
    fov: np.ndarray | None,
    nonzero_seg: np.ndarray | None,
) -> np.ndarray:
    """Normalise one channel (z, y, x) float32 in place where possible and return it.

    ``fov`` (bool/uint8, same shape, or None for "everywhere") restricts the statistics and
    the normalisation to the modality's field of view; voxels outside become 0.
    ``nonzero_seg`` is nnU-Net's seg after cropping (-1 outside the nonzero region), used
    when ``use_mask_for_norm`` is set.
    """
    cls = normalization_class(scheme)
    props = intensity_properties or {}
    if fov is None or bool(fov.all()):  # exactly nnU-Net's path
        norm = cls(use_mask_for_norm=bool(use_mask_for_norm), intensityproperties=props)
        return norm.run(image, nonzero_seg if use_mask_for_norm else None)
    inside = fov.astype(bool, copy=False)
    if use_mask_for_norm and nonzero_seg is not None:
        inside = inside & (nonzero_seg >= 0)
    if not inside.any():
        image[...] = 0
        return image
    # Schemes are voxel-wise maps with global statistics, so running them on the inside voxels
    # alone gives the statistics of the field of view only.
    norm = cls(use_mask_for_norm=False, intensityproperties=props)
    values = norm.run(image[inside].astype(np.float32, copy=False), None)
    image[inside] = values
    del values
    image[~inside] = 0
    return image
