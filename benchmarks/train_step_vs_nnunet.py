"""Seconds per training iteration: cmcseg's CMCTrainer against nnU-Net's nnUNetTrainer, same patch, batch and data.

Data: an MSCMR phantom (paired bSSFP, LGE, T2 on their own grids) planned by ``cmcseg plan``
(3d_fullres, a small ``--memory-gb`` so that one iteration takes seconds on a CPU). nnU-Net
gets the same aligned voxels: cmcseg's preprocessed arrays of the labeled cases are written
as an nnU-Net raw dataset with co-registered channels (benchmarks/nnunet_driver.py), then
``nnUNetv2_plan_and_preprocess`` runs and its 3d_fullres plan is forced to cmcseg's patch
size, batch size and architecture (the same ``ResidualEncoderUNet`` arch_kwargs: one nnU-Net
network is exactly one cmcseg modality branch, with 3 input channels instead of 1 + FOV mask).

* ours: ``CMCTrainer`` at ``--labeled 0.2`` (fold 0), its default network (one network over the 3 modalities;
  ``M`` in the report is its branch count, 1), the plan's batch of labeled rows plus half as many unlabeled rows,
  supervised + pseudo-label (EMA teacher forward) losses from the first step (no warm-up) on every
  ``unlabeled_every``-th step (``--unlabeled-every``; the steps between run the labeled rows alone), ``--workers``
  data worker process(es);
* nnU-Net: ``nnUNetTrainer`` built through its Python API on the fold's labeled training cases,
  ``nnUNet_n_proc_DA = --workers``.

Each trainer runs in a process of its own with ``--threads`` torch/OpenMP threads (default 1:
the machine is shared; compare within one run only), in rounds ordered ours, nnU-Net,
nnU-Net, ours, ... so that a drift in machine load hits both alike. The first ``--warmup``
iterations of each process are skipped; the next ``--iters`` are timed. Per iteration:
time blocked in ``next(batch iterator)`` (data wait) and in ``train_step`` (synchronised on
CUDA). Forward hooks split the step into encoders, bottleneck (attention + fusion),
decoders, losses, optimizer step and the rest (backward, clipping). On CPU always; on CUDA
too when ``torch.cuda.is_available()``.

Report: ours s/it, ours s/it per branch (ours / M), nnU-Net s/it, the ratios (ours / nnU-Net: the issue's goal is
<= 1.5 with the unlabeled rows on top; ours per branch / nnU-Net <= 1), data-wait share of both. Goal: data wait
< 5 %.

On CUDA, ``--amp bf16`` runs both trainers' autocast in bfloat16 (nnU-Net's patched to it) and
``--compile on`` wraps both networks in ``torch.compile`` (nnU-Net through its ``nnUNet_compile``);
the peak of torch's allocated GPU memory is reported per trainer.

Usage: python benchmarks/train_step_vs_nnunet.py [--memory-gb 0.75] [--iters 5] [--warmup 2] [--rounds 2]
       [--devices auto|cpu|cuda] [--amp fp16|bf16] [--compile off|on] [--tag _bf16]
Writes benchmarks/out/train_step_vs_nnunet.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nnunet_driver as nd  # noqa: E402
from measure import loadavg  # noqa: E402

DATASET = "Dataset501_MSCMR"
NNUNET_ID = 911
FOLD = 0
LABELED = 0.2


# ============================================================================================ timing helpers
class PhaseTimer:
    """Accumulates wall time of module forwards, a wrapped callable and optimizer steps (per timed iteration)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.active = False
        self._starts: dict[int, float] = {}

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def module(self, name: str, module) -> None:
        def pre(mod, _inputs):
            if self.active:
                self._starts[id(mod)] = self._now()

        def post(mod, _inputs, _output):
            if self.active and id(mod) in self._starts:
                self.totals[name] += self._now() - self._starts.pop(id(mod))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def optimizer(self, optimizer) -> None:
        key = "optimizer step"

        def pre(_opt, _args, _kwargs):
            if self.active:
                self._starts[key] = self._now()

        def post(_opt, _args, _kwargs):
            if self.active and key in self._starts:
                self.totals[key] += self._now() - self._starts.pop(key)

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += self._now() - start
        return wrapped


def timed_loop(next_batch, step, warmup: int, iters: int, timer: PhaseTimer, sync) -> dict:
    """Run warmup + iters iterations; returns the timed iterations' data waits and step times."""
    import torch

    waits, steps, cpus = [], [], []
    for i in range(warmup + iters):
        timer.active = i >= warmup
        c0 = time.process_time()
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        step(batch)
        sync()
        t2 = time.perf_counter()
        if i >= warmup:
            waits.append(t1 - t0)
            steps.append(t2 - t1)
            cpus.append(time.process_time() - c0)
    timer.active = False
    return {"wait_s": waits, "step_s": steps, "cpu_s": cpus, "torch_threads": torch.get_num_threads()}


#: --amp -> the trainers' autocast dtype on CUDA (both are off on CPU)
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def _reset_gpu_peak(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(device: str) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def _sync_for(device: str):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


# ============================================================================================ workers
def worker_ours(spec: dict) -> dict:
    import torch

    from cmcseg.paths import WorkRoots
    from cmcseg.training.cmc_trainer import CMCTrainer
    from cmcseg.training.trainer import TrainingRequest

    torch.set_num_threads(spec["threads"])
    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    n = spec["warmup"] + spec["iters"]
    class SteadyStateCMCTrainer(CMCTrainer):
        """The whole objective from the first step (no warm-up, when only labeled rows run): what a step costs."""

        unlabeled_warmup = 0.0
        amp_dtype = AMP_DTYPES[spec["amp"]]
        unlabeled_every = int(spec.get("unlabeled_every") or CMCTrainer.unlabeled_every)

    trainer = SteadyStateCMCTrainer(TrainingRequest(DATASET, FOLD, LABELED, roots=roots, device=spec["device"],
                                                    num_epochs=1, iterations_per_epoch=n, val_iterations=0,
                                                    num_workers=spec["workers"]))
    t_init = time.perf_counter()
    trainer.initialize()
    trainer.on_train_start()
    trainer.on_epoch_start()
    init_s = time.perf_counter() - t_init
    sync = _sync_for(spec["device"])
    timer = PhaseTimer(sync)
    net = trainer.network
    if spec["compile"]:  # the phase hooks would break the compiled graph: totals only
        trainer.network = torch.compile(net)
    else:
        timer.module("forward (all)", net)
        for enc in net.encoders:
            timer.module("encoders", enc)
        for dec in net.decoders:
            timer.module("decoders", dec)
        bottleneck = [*net.attention] if net.attention is not None else []
        bottleneck += [net.fusion] if net.fusion is not None else []
        for mod in bottleneck:
            timer.module("attention + fusion", mod)
        trainer.compute_losses = timer.wrap("forward + losses", trainer.compute_losses)
    timer.optimizer(trainer.optimizer)

    def step(batch):
        trainer.train_step(batch)
        trainer.global_step += 1
        trainer.iteration += 1

    _reset_gpu_peak(spec["device"])
    try:
        result = timed_loop(lambda: next(trainer.dataloader), step, spec["warmup"], spec["iters"], timer, sync)
    finally:
        trainer.close()
    phases = dict(timer.totals)
    if "forward + losses" in phases:
        phases["losses"] = phases.pop("forward + losses") - phases["forward (all)"]
    return {**result, "phases_s": phases, "init_s": init_s, "branches": int(net.n_branches),
            "peak_gpu_gb": _gpu_peak(spec["device"]),
            "parameters": sum(p.numel() for p in net.parameters()),
            "batch": {"labeled": trainer.labeled_batch_size, "unlabeled": trainer.unlabeled_batch_size},
            "unlabeled_every": int(trainer.unlabeled_every),
            "patch_size": trainer.patch_size, "input_channels": int(sum(e.in_channels for e in net.encoders))}


def worker_nnunet(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ["nnUNet_compile"] = "t" if spec["compile"] else "f"  # nnU-Net compiles on CUDA unless told not to
    if spec["amp"] == "bf16":  # nnU-Net's train_step calls torch.autocast(device) (fp16): make it bf16
        import functools

        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

        nnunet_trainer_module.autocast = functools.partial(torch.autocast, dtype=torch.bfloat16)
    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    t_init = time.perf_counter()
    trainer = nd.build_trainer(plans, dataset_json, FOLD, spec["device"])
    trainer.on_train_start()  # initialize(), data loaders (first batch drawn), unpacking
    trainer.on_train_epoch_start()
    init_s = time.perf_counter() - t_init
    sync = _sync_for(spec["device"])
    timer = PhaseTimer(sync)
    net = getattr(trainer.network, "_orig_mod", trainer.network)  # compiled: totals only
    if net is trainer.network:
        timer.module("forward (all)", net)
        timer.module("encoders", net.encoder)
        timer.module("decoders", net.decoder)
        timer.module("losses", trainer.loss)
    timer.optimizer(trainer.optimizer)
    _reset_gpu_peak(spec["device"])
    try:
        result = timed_loop(lambda: next(trainer.dataloader_train), trainer.train_step, spec["warmup"], spec["iters"],
                            timer, sync)
    finally:
        for gen in (trainer.dataloader_train, trainer.dataloader_val):
            finish = getattr(gen, "_finish", None)
            if finish is not None:
                finish()
    return {**result, "phases_s": dict(timer.totals), "init_s": init_s, "branches": 1,
            "peak_gpu_gb": _gpu_peak(spec["device"]),
            "parameters": sum(p.numel() for p in net.parameters()), "batch": {"labeled": trainer.batch_size},
            "patch_size": list(trainer.configuration_manager.patch_size), "input_channels": trainer.num_input_channels}


# ============================================================================================ orchestration
def prepare(work: Path, args) -> dict:
    """Synthesise and plan the phantom with cmcseg; write it for nnU-Net, plan it there, force the plan."""
    from cmcseg.phantoms import synthesize
    from cmcseg.plans.splits import labeled_subset, load_splits

    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    t0 = time.perf_counter()
    synthesize("MSCMR", raw / DATASET, cases=args.cases, seed=0, size=args.size)
    plans = nd.plan_with_cmcseg(DATASET, raw, pre, "3d_fullres", ["--memory-gb", str(args.memory_gb)])
    splits = load_splits(pre / DATASET / "splits.json")
    fold = splits["folds"][FOLD]
    # every labeled training case of the fold (ours: 2 of them labeled, the rest trained on without labels)
    nn_train = list(fold["labeled_order"])
    env = nd.nnunet_env(work, data_workers=args.workers, threads=args.threads)
    nd.write_aligned_raw(pre / DATASET, plans, nn_train + list(fold["val"]), Path(env["nnUNet_raw"]), NNUNET_ID,
                         "MSCMRaligned")
    native, nn_plan_s = nd.plan_and_preprocess(NNUNET_ID, env, workers=2)
    nd.write_splits(env, NNUNET_ID, nn_train, fold["val"])
    config = plans["configurations"]["3d_fullres"]
    forced = nd.forced_plans(native, config["patch_size"], config["batch_size"], config["architecture"])
    plans_file = work / "nnunet_forced_plans.json"
    plans_file.write_text(json.dumps(forced, indent=1))
    return {
        "raw": str(raw), "preprocessed": str(pre), "results": str(res),
        "nnunet_plans": str(plans_file),
        "nnunet_dataset_json": str(nd.preprocessed_folder(env, NNUNET_ID) / "dataset.json"),
        "env": env, "setup_s": time.perf_counter() - t0, "nnunet_plan_and_preprocess_s": nn_plan_s,
        "cmcseg_plan": {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                        "spacing": config["spacing"], "network": config["architecture"]["network_class_name"]},
        "nnunet_native_plan": nd.configuration_summary(native), "nnunet_forced_plan": nd.configuration_summary(forced),
        "labeled_cases_ours": labeled_subset(splits, FOLD, LABELED), "nnunet_training_cases": nn_train,
    }


def run_worker(kind: str, setup: dict, device: str, args, work: Path) -> dict:
    spec = {k: setup[k] for k in ("raw", "preprocessed", "results", "nnunet_plans", "nnunet_dataset_json")}
    spec.update(device=device, warmup=args.warmup, iters=args.iters, threads=args.threads, workers=args.workers,
                amp=args.amp, compile=args.compile == "on", unlabeled_every=args.unlabeled_every)
    return nd.run_worker(Path(__file__).resolve(), kind, spec, work, setup["env"])


def summarize_runs(runs: list[dict]) -> dict:
    waits = [w for r in runs for w in r["wait_s"]]
    steps = [s for r in runs for s in r["step_s"]]
    totals = [w + s for w, s in zip(waits, steps)]
    phases: dict[str, float] = defaultdict(float)
    for r in runs:
        for k, v in r["phases_s"].items():
            phases[k] += v
    n = len(totals)
    cpu = [c for r in runs for c in r["cpu_s"]]
    return {
        "cpu_s_per_it": sum(cpu) / n, "torch_threads": sorted({r["torch_threads"] for r in runs}),
        "iterations_timed": n,
        "s_per_it": sum(totals) / n,
        "s_per_it_median": statistics.median(totals),
        "s_per_it_min": min(totals), "s_per_it_max": max(totals),
        "s_per_it_per_round": [sum(w + s for w, s in zip(r["wait_s"], r["step_s"])) / len(r["step_s"]) for r in runs],
        "data_wait_share": sum(waits) / sum(totals),
        "phases_s_per_it": {k: v / n for k, v in phases.items()},
        "branches": runs[0]["branches"], "parameters": runs[0]["parameters"], "batch": runs[0]["batch"],
        "patch_size": runs[0]["patch_size"], "input_channels": runs[0]["input_channels"],
        "init_s": [r["init_s"] for r in runs], "peak_tree_rss_gb": max(r["peak_tree_rss_gb"] for r in runs),
        "peak_gpu_gb": max((r.get("peak_gpu_gb") or 0.0) for r in runs) or None,
        "unlabeled_every": runs[0].get("unlabeled_every", 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "default"))
    ap.add_argument("--cases", type=int, default=20, help="phantom cases (20: the plan of semi_supervised_gain.py)")
    ap.add_argument("--memory-gb", type=float, default=0.75,
                    help="cmcseg plan budget, shared by the M branches (0.75: patch [10, 80, 64], batch 2)")
    ap.add_argument("--warmup", type=int, default=2, help="iterations skipped per process")
    ap.add_argument("--iters", type=int, default=5, help="iterations timed per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per trainer and device (ABBA order)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per training process")
    ap.add_argument("--workers", type=int, default=1, help="data-augmentation processes of each trainer")
    ap.add_argument("--devices", default="auto", help="auto (cpu, plus cuda when available), cpu or cuda")
    ap.add_argument("--amp", choices=tuple(AMP_DTYPES), default="fp16",
                    help="mixed precision of both trainers on CUDA (off on CPU): fp16 (their default) or bf16")
    ap.add_argument("--compile", choices=("off", "on"), default="off",
                    help="torch.compile both networks (CUDA; nnU-Net's own nnUNet_compile switch)")
    ap.add_argument("--unlabeled-every", type=int, default=None,
                    help="ours: the unlabeled objective on every k-th step (default: CMCTrainer's)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (variants side by side)")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    nd.add_worker_arguments(ap, ("ours", "nnunet"))
    args = ap.parse_args()

    if args.worker:
        nd.serve_worker(args.spec, args.result, worker_ours if args.worker == "ours" else worker_nnunet)
        return

    import torch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else [args.devices]
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("worker", "spec", "result")},
              "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg(),
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_step_vs_nnunet_") as tmp:
        work = Path(tmp)
        setup = prepare(work, args)
        report["setup"] = {k: v for k, v in setup.items() if k not in ("env",)}
        report["devices"] = {}
        for device in devices:
            runs: dict[str, list[dict]] = {"ours": [], "nnunet": []}
            for r in range(args.rounds):
                order = ("ours", "nnunet") if r % 2 == 0 else ("nnunet", "ours")
                for kind in order:
                    runs[kind].append(run_worker(kind, setup, device, args, work))
            ours, nn = summarize_runs(runs["ours"]), summarize_runs(runs["nnunet"])
            per_branch = ours["s_per_it"] / ours["branches"]
            report["devices"][device] = {
                "ours": ours, "nnunet": nn, "ours_per_branch_s_per_it": per_branch,
                "ratio_ours_per_branch_over_nnunet": per_branch / nn["s_per_it"],
                "ratio_ours_over_nnunet": ours["s_per_it"] / nn["s_per_it"],
                "ratio_cpu_ours_per_branch_over_nnunet": ours["cpu_s_per_it"] / ours["branches"] / nn["cpu_s_per_it"],
                "goal_data_wait_below_5pct": ours["data_wait_share"] < 0.05,
                "goal_per_branch_not_slower": per_branch <= nn["s_per_it"],
            }
    report["host"]["loadavg_end"] = loadavg()
    report["total_wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"train_step_vs_nnunet{args.tag}.json"
    out_file.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {out_file}")


def print_report(report: dict) -> None:
    s = report["setup"]
    print(f"MSCMR phantom ({report['args']['size']}), cmcseg plan --memory-gb {report['args']['memory_gb']}: "
          f"patch {s['cmcseg_plan']['patch_size']}, batch {s['cmcseg_plan']['batch_size']}, "
          f"{s['cmcseg_plan']['network'].rsplit('.', 1)[-1]}")
    print(f"nnU-Net's own plan of the same data: {s['nnunet_native_plan']}")
    print(f"nnU-Net forced to: {s['nnunet_forced_plan']}")
    print(f"threads per process {report['args']['threads']}, data workers {report['args']['workers']}, "
          f"load average {report['host']['loadavg_start']} -> {report['host']['loadavg_end']} "
          f"on {report['host']['cpus']} CPUs")
    for device, d in report["devices"].items():
        o, n = d["ours"], d["nnunet"]
        print(f"\n[{device}] iterations timed: ours {o['iterations_timed']}, nnU-Net {n['iterations_timed']} "
              f"({report['args']['rounds']} process(es) each, {report['args']['warmup']} warm-up iterations skipped "
              f"in each); ours runs the unlabeled objective every {o.get('unlabeled_every', 1)} step(s)")
        print(f"{'':<26}{'s/it':>8}{'median':>8}{'min':>7}{'max':>7}{'cpu s/it':>9}{'data wait':>11}"
              f"{'params M':>10}  batch")
        for name, r in ((f"ours (CMCTrainer, M={o['branches']})", o), ("nnU-Net (nnUNetTrainer)", n)):
            print(f"{name:<26}{r['s_per_it']:8.2f}{r['s_per_it_median']:8.2f}{r['s_per_it_min']:7.2f}"
                  f"{r['s_per_it_max']:7.2f}{r['cpu_s_per_it']:9.2f}{100 * r['data_wait_share']:10.1f}%"
                  f"{r['parameters'] / 1e6:10.2f}  {r['batch']}")
        print(f"{'ours per branch (/M)':<26}{d['ours_per_branch_s_per_it']:8.2f}{'':22}"
              f"{o['cpu_s_per_it'] / o['branches']:9.2f}")
        print(f"ratio ours per branch / nnU-Net = {d['ratio_ours_per_branch_over_nnunet']:.2f} "
              f"(goal <= 1: {'met' if d['goal_per_branch_not_slower'] else 'NOT met'}); "
              f"ours / nnU-Net = {d['ratio_ours_over_nnunet']:.2f}; "
              f"data wait {100 * o['data_wait_share']:.1f}% (goal < 5%: "
              f"{'met' if d['goal_data_wait_below_5pct'] else 'NOT met'})")
        if o.get("peak_gpu_gb"):
            print(f"peak GPU memory (torch allocated): ours {o['peak_gpu_gb']:.2f} GB, nnU-Net "
                  f"{(n.get('peak_gpu_gb') or 0):.2f} GB; amp {report['args']['amp']}, compile "
                  f"{report['args']['compile']}")
        print(f"main-process CPU time: ours per branch / nnU-Net = {d['ratio_cpu_ours_per_branch_over_nnunet']:.2f} "
              f"(torch threads: ours {o['torch_threads']}, nnU-Net {n['torch_threads']})")
        print("where the time goes, s per iteration:")
        keys = ["encoders", "attention + fusion", "decoders", "forward (all)", "losses", "optimizer step"]
        print(f"{'':<26}" + "".join(f"{k:>19}" for k in keys) + f"{'backward+rest':>15}")
        for name, r in (("ours", o), ("nnU-Net", n)):
            ph = r["phases_s_per_it"]
            step = r["s_per_it"] * (1 - r["data_wait_share"])
            rest = step - ph.get("forward (all)", 0) - ph.get("losses", 0) - ph.get("optimizer step", 0)
            print(f"{name:<26}" + "".join(f"{ph.get(k, 0.0):19.3f}" for k in keys) + f"{rest:15.3f}")


if __name__ == "__main__":
    main()
