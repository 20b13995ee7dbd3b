"""Does CMC's use of unlabeled cases pay off? Three arms, one fixed wall-clock budget each, on an MSCMR phantom.

Data: an MSCMR phantom (paired bSSFP, LGE, T2, each on its own grid; every third case has no
label), ``--size small --cases 20`` by default, planned by ``cmcseg plan -c 3d_fullres
--memory-gb 0.75`` (patch [10, 80, 64], batch 2). Fold 0 at ``--labeled 0.2``: 2 labeled
training cases, 15 cases trained on without labels (9 whose labels are hidden + 6 truly unlabeled), 3 validation cases.

Arms (each in a process of its own, one torch/OpenMP thread, one data-augmentation process,
the same budget of wall-clock seconds of training, the clock starting at the first iteration):

(a) ``cmc``: CMCTrainer with the unlabeled cases (batch = labeled + unlabeled rows, supervised +
    CSC + CAC losses);
(b) ``supervised``: the same network and trainer on the labeled 20% only: unlabeled batch share 0
    (every row labeled) and CSC/CAC weights 0;
(c) ``nnunet``: nnU-Net's nnUNetTrainer (Python API) on the same 2 labeled cases, aligned and
    co-registered by cmcseg (benchmarks/nnunet_driver.py), its plan forced to cmcseg's patch and
    batch size and to one cmcseg branch's architecture (the same small ResidualEncoderUNet,
    with the 3 modalities as input channels). nnU-Net's network is therefore about 1/M of ours
    and runs more iterations in the same time: the budget is fixed, not the iteration count.

Network for (a)/(b): the plan's ResidualEncoderUNet topology with ``--features`` per stage and
one residual block per stage (a plan hook, as the tests' TinyCMCTrainer), so that a CPU makes
hundreds of iterations within the budget.

Schedule: all arms run on the budget's clock, not on epochs. nnU-Net's poly learning rate
``lr = 0.01 (1 - t / budget)^0.9`` is applied before every step, and CMC's sigmoid ramp-ups
keep the trainer's default proportion (100 of 1000 epochs, i.e. full weight after 10 % of
the budget). No per-epoch pseudo-Dice validation, no intermediate checkpoints, no plots.
``--clock cpu`` counts the training process's CPU seconds instead of wall seconds: equal compute
per arm even while other jobs load a shared machine (the report gives both for every arm).

Scoring: every arm is scored on the fold's validation cases in cmcseg's preprocessed
(aligned reference) space with the same function (``cmcseg.training.validation.case_dice``,
Dice per class of the argmax; Gaussian sliding window, overlap 0.5, no mirroring). (a)/(b)
come from their trainer's ``validation/summary.json``; (c) is predicted by nnU-Net's own
``nnUNetPredictor`` on the NIfTIs of cmcseg's preprocessed arrays, so its segmentations lie
on that same grid. For (a)/(b) each modality head is also scored alone.

Usage: python benchmarks/semi_supervised_gain.py [--budget-minutes 6] [--arms cmc,supervised,nnunet] [--clock wall|cpu]
       diagnostics: --arms cmc-no-cac,cmc-no-csc,cmc-no-unlabeled-losses (-> semi_supervised_gain_ablations.json)
Writes benchmarks/out/semi_supervised_gain.json.
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

DATASET = "Dataset501_MSCMR"
NNUNET_ID = 912
FOLD = 0
CLASSES = ("myocardium", "LV", "RV")
ARMS = ("cmc", "supervised", "nnunet")
#: diagnostic arms (not run by default): arm (a) with one or both unlabeled loss terms switched off
ABLATIONS = ("cmc-no-cac", "cmc-no-csc", "cmc-no-unlabeled-losses")
ARM_TITLES = {"cmc": "(a) CMC + unlabeled", "supervised": "(b) same net, labeled only",
              "nnunet": "(c) nnU-Net, labeled only", "cmc-no-cac": "(a) without CAC",
              "cmc-no-csc": "(a) without CSC", "cmc-no-unlabeled-losses": "(a) CSC, CAC weights 0"}


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


def budget_clock(kind: str) -> float:
    """Seconds on the budget's clock: wall time, or the CPU time of this process (robust to a shared machine)."""
    return time.process_time() if kind == "cpu" else time.perf_counter()


class BudgetSpent(Exception):
    """Raised inside the loop when the wall-clock budget is used up."""


def budget_trainer_classes():
    """The trainer classes of arms (a) and (b) (defined lazily: importing cmcseg's trainer loads torch)."""
    from cmcseg.training.cmc_trainer import CMCTrainer

    class BudgetCMCTrainer(CMCTrainer):
        """CMCTrainer with a small network that trains for ``budget_s`` seconds on a time-based schedule."""

        budget_s: float = 360.0
        features: list[int] = [8, 16, 32, 64, 64]
        num_epochs = 1000  # nominal; the schedule runs on the budget's clock
        iterations_per_epoch = 50
        val_iterations = 0
        save_every = 10 ** 9

        def configure_plans(self, plans: dict) -> dict:
            plans = copy.deepcopy(plans)
            config = plans["configurations"][self.configuration]
            config["architecture"] = small_architecture(config["architecture"], self.features)
            return plans

        # ---- time-based schedule
        clock: str = "wall"

        @property
        def budget_fraction(self) -> float:
            start = getattr(self, "_budget_start", None)
            return 0.0 if start is None else min(1.0, (budget_clock(self.clock) - start) / self.budget_s)

        @property
        def epoch_progress(self) -> float:
            """Ramp-ups advance with the budget: nominal epochs = num_epochs x fraction of the budget used."""
            return self.num_epochs * self.budget_fraction

        def train_step(self, batch: dict) -> dict[str, float]:
            if getattr(self, "_clock_start", None) is None:
                self._clock_start = time.perf_counter()
                self._cpu_start = time.process_time()
                self._budget_start = budget_clock(self.clock)
                self.iterations_done, self.labeled_rows, self.unlabeled_rows = 0, 0, 0
            fraction = self.budget_fraction
            if fraction >= 1.0:
                raise BudgetSpent
            for group in self.optimizer.param_groups:
                group["lr"] = self.initial_lr * (1.0 - fraction) ** self.poly_exponent
            out = super().train_step(batch)
            self.iterations_done += 1
            n_labeled = int(batch["labeled"].sum())
            self.labeled_rows += n_labeled
            self.unlabeled_rows += int(batch["labeled"].numel()) - n_labeled
            return out

        def plot(self) -> None:  # bookkeeping off: the budget is for training
            pass

        def run(self) -> Path:
            try:
                self.initialize()
                self.on_train_start()
                try:
                    while True:
                        self.run_epoch()
                except BudgetSpent:
                    pass
                self.train_wall_s = time.perf_counter() - self._clock_start
                self.train_cpu_s = time.process_time() - self._cpu_start
                self.on_train_end()
            finally:
                self.close()
            return self.output_folder

    class BudgetSupervisedTrainer(BudgetCMCTrainer):
        """Arm (b): the same network on labeled rows only: no unlabeled stream, CSC and CAC weights 0."""

        unlabeled_batch_fraction = 0.0
        csc_weight = 0.0
        cac_weight = 0.0

    class BudgetCMCNoCACTrainer(BudgetCMCTrainer):
        """Diagnostic: arm (a) with the cross-modality agreement term off."""

        cac_weight = 0.0

    class BudgetCMCNoCSCTrainer(BudgetCMCTrainer):
        """Diagnostic: arm (a) with the channel-wise semantic consistency term off."""

        csc_weight = 0.0

    class BudgetCMCNoUnlabeledLossTrainer(BudgetCMCTrainer):
        """Diagnostic: arm (a)'s batches (labeled + unlabeled rows) with both unlabeled terms off."""

        csc_weight = 0.0
        cac_weight = 0.0

    return {"cmc": BudgetCMCTrainer, "supervised": BudgetSupervisedTrainer, "cmc-no-cac": BudgetCMCNoCACTrainer,
            "cmc-no-csc": BudgetCMCNoCSCTrainer, "cmc-no-unlabeled-losses": BudgetCMCNoUnlabeledLossTrainer}


def head_scores(trainer, folder: Path, case_ids: list[str]) -> dict:
    """Dice per class of each modality head alone (argmax of that head's softmax)."""
    import torch
    from cmcseg.training.cmc_trainer import as_scales
    from cmcseg.training.validation import nanmean, validate_cases

    network = trainer.inference_network()
    network.eval()
    out = {}
    for m, name in enumerate(trainer.plans["modalities"]):
        def predict(x, m=m):
            return torch.softmax(as_scales(network(x).logits[m])[0].float(), dim=1)
        per_case = validate_cases(predict, folder, case_ids, trainer.patch_size, trainer.labels, trainer.device,
                                  trainer.sliding_window_overlap, trainer.sliding_window_batch_size)
        out[name] = {c: nanmean([v[c] for v in per_case.values()]) for c in trainer.labels.names}
    return out


def worker_ours(spec: dict) -> dict:
    import torch
    from cmcseg.paths import WorkRoots
    from cmcseg.training.trainer import TrainingRequest

    torch.set_num_threads(spec["threads"])
    cls = budget_trainer_classes()[spec["arm"]]
    cls.budget_s = float(spec["budget_s"])
    cls.features = list(spec["features"])
    cls.clock = spec["clock"]
    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    trainer = cls(TrainingRequest(DATASET, FOLD, spec["labeled"], roots=roots, device=spec["device"],
                                  num_workers=spec["workers"], seed=spec["seed"]))
    folder = trainer.run()
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    heads = head_scores(trainer, trainer.preprocessed_folder / trainer.config["data_identifier"],
                        list(trainer.cases.validation))
    history = trainer.history.state_dict()
    return {
        "dice_mean": summary["mean"], "dice_per_case": summary["per_case"],
        "dice_per_head": heads,
        "iterations": trainer.iterations_done, "epochs_completed": trainer.current_epoch,
        "train_wall_s": trainer.train_wall_s, "train_cpu_s": trainer.train_cpu_s,
        "rows": {"labeled": trainer.labeled_rows, "unlabeled": trainer.unlabeled_rows},
        "batch": {"labeled": trainer.labeled_batch_size, "unlabeled": trainer.unlabeled_batch_size},
        "cases": {"labeled": list(trainer.cases.labeled), "unlabeled": list(trainer.cases.unlabeled),
                  "validation": list(trainer.cases.validation)},
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "patch_size": trainer.patch_size,
        "history": {"epochs": history["epochs"],
                    "values": {k: v for k, v in history["values"].items() if k.startswith(("loss", "weight"))}},
    }


# ============================================================================================ nnU-Net arm
def worker_nnunet(spec: dict) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from cmcseg.image_io import read_json
    from cmcseg.preprocessing.storage import load_case
    from cmcseg.training.validation import LabelInfo, case_dice, nanmean

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    trainer = nd.build_trainer(plans, dataset_json, FOLD, spec["device"])
    trainer.on_train_start()
    trainer.network.train()
    budget = float(spec["budget_s"])
    iterations = 0
    start, cpu_start, budget_start = time.perf_counter(), time.process_time(), budget_clock(spec["clock"])
    try:
        while True:
            fraction = (budget_clock(spec["clock"]) - budget_start) / budget
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
    # predict the validation cases with nnU-Net's predictor, on the grid of cmcseg's preprocessed arrays
    raw = Path(spec["nnunet_raw_dataset"])
    out_dir = Path(spec["work"]) / "nnunet_predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    val = list(spec["validation"])
    n_channels = len(dataset_json["channel_names"])
    inputs = [[str(raw / "imagesTr" / f"{c}_{k:04d}.nii.gz") for k in range(n_channels)] for c in val]
    nd.predict_files(trainer, inputs, [str(out_dir / c) for c in val])
    cm_plans = read_json(Path(spec["preprocessed"]) / DATASET / "plans.json")
    labels = LabelInfo.from_plans(cm_plans)
    folder = Path(spec["preprocessed"]) / DATASET / cm_plans["configurations"]["3d_fullres"]["data_identifier"]
    per_case = {}
    for c in val:
        _data, seg, _fov, _props = load_case(folder, c)
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{c}.nii.gz"))).astype(np.int64)
        reference = np.asarray(seg[:])
        if prediction.shape != reference.shape[1:]:
            raise RuntimeError(f"nnU-Net's prediction of {c} has shape {prediction.shape}, the reference "
                               f"{reference.shape[1:]}")
        onehot = torch.nn.functional.one_hot(torch.from_numpy(prediction), labels.num_classes)
        per_case[c] = case_dice(onehot.permute(3, 0, 1, 2).float(), reference, labels)
    mean = {name: nanmean([v[name] for v in per_case.values()]) for name in labels.names}
    return {"dice_mean": mean, "dice_per_case": per_case, "iterations": iterations, "train_wall_s": train_wall,
            "train_cpu_s": train_cpu, "batch": {"labeled": trainer.batch_size},
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "patch_size": list(trainer.configuration_manager.patch_size)}


# ============================================================================================ orchestration
def prepare(work: Path, args) -> dict:
    from cmcseg.phantoms import synthesize
    from cmcseg.plans.splits import labeled_subset, load_splits, unlabeled_subset

    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    t0 = time.perf_counter()
    synthesize("MSCMR", raw / DATASET, cases=args.cases, seed=args.seed, size=args.size)
    plans = nd.plan_with_cmcseg(DATASET, raw, pre, "3d_fullres", ["--memory-gb", str(args.memory_gb)])
    splits = load_splits(pre / DATASET / "splits.json")
    labeled = labeled_subset(splits, FOLD, args.labeled)
    validation = list(splits["folds"][FOLD]["val"])
    if len(labeled) < 2:
        raise SystemExit(f"--labeled {args.labeled} leaves {len(labeled)} labeled case(s) in fold {FOLD}; "
                         "pass more --cases")
    env = nd.nnunet_env(work, data_workers=args.workers, threads=args.threads)
    raw_folder = nd.write_aligned_raw(pre / DATASET, plans, labeled + validation, Path(env["nnUNet_raw"]),
                                      NNUNET_ID, "MSCMRaligned")
    native, nn_plan_s = nd.plan_and_preprocess(NNUNET_ID, env, workers=2)
    nd.write_splits(env, NNUNET_ID, labeled, validation)
    config = plans["configurations"]["3d_fullres"]
    forced = nd.forced_plans(native, config["patch_size"], config["batch_size"],
                             small_architecture(config["architecture"], args.features))
    plans_file = work / "nnunet_forced_plans.json"
    plans_file.write_text(json.dumps(forced, indent=1))
    return {
        "work": str(work), "raw": str(raw), "preprocessed": str(pre), "results": str(res), "env": env,
        "nnunet_plans": str(plans_file), "nnunet_raw_dataset": str(raw_folder),
        "nnunet_dataset_json": str(nd.preprocessed_folder(env, NNUNET_ID) / "dataset.json"),
        "labeled": labeled, "validation": validation,
        "unlabeled": unlabeled_subset(splits, FOLD, args.labeled),
        "cmcseg_plan": {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                        "spacing": config["spacing"]},
        "nnunet_native_plan": nd.configuration_summary(native), "nnunet_forced_plan": nd.configuration_summary(forced),
        "setup_s": time.perf_counter() - t0, "nnunet_plan_and_preprocess_s": nn_plan_s,
    }


def run_arm(arm: str, setup: dict, args) -> dict:
    spec = {k: setup[k] for k in ("work", "raw", "preprocessed", "results", "nnunet_plans", "nnunet_raw_dataset",
                                   "nnunet_dataset_json", "validation")}
    spec.update(arm=arm, budget_s=args.budget_minutes * 60.0, clock=args.clock, features=args.features,
                labeled=args.labeled, threads=args.threads, workers=args.workers, device=args.device, seed=args.seed)
    return nd.run_worker(Path(__file__).resolve(), arm, spec, Path(setup["work"]), setup["env"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-minutes", type=float, default=6.0, help="wall-clock training time of every arm")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what the budget counts: wall-clock seconds of training, or CPU seconds of the training "
                         "process (equal compute per arm even when other jobs load a shared machine; slower)")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="comma-separated arms: " + ",".join(ARMS) + "; diagnostics: " + ",".join(ABLATIONS))
    ap.add_argument("--size", default="small", choices=("tiny", "small", "default"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--labeled", type=float, default=0.2)
    ap.add_argument("--memory-gb", type=float, default=0.75,
                    help="cmcseg plan budget, shared by the M branches (0.75: patch [10, 80, 64], batch 2)")
    ap.add_argument("--features", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 64],
                    help="features per stage of the small network (all arms)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="data-augmentation processes per arm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    nd.add_worker_arguments(ap, ARMS + ABLATIONS)
    args = ap.parse_args()

    if args.worker:
        nd.serve_worker(args.spec, args.result, worker_nnunet if args.worker == "nnunet" else worker_ours)
        return

    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; choose from {ARMS + ABLATIONS}")
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("worker", "spec", "result")},
              "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg()}, "arms": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semi_supervised_gain_") as tmp:
        work = Path(tmp)
        setup = prepare(work, args)
        report["setup"] = {k: v for k, v in setup.items() if k not in ("env", "work")}
        print(f"setup (synth, cmcseg plan, nnU-Net plan and preprocess): {setup['setup_s']:.0f} s", flush=True)
        for arm in arms:
            report["arms"][arm] = run_arm(arm, setup, args)
            print(f"{ARM_TITLES[arm]}: {report['arms'][arm]['iterations']} iterations, process "
                  f"{report['arms'][arm]['process_wall_s']:.0f} s, Dice "
                  f"{ {k: round(v, 4) for k, v in report['arms'][arm]['dice_mean'].items()} }", flush=True)
    report["host"]["loadavg_end"] = loadavg()
    report["total_wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / ("semi_supervised_gain.json" if set(arms) <= set(ARMS)
                           else "semi_supervised_gain_ablations.json")
    out_file.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {out_file}")


def _fmt(v: float) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"


def print_report(report: dict) -> None:
    s, a = report["setup"], report["args"]
    print(f"\nMSCMR phantom ({a['size']}, {a['cases']} cases), fold {FOLD} at --labeled {a['labeled']}: "
          f"{len(s['labeled'])} labeled, {len(s['unlabeled'])} unlabeled, {len(s['validation'])} validation cases")
    print(f"cmcseg plan --memory-gb {a['memory_gb']}: patch {s['cmcseg_plan']['patch_size']}, batch "
          f"{s['cmcseg_plan']['batch_size']}; network features {a['features']}, 1 residual block per stage")
    print(f"nnU-Net forced to {s['nnunet_forced_plan']}")
    print(f"budget {a['budget_minutes']} min ({a['clock']} clock) of training per arm, {a['threads']} thread(s), "
          f"{a['workers']} data worker(s); load average {report['host']['loadavg_start']} -> "
          f"{report['host']['loadavg_end']} on {report['host']['cpus']} CPUs\n")
    head = f"{'arm':<30}" + "".join(f"{c:>11}" for c in CLASSES) + f"{'mean':>8}{'iters':>7}{'s/it':>7}" \
        f"{'cpu s':>7}{'params M':>9}  batch"
    print(head)
    for arm, r in report["arms"].items():
        dice = [r["dice_mean"].get(c, math.nan) for c in CLASSES]
        finite = [d for d in dice if d is not None and not math.isnan(d)]
        mean = sum(finite) / len(finite) if finite else math.nan
        print(f"{ARM_TITLES[arm]:<30}" + "".join(f"{_fmt(d):>11}" for d in dice) + f"{_fmt(mean):>8}"
              f"{r['iterations']:7d}{r['train_wall_s'] / max(1, r['iterations']):7.2f}{r['train_cpu_s']:7.0f}"
              f"{r['parameters'] / 1e6:9.2f}  {r['batch']}")
    for arm, r in report["arms"].items():
        if "dice_per_head" in r:
            print(f"\n{ARM_TITLES[arm]}: each modality head alone")
            for modality, d in r["dice_per_head"].items():
                print(f"   {modality:<8}" + "".join(f"{_fmt(d.get(c)):>11}" for c in CLASSES))
    for arm, r in report["arms"].items():
        print(f"\n{ARM_TITLES[arm]}: per validation case")
        for case, d in r["dice_per_case"].items():
            print(f"   {case:<12}" + "".join(f"{_fmt(d.get(c)):>11}" for c in CLASSES))


if __name__ == "__main__":
    main()
