"""Do the unlabeled cases pay off? CMC at ``--labeled 0.2`` against the same network on the labels alone and
against nnU-Net, per fold, on real cardiac MRI (myops_dev) or on the MSCMR phantom.

Data (``--data``):

* ``myops_dev`` (default): ``../shared/data/myops_dev`` through ``cmcseg convert --from myops`` and ``cmcseg plan
  -c 3d_fullres --memory-gb 1.5`` (patch [3, 160, 160], batch 2, no stride along z), with the patch forced to
  [4, 160, 160] for every arm (``--patch``): nnU-Net's Gaussian-blur augmentation cannot pad an axis of fewer
  than 4 voxels: 20 labeled cases in 5 folds of 16 training and 4
  validation cases, plus 25 unlabeled cases of another acquisition. Classes myocardium, LV, RV, edema, scar.
* ``phantom``: the MSCMR phantom (``--size small --cases 20``; every third case has no label), ``--memory-gb 0.75``.

At ``--labeled 0.2`` a fold keeps the labels of 3 of its 16 training cases (splits.json's nested, seeded subset).

Arms (each a process of its own, one torch thread, batches built in that process):

(a) ``cmc``: CMCTrainer at ``--labeled 0.2``; the unlabeled pool is the fold's other training cases;
(a+) ``cmc-extra``: the same, plus the dataset's truly unlabeled cases (myops_dev: the 25 other-acquisition cases);
(b) ``supervised``: the same trainer with ``--unlabeled-weight 0``: same network, same batches, same schedule;
(c) ``nnunet``: nnU-Net's nnUNetTrainer (Python API) on the same labeled cases, aligned by cmcseg, its plan forced
    to cmcseg's patch and batch and to one cmcseg branch's small architecture;
(d) ``full``: CMCTrainer at ``--labeled 1.0`` (every training case labeled);
(e) ``nnunet-full``: nnU-Net on every training case of the fold.

(a), (a+), (b) and (d) train the same number of iterations (``--iterations``; the schedule is the trainer's own:
poly learning rate by epoch, unlabeled ramps by run fraction). The nnU-Net arms get the seconds that arm (a) took
to train in the same fold, which is the comparison a user makes (time-based poly learning rate). The seconds are
CPU seconds (``--budget-clock cpu``, one thread per arm): what each arm takes alone, whatever the machine's load
while it ran; ``--budget-clock wall`` counts wall seconds instead.
Iterations and seconds are reported for every arm. Every cmcseg arm uses the same small network: the plan's
ResidualEncoderUNet topology with ``--features`` per stage and one block per stage; nnU-Net gets one such branch
with the modalities as input channels.

Ablations (``--arms``): ``cmc-no-bcp`` (no copy-paste, pseudo-label weight 0.3: the default before),
``cmc-no-pl`` (no pseudo-labels), ``cmc-cac`` (the restricted CAC on, weight 0.1, without copy-paste),
``cmc-tau0.6`` / ``cmc-tau0.95`` (confidence threshold), ``cmc-drop`` (the strong view drops a modality),
``cmc-early`` (weight 1 from 10 % of the run, the schedule before), ``cmc-early-drop`` (and drop),
``cmc-early-drop-merge`` (and unlearned classes merged into background), ``cmc-ratio1`` (one unlabeled row per
labeled row, the default before), ``cmc-half`` (one unlabeled row per two labeled rows, pinned: the default now),
``cmc-every-step`` (the unlabeled objective on every step, ``unlabeled_every = 1``: the default before; (a) runs it
every second step at twice the weight), ``cmc-thin-tau`` (thresholds 0.6 for RV, edema and scar: myops_dev's
classes only), ``cmc-flex`` (thresholds that fall with a class's reliability, floor 0.5), ``cmc-sets`` (a
pseudo-label stands for every class that is at least 20 % of the labeled voxels predicted as it), ``cmc-edema-scar``
(an edema or scar pseudo-label stands for both: myops_dev's classes only; the four score
each head alone no more, to save validation time),
``branches`` / ``branches-sup`` (the paper's network, a branch per modality, as (a) and (b)).

Scoring: Dice per class of the argmax on the fold's validation cases in cmcseg's preprocessed space, with the same
function for every arm (Gaussian sliding window, overlap 0.5, no mirroring); nnU-Net's own predictor for (c)/(e),
on NIfTIs of the same arrays. cmcseg arms also report each modality head alone.

Usage: python benchmarks/semi_supervised_gain.py [--data myops_dev|phantom] [--folds 0,1,2] [--iterations 600]
           [--arms cmc,supervised,nnunet,full,nnunet-full,cmc-extra] [--parallel 2]
Writes benchmarks/out/semi_supervised_gain_<data>.json (and prints the tables).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import nnunet_driver as nd  # noqa: E402
from measure import loadavg  # noqa: E402

NNUNET_ID = 912
#: arm -> (title, kind); kind "ours" trains a cmcseg trainer for --iterations, "nnunet" for (a)'s seconds
ARMS = {
    "cmc": "(a) CMC --labeled 0.2",
    "supervised": "(b) same, --unlabeled-weight 0",
    "nnunet": "(c) nnU-Net, labeled cases",
    "full": "(d) CMC --labeled 1.0",
    "nnunet-full": "(e) nnU-Net, all cases",
    "cmc-extra": "(a+) (a) + extra unlabeled",
    "cmc-no-pl": "(a) without pseudo-labels",
    "cmc-cac": "(a) + restricted CAC 0.1",
    "cmc-tau0.6": "(a) threshold 0.6",
    "cmc-tau0.95": "(a) threshold 0.95",
    "cmc-drop": "(a) strong view drops a modality",
    "cmc-early": "(a) weight 1 from 10 %",
    "cmc-early-drop": "(a) weight 1 from 10 %, drop 0.5",
    "cmc-early-drop-merge": "(a) w 1 from 10 %, drop, merge",
    "cmc-hold-bg": "(a) background held until learned",
    "cmc-no-bcp": "(a) without copy-paste (the default before)",
    "cmc-half": "(a) one unlabeled row per two labeled",
    "cmc-ratio1": "(a) one unlabeled row per labeled (before)",
    "cmc-every-step": "(a) unlabeled objective every step",
    "cmc-bf16": "(a) trained in bfloat16",
    "supervised-bf16": "(b) trained in bfloat16",
    "full-bf16": "(d) trained in bfloat16",
    "cmc-bf16-bg95": "(a) bfloat16, background threshold 0.95",
    "cmc-thin-tau": "(a) RV/edema/scar threshold 0.6 (myops)",
    "cmc-flex": "(a) thresholds fall with reliability, floor 0.5",
    "cmc-sets": "(a) set-valued pseudo-labels from the confusion, share 0.2",
    "cmc-edema-scar": "(a) edema and scar pseudo-labels as {edema, scar} (myops)",
    "cmc-pretrained": "(a) from a pretrained encoder",
    "branches": "(a) with a branch per modality",
    "branches-sup": "(b) with a branch per modality",
}
DEFAULT_ARMS = ("cmc", "supervised", "nnunet", "full", "nnunet-full", "cmc-extra")
NNUNET_ARMS = ("nnunet", "nnunet-full")


# ============================================================================================ our arms
def small_architecture(architecture: dict, features: list[int]) -> dict:
    """The plan's architecture with ``features`` per stage (repeated last) and one block per stage."""
    arch = copy.deepcopy(architecture)
    kwargs = arch["arch_kwargs"]
    n = int(kwargs["n_stages"])
    kwargs["features_per_stage"] = [int(features[min(i, len(features) - 1)]) for i in range(n)]
    if "n_blocks_per_stage" in kwargs:
        kwargs["n_blocks_per_stage"] = [1] * n
    if "n_conv_per_stage" in kwargs:
        kwargs["n_conv_per_stage"] = [1] * n
    return arch


def arm_trainer_class(arm: str):
    """The trainer class of a cmcseg arm (defined lazily: importing cmcseg's trainer loads torch)."""
    from cmcseg.training.cmc_trainer import CMCTrainer

    class BenchCMCTrainer(CMCTrainer):
        """CMCTrainer with the benchmark's small network; its unlabeled pool is the fold's own training cases."""

        features: list[int] = [8, 16, 32, 64, 64]
        patch: list[int] | None = None
        extra_unlabeled = False
        num_workers = 0
        val_iterations = 0
        save_every = 10 ** 9

        def configure_plans(self, plans: dict) -> dict:
            plans = copy.deepcopy(plans)
            config = plans["configurations"][self.configuration]
            config["architecture"] = small_architecture(config["architecture"], self.features)
            if self.patch:
                config["patch_size"] = list(self.patch)
            return plans

        def select_cases(self):
            cases = super().select_cases()
            if self.extra_unlabeled:
                return cases
            own = set(self.splits["folds"][self.fold]["train"])
            return dataclasses.replace(cases, unlabeled=[c for c in cases.unlabeled if c in own])

        def plot(self) -> None:  # the benchmark times training, not drawing
            pass

        def on_train_start(self) -> None:
            super().on_train_start()
            self._clock = (time.perf_counter(), time.process_time())

        def on_train_end(self) -> None:
            self.train_wall_s = time.perf_counter() - self._clock[0]
            self.train_cpu_s = time.process_time() - self._clock[1]
            super().on_train_end()

    early = {"pseudo_label_weight": 1.0, "unlabeled_warmup": 0.1}  # the schedule before the default changed
    overrides = {
        "cmc": {}, "full": {}, "supervised": {"unlabeled_weight": 0.0},
        "cmc-extra": {"extra_unlabeled": True},
        "cmc-no-pl": {"pseudo_label_weight": 0.0}, "cmc-cac": {"cac_weight": 0.1, "copy_paste_box": 0.0},
        "cmc-tau0.6": {"pseudo_label_threshold": 0.6}, "cmc-tau0.95": {"pseudo_label_threshold": 0.95},
        "cmc-drop": {"strong_drop_modality": 0.5},
        "cmc-early": early,
        "cmc-early-drop": {**early, "strong_drop_modality": 0.5},
        "cmc-early-drop-merge": {**early, "strong_drop_modality": 0.5, "learned_reliability": 0.5},
        "cmc-hold-bg": {"background_pseudo_label_bar": 0.5},
        "cmc-no-bcp": {"copy_paste_box": 0.0, "pseudo_label_weight": 0.3},
        "cmc-half": {"unlabeled_batch_ratio": 0.5}, "cmc-ratio1": {"unlabeled_batch_ratio": 1.0},
        "cmc-every-step": {"unlabeled_every": 1},
        # trained under bfloat16 autocast (CPUs with native bfloat16; float32 elsewhere)
        "cmc-bf16": {"cpu_bfloat16": True}, "supervised-bf16": {"unlabeled_weight": 0.0, "cpu_bfloat16": True},
        "full-bf16": {"cpu_bfloat16": True},
        # background pseudo-labels need 0.95: fewer missed RV/myocardium voxels taught as background
        "cmc-bf16-bg95": {"cpu_bfloat16": True, "pseudo_label_threshold": (0.95, 0.8, 0.8, 0.8, 0.8, 0.8),
                          "validate_each_modality": False},
        # myops_dev's classes (background, myocardium, LV, RV, edema, scar): RV, edema and scar at 0.6
        "cmc-thin-tau": {"pseudo_label_threshold": (0.8, 0.8, 0.8, 0.6, 0.6, 0.6), "validate_each_modality": False},
        "cmc-flex": {"adaptive_threshold_floor": 0.5, "validate_each_modality": False},
        "cmc-sets": {"confusion_share": 0.2, "validate_each_modality": False},
        # myops_dev's classes: edema (4) and scar (5) stand for each other
        "cmc-edema-scar": {"confusable_classes": ((4, 5),), "validate_each_modality": False},
        "cmc-pretrained": {},  # (a) with --encoder-weights from benchmarks/pretrain_gain.py
        "branches": {"single_branch": False},
        "branches-sup": {"single_branch": False, "unlabeled_weight": 0.0},
    }[arm]
    name = "Bench_" + arm.replace("-", "_").replace(".", "")
    return type(name, (BenchCMCTrainer,), dict(overrides))


def head_scores(summary: dict) -> dict:
    """Mean Dice per class of each head alone, from the validation summary."""
    return {head: scores["mean"] for head, scores in summary.get("per_head", {}).items()}


def worker_ours(spec: dict) -> dict:
    import torch

    from cmcseg.paths import WorkRoots
    from cmcseg.training.trainer import TrainingRequest

    torch.set_num_threads(spec["threads"])
    cls = arm_trainer_class(spec["arm"])
    cls.features = list(spec["features"])
    cls.patch = spec["patch"]
    epochs = int(spec["epochs"])
    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    fraction = 1.0 if spec["arm"] in ("full", "full-bf16") else spec["labeled"]
    weights = spec.get("encoder_weights") if spec["arm"] == "cmc-pretrained" else None
    trainer = cls(TrainingRequest(spec["dataset"], spec["fold"], fraction, roots=roots, device=spec["device"],
                                  num_workers=0, seed=spec["seed"], num_epochs=epochs,
                                  iterations_per_epoch=max(1, int(spec["iterations"]) // epochs), val_iterations=0,
                                  encoder_weights=Path(weights) if weights else None))
    folder = trainer.run()
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    history = trainer.history.state_dict()
    return {
        "dice_mean": summary["mean"], "dice_per_case": summary["per_case"], "dice_per_head": head_scores(summary),
        "iterations": trainer.global_step, "train_wall_s": trainer.train_wall_s, "train_cpu_s": trainer.train_cpu_s,
        "batch": {"labeled": trainer.labeled_batch_size, "unlabeled": trainer.unlabeled_batch_size},
        "cases": {"labeled": list(trainer.cases.labeled), "unlabeled": list(trainer.cases.unlabeled),
                  "validation": list(trainer.cases.validation)},
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "patch_size": trainer.patch_size,
        "reliability": trainer.network.head_reliability.tolist(),
        "history": {"epochs": history["epochs"],
                    "values": {k: v for k, v in history["values"].items()
                               if k.startswith(("loss", "weight", "mass")) or k.startswith("pseudo_label")}},
    }


# ============================================================================================ nnU-Net arms
def worker_nnunet(spec: dict) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from cmcseg.evaluation import case_dice, nanmean
    from cmcseg.image_io import read_json
    from cmcseg.plans.plans import LabelInfo
    from cmcseg.preprocessing.storage import load_case

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    trainer = nd.build_trainer(plans, dataset_json, spec["nnunet_fold"], spec["device"])
    trainer.on_train_start()
    trainer.network.train()
    budget = float(spec["budget_s"])
    clock = time.process_time if spec.get("budget_clock") == "cpu" else time.perf_counter
    iterations = 0
    start, cpu_start, clock_start = time.perf_counter(), time.process_time(), clock()
    try:
        while True:
            fraction = (clock() - clock_start) / budget
            if fraction >= 1.0:
                break
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.initial_lr * (1.0 - fraction) ** 0.9
            trainer.train_step(next(trainer.dataloader_train))
            iterations += 1
    finally:
        train_wall, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        for gen in (trainer.dataloader_train, trainer.dataloader_val):
            finish = getattr(gen, "_finish", None)
            if finish is not None:
                finish()
    raw = Path(spec["nnunet_raw_dataset"])
    out_dir = Path(spec["work"]) / f"nnunet_predictions_{spec['arm']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    val = list(spec["validation"])
    n_channels = len(dataset_json["channel_names"])
    inputs = [[str(raw / "imagesTr" / f"{c}_{k:04d}.nii.gz") for k in range(n_channels)] for c in val]
    nd.predict_files(trainer, inputs, [str(out_dir / c) for c in val])
    cm_plans = read_json(Path(spec["preprocessed"]) / spec["dataset_folder"] / "plans.json")
    labels = LabelInfo.from_plans(cm_plans)
    folder = Path(spec["preprocessed"]) / spec["dataset_folder"] / cm_plans["configurations"]["3d_fullres"][
        "data_identifier"]
    per_case = {}
    for c in val:
        _data, seg, _fov, _props = load_case(folder, c)
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{c}.nii.gz"))).astype(np.int64)
        reference = np.asarray(seg[:])
        onehot = torch.nn.functional.one_hot(torch.from_numpy(prediction), labels.num_classes)
        per_case[c] = case_dice(onehot.permute(3, 0, 1, 2).float(), reference, labels)
    mean = {name: nanmean([v[name] for v in per_case.values()]) for name in labels.names}
    return {"dice_mean": mean, "dice_per_case": per_case, "iterations": iterations, "train_wall_s": train_wall,
            "train_cpu_s": train_cpu, "batch": {"labeled": trainer.batch_size},
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "patch_size": list(trainer.configuration_manager.patch_size)}


# ============================================================================================ set-up
def prepare(work: Path, args) -> dict:
    from cmcseg.plans.splits import labeled_subset, load_splits

    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    t0 = time.perf_counter()
    if args.data == "phantom":
        from cmcseg.phantoms import synthesize

        dataset = "Dataset501_MSCMR"
        synthesize("MSCMR", raw / dataset, cases=args.cases, seed=args.seed, size=args.size)
    else:
        dataset = nd.convert_myops(args.source, raw)
    memory = args.memory_gb if args.memory_gb is not None else (0.75 if args.data == "phantom" else 1.5)
    plans = nd.plan_with_cmcseg(dataset, raw, pre, "3d_fullres", ["--memory-gb", str(memory)])
    if args.patch is None and args.data == "myops_dev":
        args.patch = [4, 160, 160]
    if args.patch:
        plans["configurations"]["3d_fullres"]["patch_size"] = list(args.patch)
    splits = load_splits(pre / dataset / "splits.json")
    folds = {}
    nn_folds = []
    for fold in args.folds:
        train = list(splits["folds"][fold]["train"])
        labeled = labeled_subset(splits, fold, args.labeled)
        validation = list(splits["folds"][fold]["val"])
        folds[fold] = {"labeled": labeled, "train": train, "validation": validation,
                       "nnunet_fold": {"nnunet": len(nn_folds), "nnunet-full": len(nn_folds) + 1}}
        nn_folds += [{"train": labeled, "val": validation}, {"train": train, "val": validation}]
    env = nd.nnunet_env(work, data_workers=1, threads=args.threads)  # nnU-Net's planner needs >= 1
    every_labeled = sorted({c for f in folds.values() for c in f["train"] + f["validation"]})
    raw_folder = nd.write_aligned_raw(pre / dataset, plans, every_labeled, Path(env["nnUNet_raw"]), NNUNET_ID,
                                      "aligned")
    native, nn_plan_s = nd.plan_and_preprocess(NNUNET_ID, env, workers=2)
    env["nnUNet_n_proc_DA"] = "0"  # training: batches built in the training process, as the cmcseg arms do
    (nd.preprocessed_folder(env, NNUNET_ID) / "splits_final.json").write_text(json.dumps(nn_folds, indent=1))
    config = plans["configurations"]["3d_fullres"]
    forced = nd.forced_plans(native, config["patch_size"], config["batch_size"],
                             small_architecture(config["architecture"], args.features))
    plans_file = work / "nnunet_forced_plans.json"
    plans_file.write_text(json.dumps(forced, indent=1))
    return {
        "work": str(work), "raw": str(raw), "preprocessed": str(pre), "results": str(res), "env": env,
        "dataset": dataset, "dataset_folder": dataset, "classes": [k for k, v in plans["labels"].items() if int(v) > 0],
        "nnunet_plans": str(plans_file), "nnunet_raw_dataset": str(raw_folder),
        "nnunet_dataset_json": str(nd.preprocessed_folder(env, NNUNET_ID) / "dataset.json"),
        "folds": folds, "memory_gb": memory,
        "cmcseg_plan": {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                        "spacing": config["spacing"]},
        "nnunet_forced_plan": nd.configuration_summary(forced),
        "setup_s": time.perf_counter() - t0, "nnunet_plan_and_preprocess_s": nn_plan_s,
    }


def prepare_or_reuse(work: Path, args) -> dict:
    """The set-up saved in ``work/setup.json`` with ``--reuse`` (its patch becomes ``args.patch``), else a new one
    (:func:`prepare`), saved there."""
    saved = work / "setup.json"
    if args.reuse and saved.is_file():
        setup = json.loads(saved.read_text())
        setup["folds"] = {int(k): v for k, v in setup["folds"].items()}
        args.patch = setup["cmcseg_plan"]["patch_size"]
        missing = [f for f in args.folds if f not in setup["folds"]]
        if missing:
            raise SystemExit(f"{saved} was prepared without fold(s) {missing}; run without --reuse")
        return setup
    setup = prepare(work, args)
    saved.write_text(json.dumps(setup, indent=1))
    return setup


def run_arm(arm: str, fold: int, setup: dict, args, budget_s: float | None = None) -> dict:
    work = Path(setup["work"]) / f"fold{fold}_{arm}"
    work.mkdir(parents=True, exist_ok=True)
    spec = {k: setup[k] for k in ("raw", "preprocessed", "results", "nnunet_plans", "nnunet_raw_dataset",
                                   "nnunet_dataset_json", "dataset", "dataset_folder")}
    spec.update(work=str(work), arm=arm, fold=fold, validation=setup["folds"][fold]["validation"],
                nnunet_fold=setup["folds"][fold]["nnunet_fold"].get(arm), budget_s=budget_s,
                iterations=args.iterations, epochs=args.epochs, features=args.features, patch=args.patch,
                labeled=args.labeled, encoder_weights=setup.get("encoder_weights"), budget_clock=args.budget_clock,
                threads=args.threads, device=args.device, seed=args.seed)
    worker = "nnunet" if arm in NNUNET_ARMS else arm
    result = nd.run_worker(Path(__file__).resolve(), worker, spec, work, setup["env"])
    print(f"fold {fold} {ARMS[arm]}: {result['iterations']} iterations in {result['train_wall_s']:.0f} s, Dice "
          f"{ {k: round(v, 3) for k, v in result['dice_mean'].items()} }", flush=True)
    return result


def run_fold(fold: int, arms: list[str], setup: dict, args) -> dict:
    """(a) first (its training time is the nnU-Net arms' budget; without (a), the first cmcseg arm's), then the other
    arms, one at a time."""
    results = {}
    ours = [a for a in arms if a not in NNUNET_ARMS]
    first = "cmc" if "cmc" in arms else (ours[0] if ours else None)
    if first:
        results[first] = run_arm(first, fold, setup, args)
    budget = results[first][f"train_{args.budget_clock}_s"] if first else args.nnunet_seconds
    for arm in arms:
        if arm != first:
            results[arm] = run_arm(arm, fold, setup, args, budget if arm in NNUNET_ARMS else None)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("myops_dev", "phantom"), default="myops_dev")
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "myops_dev",
                    help="the myops_dev folder (CaseXXXX/CaseXXXX_{C0,LGE,T2[,gd]}.nii.gz)")
    ap.add_argument("--folds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated: " + ",".join(ARMS))
    ap.add_argument("--iterations", type=int, default=600, help="training iterations of every cmcseg arm")
    ap.add_argument("--epochs", type=int, default=20, help="epochs the iterations are split into (poly LR steps)")
    ap.add_argument("--nnunet-seconds", type=float, default=300.0,
                    help="nnU-Net's budget when arm (a) is not run (otherwise (a)'s training time)")
    ap.add_argument("--budget-clock", choices=("cpu", "wall"), default="cpu",
                    help="what nnU-Net's budget counts: (a)'s CPU seconds (default: on a shared machine, the seconds "
                         "each arm would take alone; wall seconds there depend on the load of the moment) or wall")
    ap.add_argument("--parallel", type=int, default=2, help="folds trained at the same time (one core each)")
    ap.add_argument("--size", default="small", choices=("tiny", "small", "default"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--labeled", type=float, default=0.2)
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="cmcseg plan budget (default: 1.5 for myops_dev, 0.75 for the phantom)")
    ap.add_argument("--features", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 64],
                    help="features per stage of the small network (all arms)")
    ap.add_argument("--patch", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="force this patch on every arm (default: [4, 160, 160] for myops_dev, the plan's for the "
                         "phantom); the plan's strides must divide it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the data, plans and nnU-Net preprocessing already prepared in --work")
    nd.add_worker_arguments(ap, ["nnunet", *[a for a in ARMS if a not in NNUNET_ARMS]])
    args = ap.parse_args()

    if args.worker:
        nd.serve_worker(args.spec, args.result, worker_nnunet if args.worker == "nnunet" else worker_ours)
        return

    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; choose from {list(ARMS)}")
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("worker", "spec", "result")},
              "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg()}, "folds": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semi_supervised_gain_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = prepare_or_reuse(work, args)
        report["setup"] = {k: v for k, v in setup.items() if k not in ("env", "work")}
        report["setup"]["folds"] = {str(k): v for k, v in setup["folds"].items()}
        print(f"setup (data, cmcseg plan, nnU-Net plan and preprocess): {setup['setup_s']:.0f} s", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            futures = {fold: pool.submit(run_fold, fold, arms, setup, args) for fold in args.folds}
            for fold, future in futures.items():
                report["folds"][str(fold)] = future.result()
    report["host"]["loadavg_end"] = loadavg()
    report["total_wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(arms) <= set(DEFAULT_ARMS) else "_ablations"
    out_file = args.out / f"semi_supervised_gain_{args.data}{suffix}.json"
    out_file.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {out_file}")


def _fmt(v: float | None) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def print_report(report: dict) -> None:
    s, a = report["setup"], report["args"]
    classes = s["classes"]
    print(f"\n{a['data']} ({s['dataset']}), --labeled {a['labeled']}; cmcseg plan --memory-gb {s['memory_gb']}: patch "
          f"{s['cmcseg_plan']['patch_size']}, batch {s['cmcseg_plan']['batch_size']}; small network features "
          f"{a['features']}, 1 block per stage, for every arm; {a['iterations']} iterations for the cmcseg arms, "
          f"(a)'s training seconds for nnU-Net; {a['threads']} thread(s) per arm, {a['parallel']} folds at a time")
    head = f"{'arm':<34}" + "".join(f"{c[:10]:>11}" for c in classes) + f"{'fg mean':>9}{'iters':>7}{'train s':>9}"
    per_arm: dict[str, list[list[float]]] = {}
    for fold, results in report["folds"].items():
        f = s["folds"][str(fold)]
        print(f"\nfold {fold}: labeled {f['labeled']}; validation {f['validation']}")
        print(head)
        for arm, r in results.items():
            dice = [r["dice_mean"].get(c, math.nan) for c in classes]
            per_arm.setdefault(arm, []).append(dice + [_mean(dice)])
            print(f"{ARMS[arm]:<34}" + "".join(f"{_fmt(d):>11}" for d in dice) + f"{_fmt(_mean(dice)):>9}"
                  f"{r['iterations']:7d}{r['train_wall_s']:9.0f}")
        for arm, r in results.items():
            for modality, d in r.get("dice_per_head", {}).items():
                print(f"   {ARMS[arm][:4]} head {modality:<8}" + "".join(f"{_fmt(d.get(c)):>11}" for c in classes))
    print(f"\nmean over folds {list(report['folds'])}")
    print(head[:34 + 11 * len(classes) + 9])
    for arm, rows in per_arm.items():
        means = [_mean([row[i] for row in rows]) for i in range(len(classes) + 1)]
        print(f"{ARMS[arm]:<34}" + "".join(f"{_fmt(m):>11}" for m in means[:-1]) + f"{_fmt(means[-1]):>9}")


if __name__ == "__main__":
    main()
