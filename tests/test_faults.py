"""Faults and hostile inputs (issue 11): each reproduces a defect that was found, and checks the new behaviour.

1-2. A checkpoint or weights file with a pickle payload: refused, and the payload did NOT run (it would create a
     marker file; a control load with --unsafe-allow-pickle shows the payload is live).
3-4. Names that would lead a write outside its root (a model's file_ending, a dataset name): refused.
5.   A fresh start over a finished run moves the old checkpoints aside; --continue resumes the most advanced one.
6.   Full disk / read-only folder: the message names the folder, not the raw files.
     CMC training with transformers unimportable.
     SIGKILL at seeded random moments of plan, train (also mid-checkpoint) and predict, then a rerun: nothing lost.
7-8. 4D images, a modality that misses the reference, unusable arguments and misleading messages: the second half.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import write_tiny_dataset
from test_trainer import DATASET, TinyCMCTrainer, request, root_flags, subprocess_env

from cmcseg.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from cmcseg.cli.main import main as cli_main
from cmcseg.dataset import image_file
from cmcseg.errors import CmcsegError, WriteFaultError
from cmcseg.image_io import atomic_path, read_json
from cmcseg.networks.cmc import build_cmc_network
from cmcseg.networks.encoders import build_encoder
from cmcseg.paths import UnsafeNameError, WorkRoots, contained
from cmcseg.prediction.model import load_trained_model
from cmcseg.prediction.predictor import output_paths
from cmcseg.serialization import UnsafeFileError, check_plain_state, load_torch_file
from cmcseg.training.cmc_trainer import CMCTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py
RUN = "TinyCMCTrainer__3d_fullres__labeled0.5"


class Payload:
    """Unpickling this creates ``marker``: what an attacker's code would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def trained(planned: WorkRoots, tmp_path_factory) -> WorkRoots:
    """A finished tiny CMC run (2 epochs of 2 iterations) in a results root of this module's own."""
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path_factory.mktemp("fault_results"))
    TinyCMCTrainer(request(roots)).run()
    return roots


def model_folder(roots: WorkRoots) -> Path:
    return roots.results / DATASET / RUN


def copy_model(roots: WorkRoots, target: Path) -> Path:
    """A copy of the trained model folder (plans, dataset.json, fold_0 with its final checkpoint)."""
    source = model_folder(roots)
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pt", "fold_0/training_config.json"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes((source / name).read_bytes())
    return target


def add_payload(checkpoint: Path, marker: Path) -> None:
    """Rewrite a checkpoint with a payload beside its weights (how a hostile model file is made)."""
    state = torch.load(checkpoint, weights_only=True)
    state["extra"] = {"payload": Payload(marker)}
    torch.save(state, checkpoint)


# ============================================================================ 1-2: pickle payloads
def test_payload_in_encoder_weights_does_not_run(tmp_path: Path):
    from test_networks import tiny_plans

    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pt"
    net = build_cmc_network(tiny_plans(channels=(1, 1)), "3d_fullres")
    torch.save({"state_dict": net.state_dict(), "x": Payload(marker)}, path)
    cfg = tiny_plans()["configurations"]["3d_fullres"]
    with pytest.raises(UnsafeFileError) as info:
        build_encoder("residual", cfg, 2, path)
    assert not marker.exists()
    assert str(path) in str(info.value) and "--unsafe-allow-pickle" in str(info.value)
    build_encoder("residual", cfg, 2, path, unsafe_allow_pickle=True)  # the opt-in: the payload is live
    assert marker.exists()


def test_nnunet_style_checkpoint_with_numpy_logs_still_loads(tmp_path: Path):
    """nnU-Net's checkpoints log NumPy floats: NumPy data is allowed, code is not."""
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}, "logging": {"mean_fg_dice": [np.float64(0.5)]},
                "inference_allowed_mirroring_axes": (0, 1, 2), "keys": np.arange(3, dtype=np.uint32)}, path)
    state = load_torch_file(path, "weights")
    assert state["logging"]["mean_fg_dice"][0] == 0.5 and torch.equal(state["network_weights"]["w"], torch.ones(2))


def test_predict_refuses_a_model_whose_checkpoint_runs_code(trained: WorkRoots, tmp_path: Path, capsys):
    model = copy_model(trained, tmp_path / "model" / RUN)
    marker = tmp_path / "PWNED"
    add_payload(model / "fold_0" / "checkpoint_final.pt", marker)
    inputs = tmp_path / "in"
    inputs.mkdir()
    code = cli_main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model), "--device", "cpu"])
    assert code == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert "checkpoint_final.pt" in err and "--unsafe-allow-pickle" in err and "holds Python objects" in err
    assert not (tmp_path / "out").exists()


def test_continue_refuses_a_checkpoint_that_runs_code(trained: WorkRoots, tmp_path: Path):
    roots = WorkRoots(trained.raw, trained.preprocessed, tmp_path / "results")
    copy_model(trained, roots.results / DATASET / RUN)
    marker = tmp_path / "PWNED"
    add_payload(roots.results / DATASET / RUN / "fold_0" / "checkpoint_final.pt", marker)
    trainer = TinyCMCTrainer(request(roots, continue_training=True))
    with pytest.raises(UnsafeFileError):
        trainer.initialize()
    trainer.close()
    assert not marker.exists()


def test_our_checkpoints_hold_only_tensors_and_plain_values(trained: WorkRoots):
    for path in (model_folder(trained) / "fold_0").glob("checkpoint_*.pt"):
        state = torch.load(path, weights_only=True)  # would raise on any Python object
        check_plain_state(state)
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint({"network": {}, "rng": np.zeros(3)}, model_folder(trained) / "never.pt")
    assert not (model_folder(trained) / "never.pt").exists()


# ============================================================================ 3-4: names and paths
def test_model_file_ending_cannot_lead_outside_the_output_folder(trained: WorkRoots, tmp_path: Path, capsys):
    model = copy_model(trained, tmp_path / "model" / RUN)
    dataset_json = read_json(model / "dataset.json")
    dataset_json["file_ending"] = "./../../x.nii.gz"
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted((trained.raw / DATASET / "imagesTr").glob("*"))[:3]:
        (inputs / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "deep" / "out"
    code = cli_main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "--device", "cpu"])
    assert code == 2
    assert "file_ending './../../x.nii.gz'" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/x.nii.gz")) and not out.exists()
    with pytest.raises(UnsafeNameError):
        load_trained_model(model)


def test_output_paths_refuse_names_that_leave_the_folder(tmp_path: Path):
    assert output_paths(tmp_path, "case_01", ".nii.gz", False)["segmentation"] == tmp_path / "case_01.nii.gz"
    for case_id, ending in (("../escape", ".nii.gz"), ("ok", "/../../x.nii.gz"), ("ok", ".nii.gz/..")):
        with pytest.raises(UnsafeNameError):
            output_paths(tmp_path, case_id, ending, False)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(UnsafeNameError):
        contained(tmp_path, tmp_path / "link" / "x.nii.gz")


def test_synth_name_cannot_leave_the_raw_root(tmp_path: Path, capsys):
    raw = tmp_path / "work" / "raw"
    code = cli_main(["synth", "-d", "MSCMR", "--size", "tiny", "--name", "x/../../../elsewhere", "--raw", str(raw)])
    assert code == 2 and "dataset name 'x/../../../elsewhere' is not allowed" in capsys.readouterr().err
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_raw_dataset_json_with_a_path_in_file_ending_is_refused(tiny_dataset: Path, capsys):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    meta["file_ending"] = "/../../x.nii.gz"
    (tiny_dataset / "dataset.json").write_text(json.dumps(meta))
    code = cli_main(["plan", "-d", tiny_dataset.name, "--raw", str(tiny_dataset.parent),
                     "--preprocessed", str(tiny_dataset.parent / "pre"), "--verify-only"])
    assert code == 2 and "not a file extension" in capsys.readouterr().err


# ============================================================================ 5: a fresh start and --continue
def test_fresh_start_moves_the_old_run_aside_and_continue_resumes_the_new_one(trained: WorkRoots, tmp_path: Path):
    roots = WorkRoots(trained.raw, trained.preprocessed, tmp_path / "results")
    folder = roots.results / DATASET / RUN / "fold_0"
    copy_model(trained, folder.parent)
    old_final = torch.load(folder / "checkpoint_final.pt", weights_only=True)

    fresh = TinyCMCTrainer(request(roots, num_epochs=3))  # the user starts over; then the run is killed
    fresh.initialize()
    try:
        assert not (folder / "checkpoint_final.pt").exists()
        moved = list(folder.glob("previous_run_*/checkpoint_final.pt"))
        assert len(moved) == 1  # the old run is kept, out of --continue's way
        key = next(iter(old_final["network"]))
        assert torch.equal(torch.load(moved[0], weights_only=True)["network"][key], old_final["network"][key])
        fresh.global_step, fresh.current_epoch = 2, 1
        fresh.save_checkpoint("latest")
    finally:
        fresh.close()

    resumed = TinyCMCTrainer(request(roots, num_epochs=3, continue_training=True))
    resumed.initialize()
    try:
        assert resumed.current_epoch == 1 and resumed.global_step == 2  # the new run, not the old final
    finally:
        resumed.close()


def test_continue_takes_the_resumable_checkpoint_with_the_highest_step(tmp_path: Path):
    manager = CheckpointManager(tmp_path)
    full = {"network": {}, "optimizer": {}}  # what a resume needs; best and final keep only weights + metadata
    for kind, step in (("best", 4), ("latest", 9), ("final", 12)):
        manager.save({**full, "global_step": step, "epoch": step // 2}, kind)
    assert "optimizer" not in load_checkpoint(manager.path("final"))
    assert manager.resume_path() == manager.path("latest")  # final is further, but cannot be resumed
    save_checkpoint({**full, "global_step": 12, "epoch": 6}, manager.path("final"))  # a full final (older cmcseg)
    assert manager.resume_path() == manager.path("final")
    save_checkpoint({**full, "global_step": 12, "epoch": 6}, manager.path("latest"))
    assert manager.resume_path() == manager.path("final")  # a tie: final first


# ============================================================================ 6: full disk, read-only folder
def _torch_save_fails(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed")


def test_full_disk_while_saving_a_checkpoint_names_the_folder(tmp_path: Path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save({"network": {"w": torch.ones(1)}, "global_step": 1}, "latest")
    monkeypatch.setattr(torch, "save", _torch_save_fails)
    monkeypatch.setattr("cmcseg.image_io.shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(WriteFaultError) as info:
        manager.save({"network": {"w": torch.zeros(1)}, "global_step": 2}, "latest")
    assert str(tmp_path) in str(info.value) and "is full" in str(info.value)
    assert not list(tmp_path.glob(".tmp-*"))
    assert load_checkpoint(manager.path("latest"))["global_step"] == 1  # the previous one is intact


def test_a_failed_write_on_a_healthy_disk_is_not_called_a_full_disk(tmp_path: Path):
    with pytest.raises(ValueError, match="bad data"):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("bad data")


def test_full_disk_at_plan_blames_the_folder_not_the_raw_files(tiny_dataset: Path, tmp_path: Path, monkeypatch,
                                                               capsys):
    import blosc2

    def fails(*args, **kwargs):
        raise RuntimeError("Error while creating the NDArray")
    monkeypatch.setattr(blosc2, "asarray", fails)
    monkeypatch.setattr("cmcseg.image_io.shutil.disk_usage", lambda p: type("U", (), {"free": 1024})())
    code = cli_main(["plan", "-d", tiny_dataset.name, "-c", "3d_fullres", "-np", "1", "--raw",
                     str(tiny_dataset.parent), "--preprocessed", str(tmp_path / "pre")])
    err = capsys.readouterr().err
    assert code == 2 and "is full" in err and str(tmp_path / "pre") in err
    assert "repair or remove" not in err


def test_read_only_preprocessed_root_is_a_clear_error(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "pre")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", read_only)
    code = cli_main(["plan", "-d", tiny_dataset.name, "-c", "3d_fullres", "-np", "1", "--raw",
                     str(tiny_dataset.parent), "--preprocessed", str(tmp_path / "pre")])
    err = capsys.readouterr().err
    assert code == 2 and "read-only file system" in err and str(tmp_path / "pre") in err and "Traceback" not in err


# ============================================================================ install: CMC without transformers
def test_cmc_training_and_prediction_work_without_transformers(trained: WorkRoots, tmp_path: Path):
    roots = WorkRoots(trained.raw, trained.preprocessed, tmp_path / "results")
    train_args = ["train", "-d", "MSCMR", "-f", "0", "--labeled", "0.5", "--trainer", "test_trainer:TinyCMCTrainer",
                  "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--device", "cpu", "-np", "0",
                  *root_flags(roots)]
    predict_args = ["predict", "-i", str(trained.raw / DATASET / "imagesTr"), "-o", str(tmp_path / "out"),
                    "-m", str(roots.results / DATASET / RUN), "--device", "cpu", "--no-tta", "-f", "0"]
    script = (
        "import sys; sys.modules['transformers'] = None\n"  # any import of transformers now fails
        "from cmcseg.cli.main import main\n"
        "from cmcseg.errors import CmcsegError\n"
        "from cmcseg.training.registry import get_trainer_class\n"
        f"code = main({train_args!r})\n"
        "assert code == 0, code\n"
        f"code = main({predict_args!r})\n"
        "assert code == 0, code\n"
        "try:\n"
        "    get_trainer_class('any2seg')\n"
        "except CmcsegError as e:\n"
        "    assert 'transformers' in str(e) and 'Fix:' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('Any2Seg imported without transformers')\n"
        "any2seg = ('cmcseg.networks.any2seg', 'cmcseg.networks.mit', 'cmcseg.networks.language_teachers', "
        "'cmcseg.losses.language_distillation', 'cmcseg.training.subset_validation', "
        "'cmcseg.training.any2seg_trainer')\n"
        "assert not any(m in sys.modules for m in any2seg), [m for m in any2seg if m in sys.modules]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "out").glob("*.nii.gz"))


# ============================================================================ SIGKILL, then a rerun
def _kill_after(command: list[str], wait_for, rng: random.Random, timeout: float = 180.0,
                most: float = 1.5) -> bool:
    """Start ``command``, wait until ``wait_for()`` is true, then a seeded random 0-``most`` s more, and SIGKILL it.
    Returns False when the command ended before it could be killed (then the test has nothing to check)."""
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None and not wait_for():
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, most))
        if process.poll() is not None:
            return False
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return True
    finally:
        if process.poll() is None:
            process.kill()


def _no_temporaries_after_rerun(folder: Path) -> None:
    assert not list(folder.rglob(".tmp-*")), list(folder.rglob(".tmp-*"))


@pytest.mark.slow
def test_sigkill_during_plan_then_rerun_finishes_with_every_case(tiny_dataset: Path, tmp_path: Path):
    rng = random.Random(11)
    pre = tmp_path / "pre"
    command = [sys.executable, "-m", "cmcseg", "plan", "-d", tiny_dataset.name, "-c", "3d_fullres", "-np", "1",
               "--raw", str(tiny_dataset.parent), "--preprocessed", str(pre)]
    for _ in range(2):
        _kill_after(command, lambda: (pre / tiny_dataset.name / "plans.json").exists(), rng)
    assert cli_main(command[3:]) == 0
    from cmcseg.preprocessing.storage import list_cases, load_case

    folder = next((pre / tiny_dataset.name).glob("*3d_fullres*"))
    assert sorted(list_cases(folder)) == ["case00", "case01", "case02"]
    for case_id in list_cases(folder):
        data, seg, fov, props = load_case(folder, case_id)
        assert np.isfinite(np.asarray(data[:])).all()
    _no_temporaries_after_rerun(pre)


class SlowSaveTinyCMCTrainer(TinyCMCTrainer):
    """Test-only: a checkpoint save takes a second between writing and renaming, so a kill can land inside it."""

    def save_checkpoint(self, kind: str) -> Path:
        (self.output_folder / "SAVING").touch()
        real_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            time.sleep(1.0)
        torch.save = slow_save
        try:
            return super().save_checkpoint(kind)
        finally:
            torch.save = real_save
            (self.output_folder / "SAVING").unlink(missing_ok=True)


@pytest.mark.slow
def test_sigkill_during_training_and_mid_checkpoint_then_continue_finishes(planned: WorkRoots, tmp_path: Path):
    rng = random.Random(7)
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")
    folder = roots.results / DATASET / "SlowSaveTinyCMCTrainer__3d_fullres__labeled0.5" / "fold_0"
    base = [sys.executable, "-m", "cmcseg", "train", "-d", "MSCMR", "-f", "0", "--labeled", "0.5", "--trainer",
            "test_faults:SlowSaveTinyCMCTrainer", "--epochs", "3", "--iters-per-epoch", "3", "--val-iters", "1",
            "--device", "cpu", "-np", "0", *root_flags(roots)]
    assert _kill_after(base, lambda: (folder / "SAVING").exists(), rng, most=0.5)  # inside the 1 s save
    assert list(folder.glob(".tmp-checkpoint_*")), "the kill did not land inside a checkpoint save"
    for path in folder.glob("checkpoint_*.pt"):
        load_checkpoint(path)  # whatever was there is whole
    _kill_after([*base, "--continue"], lambda: (folder / "checkpoint_latest.pt").exists(), rng)
    assert cli_main([*base[3:], "--continue"]) == 0
    for path in folder.glob("checkpoint_*.pt"):
        load_checkpoint(path)
    assert load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == 3
    assert (folder / "validation" / "summary.json").is_file()
    _no_temporaries_after_rerun(folder)


@pytest.mark.slow
def test_sigkill_during_predict_then_continue_writes_every_case(trained: WorkRoots, tmp_path: Path):
    rng = random.Random(3)
    out = tmp_path / "out"
    inputs = trained.raw / DATASET / "imagesTr"
    command = [sys.executable, "-m", "cmcseg", "predict", "-i", str(inputs), "-o", str(out), "-m",
               str(model_folder(trained)), "--device", "cpu", "--no-tta", "-np", "0"]
    _kill_after(command, lambda: out.is_dir() and any(out.glob("*.nii.gz")), rng)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert cli_main([*command[3:], "--continue"]) == 0
    cases = sorted({p.name.rsplit("_", 1)[0] for p in inputs.glob("*.nii.gz")})
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # finished cases kept

    for path in out.glob("*.nii.gz"):
        sitk.ReadImage(str(path))  # none truncated
    _no_temporaries_after_rerun(out)


def test_unsafe_errors_are_cmcseg_errors():
    assert issubclass(UnsafeFileError, CmcsegError) and issubclass(UnsafeNameError, CmcsegError)
    assert issubclass(WriteFaultError, CmcsegError)


# ============================================================================ 7-8: inputs and arguments
TINY_DATASET = "Dataset900_Tiny"


class StopAfterFoldTrainer(CMCTrainer):
    """Test-only: stops with a CmcsegError once the fold's cases are chosen (before any network is built), so a
    test sees what `cmcseg train` logs about --labeled in a fraction of a second."""

    def build_network(self):
        raise CmcsegError("stopped by the test after choosing the fold's cases")


def make_roots(tmp_path: Path) -> WorkRoots:
    return WorkRoots(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")


def raw_dataset(roots: WorkRoots, n_cases: int = 3) -> Path:
    return write_tiny_dataset(roots.raw / TINY_DATASET, n_cases=n_cases)


def plan(roots: WorkRoots, *extra: str) -> int:
    return cli_main(["plan", "-d", "Tiny", "-np", "1", *extra, *root_flags(roots)])


def assert_nothing_planned(roots: WorkRoots) -> None:
    assert not (roots.preprocessed / TINY_DATASET).exists(), "a refused plan wrote into the preprocessed root"


# ------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("verify_only", [False, True], ids=["plan", "verify-only"])
def test_4d_image_is_reported_as_an_error_not_a_reshape_crash(tmp_path, capsys, verify_only):
    roots = make_roots(tmp_path)
    folder = raw_dataset(roots)
    four_d = image_file(folder, "case01", 1)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.float32), np.eye(4)), str(four_d))

    code = plan(roots, *(["--verify-only"] if verify_only else []))

    err = capsys.readouterr().err
    assert code == 2
    assert "case01_0001.nii.gz" in err and "4D image of size (2, 2, 2, 2)" in err
    assert "one 3D file per channel" in err and "CASE_0000.nii.gz, CASE_0001.nii.gz" in err
    assert "reshape" not in err and "Traceback" not in err
    assert "lies on no modality's grid" not in err  # no knock-on row for the label of that case
    assert_nothing_planned(roots)


def test_modality_that_does_not_overlap_the_reference_is_an_error_unless_accepted(tmp_path, capsys):
    roots = make_roots(tmp_path)
    folder = raw_dataset(roots)
    moved = image_file(folder, "case01", 1)
    img = sitk.ReadImage(str(moved))
    img.SetOrigin((1000.0, 1000.0, 1000.0))  # 1.7 m away: a header error, no voxel in common with T1
    sitk.WriteImage(img, str(moved))

    assert plan(roots) == 2
    err = capsys.readouterr().err
    assert "case01_0001.nii.gz" in err and "T2 does not overlap T1 at all" in err and "1732.1 mm" in err
    assert "header error" in err and "--accept-no-overlap" in err
    assert_nothing_planned(roots)

    assert plan(roots, "-c", "3d_fullres", "--accept-no-overlap") == 0
    out = capsys.readouterr().out
    assert "warning" in out and "does not overlap" in out and "accepted with --accept-no-overlap" in out
    assert (roots.preprocessed / TINY_DATASET / "plans.json").is_file()


def test_plan_help_documents_accept_no_overlap(capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", "--help"])
    assert "--accept-no-overlap" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("flag, value, words", [
    ("--epochs", "0", ["--epochs", "0 is less than 1", "--epochs 100"]),
    ("--iters-per-epoch", "0", ["--iters-per-epoch", "0 is less than 1", "--iters-per-epoch 250"]),
    ("--val-iters", "-1", ["--val-iters", "-1 is less than 0"]),
    ("-np", "-1", ["--num-processes", "-1 is less than 0"]),
    ("--labeled", "0", ["--labeled", "not in (0, 1]", "--labeled 0.2"]),
    ("--labeled", "1.5", ["--labeled", "not in (0, 1]"]),
    ("--labeled", "nan", ["--labeled", "not in (0, 1]"]),
    ("--labeled", "half", ["--labeled", "'half' is not a number"]),
    ("--epochs", "ten", ["--epochs", "'ten' is not a whole number"]),
])
def test_train_refuses_unusable_numbers_at_parsing(tmp_path, capsys, flag, value, words):
    roots = make_roots(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "-d", "Tiny", "-f", "0", "--device", "cpu", flag, value, *root_flags(roots)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    for word in words:
        assert word in err, (word, err)
    assert not tmp_path.joinpath("results").exists() and not list(tmp_path.iterdir())


def test_plan_refuses_zero_worker_processes_at_parsing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", "-d", "Tiny", "-np", "0", *root_flags(make_roots(tmp_path))])
    assert exit_info.value.code == 2 and "0 is less than 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def planned_six(tmp_path_factory) -> WorkRoots:
    """Six labeled cases, planned (3d_fullres): 5 folds, fold 0 trains on 4 labeled cases."""
    roots = make_roots(tmp_path_factory.mktemp("faults_planned"))
    raw_dataset(roots, n_cases=6)
    assert plan(roots, "-c", "3d_fullres") == 0
    return roots


def test_tiny_labeled_fraction_says_how_many_cases_stay_labeled(planned_six, tmp_path, caplog):
    roots = WorkRoots(planned_six.raw, planned_six.preprocessed, tmp_path / "results")
    caplog.set_level("INFO")
    code = cli_main(["train", "-d", "Tiny", "-f", "0", "--labeled", "1e-9", "--device", "cpu", "-np", "0",
                 "--trainer", "test_faults:StopAfterFoldTrainer", *root_flags(roots)])
    assert code == 2  # the test trainer stops before building a network
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("--labeled 1e-09 keeps 1 of 4 training cases of fold 0 labeled") for m in info), info
    assert any("rounds to 0" in m and "1 labeled case" in m and "--labeled 0.25" in m for m in warnings), warnings
    log_txt = next(roots.results.rglob("log.txt")).read_text()
    assert "--labeled 1e-09 keeps 1 of 4 training cases of fold 0 labeled" in log_txt and "rounds to 0" in log_txt
    assert not list(roots.results.rglob("checkpoint*.pt"))


def test_verify_only_on_an_empty_imagesTr_is_an_error(tmp_path, capsys):
    roots = make_roots(tmp_path)
    folder = raw_dataset(roots)
    for sub in ("imagesTr", "labelsTr"):
        for f in (folder / sub).iterdir():
            f.unlink()

    code = plan(roots, "--verify-only")

    err = capsys.readouterr().err
    assert code == 2
    assert "no problems found" not in err
    assert f"{folder / 'imagesTr'}" in err and "imagesTr holds no training cases" in err
    assert "CASE_XXXX.nii.gz" in err
    assert_nothing_planned(roots)


def test_train_on_a_raw_dataset_never_planned_says_run_plan(tmp_path, capsys):
    roots = make_roots(tmp_path)
    raw_dataset(roots)

    code = cli_main(["train", "-d", "Tiny", "-f", "0", "--device", "cpu", *root_flags(roots)])

    err = capsys.readouterr().err
    assert code == 2
    assert "never planned" in err and "Fix: run `cmcseg plan -d Tiny`" in err
    assert "cmcseg synth" not in err
    assert not roots.results.exists() and not roots.preprocessed.exists()


def test_unreadable_channel_is_reported_once_without_a_false_label_row(tmp_path, capsys):
    roots = make_roots(tmp_path)
    folder = raw_dataset(roots)
    corrupt = image_file(folder, "case01", 1)
    corrupt.write_bytes(corrupt.read_bytes()[:100])

    code = plan(roots, "--verify-only")

    err = capsys.readouterr().err
    assert code == 2
    assert "case01_0001.nii.gz" in err and "unreadable or corrupt file" in err
    assert "lies on no modality's grid" not in err
    assert "1 problem(s) found" in err


def test_symlink_loop_is_reported_as_a_loop_not_a_missing_file(tmp_path, capsys):
    roots = make_roots(tmp_path)
    folder = raw_dataset(roots)
    link = image_file(folder, "case01", 1)
    link.unlink()
    os.symlink(link.name, link)  # imagesTr/case01_0001.nii.gz -> itself
    dangling = image_file(folder, "case02", 1)
    dangling.unlink()
    os.symlink(tmp_path / "gone.nii.gz", dangling)

    code = plan(roots, "--verify-only")

    err = capsys.readouterr().err
    assert code == 2
    assert f"{link}" in err and "symbolic link loop" in err and "ln -sfn" in err
    assert f"{dangling}" in err and "broken symbolic link" in err and "gone.nii.gz" in err
    assert "file does not exist" not in err
    assert "lies on no modality's grid" not in err
    assert_nothing_planned(roots)


def test_label_that_is_a_broken_link_is_an_error_not_an_unlabeled_case(tmp_path, capsys):
    roots = make_roots(tmp_path)
    folder = raw_dataset(roots)
    label = folder / "labelsTr" / "case01.nii.gz"
    label.unlink()
    os.symlink(label.name, label)  # a loop
    assert plan(roots, "--verify-only") == 2
    err = capsys.readouterr().err
    assert "symbolic link that leads to no file" in err and str(label) in err
