"""--device: one rule for training and prediction."""
from __future__ import annotations

import pytest
import torch

from cmcseg.devices import resolve_device
from cmcseg.errors import CmcsegError


def test_cpu_and_auto_without_a_gpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_device_names_the_fix() -> None:
    with pytest.raises(CmcsegError, match="unknown device 'tpu'.*--device auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
def test_cuda_without_a_gpu_says_so() -> None:
    with pytest.raises(CmcsegError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda", local_rank=0)
