"""Tests of cmcseg.losses: gradients reach the network, memory stays O(C^2), and the formulas hold."""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmcseg.losses import (
    ChannelSemanticConsistencyLoss,
    CrossModalityAgreementLoss,
    DeepSupervisedDiceCELoss,
    MeanTeacherConsistencyLoss,
    RampUp,
    SupervisedDiceCELoss,
    channel_semantic_consistency_loss,
    create_ema_teacher,
    cross_modality_agreement_loss,
    deep_supervision_weights,
    downsample_target,
    linear_rampup,
    mean_teacher_consistency_loss,
    sigmoid_rampup,
    update_ema_teacher,
)

NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- a tiny two-modality network


class TinyTwoModalityNet(nn.Module):
    """Two modality branches (encoder shared or not) -> bottleneck features -> one head per modality."""

    def __init__(self, shared_encoder: bool, channels: int = 8, classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def encoder() -> nn.Module:
            return nn.Sequential(
                nn.Conv3d(1, channels, 3, padding=1),
                nn.BatchNorm3d(channels),
                nn.ReLU(),
                nn.Conv3d(channels, channels, 3, stride=2, padding=1),
            )

        self.encoders = nn.ModuleList([encoder()] if shared_encoder else [encoder(), encoder()])
        self.heads = nn.ModuleList(
            [nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv3d(channels, classes, 1)) for _ in range(2)]
        )

    def encoder_for(self, modality: int) -> nn.Module:
        return self.encoders[min(modality, len(self.encoders) - 1)]

    def forward(self, images: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        features = [self.encoder_for(m)(img) for m, img in enumerate(images)]
        logits = [self.heads[m](feat) for m, feat in enumerate(features)]
        return features, logits


def _images(batch: int = 2, size: int = 8) -> list[Tensor]:
    return [torch.randn(batch, 1, size, size, size) for _ in range(2)]


def _grad_norm(module: nn.Module) -> float:
    """Sum of gradient norms of a module's parameters (0 where no gradient arrived)."""
    return float(sum(p.grad.norm() for p in module.parameters() if p.grad is not None))


# --------------------------------------------------------------------------- gradients of the unlabeled losses


@pytest.mark.parametrize("shared_encoder", [True, False])
def test_csc_sends_gradient_into_every_encoder_and_not_into_heads(shared_encoder: bool) -> None:
    net = TinyTwoModalityNet(shared_encoder)
    features, _ = net(_images())
    ChannelSemanticConsistencyLoss(temperature=0.1)(features).backward()
    for encoder in net.encoders:
        assert _grad_norm(encoder) > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert _grad_norm(net.heads) == 0.0


@pytest.mark.parametrize("shared_encoder", [True, False])
def test_cac_sends_gradient_into_both_heads_and_encoders(shared_encoder: bool) -> None:
    net = TinyTwoModalityNet(shared_encoder)
    _, logits = net(_images())
    loss = CrossModalityAgreementLoss()([torch.softmax(z, dim=1) for z in logits])
    assert loss > 0
    loss.backward()
    for head in net.heads:
        assert _grad_norm(head) > 0
    for encoder in net.encoders:
        assert _grad_norm(encoder) > 0


def test_cac_detach_modality_stops_gradient_into_that_branch_only() -> None:
    net = TinyTwoModalityNet(shared_encoder=False)
    _, logits = net(_images())
    cross_modality_agreement_loss([torch.softmax(z, dim=1) for z in logits], detach_modality=1).backward()
    assert _grad_norm(net.heads[0]) > 0 and _grad_norm(net.encoders[0]) > 0
    assert _grad_norm(net.heads[1]) == 0.0 and _grad_norm(net.encoders[1]) == 0.0


def test_mean_teacher_sends_gradient_into_student_only() -> None:
    student = TinyTwoModalityNet(shared_encoder=False)
    teacher = create_ema_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    # even a teacher that WOULD accept gradient must get none: the loss detaches it
    for param in teacher.parameters():
        param.requires_grad_(True)
    images = _images()
    noisy = [img + 0.1 * torch.randn_like(img) for img in images]
    _, student_logits = student(images)
    _, teacher_logits = teacher(noisy)
    loss = sum(MeanTeacherConsistencyLoss()(s, t) for s, t in zip(student_logits, teacher_logits))
    assert loss > 0
    loss.backward()
    assert _grad_norm(student.encoders) > 0 and _grad_norm(student.heads) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_mean_teacher_loss_is_softmax_mse() -> None:
    student, teacher = torch.randn(2, NUM_CLASSES, 4, 4, 4), torch.randn(2, NUM_CLASSES, 4, 4, 4)
    expected = ((student.softmax(1) - teacher.softmax(1)) ** 2).mean()
    torch.testing.assert_close(mean_teacher_consistency_loss(student, teacher), expected)
    assert mean_teacher_consistency_loss(student, student.clone()) == 0


# --------------------------------------------------------------------------- CSC: memory and semantics


def _saved_tensor_shapes(features: Sequence[Tensor]) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while computing CSC."""
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: Tensor) -> Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        channel_semantic_consistency_loss(features)
    return shapes


def _largest_allocation_bytes(features: Sequence[Tensor]) -> int:
    """Largest single CPU allocation, forward and backward, seen by the profiler during CSC."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        channel_semantic_consistency_loss(features).backward()
    return max(max(event.cpu_memory_usage for event in prof.events()), 0)


@pytest.mark.parametrize("side", [8, 32])
def test_csc_saves_no_pairwise_voxel_tensor(side: int) -> None:
    batch, channels, voxels = 2, 16, side**3
    features = [torch.randn(batch, channels, side, side, side, requires_grad=True) for _ in range(2)]
    shapes = _saved_tensor_shapes(features)
    input_numel = batch * channels * voxels
    assert max(math.prod(s) for s in shapes) <= input_numel  # nothing bigger than an input
    assert all(s.count(voxels) <= 1 for s in shapes)  # no N x N anything
    # the only pairwise tensor is the C x C similarity matrix, saved as (B, C, C) or (B * C, C)
    pairwise = [s for s in shapes if voxels not in s and math.prod(s) == batch * channels * channels]
    assert pairwise and all(s[-1] == channels for s in pairwise)
    # every saved tensor is either a per-channel descriptor (B, C, N)-sized or O(B * C^2)
    for s in shapes:
        assert math.prod(s) <= batch * channels * channels or voxels in s


def test_csc_memory_grows_linearly_with_voxels() -> None:
    batch, channels = 2, 16
    largest = {}
    for side in (8, 32):
        features = [torch.randn(batch, channels, side, side, side, requires_grad=True) for _ in range(2)]
        largest[side] = _largest_allocation_bytes(features)
        input_bytes = batch * channels * side**3 * 4
        # at most a couple of input-sized buffers (normalised copy, its gradient); an N^2 float
        # tensor would be 4 * 32768^2 bytes = 4 GiB
        assert largest[side] <= 2 * input_bytes
    assert largest[32] <= 64 * largest[8] * 1.01  # 64x the voxels -> at most 64x the memory


def _reference_csc(features: Sequence[Tensor], temperature: float) -> Tensor:
    """Slow, explicit CSC: loop over ordered pairs, cases and channels."""
    terms = []
    for a, b in itertools.permutations(range(len(features)), 2):
        za = F.normalize(features[a].flatten(2), dim=2)
        zb = F.normalize(features[b].flatten(2), dim=2)
        for n in range(za.shape[0]):
            for c in range(za.shape[1]):
                sims = torch.stack([torch.dot(za[n, c], zb[n, k]) for k in range(zb.shape[1])]) / temperature
                terms.append(-torch.log_softmax(sims, dim=0)[c])
    return torch.stack(terms).mean()


def test_csc_matches_explicit_definition_over_ordered_pairs() -> None:
    features = [torch.randn(2, 5, 3, 4, 2) for _ in range(3)]
    torch.testing.assert_close(
        channel_semantic_consistency_loss(features, temperature=0.2), _reference_csc(features, 0.2)
    )


def test_csc_lower_for_corresponding_channels_than_for_permuted_ones() -> None:
    base = torch.randn(2, 16, 6, 6, 6)
    other = base + 0.3 * torch.randn_like(base)
    permuted = other[:, torch.randperm(16)]
    aligned_loss = channel_semantic_consistency_loss([base, other])
    permuted_loss = channel_semantic_consistency_loss([base, permuted])
    assert aligned_loss < permuted_loss
    assert aligned_loss < math.log(16) < permuted_loss  # log C is the loss of uninformative similarities


def test_csc_rejects_single_modality_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=">= 2 modalities"):
        channel_semantic_consistency_loss([torch.randn(1, 4, 2, 2, 2)])
    with pytest.raises(ValueError, match="same batch size"):
        channel_semantic_consistency_loss([torch.randn(1, 4, 2, 2, 2), torch.randn(1, 5, 2, 2, 2)])


# --------------------------------------------------------------------------- CAC


def _probabilities(shape: tuple[int, ...] = (2, NUM_CLASSES, 6, 6, 6), scale: float = 3.0) -> Tensor:
    return torch.softmax(scale * torch.randn(shape), dim=1)


@pytest.mark.parametrize("include_background", [True, False])
def test_cac_is_zero_for_identical_predictions(include_background: bool) -> None:
    prob = _probabilities()
    loss = cross_modality_agreement_loss([prob, prob.clone(), prob.clone()], include_background=include_background)
    assert abs(float(loss)) < 1e-6


def test_cac_grows_monotonically_as_predictions_diverge() -> None:
    prob_a, prob_b = _probabilities(), _probabilities()
    values = [
        float(cross_modality_agreement_loss([prob_a, (1 - t) * prob_a + t * prob_b]))
        for t in np.linspace(0.0, 1.0, 11)
    ]
    assert values[0] < 1e-6
    assert all(later > earlier for earlier, later in zip(values, values[1:]))


def test_cac_is_symmetric_and_matches_formula() -> None:
    prob_a, prob_b = _probabilities(), _probabilities()
    forward = cross_modality_agreement_loss([prob_a, prob_b])
    torch.testing.assert_close(forward, cross_modality_agreement_loss([prob_b, prob_a]))
    smooth = 1e-5
    dims = (2, 3, 4)
    dice = (2 * torch.minimum(prob_a, prob_b).sum(dims) + smooth) / (prob_a.sum(dims) + prob_b.sum(dims) + smooth)
    torch.testing.assert_close(forward, (1 - dice).mean())


def test_cac_averages_over_unordered_pairs() -> None:
    probs = [_probabilities() for _ in range(3)]
    pairs = [cross_modality_agreement_loss([probs[a], probs[b]]) for a, b in itertools.combinations(range(3), 2)]
    torch.testing.assert_close(cross_modality_agreement_loss(probs), torch.stack(pairs).mean())


def test_cac_rejects_logits() -> None:
    logits = 3.0 * torch.randn(2, NUM_CLASSES, 4, 4, 4)
    with pytest.raises(ValueError, match="not probabilities"):
        cross_modality_agreement_loss([logits, logits.softmax(1)])


# --------------------------------------------------------------------------- supervised Dice+CE


def _nnunet_weights(num_outputs: int) -> np.ndarray:
    """nnUNetTrainer._build_loss's deep supervision weights, verbatim (non-DDP branch)."""
    weights = np.array([1 / (2**i) for i in range(num_outputs)])
    weights[-1] = 0
    return weights / weights.sum()


@pytest.mark.parametrize("num_outputs", [2, 3, 4, 6])
def test_deep_supervision_weights_follow_nnunet(num_outputs: int) -> None:
    np.testing.assert_allclose(deep_supervision_weights(num_outputs), _nnunet_weights(num_outputs))
    assert deep_supervision_weights(1) == (1.0,)


def _deep_supervision_logits(target: Tensor, num_outputs: int = 3, requires_grad: bool = False) -> list[Tensor]:
    """Random logits at full, 1/2, 1/4 ... resolution for a (B, 1, *spatial) target."""
    shape = target.shape[2:]
    outputs = []
    for i in range(num_outputs):
        size = [s // 2**i for s in shape]
        outputs.append(torch.randn(target.shape[0], NUM_CLASSES, *size, requires_grad=requires_grad))
    return outputs


def test_supervised_loss_applies_nnunet_weights_and_drops_lowest_output() -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    target = torch.randint(0, NUM_CLASSES, (2, 1, 16, 16, 16))
    outputs = _deep_supervision_logits(target, requires_grad=True)
    loss = DeepSupervisedDiceCELoss()(outputs, target)
    reference_loss = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
        weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss,
    )
    targets = downsample_target(target, [o.shape[2:] for o in outputs])
    expected = sum(w * reference_loss(o, t) for w, o, t in zip(_nnunet_weights(3), outputs, targets))
    torch.testing.assert_close(loss, expected.float())
    loss.backward()
    assert outputs[0].grad.abs().sum() > 0 and outputs[1].grad.abs().sum() > 0
    assert outputs[2].grad is None  # the lowest resolution has weight 0


def test_supervised_perfect_prediction_beats_wrong_one() -> None:
    target = torch.randint(0, NUM_CLASSES, (2, 1, 8, 8, 8))
    perfect = 20.0 * F.one_hot(target[:, 0], NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
    wrong = 20.0 * F.one_hot((target[:, 0] + 1) % NUM_CLASSES, NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
    loss = SupervisedDiceCELoss()
    perfect_loss, wrong_loss = loss([perfect, perfect], target), loss([wrong, wrong], target)
    assert perfect_loss < wrong_loss
    assert float(perfect_loss) == pytest.approx(-1.0, abs=1e-3)  # nnU-Net's -Dice + CE convention


def test_supervised_loss_is_mean_over_modality_heads() -> None:
    target = torch.randint(0, NUM_CLASSES, (2, 1, 8, 8, 8))
    head_a, head_b = _deep_supervision_logits(target), torch.randn(2, NUM_CLASSES, 8, 8, 8)
    single = DeepSupervisedDiceCELoss()
    expected = 0.5 * (single(head_a, target) + single(head_b, target))
    torch.testing.assert_close(SupervisedDiceCELoss()([head_a, head_b], target), expected)
    with pytest.raises(TypeError):
        SupervisedDiceCELoss()(head_b, target)


def test_supervised_loss_ignores_ignore_label() -> None:
    ignore = NUM_CLASSES
    target = torch.randint(0, NUM_CLASSES, (2, 1, 8, 8, 8))
    target[:, :, :4] = ignore
    logits = torch.randn(2, NUM_CLASSES, 8, 8, 8, requires_grad=True)
    loss_fn = SupervisedDiceCELoss(ignore_label=ignore)
    loss = loss_fn([logits], target)
    loss.backward()
    ignored = (target == ignore).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().sum() > 0
    changed = logits.detach().clone()
    changed[ignored] = 100.0 * torch.randn(int(ignored.sum()))
    torch.testing.assert_close(loss_fn([changed], target), loss.detach())


def test_downsample_target_matches_nnunet_transform_and_keeps_ignore_label() -> None:
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    target = torch.randint(0, 4, (2, 1, 16, 12, 8)).to(torch.int16)
    target[:, :, :3] = 255
    shapes = [(16, 12, 8), (8, 6, 4), (4, 3, 2)]
    ours = downsample_target(target, shapes)
    transform = DownsampleSegForDSTransform((1, 0.5, 0.25))
    for case in range(target.shape[0]):
        theirs = transform(segmentation=target[case])["segmentation"]
        for mine, reference in zip(ours, theirs):
            assert torch.equal(mine[case], reference)
    assert ours[0] is target
    assert all(o.dtype == target.dtype for o in ours)
    assert set(ours[2].unique().tolist()) <= set(target.unique().tolist())


# --------------------------------------------------------------------------- ramp-ups


@pytest.mark.parametrize("ramp", [sigmoid_rampup, linear_rampup])
def test_rampups_start_near_zero_end_at_one_and_are_monotone(ramp) -> None:
    values = [ramp(step, 40) for step in range(0, 61)]
    assert values[0] <= math.exp(-5) + 1e-12  # sigmoid: exp(-5) ~ 0.0067 (published formula); linear: 0
    assert values[40] == 1.0 and values[60] == 1.0
    assert all(later >= earlier for earlier, later in zip(values, values[1:]))
    assert ramp(5, 0) == 1.0


def test_linear_rampup_is_exactly_zero_at_start_and_sigmoid_follows_formula() -> None:
    assert linear_rampup(0, 10) == 0.0
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))


@pytest.mark.parametrize("kind", ["sigmoid", "linear", "constant"])
def test_rampup_dataclass_reaches_weight(kind: str) -> None:
    ramp = RampUp(weight=0.1, length=40, kind=kind, unit="epoch")
    assert ramp(40) == pytest.approx(0.1) and ramp(1000) == pytest.approx(0.1)
    values = [ramp(step) for step in range(0, 50)]
    assert all(later >= earlier for earlier, later in zip(values, values[1:]))
    if kind == "linear":
        assert ramp(0) == 0.0
    if kind == "sigmoid":
        assert ramp(0) == pytest.approx(0.1 * math.exp(-5))


def test_rampup_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        RampUp(kind="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RampUp(length=-1)


# --------------------------------------------------------------------------- EMA teacher


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("global_step, expected_decay", [(0, 0.0), (1, 0.5), (9, 0.9), (10_000, 0.99)])
def test_ema_update_moves_teacher_towards_student(global_step: int, expected_decay: float) -> None:
    student = TinyTwoModalityNet(shared_encoder=False)
    teacher = create_ema_teacher(student)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param))
    student(_images())  # changes BatchNorm running statistics (train mode)
    before_teacher, student_state = _state(teacher), _state(student)
    update_ema_teacher(teacher, student, alpha=0.99, global_step=global_step)
    after = _state(teacher)
    param_names = {name for name, _ in student.named_parameters()}
    for name, value in after.items():
        if name in param_names:
            expected = expected_decay * before_teacher[name] + (1 - expected_decay) * student_state[name]
            torch.testing.assert_close(value, expected)
        else:  # buffers are copied
            torch.testing.assert_close(value, student_state[name])


def test_ema_update_rejects_different_architectures() -> None:
    with pytest.raises(ValueError):
        update_ema_teacher(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), alpha=0.99, global_step=1)
