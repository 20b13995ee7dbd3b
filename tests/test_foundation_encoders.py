"""`cmcseg train --encoder universal|sammed3d --encoder-weights FILE` on a phantom, with a checkpoint in each
model's published layout, then `cmcseg predict` without the weights file (the checkpoint rebuilds the network)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_sammed3d_encoder import TINY, write_published
from test_universal_encoder import write_published_unet

from cmcseg.checkpoint import load_checkpoint
from cmcseg.cli.main import main as cli_main
from cmcseg.paths import WorkRoots
from cmcseg.training.cmc_trainer import CMCTrainer
from cmcseg.training.trainer import TrainingRequest

DATASET = "Dataset501_MSCMR"


class CubeTrainer(CMCTrainer):
    """CMC on a 32^3 patch (divisible by 8 and 16, and cubic as SAM-Med3D's published attention needs)."""

    num_workers = 0

    def configure_plans(self, plans: dict) -> dict:
        plans = copy.deepcopy(plans)
        plans["configurations"][self.configuration]["patch_size"] = [32, 32, 32]
        return plans


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["universal", "sammed3d"])
def test_a_foundation_encoder_trains_from_its_published_checkpoint_and_predicts(planned: WorkRoots, tmp_path: Path,
                                                                                encoder: str) -> None:
    weights = tmp_path / f"{encoder}.pth"
    if encoder == "universal":
        published, options = write_published_unet(weights), {}
        first = "down_tr64.ops.0.conv1.weight"
    else:
        published, options = write_published(weights), {k: v for k, v in TINY.items()}
        first = "patch_embed.proj.weight"
    roots = WorkRoots(planned.raw, planned.preprocessed, tmp_path / "results")
    trainer = CubeTrainer(TrainingRequest("MSCMR", 0, 0.5, roots=roots, device="cpu", num_epochs=1,
                                          iterations_per_epoch=1, val_iterations=0, num_workers=0, encoder=encoder,
                                          encoder_weights=weights, encoder_options=options))
    trainer.initialize()
    loaded = trainer.network.encoders[0].state_dict()
    key = next(k for k in loaded if k.endswith(first))
    image_channels = trainer.network.encoders[0].image_channels
    expected = published[first] / image_channels  # one published channel shared among the image channels
    assert torch.allclose(loaded[key][:, :image_channels], expected.expand_as(loaded[key][:, :image_channels]))
    assert torch.all(loaded[key][:, image_channels:] == 0), "FOV channels start at zero"
    folder = trainer.run()
    init = load_checkpoint(folder / "checkpoint_final.pt")["init"]
    assert init["encoder"] == encoder and init["encoder_weights_source"]["file"] == weights.name
    weights.unlink()  # prediction needs the checkpoint only

    images = tmp_path / "in"
    images.mkdir()
    case = sorted((planned.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    for path in (planned.raw / DATASET / "imagesTr").glob(f"{case}_*.nii.gz"):
        (images / path.name).write_bytes(path.read_bytes())
    assert cli_main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(folder.parent),
                     "--no-tta", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / f"{case}.nii.gz").is_file()
