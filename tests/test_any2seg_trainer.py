"""Any2Seg trainer tests: batch plumbing, the subset table, learning from every single modality,
the CLI run that writes the table, --continue, and prediction with a modality missing.

They train on the tiny DELIVER phantom (2D scenes, RGB/depth/event/lidar, 64 x 64), planned
once per module, with :class:`TinyAny2SegTrainer`: the real trainer on the unpublished ``tiny``
MiT (an iteration is a few hundredths of a second). Subprocess-free CLI runs load it as
``--trainer test_any2seg_trainer:TinyAny2SegTrainer`` (this folder is on sys.path under pytest).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from cmcseg.checkpoint import load_checkpoint
from cmcseg.cli.main import main as cli_main
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_json
from cmcseg.networks.any2seg import (
    Any2SegModel,
    Any2SegProbabilities,
    SubsetProbabilities,
    fov_presence,
    modality_images,
)
from cmcseg.paths import WorkRoots
from cmcseg.plans.plans import LabelInfo
from cmcseg.prediction.model import build_inference_networks, load_trained_model
from cmcseg.preprocessing.storage import load_case
from cmcseg.sliding_window import predict_case
from cmcseg.training.any2seg_trainer import Any2SegTrainer
from cmcseg.training.registry import get_trainer_class
from cmcseg.training.subset_validation import SubsetScores, evaluate_subsets, scored_classes, write_subset_table
from cmcseg.training.trainer import TrainingRequest

DATASET = "Dataset505_DELIVER"
MODALITIES = ("RGB", "depth", "event", "lidar")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TinyAny2SegTrainer(Any2SegTrainer):
    """Any2SegTrainer with the tiny MiT, in-process data loading and short ramp-ups."""

    num_workers = 0
    backbone_variant = "tiny"
    scratch_lr = 1e-3
    lscd_rampup = 0.5
    consistency_rampup = 0.5
    lscd_affinity_size = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> WorkRoots:
    """The tiny DELIVER phantom, synthesised and planned (2d) once for this module."""
    base = tmp_path_factory.mktemp("any2seg_roots")
    roots = WorkRoots(base / "raw", base / "preprocessed", base / "results")
    assert cli_main(["synth", "-d", "DELIVER", "--size", "tiny", *flags(roots)]) == 0
    assert cli_main(["plan", "-d", "DELIVER", "-c", "2d", "-np", "1", *flags(roots)]) == 0
    return roots


def flags(roots: WorkRoots) -> list[str]:
    return ["--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed), "--results", str(roots.results)]


def request(roots: WorkRoots, tmp_path: Path, **kwargs) -> TrainingRequest:
    own = WorkRoots(roots.raw, roots.preprocessed, tmp_path / "results")
    defaults = dict(configuration="2d", num_epochs=2, iterations_per_epoch=2, val_iterations=1, device="cpu",
                    num_workers=0)
    defaults.update(kwargs)
    return TrainingRequest("DELIVER", 0, 1.0, roots=own, **defaults)


def validation_folder(roots: WorkRoots) -> tuple[Path, list[str]]:
    splits = read_json(roots.preprocessed / DATASET / "splits.json")
    return roots.preprocessed / DATASET / "2d", list(splits["folds"][0]["val"])


# ------------------------------------------------------------------------------------------ plumbing
def test_pipeline_input_becomes_modality_images_and_presence_follows_the_fov() -> None:
    rgb, depth = torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    fov = torch.ones(2, 2, 8, 8)
    fov[1, 1] = 0                                                               # row 1: depth out of view
    x = torch.cat([rgb, depth, fov], dim=1)
    images = modality_images(x, [3, 1], in_channels=3)
    assert images.shape == (2, 2, 3, 8, 8)
    assert torch.equal(images[:, 0], rgb) and torch.equal(images[:, 1], depth.expand(-1, 3, -1, -1))
    assert fov_presence(x, [3, 1]).tolist() == [[True, True], [True, False]]
    x[:, 4:] = 0                                                                # nothing in view: all count
    assert fov_presence(x, [3, 1]).all()


def test_probabilities_restricted_to_a_subset_ignore_the_other_modalities() -> None:
    torch.manual_seed(0)
    model = Any2SegModel(num_classes=3, num_modalities=2, variant="tiny").eval()
    wrapper = Any2SegProbabilities(model, [3, 1], subset=[1])
    x = torch.cat([torch.rand(1, 4, 32, 32), torch.ones(1, 2, 32, 32)], dim=1)
    with torch.no_grad():
        expected = torch.softmax(model(modality_images(x, [3, 1], 3), torch.tensor([[False, True]])).logits, 1)
        got = wrapper(x)
        x[:, :3] = torch.rand(1, 3, 32, 32)                                     # change RGB: no effect
        assert torch.allclose(wrapper(x), got, atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ subset table
def test_subset_table_has_one_row_per_subset_and_scores_what_each_subset_sees(planned: WorkRoots,
                                                                              tmp_path: Path) -> None:
    """A stand-in network that is perfect when RGB is in the subset and predicts background otherwise."""
    folder, val_ids = validation_folder(planned)
    labels = LabelInfo.from_plans(read_json(planned.preprocessed / DATASET / "plans.json"))
    references = {case_id: torch.from_numpy(np.asarray(load_case(folder, case_id)[1][:], dtype=np.int64))
                  for case_id in val_ids}

    def predictor_for(subset):
        def predict(x):
            reference = next(r for r in references.values() if r.shape[-2:] == x.shape[-2:])
            index = reference[0, :1].expand(x.shape[0], -1, -1)[:, None] if 0 in subset else \
                torch.zeros(x.shape[0], 1, *x.shape[-2:], dtype=torch.int64)
            return torch.zeros(x.shape[0], labels.num_classes, *x.shape[-2:]).scatter_(1, index, 1.0)
        return predict

    table = evaluate_subsets(predictor_for, folder, val_ids[:1], [64, 64], labels, MODALITIES, torch.device("cpu"),
                             "miou")
    assert len(table) == 15 and table["subset"].is_unique
    assert table["num_modalities"].value_counts().sort_index().tolist() == [4, 6, 4, 1]
    with_rgb = table["subset"].str.split("+").map(lambda names: "RGB" in names)
    assert np.allclose(table.loc[with_rgb, "mean"], 1.0) and np.allclose(table.loc[~with_rgb, "mean"], 0.0)
    csv_path, png_path = write_subset_table(table, tmp_path, "miou")
    assert pd.read_csv(csv_path).shape == (15, 3 + len(labels.names))
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_miou_sums_counts_over_cases_and_dice_averages_cases() -> None:
    labels = LabelInfo(("a",), (1,), 2, None)
    reference = [np.array([[[1, 1, 0, 0]]]), np.array([[[1, 0, 0, 0]]])]
    predicted = [torch.tensor([[[1, 0, 0, 0]]]), torch.tensor([[[1, 0, 0, 0]]])]
    scores = {metric: SubsetScores(labels, metric) for metric in ("miou", "dice")}
    for ref, pred in zip(reference, predicted):
        onehot = torch.nn.functional.one_hot(pred, 2).movedim(-1, 0).float()
        for s in scores.values():
            s.add(onehot, ref)
    assert scores["miou"].scores()["a"] == pytest.approx(2 / 3)                 # TP 2, FN 1 over both cases
    assert scores["dice"].scores()["a"] == pytest.approx((2 / 3 + 1.0) / 2)     # per case, then the mean


# ------------------------------------------------------------------------------------------ learning
def test_with_modality_dropout_every_single_modality_scores_clearly_above_chance(planned: WorkRoots,
                                                                                 tmp_path: Path) -> None:
    trainer = TinyAny2SegTrainer(request(planned, tmp_path, num_epochs=15, iterations_per_epoch=10, seed=0))
    output = trainer.run()
    table = pd.read_csv(output / "validation" / "subsets.csv")
    assert len(table) == 15
    # chance: a seeded uniform-random prediction scored the same way on the same cases
    folder, val_ids = validation_folder(planned)
    classes = scored_classes(trainer.plans, "miou")
    assert list(table.columns[2:-1]) == ["background", "road", "sidewalk", "building", "car", "pedestrian"]
    chance = SubsetScores(classes, "miou")
    generator = torch.Generator().manual_seed(0)
    for case_id in val_ids:
        seg = load_case(folder, case_id)[1][:]
        guess = torch.randint(classes.num_classes, seg.shape, generator=generator)
        chance.add(torch.nn.functional.one_hot(guess[0], classes.num_classes).movedim(-1, 0).float(), seg)
    chance_miou = float(np.nanmean(list(chance.scores().values())))
    singles = table[table["num_modalities"] == 1].set_index("subset")["mean"]
    assert list(singles.index) == list(MODALITIES)
    assert (singles > 2 * chance_miou).all() and (singles > chance_miou + 0.1).all(), (singles, chance_miou)


# ------------------------------------------------------------------------------------------ CLI, resume, predict
def test_cli_train_writes_the_subset_table_and_predict_handles_missing_modalities(planned: WorkRoots,
                                                                                tmp_path: Path) -> None:
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")
    assert cli_main(["train", "-d", "DELIVER", "-f", "0", "-c", "2d", "--trainer",
                     "test_any2seg_trainer:TinyAny2SegTrainer", "--epochs", "2", "--iters-per-epoch", "2",
                     "--modality-dropout", "0.7", "--device", "cpu", "-np", "0", *flags(roots)]) == 0
    model = roots.results / DATASET / "TinyAny2SegTrainer__2d__labeled1.0"
    fold = model / "fold_0"
    for name in ("checkpoint_final.pt", "progress.png", "log.txt", "validation/summary.json",
                 "validation/subsets.csv", "validation/subsets.png"):
        assert (fold / name).is_file(), name
    assert len(pd.read_csv(fold / "validation" / "subsets.csv")) == 15
    state = load_checkpoint(fold / "checkpoint_final.pt")
    assert state["init"]["backbone"] == "tiny" and state["init"]["mirror_axes"] == [1]  # scenes stay upright
    assert read_json(fold / "training_config.json")["hyperparameters"]["modality_dropout"] == 0.7

    # predict: scene0001 with RGB only, scene0002 complete
    images = tmp_path / "input"
    images.mkdir()
    raw = roots.raw / DATASET / "imagesTr"
    shutil.copy(raw / "scene0001_0000.png", images)
    for c in range(4):
        shutil.copy(raw / f"scene0002_{c:04d}.png", images)
    out = tmp_path / "out"
    assert cli_main(["predict", "-i", str(images), "-o", str(out), "-m", str(model), "--no-tta", "--device", "cpu",
                     *flags(roots)]) == 0
    for case_id in ("scene0001", "scene0002"):
        written = sitk.ReadImage(str(out / f"{case_id}.png"))
        assert written.GetSize() == sitk.ReadImage(str(raw / f"{case_id}_0000.png")).GetSize()
    # the RGB-only case is segmented as the model restricted to RGB segments the preprocessed case
    loaded = build_inference_networks(load_trained_model(model), torch.device("cpu"))[0]
    rgb_only = Any2SegProbabilities(loaded.network, loaded.channels_per_modality, subset=[0])
    data, _, fov, _ = load_case(planned.preprocessed / DATASET / "2d", "scene0001")
    with torch.no_grad():
        expected = predict_case(rgb_only, data[:], fov[:], [64, 64], torch.device("cpu")).argmax(0)[0].numpy()
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scene0001.png")))
    assert got.shape == expected.shape and (got == expected).mean() > 0.99


def test_continue_restores_the_ema_teacher_and_the_lscd_projection(planned: WorkRoots, tmp_path: Path) -> None:
    first = TinyAny2SegTrainer(request(planned, tmp_path, num_epochs=1))
    first.run()
    saved = load_checkpoint(first.output_folder / "checkpoint_latest.pt")
    resumed = TinyAny2SegTrainer(request(planned, tmp_path, num_epochs=2, continue_training=True))
    resumed.initialize()
    try:
        assert resumed.current_epoch == 1
        assert torch.equal(resumed.lscd.projection.weight.cpu(), saved["extra"]["lscd"]["projection.weight"])
        # the target's EMA projection: moved after each step (step 0 copies P, step 1 mixes), saved and restored
        ema = saved["extra"]["lscd"]["ema_projection.weight"]
        assert torch.equal(resumed.lscd.ema_projection.weight.cpu(), ema)
        assert not torch.equal(ema, saved["extra"]["lscd"]["projection.weight"])
        assert not resumed.lscd.ema_projection.weight.requires_grad
        for key, value in saved["extra"]["ema_teacher"].items():
            assert torch.equal(resumed.ema_teacher.model.state_dict()[key].cpu(), value), key
        assert len(resumed.optimizer.param_groups) == 2                         # the network and the projection
        assert torch.equal(resumed.dropout_generator.get_state(), saved["extra"]["dropout_rng"])
        assert not torch.equal(saved["extra"]["dropout_rng"], torch.Generator().manual_seed(resumed.seed).get_state())
    finally:
        resumed.close()


def test_any2seg_is_registered_and_refuses_a_3d_configuration(tmp_path: Path) -> None:
    assert get_trainer_class("any2seg") is Any2SegTrainer
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    roots = WorkRoots(raw, pre, tmp_path / "results")
    assert cli_main(["synth", "-d", "TAO", "--size", "tiny", *flags(roots)]) == 0
    assert cli_main(["plan", "-d", "TAO", "-c", "3d_fullres", "-np", "1", *flags(roots)]) == 0
    trainer = TinyAny2SegTrainer(TrainingRequest("TAO", 0, 1.0, configuration="3d_fullres", roots=roots,
                                                 device="cpu"))
    with pytest.raises(CmcsegError, match="-c 2d"):
        trainer.initialize()
    trainer.close()


def test_a_local_languagebind_teacher_gives_the_inter_modal_target(planned: WorkRoots, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from test_any2seg_model import _tiny_clip_folder

    _tiny_clip_folder(tmp_path / "lb" / "LanguageBind_Image")
    _tiny_clip_folder(tmp_path / "lb" / "LanguageBind_Depth")
    trainer = TinyAny2SegTrainer(request(planned, tmp_path, num_epochs=1, iterations_per_epoch=1,
                                         teacher="languagebind", teacher_weights=tmp_path / "lb"))
    trainer.initialize()
    try:
        assert trainer.teacher.has_image_encoder and tuple(trainer.anchors.shape) == (6, 12)
        assert trainer.teacher.device == trainer.device
        assert all(p.device == trainer.device for towers in trainer.teacher.towers.values()
                   for p in towers.vision_model.parameters())
        targets = []
        original = trainer.lscd.embedding_log_probs
        monkeypatch.setattr(trainer.lscd, "embedding_log_probs",
                            lambda *a, **k: targets.append(original(*a, **k)) or targets[-1])
        losses = trainer.train_step(next(trainer.dataloader))
        assert len(targets) == 1 and targets[0].shape == (trainer.labeled_batch_size, 6)
        assert np.isfinite(losses["lscd_inter"]) and losses["lscd_inter"] > 0
        assert trainer.lscd.correlation_weight == trainer.lscd_correlation_weight == 1.0
        assert np.isfinite(losses["lscd_correlation"]) and losses["lscd_correlation"] >= 0   # logged like the others
    finally:
        trainer.close()


def test_the_language_teacher_is_built_on_the_training_device(planned: WorkRoots, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the teacher must encode where the batch lies; on this CPU-only test the device is passed through."""
    import cmcseg.training.any2seg_trainer as any2seg_trainer

    calls: list[dict] = []
    original = any2seg_trainer.build_teacher
    monkeypatch.setattr(any2seg_trainer, "build_teacher", lambda *a, **k: calls.append(k) or original(*a, **k))
    trainer = TinyAny2SegTrainer(request(planned, tmp_path, num_epochs=1, iterations_per_epoch=1))
    trainer.initialize()
    try:
        assert len(calls) == 1 and calls[0]["device"] == trainer.device
        assert trainer.teacher.device == trainer.device and trainer.anchors.device == trainer.device
        assert trainer.lscd.temperature == trainer.lscd_temperature == 0.01
    finally:
        trainer.close()


def test_all_subsets_in_one_pass_equal_each_subset_alone(planned: WorkRoots) -> None:
    torch.manual_seed(1)
    model = Any2SegModel(num_classes=6, num_modalities=4, variant="tiny").eval()
    folder, val_ids = validation_folder(planned)
    labels = LabelInfo.from_plans(read_json(planned.preprocessed / DATASET / "plans.json"))
    cpm = [3, 1, 1, 1]
    args = (folder, val_ids[:1], [64, 64], labels, MODALITIES, torch.device("cpu"), "miou")
    alone = evaluate_subsets(lambda s: Any2SegProbabilities(model, cpm, s), *args)
    joint = evaluate_subsets(None, *args, joint_predictor_for=lambda group: SubsetProbabilities(model, cpm, group),
                             max_bytes=3 * 4 * 6 * 64 * 64)                  # groups of 3 subsets
    pd.testing.assert_frame_equal(alone, joint, atol=1e-6)
    x = torch.cat([torch.rand(2, 6, 64, 64), torch.ones(2, 4, 64, 64)], dim=1)
    x[1, 6 + 1] = 0                                                             # depth out of view in row 1
    with torch.no_grad():
        stacked = SubsetProbabilities(model, cpm, [(0,), (1,), (0, 1, 2, 3)])(x).split(6, dim=1)
        for subset, got in zip([(0,), (1,), (0, 1, 2, 3)], stacked):
            assert torch.allclose(got, Any2SegProbabilities(model, cpm, subset)(x), atol=1e-6)



def test_an_mcubes_release_converts_plans_trains_and_predicts(tmp_path: Path) -> None:
    """Real-layout 2D data: 16-bit RGB, polarisation .npy, NIR, class 0 a material (no background), ignore 255."""
    from test_converters import _png

    source, rng = tmp_path / "multimodal_dataset", np.random.default_rng(0)
    names = {"train": [f"outscene{i:04d}_1_0000000150" for i in range(4)], "val": ["outscene9999_1_0000000180"]}
    for split, split_names in names.items():
        for name in split_names:
            gt = np.full((48, 40), 255, np.uint8)
            gt[:20], gt[20:], gt[30:40, 10:20] = 19, 0, 7                       # sky, asphalt, plastic
            _png(source / "polL_color" / f"{name}.png",
                 (rng.integers(0, 9000, (48, 40, 3)) + 20000 * (gt[..., None] == 19)).astype(np.uint16))
            for folder in ("polL_aolp_sin", "polL_aolp_cos", "polL_dolp"):
                (source / folder).mkdir(parents=True, exist_ok=True)
                np.save(source / folder / f"{name}.npy", (rng.random((48, 40)) + (gt == 7)).astype(np.float32))
            _png(source / "NIR_warped" / f"{name}.png",
                 (rng.integers(0, 100, (48, 40)) + 100 * (gt == 0)).astype(np.uint8))
            _png(source / "GT" / f"{name}.png", gt)
        (source / "list_folder").mkdir(exist_ok=True)
        (source / "list_folder" / f"{split}.txt").write_text("\n".join(split_names) + "\n")
    (source / "list_folder" / "test.txt").write_text("")
    roots = WorkRoots(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    assert cli_main(["convert", "--from", "mcubes", str(source), "-d", "MCUBES", *flags(roots)]) == 0
    assert cli_main(["plan", "-d", "MCUBES", "-np", "1", *flags(roots)]) == 0
    plans = read_json(roots.preprocessed / "Dataset506_MCUBES" / "plans.json")
    assert plans["configurations"]["2d"]["normalization_schemes"][:3] == ["ZScoreNormalization"] * 3  # 16-bit RGB
    assert cli_main(["train", "-d", "MCUBES", "-f", "0", "-c", "2d", "--trainer",
                     "test_any2seg_trainer:TinyAny2SegTrainer", "--epochs", "1", "--iters-per-epoch", "2",
                     "--device", "cpu", "-np", "0", *flags(roots)]) == 0
    table = pd.read_csv(roots.results / "Dataset506_MCUBES" / "TinyAny2SegTrainer__2d__labeled1.0" / "fold_0"
                        / "validation" / "subsets.csv")
    assert len(table) == 15 and "asphalt" in table.columns                    # class 0 scored by mIoU
    images = tmp_path / "input"
    images.mkdir()
    for path in sorted((roots.raw / "Dataset506_MCUBES" / "imagesTr").glob("outscene0000_*_000[03].nii.gz")):
        shutil.copy(path, images)                                               # RGB and NIR only
    assert cli_main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-d", "MCUBES", "--device", "cpu",
                     *flags(roots)]) == 0
    assert (tmp_path / "out" / "outscene0000_1_0000000150.nii.gz").is_file()
