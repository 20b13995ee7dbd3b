"""Training data: two-stream sampler, augmentation with FOV masks, training batches, validation patches."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from cmcseg.plans.plans import plan_num_classes
from cmcseg.preprocessing.storage import write_case
from cmcseg.training.augmentation import configure_spatial_augmentation, deep_supervision_scales, training_transforms
from cmcseg.training.data import (
    IGNORE_VALUE,
    build_training_loader,
    build_validation_patches,
    input_channels,
    plan_deep_supervision_scales,
)
from cmcseg.training.sampler import TwoStreamBatchSampler

SHAPE = (12, 72, 72)
LABELED = ["case00", "case01", "case02", "case03"]  # case03: modality 1 missing (unpaired-style)
UNLABELED = ["case04", "case05"]  # no label on disk
STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]


def _plans() -> dict:
    """A plans.json as `cmcseg plan` writes it, reduced to what the data loaders read."""
    def config(identifier: str, patch: list[int], strides: list[list[int]], mask: list[bool]) -> dict:
        return {"data_identifier": identifier, "patch_size": patch, "batch_size": 4, "use_mask_for_norm": mask,
                "architecture": {"arch_kwargs": {"strides": strides}}}
    return {
        "labels": {"background": 0, "ring": 1, "core": 2},
        "pairing": "paired",
        "channels_per_modality": {"0": 1, "1": 1},
        "transpose_forward": [0, 1, 2],
        "configurations": {
            "3d_fullres": config("3d_fullres", [8, 32, 32], STRIDES_3D, [False, False]),
            "3d_masked": config("3d_fullres", [8, 32, 32], STRIDES_3D, [True, False]),
            "2d": config("2d", [32, 32], [[1, 1], [2, 2], [2, 2]], [False, False]),
        },
    }


def _case(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Two-modality case with a small two-label blob off-centre (random patches often miss it)."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    cz, cy, cx = 6, 10 + 3 * index, 60 - 2 * index
    r2 = ((y - cy) ** 2 + (x - cx) ** 2) / 16 + (z - cz) ** 2 / 4
    seg = np.where(r2 < 0.3, 2, np.where(r2 < 1, 1, 0)).astype(np.int8)[None]
    fov = np.ones((2, *SHAPE), dtype=np.uint8)
    fov[1, :2] = 0
    fov[1, :, 66:] = 0
    if index == 3:
        fov[1] = 0
    data = rng.normal(0, 1, (2, *SHAPE)).astype(np.float32) + 2 * (seg > 0)
    data[fov == 0] = 0
    return data, seg, fov


@pytest.fixture(scope="session")
def preprocessed(tmp_path_factory) -> tuple[Path, dict]:
    """A preprocessed dataset folder (3d_fullres and 2d) written with preprocessing.storage, as `cmcseg plan` does."""
    folder = tmp_path_factory.mktemp("pre") / "Dataset950_Loader"
    plans = _plans()
    rng = np.random.default_rng(0)
    for i, case_id in enumerate(LABELED + UNLABELED):
        data, seg, fov = _case(rng, i)
        props = {"case_id": case_id, "labeled": case_id in LABELED}
        if case_id in LABELED:
            locations = DefaultPreprocessor._sample_foreground_locations(seg, [1, 2], seed=1234)
            props["class_locations"] = {str(k): np.asarray(v).tolist() for k, v in locations.items()}
        else:
            seg = None
        for cfg in ("3d_fullres", "2d"):
            write_case(folder / cfg, case_id, data, seg, fov, props, plans["configurations"][cfg]["patch_size"])
    return folder, plans


def _has_foreground(target: torch.Tensor) -> bool:
    return bool((target > 0).any())


# ------------------------------------------------------------------------------------- sampler
def test_sampler_composition_coverage_and_endless_unlabeled() -> None:
    labeled, unlabeled = list(range(6)), list(range(100, 103))
    sampler = TwoStreamBatchSampler(labeled, unlabeled, 2, 3, seed=1)
    assert len(sampler) == 3
    streamed = []
    for _ in range(5):  # five passes: the 3 unlabeled indices run out and are reshuffled many times
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for b in batches:
            assert len(b) == 5 and set(b[:2]) <= set(labeled) and set(b[2:]) <= set(unlabeled)
            streamed.extend(b[2:])
        assert sorted(i for b in batches for i in b[:2]) == labeled  # each labeled index once per pass
    assert len(streamed) == 45
    for k in range(0, 45, 3):  # a fresh permutation every time they run out
        assert sorted(streamed[k:k + 3]) == unlabeled


def test_sampler_reshuffles_is_deterministic_and_tops_up() -> None:
    a, b = TwoStreamBatchSampler(range(8), range(8, 20), 2, 2, seed=3), TwoStreamBatchSampler(
        range(8), range(8, 20), 2, 2, seed=3)
    passes_a, passes_b = [list(a) for _ in range(3)], [list(b) for _ in range(3)]
    assert passes_a == passes_b
    assert passes_a[0] != passes_a[1]  # labeled reshuffled each pass
    assert list(TwoStreamBatchSampler(range(8), range(8, 20), 2, 2, seed=4)) != passes_a[0]
    odd = TwoStreamBatchSampler(range(5), [], 2, 0)  # 5 labeled, batches of 2: 3 batches, last topped up
    batches = list(odd)
    assert len(odd) == 3 and all(len(x) == 2 for x in batches)
    assert set(i for x in batches for i in x) == set(range(5))
    tiny = list(TwoStreamBatchSampler([7], [], 3, 0))  # fewer labeled cases than one batch
    assert tiny == [[7, 7, 7]]


def test_sampler_supervised_and_errors() -> None:
    batches = list(TwoStreamBatchSampler(range(4), [], 2, 0))
    assert all(len(b) == 2 for b in batches) and sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        TwoStreamBatchSampler(range(4), [], 2, 1)
    with pytest.raises(ValueError):
        TwoStreamBatchSampler([], range(3), 2, 1)


# ------------------------------------------------------------------------------------- augmentation
def _aligned_sample(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two identical modality channels equal to an object indicator; label and both FOVs = the object."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]
    obj = (((z - c[0]) / (shape[0] / 3)) ** 2 + ((y - c[1] - 3) / 9) ** 2 + ((x - c[2] + 2) / 6) ** 2) < 1
    image = torch.from_numpy(np.stack([obj, obj]).astype(np.float32))
    seg = torch.from_numpy(np.stack([obj, obj, obj]).astype(np.int16))
    return image, seg


@pytest.mark.parametrize("patch", [(8, 32, 32), (20, 20, 20)])  # nnU-Net's dummy-2D and full 3D rotation
def test_spatial_augmentation_keeps_modalities_and_fov_aligned(patch: tuple[int, ...]) -> None:
    aug = configure_spatial_augmentation(patch)
    assert aug.do_dummy_2d == (patch == (8, 32, 32))
    transforms = training_transforms(aug, None, [0, 1], spatial_only=True)
    spatial = next(t for t in transforms.transforms if isinstance(t, SpatialTransform))
    spatial.p_rotation, spatial.p_scaling = 1.0, 1.0  # every sample rotated and scaled, not merely cropped
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(15):
        image, seg = _aligned_sample(aug.initial_patch_size)
        out = transforms(image=image, segmentation=seg)
        img, label = out["image"], out["segmentation"]
        assert img.shape == (4, *patch) and label.shape == (1, *patch)
        assert torch.equal(img[0], img[1])  # same spatial transform for both modalities
        fov = img[2:]
        assert set(fov.unique().tolist()) <= {0.0, 1.0}  # binary after interpolation
        assert torch.equal(fov[0], fov[1]) and torch.equal(fov[0], (label[0] > 0).float())  # with the object
        assert fov[0].sum() > 0
        inside = fov[0] > 0
        assert bool((img[0][~inside] == 0).all()) and float(img[0][inside].min()) > 0.45


def test_full_augmentation_keeps_fov_binary_and_masks_channels() -> None:
    aug = configure_spatial_augmentation((8, 32, 32))
    transforms = training_transforms(aug, deep_supervision_scales(STRIDES_3D), [0, 1])
    torch.manual_seed(1)
    np.random.seed(1)
    for _ in range(15):
        image, seg = _aligned_sample(aug.initial_patch_size)
        image = image + 0.5  # nonzero background: intensity transforms would leak outside the FOV
        out = transforms(image=image, segmentation=seg)
        img, targets = out["image"], out["segmentation"]
        assert [tuple(t.shape[1:]) for t in targets] == [(8, 32, 32), (8, 16, 16)]
        fov = img[2:]
        assert set(fov.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(fov[0], fov[1]) and torch.equal(fov[0], (targets[0][0] > 0).float())
        for c in range(2):  # no intensity transform touched the masks; channels are 0 outside them
            assert bool((img[c][fov[c] == 0] == 0).all())


# ------------------------------------------------------------------------------------- batches
def test_plan_helpers(preprocessed) -> None:
    _, plans = preprocessed
    assert input_channels(plans) == 4
    assert plan_num_classes(plans) == 3
    assert plan_num_classes({**plans, "labels": {**plans["labels"], "ignore": 3}}) == 3
    assert plan_deep_supervision_scales(plans, "3d_fullres") == [[1, 1, 1], [1, 0.5, 0.5]]  # bottleneck dropped


def test_training_batches_shapes_targets_and_oversampling(preprocessed) -> None:
    folder, plans = preprocessed
    # case00 is passed as unlabeled: its label on disk must not be used
    loader = build_training_loader(folder, plans, "3d_fullres", LABELED[1:], UNLABELED + ["case00"], 2, 2,
                                   oversample_foreground_percent=0.5, num_workers=0, seed=0, augment=False)
    scales = plan_deep_supervision_scales(plans, "3d_fullres")
    forced, random_rows = [], []
    with loader:
        for _ in range(12):
            batch = next(loader)
            data, targets = batch["data"], batch["target"]
            assert data.shape == (4, 4, 8, 32, 32) and data.dtype == torch.float32
            assert set(data[:, 2:].unique().tolist()) <= {0.0, 1.0}
            assert len(targets) == len(scales)
            for t, s in zip(targets, scales):
                assert t.shape == (4, 1, *[round(p * f) for p, f in zip((8, 32, 32), s)])
                assert not t.is_floating_point()
                assert bool((t[2:] == IGNORE_VALUE).all())  # unlabeled rows
                assert bool((t[:2] >= 0).all())
            assert batch["labeled"].tolist() == [True, True, False, False]
            assert set(batch["keys"][:2]) <= set(LABELED[1:]) and set(batch["keys"][2:]) <= {*UNLABELED, "case00"}
            random_rows.append(_has_foreground(targets[0][0]))
            forced.append(_has_foreground(targets[0][1]))  # round(2 * 0.5) = 1: the last labeled item
    assert all(forced)
    assert sum(random_rows) < len(random_rows)  # the blob is small: random patches miss it at times


def test_augmented_batches_rate_2d_and_masked_configuration(preprocessed) -> None:
    folder, plans = preprocessed
    loader = build_training_loader(folder, plans, "3d_fullres", LABELED, UNLABELED, 3, 1,
                                   oversample_foreground_percent=0.33, num_workers=0, seed=2)
    rows = []
    with loader:
        for _ in range(8):
            batch = next(loader)
            rows.append([_has_foreground(batch["target"][0][j]) for j in range(3)])
            assert bool((batch["target"][0][3] == IGNORE_VALUE).all())
    assert np.mean([r[2] for r in rows]) >= 0.85  # the forced position, after rotation/scaling

    flat = build_training_loader(folder, plans, "2d", LABELED, UNLABELED, 2, 2, num_workers=0,
                                 deep_supervision=False)
    with flat:
        batch = next(flat)
    assert batch["data"].shape == (4, 4, 32, 32) and batch["target"].shape == (4, 1, 32, 32)
    assert bool((batch["target"][2:] == IGNORE_VALUE).all())

    masked = build_training_loader(folder, plans, "3d_masked", LABELED, UNLABELED, 2, 2, num_workers=0)
    with masked:
        batch = next(masked)
    assert batch["data"].shape == (4, 4, 8, 32, 32)


def test_training_batches_are_seeded(preprocessed) -> None:
    folder, plans = preprocessed

    def first(seed: int) -> dict:
        with build_training_loader(folder, plans, "3d_fullres", LABELED, UNLABELED, 2, 2, num_workers=0,
                                   seed=seed) as loader:
            return next(loader)

    a, b, c = first(5), first(5), first(6)
    assert torch.equal(a["data"], b["data"]) and a["keys"] == b["keys"]
    assert not torch.equal(a["data"], c["data"])


def test_validation_patches_are_fixed(preprocessed) -> None:
    folder, plans = preprocessed
    first = build_validation_patches(folder, plans, "3d_fullres", LABELED[:2], num_patches=10, seed=0)
    second = build_validation_patches(folder, plans, "3d_fullres", LABELED[:2], num_patches=10, seed=0)
    assert [len(b["keys"]) for b in first] == [4, 4, 2]
    for x, y in zip(first, second):
        assert torch.equal(x["data"], y["data"]) and x["keys"] == y["keys"]
        assert all(torch.equal(s, t) for s, t in zip(x["target"], y["target"]))
        assert bool(x["labeled"].all())
    for b in first:  # nnU-Net's rule: the last round(B * 0.33) items hold foreground
        n = len(b["keys"])
        for j in range(n):
            if not j < round(n * (1 - 0.33)):
                assert _has_foreground(b["target"][0][j])


# ------------------------------------------------------------------------------------- throughput
def test_data_wait_with_background_workers(preprocessed, capsys) -> None:
    """Measured, not asserted: how long the loop waits for a batch next to a 0.2 s training step.

    Also checks that batches do not depend on the number of workers (each is seeded by its number).
    """
    folder, plans = preprocessed
    with build_training_loader(folder, plans, "3d_fullres", LABELED, UNLABELED, 2, 2, num_workers=0,
                               seed=9) as loader:
        start = time.perf_counter()
        reference = [next(loader) for _ in range(4)]
        in_process = (time.perf_counter() - start) / 4
    lines = [f"batch build in process: {in_process * 1000:.0f} ms"]
    for workers in (1, 2):
        with build_training_loader(folder, plans, "3d_fullres", LABELED, UNLABELED, 2, 2, num_workers=workers,
                                   seed=9) as loader:
            start = time.perf_counter()
            batches = [next(loader)]
            startup = time.perf_counter() - start
            waits = []
            for _ in range(10):
                time.sleep(0.2)  # the training step
                start = time.perf_counter()
                batches.append(next(loader))
                waits.append(time.perf_counter() - start)
        for x, y in zip(reference, batches):
            assert torch.equal(x["data"], y["data"]) and x["keys"] == y["keys"]
        lines.append(f"num_workers={workers}: first batch {startup * 1000:.0f} ms, then mean wait "
                     f"{np.mean(waits) * 1000:.1f} ms, max {np.max(waits) * 1000:.1f} ms per 0.2 s step")
    with capsys.disabled():
        print("\n[data wait] " + "\n[data wait] ".join(lines))
