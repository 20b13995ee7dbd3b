"""Driving nnU-Net v2 through its Python API on the data cmcseg planned, for side-by-side benchmarks.

nnU-Net needs co-registered channels. cmcseg's preprocessed arrays are exactly that: every
modality resampled into the reference modality's physical space, cropped, normalised and at
the plan's target spacing. :func:`write_aligned_raw` writes them as an nnU-Net raw dataset
(one NIfTI per channel on the preprocessed grid, labels where cmcseg has them), so both tools
train on the same voxels and nnU-Net's predictions land on cmcseg's preprocessed grid, where
they are scored like cmcseg's own validation.

nnU-Net's trainer is built directly (``nnUNetTrainer(plans, configuration, fold, dataset_json,
device)``), never through ``nnUNetv2_train``: its trainer lookup imports ``primus/``, which
imports timm, which cannot be imported on these machines (see ../shared/ENVIRONMENT.md).
:func:`install_primus_placeholder` makes that lookup harmless anyway.

nnU-Net reads its folders from the environment (lazily, in 2.8.1): run nnU-Net work in a
process whose environment comes from :func:`nnunet_env`.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent
CONFIGURATION = "3d_fullres"


# ------------------------------------------------------------------------------------------ environment
def nnunet_env(work: Path, data_workers: int = 1, threads: int = 1, base: Mapping[str, str] | None = None) -> dict:
    """Environment for an nnU-Net process: its three folders under ``work``, ``data_workers``
    augmentation processes (``nnUNet_n_proc_DA``), no torch.compile, ``threads`` BLAS/OpenMP threads."""
    env = dict(os.environ if base is None else base)
    env.update({
        "nnUNet_raw": str(work / "nnunet_raw"),
        "nnUNet_preprocessed": str(work / "nnunet_preprocessed"),
        "nnUNet_results": str(work / "nnunet_results"),
        "nnUNet_n_proc_DA": str(int(data_workers)),
        "nnUNet_compile": "false",
        "OMP_NUM_THREADS": str(int(threads)),
        "MKL_NUM_THREADS": str(int(threads)),
    })
    return env


def install_primus_placeholder() -> None:
    """Put an empty module for ``nnunetv2.training.nnUNetTrainer.primus`` in ``sys.modules`` (it imports timm)."""
    name = "nnunetv2.training.nnUNetTrainer.primus"
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = []  # a package with nothing in it
        sys.modules[name] = module


# ------------------------------------------------------------------------------------------ raw dataset
def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def write_aligned_raw(preprocessed_dataset: Path, plans: Mapping[str, Any], case_ids: Sequence[str], raw_root: Path,
                      dataset_id: int, name: str, configuration: str = CONFIGURATION) -> Path:
    """cmcseg's preprocessed (aligned, co-registered) cases -> an nnU-Net raw dataset; returns its folder.

    One NIfTI per modality channel on the preprocessed grid (the case's spacing after resampling,
    which keeps the slice spacing in a 2d configuration; origin 0, identity direction), the label
    where cmcseg has one. Cases without a label are skipped (nnU-Net trains on labeled cases only).
    """
    from cmcseg.dataset import image_file, label_file, write_dataset_json
    from cmcseg.image_io import array_to_image, write_image
    from cmcseg.plans.plans import plan_configuration
    from cmcseg.preprocessing.storage import load_case

    config = plan_configuration(plans, configuration)
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    data_folder = Path(preprocessed_dataset) / config["data_identifier"]
    written = 0
    for case_id in case_ids:
        data, seg, _fov, props = load_case(data_folder, case_id)
        if seg is None:
            continue
        spacing_xyz = [float(s) for s in props["spacing_after_resampling"]][::-1]
        for c in range(data.shape[0]):
            write_image(array_to_image(np.asarray(data[c], dtype=np.float32), spacing_xyz),
                        image_file(folder, case_id, c))
        label = np.asarray(seg[0]).astype(np.int16)
        write_image(array_to_image(np.where(label < 0, 0, label).astype(np.uint8), spacing_xyz),
                    label_file(folder, case_id))
        written += 1
    modalities = list(plans["modalities"])
    channels = [m if int(plans["channels_per_modality"][str(i)]) == 1 else f"{m}_{k}"
                for i, m in enumerate(modalities) for k in range(int(plans["channels_per_modality"][str(i)]))]
    labels = {k: int(v) for k, v in plans["labels"].items()}
    write_dataset_json(folder, name=name, channel_names=channels, labels=labels, num_training=written,
                       description="cmcseg-aligned volumes (preprocessed grid) for nnU-Net")
    return folder


def convert_myops(source: Path, raw: Path, flag: str = "--source") -> str:
    """``cmcseg convert --from myops SOURCE -d MYOPSDEV`` in a process of its own; returns the dataset folder's name.
    ``flag`` is the benchmark's option that names the source, for the error."""
    if not Path(source).is_dir():
        raise SystemExit(f"{source} does not exist: pass {flag} with the myops_dev folder")
    proc = subprocess.run([str(BIN / "cmcseg"), "convert", "--from", "myops", str(source), "-d", "MYOPSDEV",
                           "--raw", str(raw)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cmcseg convert failed:\n{proc.stdout[-3000:]}")
    return next(p.name for p in sorted(Path(raw).iterdir()) if p.name.endswith("_MYOPSDEV"))


def plan_with_cmcseg(dataset: str, raw: Path, preprocessed: Path, configuration: str,
                     extra: Sequence[str] = ()) -> dict:
    """``cmcseg plan -d DATASET -c CONFIGURATION -np 2 [extra]`` in a process of its own; returns cmcseg's plans."""
    proc = subprocess.run([str(BIN / "cmcseg"), "plan", "-d", dataset, "-c", configuration, "-np", "2", *extra,
                           "--raw", str(raw), "--preprocessed", str(preprocessed)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"cmcseg plan failed:\n{proc.stdout[-3000:]}")
    return json.loads((Path(preprocessed) / dataset / "plans.json").read_text())


def plan_and_preprocess(dataset_id: int, env: Mapping[str, str], workers: int = 1,
                        configuration: str = CONFIGURATION) -> tuple[dict, float]:
    """``nnUNetv2_plan_and_preprocess -d ID -c CONFIGURATION``; returns (nnU-Net's plans, wall seconds)."""
    start = time.perf_counter()
    cmd = [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration,
           "-np", str(workers), "-npfp", str(workers)]
    proc = subprocess.run(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    pre = Path(env["nnUNet_preprocessed"])
    plans_file = next(pre.glob(f"Dataset{int(dataset_id):03d}_*/nnUNetPlans.json"))
    return json.loads(plans_file.read_text()), time.perf_counter() - start


def preprocessed_folder(env: Mapping[str, str], dataset_id: int) -> Path:
    return next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{int(dataset_id):03d}_*"))


def write_splits(env: Mapping[str, str], dataset_id: int, train: Sequence[str], val: Sequence[str]) -> Path:
    """nnU-Net's ``splits_final.json`` with one fold (fold 0) of the given cases."""
    path = preprocessed_folder(env, dataset_id) / "splits_final.json"
    path.write_text(json.dumps([{"train": list(train), "val": list(val)}], indent=2))
    return path


def forced_plans(nnunet_plans: Mapping[str, Any], patch_size: Sequence[int], batch_size: int,
                 architecture: Mapping[str, Any] | None = None, configuration: str = CONFIGURATION) -> dict:
    """nnU-Net's plans with ``configuration`` forced to cmcseg's patch, batch and (optionally) architecture.

    Preprocessing does not depend on patch, batch or network, so the preprocessed data stays valid.
    """
    plans = copy.deepcopy(dict(nnunet_plans))
    config = plans["configurations"][configuration]
    config["patch_size"] = [int(p) for p in patch_size]
    config["batch_size"] = int(batch_size)
    if architecture is not None:
        config["architecture"] = copy.deepcopy(dict(architecture))
    return plans


def configuration_summary(plans: Mapping[str, Any], configuration: str = CONFIGURATION) -> dict:
    config = plans["configurations"][configuration]
    arch = config["architecture"]
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"], "spacing": config["spacing"],
            "network": arch["network_class_name"].rsplit(".", 1)[-1],
            "features_per_stage": arch["arch_kwargs"].get("features_per_stage"),
            "n_blocks_per_stage": arch["arch_kwargs"].get("n_blocks_per_stage",
                                                          arch["arch_kwargs"].get("n_conv_per_stage"))}


# ------------------------------------------------------------------------------------------ trainer
def build_trainer(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], fold: int = 0, device: str = "cpu",
                  trainer_class: type | None = None, configuration: str = CONFIGURATION):
    """An nnU-Net trainer built through the Python API (nnUNetTrainer unless ``trainer_class``)."""
    import torch

    install_primus_placeholder()
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cls = trainer_class or nnUNetTrainer
    plans = copy.deepcopy(dict(plans))
    plans["continue_training"] = False  # nnU-Net 2.8.1 pops this key in __init__
    return cls(plans, configuration, fold, dict(dataset_json), device=torch.device(device))


def load_dataset_json(env: Mapping[str, str], dataset_id: int) -> dict:
    return json.loads((preprocessed_folder(env, dataset_id) / "dataset.json").read_text())


def predict_files(trainer, inputs: Sequence[Sequence[str]], outputs_truncated: Sequence[str],
                  tile_step_size: float = 0.5, use_mirroring: bool = False) -> None:
    """Predict cases with nnU-Net's own predictor and the trainer's in-memory network (Gaussian sliding
    window; no mirroring by default, as cmcseg's validation), writing ``<output>.nii.gz`` segmentations."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    if use_mirroring and trainer.inference_allowed_mirroring_axes is None:
        # nnU-Net sets the axes when it builds its data loaders; a trainer made only to predict has not, and
        # nnUNetPredictor then silently skips mirroring
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    parameters = [{k: v.detach().clone() for k, v in trainer.network.state_dict().items()}]
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, parameters,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    predictor.predict_from_files_sequential([list(x) for x in inputs], list(outputs_truncated),
                                            save_probabilities=False, overwrite=True)


# ------------------------------------------------------------------------------------------ worker processes
def add_worker_arguments(parser, workers: Sequence[str]) -> None:
    """The hidden ``--worker NAME --spec FILE --result FILE`` options of a benchmark that runs arms as processes."""
    import argparse

    parser.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    for option in ("--spec", "--result"):
        parser.add_argument(option, type=Path, help=argparse.SUPPRESS)


def serve_worker(spec_file: Path, result_file: Path, function) -> None:
    """Worker side: ``function(spec)`` on the JSON spec, its result written as JSON."""
    Path(result_file).write_text(json.dumps(function(json.loads(Path(spec_file).read_text()))))


def run_worker(script: Path, worker: str, spec: Mapping[str, Any], work: Path, env: Mapping[str, str]) -> dict:
    """Parent side: ``script --worker WORKER`` on ``spec`` in a measured process of its own (``env``); its result
    plus process wall time, peak RSS of the process tree and of the main process, the tree's peak PSS, and the load
    averages before and after."""
    from measure import loadavg, run_measured

    spec_file, result_file = Path(work) / f"spec_{worker}.json", Path(work) / f"result_{worker}.json"
    spec_file.write_text(json.dumps(dict(spec)))
    result_file.unlink(missing_ok=True)
    before = loadavg()
    m = run_measured([sys.executable, str(script), "--worker", worker, "--spec", str(spec_file),
                      "--result", str(result_file)], env=env)
    if m.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"worker {worker} of {Path(script).name} failed ({m.returncode}):\n{m.output_tail}")
    return {**json.loads(result_file.read_text()), "process_wall_s": m.wall_s,
            "peak_tree_rss_gb": m.peak_tree_rss_gb, "peak_main_rss_gb": m.peak_main_rss_gb,
            "peak_tree_pss_gb": m.peak_tree_pss_gb, "loadavg_before": before, "loadavg_after": loadavg()}
