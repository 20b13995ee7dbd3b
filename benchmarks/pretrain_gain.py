"""Pretraining gain: ``cmcseg pretrain`` on every image of myops_dev, then CMC ``--labeled 0.2``, against the same
from scratch, in one run.

* pretraining: masked image modelling (``cmcseg.training.pretrain_trainer``) of the small network's encoder on all
  cases' images (20 labeled + 25 unlabeled, labels unread), ``--pretrain-iterations``; its time is reported apart;
* (a) ``cmc-pretrained``: CMC ``--labeled 0.2`` starting from that encoder (``--encoder-weights``);
* (b) ``cmc``: the same from scratch.

(a) and (b) train the same iterations with the same network, batches and schedule; the data, plans, folds and
small network are ``semi_supervised_gain.py``'s (``--work``/``--reuse`` share its prepared folder). Dice per
class, per fold, with the labeled case ids.

Usage: python benchmarks/pretrain_gain.py [--folds 0,1,2] [--iterations 1000] [--pretrain-iterations 1000]
       [--patch 4,128,128] [--work DIR [--reuse]] [--arms cmc-pretrained,cmc]
Writes benchmarks/out/pretrain_gain_myops_dev.json and prints one table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nnunet_driver as nd  # noqa: E402
import semi_supervised_gain as ssg  # noqa: E402


def worker_pretrain(spec: dict) -> dict:
    """Pretrain the benchmark's small encoder on every case; the weights file and the loss curve."""
    import torch

    from cmcseg.paths import WorkRoots
    from cmcseg.training.pretrain_trainer import ENCODER_WEIGHTS_FILE, PretrainTrainer
    from cmcseg.training.trainer import TrainingRequest

    torch.set_num_threads(spec["threads"])

    class SmallPretrainTrainer(PretrainTrainer):
        num_workers = 0
        save_every = 10 ** 9

        def configure_plans(self, plans: dict) -> dict:
            config = plans["configurations"][self.configuration]
            config["architecture"] = ssg.small_architecture(config["architecture"], spec["features"])
            config["patch_size"] = list(spec["patch"])
            return plans

    roots = WorkRoots(Path(spec["raw"]), Path(spec["preprocessed"]), Path(spec["results"]))
    epochs = int(spec["epochs"])
    trainer = SmallPretrainTrainer(TrainingRequest(
        spec["dataset"], 0, 1.0, roots=roots, device=spec["device"], num_workers=0, seed=spec["seed"],
        num_epochs=epochs, iterations_per_epoch=max(1, int(spec["iterations"]) // epochs), val_iterations=0))
    start = time.perf_counter()
    folder = trainer.run()
    history = trainer.history.state_dict()
    return {"weights": str(folder / ENCODER_WEIGHTS_FILE), "wall_s": time.perf_counter() - start,
            "iterations": trainer.global_step, "cases": len(trainer.cases.labeled) + len(trainer.cases.unlabeled),
            "loss": history["values"].get("loss/total", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=ssg.REPO.parent / "shared" / "data" / "myops_dev")
    ap.add_argument("--folds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--arms", default="cmc-pretrained,cmc")
    ap.add_argument("--iterations", type=int, default=1000, help="fine-tuning iterations of (a) and (b)")
    ap.add_argument("--pretrain-iterations", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--features", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 64])
    ap.add_argument("--patch", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--labeled", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse semi_supervised_gain.py's prepared --work folder")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    nd.add_worker_arguments(ap, ["pretrain"])
    args = ap.parse_args()
    if args.worker:
        nd.serve_worker(args.spec, args.result, worker_pretrain)
        return
    # what semi_supervised_gain's set-up and arms read from their own arguments
    args.data, args.memory_gb, args.cases, args.size, args.nnunet_seconds = "myops_dev", None, 20, "small", 0.0
    arms = [a for a in args.arms.split(",") if a]
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                             if k not in ("worker", "spec", "result")}, "folds": {}}
    with tempfile.TemporaryDirectory(prefix="pretrain_gain_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = ssg.prepare_or_reuse(work, args)
        pre_work = work / "pretrain"
        pre_work.mkdir(exist_ok=True)
        spec = {k: setup[k] for k in ("raw", "preprocessed", "results", "dataset")}
        spec.update(features=args.features, patch=args.patch, iterations=args.pretrain_iterations,
                    epochs=args.epochs, threads=args.threads, device=args.device, seed=args.seed)
        pretrained = nd.run_worker(Path(__file__).resolve(), "pretrain", spec, pre_work, setup["env"])
        print(f"pretraining: {pretrained['iterations']} iterations on {pretrained['cases']} cases in "
              f"{pretrained['wall_s']:.0f} s; reconstruction loss {pretrained['loss'][0]:.4f} -> "
              f"{pretrained['loss'][-1]:.4f}", flush=True)
        report["pretraining"] = pretrained
        setup["encoder_weights"] = pretrained["weights"]

        def fold_arms(fold: int) -> dict:
            return {arm: ssg.run_arm(arm, fold, setup, args) for arm in arms}

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            futures = {fold: pool.submit(fold_arms, fold) for fold in args.folds}
            for fold, future in futures.items():
                report["folds"][str(fold)] = future.result()
        report["setup"] = {k: v for k, v in setup.items() if k not in ("env", "work")}
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "pretrain_gain_myops_dev.json"
    out_file.write_text(json.dumps(report, indent=2, default=str))
    classes = report["setup"]["classes"]
    print(f"\n{'fold':<6}{'arm':<34}" + "".join(f"{c[:10]:>11}" for c in classes) + f"{'fg mean':>9}")
    for fold, results in report["folds"].items():
        for arm, r in results.items():
            dice = [r["dice_mean"].get(c, math.nan) for c in classes]
            print(f"{fold:<6}{ssg.ARMS[arm]:<34}" + "".join(f"{d:11.3f}" for d in dice) + f"{ssg._mean(dice):9.3f}")
        print(f"      labeled {report['setup']['folds'][int(fold)]['labeled']}")
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    main()
