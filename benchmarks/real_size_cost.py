"""Real-size cost: cmcseg and nnU-Net, each at its own default plan, on the same data, in one run.

A user compares the tools at the plans they make for the user's data, not at a shared toy patch. So
each tool plans with its defaults (cmcseg: the CPU or GPU budget of ``cmcseg plan``; nnU-Net:
``nnUNetv2_plan_and_preprocess``), and then, per configuration (2d, 3d_fullres):

* **plan**: wall time and peak RSS of the process tree of each tool's plan-and-preprocess command;
* **train**: seconds per iteration over ``--iters`` steps after ``--warmup``, peak RSS of the training
  process, against cmcseg's budget and its estimate (``cmcseg.plans.memory``), at each ``--labeled``
  fraction (cmcseg: ``--labeled 0.2`` adds unlabeled rows and the EMA teacher; its unlabeled terms
  run from the first step here, as they do for most of a real run). nnU-Net trains on the labeled
  cases at its own plan;
* **checkpoints**: the size of cmcseg's ``checkpoint_final.pt`` (weights) and ``checkpoint_latest.pt``
  (resume state), and of nnU-Net's checkpoint;
* **predict** (``--predict-cases N``): seconds per case and peak RSS of ``cmcseg predict`` and of
  nnU-Net's ``nnUNetPredictor`` on the same N cases, with and without mirroring TTA. cmcseg predicts in
  ``--precision`` (default ``auto``: bfloat16 on a CPU with native bfloat16 instructions), nnU-Net in float32, as
  each does by default on a CPU;
* **final validation**: seconds per case of the trainer's end-of-training validation on the first N
  validation cases (first ``--labeled`` fraction), the fused prediction alone and with each modality
  alone as well (``per_head``, the default), against nnU-Net's TTA prediction per case (what
  nnU-Net's own final validation runs).

nnU-Net cannot read sequences on different grids, so it plans and predicts the aligned cases that
cmcseg writes (``nnunet_driver.write_aligned_raw``). Weights are the few-step trained ones (timing
and memory do not depend on them). Every process runs ``--threads`` torch threads.

Data: ``--data myops_dev`` (``../shared/data/myops_dev`` via ``cmcseg convert --from myops``) or
``--data phantom`` (the MSCMR phantom).

Usage: python benchmarks/real_size_cost.py [--data myops_dev|phantom] [--configurations 2d 3d_fullres]
       [--labeled 1.0 0.2] [--iters 2] [--warmup 1] [--predict-cases 2] [--threads 1] [--precision auto]
       [--plan-only] [--work DIR]
       [--out benchmarks/out]
Writes benchmarks/out/real_size_cost_<data>.json (``_plan.json`` with ``--plan-only``) and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nnunet_driver as nd
from measure import loadavg, run_measured

REPO = Path(__file__).resolve().parents[1]
NNUNET_ID = 611
FOLD = 0
WORKERS = ("ours_train", "nnunet_train", "nnunet_predict")


# ============================================================================================ workers
def _timed_steps(next_batch, step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step(next_batch())
    start = time.perf_counter()
    for _ in range(iters):
        step(next_batch())
    return (time.perf_counter() - start) / max(iters, 1)


def worker_ours_train(spec: dict) -> dict:
    """A few CMC training steps at cmcseg's plan; then final (weights) and latest (resume) checkpoints."""
    import torch

    from cmcseg.paths import WorkRoots
    from cmcseg.training.cmc_trainer import CMCTrainer
    from cmcseg.training.trainer import TrainingRequest

    torch.set_num_threads(spec["threads"])

    class WholeObjectiveTrainer(CMCTrainer):
        """Every term from the first step (the teacher runs): the step most of a real run takes."""

        unlabeled_warmup = 0.0

    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    n = spec["warmup"] + spec["iters"]
    trainer = WholeObjectiveTrainer(TrainingRequest(
        spec["dataset"], FOLD, spec["labeled"], configuration=spec["configuration"], roots=roots, device="cpu",
        plans=spec.get("plans", "cmcsegPlans"),
        num_epochs=1, iterations_per_epoch=n, val_iterations=0, num_workers=1))
    trainer.initialize()
    trainer.on_train_start()
    trainer.on_epoch_start()

    def step(batch: dict) -> None:
        trainer.train_step(batch)
        trainer.global_step += 1
        trainer.iteration += 1

    try:
        seconds = _timed_steps(lambda: next(trainer.dataloader), step, spec["warmup"], spec["iters"])
        final, latest = trainer.save_checkpoint("final"), trainer.save_checkpoint("latest")
        validation = time_final_validation(trainer, spec.get("validation_cases", 0))
    finally:
        trainer.close()
    return {"s_per_it": seconds, "estimate": trainer.memory_estimate.as_dict(),
            "budget_gb": trainer.plans.get("memory_budget_gb"), "patch_size": trainer.patch_size,
            "batch": [trainer.labeled_batch_size, trainer.unlabeled_batch_size],
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "checkpoint_final_mb": final.stat().st_size / 2 ** 20,
            "checkpoint_latest_mb": latest.stat().st_size / 2 ** 20, "model_folder": str(trainer.output_folder.parent),
            "validation_s_per_case": validation}


def time_final_validation(trainer, cases: int) -> dict[str, float]:
    """Seconds per case of the end-of-training validation on the fold's first ``cases`` validation cases: the fused
    prediction alone, and with each modality alone too (the default, for ``per_head``)."""
    if cases <= 0 or not trainer.cases.validation:
        return {}
    import dataclasses

    import monai.metrics  # noqa: F401  (loaded once per training run by the first case's Dice; not a per-case cost)

    trainer.cases = dataclasses.replace(trainer.cases, validation=trainer.cases.validation[:cases])
    seconds = {}
    for tag, heads in (("fused", False), ("fused_and_each_modality", True)):
        trainer.validate_each_modality = heads
        start = time.perf_counter()
        trainer.run_final_validation()
        seconds[tag] = (time.perf_counter() - start) / len(trainer.cases.validation)
    return seconds


def _nnunet_trainer(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    return nd.build_trainer(plans, dataset_json, FOLD, "cpu", configuration=spec["configuration"])


def worker_nnunet_train(spec: dict) -> dict:
    """A few nnU-Net training steps at nnU-Net's own plan; then its checkpoint."""
    trainer = _nnunet_trainer(spec)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    try:
        seconds = _timed_steps(lambda: next(trainer.dataloader_train), trainer.train_step, spec["warmup"],
                               spec["iters"])
        checkpoint = Path(spec["checkpoint"])
        trainer.save_checkpoint(str(checkpoint))
    finally:
        for gen in (trainer.dataloader_train, trainer.dataloader_val):
            finish = getattr(gen, "_finish", None)
            if finish is not None:
                finish()
    config = trainer.configuration_manager
    return {"s_per_it": seconds, "patch_size": list(config.patch_size), "batch": [trainer.batch_size],
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "checkpoint_mb": checkpoint.stat().st_size / 2 ** 20}


def worker_nnunet_predict(spec: dict) -> dict:
    """nnU-Net's predictor on the given cases, with the network of the checkpoint the train worker wrote."""
    import torch

    trainer = _nnunet_trainer(spec)
    trainer.initialize()
    state = torch.load(spec["checkpoint"], map_location="cpu", weights_only=False)
    trainer.network.load_state_dict(state["network_weights"])
    start = time.perf_counter()
    nd.predict_files(trainer, spec["inputs"], spec["outputs"], use_mirroring=spec["tta"])
    return {"predict_s": time.perf_counter() - start}


# ============================================================================================ orchestration
def plans_identifier(planner: str) -> str:
    """The plans identifier ``cmcseg plan -pl planner`` writes."""
    from cmcseg.plans.planner import PLANNERS

    return PLANNERS[planner].default_plans_name


def prepare(work: Path, args) -> dict:
    """Raw data; each tool's plan, measured; nnU-Net's copy of the aligned labeled cases."""
    from cmcseg.plans.files import plans_file_name
    from cmcseg.plans.splits import load_splits

    raw, pre = work / "raw", work / "preprocessed"
    if args.data == "phantom":
        from cmcseg.phantoms import synthesize

        dataset = "Dataset501_MSCMR"
        synthesize("MSCMR", raw / dataset, seed=0, size=args.size)
    else:
        dataset = nd.convert_myops(args.source, raw)
    env_ours = {"OMP_NUM_THREADS": str(args.threads), "PATH": str(nd.BIN)}
    ours_plan = run_measured([str(nd.BIN / "cmcseg"), "plan", "-d", dataset, "-c", *args.configurations, "-np", "2",
                              "-pl", args.planner, "--raw", str(raw), "--preprocessed", str(pre)],
                             env={**os.environ, **env_ours})
    if ours_plan.returncode != 0:
        raise SystemExit(f"cmcseg plan failed:\n{ours_plan.output_tail}")
    plans = json.loads((pre / dataset / plans_file_name(plans_identifier(args.planner))).read_text())
    splits = load_splits(pre / dataset / "splits.json")
    train, validation = list(splits["folds"][FOLD]["labeled_order"]), list(splits["folds"][FOLD]["val"])
    env = nd.nnunet_env(work, data_workers=1, threads=args.threads)
    aligned = "3d_fullres" if "3d_fullres" in args.configurations else args.configurations[0]
    nd.write_aligned_raw(pre / dataset, plans, train + validation, Path(env["nnUNet_raw"]), NNUNET_ID, "REALSIZE",
                         configuration=aligned)
    nn_plan = run_measured([str(nd.BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID), "-c",
                            *args.configurations, "-np", "2", "-npfp", "2"], env=env)
    if nn_plan.returncode != 0:
        raise SystemExit(f"nnUNetv2_plan_and_preprocess failed:\n{nn_plan.output_tail}")
    nd.write_splits(env, NNUNET_ID, train, validation)
    nn_pre = nd.preprocessed_folder(env, NNUNET_ID)
    return {"dataset": dataset, "raw": str(raw), "preprocessed": str(pre), "env": env, "train": train,
            "plans_identifier": plans_identifier(args.planner),
            "validation": validation, "nnunet_plans": str(nn_pre / "nnUNetPlans.json"),
            "nnunet_dataset_json": str(nn_pre / "dataset.json"),
            "plan": {"cmcseg": {"wall_s": ours_plan.wall_s, "peak_tree_rss_gb": ours_plan.peak_tree_rss_gb},
                     "nnunet": {"wall_s": nn_plan.wall_s, "peak_tree_rss_gb": nn_plan.peak_tree_rss_gb}}}


def predict_inputs(setup: dict, work: Path, cases: list[str]) -> tuple[Path, list[list[str]]]:
    """cmcseg's raw images of ``cases`` in one folder (links), and nnU-Net's aligned copies of them."""
    folder = work / "predict_input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    images = Path(setup["raw"]) / setup["dataset"] / "imagesTr"
    for case in cases:
        for path in images.glob(f"{case}_[0-9][0-9][0-9][0-9].*"):
            (folder / path.name).symlink_to(path)
    nn_images = Path(setup["env"]["nnUNet_raw"]) / nd.dataset_folder_name(NNUNET_ID, "REALSIZE") / "imagesTr"
    return folder, [sorted(str(p) for p in nn_images.glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz")) for case in cases]


def run_predict(setup: dict, work: Path, configuration: str, model: str, nn_checkpoint: Path, args) -> dict:
    cases = setup["validation"][:args.predict_cases]
    folder, nn_inputs = predict_inputs(setup, work, cases)
    rows = {}
    for tta in (True, False):
        tag = "tta" if tta else "no_tta"
        out = work / f"pred_{configuration}_{tag}"
        shutil.rmtree(out, ignore_errors=True)
        ours = run_measured([str(nd.BIN / "cmcseg"), "predict", "-i", str(folder), "-o", str(out), "-m", model,
                             "-f", str(FOLD), "--device", "cpu", "-np", "1", "--precision", args.precision,
                             *([] if tta else ["--no-tta"])],
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if ours.returncode != 0:
            raise SystemExit(f"cmcseg predict failed:\n{ours.output_tail}")
        nn_out = work / f"nnpred_{configuration}_{tag}"
        nn_out.mkdir(exist_ok=True)
        theirs = nd.run_worker(Path(__file__), "nnunet_predict", {
            "configuration": configuration, "threads": args.threads, "nnunet_plans": setup["nnunet_plans"],
            "nnunet_dataset_json": setup["nnunet_dataset_json"], "checkpoint": str(nn_checkpoint),
            "inputs": nn_inputs, "outputs": [str(nn_out / c) for c in cases], "tta": tta}, work, setup["env"])
        rows[tag] = {"cmcseg_s_per_case": ours.wall_s / len(cases), "cmcseg_peak_tree_rss_gb": ours.peak_tree_rss_gb,
                     "nnunet_s_per_case": theirs["process_wall_s"] / len(cases),
                     "nnunet_peak_tree_rss_gb": theirs["peak_tree_rss_gb"], "cases": cases}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("myops_dev", "phantom"), default="myops_dev")
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "myops_dev")
    ap.add_argument("--size", default="small", help="phantom size")
    ap.add_argument("--configurations", nargs="+", default=["2d", "3d_fullres"])
    ap.add_argument("--labeled", nargs="+", type=float, default=[1.0, 0.2])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--predict-cases", type=int, default=2, help="0: no prediction arms")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="cmcseg predict --precision (auto: bfloat16 on a CPU with native bfloat16 instructions); "
                         "nnU-Net predicts in float32 on a CPU")
    ap.add_argument("--planner", default="ResEncM", choices=("ResEncM", "PlainConvUNet"),
                    help="cmcseg's planner (cmcseg plan -pl); nnU-Net always plans with its default")
    ap.add_argument("--plan-only", action="store_true",
                    help="measure each tool's plan-and-preprocess only (a few minutes instead of half an hour)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    nd.add_worker_arguments(ap, WORKERS)
    args = ap.parse_args()
    if args.worker:
        nd.serve_worker(args.spec, args.result, globals()[f"worker_{args.worker}"])
        return
    with tempfile.TemporaryDirectory(prefix="real_size_cost_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "loadavg_start": loadavg()}
        setup = prepare(work, args)
        report["plan"] = setup["plan"]
        report["configurations"] = {}
        for configuration in ([] if args.plan_only else args.configurations):
            row: dict = {"cmcseg": {}}
            for fraction in args.labeled:
                row["cmcseg"][str(fraction)] = nd.run_worker(Path(__file__), "ours_train", {
                    "dataset": setup["dataset"], "raw": setup["raw"], "preprocessed": setup["preprocessed"],
                    "results": str(work / f"results_{configuration}_{fraction}"), "configuration": configuration,
                    "labeled": fraction, "threads": args.threads, "warmup": args.warmup, "iters": args.iters,
                    "plans": setup.get("plans_identifier", "cmcsegPlans"),
                    "validation_cases": args.predict_cases if fraction == args.labeled[0] else 0},
                    work, {**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            nn_checkpoint = work / f"nnunet_{configuration}.pth"
            row["nnunet"] = nd.run_worker(Path(__file__), "nnunet_train", {
                "configuration": configuration, "threads": args.threads, "warmup": args.warmup, "iters": args.iters,
                "nnunet_plans": setup["nnunet_plans"], "nnunet_dataset_json": setup["nnunet_dataset_json"],
                "checkpoint": str(nn_checkpoint)}, work, setup["env"])
            if args.predict_cases > 0:
                model = row["cmcseg"][str(args.labeled[0])]["model_folder"]
                row["predict"] = run_predict(setup, work, configuration, model, nn_checkpoint, args)
            report["configurations"][configuration] = row
        report["loadavg_end"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"real_size_cost_{args.data}{'_plan' if args.plan_only else ''}.json"
    out_file.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwrote {out_file}")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_report(report: dict) -> None:
    """One table: each figure for cmcseg and nnU-Net, and their ratio."""
    rows = [("plan + preprocess, wall s", report["plan"]["cmcseg"]["wall_s"], report["plan"]["nnunet"]["wall_s"]),
            ("plan + preprocess, peak RSS GB", report["plan"]["cmcseg"]["peak_tree_rss_gb"],
             report["plan"]["nnunet"]["peak_tree_rss_gb"])]
    notes = []
    for name, row in report["configurations"].items():
        nn = row["nnunet"]
        notes.append(f"{name}: nnU-Net patch {nn['patch_size']} batch {nn['batch']}, {nn['parameters'] / 1e6:.1f}M "
                     "parameters")
        for fraction, ours in row["cmcseg"].items():
            est = ours["estimate"]
            tag = f"{name}, --labeled {fraction}"
            rows.append((f"{tag}: s/it", ours["s_per_it"], nn["s_per_it"]))
            rows.append((f"{tag}: training peak RSS GB (main)", ours["peak_main_rss_gb"], nn["peak_main_rss_gb"]))
            notes.append(f"{tag}: cmcseg patch {ours['patch_size']} batch {ours['batch']}, "
                         f"{ours['parameters'] / 1e6:.1f}M parameters; estimate {est['total_gb']:.2f} GB, budget "
                         f"{ours['budget_gb']} GB, measured main {ours['peak_main_rss_gb']:.2f} GB, tree "
                         f"{ours['peak_tree_rss_gb']:.2f} GB RSS, {ours.get('peak_tree_pss_gb', float('nan')):.2f} GB "
                         "PSS")
        first = row["cmcseg"][next(iter(row["cmcseg"]))]
        rows.append((f"{name}: checkpoint final MB", first["checkpoint_final_mb"], nn["checkpoint_mb"]))
        rows.append((f"{name}: checkpoint latest MB", first["checkpoint_latest_mb"], nn["checkpoint_mb"]))
        for tag, pred in row.get("predict", {}).items():
            rows.append((f"{name}: predict s/case, {tag}", pred["cmcseg_s_per_case"], pred["nnunet_s_per_case"]))
            rows.append((f"{name}: predict peak RSS GB, {tag}", pred["cmcseg_peak_tree_rss_gb"],
                         pred["nnunet_peak_tree_rss_gb"]))
        # nnU-Net's end-of-training validation predicts each case with mirroring: its TTA prediction is the reference
        nn_tta = row.get("predict", {}).get("tta", {}).get("nnunet_s_per_case")
        for tag, seconds in first.get("validation_s_per_case", {}).items():
            rows.append((f"{name}: final validation s/case, {tag.replace('_', ' ')}", seconds, nn_tta))
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'cmcseg':>9}  {'nnU-Net':>9}  {'ratio':>6}")
    for label, ours, theirs in rows:
        theirs_text = f"{theirs:>9.2f}" if theirs is not None else f"{'-':>9}"
        print(f"{label:<{width}}  {ours:>9.2f}  {theirs_text}  {_ratio(ours, theirs):>6}")
    print(f"load average: start {report['loadavg_start']}, end {report['loadavg_end']}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    sys.exit(main())
