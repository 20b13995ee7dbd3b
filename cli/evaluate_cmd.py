"""`cmcseg evaluate`: Dice, IoU, HD95 and ASD of predicted label maps against reference label maps."""
from __future__ import annotations

import argparse
from pathlib import Path

from cmcseg.cli.common import add_root_arguments, int_at_least, roots_from_args
from cmcseg.errors import CmcsegError
from cmcseg.paths import require_dataset_folder


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="score predicted segmentations against reference segmentations",
        description="Pairs reference and prediction files by case id (CASE.nii.gz, or any format SimpleITK reads) "
                    "and writes metrics.csv (per case and class: Dice, IoU, HD95 and ASD in mm, TP/FP/FN/TN) and "
                    "summary.json (nnU-Net style 'mean' per class and 'foreground_mean'). Dice is NaN where a "
                    "class is absent from both files and left out of the means, as in nnU-Net; HD95/ASD are inf "
                    "where a class is absent from one side only and left out of the means (the counts are "
                    "reported). Example: cmcseg evaluate -r raw/Dataset501_MSCMR/labelsTr -p predictions -d MSCMR",
    )
    p.add_argument("-r", "--reference", default=None,
                   help="folder of reference label maps (default with -d: the raw dataset's labelsTr)")
    p.add_argument("-p", "--prediction", required=True, help="folder of predicted label maps")
    p.add_argument("-d", "--dataset", default=None,
                   help="raw dataset (name, id or folder name) whose dataset.json gives the labels and their names")
    p.add_argument("-o", "--output", default=None, help="where metrics.csv and summary.json go (default: -p)")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="label values to evaluate (default: the dataset's labels with -d, else every non-zero "
                        "value found in the files)")
    p.add_argument("--chill", action="store_true",
                   help="evaluate only the reference cases that have a prediction (e.g. one fold's validation "
                        "cases against all of labelsTr) instead of stopping on a missing prediction")
    p.add_argument("-np", "--num-processes", type=int_at_least(1, "-np 2"), default=1,
                   help="worker processes, at least 1 (default 1)")
    add_root_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from cmcseg.evaluation import dataset_labels, evaluate_folders  # monai: only when evaluating

    names: dict[int, str] = {}
    reference = args.reference
    if args.dataset is not None:
        folder = require_dataset_folder(roots_from_args(args).raw, args.dataset, "raw")
        names = dataset_labels(folder)
        reference = reference or folder / "labelsTr"
    if reference is None:
        raise CmcsegError("no reference folder. Fix: pass -r REF_DIR, or -d NAME to use the raw dataset's labelsTr.")
    labels = args.labels if args.labels is not None else (sorted(names) or None)
    result = evaluate_folders(reference, args.prediction, labels=labels, num_workers=args.num_processes,
                              label_names=names, allow_missing=args.chill, progress=True)
    csv_path, json_path = result.write(Path(args.output or args.prediction))
    print(f"evaluated {result.summary['num_cases']} case(s) of {reference}")
    print(result.table())
    print(f"wrote {csv_path}")
    print(f"wrote {json_path}")
    return 0
