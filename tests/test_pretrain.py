"""`cmcseg pretrain`: masked image modelling on every image of a planned dataset, and its encoder weights loaded by
`cmcseg train --encoder-weights` (tiny phantom, tiny network)."""
from __future__ import annotations

import copy

import pytest
import torch

from cmcseg.cli.main import main as cli_main
from cmcseg.losses.reconstruction import masked_reconstruction_loss
from cmcseg.paths import WorkRoots
from cmcseg.training.cmc_trainer import CMCTrainer
from cmcseg.training.pretrain_trainer import ENCODER_WEIGHTS_FILE, PretrainTrainer
from cmcseg.training.trainer import TrainingRequest


def _tiny(plans: dict, configuration: str) -> dict:
    plans = copy.deepcopy(plans)
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [4, 8, 8, 8, 8, 8, 8][:arch["n_stages"]]
    arch["n_blocks_per_stage"] = [1] * arch["n_stages"]
    config["patch_size"] = [8, 24, 24]
    return plans


class TinyPretrainTrainer(PretrainTrainer):
    num_workers = 0

    def configure_plans(self, plans: dict) -> dict:
        return _tiny(plans, self.configuration)


class TinyCMC(CMCTrainer):
    num_workers = 0

    def configure_plans(self, plans: dict) -> dict:
        return _tiny(plans, self.configuration)


def test_the_reconstruction_loss_counts_only_voxels_in_view() -> None:
    target = torch.zeros(1, 2, 4, 4)
    reconstruction = target.clone()
    reconstruction[:, 1] = 5.0  # wrong everywhere on channel 1 ...
    fov = torch.ones_like(target)
    fov[:, 1] = 0  # ... which is out of view
    assert float(masked_reconstruction_loss(reconstruction, target, fov)) == 0.0
    fov[:, 1, :2] = 1  # 8 of 24 voxels in view are wrong by 5
    assert float(masked_reconstruction_loss(reconstruction, target, fov)) == pytest.approx(5 * 8 / 24)


@pytest.mark.slow
def test_pretraining_uses_every_case_and_its_encoder_weights_load_for_training(planned: WorkRoots, tmp_path) -> None:
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")
    request = TrainingRequest("MSCMR", 0, 1.0, roots=roots, device="cpu", num_epochs=2, iterations_per_epoch=2,
                              val_iterations=0, num_workers=0)
    pretrainer = TinyPretrainTrainer(request)
    folder = pretrainer.run()
    folds = pretrainer.splits["folds"]
    every = {c for f in folds for c in f["train"] + f["val"]} | {c for f in folds for c in f.get("unlabeled", [])}
    assert set(pretrainer.cases.labeled) | set(pretrainer.cases.unlabeled) == every
    assert pretrainer.cases.validation == []
    assert folder.name == "all" and (folder / "progress.png").is_file() and (folder / "checkpoint_final.pt").is_file()
    history = pretrainer.history.state_dict()
    assert len(history["epochs"]) == 2
    weights = folder / ENCODER_WEIGHTS_FILE
    saved = torch.load(weights, weights_only=True)
    assert saved["cmcseg_pretrain"]["iterations"] == 4

    trainer = TinyCMC(TrainingRequest("MSCMR", 0, 0.5, roots=roots, device="cpu", num_epochs=1,
                                      iterations_per_epoch=1, val_iterations=0, num_workers=0, encoder_weights=weights))
    trainer.initialize()
    try:
        loaded = trainer.network.encoders[0].state_dict()
        assert loaded.keys() == saved["state_dict"].keys()
        assert all(torch.equal(loaded[k], saved["state_dict"][k]) for k in loaded), "the pretrained encoder is used"
        assert trainer.network_options()["encoder_weights_source"]["file"] == ENCODER_WEIGHTS_FILE
    finally:
        trainer.close()


def test_pretrain_command_refuses_a_bad_iteration_count(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pretrain", "-d", "MSCMR", "--iterations", "0"])
    assert exit_info.value.code == 2
    assert "--iterations" in capsys.readouterr().err
