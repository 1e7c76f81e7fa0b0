"""Thin slabs: FINE on the model's grid against the thin-slab grid (half the slice spacing).

A scan shorter than ``THIN_SLAB_MM`` (60 mm) along the body is segmented on a grid of half the
model's slice spacing (``Segmenter(thin_slab=True)``, the default). This measures that rule, side by
side in one run, on:

* 39 mm slabs of the real CT (13 of its 3 mm slices, starting at slices 6, 12 and 16);
* 40 mm slabs cut from the held-out synthetic volumes that are not slabs themselves: one centred on
  the pancreas, one on the upper quarter of the right kidney (or the liver's middle);
* the held-out synthetic slabs thinner than 60 mm (as generated);
* with ``--whole``, the whole real CT and the held-out synthetic volumes that are not slabs, with the
  thin-slab grid forced on (FINE alone only), to show why the rule stops at 60 mm.

Each runs FINE alone (TTA, largest components: ``refine_all=False``) and, unless ``--fine-alone``, the
default pipeline (with refine-all). Dice % per case and organ against the reference. Writes
thin_slab.json and thin_slab.md into ``--out``.

    python benchmarks/thin_slab.py [--real DIR] [--synth DATA] [--whole] [--out benchmarks]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from FINESegmentationLib.data.datasets import CaseFiles, find_cases  # noqa: E402
from FINESegmentationLib.evaluation import evaluate_cases  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume, write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.preprocessing import THIN_SLAB_MM, axial_extent_mm  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"
REAL_STARTS = (6, 12, 16)
REAL_SLICES = 13
SLAB_MM = 40.0
PANCREAS, RIGHT_KIDNEY, LIVER = 8, 2, 5


def cut(image: sitk.Image, label: sitk.Image, start: int, n: int, stem: Path) -> CaseFiles:
    """Slices ``start .. start + n`` of an axial image and its labels, written beside ``stem``."""
    sitk.WriteImage(image[:, :, start:start + n], str(stem) + "_0000.nii.gz")
    sitk.WriteImage(label[:, :, start:start + n], str(stem) + ".nii.gz")
    return CaseFiles(stem.name, Path(str(stem) + "_0000.nii.gz"), Path(str(stem) + ".nii.gz"))


def synthetic_cuts(case: CaseFiles, folder: Path) -> list[CaseFiles]:
    """Two 40 mm slabs of a synthetic volume: centred on the pancreas, and on the upper quarter of the
    right kidney (or, without one, the liver's middle)."""
    image, label = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label))
    labels = sitk.GetArrayFromImage(label)
    n = int(round(SLAB_MM / image.GetSpacing()[2]))
    centres = []
    for value in (PANCREAS, RIGHT_KIDNEY, LIVER):
        zs = np.where((labels == value).any((1, 2)))[0]
        if len(zs):
            centres.append(int(zs.mean()) if value != RIGHT_KIDNEY else int(zs.max() - 0.25 * (zs.max() - zs.min())))
    out = []
    for i, centre in enumerate(centres[:2]):
        start = max(0, min(labels.shape[0] - n, centre - n // 2))
        out.append(cut(image, label, start, n, folder / f"{case.case_id}_cut{i}"))
    return out


def dice_table(results: dict[str, dict[str, dict]], columns: list[str]) -> list[str]:
    lines = ["| case | mm | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    cases = {cid: v for c in columns for cid, v in results[c]["cases"].items()}

    def cell(c: str, ids: list[str], bold: bool = False) -> str:
        v = [results[c]["cases"][i]["mean"] for i in ids if i in results[c]["cases"]]
        return "-" if len(v) < len(ids) else (f"**{np.mean(v):.1f}**" if bold else f"{np.mean(v):.1f}")

    for cid in cases:
        lines.append(f"| {cid} | {cases[cid]['mm']:.0f} | " + " | ".join(cell(c, [cid]) for c in columns) + " |")
    for group in dict.fromkeys(v["group"] for v in cases.values()):
        ids = [c for c, v in cases.items() if v["group"] == group]
        lines.append(f"| mean: {group} ({len(ids)}) | | " + " | ".join(cell(c, ids, True) for c in columns) + " |")
    return lines


def organ_table(results: dict[str, dict[str, dict]], columns: list[str], group: str) -> list[str]:
    lines = ["| organ | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for organ in ORGANS:
        row = []
        for c in columns:
            v = [m["organs"][organ.name] for m in results[c]["cases"].values() if m["group"] == group and organ.name in m["organs"]]
            row.append(f"{100 * np.mean(v):.1f}" if v else "-")
        lines.append(f"| {organ.name} | " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a registered model or checkpoint (default: the default model)")
    ap.add_argument("--real", default=str(DEFAULT_REAL), help="a folder with ct.nii.gz and labels.nii.gz")
    ap.add_argument("--synth", default=str(ROOT / "data" / "synth-val10"), help="held-out synthetic dataset (synth_info.json)")
    ap.add_argument("--whole", action="store_true", help="also the whole volumes with the thin-slab grid forced on")
    ap.add_argument("--fine-alone", action="store_true", help="FINE alone only (no default-pipeline runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs (tens of CPU-minutes), not after them
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="thin_slab_"))
    synth = Path(args.synth)
    info = json.loads((synth / "synth_info.json").read_text())
    real_image = sitk.ReadImage(str(Path(args.real) / "ct.nii.gz"))
    real_label = sitk.ReadImage(str(Path(args.real) / "labels.nii.gz"))
    cases: list[tuple[CaseFiles, str]] = [
        (cut(real_image, real_label, s, REAL_SLICES, tmp / f"real_slab{s}"), "real CT slabs") for s in REAL_STARTS]
    for c in find_cases(synth):
        if info[c.case_id]["fov"] == "slab":
            if info[c.case_id]["field_of_view_mm"][2] < THIN_SLAB_MM:
                cases.append((c, "synthetic slabs as generated"))
        else:
            cases += [(s, "synthetic 40 mm cuts") for s in synthetic_cuts(c, tmp)]
    if args.whole:
        cases.append((CaseFiles("real CT (whole)", Path(args.real) / "ct.nii.gz", Path(args.real) / "labels.nii.gz"), "whole volumes"))
        cases += [(c, "whole volumes") for c in find_cases(synth) if info[c.case_id]["fov"] != "slab"]
    runs = {"model grid, FINE alone": dict(refine_all=False, thin_slab=False),
            "thin-slab grid, FINE alone": dict(refine_all=False, thin_slab=True)}
    if not args.fine_alone:
        runs.update({"model grid, default": dict(thin_slab=False), "thin-slab grid, default": dict(thin_slab=True)})
    results: dict[str, dict] = {}
    timings = {}
    for name, options in runs.items():
        seg = Segmenter(args.model, **options)
        if options["thin_slab"]:  # forced on for the whole volumes too (they are longer than the threshold)
            spacing = seg.info.preprocessing.target_spacing
            seg.network_spacing = lambda volume, s=spacing: (float(s[0]), float(s[1]), float(s[2]) / 2.0)
        # Whole volumes: FINE alone only (the default pipeline's refine-all would take CPU-minutes each).
        chosen = [(c, g) for c, g in cases if g != "whole volumes" or options.get("refine_all", True) is False]
        t0 = time.perf_counter()
        evaluation = evaluate_cases(seg, [c for c, _ in chosen], progress=False)
        timings[name] = round(time.perf_counter() - t0, 1)
        results[name] = {"options": options, "cases": {}}
        for c, group in chosen:
            organs = {o: m["dice"] for o, m in evaluation.cases[c.case_id].items()}
            results[name]["cases"][c.case_id] = {
                "group": group, "mm": axial_extent_mm(read_volume(c.image)), "organs": organs,
                "mean": 100 * float(np.mean(list(organs.values()))) if organs else float("nan")}
        print(name, {g: round(float(np.mean([v["mean"] for v in results[name]["cases"].values() if v["group"] == g])), 1)
                     for g in dict.fromkeys(g for _, g in chosen)}, flush=True)
    seg_model = Segmenter(args.model, refine_all=False)
    payload = {"model": seg_model.model_name, "sha256": seg_model.model_sha256, "thin_slab_mm": THIN_SLAB_MM,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "timings_s": timings, "results": results}
    write_text_atomically(out / "thin_slab.json", json.dumps(payload, indent=1, default=float))
    columns = list(runs)
    md = [f"# Thin slabs: the model's grid against the thin-slab grid (half the slice spacing, below {THIN_SLAB_MM:.0f} mm)", "",
          f"Model: {payload['model']} (sha256 {str(payload['sha256'])[:12]}); {payload['machine']}; "
          f"command: `python benchmarks/thin_slab.py{' --whole' if args.whole else ''}{' --fine-alone' if args.fine_alone else ''}`.",
          "Mean Dice % over the organs in each case's reference; 'mm': the scan's length along the body. "
          "The thin-slab grid is forced on for the whole volumes (the rule itself leaves them on the model's grid).", ""]
    md += dice_table(results, columns)
    for group in dict.fromkeys(g for _, g in cases):
        md += ["", f"Per organ, {group}:", ""] + organ_table(results, columns, group)
    md += ["", "Seconds per run: " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    write_text_atomically(out / "thin_slab.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
