"""`cmcseg plan` against `nnUNetv2_plan_and_preprocess`, on the same co-registered raw data, in one run.

Datasets:
  * a TAO phantom (co-registered T1/T1c; nnU-Net cannot take misaligned data, so the
    comparison uses data both can read), size ``default`` unless --size says otherwise;
  * ../shared/data/brats2015 (6 real cases, FLAIR + T1c, 240x240x155) written into the raw
    layout, when that folder exists.

Both tools get the same worker count and both configurations (3d_fullres and 2d). The
report gives wall time and peak RSS (summed over the process tree, and of the main
process), and the ratios cmcseg / nnU-Net.

Usage: python benchmarks/plan_vs_nnunet.py [--workers 2] [--size default] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402

from cmcseg.dataset import image_file, label_file, write_dataset_json  # noqa: E402
from cmcseg.image_io import write_image  # noqa: E402
from cmcseg.phantoms import synthesize  # noqa: E402

BIN = Path(sys.executable).parent
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def brats_to_raw(src: Path, folder: Path) -> Path:
    """BraTS 2015 example cases -> raw layout (FLAIR, T1c; labels 0-4 stored as float32 in the source)."""
    cases = sorted(p for p in src.iterdir() if p.is_dir())
    for case in cases:
        cid = case.name
        image_file(folder, cid, 0).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(case / "Flair_subtrMeanDivStd.nii.gz", image_file(folder, cid, 0))
        shutil.copyfile(case / "T1c_subtrMeanDivStd.nii.gz", image_file(folder, cid, 1))
        seg = sitk.ReadImage(str(case / "OTMultiClass.nii.gz"))
        write_image(sitk.Cast(seg, sitk.sitkUInt8), label_file(folder, cid))
    write_dataset_json(folder, name="BraTS", channel_names=["FLAIR", "T1c"],
                       labels={"background": 0, "necrosis": 1, "edema": 2, "non_enhancing": 3, "enhancing": 4},
                       num_training=len(cases))
    return folder


def drop_unlabeled_cases(folder: Path) -> int:
    """nnU-Net needs a label for every training case: remove the phantom's unlabeled ones (both tools see the same
    data)."""
    meta = json.loads((folder / "dataset.json").read_text())
    ending = meta["file_ending"]
    labeled = {p.name[: -len(ending)] for p in (folder / "labelsTr").iterdir()}
    removed = 0
    for img in sorted((folder / "imagesTr").iterdir()):
        if img.name[: -len(ending)].rsplit("_", 1)[0] not in labeled:
            img.unlink()
            removed += 1
    meta["numTraining"] = len(labeled)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return removed


def run_pair(raw_root: Path, folder_name: str, work: Path, workers: int) -> dict:
    dataset_id = folder_name.split("_")[0].replace("Dataset", "")
    env_nn = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(work / "nnunet_pre"),
              "nnUNet_results": str(work / "nnunet_res")}
    nn = run_measured([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "3d_fullres", "2d",
                       "-np", str(workers), str(workers), "-npfp", str(workers)], env=env_nn)
    ours = run_measured([str(BIN / "cmcseg"), "plan", "-d", folder_name, "-c", "3d_fullres", "2d",
                         "-np", str(workers), "--raw", str(raw_root), "--preprocessed", str(work / "cmcseg_pre")])
    for m in (nn, ours):
        if m.returncode != 0:
            raise SystemExit(f"{m.command} failed:\n{m.output_tail}")
    plans_nn = json.loads(next((work / "nnunet_pre").glob("*/nnUNetPlans.json")).read_text())
    plans_ours = json.loads(next((work / "cmcseg_pre").glob("*/plans.json")).read_text())
    return {
        "dataset": folder_name,
        "cases": len(list((raw_root / folder_name / "labelsTr").glob("*.nii.gz"))),
        "nnunet": vars(nn) | {"output_tail": ""},
        "cmcseg": vars(ours) | {"output_tail": ""},
        "ratio_cmcseg_over_nnunet": ours.ratio_to(nn),
        "plans": {name: {"nnunet": _cfg(plans_nn, name), "cmcseg": _cfg(plans_ours, name)}
                  for name in ("3d_fullres", "2d")},
    }


def _cfg(plans: dict, name: str) -> dict:
    c = plans["configurations"].get(name, {})
    return {k: c.get(k) for k in ("spacing", "patch_size", "batch_size")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", default="default", choices=("tiny", "small", "default"))
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--skip-brats", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthesize("TAO", raw / "Dataset504_TAO", cases=args.cases, seed=0, size=args.size)
        drop_unlabeled_cases(raw / "Dataset504_TAO")
        results.append(run_pair(raw, "Dataset504_TAO", Path(tmp) / "tao", args.workers))
        if (SHARED / "brats2015").is_dir() and not args.skip_brats:
            brats_to_raw(SHARED / "brats2015", raw / "Dataset700_BraTS")
            results.append(run_pair(raw, "Dataset700_BraTS", Path(tmp) / "brats", args.workers))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan_vs_nnunet.json").write_text(json.dumps(results, indent=2))
    print(f"{'dataset':<18} {'tool':<8} {'wall s':>8} {'tree GB':>8} {'main GB':>8}")
    for r in results:
        for tool in ("nnunet", "cmcseg"):
            m = r[tool]
            print(f"{r['dataset']:<18} {tool:<8} {m['wall_s']:8.1f} {m['peak_tree_rss_gb']:8.2f} "
                  f"{m['peak_main_rss_gb']:8.2f}")
        ratio = r["ratio_cmcseg_over_nnunet"]
        print(f"{'':<18} {'ratio':<8} {ratio['wall']:8.2f} {ratio['peak_tree_rss']:8.2f}")
        for name, pair in r["plans"].items():
            print(f"   {name}: nnU-Net {pair['nnunet']}  cmcseg {pair['cmcseg']}")


if __name__ == "__main__":
    main()
