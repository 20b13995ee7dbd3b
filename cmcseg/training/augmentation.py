"""Data augmentation: nnU-Net's transform pipelines, extended to carry the field-of-view (FOV) masks.

The transforms themselves are nnU-Net's (``nnUNetTrainer.get_training_transforms`` /
``get_validation_transforms``, batchgeneratorsv2), configured by nnU-Net's own rule
(``configure_rotation_dummyDA_mirroring_and_inital_patch_size``). What cmcseg adds is how the FOV
masks travel through them:

* the sample enters the pipeline as ``image`` = the C modality channels and ``segmentation`` =
  ``[label, fov_0, ..., fov_{M-1}]``. Segmentation channels undergo every spatial transform of
  the image (same grid, same mirroring; nearest-label interpolation keeps them binary) and no
  intensity transform, which is exactly what a FOV mask needs;
* after nnU-Net's pipeline, :class:`FOVToImageTransform` moves the FOV channels behind the image
  channels (as float 0/1) and zeroes each modality's channels outside its transformed FOV (the
  preprocessor's invariant, which intensity transforms such as noise would otherwise break);
* only then is the label downsampled for deep supervision.

The modalities of a paired case are channels of one array, so one spatial transform moves them
together, as nnU-Net does with multi-channel data.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

__all__ = [
    "FOVToImageTransform", "ShortAxisSafeGaussianBlur", "SpatialAugmentation", "StrongIntensityAugmentation",
    "configure_spatial_augmentation",
    "deep_supervision_scales",
    "training_transforms", "validation_transforms",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpatialAugmentation:
    """nnU-Net's spatial augmentation settings for a patch size.

    ``initial_patch_size`` is the larger patch cut from the case so that rotation and scaling
    do not bring padding into the final ``patch_size``; the spatial transform crops it back.
    """

    patch_size: tuple[int, ...]
    rotation: tuple[float, float]
    do_dummy_2d: bool
    initial_patch_size: tuple[int, ...]
    mirror_axes: tuple[int, ...]


def nnunet_trainer() -> type[Any]:
    """nnU-Net's ``nnUNetTrainer`` class, whose static methods hold the rules and transforms used here. Imported
    when first needed: its module loads seaborn and torch._dynamo (seconds), which ``cmcseg predict`` does not
    need when it resolves a trainer class."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer


def configure_spatial_augmentation(patch_size: Sequence[int]) -> SpatialAugmentation:
    """nnU-Net's ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` for ``patch_size`` (2D or 3D).

    The nnU-Net method reads only the patch size from its trainer, so it is called on a stand-in
    object: the rule stays nnU-Net's, including in later nnU-Net versions.
    """
    shim = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=[int(p) for p in patch_size]),
                           print_to_log_file=lambda *args, **kwargs: None)
    rotation, dummy_2d, initial, mirror_axes = \
        nnunet_trainer().configure_rotation_dummyDA_mirroring_and_inital_patch_size(shim)
    return SpatialAugmentation(tuple(int(p) for p in patch_size), (float(rotation[0]), float(rotation[1])),
                               bool(dummy_2d), tuple(int(p) for p in initial), tuple(int(a) for a in mirror_axes))


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Scale of each deep-supervision output relative to the patch, full resolution first.

    nnU-Net's rule (``_get_deep_supervision_scales``): ``1 / cumprod(strides)``, bottleneck dropped.
    """
    cumulative = np.cumprod(np.vstack([np.asarray(s, dtype=np.float64) for s in strides]), axis=0)[:-1]
    return [[float(v) for v in 1.0 / row] for row in cumulative]


class FOVToImageTransform(BasicTransform):
    """Move segmentation channels 1.. (the FOV masks) behind the image channels, as float 0/1.

    ``channel_modalities[c]`` is the FOV index (modality) of image channel ``c``; with
    ``zero_outside_fov`` each image channel is set to 0 outside its modality's FOV. Padding
    (-1) in a FOV channel counts as outside.
    """

    def __init__(self, channel_modalities: Sequence[int], zero_outside_fov: bool = True) -> None:
        super().__init__()
        self.channel_modalities = [int(m) for m in channel_modalities]
        self.zero_outside_fov = zero_outside_fov

    def apply(self, data_dict: dict, **params) -> dict:
        seg, image = data_dict["segmentation"], data_dict["image"]
        fov = (seg[1:] > 0).to(image.dtype)
        if self.zero_outside_fov:
            image = image * fov[self.channel_modalities]
        data_dict["image"] = torch.cat((image, fov), dim=0)
        data_dict["segmentation"] = seg[:1]
        return data_dict


class ShortAxisSafeGaussianBlur(GaussianBlurTransform):
    """nnU-Net's Gaussian blur, with each axis's sigma capped to what reflect padding allows on that axis.

    batchgeneratorsv2 pads by half its kernel (``nearest odd(6 sigma + 0.5)``) with reflection, which needs
    fewer padded voxels than the axis has. Thick-slice cardiac MRI plans patches of 2-3 slices, where a sigma
    of 0.7-1 would raise; the cap keeps the blur (weaker) instead. Axes long enough are blurred exactly as
    nnU-Net does.
    """

    def _benchmark_wrapper(self, img: torch.Tensor, sigma: float, dim_to_blur: int) -> torch.Tensor:
        size = int(img.shape[dim_to_blur + 1])
        if size < 2:
            return img
        return super()._benchmark_wrapper(img, min(float(sigma), (2 * size - 1) / 6.0), dim_to_blur)

    @classmethod
    def replacing(cls, blur: GaussianBlurTransform) -> ShortAxisSafeGaussianBlur:
        """The same transform (same settings) with the cap."""
        safe = cls.__new__(cls)
        safe.__dict__.update(blur.__dict__)
        return safe


def _safe_blur(steps: Sequence[BasicTransform]) -> list[BasicTransform]:
    """nnU-Net's steps with its Gaussian blur replaced by :class:`ShortAxisSafeGaussianBlur`."""
    for step in steps:
        inner = getattr(step, "transform", None)
        if isinstance(inner, GaussianBlurTransform) and not isinstance(inner, ShortAxisSafeGaussianBlur):
            step.transform = ShortAxisSafeGaussianBlur.replacing(inner)
    return list(steps)


def _fov_and_deep_supervision(channel_modalities: Sequence[int], ds_scales: Sequence[Sequence[float]] | None,
                              zero_outside_fov: bool) -> list[BasicTransform]:
    """The tail cmcseg appends to nnU-Net's pipelines: FOV masks to the image, then deep-supervision targets."""
    tail: list[BasicTransform] = [FOVToImageTransform(channel_modalities, zero_outside_fov)]
    if ds_scales is not None:
        tail.append(DownsampleSegForDSTransform(ds_scales=[list(s) for s in ds_scales]))
    return tail


def training_transforms(
    augmentation: SpatialAugmentation,
    ds_scales: Sequence[Sequence[float]] | None,
    channel_modalities: Sequence[int],
    use_mask_for_norm: Sequence[bool] | None = None,
    *,
    spatial_only: bool = False,
    zero_outside_fov: bool = True,
) -> ComposeTransforms:
    """nnU-Net's training pipeline for (image = modality channels, segmentation = [label, FOV masks]).

    Returns a transform whose output ``image`` has C + M channels and whose ``segmentation`` is
    the label (a list over ``ds_scales`` when given). ``spatial_only`` keeps only nnU-Net's
    spatial transforms (and the label/mask bookkeeping), e.g. to check that the modalities
    stay aligned.
    """
    nnunet = nnunet_trainer().get_training_transforms(
        list(augmentation.patch_size), augmentation.rotation, None, augmentation.mirror_axes,
        augmentation.do_dummy_2d, use_mask_for_norm=list(use_mask_for_norm) if use_mask_for_norm else None)
    steps = _safe_blur(nnunet.transforms)
    if spatial_only:  # nnU-Net wraps every intensity transform (and only those) in a RandomTransform
        steps = [t for t in steps if not isinstance(t, RandomTransform)]
    return ComposeTransforms(steps + _fov_and_deep_supervision(channel_modalities, ds_scales, zero_outside_fov))


def validation_transforms(ds_scales: Sequence[Sequence[float]] | None, channel_modalities: Sequence[int],
                          *, zero_outside_fov: bool = True) -> ComposeTransforms:
    """nnU-Net's validation pipeline (no augmentation) with the FOV masks moved to the image."""
    nnunet = nnunet_trainer().get_validation_transforms(None)
    return ComposeTransforms(list(nnunet.transforms)
                             + _fov_and_deep_supervision(channel_modalities, ds_scales, zero_outside_fov))


@dataclass(frozen=True)
class StrongIntensityAugmentation:
    """The student's strong view of a batch in the weak/strong pair of the semi-supervised objective.

    It works on the network input ``(B, C + M, *)`` (modality channels, then FOV masks) as the
    loader delivers it, on the training device, and changes intensities only, so the student and
    the teacher see the same spatial transform (a voxel-wise pseudo-label stays valid). Each
    modality of each row gets its own random perturbation, inside its field of view:
    contrast (scaling around the mean), brightness (shift), gamma (on the patch's min-max range,
    as nnU-Net's ``GammaTransform``), then Gaussian noise. With ``drop_modality`` a row loses one of
    its present modalities (image channels and FOV mask zeroed) with that probability, if it has
    at least two. The per-row tensor work replaces batchgenerators' per-sample numpy transforms,
    which would run on the CPU between the teacher's and the student's forward passes.
    """

    contrast: tuple[float, float] = (0.65, 1.5)
    brightness: float = 0.25
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.1
    drop_modality: float = 0.0

    def __call__(self, x: torch.Tensor, channel_modalities: Sequence[int], num_modalities: int) -> torch.Tensor:
        n_channels = len(channel_modalities)
        image, fov = x[:, :n_channels].float(), x[:, n_channels:n_channels + num_modalities].float()
        batch, shape = x.shape[0], (x.shape[0], num_modalities) + (1,) * (x.ndim - 2)
        index = torch.as_tensor(list(channel_modalities), device=x.device, dtype=torch.long)

        def per_modality(low: float, high: float) -> torch.Tensor:
            return torch.empty(shape, device=x.device).uniform_(low, high)[:, index]

        mask = fov[:, index]
        inside = mask.flatten(2).sum(2).clamp_min(1.0).reshape(batch, n_channels, *[1] * (x.ndim - 2))
        mean = (image * mask).flatten(2).sum(2).reshape(inside.shape) / inside
        out = (image - mean) * per_modality(*self.contrast) + mean
        out = out + per_modality(-self.brightness, self.brightness)
        low = torch.where(mask > 0, out, torch.full_like(out, float("inf"))).flatten(2).amin(2)
        high = torch.where(mask > 0, out, torch.full_like(out, float("-inf"))).flatten(2).amax(2)
        low = torch.where(torch.isfinite(low), low, torch.zeros_like(low)).reshape(inside.shape)
        high = torch.where(torch.isfinite(high), high, torch.ones_like(high)).reshape(inside.shape)
        span = (high - low).clamp_min(1e-6)
        out = ((out - low) / span).clamp(0, 1).pow(per_modality(*self.gamma)) * span + low
        out = out + torch.randn_like(out) * self.noise_std
        out = out * mask
        if self.drop_modality > 0 and num_modalities > 1:
            fov = fov.clone()
            present = fov.flatten(2).amax(2) > 0.5  # (B, M)
            for b in range(batch):
                candidates = torch.nonzero(present[b]).flatten()
                if len(candidates) > 1 and float(torch.rand(())) < self.drop_modality:
                    m = int(candidates[int(torch.randint(len(candidates), ()))])
                    fov[b, m] = 0
                    out[b, index == m] = 0
        return torch.cat([out.to(x.dtype), fov.to(x.dtype), x[:, n_channels + num_modalities:]], dim=1)


def copy_paste(labeled_x: torch.Tensor, labeled_y: torch.Tensor, unlabeled_x: torch.Tensor, pseudo: torch.Tensor,
               box: float, inward: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bidirectional copy-paste (BCP; Bai et al., CVPR 2023) of unlabeled rows with labeled rows.

    Row ``j`` of the result mixes unlabeled row ``j`` with labeled row ``j % L``: a box of ``box`` times each
    in-plane side (through every slice), at a random place, comes from one row and the rest from the other. With
    ``inward[j]`` the labeled content is inside the box, else outside (BCP mixes both ways). Every channel is
    mixed, FOV masks included, so a mixed voxel keeps its own field of view. The target is the labeled row's label
    on its part and ``pseudo`` on the other. A few labeled cases then teach inside unlabeled anatomy and the
    reverse, which narrows the gap between what the labeled and the unlabeled rows teach.

    ``labeled_x``: ``(L, C, *)``; ``labeled_y``: ``(L, 1, *)``; ``unlabeled_x``: ``(U, C, *)``; ``pseudo``:
    ``(U, 1, *)``. Returns the mixed inputs ``(U, C, *)``, targets ``(U, 1, *)`` and where the labeled row's content
    went (``(U, 1, *)`` bool).
    """
    if len(labeled_x) == 0 or not 0 < box < 1:
        return unlabeled_x, pseudo, torch.zeros_like(pseudo, dtype=torch.bool)
    h, w = unlabeled_x.shape[-2:]
    bh, bw = max(1, round(box * h)), max(1, round(box * w))
    inside = torch.zeros((len(unlabeled_x), 1, *unlabeled_x.shape[2:]), dtype=torch.bool, device=unlabeled_x.device)
    for j in range(len(unlabeled_x)):
        y0, x0 = int(torch.randint(h - bh + 1, ())), int(torch.randint(w - bw + 1, ()))
        inside[j, ..., y0:y0 + bh, x0:x0 + bw] = True
    from_labeled = inside == torch.as_tensor(list(inward), device=inside.device).reshape(-1, *[1] * (inside.ndim - 1))
    rows = torch.arange(len(unlabeled_x), device=labeled_x.device) % len(labeled_x)
    mixed_x = torch.where(from_labeled, labeled_x[rows].to(unlabeled_x.dtype), unlabeled_x)
    mixed_y = torch.where(from_labeled, labeled_y[rows].to(pseudo.dtype), pseudo)
    return mixed_x, mixed_y, from_labeled


class MaskedImageView:
    """The corrupted view of masked image modelling, MONAI's self-supervised recipe (its ViT autoencoder
    tutorial): either small holes or everything outside large holes filled with noise (``RandCoarseDropout``, one
    of the two at random), then blocks shuffled (``RandCoarseShuffle``), on the image channels of each row; the FOV
    masks stay as they are.

    Hole sizes follow the recipe's on a 96-voxel cube, scaled to the patch (at least one voxel per axis), so a thin
    3D patch (few slices) gets holes through its slices. ``seed`` makes the views reproducible.
    """

    def __init__(self, patch_size: list[int], seed: int = 0) -> None:
        from monai.transforms import Compose, OneOf, RandCoarseDropout, RandCoarseShuffle  # slow import: only here

        def scaled(size: int) -> list[int]:
            return [max(1, round(size * p / 96)) for p in patch_size]

        self.transform = Compose([
            OneOf([RandCoarseDropout(prob=1.0, holes=6, spatial_size=scaled(5), max_spatial_size=scaled(32),
                                     dropout_holes=True),
                   RandCoarseDropout(prob=1.0, holes=6, spatial_size=scaled(20), max_spatial_size=scaled(64),
                                     dropout_holes=False)]),
            RandCoarseShuffle(prob=0.8, holes=10, spatial_size=scaled(8)),
        ])
        self.transform.set_random_state(seed)

    def __call__(self, x: torch.Tensor, image_channels: int) -> torch.Tensor:
        """``x`` ``(B, C + M, *)`` with each row's first ``image_channels`` channels corrupted."""
        rows = [torch.as_tensor(self.transform(row[:image_channels].detach().cpu())) for row in x]
        image = torch.stack(rows).to(device=x.device, dtype=x.dtype)
        return torch.cat([image, x[:, image_channels:]], dim=1)
