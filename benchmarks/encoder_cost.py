"""Encoder cost: parameters, seconds per training iteration and peak memory of each registered encoder in the CMC
network, against nnU-Net's networks, at one plan's patch, in one run.

Data and plan: an MSCMR phantom (``cmcseg synth``), planned by ``cmcseg plan --patch-multiple-of 32``, so that one
patch suits every encoder (residual/plain: the plan's strides; universal: 8; sammed3d: 16; swinunetr: 32). Arms,
each in a process of its own with ``--threads`` torch threads:

* ``residual`` (the default), ``universal``, ``sammed3d`` (ViT-B; ``rel_pos_mode=decomposed`` when the patch is not a
  cube), ``swinunetr`` (feature size 48): the CMC network over all modalities (``cmc``'s default) with that encoder,
  random weights (the cost does not depend on them);
* ``nnunet-resenc``: nnU-Net's ``ResidualEncoderUNet`` of the same plan (``get_network_from_plans``), the image
  channels as input;
* ``nnunet-plain``: nnU-Net's ``PlainConvUNet`` with the same stages.

Every arm runs the same step on the plan's batch of random data: forward, cross-entropy at every output (deep
supervision where the network has it), backward, SGD. This measures the networks, not the objectives.

Usage: python benchmarks/encoder_cost.py [--iters 2] [--warmup 1] [--threads 1] [--arms residual,universal,...]
Writes benchmarks/out/encoder_cost.json and prints one table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nnunet_driver as nd  # noqa: E402
from measure import loadavg  # noqa: E402

ARMS = ("residual", "universal", "sammed3d", "swinunetr", "nnunet-resenc", "nnunet-plain")


def _network(arm: str, plans: dict, config: dict):
    from torch import nn

    from cmcseg.networks import build_cmc_network
    from cmcseg.networks.encoders import plan_network
    from cmcseg.plans.plans import plan_channels_per_modality, plan_num_classes

    channels, classes = sum(plan_channels_per_modality(plans)), plan_num_classes(plans)
    if arm.startswith("nnunet"):
        net: nn.Module = plan_network(config, channels, classes, topology="plain" if arm == "nnunet-plain" else None)
        return net, channels
    options: dict = {}
    if arm == "sammed3d" and len(set(config["patch_size"])) > 1:
        options["rel_pos_mode"] = "decomposed"
    net = build_cmc_network(plans, "3d_fullres", encoder=arm, single_branch=True, encoder_options=options)
    return net, channels + len(plan_channels_per_modality(plans))


def worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from cmcseg.plans.plans import load_plans, plan_configuration, plan_num_classes

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    plans = load_plans(Path(spec["plans"]))
    config = plan_configuration(plans, "3d_fullres")
    network, in_channels = _network(spec["arm"], plans, config)
    parameters = sum(p.numel() for p in network.parameters())
    batch, patch = int(config["batch_size"]), [int(p) for p in config["patch_size"]]
    x = torch.randn(batch, in_channels, *patch)
    if not spec["arm"].startswith("nnunet"):
        x[:, in_channels - len(plans["channels_per_modality"]):] = 1.0  # every FOV mask full
    target = torch.randint(0, plan_num_classes(plans), (batch, *patch))
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = network(x)
        outputs = out.logits[0] if hasattr(out, "logits") else out
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = sum(F.cross_entropy(o, F.interpolate(target[:, None].float(), size=o.shape[2:],
                                                        mode="nearest")[:, 0].long()) for o in outputs)
        loss.backward()
        optimizer.step()

    for _ in range(spec["warmup"]):
        step()
    start = time.perf_counter()
    for _ in range(spec["iters"]):
        step()
    return {"parameters": parameters, "s_per_it": (time.perf_counter() - start) / spec["iters"], "patch": patch,
            "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    nd.add_worker_arguments(ap, list(ARMS))
    args = ap.parse_args()
    if args.worker:
        nd.serve_worker(args.spec, args.result, worker)
        return
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                             if k not in ("worker", "spec", "result")}, "load_start": loadavg(), "arms": {}}
    with tempfile.TemporaryDirectory(prefix="encoder_cost_") as tmp:
        work = Path(tmp)
        flags = ["--raw", str(work / "raw"), "--preprocessed", str(work / "pre"), "--results", str(work / "res")]
        for command in (["synth", "-d", "MSCMR", "--size", "small"],
                        ["plan", "-d", "MSCMR", "-c", "3d_fullres", "--patch-multiple-of", "32", "--memory-gb",
                         str(args.memory_gb), "-np", "1"]):
            subprocess_run([str(nd.BIN / "cmcseg"), *command, *flags])
        plans_file = next((work / "pre").glob("Dataset*/plans.json"))
        env = nd.nnunet_env(work, data_workers=0, threads=args.threads)
        for arm in [a for a in args.arms.split(",") if a]:
            arm_work = work / arm
            arm_work.mkdir()
            spec = {"arm": arm, "plans": str(plans_file), "threads": args.threads, "iters": args.iters,
                    "warmup": args.warmup}
            r = nd.run_worker(Path(__file__).resolve(), arm, spec, arm_work, env)
            report["arms"][arm] = r
            print(f"{arm}: {r['parameters'] / 1e6:.1f}M parameters, {r['s_per_it']:.2f} s/it, peak RSS "
                  f"{r.get('peak_main_rss_gb', float('nan')):.2f} GB (patch {r['patch']}, batch {r['batch']})",
                  flush=True)
    report["load_end"] = loadavg()
    base = report["arms"].get("nnunet-plain") or next(iter(report["arms"].values()))
    print(f"\n{'arm':<16}{'params':>10}{'s/it':>9}{'x nnU-Net plain':>17}{'peak GB':>9}")
    for arm, r in report["arms"].items():
        print(f"{arm:<16}{r['parameters'] / 1e6:>9.1f}M{r['s_per_it']:>9.2f}{r['s_per_it'] / base['s_per_it']:>17.2f}"
              f"{r.get('peak_main_rss_gb', float('nan')):>9.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_cost.json").write_text(json.dumps(report, indent=2))


def subprocess_run(command: list[str]) -> None:
    import subprocess

    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}")


if __name__ == "__main__":
    main()
