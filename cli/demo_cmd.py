"""`cmcseg demo`: synth -> plan -> train -> predict -> evaluate on an MSCMR phantom, within a time budget."""
from __future__ import annotations

import argparse
from pathlib import Path

from cmcseg.cli.common import float_in, int_at_least

DEFAULT_WORK = Path("cmcseg_work") / "demo"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="run the whole pipeline on a phantom in a few minutes (CPU is enough)",
        description="Synthesises an MSCMR phantom (bSSFP, LGE and T2 on misaligned grids), plans it, trains fold 0 "
                    "with --labeled 0.2 (a small CMC network, epochs fitted to the time budget), predicts the "
                    "held-out cases from their raw images, evaluates them against their labels, prints a Dice table "
                    "and writes an overlay PNG of one case. Everything goes under --work. "
                    "Example: cmcseg demo --minutes 5",
    )
    p.add_argument("--minutes", type=float_in(0.0, None, "--minutes 5"), default=5.0,
                   help="time budget of the whole demo in minutes (default 5; training gets what is left after "
                        "synthesis and planning, minus half a minute for prediction and evaluation)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help=f"work folder for raw/, preprocessed/, results/ and predictions/ (default {DEFAULT_WORK})")
    p.add_argument("--size", choices=("tiny", "small"), default="small",
                   help="phantom size (default small: 12 cases; tiny: 5 cases for a smoke test)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if available")
    p.add_argument("-np", "--num-processes", type=int_at_least(1, "-np 2"), default=2,
                   help="worker processes for planning, at least 1 (default 2)")
    return p


def run(args: argparse.Namespace) -> int:
    from cmcseg.demo import run_demo  # torch and the networks load only when the demo runs

    result = run_demo(args.work, minutes=args.minutes, size=args.size, device=args.device,
                      workers=args.num_processes)
    print(f"cmcseg demo: MSCMR phantom, fold 0, --labeled 0.2, {result.epochs_trained} epoch(s) of training")
    print(f"Dice on the {len(result.validation_cases)} held-out case(s) ({', '.join(result.validation_cases)}), "
          "original LGE grid:")
    print(result.dice_table())
    for case_id, message in sorted(result.failed.items()):
        print(f"prediction of {case_id} failed: {message}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()))
    print("outputs:")
    for what, where in (("raw phantom", result.roots.raw), ("plans and preprocessed arrays", result.roots.preprocessed),
                        ("model (checkpoints, log.txt, progress.png)", result.model_folder),
                        ("predictions, metrics.csv, summary.json", result.predictions),
                        ("overlay (image | reference | prediction)", result.overlay),
                        ("demo summary", result.summary_file)):
        print(f"  {what}: {where}")
    return 0
