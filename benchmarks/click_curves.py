"""Click curves in 3-D: Dice after 0-10 clicks from FINE's own segments, for each refiner, as `fine-seg refine` runs.

Each case is segmented by a FINE model (the default one unless ``--fine``) with the default settings of
``fine-seg segment``; each organ then starts from FINE's segment (empty where FINE missed it) and gets up
to ``--clicks`` clicks, click n at the deepest point of the largest 3-D error of the segment after click
n-1 (positive in a false negative, negative in a false positive; :func:`deepest_click`, in millimetres),
the way the issue's user study placed them. Refiners:

* ``litemedsam-clicks`` / ``litemedsam``: :class:`SlicePredictor` with the click-tuned or the published
  weights. Each click re-prompts its slice together with the earlier clicks on that slice and
  re-propagates from there (what a Slicer session and ``fine-seg refine --points`` do); with the published
  weights a click where the slice is empty is refused, and the segment stays as it was (counted so).
* ``litemedsam-clicks+memory``: the click-tuned weights reading a memory built over them (``--clicks-memory``:
  ``fine-seg refiner-memory --refiner litemedsam --model`` with those weights; the bundled memory belongs to
  the published weights), on every slice drawn.
* ``memorizing-sam`` (``+memory``): the phantom-trained 3-D refiner, every click so far on FINE's segment
  (its crop around the segment), with and without its memory.
* ``auto``: what ``fine-seg refine --refiner auto`` (the default) runs given FINE's segmentation and every click so
  far: the refiner :func:`~FINESegmentationLib.refiner.choice.automatic_refiner` picks for those clicks on FINE's
  segment (the click-tuned LiteMedSAM, or the Memorizing-SAM refiner with its memory).

Data: the real CT in ``../shared/data/real-ct/`` (``--real-ct``) and ``--synth-cases`` held-out synthetic
volumes of ``--synth`` (evenly spread). Writes ``click_curves.json`` and ``click_curves.md`` into ``--out``.
Slice embeddings are shared by the two LiteMedSAM variants (same frozen image encoder).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

REAL_CT = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"
REFINERS = ("litemedsam-clicks", "litemedsam-clicks+memory", "litemedsam", "memorizing-sam", "memorizing-sam+memory", "auto")
TARGET_ORGANS = ("spleen", "right kidney", "left kidney", "liver")  # the organs of the target


def dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def cases(args):
    from FINESegmentationLib.io import read_volume

    out = []
    if args.real_ct:
        real = Path(args.real_ct)
        out.append(("real CT", real.name, lambda r=real: (read_volume(r / "ct.nii.gz"), read_volume(r / "labels.nii.gz", kind="label"))))
    if args.synth and args.synth_cases:
        import numpy as np

        from FINESegmentationLib.data.datasets import find_cases as find

        found = find(args.synth)
        picks = np.unique(np.round(np.linspace(0, len(found) - 1, args.synth_cases)).astype(int))
        for i in picks:
            case = found[i]
            out.append(("synthetic held-out", case.case_id,
                        lambda c=case: (read_volume(c.image), read_volume(c.label, kind="label"))))
    return out


def click_curve(volume, initial, target, n_clicks, apply):
    """Dice after 0..n_clicks simulated clicks; ``apply(clicks, labels, z, current)`` returns the new mask, or
    None for a refused click. Returns (curve, seconds per click, refused clicks)."""
    from FINESegmentationLib.refiner.clicks import deepest_click

    current = initial.copy()
    clicks: list[tuple[int, int, int]] = []
    labels: list[int] = []
    curve, seconds, refused = [dice(current, target)], [], 0
    for _ in range(n_clicks):
        click = deepest_click(current, target, volume.geometry.spacing)
        if click is None:
            curve.append(curve[-1])
            continue
        z, y, x = click.position
        clicks.append((x, y, z))
        labels.append(int(click.positive))
        start = time.perf_counter()
        mask = apply(clicks, labels, z, current)
        seconds.append(time.perf_counter() - start)
        if mask is None:
            refused += 1
        else:
            current = mask
        curve.append(dice(current, target))
    return curve, seconds, refused


def curve_litemedsam(predictor, volume, initial, target, n_clicks):
    """The click's slice with the earlier clicks on it, applied to the segment so far."""
    import numpy as np

    from FINESegmentationLib.errors import InputError

    def apply(clicks, labels, z, current):
        same = [n for n, c in enumerate(clicks) if c[2] == z]
        try:
            return predictor.predict(points=np.array([clicks[n] for n in same], float), labels=np.array([labels[n] for n in same]),
                                     previous_mask=current, point_space="ijk").mask
        except InputError:
            return None

    return click_curve(volume, initial, target, n_clicks, apply)


def curve_memorizing(predictor, volume, initial, target, n_clicks, use_memory, reach_mm, reach_factor):
    """Every click so far on FINE's segment (the old refiner refines existing segments only)."""
    import numpy as np

    if not initial.any():
        return [dice(initial, target)] * (n_clicks + 1), [], n_clicks
    predictor.set_volume(volume, initial)

    def apply(clicks, labels, z, current):
        return predictor.predict(np.array(clicks, float), np.array(labels), use_memory=use_memory, point_space="ijk",
                                 reach_mm=reach_mm, reach_factor=reach_factor).paste(initial)

    return click_curve(volume, initial, target, n_clicks, apply)


def curve_auto(slices, memorizing, volume, initial, target, n_clicks, reach_mm, reach_factor):
    """``fine-seg refine --refiner auto --seg FINE --points ALL``: every click so far on FINE's segment, by the refiner
    the shared rule picks for those clicks on that segment (the click-tuned LiteMedSAM or the Memorizing-SAM refiner
    with its memory, as the command loads them)."""
    import numpy as np

    from FINESegmentationLib.errors import InputError
    from FINESegmentationLib.refiner.choice import MEMORIZING_SAM, automatic_refiner

    ijk_to_ras = volume.geometry.ijk_to_ras()
    held = {"crop": False}

    def apply(clicks, labels, z, current):
        ras = [(ijk_to_ras @ np.array([*c, 1.0]))[:3] for c in clicks]
        refiner = automatic_refiner(initial, volume.geometry, box=False, points=ras, positive=np.array(labels, bool))
        try:
            if refiner == MEMORIZING_SAM:
                if not held["crop"]:
                    memorizing.set_volume(volume, initial)
                    held["crop"] = True
                return memorizing.predict(np.array(clicks, float), np.array(labels), use_memory=True, point_space="ijk",
                                          reach_mm=reach_mm, reach_factor=reach_factor).paste(initial)
            return slices.predict(points=np.array(clicks, float), labels=np.array(labels), previous_mask=initial, point_space="ijk").mask
        except InputError:  # refused (a click outside the refiner's crop, or on an empty slice): the segment stays
            return None

    return click_curve(volume, initial, target, n_clicks, apply)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-ct", default=str(REAL_CT), help="folder with ct.nii.gz and labels.nii.gz ('' to skip)")
    parser.add_argument("--synth", default=str(ROOT / "data" / "synth-val"), help="held-out synthetic dataset (nnU-Net layout)")
    parser.add_argument("--synth-cases", type=int, default=0, help="synthetic cases used, evenly spread (0: none)")
    parser.add_argument("--fine", default=None, help="FINE model for the starting segments (default: the registry's default)")
    parser.add_argument("--refiners", nargs="+", default=[r for r in REFINERS if r != "litemedsam-clicks+memory"], choices=REFINERS)
    parser.add_argument("--clicks-memory", default=None, help="memory file built over the click-tuned weights (litemedsam-clicks+memory)")
    parser.add_argument("--organs", nargs="+", default=None, help="organ names (default: all eight)")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--propagation", nargs="*", default=[], metavar="NAME=VALUE",
                        help="LiteMedSAM PropagationSettings changed from the defaults, e.g. skip_ignored_removal=true")
    parser.add_argument("--click-reach", type=float, default=None, metavar="MM",
                        help="Memorizing-SAM: how far from a click an answer changes the segment (default: fine-seg refine's; 0: the whole crop)")
    parser.add_argument("--click-reach-factor", type=float, default=None, metavar="F",
                        help="Memorizing-SAM: a click reaches F times its distance to the segment's border where farther (default: fine-seg refine's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import numpy as np
    import torch

    from bench_inference import machine
    from FINESegmentationLib.inference import Segmenter
    from FINESegmentationLib.io import write_text_atomically
    from FINESegmentationLib.labels import ORGANS
    from FINESegmentationLib.refiner.config import DEFAULT_REACH_FACTOR, DEFAULT_REACH_MM
    from FINESegmentationLib.refiner.litemedsam.predictor import PropagationSettings, SlicePredictor

    torch.set_num_threads(args.threads)
    reach = DEFAULT_REACH_MM if args.click_reach is None else args.click_reach or None
    factor = DEFAULT_REACH_FACTOR if args.click_reach_factor is None else args.click_reach_factor
    organs = [o for o in ORGANS if args.organs is None or o.name in args.organs]
    segmenter = Segmenter(args.fine)
    changed = {}
    for item in args.propagation:
        name, _, value = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(PropagationSettings)}:
            parser.error(f"--propagation: unknown setting '{name}'; name one of: "
                         f"{', '.join(f.name for f in dataclasses.fields(PropagationSettings))}")
        default = getattr(PropagationSettings(), name)
        changed[name] = value.lower() in ("1", "true", "yes", "on") if isinstance(default, bool) else type(default)(value)
    settings = dataclasses.replace(PropagationSettings(), **changed)
    slice_predictors = {}
    if "litemedsam-clicks" in args.refiners or "auto" in args.refiners:
        slice_predictors["litemedsam-clicks"] = SlicePredictor("litemedsam-clicks", settings=settings)
    if "litemedsam-clicks+memory" in args.refiners:
        slice_predictors["litemedsam-clicks+memory"] = SlicePredictor("litemedsam-clicks", memory=args.clicks_memory, settings=settings)
    if "litemedsam" in args.refiners:
        slice_predictors["litemedsam"] = SlicePredictor("litemedsam", settings=settings)
    memorizing = None
    if any(r.startswith("memorizing-sam") or r == "auto" for r in args.refiners):
        from FINESegmentationLib.refiner.predictor import RefinerPredictor

        memorizing = RefinerPredictor(None)
    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "fine": segmenter.model_name,
               "clicks": args.clicks, "propagation": changed,
               "click_reach_mm": reach, "click_reach_factor": factor, "cases": []}
    for group, case_id, load in cases(args):
        volume, reference = load()
        start = time.perf_counter()
        initial = segmenter.segment(volume).labels.array
        entry = {"group": group, "case": case_id, "fine_seconds": time.perf_counter() - start, "organs": {}}
        shared = None
        for name, predictor in slice_predictors.items():
            predictor.set_volume(volume)
            if shared is None:
                shared = predictor._embeddings
            else:
                predictor._embeddings = shared  # the same frozen image encoder: embed each slice once
        for organ in organs:
            target = reference.array == organ.label
            if not target.any():
                continue
            start_mask = initial == organ.label
            per = {}
            for refiner in args.refiners:
                if refiner == "auto":
                    curve, seconds, refused = curve_auto(slice_predictors["litemedsam-clicks"], memorizing, volume, start_mask, target,
                                                         args.clicks, reach, factor)
                elif refiner in slice_predictors:
                    curve, seconds, refused = curve_litemedsam(slice_predictors[refiner], volume, start_mask, target, args.clicks)
                else:
                    curve, seconds, refused = curve_memorizing(memorizing, volume, start_mask, target, args.clicks,
                                                               refiner.endswith("+memory"), reach, factor)
                per[refiner] = {"dice": curve, "median_click_s": float(np.median(seconds)) if seconds else None, "refused": refused}
                print(f"{group} {case_id} {organ.name:13s} {refiner:22s} " + " ".join(f"{d:.2f}" for d in curve), flush=True)
            entry["organs"][organ.name] = per
        results["cases"].append(entry)
    markdown = render(results, args.refiners)
    write_text_atomically(out / "click_curves.json", json.dumps(results, indent=1) + "\n")
    write_text_atomically(out / "click_curves.md", markdown)
    print(markdown)
    return 0


def render(results: dict, refiners: list[str]) -> str:
    import numpy as np

    lines = [f"Dice (%) after 0-{results['clicks']} clicks from FINE's segments ({results['fine']}, default settings), click n at "
             f"the deepest point of the largest 3-D error; {results['machine']['cpu']}, {results['date']}" +
             ("; LiteMedSAM propagation changed: " + ", ".join(f"{k} = {v}" for k, v in results["propagation"].items())
              if results.get("propagation") else "") +
             (f"; Memorizing-SAM answers change the segment within {results['click_reach_mm']:g} mm of a click"
              f" (or {results.get('click_reach_factor', 0):g} times its distance to the segment's border, if farther)"
              if results.get("click_reach_mm") else "; Memorizing-SAM answers change the whole crop" if "click_reach_mm" in results else "")
             + ".", ""]
    steps = [0, 1, 2, 3, 5, 10]
    steps = [s for s in steps if s <= results["clicks"]]
    for group in dict.fromkeys(c["group"] for c in results["cases"]):
        cases = [c for c in results["cases"] if c["group"] == group]
        lines += [f"**{group}** ({len(cases)} case{'s' if len(cases) > 1 else ''})", "",
                  "| refiner | organs | " + " | ".join(f"{s} clicks" for s in steps) + " | median s per click |",
                  "|---|---|" + "---|" * (len(steps) + 1)]
        for refiner in refiners:
            only_target = all(name in TARGET_ORGANS for c in cases for name in c["organs"])
            for label, names in (("spleen, kidneys, liver", TARGET_ORGANS),) + ((("all organs", None),) if not only_target else ()):
                curves = [o[refiner]["dice"] for c in cases for name, o in c["organs"].items()
                          if refiner in o and (names is None or name in names)]
                times = [o[refiner]["median_click_s"] for c in cases for o in c["organs"].values()
                         if refiner in o and o[refiner]["median_click_s"] is not None]
                if not curves:
                    continue
                mean = np.mean(np.array(curves), axis=0)
                timing = f" | {np.median(times):.2f} |" if times else " | - |"
                lines.append(f"| {refiner} | {label} | " + " | ".join(f"{100 * mean[s]:.1f}" for s in steps) + timing)
        shown = [s for s in (0, 1, 3, 5, 10) if s <= results["clicks"]]
        lines += ["", f"Per organ (Dice % at {' / '.join(map(str, shown))} clicks):", "",
                  "| organ | " + " | ".join(refiners) + " |", "|---|" + "---|" * len(refiners)]
        organ_names = list(dict.fromkeys(n for c in cases for n in c["organs"]))
        for name in organ_names:
            cells = []
            for refiner in refiners:
                curves = [c["organs"][name][refiner]["dice"] for c in cases if name in c["organs"] and refiner in c["organs"][name]]
                mean = np.mean(np.array(curves), axis=0)
                cells.append(" / ".join(f"{100 * mean[s]:.0f}" for s in shown))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
