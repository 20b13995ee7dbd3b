"""Supervised Dice+CE per modality head on labeled cases, with nnU-Net's deep supervision.

This is nnU-Net's own training loss (``nnUNetTrainer._build_loss``), reused rather than
rewritten: ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` (batch_dice from the plan,
smooth 1e-5, background excluded from the Dice), wrapped in ``DeepSupervisionWrapper`` with
weights ``1/2^i`` over the outputs (highest resolution first), the lowest-resolution output
weighted 0 and the weights normalised to sum to 1. Each CMC modality head is supervised with
it against the same label map, and the heads' losses are averaged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import Tensor, nn

HeadOutput = Tensor | Sequence[Tensor]


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
    """nnU-Net's deep supervision weights for ``num_outputs`` outputs, highest resolution first.

    ``w_i = 2^-i``, then ``w_{n-1} = 0`` (the lowest resolution is not used), then ``w / sum(w)``.
    One output (no deep supervision) gets weight 1; two outputs give (1, 0), as in nnU-Net.
    """
    if num_outputs < 1:
        raise ValueError(f"need at least one output, got {num_outputs}")
    if num_outputs == 1:
        return (1.0,)
    weights = [1.0 / (2**i) for i in range(num_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return tuple(w / total for w in weights)


def downsample_target(target: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """The label map ``(B, 1, *spatial)`` resized to each spatial shape with nearest-neighbour.

    Same logic as batchgeneratorsv2's ``DownsampleSegForDSTransform`` used by nnU-Net
    (``interpolate(mode='nearest-exact')`` on a float copy, cast back); shapes equal to the
    target's are passed through untouched. Labels, including an ignore label, are never blended.
    """
    if target.ndim < 3:
        raise ValueError(f"target must be (B, 1, *spatial), got shape {tuple(target.shape)}")
    results: list[Tensor] = []
    target_float: Tensor | None = None
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if shape == tuple(target.shape[2:]):
            results.append(target)
            continue
        if target_float is None:
            target_float = target.float()
        results.append(F.interpolate(target_float, size=shape, mode="nearest-exact").to(target.dtype))
    return results


def ignore_outside_fov(target: Tensor, fov: Tensor, ignore_value: int) -> Tensor:
    """The label map ``(B, 1, *)`` with ``ignore_value`` where the ``(B, 1, *)`` field-of-view mask is off.

    The mask is resized to the target's grid (nearest) when a deep-supervision target is coarser, so one head
    learns only inside its modality's field of view at every scale.
    """
    fov = fov.float()
    if fov.shape[2:] != target.shape[2:]:
        fov = F.interpolate(fov, size=tuple(target.shape[2:]), mode="nearest-exact")
    return torch.where(fov > 0.5, target, torch.full_like(target, ignore_value))


def _as_output_list(outputs: HeadOutput) -> list[Tensor]:
    """One head's outputs as a list, highest resolution first (a single tensor becomes a list of one)."""
    if isinstance(outputs, Tensor):
        return [outputs]
    output_list = list(outputs)
    if not output_list or not all(isinstance(o, Tensor) for o in output_list):
        raise TypeError("a head's outputs must be a tensor or a non-empty list of tensors (highest resolution first)")
    return output_list


class DeepSupervisedDiceCELoss(nn.Module):
    """nnU-Net's Dice+CE for ONE head, with deep supervision over a list of logits.

        L = sum_i w_i (weight_ce * CE(z_i, y_i) + weight_dice * (-SoftDice(softmax(z_i), y_i)))

    ``z_i`` are logits at decreasing resolution, ``y_i`` the target resized to each (nearest),
    ``w_i`` from :func:`deep_supervision_weights`. As in nnU-Net the Dice term is the NEGATIVE
    soft Dice (mean over foreground classes), so the loss can go below 0; a perfect prediction
    approaches -weight_dice. Voxels labelled ``ignore_label`` count in neither term.
    """

    def __init__(
        self,
        batch_dice: bool = False,
        ignore_label: int | None = None,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        smooth: float = 1e-5,
        dice_include_background: bool = False,
    ) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.smooth = smooth
        self.dice_include_background = dice_include_background

    def dice_ce(self) -> DC_and_CE_loss:
        """nnU-Net's ``DC_and_CE_loss`` built from the current attributes (as ``_build_loss`` does)."""
        return DC_and_CE_loss(
            {
                "batch_dice": self.batch_dice,
                "smooth": self.smooth,
                "do_bg": self.dice_include_background,
                "ddp": False,
            },
            {},
            weight_ce=self.weight_ce,
            weight_dice=self.weight_dice,
            ignore_label=self.ignore_label,
            dice_class=MemoryEfficientSoftDiceLoss,
        )

    def forward(self, outputs: HeadOutput, target: Tensor | Sequence[Tensor]) -> Tensor:
        """Loss of one head. ``target``: full-res ``(B, 1, *spatial)`` labels, or a list already resized."""
        output_list = _as_output_list(outputs)
        shapes = [o.shape[2:] for o in output_list]
        if isinstance(target, Tensor):
            targets = downsample_target(target, shapes)
        else:
            targets = list(target)
            if len(targets) != len(output_list):
                raise ValueError(f"{len(output_list)} outputs but {len(targets)} targets")
        for index, (out, tgt) in enumerate(zip(output_list, targets)):
            if out.shape[2:] != tgt.shape[2:] or out.shape[0] != tgt.shape[0]:
                raise ValueError(
                    f"output {index} has shape {tuple(out.shape)} but its target has {tuple(tgt.shape)}; "
                    "the target must be (B, 1, *spatial) on the output's grid"
                )
        wrapper = DeepSupervisionWrapper(self.dice_ce(), deep_supervision_weights(len(output_list)))
        return wrapper(output_list, targets)


class SupervisedDiceCELoss(DeepSupervisedDiceCELoss):
    """Supervised CMC loss: nnU-Net's deep-supervised Dice+CE per modality head, mean over heads.

        L_sup = 1/M sum_m L_DiceCE-DS(head_m, y)

    ``head_outputs`` has one entry per modality head; each entry is the head's logits, a single
    ``(B, K, *spatial)`` tensor or a list at decreasing resolution (deep supervision). All heads
    share the one label map ``target`` (``(B, 1, *spatial)`` integer, full resolution).
    """

    def forward(  # type: ignore[override]
        self, head_outputs: Sequence[HeadOutput], target: Tensor | Sequence[Tensor]
    ) -> Tensor:
        """Mean over modality heads of the deep-supervised Dice+CE."""
        if isinstance(head_outputs, Tensor) or len(head_outputs) == 0:
            raise TypeError("head_outputs must be a non-empty list with one entry per modality head")
        losses = [super(SupervisedDiceCELoss, self).forward(outputs, target) for outputs in head_outputs]
        return torch.stack(losses).mean()
