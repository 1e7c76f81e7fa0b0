"""LiteMedSAM before and after click fine-tuning: box-only and clicks-only Dice per organ, side by side.

On held-out slices of a labelled synthetic dataset (``--val-data``, ``--slices-per-organ`` slices per
organ and case, spread from each organ's first to its last slice) and on every organ-bearing slice of the
real CT (``--real-ct``: ct.nii.gz + labels.nii.gz, read with the project's reader and used in its own
array), the bundled LiteMedSAM and LiteMedSAM with the click weights (``--weights``) answer the same
prompts (:mod:`FINESegmentationLib.refiner.litemedsam.click_eval`): the organ's tight box alone; and
1, 3, 5 clicks alone, each at the deepest point of the largest error of the previous answer, with the
previous answer's logits as the mask prompt (SAM's loop) and, as a second variant, without them.
Dice on each slice's own grid. Embeddings are cached in ``--cache`` (reused across runs).

Writes ``litemedsam_clicks.json`` (every mean, the sample counts, the machine) and
``litemedsam_clicks.md`` into ``--out`` (default: this folder) and prints the markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

REAL_CT = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-data", required=True, help="held-out labelled synthetic dataset (nnU-Net layout)")
    parser.add_argument("--slices-per-organ", type=int, default=3, help="held-out slices per organ and case")
    parser.add_argument("--max-cases", type=int, default=10, help="held-out cases used, evenly spread over the dataset")
    parser.add_argument("--real-ct", default=str(REAL_CT), help="folder with ct.nii.gz and labels.nii.gz")
    parser.add_argument("--weights", default=None, help="click weights file or registered name (default: litemedsam-clicks)")
    parser.add_argument("--clicks", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--cache", default=str(ROOT / "benchmarks" / "tmp" / "litemedsam-cache"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import torch

    from bench_inference import machine
    from FINESegmentationLib.checkpoints import sha256_of
    from FINESegmentationLib.io import read_volume, write_text_atomically
    from FINESegmentationLib.refiner.litemedsam.build import load_litemedsam
    from FINESegmentationLib.refiner.litemedsam.click_eval import score_slices
    from FINESegmentationLib.refiner.litemedsam.click_weights import load_litemedsam_clicks
    from FINESegmentationLib.refiner.litemedsam.slice_cache import CacheSource, open_cache
    from FINESegmentationLib.refiner.litemedsam.training import dataset_cache

    torch.set_num_threads(args.threads)
    base, base_path = load_litemedsam()
    base_sha = sha256_of(base_path)
    tuned, tuned_path = load_litemedsam_clicks(args.weights)
    cache = Path(args.cache)
    real = Path(args.real_ct)
    real_source = CacheSource((real.name,), None, base_sha)
    datasets = {
        "synthetic held-out": dataset_cache(args.val_data, cache / Path(args.val_data).name, args.slices_per_organ, base, base_sha, True,
                                              args.max_cases),
        "real CT": open_cache(cache / real.name, real_source,
                              lambda: [(real.name, read_volume(real / "ct.nii.gz"), read_volume(real / "labels.nii.gz", kind="label"))], base),
    }
    models = {"LiteMedSAM": base, "click-tuned": tuned}
    results: dict = {"machine": machine(), "date": datetime.date.today().isoformat(), "weights": str(tuned_path),
                     "weights_sha256": sha256_of(tuned_path), "clicks": args.clicks, "datasets": {}}
    rows = [("box", 0, True)] + [("clicks", n, True) for n in args.clicks] + [("clicks", n, False) for n in args.clicks]
    for name, slice_cache in datasets.items():
        entry = {"samples": None, "models": {}}
        for label, model in models.items():
            with_mask = score_slices(model, slice_cache, slice_cache.samples, args.clicks, mask_prompt=True, progress=True)
            without = score_slices(model, slice_cache, slice_cache.samples, args.clicks, mask_prompt=False, progress=True)
            entry["samples"] = with_mask.counts()
            entry["models"][label] = {
                f"{protocol}{'' if n == 0 else f'_{n}'}{'' if mask or protocol == 'box' else '_no_mask_prompt'}":
                    {"per_organ": scores.organ_means(protocol, n), "mean": scores.mean(protocol, n)}
                for protocol, n, mask in rows for scores in [with_mask if mask else without]
            }
        results["datasets"][name] = entry
    markdown = render(results, args.clicks)
    write_text_atomically(out / "litemedsam_clicks.json", json.dumps(results, indent=1) + "\n")
    write_text_atomically(out / "litemedsam_clicks.md", markdown)
    print(markdown)
    return 0


def render(results: dict, clicks: list[int]) -> str:
    """One table per dataset: per organ, box-only and 1/3/5-click Dice (%) before -> after fine-tuning."""
    lines = [f"LiteMedSAM before -> after click fine-tuning ({Path(results['weights']).name}, sha256 {results['weights_sha256'][:12]}...), "
             f"Dice % on each slice's own grid; {results['machine']['cpu']}, {results['date']}.", ""]
    keys = ["box"] + [f"clicks_{n}" for n in clicks]
    heads = ["box only"] + [f"{n} click{'s' if n > 1 else ''}" for n in clicks]
    for name, entry in results["datasets"].items():
        before, after = entry["models"]["LiteMedSAM"], entry["models"]["click-tuned"]
        lines += [f"**{name}** (slices per organ in brackets)", "",
                  "| organ | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for organ, count in entry["samples"].items():
            cells = [f"{100 * before[k]['per_organ'][organ]:.1f} -> {100 * after[k]['per_organ'][organ]:.1f}" for k in keys]
            lines.append(f"| {organ} ({count}) | " + " | ".join(cells) + " |")
        lines.append("| **mean of organs** | " + " | ".join(f"**{100 * before[k]['mean']:.1f} -> {100 * after[k]['mean']:.1f}**" for k in keys) + " |")
        no_mask = ", ".join(f"{n}: {100 * before[f'clicks_{n}_no_mask_prompt']['mean']:.1f} -> {100 * after[f'clicks_{n}_no_mask_prompt']['mean']:.1f}" for n in clicks)
        lines += ["", f"Clicks without the previous mask as prompt (mean of organs, clicks {no_mask}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
