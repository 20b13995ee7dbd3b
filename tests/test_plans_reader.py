"""plans/plans.py: the one reader of plans.json, built on nnU-Net's PlansManager and ConfigurationManager."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from cmcseg.errors import CmcsegError
from cmcseg.plans.plans import Configuration, Plans, plan_configuration

ARCH = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _plans() -> dict:
    return {"labels": {"background": 0, "a": 1}, "channels_per_modality": {"1": 3, "0": 1},
            "configurations": {
                "3d_fullres": {"patch_size": [8, 16, 16], "batch_size": 2, "spacing": [2.0, 1.0, 1.0],
                               "architecture": copy.deepcopy(ARCH),
                               "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                               "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                                      "force_separate_z": None}},
                "3d_big": {"inherits_from": "3d_fullres", "batch_size": 4},
                "3d_bigger": {"inherits_from": "3d_big", "patch_size": [16, 32, 32]},
                "loop_a": {"inherits_from": "loop_b"}, "loop_b": {"inherits_from": "loop_a"},
                "orphan": {"inherits_from": "nowhere"}}}


def test_inheritance_resolves_as_nnunets_plans_manager() -> None:
    plans = _plans()
    ours = plan_configuration(plans, "3d_bigger")
    theirs = PlansManager(copy.deepcopy(plans)).get_configuration("3d_bigger").configuration
    assert {k: v for k, v in theirs.items() if k != "inherits_from"} == dict(ours)
    assert ours["batch_size"] == ours.batch_size == 4 and ours.patch_size == [16, 32, 32]
    assert ours.spacing == [2.0, 1.0, 1.0] and "inherits_from" not in ours
    assert plans == _plans(), "resolving a configuration must not change the plans"


@pytest.mark.parametrize("name, problem", [("loop_a", "circular"), ("orphan", "unknown"), ("absent", "choose one")])
def test_unknown_and_circular_configurations_are_clear_errors(name: str, problem: str) -> None:
    with pytest.raises(CmcsegError, match=problem):
        plan_configuration(_plans(), name)


def test_a_configuration_without_a_network_is_a_clear_error() -> None:
    plans = _plans()
    del plans["configurations"]["3d_fullres"]["architecture"]
    with pytest.raises(CmcsegError, match="no 'architecture'.*rerun `cmcseg plan`"):
        plan_configuration(plans, "3d_fullres")


def test_nnunets_accessors_work_on_the_resolved_configuration() -> None:
    """The resolved configuration is the dict the stages index and nnU-Net's ConfigurationManager at once: its
    probability resampling is nnU-Net's function with the plan's arguments."""
    config = plan_configuration(_plans(), "3d_fullres")
    probabilities = np.random.default_rng(0).random((2, 4, 8, 8)).astype(np.float32)
    out = config.resampling_fn_probabilities(probabilities, [8, 16, 16], [2.0, 1.0, 1.0], [1.0, 0.5, 0.5])
    assert out.shape == (2, 8, 16, 16)
    name, kwargs = config.network_architecture()
    assert name.endswith("PlainConvUNet") and kwargs["conv_op"].__name__ == "Conv3d" and kwargs["dropout_op"] is None


@pytest.mark.parametrize("key, value", [("nonlin", "subprocess.call"), ("nonlin", "torch.nn.functional.torch.load"),
                                        ("network_class_name", "os.system"), ("conv_op", "torch.nn.functional.relu")])
def test_a_plans_file_cannot_make_cmcseg_import_or_call_anything(tmp_path: Path, key: str, value: str) -> None:
    """A model folder's plans.json is data: a class path outside torch.nn / dynamic_network_architectures, or one
    that is not a torch.nn.Module class, is refused before the network is built (nnU-Net would call it with the
    plan's keyword arguments)."""
    from cmcseg.networks.encoders import plan_network

    plans = _plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    marker = tmp_path / "ran"
    if key == "network_class_name":
        arch[key] = value
    else:
        arch["arch_kwargs"][key] = value
        arch["arch_kwargs"][f"{key}_kwargs"] = {"args": f"touch {marker}", "shell": True}
    with pytest.raises(CmcsegError, match=f"{key}=.*not a torch.nn.Module class"):
        plan_network(plan_configuration(plans, "3d_fullres"), in_channels=1)
    assert not marker.exists()


def test_plans_know_the_modalities_and_labels() -> None:
    plans = Plans(_plans())
    assert plans.channels_per_modality == [1, 3]
    assert plans.label_manager.num_segmentation_heads == 2
    assert isinstance(plans.get_configuration("3d_big"), Configuration)
