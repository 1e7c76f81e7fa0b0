"""Refine-all's box margin with FINE's own boxes: how far each organ's box on a slice is enlarged before LiteMedSAM is asked.

The default margin (3 mm) was chosen with the reference's boxes on the real CT (README, "Refine-all"); refine-all
asks with FINE's boxes, which are too small where FINE under-segments an organ on a slice. For each case, FINE
(default settings without refine-all) segments the CT once; refine-all then runs once per ``--margins`` value on
the same FINE labels (the slice embeddings are computed once per case and reused; only the prompts change).
The real CT of ``../shared/data/real-ct`` comes first unless ``--real-ct ''``. Writes refine_all_margin.md and
.json into ``--out``, atomically.

    python benchmarks/refine_all_margin.py --synth data/synth-val10 --margins 3 5 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.refine_all import DEFAULT_MARGIN_MM, refine_all  # noqa: E402
from refine_all_edge import save  # noqa: E402

REAL_CT = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"
SHORT = ["Sp", "RKi", "LKi", "Gb", "Li", "St", "Ao", "Pa"]


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice, or NaN for an organ absent from the reference (left out of the averages, as ``fine-seg evaluate`` does)."""
    if not reference.any():
        return float("nan")
    return 2 * int((prediction & reference).sum()) / (int(prediction.sum()) + int(reference.sum()))


def _mean(rows) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an organ no case holds
        return np.nanmean(np.array(rows, float), axis=0)


MARGIN_NOTE = (f"'margin': millimetres each organ's box on a slice (around FINE's voxels there) is enlarged by before "
               f"LiteMedSAM is asked (default {DEFAULT_MARGIN_MM:g})")


def render(results: dict, variants: list[str], meta: dict, title: str = "Refine-all's box margin with FINE's boxes",
           column: str = "margin mm", note: str = MARGIN_NOTE, seconds_note: str = "the first margin embeds the slices; "
           "the others reuse the embeddings") -> str:
    """The per-case table, then the means of each group of cases (a result's ``group``; else real CT / synthetic)."""
    fmt = lambda x: "-" if x != x else f"{100 * x:.1f}"  # noqa: E731
    lines = [f"# {title}", "",
             f"Model: {meta['model']}; machine: {meta['machine']}; command: `{meta['command']}`.", "",
             f"Dice % per organ against the reference (- : organ absent from the reference, left out of the means as "
             f"`fine-seg evaluate` does). {note}; FINE alone: before refine-all.", "",
             f"| case | phase | FOV | {column} | mean Dice | " + " | ".join(SHORT) + " |",
             "|---|---|---|---|---|" + "---|" * len(SHORT)]
    for case, r in results.items():
        for v in ["fine"] + variants:
            d = r[v]
            lines.append(f"| {case} | {r['phase']} | {r['fov']} | {'FINE alone' if v == 'fine' else v} | {fmt(np.nanmean(d))} | "
                         + " | ".join(fmt(x) for x in d) + " |")
    groups: dict[str, list[str]] = {}
    for c, r in results.items():
        groups.setdefault(r.get("group", "real CT" if r["fov"] == "real" else "synthetic"), []).append(c)
    for group, members in groups.items():
        lines += ["", f"**{group}** ({len(members)} case(s)): mean of the per-case means; per organ, the mean over the cases that hold it.", "",
                  f"| {column} | per-case mean Dice | min case | " + " | ".join(SHORT) + " |", "|---|---|---|" + "---|" * len(SHORT)]
        for v in ["fine"] + variants:
            rows = [results[c][v] for c in members]
            per_case = [np.nanmean(x) for x in rows]
            lines.append(f"| {'FINE alone' if v == 'fine' else v} | {100 * np.mean(per_case):.1f} | {100 * np.min(per_case):.1f} | "
                         + " | ".join(fmt(x) for x in _mean(rows)) + " |")
    lines += ["", f"Refine-all seconds per case ({seconds_note}): "
              + ", ".join(f"{c} {r['s']:.0f}" for c, r in results.items()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", required=True, help="an nnU-Net-layout folder of held-out synthetic CT")
    ap.add_argument("--synth-cases", nargs="*", default=None, help="case ids (default: every case)")
    ap.add_argument("--real-ct", default=str(REAL_CT), help="folder with ct.nii.gz and labels.nii.gz ('' to skip)")
    ap.add_argument("--margins", nargs="+", type=float, default=[DEFAULT_MARGIN_MM, 5.0, 8.0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    synth = Path(args.synth)
    info = json.loads((synth / "synth_info.json").read_text()) if (synth / "synth_info.json").exists() else {}
    ids = args.synth_cases or sorted(p.name[: -len(".nii.gz")] for p in (synth / "labelsTr").glob("*.nii.gz"))
    cases = [("real CT", Path(args.real_ct) / "ct.nii.gz", Path(args.real_ct) / "labels.nii.gz", "real", "non-contrast")] if args.real_ct else []
    cases += [(c, synth / "imagesTr" / f"{c}_0000.nii.gz", synth / "labelsTr" / f"{c}.nii.gz",
               info.get(c, {}).get("fov", "?"), info.get(c, {}).get("phase", "?")) for c in ids]
    variants = [f"{m:g}" for m in args.margins]
    segmenter = Segmenter(model=args.model, refine_all=False)
    predictor = SlicePredictor("litemedsam")
    results = {}
    for case, image, label, fov, phase in cases:
        ct = read_volume(image)
        ref = read_volume(label, kind="label").array
        fine = segmenter.segment(ct).labels
        r = {"fov": fov, "phase": phase, "fine": [dice(fine.array == o.label, ref == o.label) for o in ORGANS]}
        t = time.perf_counter()
        for name, margin in zip(variants, args.margins):
            res = refine_all(predictor, ct, fine, margin_mm=margin)
            r[name] = [dice(res.labels.array == o.label, ref == o.label) for o in ORGANS]
            if "s" not in r:
                r["s"] = round(time.perf_counter() - t, 1)
            print(case, name, f"{100 * np.nanmean(r[name]):.1f}", flush=True)
        results[case] = r
    save(Path(args.out), "refine_all_margin", segmenter, args.threads, variants, results, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
