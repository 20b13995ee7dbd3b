"""LSCD and its language teacher, piece by piece (GitHub issue 15, "Any2Seg fidelity"): the teacher's device and
its full-modality embedding."""
from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cmcseg.networks import language_teachers
from cmcseg.networks.language_teachers import Teacher, build_teacher


class _CountingTeacher(Teacher):
    """A teacher whose image embedding of modality ``m`` is a fixed direction times the image mean; counts calls."""

    embedding_dim = 4

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.encoded: list[str] = []

    def class_text_embeddings(self, class_names: Sequence[str]) -> Tensor:
        return torch.eye(len(class_names), self.embedding_dim)

    @property
    def has_image_encoder(self) -> bool:
        return True

    @torch.no_grad()
    def encode_images(self, images: Tensor, modality: str) -> Tensor:
        self.encoded.append(modality)
        direction = torch.eye(self.embedding_dim)[int(modality[-1])]
        return F.normalize(images.mean(dim=(1, 2, 3))[:, None] * direction + 1e-3, dim=-1)


# ------------------------------------------------------------------------------------------ teacher device
def test_build_teacher_puts_the_teacher_on_the_given_device(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(language_teachers, "LanguageBindTeacher", Recorder)
    build_teacher("languagebind", "/some/folder", device=torch.device("cpu"), templates=("x {name}",))
    assert seen == {"device": torch.device("cpu"), "templates": ("x {name}",)}
    assert build_teacher("minilm", device="cpu").device == torch.device("cpu")


def test_full_modality_embedding_skips_modalities_absent_from_every_row_and_has_no_graph() -> None:
    teacher = _CountingTeacher()
    images = torch.rand(2, 3, 3, 8, 8, requires_grad=True)
    present = torch.tensor([[True, False, False], [True, True, False]])
    full = teacher.full_modality_embedding(images, ["m0", "m1", "m2"], present)
    assert teacher.encoded == ["m0", "m1"]                                      # m2 is absent everywhere
    assert not full.requires_grad and full.device == teacher.device
    e0, e1 = teacher.encode_images(images[:, 0], "m0"), teacher.encode_images(images[:, 1], "m1")
    assert torch.allclose(full[0], e0[0]) and torch.allclose(full[1], F.normalize(e0[1] + e1[1], dim=-1))


# ------------------------------------------------------------------------------------------ temperature
def _clip_like(k: int = 10, d: int = 32, right: int = 3) -> tuple[Tensor, Tensor]:
    """Orthonormal anchors ``(k, d)`` and a unit embedding ``(d,)`` whose cosines with them are CLIP-like: 0.20 for
    every class, 0.25 for the right one."""
    anchors = torch.eye(k, d)
    cosines = torch.full((k,), 0.20)
    cosines[right] = 0.25
    embedding = torch.zeros(d)
    embedding[:k] = cosines
    embedding[k] = (1 - cosines.pow(2).sum()).sqrt()
    return anchors, embedding


def test_the_default_temperature_gives_peaked_class_distributions_for_clip_range_cosines() -> None:
    from cmcseg.losses.language_distillation import LSCDLoss
    from cmcseg.training.any2seg_trainer import Any2SegTrainer

    anchors, embedding = _clip_like()
    loss = LSCDLoss(feature_dim=32, text_dim=32)
    assert loss.temperature == Any2SegTrainer.lscd_temperature == 0.01
    assert LSCDLoss.embedding_log_probs(embedding[None], anchors, 0.1).exp().max() < 0.3   # the old default: ~flat
    q = LSCDLoss.embedding_log_probs(embedding[None], anchors, loss.temperature).exp()[0]
    assert q.argmax() == 3 and q.max() > 0.5
    with torch.no_grad():                                                        # the per-token path: P = identity
        loss.projection.weight.copy_(torch.eye(32))
        loss.projection.bias.zero_()
    q_tokens = loss.teacher_log_probs(embedding.view(1, 32, 1, 1), anchors).exp()[0, :, 0, 0]
    assert torch.allclose(q_tokens, q, atol=1e-5)
