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
        for projection in (loss.projection, loss.ema_projection):
            projection.weight.copy_(torch.eye(32))
            projection.bias.zero_()
    q_tokens = loss.teacher_log_probs(embedding.view(1, 32, 1, 1), anchors).exp()[0, :, 0, 0]
    assert torch.allclose(q_tokens, q, atol=1e-5)


# ------------------------------------------------------------------------------------------ EMA projection
def _outputs(generator: torch.Generator, b: int = 2, m: int = 3, c: int = 6, size: int = 4,
             present: Tensor | None = None):
    """A student and a teacher :class:`Any2SegOutput` of one stage, random features, student features with grad."""
    from cmcseg.networks.any2seg import Any2SegOutput

    present = torch.tensor([[True, True, False], [False, True, True]]) if present is None else present
    features = torch.randn(b, m, c, size, size, generator=generator) * present[..., None, None, None]
    features.requires_grad_(True)
    teacher_features = torch.randn(b, m, c, size, size, generator=generator)
    student = Any2SegOutput(logits=None, fused=[features.mean(dim=1)], features=[features], present=present)
    teacher = Any2SegOutput(logits=None, fused=[teacher_features.mean(dim=1)], features=[teacher_features],
                            present=torch.ones(b, m, dtype=torch.bool))
    return student, teacher


def test_the_teacher_target_comes_from_an_ema_copy_of_the_projection() -> None:
    from cmcseg.losses.language_distillation import LSCDLoss

    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    loss = LSCDLoss(feature_dim=6, text_dim=8, affinity_size=4)
    anchors = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    student, teacher = _outputs(generator)
    before = loss.teacher_log_probs(teacher.fused[0], anchors)
    with torch.no_grad():
        loss.projection.weight.add_(torch.randn(8, 6, generator=generator))       # only the student's P moves
    assert torch.equal(loss.teacher_log_probs(teacher.fused[0], anchors), before)
    ema_before = loss.ema_projection.weight.clone()
    loss.update_ema(decay=0.9, step=100)
    assert torch.allclose(loss.ema_projection.weight, 0.9 * ema_before + 0.1 * loss.projection.weight)
    assert not torch.allclose(loss.teacher_log_probs(teacher.fused[0], anchors), before)

    optimizer = torch.optim.AdamW([p for p in loss.parameters() if p.requires_grad], lr=0.1)
    ema_state = {k: v.clone() for k, v in loss.ema_projection.state_dict().items()}
    terms = loss(student, teacher, anchors, labels=torch.randint(0, 3, (2, 4, 4), generator=generator))
    terms.total.backward()
    assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.ema_projection.parameters())
    optimizer.step()
    for key, value in loss.ema_projection.state_dict().items():
        assert torch.equal(value, ema_state[key]), key

    restored = LSCDLoss(feature_dim=6, text_dim=8)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.ema_projection.weight, loss.ema_projection.weight)
    old = {k: v for k, v in loss.state_dict().items() if not k.startswith("ema_")}   # saved before P' existed
    restored.load_state_dict(old)
    assert torch.equal(restored.ema_projection.weight, loss.projection.weight)


# ------------------------------------------------------------------------------------------ modality correlation
def test_the_modality_correlation_term_matches_the_teachers_structure_over_present_pairs_only() -> None:
    from cmcseg.losses.language_distillation import LSCDLoss

    generator = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    loss = LSCDLoss(feature_dim=6, text_dim=8, affinity_size=4)
    anchors = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    present = torch.tensor([[True, True, False], [True, True, True]])
    student, teacher = _outputs(generator, present=present)
    feats, teacher_feats = student.features[0], teacher.features[0]

    same = torch.where(present[..., None, None, None], teacher_feats, torch.zeros(()))
    assert loss.inter_modal_correlation(same, present, teacher_feats, teacher.present).abs().item() < 1e-6

    value = loss.inter_modal_correlation(feats, present, teacher_feats, teacher.present)
    value.backward()
    assert value.item() > 0 and feats.grad[present].abs().sum() > 0
    assert feats.grad[0, 2].abs().sum() == 0                                     # absent: no gradient
    garbage = feats.detach().clone()
    garbage[0, 2] = 1e3 * torch.randn(6, 4, 4, generator=generator)             # absent slot: changes nothing
    assert torch.allclose(loss.inter_modal_correlation(garbage, present, teacher_feats, teacher.present), value,
                          rtol=0, atol=1e-7)
    single = torch.tensor([[True, False, False], [False, False, True]])         # one modality per row: no pairs
    assert loss.inter_modal_correlation(feats, single, teacher_feats, teacher.present).item() == 0
    teacher_missing = torch.tensor([[True, True, True], [True, True, False]])   # modality 2 of row 1 not in view
    restricted = loss.inter_modal_correlation(feats, present, teacher_feats, teacher_missing)
    garbage_teacher = teacher_feats.clone()
    garbage_teacher[1, 2] = 1e3 * torch.randn(6, 4, 4, generator=generator)
    assert torch.allclose(loss.inter_modal_correlation(feats, present, garbage_teacher, teacher_missing), restricted,
                          rtol=0, atol=1e-7)

    terms = loss(student, teacher, anchors)                                      # a weighted term of the total
    assert torch.allclose(terms.correlation, value)
    loss.correlation_weight = 0.0
    without = loss(student, teacher, anchors)
    assert without.correlation.item() == 0
    assert torch.allclose(terms.total - without.total, value, atol=1e-6)
