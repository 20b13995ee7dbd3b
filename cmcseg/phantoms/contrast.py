"""Turning tissue maps into scanner-like intensities: contrast tables, bias fields, noise.

MR: tissue contrast times a smooth multiplicative coil bias field, then Rician magnitude
noise (the magnitude of a complex signal with Gaussian noise in both parts). CT: Hounsfield
units plus Gaussian noise, no bias.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from cmcseg.phantoms.geometry import Grid


def tissue_table(tissues: type[IntEnum], default: float = 0.0, **values: float) -> np.ndarray:
    """Intensity per tissue code, from keyword arguments named after the tissues (case-insensitive)."""
    table = np.full(len(tissues), default, dtype=np.float64)
    for tissue_name, value in values.items():
        table[tissues[tissue_name.upper()]] = value
    return table


def smooth_field(points: np.ndarray, rng: np.random.Generator, strength: float, scale_mm: float) -> np.ndarray:
    """A smooth positive multiplicative field ``exp(quadratic polynomial)`` of world coordinates.

    An MR coil bias field: ``strength`` is roughly its log-amplitude over ``scale_mm``. The
    coefficients come from ``rng`` once per call, so call it once per image.
    """
    centre = rng.uniform(-0.5, 0.5, size=points.shape[-1]) * scale_mm
    p = (points - centre) / scale_mm
    linear = rng.normal(0.0, strength, size=points.shape[-1])
    quadratic = rng.normal(0.0, strength / 2, size=points.shape[-1])
    return np.exp(p @ linear + (p**2) @ quadratic)


def mr_magnitude(clean: np.ndarray, grid: Grid, rng: np.random.Generator, noise_sigma: float,
                 bias_strength: float, bias_scale_mm: float = 200.0) -> np.ndarray:
    """MR magnitude image: ``|clean * bias + complex Gaussian noise|`` (Rician, never negative)."""
    bias = smooth_field(grid.world_points(), rng, bias_strength, bias_scale_mm)
    real = clean * bias + rng.normal(0.0, noise_sigma, clean.shape)
    imaginary = rng.normal(0.0, noise_sigma, clean.shape)
    return np.sqrt(real**2 + imaginary**2)


def ct_hounsfield(clean: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """CT image in HU: the clean HU map plus Gaussian noise, clipped to the scanner range."""
    noisy = clean + rng.normal(0.0, noise_hu, clean.shape)
    return np.clip(noisy, -1024.0, 3071.0)
