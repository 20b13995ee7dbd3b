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
