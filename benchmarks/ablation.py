"""The demo model's accuracy on held-out phantoms, and the paper's ablation (Table 3 in spirit).

Evaluates trained checkpoints on a labelled dataset: no tokens / window tokens /
window + volume tokens, and for the last one the stateless and accumulate banks
(``--product`` adds the shipped options: ``--largest-component`` and ``--tta``).
Also splits Dice by the phantoms' off-centre flag and reports the organs only context
tells apart: the share of each kidney's reference voxels labelled as the other kidney,
and of spleen as liver and back. Writes ablation.json and ablation.md (atomically).

    python benchmarks/ablation.py --data DATA --full M1.pt --window M2.pt --none M3.pt [--product] [--out benchmarks]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FINESegmentation"))

from FINESegmentationLib.evaluation import SHORT, Evaluation, evaluate, markdown_table  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402


def _atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _subset_mean(e: Evaluation, ids: list[str], organs: list[str]) -> float:
    vals = [e.cases[c][o]["dice"] for c in ids for o in organs if o in e.cases.get(c, {})]
    return float(np.mean(vals)) if vals else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--full", required=True, help="window + volume tokens checkpoint")
    ap.add_argument("--window", required=True, help="window tokens only checkpoint")
    ap.add_argument("--none", required=True, help="no tokens checkpoint")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--product", action="store_true", help="also the full model with --largest-component, and with --tta too")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    runs = [
        ("no tokens (nnFormer-like)", args.none, "stateless", {}),
        ("window tokens", args.window, "stateless", {}),
        ("window + volume tokens, stateless bank", args.full, "stateless", {}),
        ("window + volume tokens, accumulate bank", args.full, "accumulate", {}),
    ]
    if args.product:
        runs += [
            ("accumulate, --largest-component", args.full, "accumulate", {"largest_component": True}),
            ("accumulate, --tta --largest-component", args.full, "accumulate", {"largest_component": True, "tta": True}),
        ]
    info = json.loads((Path(args.data) / "dataset.json").read_text()).get("phantom_info", {})
    off = sorted(c for c, i in info.items() if i.get("off_centre"))
    centred = sorted(c for c, i in info.items() if not i.get("off_centre"))
    results, timings = [], {}
    for name, model, bank, options in runs:
        t0 = time.perf_counter()
        seg = Segmenter(model, device="cpu", bank=bank, **{"refine_all": False, "largest_component": False, **options})  # FINE alone
        results.append(evaluate(seg, args.data, name=name, progress=False))
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: mean Dice {results[-1].mean('dice'):.4f} ({timings[name]} s)", flush=True)

    organs = [o.name for o in ORGANS]
    split_rows = ["| Method | off-centre cases, mean Dice | centred cases, mean Dice | right kidney | left kidney | spleen | liver |",
                  "|---|---|---|---|---|---|---|"]
    for e in results:
        split_rows.append(
            f"| {e.name} | {100 * _subset_mean(e, off, organs):.1f} | {100 * _subset_mean(e, centred, organs):.1f} | "
            f"{100 * e.organ_mean('right kidney', 'dice'):.1f} | {100 * e.organ_mean('left kidney', 'dice'):.1f} | "
            f"{100 * e.organ_mean('spleen', 'dice'):.1f} | {100 * e.organ_mean('liver', 'dice'):.1f} |")
    swap_rows = ["| Method | RKi as LKi | LKi as RKi | Sp as Li | Li as Sp | cases with any kidney voxel swapped | same, off-centre cases |",
                 "|---|---|---|---|---|---|---|"]
    kidneys = ("right kidney", "left kidney")
    for e in results:
        any_swap = [c for c, m in e.cases.items() if any(m.get(k, {}).get("swapped", 0) > 0 for k in kidneys)]
        swap_rows.append(
            f"| {e.name} | " + " | ".join(f"{100 * e.organ_mean(o, 'swapped'):.2f}" for o in ("right kidney", "left kidney", "spleen", "liver"))
            + f" | {len(any_swap)} of {len(e.cases)} | {len([c for c in any_swap if c in off])} of {len(off)} |")
    hd_rows = ["| Method | " + " | ".join(SHORT[o] for o in organs) + " |", "|---" * (len(organs) + 1) + "|"]
    for e in results:
        hd_rows.append(f"| {e.name} | " + " | ".join(f"{e.organ_mean(o, 'hd95'):.1f}" for o in organs) + " |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    md = "\n".join([
        f"Held-out phantoms: {len(results[0].cases)} cases of {args.data} ({len(off)} off-centre). Machine: {machine}.",
        "",
        "Dice (%) and average HD95 (mm):",
        "",
        markdown_table(results),
        "",
        "HD95 (mm) per organ:",
        "",
        *hd_rows,
        "",
        "Where global position matters (Dice %):",
        "",
        *split_rows,
        "",
        "Organs only context tells apart: share of the reference voxels labelled as the partner organ (%):",
        "",
        *swap_rows,
        "",
        "Evaluation time per configuration (s): " + ", ".join(f"{k}: {v}" for k, v in timings.items()),
    ])
    _atomic(out / "ablation.md", md + "\n")
    _atomic(out / "ablation.json", json.dumps({"data": str(args.data), "machine": machine, "timings_s": timings,
                                              "off_centre_cases": off, "results": {e.name: e.cases for e in results}}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
