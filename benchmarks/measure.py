"""Measuring a command the way a user experiences it: wall time and peak memory of its whole process tree.

Linux only (reads /proc). Both cmcseg and nnU-Net start worker processes, so the peak of the
tree's summed memory is the fair figure. Two sums are kept: RSS, which counts a page shared by
forked workers once per process (an upper bound), and PSS, which splits a shared page among the
processes that map it (what the tree really holds). The peak RSS of the main process alone is
reported too. Every figure is in GB of 2**30 bytes, the unit of the planner's memory estimate.
"""
from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 2 ** 30  # the planner's GB (cmcseg.plans.memory.GB)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the system has none): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


@dataclass
class Measurement:
    command: str
    wall_s: float
    peak_tree_rss_gb: float
    peak_main_rss_gb: float
    peak_tree_pss_gb: float
    returncode: int
    output_tail: str

    def ratio_to(self, other: Measurement) -> dict:
        return {"wall": self.wall_s / other.wall_s, "peak_tree_rss": self.peak_tree_rss_gb / other.peak_tree_rss_gb}


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
        return 0


def _pss_bytes(pid: int) -> int:
    """Proportional set size: the process's private pages plus its share of the pages it shares."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def run_measured(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 interval: float = 0.05, pss_interval: float = 1.0) -> Measurement:
    """Run ``cmd`` to completion, sampling the RSS of its process tree every ``interval`` seconds and its PSS every
    ``pss_interval`` seconds.

    PSS costs the kernel a walk of every page table: read every 0.05 s, it took 15-25 % of a core beside a 3 GB
    trainer. So it is read at most every ``pss_interval`` seconds, and only while the RSS sum exceeds the PSS peak
    so far (PSS never exceeds the RSS sum, so the skipped samples could not raise it). A PSS peak shorter than
    ``pss_interval`` can be missed; the RSS figures keep the full rate."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=dict(env) if env else None, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"tree": 0, "main": 0, "pss": 0}
    done = threading.Event()

    def poll() -> None:
        last_pss = -math.inf
        while not done.is_set():
            pids = _tree(proc.pid)
            rss = sum(_rss_bytes(p) for p in pids)
            peak["tree"] = max(peak["tree"], rss)
            peak["main"] = max(peak["main"], _rss_bytes(proc.pid))
            now = time.perf_counter()
            if rss > peak["pss"] and now - last_pss >= pss_interval:
                peak["pss"] = max(peak["pss"], sum(_pss_bytes(p) for p in pids))
                last_pss = now
            time.sleep(interval)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    return Measurement(" ".join(cmd), wall, peak["tree"] / GB, peak["main"] / GB, peak["pss"] / GB, proc.returncode,
                       out[-3000:])
