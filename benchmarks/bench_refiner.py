"""Refiner benchmark: set_volume time and per-click latency, with and without memory, side by side.

On held-out phantoms (seed 2026, the demo's series, which neither the refiner nor its memory saw),
for every organ: ``set_volume`` of a predictor without memory and of one with the registered memory
(crop + encoder; with memory also the kNN search and the memory block's second pass), then
``--clicks`` clicks answered by each, timing every ``predict`` (prompt encoder + mask decoder +
resampling onto the input grid). Reports medians and the machine. Writes ``refiner.json`` and
``refiner.md`` into ``--out`` (default: this folder) and prints the markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="refiner (default: the registered one)")
    parser.add_argument("--cases", type=int, default=2, help="held-out phantoms")
    parser.add_argument("--in-plane", type=int, default=512, help="phantom matrix size (512 like BCV)")
    parser.add_argument("--clicks", type=int, default=10, help="clicks per organ and mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import numpy as np
    import torch

    from bench_inference import _cpu_busy_s, _own_cpu_s, machine
    from FINESegmentationLib.data.phantoms import PhantomGenerator
    from FINESegmentationLib.io import write_text_atomically
    from FINESegmentationLib.labels import ORGANS
    from FINESegmentationLib.refiner.clicks import next_click
    from FINESegmentationLib.refiner.evaluation import initial_mask
    from FINESegmentationLib.refiner.predictor import DEFAULT_MEMORY, RefinerPredictor

    torch.set_num_threads(args.threads)
    with_memory = RefinerPredictor(args.model, memory=DEFAULT_MEMORY)
    if not with_memory.has_memory:
        print("The refiner has no registered memory; nothing to compare.", file=sys.stderr)
        return 1
    without = RefinerPredictor((with_memory.model, with_memory.metadata), memory=None)
    runs = {"without": [], "with": []}
    set_volume = {"without": [], "with": []}
    effect = []
    click_parts = {"without": [], "with": []}
    parts = {"without": [], "with": []}
    generator = PhantomGenerator(seed=2026, in_plane=args.in_plane)
    shapes = []
    # One untimed warm-up, so that first-call allocations do not count.
    warm = generator.generate(0)
    without.set_volume(warm.image, warm.label.array == ORGANS[0].label)
    without.predict(np.zeros((0, 3)), [])
    busy0, own0, wall0 = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    for index in range(args.cases):
        case = generator.generate(index)
        shapes.append(list(case.image.shape[::-1]))
        for organ in ORGANS:
            target = case.label.array == organ.label
            if target.sum() < 50:
                continue
            start = initial_mask(case.label, organ.label, with_memory.config, np.random.default_rng([index, organ.label]))
            for name, predictor in (("without", without), ("with", with_memory)):
                predictor.set_volume(case.image, start)
                set_volume[name].append(predictor.timings["total_s"])
                parts[name].append(predictor.timings)
                if name == "with":
                    # How much the memory moves the image embedding, and whether it retrieved the same organ.
                    e0, e1 = predictor._embeddings[False], predictor._embeddings[True]
                    effect.append({"organ": organ.name, "crop_mm": round(predictor.crop.spacing, 2),
                                   "embedding_change": float((e1 - e0).norm() / e0.norm()),
                                   "same_organ_retrieved": sum(e["organ"] == organ.label for e in predictor.retrieved_examples())})
                rng = np.random.default_rng([index, organ.label, 1])
                box = predictor.box
                offset = np.array([box[2].start, box[1].start, box[0].start])
                current, points, labels = start, [], []
                for n in range(args.clicks):
                    click = next_click(current[box], target[box], n, rng, case.image.geometry.spacing)
                    if click is None:
                        break
                    points.append(offset + np.array(click.xyz))
                    labels.append(int(click.positive))
                    t0 = time.perf_counter()
                    result = predictor.predict(np.array(points, float), labels, previous_mask=current, point_space="ijk", use_memory=(name == "with"))
                    runs[name].append(time.perf_counter() - t0)
                    click_parts[name].append(result.timings)
                    current = result.paste(current)

    # Cores other processes kept busy meanwhile (from /proc/stat): timings on a shared CPU are slower.
    other_cores = ((_cpu_busy_s() - busy0) - (_own_cpu_s() - own0)) / (time.perf_counter() - wall0)

    def median_ms(values):
        return round(1000 * statistics.median(values), 1)

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "torch_threads": args.threads,
        "other_processes_cores": round(other_cores, 2),
        "refiner": with_memory.metadata.get("description", ""),
        "config": with_memory.config.to_dict(),
        "memory_examples": len(with_memory.memory),
        "phantoms": {"seed": 2026, "cases": args.cases, "in_plane": args.in_plane, "sizes_xyz": shapes},
        "clicks_timed": {k: len(v) for k, v in runs.items()},
        "set_volume_ms": {k: median_ms(v) for k, v in set_volume.items()},
        "set_volume_parts_ms": {k: {p: median_ms([t[p] for t in parts[k]]) for p in ("crop_s", "encode_s", "memory_s")} for k in parts},
        "click_ms": {k: median_ms(v) for k, v in runs.items()},
        "click_p90_ms": {k: round(1000 * float(np.percentile(v, 90)), 1) for k, v in runs.items()},
        "click_parts_ms": {k: {p: median_ms([t[p] for t in click_parts[k]]) for p in ("prompts_s", "decoder_s", "to_volume_s")} for k in click_parts},
        "memory_effect": {
            "median_embedding_change_percent": round(100 * statistics.median(e["embedding_change"] for e in effect), 2),
            "max_embedding_change_percent": round(100 * max(e["embedding_change"] for e in effect), 2),
            "retrieved_same_organ": f"{sum(e['same_organ_retrieved'] for e in effect)} of {len(effect) * with_memory.config.knn}",
            "per_organ": effect,
        },
    }
    m = report["machine"]
    md = "\n".join([
        f"Refiner latency ({with_memory.config.name}, {report['memory_examples']} memory examples, k = {with_memory.config.knn}), "
        f"{args.cases} held-out phantoms of {args.in_plane}x{args.in_plane} pixels, every organ, {args.clicks} clicks each; "
        f"{m['cpu']} ({m['cores']} cores), {args.threads} torch thread(s), other processes busy on {report['other_processes_cores']} "
        f"core(s) meanwhile, {report['date'][:10]}. Medians in ms.",
        "",
        "| | set_volume (crop + encoder [+ kNN + memory block]) | per click (median) | per click (90th percentile) |",
        "|---|---|---|---|",
        f"| without memory | {report['set_volume_ms']['without']} | {report['click_ms']['without']} | {report['click_p90_ms']['without']} |",
        f"| with memory | {report['set_volume_ms']['with']} | {report['click_ms']['with']} | {report['click_p90_ms']['with']} |",
        "",
        f"set_volume parts (median ms), without memory: crop {report['set_volume_parts_ms']['without']['crop_s']}, "
        f"encoder {report['set_volume_parts_ms']['without']['encode_s']}; with memory: crop {report['set_volume_parts_ms']['with']['crop_s']}, "
        f"encoder {report['set_volume_parts_ms']['with']['encode_s']}, kNN search + memory block {report['set_volume_parts_ms']['with']['memory_s']}.",
        f"Per click (median ms), without memory: clicks and previous mask into the crop {report['click_parts_ms']['without']['prompts_s']}, "
        f"prompt encoder + decoder {report['click_parts_ms']['without']['decoder_s']}, back onto the input grid {report['click_parts_ms']['without']['to_volume_s']}; "
        f"with memory: {report['click_parts_ms']['with']['prompts_s']}, {report['click_parts_ms']['with']['decoder_s']}, {report['click_parts_ms']['with']['to_volume_s']}.",
        "",
        f"Memory effect: the retrieved examples were of the same organ {report['memory_effect']['retrieved_same_organ']} times; "
        f"the memory changed the image embedding by {report['memory_effect']['median_embedding_change_percent']}% "
        f"(median; at most {report['memory_effect']['max_embedding_change_percent']}%, relative L2 norm).",
    ])
    write_text_atomically(out / "refiner.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(out / "refiner.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
