"""The semi-supervised objective's parts, on inputs whose answer is known: pseudo-labels, FOV masking,
ramps by run fraction, reliability-weighted fusion, the strong view, and forced-foreground rows."""
from __future__ import annotations

import pytest
import torch

from cmcseg.errors import CmcsegError
from cmcseg.losses import (
    PseudoLabelLoss,
    RampUp,
    SupervisedDiceCELoss,
    adaptive_thresholds,
    class_thresholds,
    confident_pseudo_labels,
    confusion_candidates,
    grouped_candidates,
    masked_agreement_loss,
)
from cmcseg.losses.pseudo_label import hold_background, merge_unlearned
from cmcseg.networks.cmc import fov_weighted_ensemble
from cmcseg.paths import WorkRoots
from cmcseg.training.augmentation import StrongIntensityAugmentation, copy_paste
from cmcseg.training.cmc_trainer import CMCTrainer
from cmcseg.training.data import PatchCropper
from cmcseg.training.trainer import TrainingRequest

K = 3
IGNORE = K


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def test_confident_pseudo_labels_keep_only_voxels_above_their_class_threshold() -> None:
    probabilities = torch.tensor([[0.95, 0.6, 0.1], [0.03, 0.3, 0.15], [0.02, 0.1, 0.75]])[None, :, :, None]
    labels, keep = confident_pseudo_labels(probabilities, class_thresholds([0.9, 0.9, 0.7], K), IGNORE)
    assert labels.flatten().tolist() == [0, IGNORE, 2]  # 0.6 < 0.9; class 2's own threshold 0.7 lets 0.75 in
    assert keep.flatten().tolist() == [True, False, True]
    with pytest.raises(ValueError, match="one per class"):
        class_thresholds([0.9, 0.9], K)


def test_adaptive_thresholds_fall_with_a_class_reliability_relative_to_the_best_class() -> None:
    base = class_thresholds(0.8, 4)
    reliability = torch.tensor([0.99, 0.9, 0.45, 0.09])  # background, best class, half the best, a tenth
    lowered = adaptive_thresholds(base, reliability, 0.5)
    # background keeps its own; the best class keeps 0.8; half the best: 0.8 * 0.5 / 1.5 < 0.5, so the floor
    torch.testing.assert_close(lowered, torch.tensor([0.8, 0.8, 0.5, 0.5]))
    torch.testing.assert_close(adaptive_thresholds(base, reliability, 0.2),
                               torch.tensor([0.8, 0.8, 0.8 / 3, 0.8 * (0.1 / 1.9)]).clamp_min(0.2))
    assert torch.equal(adaptive_thresholds(base, reliability, 0.0), base), "floor 0 is off"
    # every class as reliable as the best (e.g. at the start, every reliability at its floor): nothing moves
    assert torch.equal(adaptive_thresholds(base, torch.full((4,), 0.05), 0.5), base)
    # a per-class threshold below the floor is never raised
    assert adaptive_thresholds(class_thresholds([0.8, 0.8, 0.4, 0.8], 4), reliability, 0.5)[2] == pytest.approx(0.4)


def test_pseudo_label_loss_ignores_voxels_outside_fov_and_below_threshold() -> None:
    """Changing a head's logits where the pseudo-label is unconfident or outside its FOV changes nothing."""
    loss = PseudoLabelLoss(IGNORE)
    teacher = torch.softmax(torch.randn(2, K, 4, 6, 6, generator=torch.Generator().manual_seed(1)) * 4, 1)
    pseudo, keep = confident_pseudo_labels(teacher, class_thresholds(0.8, K), IGNORE)
    assert 0 < keep.float().mean() < 1, "the test needs kept and dropped voxels"
    fov = torch.ones(2, 2, 4, 6, 6)
    fov[:, 1, :2] = 0  # head 1 sees only the second half of the slices
    heads = [_logits(2, K, 4, 6, 6, seed=2), _logits(2, K, 4, 6, 6, seed=3)]
    value = loss(heads, pseudo, fov)
    value.backward()
    for m, head in enumerate(heads):
        silent = (~keep).expand_as(head) | (fov[:, m:m + 1] < 0.5).expand_as(head)
        assert torch.all(head.grad[silent] == 0), f"head {m} gets gradient where it must not"
        assert head.grad[~silent].abs().sum() > 0
    changed = [h.detach().clone() for h in heads]
    changed[0][(~keep).expand_as(changed[0])] += 5.0
    changed[1][:, :, :2] -= 5.0
    torch.testing.assert_close(loss(changed, pseudo, fov), value.detach())


def test_pseudo_label_loss_is_zero_without_a_kept_voxel_in_view() -> None:
    heads = [_logits(1, K, 2, 4, 4)]
    pseudo = torch.full((1, 1, 2, 4, 4), IGNORE)
    value = PseudoLabelLoss(IGNORE)(heads, pseudo, torch.ones(1, 1, 2, 4, 4))
    assert value.item() == 0.0 and value.requires_grad


def test_supervised_term_ignores_voxels_outside_the_heads_fov() -> None:
    trainer = object.__new__(CMCTrainer)  # the loss helpers only need these attributes
    trainer.ignore_value = IGNORE
    trainer.supervised_loss = SupervisedDiceCELoss(ignore_label=IGNORE)
    target = torch.randint(0, K, (2, 1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    targets = [target, target[:, :, :, ::2, ::2], target[:, :, :, ::4, ::4]]  # deep supervision (last weight 0)
    fov = torch.ones(2, 2, 4, 8, 8)
    fov[:, 0, :, :, :4] = 0
    heads = [[_logits(2, K, 4, 8, 8, seed=m), _logits(2, K, 4, 4, 4, seed=10 + m), _logits(2, K, 4, 2, 2, seed=20 + m)]
             for m in range(2)]
    labeled = torch.tensor([True, True])
    value = trainer.supervised_term(heads, targets, labeled, fov)
    value.backward()
    assert torch.all(heads[0][0].grad[..., :4] == 0) and torch.all(heads[0][1].grad[..., :2] == 0)
    assert heads[0][0].grad[..., 4:].abs().sum() > 0 and heads[1][0].grad[..., :4].abs().sum() > 0
    changed = [[s.detach().clone() for s in h] for h in heads]
    changed[0][0][..., :4] += 7.0
    changed[0][1][..., :2] += 7.0
    torch.testing.assert_close(trainer.supervised_term(changed, targets, labeled, fov), value.detach())


def _trainer_at(num_epochs: int, iterations: int, epoch: int, iteration: int) -> CMCTrainer:
    trainer = CMCTrainer(TrainingRequest("X", 0, 0.2, roots=WorkRoots(*(["/nonexistent"] * 3)),
                                         num_epochs=num_epochs, iterations_per_epoch=iterations))
    trainer.current_epoch, trainer.iteration, trainer.cross_modality = epoch, iteration, True
    trainer.ramps = trainer.build_ramps()
    return trainer


def test_ramps_follow_the_run_fraction_not_the_epoch_count() -> None:
    """A 10 x 5-iteration run and a 1000 x 250 one weigh the unlabeled terms alike at the same fraction."""
    for fraction in (0.1, 0.2, 0.3, 0.5, 1.0):
        short = _trainer_at(10, 5, *divmod(round(fraction * 50), 5))
        long = _trainer_at(1000, 250, *divmod(round(fraction * 250_000), 250))
        assert short.run_fraction == pytest.approx(fraction) == long.run_fraction
        assert short.unlabeled_weights() == pytest.approx(long.unlabeled_weights())
    warm = _trainer_at(1000, 250, 50, 0)  # 5 % of the run: inside the 10 % warm-up
    assert all(w == 0 for w in warm.unlabeled_weights().values())
    done = _trainer_at(10, 5, 9, 5)
    done.unlabeled_every = 1  # the ramp alone, not the every-k-th-step scale
    assert done.unlabeled_weights()["pseudo_label"] == pytest.approx(CMCTrainer.pseudo_label_weight)
    ramp = RampUp(1.0, 0.2, "linear", "fraction", start=0.1)
    assert (ramp(0.05), ramp(0.2), ramp(0.3), ramp(0.9)) == pytest.approx((0.0, 0.5, 1.0, 1.0))


def test_unlabeled_weight_zero_switches_every_unlabeled_term_off() -> None:
    trainer = _trainer_at(10, 5, 9, 0)
    trainer.unlabeled_weight = 0.0
    assert set(trainer.unlabeled_weights()) == {"pseudo_label", "csc", "cac"}
    assert all(w == 0 for w in trainer.unlabeled_weights().values())


def test_unlabeled_every_k_steps_keeps_the_mean_weight_of_every_step() -> None:
    every = _trainer_at(10, 5, 9, 0)
    each = _trainer_at(10, 5, 9, 0)
    every.unlabeled_every, each.unlabeled_every = 3, 1
    weights = []
    for step in range(6):
        every.global_step = each.global_step = step
        weights.append(every.unlabeled_weights()["pseudo_label"])
        assert each.unlabeled_weights()["pseudo_label"] == pytest.approx(CMCTrainer.pseudo_label_weight)
    assert weights == pytest.approx([3 * CMCTrainer.pseudo_label_weight, 0, 0] * 2)


def test_reliability_weights_silence_an_unreliable_head_per_class() -> None:
    good = torch.tensor([0.1, 0.8, 0.1]).reshape(1, K, 1, 1, 1)
    bad = torch.tensor([0.1, 0.1, 0.8]).reshape(1, K, 1, 1, 1)
    fov = torch.ones(1, 2, 1, 1, 1)
    assert fov_weighted_ensemble([good, bad], fov).flatten().tolist() == pytest.approx([0.1, 0.45, 0.45])
    reliability = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.01]])  # head 1 is bad at class 2
    fused = fov_weighted_ensemble([good, bad], fov, reliability)
    assert int(fused.argmax(1)) == 1 and float(fused.sum()) == pytest.approx(1.0)
    outside = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1, 1)  # head 1 out of its field of view
    assert fov_weighted_ensemble([good, bad], outside).flatten().tolist() == pytest.approx([0.1, 0.8, 0.1])


def test_masked_agreement_is_foreground_only_detached_and_fov_masked() -> None:
    target = torch.softmax(torch.randn(1, K, 2, 4, 4), 1).requires_grad_(True)
    head = torch.softmax(_logits(1, K, 2, 4, 4), 1)
    fov = torch.ones(1, 1, 2, 4, 4)
    fov[..., :2] = 0
    assert masked_agreement_loss([target.detach()], target, fov).item() == pytest.approx(0.0, abs=1e-6)
    value = masked_agreement_loss([head], target, fov)
    value.backward()
    assert target.grad is None
    changed = head.detach().clone()
    changed[..., :2] = torch.roll(changed[..., :2], 1, dims=1)  # outside the FOV
    changed[:, 0] = 1 - changed[:, 1:].sum(1)
    torch.testing.assert_close(masked_agreement_loss([changed], target, fov), value.detach())


def test_strong_view_changes_intensities_inside_fov_only() -> None:
    torch.manual_seed(0)
    image = torch.randn(3, 2, 4, 8, 8)
    fov = torch.ones(3, 2, 4, 8, 8)
    fov[:, 1, :, :, :3] = 0
    image[:, 1:2] *= fov[:, 1:2]
    x = torch.cat([image, fov], 1)
    strong = StrongIntensityAugmentation()(x, [0, 1], 2)
    assert strong.shape == x.shape
    assert torch.equal(strong[:, 2:], fov), "the FOV masks are not intensities"
    assert torch.all(strong[:, 1, :, :, :3] == 0), "outside the field of view stays empty"
    assert not torch.allclose(strong[:, :2], x[:, :2])
    dropped = StrongIntensityAugmentation(drop_modality=1.0)(x, [0, 1], 2)
    gone = dropped[:, 2:].flatten(2).amax(2) == 0
    assert gone.sum(1).tolist() == [1, 1, 1], "each row lost exactly one of its two modalities"
    for b, m in torch.nonzero(gone).tolist():
        assert torch.all(dropped[b, m] == 0)


def test_copy_paste_mixes_inputs_and_targets_with_the_same_box_through_every_slice() -> None:
    """Labeled rows hold 1 (label 1), unlabeled rows 2 (pseudo-label 2): each mixed voxel's input and target come from
    the same row, the box is the same on every slice, inward rows hold the labeled content inside it, outward rows
    outside, and every channel (FOV masks too) is mixed."""
    torch.manual_seed(0)
    labeled_x, unlabeled_x = torch.ones(1, 3, 4, 9, 12), torch.full((3, 3, 4, 9, 12), 2.0)
    labeled_y, pseudo = torch.ones(1, 1, 4, 9, 12, dtype=torch.long), torch.full((3, 1, 4, 9, 12), 2)
    mixed_x, mixed_y, pasted = copy_paste(labeled_x, labeled_y, unlabeled_x, pseudo, 2 / 3, [True, False, True])
    assert torch.equal(pasted, mixed_y == 1), "the mask says where the labeled row's content went"
    assert mixed_x.shape == unlabeled_x.shape and mixed_y.shape == pseudo.shape and mixed_y.dtype == pseudo.dtype
    assert torch.equal(mixed_x[:, :1].long(), mixed_y), "input and target come from the same row, voxel by voxel"
    assert torch.equal(mixed_x, mixed_x[:, :1].expand_as(mixed_x)), "every channel is mixed the same way"
    from_labeled = (mixed_y == 1).flatten(2).sum(2).squeeze(1).tolist()
    assert from_labeled == [4 * 6 * 8, 4 * (9 * 12 - 6 * 8), 4 * 6 * 8], "a 6 x 8 box on each of the 4 slices"
    assert torch.equal(mixed_y[:, :, :1].expand_as(mixed_y), mixed_y), "the same box through every slice"
    unchanged = copy_paste(labeled_x[:0], labeled_y[:0], unlabeled_x, pseudo, 2 / 3, [True] * 3)
    assert unchanged[0] is unlabeled_x and unchanged[1] is pseudo, "no labeled row: nothing to mix"
    assert not unchanged[2].any()


@pytest.mark.parametrize("n_labeled, forced", [(1, 1), (2, 1), (3, 1), (4, 1), (12, 4)])
def test_foreground_oversampling_forces_at_least_one_row(n_labeled: int, forced: int) -> None:
    """nnU-Net forces no row in a batch of one; cmcseg forces the last round(n p) rows, at least one."""
    cropper = PatchCropper([8, 8, 8], [8, 8, 8], 0.33)
    flags = [cropper.force_foreground(i, n_labeled) for i in range(n_labeled)]
    assert sum(flags) == forced and flags[-1]
    assert not any(PatchCropper([8, 8, 8], [8, 8, 8], 0.0).force_foreground(i, 4) for i in range(4))


def test_gaussian_blur_of_a_thin_patch_does_not_raise() -> None:
    """Thick-slice cardiac plans give patches of 2-3 slices; nnU-Net's blur (sigma up to 1) would fail to pad them."""
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    from cmcseg.training.augmentation import ShortAxisSafeGaussianBlur

    nnunet = GaussianBlurTransform(blur_sigma=(1.0, 1.0), synchronize_channels=False, synchronize_axes=False,
                                   p_per_channel=1.0, benchmark=True)
    image = torch.rand(2, 3, 16, 16)
    with pytest.raises(RuntimeError):
        nnunet(image=image.clone())
    out = ShortAxisSafeGaussianBlur.replacing(nnunet)(image=image.clone())["image"]
    assert out.shape == image.shape and not torch.allclose(out, image)
    long = torch.rand(1, 12, 16, 16)
    torch.manual_seed(0)
    expected = nnunet(image=long.clone())["image"]
    torch.manual_seed(0)
    torch.testing.assert_close(ShortAxisSafeGaussianBlur.replacing(nnunet)(image=long.clone())["image"], expected)


def test_teacher_horizon_is_a_fraction_of_the_run() -> None:
    assert _trainer_at(1000, 250, 0, 0).teacher_alpha == CMCTrainer.ema_alpha  # long run: the configured 0.99
    short = _trainer_at(10, 30, 0, 0)  # 300 iterations: horizon 15
    assert short.teacher_alpha == pytest.approx(1 - 1 / 15)


def test_unlearned_classes_merge_into_background_and_their_labels_are_ignored() -> None:
    """A class the head has not learned is never pushed down by background pseudo-labels: its probability counts as
    background, and its own pseudo-labels are ignored; learned classes keep their labels, renumbered."""
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3])).reshape(1, K, 1, 1, 1).repeat(1, 1, 1, 1, 4)
    target = torch.tensor([0, 1, 2, IGNORE]).reshape(1, 1, 1, 1, 4)
    learned = torch.tensor([True, False, True])  # class 1 not learned yet
    merged, renumbered = merge_unlearned(logits, target, learned, IGNORE)
    assert merged.shape == (1, 2, 1, 1, 4)
    assert torch.softmax(merged, 1)[0, :, 0, 0, 0].tolist() == pytest.approx([0.7, 0.3])  # bg + class 1, class 2
    assert renumbered.flatten().tolist() == [0, IGNORE, 1, IGNORE]
    # the loss: a background label no longer penalises mass on the unlearned class
    student = _logits(1, K, 2, 4, 4, seed=3)
    background = torch.zeros(1, 1, 2, 4, 4, dtype=torch.long)
    plain = PseudoLabelLoss(IGNORE)([student], background)
    marginal = PseudoLabelLoss(IGNORE)([student], background, learned=learned.reshape(1, K))
    assert float(marginal) < float(plain)
    marginal.backward()
    probabilities = torch.softmax(student.detach(), 1)
    step = student.detach() - 10.0 * student.grad  # a gradient step raises background + class 1 together
    assert float(torch.softmax(step, 1)[:, :2].sum(1).mean()) > float(probabilities[:, :2].sum(1).mean())
    everything = PseudoLabelLoss(IGNORE)([student], background, learned=torch.ones(1, K, dtype=torch.bool))
    assert float(everything) == pytest.approx(float(plain))


def test_confusion_candidates_list_the_classes_a_prediction_stands_for() -> None:
    """confusion[true, predicted]: of the 95 voxels predicted 2, 30 are class 1 (32 %) and 5 background (5 %). At a
    share of 0.2 a 2 stands for {1, 2}, at 0.04 for {0, 1, 2}; 0 and 1 always stand for themselves alone."""
    confusion = torch.tensor([[100.0, 0.0, 5.0], [0.0, 50.0, 30.0], [0.0, 0.0, 60.0]])
    expected = torch.tensor([[True, False, False], [False, True, False], [False, True, True]])
    assert torch.equal(confusion_candidates(confusion, 0.2), expected)
    assert torch.equal(confusion_candidates(confusion, 0.0), torch.eye(K, dtype=torch.bool)), "0 is off"
    low = expected.clone()
    low[2, 0] = True
    assert torch.equal(confusion_candidates(confusion, 0.04), low)
    assert torch.equal(confusion_candidates(torch.zeros(K, K), 0.2), torch.eye(K, dtype=torch.bool)), \
        "a class never predicted stands for itself"


def test_grouped_candidates_join_the_classes_of_each_group() -> None:
    expected = torch.eye(4, dtype=torch.bool)
    expected[2, 3] = expected[3, 2] = True
    assert torch.equal(grouped_candidates([(2, 3)], 4), expected)
    assert torch.equal(grouped_candidates([], 4), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must lie in 0..3"):
        grouped_candidates([(2, 4)], 4)


def test_a_set_valued_pseudo_label_does_not_teach_one_candidate_over_another() -> None:
    """A student sure of class 1 on voxels the teacher calls 2, where 2 stands for {1, 2}: their CE is ~0 and they
    leave the Dice term, so the gradient does not push class 1 down there; a hard label does. Pasted (labeled)
    voxels keep their hard label, and identity candidates give the plain loss exactly."""
    student = torch.full((1, K, 1, 2, 4), -8.0)
    student[:, 1] = 8.0  # class 1, confidently, everywhere
    student.requires_grad_(True)
    pseudo = torch.full((1, 1, 1, 2, 4), 2)
    candidates = torch.tensor([[True, False, False], [False, True, False], [False, True, True]])
    plain = PseudoLabelLoss(IGNORE)([student], pseudo)
    identity = PseudoLabelLoss(IGNORE)([student], pseudo, candidates=torch.eye(K, dtype=torch.bool))
    assert float(identity.detach()) == pytest.approx(float(plain.detach()))
    sets = PseudoLabelLoss(IGNORE)([student], pseudo, candidates=candidates)
    assert float(sets.detach()) < float(plain.detach()) - 10.0, "the CE of '1 or 2' for a sure 1 is about 0, not 16"
    sets.backward()
    assert student.grad is not None and float(student.grad.abs().max()) < 1e-3
    pasted = torch.zeros(1, 1, 1, 2, 4, dtype=torch.bool)
    pasted[..., 0, :] = True  # the first row of voxels holds a labeled row's true 2s
    student.grad = None
    mixed = PseudoLabelLoss(IGNORE)([student], pseudo, candidates=candidates, from_teacher=~pasted)
    mixed.backward()
    assert float(mixed.detach()) > 5.0, "a true label is not a set: the pasted 2s still cost a confident 1"
    assert float(student.grad[0, 1, 0, 0].abs().min()) > 1e-3 and float(student.grad[0, 1, 0, 1].abs().max()) < 1e-3


def test_background_pseudo_labels_wait_until_every_foreground_class_is_learned() -> None:
    labels = torch.tensor([0, 1, 2, IGNORE, 0])[None, None]
    held, taught = hold_background(labels, torch.tensor([0.9, 0.8, 0.2]), 0.5, IGNORE)
    assert not taught and held.flatten().tolist() == [IGNORE, 1, 2, IGNORE, IGNORE]  # class 2 not learned yet
    kept, taught = hold_background(labels, torch.tensor([0.9, 0.8, 0.6]), 0.5, IGNORE)
    assert taught and torch.equal(kept, labels)
    always, taught = hold_background(labels, torch.tensor([0.9, 0.0, 0.0]), 0.0, IGNORE)  # bar 0: always taught
    assert taught and torch.equal(always, labels)


def test_shared_encoder_without_branches_is_a_clear_error() -> None:
    """The default CMC network has no branches to share an encoder between: say so, and name the trainer that has."""
    trainer = CMCTrainer(TrainingRequest("X", 0, 0.2, roots=WorkRoots(*(["/nonexistent"] * 3)), shared_encoder=True))
    with pytest.raises(CmcsegError, match="--trainer cmc_branches"):
        trainer.build_network()
