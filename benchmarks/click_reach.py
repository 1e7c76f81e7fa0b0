"""A click's reach: how far from its clicks a Memorizing-SAM answer may change the segment, side by side.

``fine-seg refine --refiner auto`` sends clicks on a segment FINE found to the Memorizing-SAM refiner, which
draws the whole organ again on its coarse crop (2.5 mm voxels or more). ``RefinerPredictor.predict(reach_mm=R,
reach_factor=F)`` takes that answer only within R mm of a click, or F times the click's distance to the segment's
border where that is farther, and keeps the segment elsewhere. For each case FINE segments the
CT once (default settings: TTA, refine-all); spleen, kidneys and liver then get ``--clicks`` clicks each, click n
at the deepest point of the largest 3-D error, every click so far on FINE's segment, as ``fine-seg refine`` runs
them (:func:`click_curves.curve_auto`), once per ``--reaches`` value: ``R`` (F = 0), ``RxF``, or 0 (the whole crop). Writes click_reach.md
and .json into ``--out``, atomically.

    python benchmarks/click_reach.py --synth data/synth-val10 --reaches 0 20 20x1.5 20x2 20x3 15x2
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_inference import machine  # noqa: E402
from click_curves import REAL_CT, TARGET_ORGANS, cases, curve_auto  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.refiner.config import DEFAULT_REACH_FACTOR, DEFAULT_REACH_MM  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor  # noqa: E402
from FINESegmentationLib.refiner.predictor import RefinerPredictor  # noqa: E402

STEPS = (0, 1, 2, 3, 5)


def parse(text: str) -> tuple[float, float]:
    """'R' -> (R, 0), 'RxF' -> (R, F); R = 0: the whole crop."""
    reach, _, factor = str(text).partition("x")
    return float(reach), float(factor or 0)


def name(text: str) -> str:
    reach, factor = parse(text)
    if not reach:
        return "whole crop"
    label = f"{reach:g} mm" + (f", x{factor:g} depth" if factor else "")
    return label + (" (default)" if (reach, factor) == (DEFAULT_REACH_MM, DEFAULT_REACH_FACTOR) else "")


def render(results: dict) -> str:
    steps = [s for s in STEPS if s <= results["clicks"]]
    lines = [f"# A click's reach (Memorizing-SAM answers within R mm of a click)", "",
             f"FINE: {results['fine']} (default settings: TTA, refine-all); refiner: `fine-seg refine --refiner auto` given FINE's "
             f"segment and every click so far, click n at the deepest point of the largest 3-D error; {results['machine']['cpu']}, "
             f"{results['threads']} thread(s), {results['date']}; command: `{results['command']}`.", "",
             "Mean Dice % of spleen, right kidney, left kidney and liver after n clicks; 'whole crop': the answer replaces the "
             "segment everywhere in the refiner's crop (before this setting); 'R mm': within R mm of a click; 'x F depth': or F "
             "times the click's distance to the segment's border, where that is farther. Clicks off the segment go to LiteMedSAM, "
             "which the reach does not touch.", ""]
    for group in dict.fromkeys(c["group"] for c in results["cases"]):
        cases_ = [c for c in results["cases"] if c["group"] == group]
        organs = list(dict.fromkeys(o for c in cases_ for o in c["organs"]))
        lines += [f"**{group}** ({len(cases_)} case{'s' if len(cases_) > 1 else ''})", "",
                  "| reach | " + " | ".join(f"{s} clicks" for s in steps) + " | " + " | ".join(f"{o}, 5 clicks" for o in organs) + " |",
                  "|---|" + "---|" * (len(steps) + len(organs))]
        for reach in results["reaches"]:
            key = str(reach)
            curves = np.array([c["organs"][o][key] for c in cases_ for o in c["organs"]])
            per_organ = [np.mean([c["organs"][o][key][-1] for c in cases_ if o in c["organs"]]) for o in organs]
            lines.append(f"| {name(reach)} | " + " | ".join(f"{100 * curves[:, s].mean():.1f}" for s in steps) + " | "
                         + " | ".join(f"{100 * v:.1f}" for v in per_organ) + " |")
        lines.append("")
    lines += ["Per case and organ (Dice % at 0 / 1 / 2 / 3 / 5 clicks):", "", "| case | organ | " + " | ".join(name(r) for r in results["reaches"]) + " |",
              "|---|---|" + "---|" * len(results["reaches"])]
    for c in results["cases"]:
        for organ, per in c["organs"].items():
            lines.append(f"| {c['case']} | {organ} | " + " | ".join(
                " / ".join(f"{100 * per[str(r)][s]:.0f}" for s in steps) for r in results["reaches"]) + " |")
    lines += ["", "FINE seconds per case: " + ", ".join(f"{c['case']} {c['fine_seconds']:.0f}" for c in results["cases"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-ct", default=str(REAL_CT), help="folder with ct.nii.gz and labels.nii.gz ('' to skip)")
    parser.add_argument("--synth", default=str(ROOT / "data" / "synth-val10"), help="held-out synthetic dataset")
    parser.add_argument("--synth-cases", type=int, default=10, help="synthetic cases used, evenly spread (0: none)")
    parser.add_argument("--fine", default=None, help="FINE model (default: the registry's default)")
    parser.add_argument("--reaches", nargs="+", default=["0", "20", "20x1.5", "20x2", "20x3", "15x2"],
                        help="R (mm) or RxF (R mm, or F times the click's distance to the segment's border); 0: the whole crop")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    segmenter = Segmenter(args.fine)
    slices, memorizing = SlicePredictor("litemedsam-clicks"), RefinerPredictor(None)
    targets = [o for o in ORGANS if o.name in TARGET_ORGANS]
    results = {"machine": machine(), "threads": args.threads, "date": datetime.date.today().isoformat(), "fine": segmenter.model_name,
               "clicks": args.clicks, "reaches": args.reaches, "cases": [],
               "command": "python benchmarks/click_reach.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for group, case_id, load in cases(args):
        volume, reference = load()
        start = time.perf_counter()
        initial = segmenter.segment(volume).labels.array
        entry = {"group": group, "case": case_id, "fine_seconds": time.perf_counter() - start, "organs": {}}
        slices.set_volume(volume)
        for organ in targets:
            target = reference.array == organ.label
            if not target.any():
                continue
            per = {}
            for reach in args.reaches:
                r, f = parse(reach)
                per[str(reach)], _, _ = curve_auto(slices, memorizing, volume, initial == organ.label, target, args.clicks, r or None, f)
                print(f"{group} {case_id} {organ.name:13s} {name(reach):18s} " + " ".join(f"{d:.3f}" for d in per[str(reach)]), flush=True)
            entry["organs"][organ.name] = per
        results["cases"].append(entry)
    write_text_atomically(out / "click_reach.json", json.dumps(results, indent=1) + "\n")
    write_text_atomically(out / "click_reach.md", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
