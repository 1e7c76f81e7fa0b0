"""The real CT with contrast added to its labelled organs: a probe of the default pipeline on real anatomy in contrast phases.

The one real CT here is non-contrast; the held-out real set is portal-venous and arterial. This adds each phase's
typical enhancement over non-contrast (HU; the published ranges the synthetic generator's intensity table also
draws from: README, "Synthetic CT around real anatomy") to the real CT's labelled organs, softened over one voxel
at their borders (partial volume), and segments the three versions with ``fine-seg segment``'s defaults (FINE
alone too unless ``--default-only``). In the arterial phase the kidneys' outer 4 mm (the cortex) enhance more
than their inside (the medulla). Only the eight labelled organs change: the IVC, portal and renal veins and the
bowel wall stay unenhanced, which no real scan does, so this probes how FINE reads the organs' own contrast, not
the whole phase. Writes pseudo_contrast.md and .json into ``--out``.

    python benchmarks/pseudo_contrast.py [--real DIR] [--threads 2]
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
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))

from FINESegmentationLib.data.datasets import CaseFiles  # noqa: E402
from FINESegmentationLib.evaluation import evaluate_cases  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume, write_text_atomically, write_volume  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.volume import Volume  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"
# HU added to each organ over non-contrast: spleen, right kidney, left kidney, gallbladder, liver, stomach, aorta, pancreas.
PHASES = {
    "portal-venous": {1: 65.0, 2: 130.0, 3: 130.0, 4: 0.0, 5: 50.0, 6: 0.0, 7: 130.0, 8: 55.0},
    "arterial": {1: 70.0, 2: 40.0, 3: 40.0, 4: 0.0, 5: 20.0, 6: 0.0, 7: 250.0, 8: 70.0},
}
ARTERIAL_CORTEX = (150.0, 4.0)  # HU added to the kidneys' outer layer, and its depth in mm, in the arterial phase
SHORT = ["Sp", "RKi", "LKi", "Gb", "Li", "St", "Ao", "Pa"]


def enhanced(ct: Volume, labels: np.ndarray, phase: str) -> Volume:
    """``ct`` with ``phase``'s enhancement added inside each labelled organ, softened over one voxel."""
    added = np.zeros(ct.shape, np.float32)
    for value, hu in PHASES[phase].items():
        added[labels == value] = hu
    if phase == "arterial":
        hu, depth = ARTERIAL_CORTEX
        spacing = tuple(ct.geometry.spacing[::-1])
        for kidney in (2, 3):
            inside = labels == kidney
            added[inside & (ndimage.distance_transform_edt(inside, sampling=spacing) <= depth)] = hu
    added = ndimage.gaussian_filter(added, 0.5)
    return Volume((ct.array.astype(np.float32) + added).astype(np.float32), ct.geometry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=str(DEFAULT_REAL), help="folder with ct.nii.gz and labels.nii.gz")
    parser.add_argument("--default-only", action="store_true", help="the default pipeline only (not FINE alone)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them
    torch.set_num_threads(args.threads)
    real = Path(args.real)
    ct, labels = read_volume(real / "ct.nii.gz"), read_volume(real / "labels.nii.gz", kind="label")
    tmp = Path(tempfile.mkdtemp(prefix="pseudo_contrast_"))
    cases = [CaseFiles("non-contrast (as acquired)", real / "ct.nii.gz", real / "labels.nii.gz")]
    for phase in PHASES:
        path = write_volume(enhanced(ct, labels.array, phase), tmp / f"{phase}.nii.gz")
        cases.append(CaseFiles(f"{phase} (added)", path, real / "labels.nii.gz"))
    runs = {"default pipeline": {}} if args.default_only else {"FINE alone": {"refine_all": False}, "default pipeline": {}}
    results, seconds = {}, {}
    for run, options in runs.items():
        segmenter = Segmenter(**options)
        start = time.perf_counter()
        evaluation = evaluate_cases(segmenter, cases, progress=False)
        seconds[run] = round(time.perf_counter() - start, 1)
        results[run] = {c.case_id: {o: m["dice"] for o, m in evaluation.cases[c.case_id].items()} for c in cases}
        for c in cases:
            print(run, c.case_id, round(100 * float(np.mean(list(results[run][c.case_id].values()))), 1), flush=True)
    payload = {"model": segmenter.model_name, "sha256": segmenter.model_sha256, "phases_hu": PHASES,
               "arterial_cortex_hu_mm": ARTERIAL_CORTEX, "threads": args.threads,
               "machine": f"{platform.machine()}, torch {torch.__version__}", "seconds": seconds, "results": results}
    write_text_atomically(out / "pseudo_contrast.json", json.dumps(payload, indent=1) + "\n")
    md = ["# The real CT with contrast added to its organs", "",
          f"Model: {payload['model']} (sha256 {str(payload['sha256'])[:12]}); {payload['machine']}, {args.threads} thread(s); "
          "command: `python benchmarks/pseudo_contrast.py" + (" --default-only" if args.default_only else "") + "`.", "",
          "HU added per organ: " + "; ".join(f"{phase}: " + ", ".join(f"{SHORT[v - 1]} +{hu:g}" for v, hu in table.items())
                                              for phase, table in PHASES.items())
          + f"; arterial kidneys' outer {ARTERIAL_CORTEX[1]:g} mm +{ARTERIAL_CORTEX[0]:g}. Unlabelled tissue (veins, bowel wall) "
          "unchanged. Dice % against the TotalSegmentator labels.", "",
          "| run | version | mean | " + " | ".join(SHORT) + " |", "|---|---|---|" + "---|" * len(SHORT)]
    for run, per_case in results.items():
        for case, organs in per_case.items():
            md.append(f"| {run} | {case} | {100 * np.mean(list(organs.values())):.1f} | "
                      + " | ".join(f"{100 * organs[o.name]:.1f}" if o.name in organs else "-" for o in ORGANS) + " |")
    md += ["", "Seconds per run (three volumes): " + ", ".join(f"{k} {v}" for k, v in seconds.items())]
    write_text_atomically(out / "pseudo_contrast.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
