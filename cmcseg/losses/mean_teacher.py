"""Mean-teacher consistency for unpaired datasets (Tarvainen & Valpola, NeurIPS 2017).

When the modalities come from different patients (AMOS CT vs MRI), two heads never see the same
anatomy, so cross-modality agreement makes no sense. Each modality instead keeps its own
consistency: the student's prediction on an unlabeled case should match that of a teacher whose
weights are an exponential moving average (EMA) of the student's.
"""
from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import Tensor, nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def mean_teacher_consistency_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """MSE between the softmax probabilities of student and teacher; the teacher is detached.

        L = mean_{b, k, x} (softmax(s)_{b,k,x} - softmax(t)_{b,k,x})^2

    Both inputs are LOGITS ``(B, K, *spatial)`` at the same resolution. Gradient reaches only the
    student; the teacher is a target (and is updated by :func:`update_ema_teacher`, not by SGD).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    student_prob = torch.softmax(student_logits.float(), dim=1)
    teacher_prob = torch.softmax(teacher_logits.detach().float(), dim=1)
    return torch.mean((student_prob - teacher_prob) ** 2)


class MeanTeacherConsistencyLoss(nn.Module):
    """Module form of :func:`mean_teacher_consistency_loss`."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Softmax-MSE of student against detached teacher logits."""
        return mean_teacher_consistency_loss(student_logits, teacher_logits)


def create_ema_teacher(student: ModuleT) -> ModuleT:
    """A deep copy of ``student`` whose parameters require no gradient (it is updated by EMA only)."""
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def ema_decay(alpha: float, global_step: int) -> float:
    """Effective EMA decay ``min(1 - 1/(step + 1), alpha)``: a plain average early, ``alpha`` later."""
    return min(1.0 - 1.0 / (global_step + 1), alpha)


@torch.no_grad()
def update_ema_teacher(teacher: nn.Module, student: nn.Module, alpha: float, global_step: int) -> None:
    """Move the teacher towards the student: ``theta_t <- a theta_t + (1 - a) theta_s``.

    ``a = min(1 - 1/(global_step + 1), alpha)`` (Tarvainen & Valpola's ramp, so step 0 copies
    the student). Buffers (e.g. BatchNorm running statistics) are copied from the student.
    Both modules must have the same parameter and buffer names and shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    decay = ema_decay(alpha, global_step)
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        raise ValueError("teacher and student must have the same parameter names (create it with create_ema_teacher)")
    for name, student_param in student_params.items():
        teacher_params[name].mul_(decay).add_(student_param.detach(), alpha=1.0 - decay)
    teacher_buffers = dict(teacher.named_buffers())
    for name, student_buffer in student.named_buffers():
        if name not in teacher_buffers:
            raise ValueError(f"teacher has no buffer {name!r}; create it with create_ema_teacher(student)")
        teacher_buffers[name].copy_(student_buffer)
