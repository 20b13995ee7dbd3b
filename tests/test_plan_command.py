"""`cmcseg plan` end to end: phantom in, fingerprint/plans/splits/arrays out; incremental; real misaligned data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import require_shared_data

from cmcseg.cli.main import main
from cmcseg.dataset import image_file, label_file, write_dataset_json
from cmcseg.errors import CmcsegError
from cmcseg.paths import resolve_roots
from cmcseg.phantoms import synthesize
from cmcseg.plans.plan_and_preprocess import plan_and_preprocess
from cmcseg.plans.splits import labeled_subset
from cmcseg.preprocessing.storage import load_case


@pytest.fixture(scope="module")
def planned_mscmr(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    roots = resolve_roots(root / "raw", root / "pre", root / "res")
    synthesize("MSCMR", roots.raw / "Dataset501_MSCMR", size="tiny", seed=1, cases=6)
    outcome = plan_and_preprocess("MSCMR", roots, num_workers=2, progress=False)
    return roots, outcome


def test_plan_writes_every_contract(planned_mscmr):
    roots, outcome = planned_mscmr
    out = roots.preprocessed / "Dataset501_MSCMR"
    for name in ("fingerprint.json", "plans.json", "splits.json", "dataset.json"):
        assert (out / name).is_file(), name
    plans = json.loads((out / "plans.json").read_text())
    assert plans["reference_modality"] == "LGE" and set(plans["configurations"]) == {"2d", "3d_fullres"}
    fp = json.loads((out / "fingerprint.json").read_text())
    kinds = {rel["relation"]["kind"] for c in fp["cases"].values() for rel in c["modalities"].values()}
    assert "misaligned" in kinds or "same_space" in kinds  # the phantom's sequences sit on their own grids
    ds = outcome.dataset
    for cfg in plans["configurations"].values():
        folder = out / cfg["data_identifier"]
        for case in ds.cases:
            data, seg, fov, props = load_case(folder, case.case_id)
            assert data.shape[0] == 3 and fov.shape[0] == 3 and data.shape[1:] == fov.shape[1:]
            assert (seg is None) == (not case.labeled)
            assert props["reference_modality"] == "LGE"


def test_unlabeled_cases_never_labeled_in_any_fold(planned_mscmr):
    _, outcome = planned_mscmr
    unlabeled = {c.case_id for c in outcome.dataset.unlabeled_cases}
    assert unlabeled
    for fold in range(len(outcome.splits["folds"])):
        small, full = labeled_subset(outcome.splits, fold, 0.2), labeled_subset(outcome.splits, fold, 1.0)
        assert small and set(small) <= set(full) and not set(full) & unlabeled


def test_second_run_is_incremental_and_says_so(planned_mscmr, capsys):
    roots, _ = planned_mscmr
    code = main(["plan", "-d", "MSCMR", "-np", "1", "--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed)])
    out = capsys.readouterr().out
    assert code == 0
    assert "0 cases preprocessed" in out and "unchanged, skipped" in out


def test_verify_only_reports_and_stops_before_work(tmp_path: Path, capsys):
    roots = resolve_roots(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    folder = synthesize("MSCMR", roots.raw / "Dataset501_MSCMR", size="tiny", cases=3)
    code = main(["plan", "-d", "501", "--verify-only", "--raw", str(roots.raw), "--preprocessed",
                 str(roots.preprocessed)])
    assert code == 0 and "finding" in capsys.readouterr().out
    assert not roots.preprocessed.exists()
    # a fatal problem: the table names the file and nothing is written
    img = image_file(folder, "patient002", 2)
    img.write_bytes(img.read_bytes()[:200])
    code = main(["plan", "-d", "MSCMR", "--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed)])
    err = capsys.readouterr().err
    assert code == 2 and "patient002_0002.nii.gz" in err and "corrupt" in err
    assert not roots.preprocessed.exists()


@pytest.mark.realdata
def test_plan_on_real_spinal_cord_with_per_contrast_grids(tmp_path: Path):
    """sub-unf02/03: each contrast with its own orientation and spacing; sub-unf01 labelled on T2w."""
    src = require_shared_data("spinalcord")
    raw = tmp_path / "raw" / "Dataset950_Spine"
    contrasts = ("T2w", "T1w", "T2star")
    for subject in ("sub-unf01", "sub-unf02", "sub-unf03"):
        for ch, contrast in enumerate(contrasts):
            dst = image_file(raw, subject, ch)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / subject / "anat" / f"{subject}_{contrast}.nii.gz", dst)
    seg = sitk.ReadImage(str(src / "derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz"))
    seg = _binary_like(seg)
    label_file(raw, "sub-unf01").parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(seg, str(label_file(raw, "sub-unf01")))
    write_dataset_json(raw, name="Spine", channel_names=list(contrasts), labels={"background": 0, "cord": 1},
                       num_training=3)
    roots = resolve_roots(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    outcome = plan_and_preprocess("Spine", roots, configurations=("3d_fullres",), num_workers=1, progress=False)
    assert outcome.splits is None  # one labeled case: no folds, but everything else is planned
    fp = outcome.fingerprint
    rel = fp["cases"]["sub-unf02"]["modalities"]
    assert rel["1"]["relation"]["kind"] in ("misaligned", "same_space")
    assert rel["2"]["relation"]["kind"] == "misaligned" and rel["2"]["relation"]["overlap_fraction"] < 1.0
    assert "sub-unf02" in fp["cases"] and "Misaligned modalities" in fp["summary"]
    data, seg_arr, fov, _ = load_case(roots.preprocessed / "Dataset950_Spine" / "3d_fullres", "sub-unf02")
    assert seg_arr is None and fov[0].all() and 0 < fov[2].mean() < 1  # T2star covers only part of T2w


def _binary_like(seg: sitk.Image) -> sitk.Image:
    """The manual cord mask (stored as float) as a uint8 label with the same geometry."""
    out = sitk.GetImageFromArray((sitk.GetArrayFromImage(seg) > 0.5).astype(np.uint8))
    out.CopyInformation(seg)
    return out


def test_a_planner_variant_sits_beside_the_default_plans(planned, tmp_path: Path):
    """`cmcseg plan -pl PlainConvUNet` writes its own plans and data beside the default ones (the fingerprint and
    folds are shared), `train -p` reads them and names its model folder after them, `predict -p` finds that model."""
    from cmcseg.networks.encoders import build_encoder
    from cmcseg.paths import WorkRoots
    from cmcseg.plans.plans import load_plans
    from cmcseg.prediction.model import find_model_folder, write_model_folder
    from cmcseg.training.cmc_trainer import CMCTrainer
    from cmcseg.training.trainer import TrainingRequest

    roots = WorkRoots(planned.raw, tmp_path / "preprocessed", tmp_path / "results")
    folder = roots.preprocessed / "Dataset501_MSCMR"
    plan_and_preprocess("MSCMR", roots, configurations=["3d_fullres"], num_workers=1, progress=False)
    default_before = (folder / "plans.json").read_bytes()
    outcome = plan_and_preprocess("MSCMR", roots, configurations=["3d_fullres"], num_workers=1, progress=False,
                                  planner="PlainConvUNet")
    assert outcome.plans_file == folder / "cmcsegPlainConvUNetPlans.json"
    assert (folder / "plans.json").read_bytes() == default_before
    variant = load_plans(outcome.plans_file)
    config = variant["configurations"]["3d_fullres"]
    assert variant["plans_name"] == "cmcsegPlainConvUNetPlans"
    assert config["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert config["data_identifier"] == "cmcsegPlainConvUNetPlans_3d_fullres"
    default_cases = sorted(p.name for p in (folder / "3d_fullres").iterdir())
    assert default_cases and sorted(p.name for p in (folder / config["data_identifier"]).iterdir()) == default_cases

    class StopAtNetwork(CMCTrainer):
        def build_network(self):
            self.seen = (self.plans["plans_name"], self.network_options()["encoder"], self.output_folder.parent.name)
            raise CmcsegError("stopped by the test before training")

    trainer = StopAtNetwork(TrainingRequest("MSCMR", 0, 0.5, roots=roots, plans="cmcsegPlainConvUNetPlans",
                                            device="cpu", num_workers=0))
    with pytest.raises(CmcsegError, match="stopped by the test"):
        trainer.initialize()
    # the variant's plans, the plan's topology as encoder without --encoder, a model folder named after the plans
    assert trainer.seen == ("cmcsegPlainConvUNetPlans", "plain",
                            "StopAtNetwork__cmcsegPlainConvUNetPlans__3d_fullres__labeled0.5")
    network = CMCTrainer.build_network_architecture(variant, "3d_fullres", {"single_branch": True}, True)
    assert type(network.encoders[0]).__name__ == type(build_encoder("plain", config, 4)).__name__

    results = roots.results / "Dataset501_MSCMR"
    dataset_json = json.loads((folder / "dataset.json").read_text())
    for name, plans in (("CMCTrainer__3d_fullres__labeled0.5", load_plans(folder)),
                        ("CMCTrainer__cmcsegPlainConvUNetPlans__3d_fullres__labeled0.5", variant)):
        write_model_folder(results / name, plans, dataset_json, {0: {}})
    assert find_model_folder(roots.results, "MSCMR", "cmcsegPlainConvUNetPlans").name.startswith(
        "CMCTrainer__cmcsegPlainConvUNetPlans")
    assert find_model_folder(roots.results, "MSCMR", "cmcsegPlans").name == "CMCTrainer__3d_fullres__labeled0.5"
    with pytest.raises(CmcsegError, match="2 trained models"):
        find_model_folder(roots.results, "MSCMR")
    with pytest.raises(CmcsegError, match="not a plain name"):  # it would name a folder outside the results
        CMCTrainer(TrainingRequest("MSCMR", 0, 0.5, roots=roots, plans="../../elsewhere", device="cpu"))
    assert not (roots.results.parent / "elsewhere").exists()
