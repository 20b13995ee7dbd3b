"""`cmcseg predict`: segment raw cases with a trained model, written on each case's original reference grid."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmcseg.cli.common import add_root_arguments, add_unsafe_pickle_argument, int_at_least, roots_from_args
from cmcseg.errors import CmcsegError
from cmcseg.paths import find_dataset_folder


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fold number (or 'all')") from None


def _step(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]; e.g. --step 0.5 (windows overlap by half)")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict", help="segment raw cases with a trained model",
        description="Segment every case of an input folder (nnU-Net naming CASE_XXXX.<ext> in any format SimpleITK "
                    "reads, or the dataset's native naming such as MS-CMRSeg patientN_{C0,LGE,T2}.nii.gz). Each "
                    "case is preprocessed as in training (modalities on different grids are aligned from the saved "
                    "plan), predicted by Gaussian sliding window with mirroring test-time augmentation and the "
                    "folds' mean, and written on its reference modality's original grid (same size, spacing, "
                    "origin and direction) as CASE<file_ending>. A failing case is reported by name and the others "
                    "go on; the exit code is then 1. Example: cmcseg predict -i imagesTs -o predictions -d MSCMR",
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of the cases to segment")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for the segmentations")
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset (name, id or folder) the model was trained on: finds the model under the results "
                        "root, and with -m refuses a model of another dataset")
    p.add_argument("-m", "--model", type=Path, default=None,
                   help="model folder (the one holding fold_0, ...); default: the single model of -d")
    p.add_argument("-f", "--folds", nargs="+", type=_fold, default=None,
                   help="folds to ensemble (default, or 'all': every fold with the checkpoint)")
    p.add_argument("-p", "--plans", default=None,
                   help="with -d: the model trained on this plans identifier (e.g. cmcsegPlainConvUNetPlans), when "
                        "the dataset has several models")
    p.add_argument("--trainer", default=None,
                   help="the trainer class the model was trained with, when it is your own (module:ClassName, "
                        "imported from your PYTHONPATH); cmcseg's trainers are found by the name in the checkpoint")
    p.add_argument("--checkpoint", choices=("final", "best", "latest"), default="final",
                   help="checkpoint of each fold (default final)")
    p.add_argument("--no-tta", action="store_true",
                   help="no mirroring test-time augmentation (about 8 times faster for 3D, slightly less accurate)")
    p.add_argument("--step", type=_step, default=0.5,
                   help="sliding-window step as a fraction of the patch, in (0, 1] (default 0.5, nnU-Net's)")
    p.add_argument("--sw-batch-size", type=int_at_least(1, "--sw-batch-size 4"), default=None,
                   help="sliding windows per forward pass (default: on a CPU as many as make about 0.5M voxels "
                        "per pass with TTA's mirrored copies, at least 1; on a GPU 1). More needs more memory")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE.npz with the class probabilities on the original grid")
    p.add_argument("--save-heads", action="store_true",
                   help="CMC models: also write each modality head's own segmentation (CASE_head-NAME.nii.gz) "
                        "beside the fused one")
    p.add_argument("--original-labels", action="store_true",
                   help="write the label values of the original release (dataset.json original_label_values, e.g. "
                        "200/500/600 for MS-CMRSeg) instead of 0..K-1")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if available")
    # the same names as cmcseg.devices.PRECISIONS (not imported here: torch loads only when predicting)
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="what the networks compute in (default auto: float16 on CUDA, as nnU-Net; on a CPU bfloat16 "
                        "where it has native bfloat16 instructions (AVX512-BF16, AMX), about 2x faster with the "
                        "same Dice, else float32)")
    p.add_argument("--continue", dest="continue_prediction", action="store_true",
                   help="skip the cases whose output already exists")
    p.add_argument("-np", "--num-processes", type=int_at_least(0, "-np 1"), default=1,
                   help="background preprocessing threads, overlapping the prediction (default 1; 0: none)")
    add_unsafe_pickle_argument(p)
    add_root_arguments(p)
    return p


def _folds(values: list[int | str] | None) -> list[int] | None:
    if values is None or "all" in values:
        if values is not None and len(values) > 1:
            raise CmcsegError("-f all cannot be combined with fold numbers. Fix: pass -f all, or the folds.")
        return None
    return sorted(set(int(v) for v in values))


def run(args: argparse.Namespace) -> int:
    # imported here: torch and the networks load only when predicting
    from cmcseg.prediction.model import find_model_folder
    from cmcseg.prediction.predictor import PredictionOptions, predict_folder

    roots = roots_from_args(args)
    if args.model is None and args.dataset is None:
        raise CmcsegError("no model given. Fix: pass -d NAME (the model is found under the results root) or "
                          "-m MODEL_DIR.")
    model_folder = args.model if args.model is not None else find_model_folder(roots.results, args.dataset,
                                                                                 args.plans)
    preprocessed = find_dataset_folder(roots.preprocessed, args.dataset) if args.dataset else None
    options = PredictionOptions(
        folds=_folds(args.folds), checkpoint=args.checkpoint, tta=not args.no_tta, step=args.step,
        save_probabilities=args.save_probabilities, save_heads=args.save_heads,
        original_labels=args.original_labels, device=args.device,
        continue_prediction=args.continue_prediction, num_workers=args.num_processes,
        sw_batch_size=args.sw_batch_size, precision=args.precision, unsafe_allow_pickle=args.unsafe_allow_pickle,
        trainer=args.trainer,
    )
    report = predict_folder(args.input, args.output, model_folder, options, dataset_spec=args.dataset,
                            preprocessed_dataset=preprocessed)
    print(f"model: {report.model}")
    print(report.summary())
    if report.failed:
        print(f"cmcseg predict: {len(report.failed)} case(s) failed:", file=sys.stderr)
        for case_id, message in sorted(report.failed.items()):
            print(f"  case {case_id}: {message}", file=sys.stderr)
        return 1
    return 0
