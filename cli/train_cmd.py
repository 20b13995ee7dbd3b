"""`cmcseg train`: train one fold at one labeled fraction (single process, or DDP under torchrun)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cmcseg.cli.common import (
    add_root_arguments,
    add_unsafe_pickle_argument,
    float_in,
    int_at_least,
    key_value,
    roots_from_args,
)
from cmcseg.image_io import read_json

#: --labeled: a fraction in (0, 1]; the message of a refused value shows a valid one
_fraction = float_in(0.0, 1.0, "--labeled 0.2 (keeps the labels of 20% of the fold's training cases)")


def _fmt(value: float | None) -> str:
    """A Dice value for the terminal; None (a class absent from every case) as n/a."""
    return "n/a" if value is None else f"{value:.4f}"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a model on one fold (semi-supervised with --labeled < 1)",
        description="Train one fold of a planned dataset. --labeled FRACTION keeps the labels of that fraction of "
                    "the fold's training cases (nested across fractions); the rest, and the unlabeled cases, train "
                    "without labels. --labeled 1.0 is plain supervised training. Writes checkpoints, log.txt, "
                    "progress.png and validation/summary.json to <results>/DatasetNNN_NAME/"
                    "TRAINER__CONFIG__labeledF/fold_N. Multi-GPU: torchrun --nproc_per_node N -m cmcseg train ... "
                    "Example: cmcseg train -d MSCMR -f 0 --labeled 0.2",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset name, id or folder (MSCMR, 501, Dataset501_MSCMR)")
    p.add_argument("-f", "--fold", required=True, type=int_at_least(0, "-f 0"), help="fold of splits.json")
    p.add_argument("--labeled", default=1.0, type=_fraction, metavar="FRACTION",
                   help="fraction of the fold's training cases whose labels are used, in (0, 1] (default 1.0: "
                        "supervised)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="plan configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="cmcsegPlans",
                   help="plans identifier (default cmcsegPlans, i.e. plans.json); cmcsegPlainConvUNetPlans after "
                        "`cmcseg plan -pl PlainConvUNet`")
    p.add_argument("--trainer", default="cmc",
                   help="trainer: a registered name (cmc: 3D CMC, one network over all modalities; cmc_branches: the "
                        "paper's network, a branch per modality, about M times the cost; any2seg: any subset of the "
                        "modalities, 3D (the residual U-Net) or 2D (SegFormer MiT)) "
                        "or module:ClassName for your own subclass (default cmc)")
    p.add_argument("--encoder", default=None,
                   help="encoder of the encoder registry: residual, plain, swinunetr, ... (default: the plan's "
                        "topology, residual for the default plans, plain for -p cmcsegPlainConvUNetPlans)")
    p.add_argument("--encoder-weights", type=Path, default=None, help="local checkpoint of the encoder's weights")
    p.add_argument("--encoder-option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="an option of the encoder class, repeatable, e.g. --encoder-option feature_size=48 "
                        "(VALUE is read as JSON: numbers, true/false, lists; else as text); stored in the checkpoint")
    p.add_argument("--encoder-lr-scale", type=float_in(0.0, None, "--encoder-lr-scale 0.1"), default=None,
                   metavar="F", help="the encoder's learning rate relative to the rest's (default 1); e.g. 0.1 for "
                                     "pretrained --encoder-weights")
    p.add_argument("--freeze-encoder-iters", type=float_in(0.0, None, "--freeze-encoder-iters 500",
                                                           low_inclusive=True),
                   default=None, metavar="N", help="the encoder does not learn during the first N iterations (N >= 1), "
                                                   "or that fraction of the run (N < 1); default 0")
    p.add_argument("--shared-encoder", action="store_true",
                   help="one encoder for all modality branches (--trainer cmc_branches)")
    p.add_argument("--unlabeled-weight", type=float_in(0.0, None, "--unlabeled-weight 1", low_inclusive=True),
                   default=None, metavar="W",
                   help="scales every unlabeled loss term (pseudo-labels, CSC, CAC; default 1). 0 trains the same "
                        "network on the same batches and schedule with the labels alone: the supervised baseline")
    any2seg = p.add_argument_group("Any2Seg (--trainer any2seg): one model for any subset of the modalities")
    any2seg.add_argument("--backbone", default=None, metavar="NAME",
                         help="the encoder shared by the modalities: a SegFormer MiT backbone, mit_b0..mit_b5 (2D; "
                              "default of 2d configurations), or an encoder name (residual, the default of 3D "
                              "configurations, plain, swinunetr, ...) for nnU-Net's U-Net (early fusion by default)")
    any2seg.add_argument("--backbone-weights", type=Path, default=None,
                         help="local MiT weights (a .pth/.safetensors file or a Hugging Face folder); "
                              "none: random init")
    any2seg.add_argument("--teacher", default=None, choices=("minilm", "languagebind"),
                         help="language teacher of the LSCD distillation (default minilm: offline, text only)")
    any2seg.add_argument("--teacher-weights", type=Path, default=None,
                         help="local LanguageBind folder (needed for --teacher languagebind)")
    any2seg.add_argument("--modality-dropout", type=float_in(0.0, 1.0, "--modality-dropout 0.5", low_inclusive=True),
                         default=None, metavar="P",
                         help="probability that a training row keeps a random non-empty subset of its modalities "
                              "(default 0.5)")
    p.add_argument("--epochs", type=int_at_least(1, "--epochs 100"), default=None,
                   help="epochs, at least 1 (default: the trainer's, 1000)")
    p.add_argument("--iters-per-epoch", type=int_at_least(1, "--iters-per-epoch 250"), default=None,
                   help="iterations per epoch, at least 1 (default 250)")
    p.add_argument("--val-iters", type=int_at_least(0, "--val-iters 50"), default=None,
                   help="validation batches per epoch for the pseudo-Dice (default 50; 0: no pseudo-Dice)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if available")
    p.add_argument("--max-minutes", type=float_in(0.0, None, "--max-minutes 30"), default=None, metavar="M",
                   help="time budget: no epoch starts that would end after M minutes; the final checkpoint and "
                        "the validation are still written (default: no budget)")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from the fold's last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, sampling and augmentation")
    p.add_argument("-np", "--num-processes", type=int_at_least(0, "-np 1"), default=None,
                   help="data-augmentation worker processes per training process (default 1; 0: in-process)")
    add_unsafe_pickle_argument(p)
    add_root_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    # imported here: torch and the networks load only when training is asked for
    from cmcseg.training.ddp import launched_by_torchrun
    from cmcseg.training.registry import get_trainer_class
    from cmcseg.training.trainer import TrainingRequest
    from cmcseg.training.validation import SUMMARY_FILE, VALIDATION_DIR

    trainer_class = get_trainer_class(args.trainer)
    request = TrainingRequest(
        dataset=args.dataset, fold=args.fold, labeled_fraction=args.labeled, configuration=args.configuration,
        plans=args.plans,
        roots=roots_from_args(args), device=args.device, seed=args.seed, num_epochs=args.epochs,
        iterations_per_epoch=args.iters_per_epoch, val_iterations=args.val_iters, num_workers=args.num_processes,
        continue_training=args.continue_training, encoder=args.encoder, encoder_weights=args.encoder_weights,
        encoder_options=dict(args.encoder_option), encoder_lr_scale=args.encoder_lr_scale,
        freeze_encoder=args.freeze_encoder_iters,
        shared_encoder=args.shared_encoder, command=shlex.join(["cmcseg", *sys.argv[1:]]),
        max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
        backbone=args.backbone, backbone_weights=args.backbone_weights, teacher=args.teacher,
        teacher_weights=args.teacher_weights, modality_dropout=args.modality_dropout,
        unlabeled_weight=args.unlabeled_weight, unsafe_allow_pickle=args.unsafe_allow_pickle,
    )
    trainer = trainer_class(request)
    output_folder = trainer.run()
    if not trainer.is_main:
        return 0
    summary_path = output_folder / VALIDATION_DIR / SUMMARY_FILE
    if summary_path.is_file():
        summary = read_json(summary_path)
        means = ", ".join(f"{k} {_fmt(v)}" for k, v in summary["mean"].items())
        print(f"validation Dice ({summary['num_cases']} cases): {means}; foreground mean "
              f"{_fmt(summary['foreground_mean'])}")
        for head, scores in summary.get("per_head", {}).items():
            print(f"   head {head} alone: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scores["mean"].items()))
    ddp_note = f" ({trainer.dist.world_size} processes)" if launched_by_torchrun() else ""
    # loaded by an Any2Seg run only (it needs transformers)
    subsets = sys.modules.get("cmcseg.training.subset_validation")
    subsets_path = output_folder / VALIDATION_DIR / subsets.SUBSET_TABLE_CSV if subsets is not None else None
    if subsets is not None and subsets_path is not None and subsets_path.is_file():
        print(f"scores per modality subset: {subsets_path} (heat map: "
              f"{subsets_path.parent / subsets.SUBSET_TABLE_PNG})")
    print(f"trained {trainer.name} fold {args.fold} at --labeled {args.labeled}{ddp_note}: {output_folder}")
    return 0
