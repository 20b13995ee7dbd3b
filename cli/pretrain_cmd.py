"""`cmcseg pretrain`: a pretrained encoder from every image of a planned dataset (masked image modelling)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cmcseg.cli.common import (
    add_root_arguments,
    add_unsafe_pickle_argument,
    int_at_least,
    key_value,
    roots_from_args,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain", help="pretrain an encoder on the dataset's own images (self-supervised)",
        description="Self-supervised pretraining of an encoder on every image of a planned dataset (labeled and "
                    "unlabeled cases, every modality; labels are not read): masked image modelling, the encoder "
                    "reconstructs what holes and shuffled blocks hide. Writes encoder_weights.pt, which "
                    "`cmcseg train --encoder-weights` takes, with checkpoints, log.txt and progress.png, to "
                    "<results>/DatasetNNN_NAME/PretrainTrainer__CONFIG__ENCODER/all. "
                    "Example: cmcseg pretrain -d MSCMR --iterations 5000",
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset name, id or folder (MSCMR, 501, Dataset501_MSCMR)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="plan configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="cmcsegPlans", help="plans identifier (default cmcsegPlans)")
    p.add_argument("--encoder", default=None,
                   help="encoder of the encoder registry: residual, plain, swinunetr, universal, ... (default: the "
                        "plan's topology); train with the same --encoder")
    p.add_argument("--encoder-option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="an option of the encoder class, repeatable (as for cmcseg train)")
    p.add_argument("--encoder-weights", type=Path, default=None,
                   help="start from these local weights (e.g. a published checkpoint) instead of random ones")
    p.add_argument("--iterations", type=int_at_least(1, "--iterations 5000"), default=10000,
                   help="training iterations (default 10000), in epochs of up to 250")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if available")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from the last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, sampling and corruption")
    p.add_argument("-np", "--num-processes", type=int_at_least(0, "-np 1"), default=None,
                   help="data-augmentation worker processes (default 1; 0: in-process)")
    add_unsafe_pickle_argument(p)
    add_root_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    # imported here: torch and the networks load only when pretraining is asked for
    from cmcseg.training.pretrain_trainer import ENCODER_WEIGHTS_FILE, PretrainTrainer
    from cmcseg.training.trainer import TrainingRequest

    per_epoch = min(250, args.iterations)
    request = TrainingRequest(
        dataset=args.dataset, fold=0, labeled_fraction=1.0, configuration=args.configuration, plans=args.plans,
        roots=roots_from_args(args), device=args.device, seed=args.seed,
        num_epochs=-(-args.iterations // per_epoch), iterations_per_epoch=per_epoch, val_iterations=0,
        num_workers=args.num_processes, continue_training=args.continue_training, encoder=args.encoder,
        encoder_weights=args.encoder_weights, encoder_options=dict(args.encoder_option),
        command=shlex.join(["cmcseg", *sys.argv[1:]]), unsafe_allow_pickle=args.unsafe_allow_pickle)
    trainer = PretrainTrainer(request)
    folder = trainer.run()
    if trainer.is_main:
        weights = folder / ENCODER_WEIGHTS_FILE
        encoder = f" --encoder {args.encoder}" if args.encoder else ""
        print(f"pretrained encoder: {weights}\nuse it: cmcseg train -d {args.dataset} -f 0 --labeled 0.2{encoder} "
              f"--encoder-weights {weights}")
    return 0
