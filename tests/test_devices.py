"""--device: one rule for training and prediction; the CPU allocator's retention."""
from __future__ import annotations

import platform
import subprocess
import sys

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
