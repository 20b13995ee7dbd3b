"""`cmcseg plan`: integrity check, fingerprint, plans, splits and preprocessing of a raw dataset."""
from __future__ import annotations

import argparse

from cmcseg.cli.common import add_root_arguments, float_in, int_at_least, roots_from_args

#: ``plans.planner.PLANNERS`` (listed here so that --help imports no torch; a test keeps them equal), default first
PLANNERS = ("ResEncM", "PlainConvUNet")

def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan", help="check, fingerprint, plan, split and preprocess a dataset",
        description="Integrity check -> fingerprint -> plans -> 5 folds -> preprocessing. Modalities on different "
                    "grids are resampled into the reference modality's physical space. "
                    "Example: cmcseg plan -d MSCMR -np 2",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset name, id or folder (MSCMR, 501, Dataset501_MSCMR)")
    p.add_argument("-c", "--configurations", nargs="+", choices=("2d", "3d_fullres"), default=None,
                   help="configurations to plan and preprocess (default: both; 2D datasets get 2d only)")
    p.add_argument("-np", "--num-processes", type=int_at_least(1, "-np 2"), default=2,
                   help="worker processes, at least 1 (default 2)")
    p.add_argument("--reference", default=None,
                   help="reference modality (name or channel index); default: the one the labels lie on")
    p.add_argument("--register", choices=("none", "rigid"), default="none",
                   help="add a rigid mutual-information registration of each modality onto the reference")
    p.add_argument("--memory-gb", type=float_in(0.0, None, "--memory-gb 8"), default=None,
                   help="memory budget in GB of a training step, process included: patch and batch are planned so "
                        "that the estimated peak fits it (default: 8 on a GPU, capped by its memory; 4 on CPU-only "
                        "machines, capped at a quarter of RAM)")
    p.add_argument("--verify-only", action="store_true", help="run the integrity check only")
    p.add_argument("--accept-no-overlap", action="store_true",
                   help="a modality whose physical extent does not overlap the reference modality's at all is an "
                        "error (almost always a wrong origin, spacing or direction in its header); with this flag it "
                        "is a warning and the plan goes on: that modality's field of view is empty in that case")
    p.add_argument("-pl", "--planner", choices=PLANNERS, default=PLANNERS[0],
                   help="network topology to plan (default ResEncM, nnU-Net's residual-encoder U-Net M). Another "
                        "planner writes its own plans (cmcsegPlainConvUNetPlans.json) and preprocessed data beside the "
                        "default ones; train and predict with them with -p cmcsegPlainConvUNetPlans")
    p.add_argument("--patch-multiple-of", type=int_at_least(1, "--patch-multiple-of 16"), default=1,
                   metavar="N",
                   help="round every patch up to a multiple of N on each axis, for an encoder that needs it: 16 for "
                        "--encoder sammed3d, 8 for universal, 32 for swinunetr (default 1: the plan's own)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the folds and labeled subsets")
    add_root_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from cmcseg.plans.plan_and_preprocess import plan_and_preprocess  # torch via nnunetv2: only when planning
    from cmcseg.plans.planner import budget_summary

    outcome = plan_and_preprocess(
        args.dataset, roots_from_args(args), configurations=args.configurations, num_workers=args.num_processes,
        reference=args.reference, register=args.register, memory_gb=args.memory_gb,
        verify_only=args.verify_only, seed=args.seed, accept_no_overlap=args.accept_no_overlap,
        planner=args.planner, patch_multiple_of=args.patch_multiple_of,
    )
    print(f"integrity check of {outcome.dataset.name} ({outcome.integrity.num_cases} cases, "
          f"{outcome.integrity.dimensionality}):")
    print(outcome.integrity.table())
    print(outcome.integrity.verdict())
    if args.verify_only:
        return 0
    assert outcome.plans is not None and outcome.fingerprint is not None  # a full run plans
    print()
    print(outcome.fingerprint.get("summary", ""))
    for name, cfg in outcome.plans["configurations"].items():
        print(f"{name}: spacing {cfg['spacing']}, patch {cfg['patch_size']}, batch {cfg['batch_size']}")
        print(f"  {budget_summary(outcome.plans, name)}")
    if outcome.splits:
        n_folds = len(outcome.splits["folds"])
        print(f"folds: {n_folds} over {len(outcome.dataset.labeled_cases)} labeled cases; "
              f"{len(outcome.dataset.unlabeled_cases)} unlabeled cases train in every fold")
    else:
        print("folds: none (fewer than 2 labeled cases)")
    if outcome.registration:
        failed = [c for c, r in outcome.registration.items() if not r.get("success", True)]
        print(f"rigid registration: {len(outcome.registration)} cases, {len(failed)} not successful"
              + (f" ({', '.join(failed)})" if failed else ""))
    for name, report in outcome.preprocessing.items():
        print(f"preprocessing {name}: {report.summary() if hasattr(report, 'summary') else report}")
    print(f"wrote {outcome.output_folder} (plans: {outcome.plans_file.name if outcome.plans_file else '-'})")
    return 0
