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

Usage: python benchmarks/missing_modality.py [--budget-minutes 3] [--datasets deliver,mscmr]
       [--arms any2seg,no-dropout,nnunet] [--clock wall|cpu] [--batch-size 8] [--backbone tiny]
Writes benchmarks/out/missing_modality.json.
"""
from __future__ import annotations

import argparse
import copy
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
CONFIGURATION = "2d"
ARMS = ("any2seg", "no-dropout", "nnunet")
ARM_TITLES = {"any2seg": "(a) any2seg", "no-dropout": "(b) no-dropout", "nnunet": "(c) nnunet"}
#: benchmark key -> phantom, cmcseg dataset folder, nnU-Net dataset id and name
DATASETS = {
    "deliver": {"phantom": "DELIVER", "dataset": "Dataset505_DELIVER", "nnunet_id": 913,
                "nnunet_name": "DELIVERaligned"},
    "mscmr": {"phantom": "MSCMR", "dataset": "Dataset501_MSCMR", "nnunet_id": 914, "nnunet_name": "MSCMRaligned"},
}
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
    num_epochs = 1000  # nominal: the ramp-ups advance by num_epochs x the fraction of the budget used
    iterations_per_epoch = 25
    val_iterations = 0
    save_every = 10 ** 9
    _budget_t0: float | None = None

    def configure_plans(self, plans: dict) -> dict:
        plans = super().configure_plans(plans)
        if self.batch_size:
            plans = copy.deepcopy(plans)
            plans["configurations"][self.configuration]["batch_size"] = int(self.batch_size)
        return plans

    def budget_used(self) -> float:
        if self._budget_t0 is None:
            return 0.0
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

    return {"any2seg": BudgetAny2SegTrainer, "no-dropout": BudgetAny2SegNoDropoutTrainer}


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
    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    trainer = cls(TrainingRequest(spec["dataset"], FOLD, 1.0, configuration=CONFIGURATION, roots=roots,
                                  device=spec["device"], seed=spec["seed"], num_workers=spec["workers"],
                                  backbone=spec["backbone"]))
    trainer.run()
    if list(trainer.cases.validation) != list(spec["validation"]) or list(trainer.cases.labeled) != spec["train"]:
        raise RuntimeError("the trainer's fold differs from the benchmark's")
    if spec["arm"] == "any2seg":
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


def train_nnunet_within_budget(trainer, budget_s: float, clock: str) -> dict:
    """nnU-Net's train_step on its own data loader until the budget is spent (poly LR on the budget's fraction)."""
    trainer.on_train_start()
    trainer.network.train()
    batch = next(trainer.dataloader_train)
    t0, wall0, cpu0 = budget_clock(clock), time.perf_counter(), time.process_time()
    steps = 0
    try:
        while True:
            used = (budget_clock(clock) - t0) / budget_s
            if used >= 1.0:
                break
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.initial_lr * (1.0 - used) ** 0.9
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
    cm_folder = pre / cm_plans["configurations"][CONFIGURATION]["data_identifier"]
    metric = subset_metric_for(cm_plans)
    labels = scored_classes(cm_plans, metric)
    patch = [int(p) for p in spec["patch_size"]]
    eval_folder = Path(spec["work"]) / "nnunet_normalised_validation"
    nnunet_normalised_cases(spec, cm_folder, eval_folder, patch)

    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    trainer = nd.build_trainer(plans, dataset_json, FOLD, spec["device"], configuration=CONFIGURATION)
    timing = train_nnunet_within_budget(trainer, float(spec["budget_s"]), spec["clock"])

    trainer.set_deep_supervision_enabled(False)
    network = trainer.network
    network.eval()
    n_images = sum(spec["channels_per_modality"])

    def predict_all(x):  # nnU-Net's network sees the image channels only (no FOV masks)
        return torch.softmax(network(x[:, :n_images]).float(), dim=1)

    channels = modality_channels(spec["channels_per_modality"])
    table = evaluate_subsets(lambda subset: zero_filled(predict_all, channels, subset), eval_folder,
                             spec["validation"], patch, labels, spec["modalities"], trainer.device, metric, 0.5, 1)
    result = {**table_result(table, spec["channels_per_modality"]), "metric": metric,
              "modalities": list(spec["modalities"]), **timing,
              "parameters": sum(p.numel() for p in network.parameters()), "batch_size": trainer.batch_size,
              "patch_size": list(trainer.configuration_manager.patch_size), "initial_lr": trainer.initial_lr}
    result["full_set_nnunet_predictor"] = nnunet_predictor_full_set(trainer, spec, cm_folder, labels, metric)
    return result


# ============================================================================================ orchestration
def prepare(key: str, work: Path, args) -> dict:
    """Phantom, cmcseg plan (2d), the nnU-Net raw dataset of the aligned arrays, nnU-Net's plan and preprocessing."""
    from cmcseg.phantoms import synthesize
    from cmcseg.plans.plans import plan_channels_per_modality
    from cmcseg.plans.splits import labeled_subset, load_splits

    d = DATASETS[key]
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    t0 = time.perf_counter()
    synthesize(d["phantom"], raw / d["dataset"], cases=args.cases, seed=args.seed, size=args.size)
    plans = nd.plan_with_cmcseg(d["dataset"], raw, pre, CONFIGURATION)
    config = plans["configurations"][CONFIGURATION]
    splits = load_splits(pre / d["dataset"] / "splits.json")
    train = labeled_subset(splits, FOLD, 1.0)
    validation = list(splits["folds"][FOLD]["val"])
    channels_per_modality = plan_channels_per_modality(plans)

    env = nd.nnunet_env(work, data_workers=args.workers, threads=args.threads)
    raw_folder = nd.write_aligned_raw(pre / d["dataset"], plans, train + validation, Path(env["nnUNet_raw"]),
                                      d["nnunet_id"], d["nnunet_name"], configuration=CONFIGURATION)
    native, nn_plan_s = nd.plan_and_preprocess(d["nnunet_id"], env, workers=2, configuration=CONFIGURATION)
    nd.write_splits(env, d["nnunet_id"], train, validation)
    forced = nd.forced_plans(native, config["patch_size"], args.batch_size,
                             small_architecture(config["architecture"], args.features), configuration=CONFIGURATION)
    plans_file = work / "nnunet_forced_plans.json"
    plans_file.write_text(json.dumps(forced, indent=1))
    nn_pre = nd.preprocessed_folder(env, d["nnunet_id"])
    return {
        "work": str(work), "raw": str(raw), "preprocessed": str(pre), "results": str(res), "env": env,
        "dataset": d["dataset"], "nnunet_plans": str(plans_file), "nnunet_raw_dataset": str(raw_folder),
        "nnunet_dataset_json": str(nn_pre / "dataset.json"),
        "nnunet_preprocessed_data": str(nn_pre / native["configurations"][CONFIGURATION]["data_identifier"]),
        "train": train, "validation": validation, "modalities": list(plans["modalities"]),
        "channels_per_modality": channels_per_modality, "patch_size": config["patch_size"],
        "cmcseg_plan": {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                        "spacing": config["spacing"]},
        "nnunet_native_plan": nd.configuration_summary(native, CONFIGURATION),
        "nnunet_forced_plan": nd.configuration_summary(forced, CONFIGURATION),
        "normalization_nnunet": native["configurations"][CONFIGURATION]["normalization_schemes"],
        "normalization_cmcseg": config["normalization_schemes"],
        "setup_s": time.perf_counter() - t0, "nnunet_plan_and_preprocess_s": nn_plan_s,
    }


SPEC_KEYS = ("work", "raw", "preprocessed", "results", "dataset", "nnunet_plans", "nnunet_raw_dataset",
             "nnunet_dataset_json", "nnunet_preprocessed_data", "train", "validation", "modalities",
             "channels_per_modality", "patch_size")


def run_arm(arm: str, setup: dict, args) -> dict:
    """One arm on one dataset, in a process of its own."""
    spec = {**{k: setup[k] for k in SPEC_KEYS}, "arm": arm, "budget_s": args.budget_minutes * 60.0,
            "clock": args.clock, "batch_size": args.batch_size, "backbone": args.backbone, "threads": args.threads,
            "workers": args.workers, "device": args.device, "seed": args.seed}
    return nd.run_worker(Path(__file__).resolve(), arm, spec, Path(setup["work"]), setup["env"])


def goal_check(arms: dict) -> dict:
    """The issue's goal on this run: (a) best mean over subsets, (a) within 2 points of (b) on the full set."""
    out: dict = {}
    if "any2seg" not in arms:
        return out
    a = arms["any2seg"]
    others = {k: r["mean_over_subsets"] for k, r in arms.items() if k != "any2seg"}
    if others:
        out["any2seg_best_mean_over_subsets"] = all(a["mean_over_subsets"] > v for v in others.values())
    if "no-dropout" in arms:
        gap = 100.0 * (a["full_set"] - arms["no-dropout"]["full_set"])
        out["full_set_any2seg_minus_no_dropout_points"] = gap
        out["any2seg_within_2_points_of_no_dropout_full_set"] = gap >= -FULL_SET_TOLERANCE
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=3.0, help="training time of every arm on every dataset")
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
    ap.add_argument("--out", type=Path, default=HERE / "out")
    nd.add_worker_arguments(ap, ARMS)
    args = ap.parse_args()
    if args.worker:
        nd.serve_worker(args.spec, args.result, worker_nnunet if args.worker == "nnunet" else worker_any2seg)
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
            for arm in arms:
                r = entry["arms"][arm] = run_arm(arm, setup, args)
                print(f"{key} {ARM_TITLES[arm]}: {r['iterations']} iterations, process {r['process_wall_s']:.0f} s, "
                      f"{r['metric']} mean over subsets {r['mean_over_subsets']:.4f}, full set {r['full_set']:.4f}",
                      flush=True)
            entry["goal"] = goal_check(entry["arms"])
    report["host"]["loadavg_end"], report["total_wall_s"] = loadavg(), time.perf_counter() - start
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "missing_modality.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'missing_modality.json'} (total {report['total_wall_s'] / 60:.1f} min)")


def _points(v) -> str:
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:6.1f}"


def print_report(report: dict) -> None:
    a = report["args"]
    print(f"\nbudget {a['budget_minutes']} min ({a['clock']} clock) of training per arm and dataset, batch "
          f"{a['batch_size']}, {a['threads']} thread(s), {a['workers']} data worker(s); (a)/(b) MiT {a['backbone']}, "
          f"(c) ResidualEncoderUNet features {a['features']}; random init; load average "
          f"{report['host']['loadavg_start']} -> {report['host']['loadavg_end']} on {report['host']['cpus']} CPUs")
    for key, entry in report["datasets"].items():
        s, arms = entry["setup"], entry["arms"]
        if not arms:
            continue
        metric = next(iter(arms.values()))["metric"]
        name = "mIoU" if metric == "miou" else "Dice"
        print(f"\n{DATASETS[key]['phantom']} phantom ({a['size']}), fold {FOLD}: {len(s['train'])} training, "
              f"{len(s['validation'])} validation cases; patch {s['patch_size']}; {name} x 100 per modality subset")
        width = max([len("mean over subsets")] + [len(r["subset"]) for r in next(iter(arms.values()))["subsets"]]) + 2
        print(f"{'subset':<{width}}" + "".join(f"{ARM_TITLES[arm]:>17}" for arm in arms))
        n_rows = len(next(iter(arms.values()))["subsets"])
        for i in range(n_rows):
            subset = next(iter(arms.values()))["subsets"][i]["subset"]
            print(f"{subset:<{width}}" + "".join(f"{_points(r['subsets'][i]['mean']):>17}" for r in arms.values()))
        print(f"{'mean over subsets':<{width}}" + "".join(f"{_points(r['mean_over_subsets']):>17}"
                                                         for r in arms.values()))
        print(f"{'full set':<{width}}" + "".join(f"{_points(r['full_set']):>17}" for r in arms.values()))
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
        if "any2seg_best_mean_over_subsets" in g:
            print(f"goal: (a) best on the mean over subsets: {'yes' if g['any2seg_best_mean_over_subsets'] else 'NO'}")
        if "full_set_any2seg_minus_no_dropout_points" in g:
            print(f"goal: (a) within {FULL_SET_TOLERANCE:g} points of (b) on the full set: "
                  f"{'yes' if g['any2seg_within_2_points_of_no_dropout_full_set'] else 'NO'} "
                  f"((a) - (b) = {g['full_set_any2seg_minus_no_dropout_points']:+.1f} points)")


if __name__ == "__main__":
    main()
