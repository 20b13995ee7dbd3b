"""`cmcseg synth`: write a phantom dataset in the raw layout."""
from __future__ import annotations

import argparse

from cmcseg.cli.common import add_root_arguments, roots_from_args
from cmcseg.paths import dataset_folder_for_new

#: ``cmcseg.phantoms.PHANTOMS`` and ``SIZES`` (checked by a test), listed here so that ``--help`` and argument
#: errors do not import the phantom generators (and scipy)
KINDS = ("AMOS", "DELIVER", "MSCMR", "TAO")
SIZES = ("tiny", "small", "default")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "synth", help="write a phantom dataset (the embedded default data)",
        description="Write a phantom dataset with the properties that matter (anisotropy, misaligned sequences, "
                    "unlabeled cases, unpaired modalities) into the raw root. "
                    "Example: cmcseg synth -d MSCMR --size small",
    )
    p.add_argument("-d", "--dataset", required=True, type=str.upper, choices=KINDS,
                   help="which phantom to make")
    p.add_argument("--cases", type=int, default=None, help="number of cases (default depends on --size)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes identical files")
    p.add_argument("--size", choices=SIZES, default="small", help="tiny (tests), small (demo) or default")
    p.add_argument("--name", default=None, help="dataset name to write (default: the phantom's name)")
    add_root_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from cmcseg.phantoms import synthesize  # imported here: --help stays fast

    roots = roots_from_args(args)
    name = args.name or args.dataset
    folder = roots.raw / dataset_folder_for_new(roots.raw, name)
    synthesize(args.dataset, folder, cases=args.cases, seed=args.seed, size=args.size, name=name)
    print(f"wrote phantom dataset {args.dataset} to {folder}")
    return 0
