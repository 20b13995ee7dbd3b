"""--device: one rule for training and prediction; the CPU allocator's retention."""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import pytest
import torch

from cmcseg import devices
from cmcseg.cli.predict_cmd import add_parser
from cmcseg.devices import PRECISIONS, autocast_context, cpu_computes_bfloat16, resolve_device, resolve_precision
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


#: the start of each allocator script below: its imports and the process's resident MB
RSS_MB = """
import os
import sys
import numpy as np
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
"""


def released_mb(script: str, modes: tuple[str, str]) -> dict[str, float]:
    """What ``script`` prints (the resident MB it gave back) in a fresh interpreter, for each mode."""
    return {mode: float(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout)
            for mode in modes}


#: frees 24 blocks of 8 MB below a live 1 MB block at the top of the heap, then prints how many resident MB that
#: gave back. Under glibc's default the first 8 MB block is mapped and freed, which raises the threshold above 8 MB,
#: so the next 24 come from the heap and stay resident when freed (the 1 MB block keeps the heap from shrinking).
#: With ``bound_cpu_allocator_retention(4 MB)`` every 8 MB block is mapped and goes back to the system when freed.
RETENTION_SCRIPT = RSS_MB + """
from cmcseg.devices import bound_cpu_allocator_retention
if sys.argv[1] == "bound":
    assert bound_cpu_allocator_retention(4 * 2 ** 20)
first = np.ones(2 ** 20); del first
blocks = [np.ones(2 ** 20) for _ in range(24)]
pin = np.ones(2 ** 17)  # 1 MB, from the top of the heap
before = rss_mb()
del blocks
print(before - rss_mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_bounded_retention_gives_freed_blocks_back_to_the_system() -> None:
    released = released_mb(RETENTION_SCRIPT, ("default", "bound"))
    assert released["bound"] > 150, released  # 192 MB were freed
    assert released["default"] < 50, released  # the case the bound exists for: glibc kept them


#: allocates a 64 MB block (above glibc's largest mmap threshold, 32 MB), frees it, and prints how many resident MB
#: that gave back to the system. Under glibc's default the block had a mapping of its own, unmapped when freed, so
#: the next one is mapped and faulted in afresh; with ``reuse_cpu_allocations`` it stays for the next allocation.
REUSE_SCRIPT = RSS_MB + """
from cmcseg.devices import reuse_cpu_allocations
if sys.argv[1] == "reuse":
    assert reuse_cpu_allocations()
block = np.ones(2 ** 23)
before = rss_mb()
del block
print(before - rss_mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_reused_allocations_stay_with_the_process_for_the_next_block() -> None:
    released = released_mb(REUSE_SCRIPT, ("default", "reuse"))
    assert released["default"] > 60, released  # glibc unmapped the 64 MB block
    assert released["reuse"] < 4, released


# ------------------------------------------------------------------------------------------------ precision
def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_cpu_bfloat16_needs_the_native_instructions(tmp_path) -> None:
    """AVX512 alone (oneDNN emulates bfloat16 there) is not enough; AVX512-BF16 or AMX is, where oneDNN has it."""
    check = cpu_computes_bfloat16.__wrapped__
    assert not check(_cpuinfo(tmp_path, "avx512f avx512bw avx512vl"))
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert check(_cpuinfo(tmp_path, "avx512f avx512_bf16")) == native
    assert check(_cpuinfo(tmp_path, "amx_tile amx_bf16")) == native
    assert not check(tmp_path / "no_such_cpuinfo")  # not Linux: no gain assumed


def test_auto_precision_follows_the_device_and_the_cpu(monkeypatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(devices, "cpu_computes_bfloat16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32
    monkeypatch.setattr(devices, "cpu_computes_bfloat16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    assert resolve_precision("auto", gpu) == torch.float16  # as nnU-Net predicts
    assert resolve_precision("float32", gpu) == torch.float32
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(CmcsegError, match="float16 is for GPUs.*--precision bfloat16 or float32"):
        resolve_precision("float16", cpu)
    with pytest.raises(CmcsegError, match="unknown precision 'half'.*--precision auto"):
        resolve_precision("half", cpu)


def test_autocast_context_computes_in_the_dtype() -> None:
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 8, 8)
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), torch.float32):
        assert conv(x).dtype == torch.float32


def test_cli_precision_choices_are_the_library_ones() -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    action = next(a for a in parser._actions if a.dest == "precision")
    assert tuple(action.choices) == PRECISIONS and action.default == "auto"
