"""Refine-all's guard, chosen by the numbers: which LiteMedSAM answers may replace FINE's outline on a slice.

For each case, FINE (``--model``, default settings without refine-all) segments the CT; then every organ on
every slice is prompted once with its 3 mm box, as refine-all does, and the answer's logits are kept. Each
rule below decides per organ and slice whether the answer replaces FINE's outline there (otherwise FINE's
outline stays, held against the other organs' answers); overlapping answers go to the larger logit:

* ``FINE alone``: no answer replaces; ``every answer``: all do (refine-all before the guard);
* ``cover >= c``: the answer covers at least c of FINE's voxels of the organ on the slice (``min_cover``);
* ``Dice >= d``: the answer's Dice with FINE's outline is at least d;
* ``precision >= p``: at least p of the answer lies inside FINE's outline.

Dice % per organ against the reference, on the real CT and on held-out synthetic cases; writes
refine_all_gates.md and .json into ``--out``, atomically.

    python benchmarks/refine_all_gates.py --synth data/synth-val10 --synth-cases synth_0009 synth_0013 synth_0017
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

from FINESegmentationLib.data.datasets import CaseFiles, find_cases  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume, write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.refine_all import DEFAULT_MARGIN_MM  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else float("nan")


def _cover(answer: np.ndarray, own: np.ndarray) -> float:
    return float((answer & own).sum() / max(own.sum(), 1))


def _precision(answer: np.ndarray, own: np.ndarray) -> float:
    return float((answer & own).sum() / max(answer.sum(), 1))


RULES = {
    "FINE alone": lambda a, f: False,
    "every answer": lambda a, f: True,
    **{f"cover >= {c}": (lambda c: lambda a, f: _cover(a, f) >= c)(c) for c in (0.3, 0.5, 0.7)},
    **{f"Dice >= {d}": (lambda d: lambda a, f: _dice(a, f) >= d)(d) for d in (0.5, 0.6, 0.7)},
    **{f"precision >= {p}": (lambda p: lambda a, f: _precision(a, f) >= p)(p) for p in (0.3, 0.5)},
}


def answers(predictor: SlicePredictor, segmenter: Segmenter, case: CaseFiles) -> dict:
    """FINE's labels, the reference and every organ's answer logits per slice, in the slice frame."""
    volume = read_volume(case.image)
    reference = read_volume(case.label, kind="label").array
    fine = segmenter.segment(volume).labels.array
    predictor.set_volume(volume)
    frame = predictor.frame
    source, target = frame.to_frame(fine), frame.to_frame(reference)
    logits = {}
    for k in range(frame.shape[0]):
        for organ in (int(v) for v in np.unique(source[k]) if v != 0):
            box = predictor.enlarged_box(source[k] == organ, DEFAULT_MARGIN_MM)
            logits[(k, organ)] = predictor.slice_logits(k, box)[0].numpy()
    return {"source": source, "target": target, "logits": logits}


def combine(case: dict, rule) -> np.ndarray:
    source = case["source"]
    out = np.zeros_like(source)
    for k in range(source.shape[0]):
        best = np.full(source.shape[1:], -np.inf, np.float32)
        winner = np.zeros(source.shape[1:], np.uint8)
        for (kk, organ), logits in case["logits"].items():
            if kk != k:
                continue
            own = source[k] == organ
            if not rule(logits > 0, own):
                logits = np.where(own, np.inf, -np.inf).astype(np.float32)
            better = logits > best
            best = np.where(better, logits, best)
            winner[better] = organ
        out[k] = np.where(best > 0, winner, 0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="FINE model (default: the first registered)")
    ap.add_argument("--real", default=str(DEFAULT_REAL), help="folder with ct.nii.gz and labels.nii.gz ('' to skip)")
    ap.add_argument("--synth", default=None, help="held-out synthetic dataset")
    ap.add_argument("--synth-cases", nargs="+", default=None, metavar="ID")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    segmenter = Segmenter(args.model, device="cpu", refine_all=False)
    predictor = SlicePredictor("litemedsam", device="cpu")  # the weights refine-all uses
    sets: dict[str, list[CaseFiles]] = {}
    if args.real:
        sets["real CT"] = [CaseFiles(Path(args.real).name, Path(args.real) / "ct.nii.gz", Path(args.real) / "labels.nii.gz")]
    if args.synth:
        cases = find_cases(args.synth)
        sets["held-out synthetic"] = [c for c in cases if not args.synth_cases or c.case_id in args.synth_cases]
    start = time.perf_counter()
    results: dict = {}
    for name, cases in sets.items():
        cached = [answers(predictor, segmenter, c) for c in cases]
        results[name] = {"cases": [c.case_id for c in cases], "rules": {}}
        for rule_name, rule in RULES.items():
            per_case = []
            for case in cached:
                out = combine(case, rule)
                per_case.append([_dice(out == o.label, case["target"] == o.label) if (case["target"] == o.label).any() else None
                                 for o in ORGANS])
            organs = [np.nanmean([c[i] if c[i] is not None else np.nan for c in per_case]) for i in range(len(ORGANS))]
            results[name]["rules"][rule_name] = {"organs": dict(zip((o.name for o in ORGANS), map(float, organs))),
                                                 "mean": float(np.nanmean(organs)), "per_case": per_case}
        print(f"{name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    md = ["# Refine-all's guard: which answers replace FINE's outline", "",
          f"FINE model: {segmenter.model_name} (sha256 {str(segmenter.model_sha256)[:12]}), then LiteMedSAM (published weights), "
          f"one {DEFAULT_MARGIN_MM:g} mm box per organ and slice. Dice % per organ (mean over cases). Machine: {machine}.", ""]
    for name, data in results.items():
        md += [f"## {name}: {', '.join(data['cases'])}", "",
               "| rule | " + " | ".join(o.name for o in ORGANS) + " | mean |", "|---" * (len(ORGANS) + 2) + "|"]
        for rule_name, row in data["rules"].items():
            md.append(f"| {rule_name} | " + " | ".join(f"{100 * v:.1f}" for v in row["organs"].values()) + f" | {100 * row['mean']:.1f} |")
        md.append("")
    out = Path(args.out)
    write_text_atomically(out / "refine_all_gates.md", "\n".join(md))
    write_text_atomically(out / "refine_all_gates.json", json.dumps({"machine": machine, "model": segmenter.model_name,
                                                                    "sha256": segmenter.model_sha256, "results": results}, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
