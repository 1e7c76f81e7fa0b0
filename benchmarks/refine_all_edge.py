"""Refine-all where an organ is cut by the image's edge: LiteMedSAM's answer against FINE's outline, side by side.

On a tightly cropped CT (CTA-like) a large organ runs off the image on many slices, and LiteMedSAM, trained on
whole organs, can answer with a part of it. refine-all's guard keeps FINE's outline on a slice where the answer
covers less than ``min_cover`` (0.3) of FINE's organ; ``edge_min_cover`` asks more of the answer for an organ
that touches the slice's edge. For each case, FINE (default settings without refine-all) segments the CT once;
refine-all then runs without the edge rule and with each ``--edge`` value (1.01: FINE's outline always stays at
the edge). LiteMedSAM's answers are memoised per (slice, box), so every variant reuses the first run's answers.
The real CT of ``../shared/data/real-ct`` comes first unless ``--real-ct ''``. Writes refine_all_edge.md and .json
into ``--out``, atomically.

    python benchmarks/refine_all_edge.py --synth data/synth-val10 --edge 0.5 0.7 0.9 1.01
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from FINESegmentationLib.io import read_volume, write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.refine_all import refine_all  # noqa: E402
from refine_step import MemoisedPredictor, dice  # noqa: E402

REAL_CT = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"
SHORT = ["Sp", "RKi", "LKi", "Gb", "Li", "St", "Ao", "Pa"]


def touching(labels: np.ndarray) -> int:
    """Organ-slices (axial) whose organ reaches the image's in-plane edge."""
    n = 0
    for organ in (int(v) for v in np.unique(labels) if v):
        m = labels == organ
        n += int((m[:, 0, :].any(1) | m[:, -1, :].any(1) | m[:, :, 0].any(1) | m[:, :, -1].any(1)).sum())
    return n


def render(results: dict, variants: list[str], meta: dict) -> str:
    fmt = lambda x: "-" if x != x else f"{100 * x:.1f}"  # noqa: E731
    lines = ["# Refine-all at the image's edge: how much of FINE's organ an answer must cover there", "",
             f"Model: {meta['model']}; machine: {meta['machine']}; command: `{meta['command']}`.", "",
             "Dice % per organ against the reference (- : organ absent from the reference). 'edge' = the share of FINE's "
             "organ on a slice that LiteMedSAM's answer must cover to replace it where the organ touches the image's "
             "edge ('-': the general 0.3 everywhere; 1.01: FINE's outline always stays there). 'edge slices': FINE's "
             "organ-slices that touch the edge; 'kept': organ-slices where FINE's outline stayed.", "",
             "| case | FOV | edge slices | edge | kept | mean Dice | " + " | ".join(SHORT) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(SHORT)]
    for case, r in results.items():
        lines.append(f"| {case} | {r['fov']} | {r['edge_slices']} | FINE alone | - | {fmt(np.nanmean(r['fine']))} | "
                     + " | ".join(fmt(x) for x in r["fine"]) + " |")
        for v in variants:
            s = r[v]
            lines.append(f"| {case} | {r['fov']} | {r['edge_slices']} | {v} | {s['kept']} | {fmt(np.nanmean(s['dice']))} | "
                         + " | ".join(fmt(x) for x in s["dice"]) + " |")
    lines += ["", "Over the cases (mean of the per-case means; per organ, the mean over the cases that hold it):", "",
              "| edge | mean Dice | " + " | ".join(SHORT) + " |", "|---|---|" + "---|" * len(SHORT)]
    for v in ["fine"] + variants:
        rows = [r[v] if v == "fine" else r[v]["dice"] for r in results.values()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an organ no case holds
            per = np.nanmean(np.array(rows, float), axis=0)
        lines.append(f"| {'FINE alone' if v == 'fine' else v} | {100 * np.mean([np.nanmean(x) for x in rows]):.1f} | "
                     + " | ".join(fmt(x) for x in per) + " |")
    lines += ["", "Refine-all seconds per case (the first variant, which embeds; the others reuse its answers): "
              + ", ".join(f"{c} {r['s']:.0f}" for c, r in results.items()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", required=True, help="an nnU-Net-layout folder of held-out synthetic CT")
    ap.add_argument("--synth-cases", nargs="*", default=None, help="case ids (default: every case)")
    ap.add_argument("--real-ct", default=str(REAL_CT), help="folder with ct.nii.gz and labels.nii.gz ('' to skip)")
    ap.add_argument("--edge", nargs="+", type=float, default=[0.5, 0.7, 0.9, 1.01])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    synth = Path(args.synth)
    info = json.loads((synth / "synth_info.json").read_text()) if (synth / "synth_info.json").exists() else {}
    ids = args.synth_cases or sorted(p.name[: -len(".nii.gz")] for p in (synth / "labelsTr").glob("*.nii.gz"))
    cases = [("real CT", Path(args.real_ct) / "ct.nii.gz", Path(args.real_ct) / "labels.nii.gz", "real")] if args.real_ct else []
    cases += [(c, synth / "imagesTr" / f"{c}_0000.nii.gz", synth / "labelsTr" / f"{c}.nii.gz",
               info.get(c, {}).get("fov", "?")) for c in ids]
    variants = ["-"] + [f"{v:g}" for v in args.edge]
    segmenter = Segmenter(model=args.model, refine_all=False)
    predictor = SlicePredictor("litemedsam")
    results = {}
    for case, image, label, fov in cases:
        ct = read_volume(image)
        ref = read_volume(label, kind="label").array
        fine = segmenter.segment(ct).labels
        memo = MemoisedPredictor(predictor)
        r = {"fov": fov, "edge_slices": touching(fine.array), "fine": [dice(fine.array == o.label, ref == o.label) for o in ORGANS]}
        t = time.perf_counter()
        for name, value in zip(variants, [None] + args.edge):
            res = refine_all(memo, ct, fine, edge_min_cover=value)
            r[name] = {"dice": [dice(res.labels.array == o.label, ref == o.label) for o in ORGANS], "kept": res.report["kept"]}
            if name == "-":
                r["s"] = round(time.perf_counter() - t, 1)
            print(case, name, res.report["kept"], f"{100 * np.nanmean(r[name]['dice']):.1f}", flush=True)
        results[case] = r
    save(Path(args.out), "refine_all_edge", segmenter, args.threads, variants, results, render)
    return 0


def save(out: Path, name: str, segmenter: Segmenter, threads: int, variants: list[str], results: dict, render,
         extra_meta: dict | None = None) -> None:
    """Write ``name``.json (meta, variants, results) and ``name``.md (``render(results, variants, meta)``) into ``out``,
    atomically; ``extra_meta`` joins the meta (model, machine, command)."""
    meta = {"model": f"{segmenter.model_name} (sha256 {segmenter.model_sha256[:12]})",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)",
            "command": f"python benchmarks/{name}.py " + " ".join(sys.argv[1:]), **(extra_meta or {})}
    data = {"meta": meta, "variants": variants, "results": results}
    write_text_atomically(out / f"{name}.json", json.dumps(data, indent=1))
    write_text_atomically(out / f"{name}.md", render(results, variants, meta))


if __name__ == "__main__":
    sys.exit(main())
