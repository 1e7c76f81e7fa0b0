"""Refine-all on thin slices: every slice embedded, or only slices at most ``--steps`` mm apart with the answers
interpolated along z in between (``slice_step_mm``), side by side in one run.

For each held-out synthetic case, FINE (default settings without refine-all) segments the CT once; refine-all
then runs with each step. LiteMedSAM's answers are memoised per (slice, box), so the step-0 run pays for every
embedding and the others reuse its answers: their cost is the number of slices they embed (the embedding is
what dominates on a CPU), which the table gives beside the Dice. Writes refine_step.md and .json into
``--out``, atomically.

    python benchmarks/refine_step.py --synth data/synth-val10 \
        --synth-cases synth_0013 synth_0006 synth_0002 synth_0010 --steps 0 2 3 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))

from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume, write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.refine_all import refine_all  # noqa: E402


class MemoisedPredictor:
    """A SlicePredictor whose slice_logits are memoised per (slice, box)."""

    def __init__(self, predictor: SlicePredictor) -> None:
        self.predictor, self.memo = predictor, {}

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def slice_logits(self, k, box):
        key = (k, tuple(np.round(np.asarray(box, dtype=np.float64), 3)))
        if key not in self.memo:
            self.memo[key] = self.predictor.slice_logits(k, box)
        return self.memo[key]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / s if s else float("nan")


def render(results: dict, steps: list[str], meta: dict) -> str:
    short = ["Sp", "RKi", "LKi", "Gb", "Li", "St", "Ao", "Pa"]
    lines = ["# Refine-all on thin slices: slices embedded every `step` mm, answers interpolated in between", "",
             f"Model: {meta['model']}; machine: {meta['machine']}; command: `{meta['command']}`.", "",
             "Dice % per organ against the reference (- : organ absent from the reference); 'embedded': slices "
             "LiteMedSAM embedded and prompted, of the slices holding an organ (the CPU cost is proportional to it).", "",
             "| case | slice mm | step mm | embedded / slices | mean Dice | " + " | ".join(short) + " |",
             "|---|---|---|---|---|" + "---|" * len(short)]
    fmt = lambda x: "-" if x != x else f"{100 * x:.1f}"  # noqa: E731
    for case, r in results.items():
        lines.append(f"| {case} | {r['spacing'][2]:.2f} | FINE alone | - | {fmt(np.nanmean(r['fine']))} | " + " | ".join(fmt(x) for x in r["fine"]) + " |")
        for st in steps:
            s = r[st]
            lines.append(f"| {case} | {r['spacing'][2]:.2f} | {float(st):g} | {s['embedded']} / {s['slices']} | {fmt(np.nanmean(s['dice']))} | "
                         + " | ".join(fmt(x) for x in s["dice"]) + " |")
    lines += ["", "Over the cases (mean of the per-case means; embedded slices summed):", "", "| step mm | mean Dice | embedded slices | share of step 0 |", "|---|---|---|---|"]
    total0 = sum(r[steps[0]]["embedded"] for r in results.values())
    for st in steps:
        mean = np.mean([np.nanmean(r[st]["dice"]) for r in results.values()])
        emb = sum(r[st]["embedded"] for r in results.values())
        lines.append(f"| {float(st):g} | {100 * mean:.1f} | {emb} | {emb / total0:.2f} |")
    lines += ["", f"Step-0 refine-all seconds per case (every slice embedded, one thread): "
              + ", ".join(f"{c} {r[steps[0]]['s']:.0f}" for c, r in results.items()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", required=True, help="an nnU-Net-layout folder of held-out synthetic CT")
    ap.add_argument("--synth-cases", nargs="+", required=True)
    ap.add_argument("--steps", nargs="+", type=float, default=[0.0, 2.0, 3.0, 5.0], help="the first is the reference run")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--render", default=None, help="only write the .md from this .json of an earlier run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        write_text_atomically(out / "refine_step.md", render(data["results"], data["steps"], data["meta"]))
        return 0
    steps = [str(s) for s in args.steps]
    if args.steps[0] != 0:
        sys.exit("refine_step.py: the first --steps value must be 0 (every slice), the run the others reuse.")
    segmenter = Segmenter(model=args.model, refine_all=False)
    predictor = SlicePredictor("litemedsam")
    results = {}
    for case in args.synth_cases:
        ct = read_volume(Path(args.synth) / "imagesTr" / f"{case}_0000.nii.gz")
        ref = read_volume(Path(args.synth) / "labelsTr" / f"{case}.nii.gz", kind="label").array
        fine = segmenter.segment(ct).labels
        memo = MemoisedPredictor(predictor)
        r = {"spacing": [float(s) for s in ct.geometry.spacing], "fine": [dice(fine.array == o.label, ref == o.label) for o in ORGANS]}
        for st, value in zip(steps, args.steps):
            t = time.perf_counter()
            res = refine_all(memo, ct, fine, slice_step_mm=value)
            r[st] = {"dice": [dice(res.labels.array == o.label, ref == o.label) for o in ORGANS], "embedded": res.report["embedded"],
                     "slices": res.report["slices"], "s": round(time.perf_counter() - t, 1)}
            print(case, value, res.report["embedded"], "/", res.report["slices"], f"{100 * np.nanmean(r[st]['dice']):.1f}", flush=True)
        results[case] = r
    meta = {"model": f"{segmenter.model_name} (sha256 {segmenter.model_sha256[:12]})",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
            "command": "python benchmarks/refine_step.py " + " ".join(sys.argv[1:])}
    data = {"meta": meta, "steps": steps, "results": results}
    write_text_atomically(out / "refine_step.json", json.dumps(data, indent=1))
    write_text_atomically(out / "refine_step.md", render(results, steps, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
