"""`cmcseg convert`: bring a dataset from its official layout into the raw layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from cmcseg.cli.common import add_root_arguments, roots_from_args
from cmcseg.paths import dataset_folder_for_new

#: the converters' names (``cmcseg.preprocessing.converters.CONVERTERS``, checked by a test): listed here so that
#: ``--help`` and argument errors do not import the converters (and scipy)
FORMATS = ("amos", "deliver", "mcubes", "mscmr", "myops", "tao")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="convert a dataset from its official layout",
        description="Convert a dataset from its official release layout into cmcseg's raw layout, keeping every "
                    "modality's own geometry. Example: cmcseg convert --from mscmr /data/MS-CMRSeg -d MSCMR",
    )
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="source layout")
    p.add_argument("source", type=Path, help="folder of the official release")
    p.add_argument("-d", "--dataset", required=True, help="name of the raw dataset to write (e.g. MSCMR)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing raw dataset of that name")
    add_root_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from cmcseg.preprocessing.converters import convert  # imported here: --help stays fast

    roots = roots_from_args(args)
    folder = roots.raw / dataset_folder_for_new(roots.raw, args.dataset)
    report = convert(args.fmt, args.source, folder, name=args.dataset, overwrite=args.overwrite)
    print(report.summary())
    return 0
