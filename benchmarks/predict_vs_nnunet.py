"""`cmcseg predict` against nnU-Net's `nnUNetPredictor`: seconds per case and peak RSS, TTA on and off, in one run.

Both tools predict the same raw cases (a TAO phantom: co-registered T1/T1c, because nnU-Net
cannot read modalities on different grids) on the CPU, with the same 3d_fullres plan (cmcseg's
plans.json; nnU-Net gets a copy with its ``preprocessor_name``), patch, tile step 0.5, Gaussian
weighting, mirroring over all three axes when TTA is on, the same number of torch threads
(``--threads``) and of background workers (``--workers``: nnU-Net's preprocessing and export
processes, cmcseg's ``-np`` threads). Weights are random (timing does not depend on them); each
model folder is written from the plan:

* nnU-Net: its ``ResidualEncoderUNet`` from the plan's architecture (``get_network_from_plans``),
  run through ``nnUNetPredictor.manual_initialization`` + ``predict_from_files``. That path
  never looks trainer classes up by name, so nnU-Net's ``primus`` trainers (which need timm)
  are not imported; a placeholder module for them is installed anyway, in case a version does;
* cmcseg "same network": the single-branch CMC network, which is the plan's encoder + nnU-Net's
  ``UNetDecoder`` with the FOV masks as two extra input channels: the same FLOPs as nnU-Net's;
* cmcseg "CMC": the real CMC network (one encoder-decoder branch per modality, fused at the
  bottleneck), about M times the FLOPs. Reported for information; the comparison with
  nnU-Net is the "same network" row.

Wall time and peak RSS of the whole process tree come from ``measure.run_measured`` (the tools'
worker processes included). Seconds per case = wall time / cases, startup included.

Usage: python benchmarks/predict_vs_nnunet.py [--cases 3] [--size small] [--threads 1] [--workers 2]
       [--variants same cmc] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Measurement, run_measured  # noqa: E402

BIN = Path(sys.executable).parent
DATASET = "Dataset504_TAO"


# ----------------------------------------------------------------------------------------- setup
def prepare_dataset(work: Path, size: str, cases: int) -> tuple[Path, dict, dict]:
    """The TAO phantom (raw) and cmcseg's 3d_fullres plan of it; returns (images folder, plans, dataset.json)."""
    from cmcseg.image_io import read_json
    from cmcseg.paths import WorkRoots
    from cmcseg.phantoms import synthesize
    from cmcseg.plans.plan_and_preprocess import plan_and_preprocess

    roots = WorkRoots(work / "raw", work / "preprocessed", work / "results")
    synthesize("TAO", roots.raw / DATASET, cases=cases, seed=0, size=size)
    plan_and_preprocess(DATASET, roots, configurations=["3d_fullres"], num_workers=2, progress=False)
    images = work / "input"
    images.mkdir(exist_ok=True)
    for path in sorted((roots.raw / DATASET / "imagesTr").iterdir()):  # only the images: labels are not inputs
        (images / path.name).write_bytes(path.read_bytes())
    return (images, read_json(roots.preprocessed / DATASET / "plans.json"),
            read_json(roots.raw / DATASET / "dataset.json"))


def write_cmcseg_model(folder: Path, plans: dict, dataset_json: dict, single_branch: bool) -> tuple[Path, int]:
    """A cmcseg model folder with random weights; returns it and the parameter count."""
    import torch

    from cmcseg.networks.cmc import build_cmc_network
    from cmcseg.prediction.model import write_model_folder

    torch.manual_seed(0)
    network = build_cmc_network(plans, "3d_fullres", single_branch=single_branch)
    hyper = {"deep_supervision": True, "single_branch": single_branch, "cac_weight": 1.0}
    write_model_folder(folder, plans, dataset_json, {0: network.state_dict()}, "CMCTrainer", {"dataset": DATASET},
                       hyper)
    return folder, sum(p.numel() for p in network.parameters())


def nnunet_plans(plans: dict) -> dict:
    """cmcseg's plans as nnU-Net's PlansManager reads them (the same configuration, plus its preprocessor)."""
    plans = copy.deepcopy(plans)
    for config in plans["configurations"].values():
        config.setdefault("preprocessor_name", "DefaultPreprocessor")
    return plans


# ----------------------------------------------------------------------------------------- nnU-Net worker
def nnunet_worker(args: argparse.Namespace) -> None:
    """Run nnUNetPredictor on args.input -> args.output (in its own process, measured from outside)."""
    sys.modules.setdefault("nnunetv2.training.nnUNetTrainer.primus",
                           types.ModuleType("nnunetv2.training.nnUNetTrainer.primus"))  # needs timm otherwise
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(args.threads)
    plans = json.loads(Path(args.plans).read_text())
    dataset_json = json.loads(Path(args.dataset_json).read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    label_manager = manager.get_label_manager(dataset_json)
    torch.manual_seed(0)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, len(dataset_json["channel_names"]),
                                     label_manager.num_segmentation_heads, allow_init=True, deep_supervision=False)
    print(f"nnU-Net network: {sum(p.numel() for p in network.parameters())} parameters", flush=True)
    device = torch.device(args.device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.tta,
                                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    predictor.manual_initialization(network, manager, config, [network.state_dict()], dataset_json,
                                    "nnUNetTrainer", (0, 1, 2))
    predictor.predict_from_files(args.input, args.output, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=args.workers,
                                 num_processes_segmentation_export=args.workers)


# ----------------------------------------------------------------------------------------- runs
def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_nnunet(work: Path, images: Path, plans: dict, dataset_json: dict, tta: bool, args) -> Measurement:
    plans_file, dataset_file = work / "nnunet_plans.json", work / "nnunet_dataset.json"
    plans_file.write_text(json.dumps(nnunet_plans(plans)))
    dataset_file.write_text(json.dumps(dataset_json))
    output = work / f"nnunet_out_tta{int(tta)}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--nnunet-worker", "--input", str(images), "--output",
           str(output), "--plans", str(plans_file), "--dataset-json", str(dataset_file), "--threads",
           str(args.threads), "--workers", str(args.workers), "--device", args.device] + (["--tta"] if tta else [])
    return _checked(run_measured(cmd, env=_env(args.threads)), output, images)


def run_cmcseg(work: Path, images: Path, model: Path, name: str, tta: bool, args) -> Measurement:
    output = work / f"cmcseg_{name}_out_tta{int(tta)}"
    cmd = [str(BIN / "cmcseg"), "predict", "-i", str(images), "-o", str(output), "-m", str(model),
           "--device", args.device,
           "-np", str(args.workers)] + ([] if tta else ["--no-tta"])
    return _checked(run_measured(cmd, env=_env(args.threads)), output, images)


def _checked(m: Measurement, output: Path, images: Path) -> Measurement:
    cases = {p.name.rsplit("_", 1)[0] for p in images.iterdir()}
    written = {p.name[: -len(".nii.gz")] for p in output.glob("*.nii.gz")}
    if m.returncode != 0 or written != cases:
        raise SystemExit(f"{m.command} failed (exit {m.returncode}, wrote {sorted(written)}):\n{m.output_tail}")
    return m


def _row(m: Measurement, cases: int) -> dict:
    return {"wall_s": round(m.wall_s, 2), "s_per_case": round(m.wall_s / cases, 2),
            "peak_tree_rss_gb": round(m.peak_tree_rss_gb, 3), "peak_main_rss_gb": round(m.peak_main_rss_gb, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "default"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both tools (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="background workers of both tools (default 2)")
    ap.add_argument("--variants", nargs="+", default=["same", "cmc"], choices=("same", "cmc"))
    ap.add_argument("--no-tta-only", action="store_true", help="skip the (8 times slower) TTA runs")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of both tools")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    # the nnU-Net worker mode (this script runs itself in a measured subprocess)
    ap.add_argument("--nnunet-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--plans", help=argparse.SUPPRESS)
    ap.add_argument("--dataset-json", help=argparse.SUPPRESS)
    ap.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nnunet_worker:
        nnunet_worker(args)
        return
    results = {"settings": {k: v for k, v in vars(args).items() if k in ("cases", "size", "threads", "workers")},
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images, plans, dataset_json = prepare_dataset(work, args.size, args.cases)
        config = plans["configurations"]["3d_fullres"]
        results["settings"].update(patch_size=config["patch_size"], spacing=config["spacing"],
                                   architecture=config["architecture"]["arch_kwargs"]["features_per_stage"])
        models = {name: write_cmcseg_model(work / "results" / DATASET / f"{name}__3d_fullres", plans, dataset_json,
                                           single_branch=(name == "same"))
                  for name in args.variants}
        for tta in ([False] if args.no_tta_only else [True, False]):
            nn = run_nnunet(work, images, plans, dataset_json, tta, args)
            for name, (model, n_params) in models.items():
                ours = run_cmcseg(work, images, model, name, tta, args)
                results["runs"].append({"tta": tta, "cmcseg_network": name, "cmcseg_parameters": n_params,
                                        "nnunet": _row(nn, args.cases), "cmcseg": _row(ours, args.cases),
                                        "ratio_cmcseg_over_nnunet": {k: round(v, 3)
                                                                     for k, v in ours.ratio_to(nn).items()}})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"predict_vs_nnunet{args.tag}.json").write_text(json.dumps(results, indent=2))
    print(f"{args.cases} TAO phantom cases ({args.size}), patch {results['settings']['patch_size']}, "
          f"{args.threads} torch thread(s), {args.workers} workers, CPU")
    print(f"{'TTA':<5} {'cmcseg net':<10} {'nnU-Net s/case':>14} {'cmcseg s/case':>13} {'time ratio':>10} "
          f"{'nnU-Net GB':>10} {'cmcseg GB':>9} {'RSS ratio':>9}")
    for r in results["runs"]:
        print(f"{'on' if r['tta'] else 'off':<5} {r['cmcseg_network']:<10} {r['nnunet']['s_per_case']:>14.2f} "
              f"{r['cmcseg']['s_per_case']:>13.2f} {r['ratio_cmcseg_over_nnunet']['wall']:>10.2f} "
              f"{r['nnunet']['peak_tree_rss_gb']:>10.2f} {r['cmcseg']['peak_tree_rss_gb']:>9.2f} "
              f"{r['ratio_cmcseg_over_nnunet']['peak_tree_rss']:>9.2f}")
    print(f"wrote {args.out / f'predict_vs_nnunet{args.tag}.json'}")


if __name__ == "__main__":
    main()
