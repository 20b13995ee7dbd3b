"""One table from the JSON files that benchmarks/gpu_suite.sh wrote: cmcseg against nnU-Net, with ratios.

Usage: python benchmarks/gpu_suite_table.py OUT_FOLDER [--device cuda]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}" if ours and theirs else "-"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(folder: Path, device: str) -> list[tuple[str, str, str, str, str]]:
    """(measure, cmcseg, nnU-Net, ratio, unit) rows, in the order of the suite."""
    out = []
    for path in sorted(folder.glob(f"train_step_vs_nnunet_{device}_bf16_compile_*.json")):
        compile_ = path.stem.rsplit("_", 1)[-1]
        d = json.loads(path.read_text())["devices"][device]
        o, n = d["ours"], d["nnunet"]
        label = f"train step, bf16, compile {compile_} (CMC M={o['branches']}, batch {o['batch']})"
        out.append((label, _num(o["s_per_it"]), _num(n["s_per_it"]), _ratio(o["s_per_it"], n["s_per_it"]), "s/it"))
        if o.get("peak_gpu_gb"):
            out.append(("  peak GPU memory", _num(o["peak_gpu_gb"], 2), _num(n.get("peak_gpu_gb"), 2),
                        _ratio(o["peak_gpu_gb"], n.get("peak_gpu_gb")), "GB"))
    predict = folder / f"predict_vs_nnunet_{device}.json"
    if predict.is_file():
        for r in json.loads(predict.read_text())["runs"]:
            label = f"predict, TTA {'on' if r['tta'] else 'off'}, cmcseg {r['cmcseg_network']} network"
            out.append((label, _num(r["cmcseg"]["s_per_case"], 2), _num(r["nnunet"]["s_per_case"], 2),
                        _ratio(r["cmcseg"]["s_per_case"], r["nnunet"]["s_per_case"]), "s/case"))
    plan = folder / "plan_vs_nnunet.json"
    if plan.is_file():
        for r in json.loads(plan.read_text()):
            ours, theirs = r["cases"] / r["cmcseg"]["wall_s"], r["cases"] / r["nnunet"]["wall_s"]
            out.append((f"plan + preprocess, {r['dataset']} ({r['cases']} cases, both configurations)",
                        _num(ours), _num(theirs), _ratio(ours, theirs), "cases/s"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    table = rows(args.folder, args.device)
    if not table:
        raise SystemExit(f"no gpu_suite results for device {args.device} in {args.folder}")
    width = max(len(r[0]) for r in table)
    print(f"{'':<{width}}  {'cmcseg':>9}  {'nnU-Net':>9}  {'ratio':>6}  unit")
    for label, ours, theirs, ratio, unit in table:
        print(f"{label:<{width}}  {ours:>9}  {theirs:>9}  {ratio:>6}  {unit}")


if __name__ == "__main__":
    main()
