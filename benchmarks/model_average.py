"""FINE models alone and the average of their probabilities, side by side in one run.

Each model (``--model NAME=MODEL``, a registered name or a checkpoint) segments every case as FINE alone with
test-time augmentation (``fine-seg segment --no-largest-component --no-refine-all``); the average of the models'
probabilities on the CT's grid, then the argmax, is scored as ``average``. Dice (%) per organ, the mean over
organs and the mean of the per-case means, for each data set: the real CT (``--real``, a folder with ct.nii.gz
and labels.nii.gz) and any number of datasets (``--synth NAME=DIR``). Writes model_average.json and
model_average.md into ``--out``, atomically.

    python benchmarks/model_average.py --model sixth=fine-tiny-ct --model fp=runs/fine-tiny-ct-fp/model.pt \\
        --synth plain=SYNTH_VAL10 --synth fatty=SYNTH_FATTY --out benchmarks
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))

from FINESegmentationLib.data.datasets import find_cases  # noqa: E402
from FINESegmentationLib.evaluation import Evaluation, case_metrics  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import read_volume, write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"


def _named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"give NAME=VALUE, not '{text}'")
    return name, value


def _summary(cases: dict[str, dict]) -> dict:
    ev = Evaluation("", cases)
    organs = {o.name: ev.organ_mean(o.name, "dice") for o in ORGANS if any(o.name in m for m in cases.values())}
    return {"organs": organs, "mean_dice": ev.mean("dice"), "per_case_mean_dice": float(np.mean(list(ev.case_means().values())))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", type=_named, required=True, metavar="NAME=MODEL")
    ap.add_argument("--real", default=str(DEFAULT_REAL))
    ap.add_argument("--synth", action="append", type=_named, default=[], metavar="NAME=DIR")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    if len(args.model) < 2:
        ap.error("give at least two --model to average")
    if args.threads:
        torch.set_num_threads(args.threads)
    segmenters = {name: Segmenter(model, device="cpu", tta=True, largest_component=False, refine_all=False) for name, model in args.model}
    sets = {"real": [("real", Path(args.real) / "ct.nii.gz", Path(args.real) / "labels.nii.gz")]}
    for name, folder in args.synth:
        sets[name] = [(c.case_id, c.image, c.label) for c in find_cases(folder)]
    runs = list(segmenters) + ["average"]
    results: dict = {}
    start = time.perf_counter()
    for set_name, cases in sets.items():
        scores: dict[str, dict] = {r: {} for r in runs}
        for case_id, image, label in cases:
            ct, reference = read_volume(image), read_volume(label, kind="label")
            probs = {}
            for name, seg in segmenters.items():
                probs[name] = np.asarray(seg.segment(ct, probabilities=True).probabilities, np.float32)
            probs["average"] = np.mean([probs[n] for n in segmenters], axis=0)
            for r in runs:
                scores[r][case_id] = case_metrics(ct.with_array(probs[r].argmax(0).astype(np.uint8)), reference)
            print(f"{set_name} {case_id}", flush=True)
        results[set_name] = {"cases": {r: scores[r] for r in runs}, "summary": {r: _summary(scores[r]) for r in runs}}
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "models": {name: {"model": model, "sha256": seg.model_sha256} for (name, model), seg in zip(args.model, segmenters.values())},
        "seconds": round(time.perf_counter() - start, 1),
        "datasets": results,
    }
    md = ["# FINE models alone and the average of their probabilities", "",
          "Each model: FINE alone with test-time augmentation (no largest component, no refine-all); `average`: the mean of "
          "the models' probabilities on the CT's grid, then the argmax. Dice %.", "",
          "Models: " + ", ".join(f"{n} = {m['model']} (sha256 {m['sha256'][:12]})" for n, m in report["models"].items()) + ".",
          f"Machine: {report['machine']}; {report['seconds']} s.", ""]
    short = [o.name for o in ORGANS]
    for set_name, res in results.items():
        md += [f"## {set_name} ({len(sets[set_name])} case(s))", "",
               "| run | mean over organs | per-case mean | " + " | ".join(short) + " |",
               "|---|---|---|" + "---|" * len(short)]
        for r in runs:
            s = res["summary"][r]
            md.append(f"| {r} | {100 * s['mean_dice']:.1f} | {100 * s['per_case_mean_dice']:.1f} | "
                      + " | ".join(f"{100 * s['organs'][o]:.1f}" if o in s["organs"] else "-" for o in short) + " |")
        md.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "model_average.json", json.dumps(report, indent=1))
    write_text_atomically(out / "model_average.md", "\n".join(md) + "\n")
    print(f"Wrote {out / 'model_average.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
