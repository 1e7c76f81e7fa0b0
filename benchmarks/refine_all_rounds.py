"""Refine-all's box rounds: each organ's box on a slice redrawn around LiteMedSAM's first answer and asked again.

Refine-all asks LiteMedSAM once per organ and slice, with the box around FINE's voxels there enlarged by the margin.
Where FINE found only part of an organ on a slice, that box can still cut the organ. With a second round the box is
drawn around the first answer and FINE's voxels together (with the same margin) and LiteMedSAM is asked again; the
guard then judges the last answer as before. For each case, FINE (``--model``, default settings without refine-all)
segments the CT once; refine-all then runs once per ``--variant`` on the same FINE labels (the slice embeddings are
computed once per case and reused; only the prompts change). The real CT of ``../shared/data/real-ct`` comes first
unless ``--real-ct ''``, with its two versions with contrast added to the organs (``benchmarks/pseudo_contrast.py``:
portal-venous, arterial) unless ``--no-pseudo-contrast``. Writes refine_all_rounds.md and .json into ``--out``,
atomically.

    python benchmarks/refine_all_rounds.py --synth data/synth-val --variant one=1 --variant gallbladder=gallbladder:2 \\
        --variant all-but-pancreas=2,pancreas:1 --variant all=2

A variant's rounds: a number for every organ, then ``organ:rounds`` for single organs (organ names as in the
label table, spaces or underscores), comma-separated.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume, write_text_atomically, write_volume  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor  # noqa: E402
from FINESegmentationLib.refiner.litemedsam.refine_all import DEFAULT_BOX_ROUNDS, parse_box_rounds, refine_all  # noqa: E402
from pseudo_contrast import PHASES, enhanced  # noqa: E402
from refine_all_edge import save  # noqa: E402
from refine_all_margin import REAL_CT, dice, render  # noqa: E402

NOTE = ("'box rounds': how many times LiteMedSAM is asked per organ and slice, each round with the box around the "
        "previous answer and FINE's voxels (1: refine-all as before this option)")


def _render(results: dict, variants: list[str], meta: dict, rounds: dict) -> str:
    note = NOTE + "; variants: " + "; ".join(
        f"{n}: " + (", ".join(f"{o} {k}" for o, k in rounds.get(n, {}).items() if k != 1) or "1 for every organ") for n in variants)
    return render(results, variants, meta, title="Refine-all's box rounds", column="box rounds", note=note,
                  seconds_note="the first variant embeds the slices; the others reuse the embeddings and only prompt")


def _variant(text: str) -> tuple[str, dict[int, int]]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"give a variant as NAME=ROUNDS, not '{text}'")
    return name, parse_box_rounds(spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", help="an nnU-Net-layout folder of held-out synthetic CT (needed unless --merge)")
    ap.add_argument("--synth-cases", nargs="*", default=None, help="case ids (default: every case)")
    ap.add_argument("--real-ct", default=str(REAL_CT), help="folder with ct.nii.gz and labels.nii.gz ('' to skip)")
    ap.add_argument("--no-pseudo-contrast", action="store_true", help="leave out the real CT's versions with contrast added")
    ap.add_argument("--variant", action="append", type=_variant, default=None,
                    help="NAME=ROUNDS (default: one=1 and the default rounds)")
    ap.add_argument("--fine-cache", default=None, help="a folder for FINE's labels per case: read where there, else written "
                    "(FINE is deterministic, so a run split over several processes or repeated computes it once)")
    ap.add_argument("--merge", nargs="+", default=None, help="only write the .md and .json from the .json of earlier runs "
                    "(the same model and variants, different cases), in the order given")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        if any(r["variants"] != runs[0]["variants"] or r["meta"]["model"] != runs[0]["meta"]["model"] for r in runs):
            raise SystemExit("the runs to merge differ in model or variants")
        meta = dict(runs[0]["meta"], command=" ; ".join(r["meta"]["command"] for r in runs))
        results = {case: r for run in runs for case, r in run["results"].items()}
        write_text_atomically(out / "refine_all_rounds.json", json.dumps({"meta": meta, "variants": runs[0]["variants"], "results": results}, indent=1))
        write_text_atomically(out / "refine_all_rounds.md", _render(results, runs[0]["variants"], meta, runs[0]["meta"].get("rounds", {})))
        return 0
    if not args.synth:
        ap.error("give --synth (a dataset folder), or --merge with earlier runs")
    torch.set_num_threads(args.threads)
    variants = dict(args.variant or [("one", parse_box_rounds("1")), ("default", dict(DEFAULT_BOX_ROUNDS))])
    synth = Path(args.synth)
    info = json.loads((synth / "synth_info.json").read_text()) if (synth / "synth_info.json").exists() else {}
    ids = args.synth_cases or sorted(p.name[: -len(".nii.gz")] for p in (synth / "labelsTr").glob("*.nii.gz"))
    cases = []  # (case, image, label, fov, phase, group)
    tmp = Path(tempfile.mkdtemp(prefix="refine_all_rounds_"))
    if args.real_ct:
        real = Path(args.real_ct)
        cases.append(("real CT", real / "ct.nii.gz", real / "labels.nii.gz", "real", "non-contrast", "real CT"))
        if not args.no_pseudo_contrast:
            ct, labels = read_volume(real / "ct.nii.gz"), read_volume(real / "labels.nii.gz", kind="label")
            for phase in PHASES:
                path = write_volume(enhanced(ct, labels.array, phase), tmp / f"{phase}.nii.gz")
                cases.append((f"real CT, {phase} added", path, real / "labels.nii.gz", "real", phase, "real CT with contrast added"))
    cases += [(c, synth / "imagesTr" / f"{c}_0000.nii.gz", synth / "labelsTr" / f"{c}.nii.gz",
               info.get(c, {}).get("fov", "?"), info.get(c, {}).get("phase", "?"), "synthetic") for c in ids]
    segmenter = Segmenter(model=args.model, refine_all=False)
    predictor = SlicePredictor("litemedsam", cache_slices=100_000)  # every slice's embedding, reused by every variant
    results = {}
    for case, image, label, fov, phase, group in cases:
        ct = read_volume(image)
        ref = read_volume(label, kind="label").array
        cached = Path(args.fine_cache) / (re.sub(r"[^A-Za-z0-9_-]+", "_", case) + ".nii.gz") if args.fine_cache else None
        if cached is not None and cached.exists():
            fine = read_volume(cached, kind="label")
        else:
            fine = segmenter.segment(ct).labels
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_volume(fine, cached)
        r = {"fov": fov, "phase": phase, "group": group, "fine": [dice(fine.array == o.label, ref == o.label) for o in ORGANS]}
        predictor.set_volume(ct)
        for name, rounds in variants.items():
            t = time.perf_counter()
            res = refine_all(predictor, ct, fine, box_rounds=rounds)
            r[name] = [dice(res.labels.array == o.label, ref == o.label) for o in ORGANS]
            r.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)  # after the first: prompts only
            r.setdefault("boxes", {})[name] = res.report["boxes"]
            r.setdefault("s", r["seconds"][name])
            print(case, name, f"{100 * np.nanmean(r[name]):.1f}", flush=True)
        results[case] = r
    rounds = {name: {o.name: spec.get(o.label, 1) for o in ORGANS} for name, spec in variants.items()}
    save(out, "refine_all_rounds", segmenter, args.threads, list(variants), results, partial(_render, rounds=rounds),
         extra_meta={"rounds": rounds})  # each variant's rounds, for --merge
    return 0


if __name__ == "__main__":
    sys.exit(main())
