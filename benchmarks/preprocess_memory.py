"""Peak memory of preprocessing one CT-sized case, as a multiple of the case's float32 size.

    .venv/bin/python benchmarks/preprocess_memory.py [--shape 300 512 512] [--resample] [--nnunet] [--keep]

Writes a synthetic CT-like case (int16 image of shape z y x, a label with three organs) to a
temporary raw dataset, then preprocesses it in a fresh child process (one worker, the same
code path as ``cmcseg plan``) and measures that process's resident memory: the peak
(getrusage and a 5 ms polling thread), the baseline after imports, and the peak above the
baseline divided by the size of the case as float32 (512 x 512 x 300 x 4 B = 315 MB).

Without ``--resample`` the target spacing is the case's own (crop, normalise, write);
with it the case goes from 0.7 x 0.7 x 1.0 mm to 0.8 x 0.8 x 1.25 mm, which is where
nnU-Net's resampling (float64 internally) costs the most. ``--nnunet`` measures nnU-Net's own
``DefaultPreprocessor.run_case_save`` on the same files and plan, for comparison.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("preprocess_memory")
_PAGE = os.sysconf("SC_PAGE_SIZE")
NATIVE_SPACING_XYZ = (0.7, 0.7, 1.0)
RESAMPLED_SPACING_ZYX = [1.25, 0.8, 0.8]


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakSampler:
    """Polls this process's RSS in a thread and keeps the maximum."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._stop = interval_s, current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def write_ct_case(folder: Path, shape_zyx: tuple[int, int, int]) -> None:
    """A CT-like int16 volume (air, body, three organs, noise) and its label, written slab by slab in memory."""
    import SimpleITK as sitk

    from cmcseg.dataset import image_file, label_file, write_dataset_json

    z, y, x = shape_zyx
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[:z, :y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    image = np.full(shape_zyx, -1000, dtype=np.int16)
    label = np.zeros(shape_zyx, dtype=np.uint8)
    organs = [((0.5, 0.45, 0.35), (0.2, 0.12, 0.1), 60), ((0.45, 0.5, 0.65), (0.25, 0.1, 0.09), 40),
              ((0.6, 0.6, 0.5), (0.1, 0.05, 0.05), 150)]
    for s in range(0, z, 16):  # slabs keep the generator's own memory small
        sl = slice(s, min(z, s + 16))
        image[sl] = np.where(body, 0, -1000)
        for k, (c, r, hu) in enumerate(organs, start=1):
            m = (((zz[sl] - c[0] * z) / (r[0] * z)) ** 2 + ((yy - c[1] * y) / (r[1] * y)) ** 2
                 + ((xx - c[2] * x) / (r[2] * x)) ** 2) <= 1
            image[sl][m] = hu
            label[sl][m] = k
        image[sl] += rng.normal(0, 20, image[sl].shape).astype(np.int16)
    for arr, path in ((image, image_file(folder, "ct00", 0, ".nii")), (label, label_file(folder, "ct00", ".nii"))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(NATIVE_SPACING_XYZ)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path))
    write_dataset_json(folder, name=folder.name, channel_names=["CT"], num_training=1, file_ending=".nii",
                       labels={"background": 0, "liver": 1, "spleen": 2, "kidney": 3})


def ct_plans(resample: bool, shape_zyx: tuple[int, int, int]) -> dict:
    spacing = RESAMPLED_SPACING_ZYX if resample else list(NATIVE_SPACING_XYZ[::-1])
    stats = {"mean": 60.0, "median": 55.0, "std": 50.0, "min": -200.0, "max": 400.0, "percentile_99_5": 300.0,
             "percentile_00_5": -100.0}
    return {
        "schema_version": 1, "dataset_name": "Dataset990_CTMemory", "labels": {"background": 0, "liver": 1,
                                                                                "spleen": 2, "kidney": 3},
        "pairing": "paired", "reference_channel": 0, "reference_modality": "CT", "modalities": ["CT"],
        "channels_per_modality": {"0": 1}, "register": "none", "label_interpolation": "nearest",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": stats},
        "configurations": {"3d_fullres": {
            "data_identifier": "3d_fullres", "spacing": spacing, "patch_size": [128, 128, 128], "batch_size": 2,
            "median_image_size_in_voxels": list(shape_zyx), "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}}},
    }


def nnunet_plans(plans: dict) -> dict:
    """The same plan in nnU-Net's own plans format (what its DefaultPreprocessor reads)."""
    cfg = dict(plans["configurations"]["3d_fullres"], preprocessor_name="DefaultPreprocessor",
               architecture={"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {}, "_kw_requires_import": []}, batch_dice=True,
               resampling_fn_probabilities="resample_data_or_seg_to_shape",
               resampling_fn_probabilities_kwargs={"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None})
    return {"dataset_name": plans["dataset_name"], "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": cfg["spacing"],
            "original_median_shape_after_transp": cfg["median_image_size_in_voxels"],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": cfg}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"]}


def _run_cmcseg(raw: Path, out: Path, plans: dict) -> str:
    from cmcseg.dataset import Dataset
    from cmcseg.preprocessing.preprocessor import preprocess_dataset

    dataset = Dataset.load(raw)
    return preprocess_dataset(dataset, plans, "3d_fullres", out, num_workers=1, progress=False).summary()


def _run_nnunet(raw: Path, out: Path, plans: dict) -> str:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from cmcseg.image_io import read_json

    manager = PlansManager(nnunet_plans(plans))
    out.mkdir(parents=True, exist_ok=True)
    DefaultPreprocessor(verbose=False).run_case_save(
        str(out / "ct00"), [str(raw / "imagesTr" / "ct00_0000.nii")], str(raw / "labelsTr" / "ct00.nii"),
        manager, manager.get_configuration("3d_fullres"), read_json(raw / "dataset.json"))
    return "nnU-Net DefaultPreprocessor.run_case_save"


def child(raw: Path, out: Path, resample: bool, shape_zyx: tuple[int, int, int], nnunet: bool = False) -> dict:
    """Runs in the measured process: import, note the baseline, preprocess, report."""
    import nnunetv2.preprocessing.preprocessors.default_preprocessor  # noqa: F401

    import cmcseg.preprocessing.preprocessor  # noqa: F401 - imports are not part of the measurement

    plans = ct_plans(resample, shape_zyx)
    baseline = current_rss()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        summary = (_run_nnunet if nnunet else _run_cmcseg)(raw, out, plans)
    peak = max(sampler.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    case_bytes = int(np.prod(shape_zyx)) * 4
    return {"tool": "nnunet" if nnunet else "cmcseg", "shape_zyx": list(shape_zyx), "resample": resample,
            "seconds": round(time.perf_counter() - start, 1), "case_float32_mb": round(case_bytes / 2**20, 1),
            "baseline_rss_mb": round(baseline / 2**20, 1),
            "peak_rss_mb": round(peak / 2**20, 1), "peak_above_baseline_mb": round((peak - baseline) / 2**20, 1),
            "peak_above_baseline_x_case": round((peak - baseline) / case_bytes, 2),
            "peak_x_case": round(peak / case_bytes, 2), "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--resample", action="store_true", help="resample to another spacing (the costly path)")
    parser.add_argument("--nnunet", action="store_true", help="also measure nnU-Net's DefaultPreprocessor")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.resample, shape, args.nnunet)))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="cmcseg-memory-"))
    raw = tmp / "raw" / "Dataset990_CTMemory"
    log.info("writing a synthetic CT case of %s voxels to %s", "x".join(map(str, shape)), raw)
    write_ct_case(raw, shape)
    results = []
    for tool in ["cmcseg"] + (["nnunet"] if args.nnunet else []):
        cmd = [sys.executable, __file__, "--child", str(raw), str(tmp / f"pre_{tool}"), "--shape", *map(str, shape)]
        cmd += (["--resample"] if args.resample else []) + (["--nnunet"] if tool == "nnunet" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log.error("measurement of %s failed:\n%s", tool, proc.stderr[-4000:])
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log.info(json.dumps(results[-1]))
    for r in results:
        log.info("%-7s peak RSS %7.0f MB = %5.2f x the case above a baseline of %.0f MB (%.2f x in total), %.0f s",
                 r["tool"], r["peak_rss_mb"], r["peak_above_baseline_x_case"], r["baseline_rss_mb"], r["peak_x_case"],
                 r["seconds"])
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
