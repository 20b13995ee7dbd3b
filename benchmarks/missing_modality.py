"""How well does each method segment when modalities are missing at test time? Any2Seg against two baselines.

Data: two phantoms of ``cmcseg synth`` (``--size small`` by default), each planned by ``cmcseg plan
-c 2d``: the DELIVER phantom (2D driving scenes; RGB, depth, event, lidar; 16 scenes, 11 labeled)
and the MSCMR phantom (3D cardiac MRI; bSSFP, LGE, T2, each on its own grid, resampled into the
LGE space; 12 cases, 8 labeled; the 2d configuration trains and predicts slice by slice).
Fold 0, every labeled training case of the fold (``--labeled 1``, no unlabeled cases) for
training, the fold's validation cases for scoring. Every arm trains on the same cases.

Arms (each in a process of its own, one torch/OpenMP thread, one data-augmentation process,
the same budget of wall-clock seconds of training, the clock starting at the first iteration):

(a) ``any2seg``: cmcseg's Any2SegTrainer with its default modality dropout 0.5 (a row trains on
    a random non-empty subset of its modalities half of the time); missing modalities at test
    time are left out through Any2Seg's own subset mechanism (``probabilities_network(subset)``:
    only the present modalities' features enter the fusion, the missing ones are never used);
(b) ``no-dropout``: the same trainer, backbone and losses with ``modality_dropout = 0``, trained
    on all modalities; at test time the image channels of the missing modalities are set to 0
    (in cmcseg's normalised input: the mean of a z-scored modality, black for the RGB image,
    which cmcseg scales to [0, 1]) and the network is told that every modality in view is
    present (the FOV masks are kept, i.e. the zeros go through the backbone and the fusion);
(c) ``nnunet``: nnU-Net v2's own nnUNetTrainer, configuration 2d, on all modalities as input
    channels (cmcseg's aligned preprocessed arrays written as an nnU-Net raw dataset, planned
    and preprocessed by nnU-Net itself, trainer built through its Python API, see
    benchmarks/nnunet_driver.py). Missing modalities at test time: their channels are set to 0
    in nnU-Net's normalised input (nnU-Net's per-case z-score, so 0 is the channel's mean).
    nnU-Net's plan is forced to cmcseg's patch and batch size and to cmcseg's 2d
    ResidualEncoderUNet topology with ``--features`` per stage and one residual block per stage,
    so that its parameter count is close to (a)/(b)'s.

Backbone of (a)/(b): the MiT variant ``--backbone tiny`` (stage widths 8/16/32/64, one block per
stage, decoder width 32; about 0.12 M parameters). On two CPU cores mit_b0 (3.7 M) makes only
about 100 iterations of a DELIVER batch in 3 minutes, tiny several hundred. No pretrained weights
anywhere: every network starts from random initialisation (Any2Seg then uses its ``scratch_lr``).
LSCD uses the offline MiniLM text teacher (the trainer's default), the same for (a) and (b).

Budget and schedule: ``--budget-minutes`` per arm per dataset (default 3), the same for every
arm. All arms run on the budget's clock, not on epochs: the poly learning rate ``lr = lr0 (1 -
t / budget)^0.9`` is set before every step (lr0 = 6e-4 AdamW for (a)/(b), 1e-2 SGD for (c), each
method's own), and Any2Seg's ramp-ups keep the trainer's proportion (50 of 1000 nominal epochs,
i.e. full weight after 5 % of the budget). No per-epoch validation, no intermediate
checkpoints, no plots. The batch size of the plan (13 and 61 on a CPU) is replaced by
``--batch-size`` (default 8) for every arm; the patch is the plan's. ``--clock cpu`` counts CPU
seconds of the training process instead of wall seconds.

Scoring: for each arm and each non-empty subset of the modalities (15 for DELIVER, 7 for
MSCMR), every validation case is predicted from that subset by the same function,
``cmcseg.training.subset_validation.evaluate_subsets(predictor_for, ...)`` (Gaussian sliding window,
overlap 0.5, no mirroring, on cmcseg's preprocessed grid), with an arm-specific
``predictor_for(subset)``: (a) Any2Seg's ``probabilities_network(subset)`` (the trainer's own
``run_subset_evaluation``, which scores all subsets in one window pass), (b)/(c) the softmax of
the network on zero-filled input. Metric and classes as that module chooses them
(``subset_metric_for``, ``scored_classes``): mIoU for DELIVER (a 2D dataset; IoU from TP/FP/FN
summed over the cases, every class including class 0, mean over the classes that occur), Dice
for MSCMR (3D; per case and foreground class, mean over cases, then classes). Reported per
subset, as the mean over the subsets and for the full set. As a check of the evaluation path,
(c)'s full set is also scored from nnU-Net's own ``nnUNetPredictor`` run on the raw NIfTIs.
The issue's goal: (a) best on the mean over subsets and within 2 points of (b) on the full set;
the report says whether this run meets it. Validation sets are small (3 scenes, 2 cardiac
cases): differences of a few points are within the noise of one seed.

3D sections (``--datasets myops3d`` on ``../shared/data/myops_dev``, ``brats3d`` on ``../shared/data/brats2015``:
6 cases, FLAIR and T1c, 3 subsets, classes necrosis, edema, non-enhancing, enhancing; ``mscmr3d`` on the
MSCMR phantom),
configuration ``3d_fullres``, the plan's batch (myops3d: ``cmcseg plan --memory-gb 1.5``, patch forced to
[4, 128, 128] for every arm as in semi_supervised_gain.py). Arms:

(a) ``any2seg``: ``cmcseg train --trainer any2seg -c 3d_fullres``, i.e. Any2Seg's modality dropout and the
    full-modality EMA teacher on nnU-Net's residual U-Net (the plan's topology with ``--features`` per stage
    and one block per stage), the present modalities fused at the input (the U-Net's default); every subset
    through the trainer's own subset table;
(b) ``nnunet``: nnU-Net on all modalities as input channels, missing ones zero-filled at test time;
(c) ``nnunet-lge`` / ``nnunet-bssfp``: nnU-Net trained (and tested) with every other channel set to 0 in
    every batch, i.e. a dedicated model of that one modality (constant-zero channels carry no information).

Fusion ablations (any section; in 2D the MiT network is late-fused already): ``any2seg-late`` (MFF on every
stage, the paper's fusion, the 2D default), ``any2seg-mean`` (late, the plain mean of the present modalities'
features instead of MFF) and ``any2seg-tau0.1`` (late, MFF at temperature 0.1 instead of 1).

With ``--match iterations`` (the issue's protocol for this section) the nnU-Net arms train as many
iterations as (a) did in its budget (poly learning rate over those iterations), and every arm's seconds
are reported; with ``--match wall`` every arm gets the budget; ``--iterations N`` trains every arm (a) included
exactly N steps, so that arms can run side by side (``--parallel K``: K arms at a time, one process each).
Cases: the fold's labeled training cases only (myops_dev's 25 unlabeled cases are left out, as nnU-Net cannot
use them). The goals (3D): (a) >= (b)
+ 10 points on the mean over subsets; (a) within 1 point of (b) on the full set; (a) within 3 points of
each (c) on its modality.

Usage: python benchmarks/missing_modality.py [--budget-minutes 3] [--datasets deliver,mscmr,mscmr3d,myops3d]
       [--arms any2seg,no-dropout,nnunet,nnunet-lge,nnunet-bssfp] [--match wall|iterations]
       [--iterations N] [--parallel K]
       [--clock wall|cpu] [--batch-size 8] [--backbone tiny] [--myops-source DIR]
Writes benchmarks/out/missing_modality.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nnunet_driver as nd  # noqa: E402
from measure import loadavg  # noqa: E402
from semi_supervised_gain import small_architecture  # noqa: E402


def budget_clock(kind: str) -> float:
    """Seconds on the budget's clock: wall time, or the CPU time of this process (robust to a shared machine)."""
    return time.process_time() if kind == "cpu" else time.perf_counter()


class BudgetSpent(Exception):
    """Raised inside the training loop when the arm's budget is used up."""

FOLD = 0
ARMS = ("any2seg", "no-dropout", "nnunet", "nnunet-lge", "nnunet-bssfp", "nnunet-flair", "nnunet-t1c",
        "any2seg-late", "any2seg-mean", "any2seg-tau0.1")
ARM_TITLES = {"any2seg": "(a) any2seg", "no-dropout": "(b) no-dropout", "nnunet": "(c) nnunet",
              "nnunet-lge": "nnunet LGE only", "nnunet-bssfp": "nnunet bSSFP only",
              "nnunet-flair": "nnunet FLAIR only", "nnunet-t1c": "nnunet T1c only",
              "any2seg-mean": "(a) mean fusion", "any2seg-tau0.1": "(a) MFF tau 0.1",
              "any2seg-late": "(a) late fusion (MFF)"}
#: arm -> the one modality a dedicated nnU-Net arm trains and tests on (the other channels are 0 throughout)
DEDICATED = {"nnunet-lge": "LGE", "nnunet-bssfp": "bSSFP", "nnunet-flair": "FLAIR", "nnunet-t1c": "T1c"}
#: benchmark key -> data (a phantom, or the real myops_dev folder), cmcseg dataset folder and configuration,
#: nnU-Net dataset id and name; 3D sections may force the patch (nnU-Net's Gaussian blur needs >= 4 slices)
DATASETS = {
    "deliver": {"phantom": "DELIVER", "dataset": "Dataset505_DELIVER", "nnunet_id": 913,
                "nnunet_name": "DELIVERaligned", "configuration": "2d"},
    "mscmr": {"phantom": "MSCMR", "dataset": "Dataset501_MSCMR", "nnunet_id": 914, "nnunet_name": "MSCMRaligned",
              "configuration": "2d"},
    "mscmr3d": {"phantom": "MSCMR", "dataset": "Dataset501_MSCMR", "nnunet_id": 916,
                "nnunet_name": "MSCMR3Daligned", "configuration": "3d_fullres", "memory_gb": 0.75},
    "myops3d": {"source": "myops_dev", "dataset": "Dataset600_MYOPSDEV", "nnunet_id": 915,
                "nnunet_name": "MYOPSDEValigned", "configuration": "3d_fullres", "memory_gb": 1.5,
                "patch": [4, 128, 128]},
    "brats3d": {"source": "brats2015", "dataset": "Dataset507_BRATS2015", "nnunet_id": 917,
                "nnunet_name": "BRATS2015aligned", "configuration": "3d_fullres", "memory_gb": 1.5},
}
#: ../shared/data/brats2015 (DeepMedic's example copy of BraTS 2015): per case folder, the files of each channel
BRATS_FILES = {"FLAIR": "Flair_subtrMeanDivStd.nii.gz", "T1c": "T1c_subtrMeanDivStd.nii.gz"}
BRATS_LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non_enhancing": 3, "enhancing": 4}
#: the issue's tolerance for (a) against (b) on the full set, in points (score x 100)
FULL_SET_TOLERANCE = 2.0


# ============================================================================================ budget
class BudgetedTraining:
    """Mixin for a cmcseg trainer: train for ``budget_s`` seconds, poly LR and ramp-ups on the budget's fraction.

    ``batch_size`` (if set) replaces the plan's batch size. Bookkeeping that is not training
    (per-epoch validation, checkpoints, plots) is off.
    """

    budget_s: float = 180.0
    clock: str = "wall"
    batch_size: int | None = None
    features: list[int] | None = None  # the 3D sections' U-Net: features per stage, one block per stage
    patch: list[int] | None = None
    iterations: int | None = None  # set: train exactly this many steps (the budget's fraction counts steps)
    num_epochs = 1000  # nominal: the ramp-ups advance by num_epochs x the fraction of the budget used
    iterations_per_epoch = 25
    val_iterations = 0
    save_every = 10 ** 9
    _budget_t0: float | None = None

    def configure_plans(self, plans: dict) -> dict:
        plans = copy.deepcopy(super().configure_plans(plans))
        config = plans["configurations"][self.configuration]
        if self.batch_size:
            config["batch_size"] = int(self.batch_size)
        if self.features:
            config["architecture"] = small_architecture(config["architecture"], self.features)
        if self.patch:
            config["patch_size"] = list(self.patch)
        return plans

    @property
    def run_fraction(self) -> float:
        return self.budget_used()

    def select_cases(self):
        """The fold's labeled training cases only, as the nnU-Net arms train on (myops_dev's 25 unlabeled cases
        are left out)."""
        return dataclasses.replace(super().select_cases(), unlabeled=[])

    def budget_used(self) -> float:
        if self._budget_t0 is None:
            return 0.0
        if self.iterations:
            return min(1.0, self.steps_done / self.iterations)
        return min(1.0, (budget_clock(self.clock) - self._budget_t0) / self.budget_s)

    @property
    def epoch_progress(self) -> float:
        return self.num_epochs * self.budget_used()

    def train_step(self, batch: dict) -> dict[str, float]:
        if self._budget_t0 is None:
            self._budget_t0, self._wall_t0, self._cpu_t0 = budget_clock(self.clock), time.perf_counter(), \
                time.process_time()
            self.steps_done = 0
        used = self.budget_used()
        if used >= 1.0:
            raise BudgetSpent
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * (1.0 - used) ** self.poly_exponent
        losses = super().train_step(batch)
        self.steps_done += 1
        return losses

    def plot(self) -> None:
        pass

    def run_epoch(self) -> None:
        try:
            super().run_epoch()
        except BudgetSpent:  # mid-epoch: the rest of the epoch (and its end) is not run
            self.budget_spent = True

    def time_budget_spent(self, started: float, first_epoch: int) -> bool:
        return getattr(self, "budget_spent", False)

    def on_train_end(self) -> None:
        """Only the clocks: no final checkpoint, no validation (the worker scores the subsets itself)."""
        self.train_wall_s = time.perf_counter() - self._wall_t0
        self.train_cpu_s = time.process_time() - self._cpu_t0


def any2seg_trainer_classes() -> dict:
    """Trainer classes of arms (a) and (b) (built lazily: the trainer module imports torch)."""
    from cmcseg.training.any2seg_trainer import Any2SegTrainer

    class BudgetAny2SegTrainer(BudgetedTraining, Any2SegTrainer):
        """Arm (a): Any2Seg as it is (modality dropout 0.5), on the budget's clock."""

    class BudgetAny2SegNoDropoutTrainer(BudgetAny2SegTrainer):
        """Arm (b): the same trainer without modality dropout (every row sees all its modalities)."""

        modality_dropout = 0.0

    class BudgetAny2SegLateTrainer(BudgetAny2SegTrainer):
        """Fusion-stage ablation: MFF on every stage (the paper's; the U-Net's default is early fusion)."""

        fusion_stage = "features"

    class BudgetAny2SegMeanTrainer(BudgetAny2SegLateTrainer):
        """MFF ablation: the plain mean of the present modalities' features."""

        fusion_mode = "mean"

    class BudgetAny2SegSharpTrainer(BudgetAny2SegLateTrainer):
        """MFF ablation: temperature 0.1 instead of 1 (similarity weights far from uniform)."""

        fusion_temperature = 0.1

    return {"any2seg": BudgetAny2SegTrainer, "no-dropout": BudgetAny2SegNoDropoutTrainer,
            "any2seg-late": BudgetAny2SegLateTrainer, "any2seg-mean": BudgetAny2SegMeanTrainer,
            "any2seg-tau0.1": BudgetAny2SegSharpTrainer}


# ============================================================================================ scoring
def modality_channels(channels_per_modality: list[int]) -> list[slice]:
    """The input channels of each modality's image (the FOV masks after them are not listed)."""
    out, start = [], 0
    for count in channels_per_modality:
        out.append(slice(start, start + int(count)))
        start += int(count)
    return out


def zero_filled(predict, channels: list[slice], subset: tuple[int, ...]):
    """``predict`` on inputs whose image channels of the modalities outside ``subset`` are set to 0."""
    missing = [channels[m] for m in range(len(channels)) if m not in subset]

    def run(x):
        if missing:
            x = x.clone()
            for part in missing:
                x[:, part] = 0.0
        return predict(x)
    return run


def table_result(table, channels_per_modality: list[int]) -> dict:
    """The subset table as JSON rows, the mean over subsets and the full-set score."""
    from cmcseg.evaluation import nanmean

    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in table.to_dict("records")]
    full = [r for r in rows if r["num_modalities"] == len(channels_per_modality)]
    return {"subsets": rows, "mean_over_subsets": nanmean([float(v) for v in table["mean"]]),
            "full_set": full[0]["mean"] if full else None}


def worker_any2seg(spec: dict) -> dict:
    import torch

    from cmcseg.paths import WorkRoots
    from cmcseg.training.subset_validation import evaluate_subsets, scored_classes
    from cmcseg.training.trainer import TrainingRequest

    torch.set_num_threads(spec["threads"])
    cls = any2seg_trainer_classes()[spec["arm"]]
    cls.budget_s, cls.clock, cls.batch_size = float(spec["budget_s"]), spec["clock"], int(spec["batch_size"])
    cls.iterations = spec.get("iterations")
    if spec.get("modality_dropout") is not None and spec["arm"] != "no-dropout":
        cls.modality_dropout = float(spec["modality_dropout"])
    two_d = spec["configuration"] == "2d"
    cls.features, cls.patch = (None, None) if two_d else (list(spec["features"]), list(spec["patch_size"]))
    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    trainer = cls(TrainingRequest(spec["dataset"], FOLD, 1.0, configuration=spec["configuration"], roots=roots,
                                  device=spec["device"], seed=spec["seed"], num_workers=spec["workers"],
                                  backbone=spec["backbone"] if two_d else None))
    trainer.run()
    if list(trainer.cases.validation) != list(spec["validation"]) or list(trainer.cases.labeled) != spec["train"]:
        raise RuntimeError("the trainer's fold differs from the benchmark's")
    if spec["arm"] != "no-dropout":
        table = trainer.run_subset_evaluation()  # evaluate_subsets with Any2Seg's subset mechanism
    else:
        network = trainer.inference_network()
        network.eval()
        predict_all = trainer.probabilities_network(None)  # every modality in view counts as present
        channels = modality_channels(trainer.channels_per_modality)
        table = evaluate_subsets(lambda subset: zero_filled(predict_all, channels, subset),
                                 trainer.preprocessed_folder / trainer.config["data_identifier"],
                                 trainer.cases.validation, trainer.patch_size,
                                 scored_classes(trainer.plans, trainer.subset_metric), trainer.modality_names,
                                 trainer.device, trainer.subset_metric, trainer.sliding_window_step,
                                 trainer.sliding_window_batch_size)
    return {**table_result(table, trainer.channels_per_modality), "metric": trainer.subset_metric,
            "modalities": list(trainer.modality_names), "iterations": trainer.steps_done,
            "train_wall_s": trainer.train_wall_s, "train_cpu_s": trainer.train_cpu_s,
            "parameters": sum(p.numel() for p in trainer.inference_network().parameters()),
            "batch_size": trainer.labeled_batch_size + trainer.unlabeled_batch_size,
            "patch_size": trainer.patch_size, "modality_dropout": trainer.modality_dropout,
            "backbone": trainer.backbone_variant, "initial_lr": trainer.initial_lr}


# ============================================================================================ nnU-Net arm
def nnunet_normalised_cases(spec: dict, cm_folder: Path, out_folder: Path, patch_size: list[int]) -> None:
    """The validation cases as nnU-Net's preprocessing normalised them, in cmcseg's case format.

    nnU-Net preprocessed every case of its raw dataset (validation cases included). Its arrays are
    taken as they are when they lie on cmcseg's grid (no cropping, no resampling), with cmcseg's
    label and FOV masks, so that ``evaluate_subsets`` can score nnU-Net's network on them.
    """
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from cmcseg.preprocessing.storage import load_case, write_case

    nn_folder = Path(spec["nnunet_preprocessed_data"])
    dataset = infer_dataset_class(str(nn_folder))(str(nn_folder), list(spec["validation"]))
    for case_id in spec["validation"]:
        nn_data, _seg, _prev, nn_props = dataset.load_case(case_id)
        nn_data = np.asarray(nn_data[:], dtype=np.float32)
        data, seg, fov, props = load_case(cm_folder, case_id)
        full_box = [[0, int(s)] for s in data.shape[1:]]
        box = [[int(a), int(b)] for a, b in nn_props["bbox_used_for_cropping"]]
        if nn_data.shape != tuple(data.shape) or box != full_box:
            raise RuntimeError(f"nnU-Net's preprocessed {case_id} ({nn_data.shape}, crop {box}) is not on cmcseg's "
                               f"grid {tuple(data.shape)}")
        write_case(out_folder, case_id, nn_data, np.asarray(seg[:]), np.asarray(fov[:]), props, patch_size)


def train_nnunet_within_budget(trainer, budget_s: float, clock: str, zeroed: list[slice] | None = None,
                               iterations: int | None = None) -> dict:
    """nnU-Net's train_step on its own data loader until the budget is spent (poly LR on the budget's fraction), or
    for exactly ``iterations`` steps (poly LR on their fraction). ``zeroed`` input channels are set to 0 in every
    batch: a dedicated model of the other modalities."""
    trainer.on_train_start()
    trainer.network.train()
    batch = next(trainer.dataloader_train)
    t0, wall0, cpu0 = budget_clock(clock), time.perf_counter(), time.process_time()
    steps = 0
    try:
        while True:
            used = steps / iterations if iterations else (budget_clock(clock) - t0) / budget_s
            if used >= 1.0:
                break
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.initial_lr * (1.0 - used) ** 0.9
            for part in zeroed or []:
                batch["data"][:, part] = 0.0
            trainer.train_step(batch)
            steps += 1
            batch = next(trainer.dataloader_train)
    finally:
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    return {"iterations": steps, "train_wall_s": wall, "train_cpu_s": cpu}


def nnunet_predictor_full_set(trainer, spec: dict, cm_folder: Path, labels, metric: str) -> float:
    """Full-set score of nnU-Net's own nnUNetPredictor on the raw NIfTIs (a check of the zero-fill path)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from cmcseg.evaluation import nanmean
    from cmcseg.preprocessing.storage import load_case
    from cmcseg.training.subset_validation import SubsetScores

    raw, out = Path(spec["nnunet_raw_dataset"]), Path(spec["work"]) / "nnunet_predictions"
    out.mkdir(parents=True, exist_ok=True)
    cases = list(spec["validation"])
    n_channels = sum(spec["channels_per_modality"])
    nd.predict_files(trainer, [[str(raw / "imagesTr" / f"{c}_{k:04d}.nii.gz") for k in range(n_channels)]
                               for c in cases], [str(out / c) for c in cases])
    scores = SubsetScores(labels, metric)
    for c in cases:
        _data, seg, _fov, _props = load_case(cm_folder, c)
        prediction = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{c}.nii.gz")))
                                      .astype(np.int64))
        reference = np.asarray(seg[:])
        onehot = torch.nn.functional.one_hot(prediction.reshape(reference.shape[1:]), labels.num_classes)
        scores.add(onehot.movedim(-1, 0).float(), reference)
    return nanmean(list(scores.scores().values()))


def worker_nnunet(spec: dict) -> dict:
    import torch

    from cmcseg.image_io import read_json
    from cmcseg.training.subset_validation import evaluate_subsets, scored_classes, subset_metric_for

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    pre = Path(spec["preprocessed"]) / spec["dataset"]
    cm_plans = read_json(pre / "plans.json")
    configuration = spec["configuration"]
    cm_folder = pre / cm_plans["configurations"][configuration]["data_identifier"]
    metric = subset_metric_for(cm_plans)
    labels = scored_classes(cm_plans, metric)
    patch = [int(p) for p in spec["patch_size"]]
    eval_folder = Path(spec["work"]) / "nnunet_normalised_validation"
    nnunet_normalised_cases(spec, cm_folder, eval_folder, patch)

    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    trainer = nd.build_trainer(plans, dataset_json, FOLD, spec["device"], configuration=configuration)
    channels = modality_channels(spec["channels_per_modality"])
    only = DEDICATED.get(spec["arm"])
    zeroed = None if only is None else [c for m, c in enumerate(channels) if spec["modalities"][m] != only]
    timing = train_nnunet_within_budget(trainer, float(spec["budget_s"]), spec["clock"], zeroed,
                                        spec.get("iterations"))

    trainer.set_deep_supervision_enabled(False)
    network = trainer.network
    network.eval()
    n_images = sum(spec["channels_per_modality"])

    def predict_all(x):  # nnU-Net's network sees the image channels only (no FOV masks)
        return torch.softmax(network(x[:, :n_images]).float(), dim=1)

    # a dedicated arm is scored on its own modality only (the other rows would be a model without its input)
    subsets = None if only is None else [(list(spec["modalities"]).index(only),)]
    table = evaluate_subsets(lambda subset: zero_filled(predict_all, channels, subset), eval_folder,
                             spec["validation"], patch, labels, spec["modalities"], trainer.device, metric, 0.5, 1,
                             subsets=subsets)
    result = {**table_result(table, spec["channels_per_modality"]), "metric": metric,
              "modalities": list(spec["modalities"]), **timing,
              "parameters": sum(p.numel() for p in network.parameters()), "batch_size": trainer.batch_size,
              "patch_size": list(trainer.configuration_manager.patch_size), "initial_lr": trainer.initial_lr}
    if only is None:
        result["full_set_nnunet_predictor"] = nnunet_predictor_full_set(trainer, spec, cm_folder, labels, metric)
    else:
        result["dedicated_to"] = only
    return result


# ============================================================================================ orchestration
def make_raw_dataset(d: dict, raw: Path, args) -> None:
    """The section's raw dataset: a phantom of ``cmcseg synth``, or the real folder through ``cmcseg convert``."""
    if "phantom" in d:
        from cmcseg.phantoms import synthesize

        synthesize(d["phantom"], raw / d["dataset"], cases=args.cases, seed=args.seed, size=args.size)
        return
    if d["source"] == "brats2015":
        write_brats_raw(args.brats_source, raw / d["dataset"])
        return
    if nd.convert_myops(args.myops_source, raw, "--myops-source") != d["dataset"]:
        raise SystemExit(f"cmcseg convert wrote another dataset id than {d['dataset']}")


def write_brats_raw(source: Path, folder: Path) -> None:
    """The BraTS 2015 copy as a raw dataset: FLAIR and T1c (co-registered, 1 mm), OTMultiClass as the label (stored as
    float there, written as integers). The copy has no official layout of its own, so the benchmark writes it."""
    import numpy as np
    import SimpleITK as sitk

    from cmcseg.dataset import image_file, label_file, write_dataset_json

    if not source.is_dir():
        raise SystemExit(f"{source} does not exist: pass --brats-source with the brats2015 folder")
    cases = sorted(p for p in source.iterdir() if p.is_dir() and (p / "OTMultiClass.nii.gz").is_file())
    for case in cases:
        for c, name in enumerate(BRATS_FILES.values()):
            target = image_file(folder, case.name, c)
            target.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.ReadImage(str(case / name), sitk.sitkFloat32), str(target))
        label = sitk.ReadImage(str(case / "OTMultiClass.nii.gz"))
        values = np.rint(sitk.GetArrayFromImage(label)).astype(np.uint8)
        out = sitk.GetImageFromArray(values)
        out.CopyInformation(label)
        target = label_file(folder, case.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(target))
    write_dataset_json(folder, name="BRATS2015", channel_names=list(BRATS_FILES), labels=BRATS_LABELS,
                       num_training=len(cases), description="BraTS 2015 (DeepMedic example copy): FLAIR, T1c")


def prepare(key: str, work: Path, args) -> dict:
    """Data, cmcseg plan (the section's configuration), the nnU-Net raw dataset of the aligned arrays, nnU-Net's plan
    and preprocessing. 3D sections: the plan's patch may be forced (``patch``) and its batch is kept."""
    from cmcseg.plans.plans import plan_channels_per_modality
    from cmcseg.plans.splits import labeled_subset, load_splits

    d = DATASETS[key]
    configuration = d["configuration"]
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    t0 = time.perf_counter()
    make_raw_dataset(d, raw, args)
    extra = ["--memory-gb", str(d["memory_gb"])] if "memory_gb" in d else []
    plans = nd.plan_with_cmcseg(d["dataset"], raw, pre, configuration, extra)
    config = plans["configurations"][configuration]
    patch = list(d.get("patch") or config["patch_size"])
    batch = args.batch_size if configuration == "2d" else int(config["batch_size"])
    splits = load_splits(pre / d["dataset"] / "splits.json")
    train = labeled_subset(splits, FOLD, 1.0)
    validation = list(splits["folds"][FOLD]["val"])
    channels_per_modality = plan_channels_per_modality(plans)

    env = nd.nnunet_env(work, data_workers=args.workers, threads=args.threads)
    raw_folder = nd.write_aligned_raw(pre / d["dataset"], plans, train + validation, Path(env["nnUNet_raw"]),
                                      d["nnunet_id"], d["nnunet_name"], configuration=configuration)
    native, nn_plan_s = nd.plan_and_preprocess(d["nnunet_id"], env, workers=2, configuration=configuration)
    nd.write_splits(env, d["nnunet_id"], train, validation)
    forced = nd.forced_plans(native, patch, batch, small_architecture(config["architecture"], args.features),
                             configuration=configuration)
    plans_file = work / "nnunet_forced_plans.json"
    plans_file.write_text(json.dumps(forced, indent=1))
    nn_pre = nd.preprocessed_folder(env, d["nnunet_id"])
    return {
        "work": str(work), "raw": str(raw), "preprocessed": str(pre), "results": str(res), "env": env,
        "dataset": d["dataset"], "configuration": configuration, "nnunet_plans": str(plans_file),
        "nnunet_raw_dataset": str(raw_folder), "nnunet_dataset_json": str(nn_pre / "dataset.json"),
        "nnunet_preprocessed_data": str(nn_pre / native["configurations"][configuration]["data_identifier"]),
        "train": train, "validation": validation, "modalities": list(plans["modalities"]),
        "channels_per_modality": channels_per_modality, "patch_size": patch, "batch_size": batch,
        "features": list(args.features),
        "cmcseg_plan": {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                        "spacing": config["spacing"]},
        "nnunet_native_plan": nd.configuration_summary(native, configuration),
        "nnunet_forced_plan": nd.configuration_summary(forced, configuration),
        "normalization_nnunet": native["configurations"][configuration]["normalization_schemes"],
        "normalization_cmcseg": config["normalization_schemes"],
        "setup_s": time.perf_counter() - t0, "nnunet_plan_and_preprocess_s": nn_plan_s,
    }


SPEC_KEYS = ("work", "raw", "preprocessed", "results", "dataset", "configuration", "nnunet_plans",
             "nnunet_raw_dataset", "nnunet_dataset_json", "nnunet_preprocessed_data", "train", "validation",
             "modalities", "channels_per_modality", "patch_size", "features")


def run_arm(arm: str, setup: dict, args, iterations: int | None = None) -> dict:
    """One arm on one dataset, in a process of its own; ``iterations``: an nnU-Net arm trains that many."""
    spec = {**{k: setup[k] for k in SPEC_KEYS}, "arm": arm, "budget_s": args.budget_minutes * 60.0,
            "iterations": iterations,
            "clock": args.clock, "batch_size": setup["batch_size"], "backbone": args.backbone,
            "threads": args.threads,
            "workers": args.workers, "device": args.device, "seed": args.seed,
            "modality_dropout": args.modality_dropout}
    return nd.run_worker(Path(__file__).resolve(), arm, spec, Path(setup["work"]), setup["env"])


def goal_check(arms: dict, configuration: str) -> dict:
    """The issue's goal on this run. 2D sections: (a) best mean over subsets, (a) within 2 points of (b) on the full
    set. 3D sections: (a) >= nnU-Net zero-filled + 10 points on the mean over subsets, (a) within 1 point of it on
    the full set, and within 3 points of each dedicated nnU-Net on that one's modality."""
    out: dict = {}
    if "any2seg" not in arms:
        return out
    a = arms["any2seg"]
    if configuration != "2d":
        if "nnunet" in arms:
            out["mean_over_subsets_any2seg_minus_nnunet_points"] = gain = \
                100.0 * (a["mean_over_subsets"] - arms["nnunet"]["mean_over_subsets"])
            out["any2seg_10_points_over_nnunet_zero_filled"] = gain >= 10.0
            out["full_set_any2seg_minus_nnunet_points"] = full = 100.0 * (a["full_set"] - arms["nnunet"]["full_set"])
            out["any2seg_within_1_point_of_nnunet_full_set"] = full >= -1.0
        for arm, only in DEDICATED.items():
            if arm in arms:
                gap = 100.0 * (subset_score(a, only) - subset_score(arms[arm], only))
                out[f"{only}_only_any2seg_minus_dedicated_points"] = gap
                out[f"{only}_only_any2seg_within_3_points_of_dedicated"] = gap >= -3.0
        return out
    others = {k: r["mean_over_subsets"] for k, r in arms.items() if k != "any2seg"}
    if others:
        out["any2seg_best_mean_over_subsets"] = all(a["mean_over_subsets"] > v for v in others.values())
    if "no-dropout" in arms:
        gap = 100.0 * (a["full_set"] - arms["no-dropout"]["full_set"])
        out["full_set_any2seg_minus_no_dropout_points"] = gap
        out["any2seg_within_2_points_of_no_dropout_full_set"] = gap >= -FULL_SET_TOLERANCE
    return out


def subset_score(result: dict, subset: str) -> float:
    """The mean score of one subset's row (by name, e.g. ``LGE``)."""
    return float(next(r["mean"] for r in result["subsets"] if r["subset"] == subset))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=3.0, help="training time of every arm on every dataset")
    ap.add_argument("--match", choices=("wall", "iterations"), default="wall",
                    help="the nnU-Net arms train for the same budget (wall) or for as many iterations as (a)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="every arm trains exactly this many steps (the issue's protocol), instead of a budget")
    ap.add_argument("--modality-dropout", type=float, default=None,
                    help="modality dropout of the Any2Seg arms other than no-dropout (default: the trainer's, 0.5)")
    ap.add_argument("--parallel", type=int, default=1, help="arms trained at the same time (each in its process)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what the budget counts: wall seconds of training or CPU seconds of the training process")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ",".join(DATASETS))
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ",".join(ARMS))
    ap.add_argument("--size", default="small", choices=("tiny", "small", "default"))
    ap.add_argument("--cases", type=int, default=None, help="phantom cases (default: the size's)")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size of every arm (replaces the plan's)")
    ap.add_argument("--backbone", default="tiny", help="MiT variant of (a) and (b)")
    ap.add_argument("--features", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 32],
                    help="features per stage of nnU-Net's network (last repeated), one residual block per stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="data-augmentation processes per arm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--myops-source", type=Path, default=HERE.parent.parent / "shared" / "data" / "myops_dev",
                    help="the myops_dev folder (section myops3d)")
    ap.add_argument("--brats-source", type=Path, default=HERE.parent.parent / "shared" / "data" / "brats2015",
                    help="the brats2015 folder (section brats3d)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    nd.add_worker_arguments(ap, ARMS)
    args = ap.parse_args()
    if args.worker:
        nd.serve_worker(args.spec, args.result,
                        worker_nnunet if args.worker.startswith("nnunet") else worker_any2seg)
        return

    datasets = [k for k in args.datasets.split(",") if k]
    arms = [a for a in args.arms.split(",") if a]
    unknown = (set(datasets) - set(DATASETS)) | (set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown dataset(s)/arm(s) {sorted(unknown)}; datasets {list(DATASETS)}, arms {list(ARMS)}")
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("worker", "spec", "result")},
              "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg()}, "datasets": {}}
    start = time.perf_counter()
    for key in datasets:
        with tempfile.TemporaryDirectory(prefix=f"missing_modality_{key}_") as tmp:
            setup = prepare(key, Path(tmp), args)
            entry = {"setup": {k: v for k, v in setup.items() if k not in ("env", "work", "raw", "preprocessed",
                                                                            "results", "nnunet_plans")},
                     "arms": {}}
            report["datasets"][key] = entry
            print(f"{key}: setup (synth, cmcseg plan, nnU-Net plan and preprocess) {setup['setup_s']:.0f} s",
                  flush=True)
            run_arms(key, arms, setup, args, entry["arms"])
            entry["goal"] = goal_check(entry["arms"], setup["configuration"])
    report["host"]["loadavg_end"], report["total_wall_s"] = loadavg(), time.perf_counter() - start
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "missing_modality.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'missing_modality.json'} (total {report['total_wall_s'] / 60:.1f} min)")


def run_arms(key: str, arms: list[str], setup: dict, args, results: dict) -> None:
    """Every arm of one dataset into ``results``, ``--parallel`` at a time. Without ``--iterations``, (a) runs first
    when ``--match iterations`` makes its count the nnU-Net arms'; with it, every arm trains that many steps."""
    from concurrent.futures import ThreadPoolExecutor

    def one(arm: str) -> None:
        if args.iterations:
            iterations = args.iterations
        else:
            same = args.match == "iterations" and arm.startswith("nnunet") and "any2seg" in results
            iterations = results["any2seg"]["iterations"] if same else None
        r = results[arm] = run_arm(arm, setup, args, iterations)
        print(f"{key} {ARM_TITLES[arm]}: {r['iterations']} iterations, process {r['process_wall_s']:.0f} s, "
              f"{r['metric']} x 100 mean over subsets {_points(r['mean_over_subsets'])}, "
              f"full set {_points(r['full_set'])}", flush=True)

    ordered = sorted(arms, key=lambda k: k != "any2seg")
    if not args.iterations and args.match == "iterations" and "any2seg" in ordered:
        one(ordered.pop(0))  # its iterations set the nnU-Net arms'
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for future in [pool.submit(one, arm) for arm in ordered]:
            future.result()
    results.update({arm: results.pop(arm) for arm in [a for a in arms if a in results]})  # the order asked for


def _points(v) -> str:
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:6.1f}"


def print_report(report: dict) -> None:
    a = report["args"]
    print(f"\nbudget {a['budget_minutes']} min ({a['clock']} clock) of training per arm and dataset"
          f"{'; nnU-Net arms: as many iterations as (a)' if a.get('match') == 'iterations' else ''}, batch "
          f"{a['batch_size']} (2D; 3D: the plan's), {a['threads']} thread(s), {a['workers']} data worker(s); 2D "
          f"(a)/(b) MiT {a['backbone']}, 3D (a) the residual U-Net, nnU-Net ResidualEncoderUNet, both with features "
          f"{a['features']} and one block per stage; random init; load average "
          f"{report['host']['loadavg_start']} -> {report['host']['loadavg_end']} on {report['host']['cpus']} CPUs")
    for key, entry in report["datasets"].items():
        s, arms = entry["setup"], entry["arms"]
        if not arms:
            continue
        metric = next(iter(arms.values()))["metric"]
        name = "mIoU" if metric == "miou" else "Dice"
        d = DATASETS[key]
        data = f"{d['phantom']} phantom ({a['size']})" if "phantom" in d else d["source"]
        print(f"\n{data}, {d['configuration']}, fold {FOLD}: {len(s['train'])} training, {len(s['validation'])} "
              f"validation cases ({', '.join(s['validation'])}); patch {s['patch_size']}, batch {s['batch_size']}; "
              f"{name} x 100 per modality subset")
        width = max([len("mean over subsets")] + [len(r["subset"]) for r in next(iter(arms.values()))["subsets"]]) + 2
        print(f"{'subset':<{width}}" + "".join(f"{ARM_TITLES[arm]:>19}" for arm in arms))
        for subset in [row["subset"] for row in max((r["subsets"] for r in arms.values()), key=len)]:
            print(f"{subset:<{width}}" + "".join(
                f"{_points(next((row['mean'] for row in r['subsets'] if row['subset'] == subset), None)):>19}"
                for r in arms.values()))
        print(f"{'mean over subsets':<{width}}" + "".join(f"{_points(r['mean_over_subsets']):>19}"
                                                         for r in arms.values()))
        print(f"{'full set':<{width}}" + "".join(f"{_points(r['full_set']):>19}" for r in arms.values()))
        classes = [k for k in next(iter(arms.values()))["subsets"][0] if k not in ("subset", "num_modalities", "mean")]
        for arm, r in arms.items():
            print(f"   {ARM_TITLES[arm]} per class over subsets: " + ", ".join(
                f"{c} {_points(sum(row[c] or 0.0 for row in r['subsets']) / len(r['subsets'])).strip()}"
                for c in classes))
        if "nnunet" in arms:
            print(f"(c) full set through nnU-Net's own nnUNetPredictor: "
                  f"{_points(arms['nnunet']['full_set_nnunet_predictor']).strip()}")
        for arm, r in arms.items():
            print(f"   {ARM_TITLES[arm]:<16} {r['iterations']:6d} iterations, {r['train_wall_s']:5.0f} s wall / "
                  f"{r['train_cpu_s']:5.0f} s CPU of training "
                  f"({r['train_wall_s'] / max(1, r['iterations']):.2f} s/it), "
                  f"process {r['process_wall_s']:4.0f} s, {r['parameters'] / 1e6:.3f} M parameters, batch "
                  f"{r['batch_size']}, peak RSS {r['peak_tree_rss_gb']:.1f} GB")
        g = entry.get("goal", {})
        for k, v in g.items():
            if d["configuration"] != "2d":
                print(f"goal {k}: {v if isinstance(v, bool) else f'{v:+.1f}'}")
        if "any2seg_best_mean_over_subsets" in g:
            print(f"goal: (a) best on the mean over subsets: {'yes' if g['any2seg_best_mean_over_subsets'] else 'NO'}")
        if "full_set_any2seg_minus_no_dropout_points" in g:
            print(f"goal: (a) within {FULL_SET_TOLERANCE:g} points of (b) on the full set: "
                  f"{'yes' if g['any2seg_within_2_points_of_no_dropout_full_set'] else 'NO'} "
                  f"((a) - (b) = {g['full_set_any2seg_minus_no_dropout_points']:+.1f} points)")


if __name__ == "__main__":
    main()
