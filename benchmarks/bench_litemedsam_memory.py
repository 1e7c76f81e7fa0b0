"""LiteMedSAM with and without its Memorizing-SAM memory: box-only Dice per organ and the memory's CPU cost, in one run.

The memory (``--memory``, built by ``fine-seg refiner-memory --refiner litemedsam`` from the synthetic
training set) is never built from the data measured here:

(a) the real CT ``../shared/data/real-ct/ts-example-noncontrast`` (122 x 101 x 30 voxels at 3 mm, reference
    from TotalSegmentator): a reference box (3 mm looser, as refine-all draws it) on every slice of every
    organ, Dice per organ over the volume; and one box on each organ's middle slice propagated slice by slice
    (the predictor's defaults), the memory read on every slice drawn or not at all;
(b) held-out synthetic CT (``--synth``, default ``data/synth-val``, whose anatomy maps never appear in
    the training set): ``--synth-cases`` cases spread over the folder, ``--slices-per-organ`` slices per organ
    spread from its first to its last slice, a reference box on each; Dice per slice, averaged per organ;
(c) how often the retrieved examples are of the prompted organ, and the memory's file size;
(d) CPU time per prompt on an embedded slice, with and without memory (the search and the decoder), one
    torch thread, medians.

Both modes answer the same prompts on the same cached slice embeddings. Writes ``litemedsam_memory.json`` and
``litemedsam_memory.md`` into ``--out`` (default: this folder) and prints the markdown.
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

from bench_litemedsam import NAMES, dice, frame_corners_to_ijk  # noqa: E402

MODES = ("without", "with")


def spread(values, n: int) -> list:
    """n items evenly spread over a sequence, both ends included (all of them when there are fewer)."""
    import numpy as np

    if len(values) <= n:
        return list(values)
    return [values[i] for i in np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))]


def mean_row(scores: dict) -> dict:
    import numpy as np

    row = {NAMES[o]: round(float(np.mean(v)), 4) for o, v in sorted(scores.items()) if v}
    row["mean"] = round(float(np.mean(list(row.values()))), 4)
    return row


class Prompts:
    """Box prompts answered in both modes on a predictor's cached embeddings; records Dice, time and retrievals."""

    def __init__(self, predictor, memory) -> None:
        self.predictor, self.memory = predictor, memory
        self.seconds = {mode: [] for mode in MODES}
        self.search_s: list[float] = []
        self.same_organ: list[float] = []

    def answer(self, k: int, box, organ: int) -> dict:
        """{mode: mask (H, W)} for a box on frame slice k (its embedding computed first, outside the timings)."""
        import torch

        p = self.predictor
        embedding = p.embedding(k)
        t = time.perf_counter()
        retrieved = self.memory.retrieve(embedding, p.inputs.box(box)[0])
        self.search_s.append(time.perf_counter() - t)
        organs = [self.memory.memory.examples[int(i)]["organ"] for i in retrieved.indices[0]]
        self.same_organ.append(sum(o == organ for o in organs) / len(organs))
        masks = {}
        for mode in MODES:
            t = time.perf_counter()
            with torch.inference_mode():
                masks[mode] = p.predict_slice(k, box, use_memory=mode == "with").mask
            self.seconds[mode].append(time.perf_counter() - t)
        return masks


def real_ct(prompts: Prompts, ct, ref, margin_mm: float) -> dict:
    import numpy as np

    p = prompts.predictor
    fr = p.frame.to_frame(ref.array)
    per_slice = {mode: {} for mode in MODES}
    for o, name in NAMES.items():
        masks = {mode: np.zeros(fr.shape, bool) for mode in MODES}
        for k in np.nonzero((fr == o).any((1, 2)))[0]:
            for mode, mask in prompts.answer(int(k), p.enlarged_box(fr[k] == o, margin_mm), o).items():
                masks[mode][k] = mask
        for mode in MODES:
            per_slice[mode][name] = round(dice(masks[mode], fr == o), 4)
    propagated = {mode: {} for mode in MODES}
    for o, name in NAMES.items():
        zs = np.nonzero((fr == o).any((1, 2)))[0]
        k = int(zs[len(zs) // 2])
        box = frame_corners_to_ijk(p.frame, p.enlarged_box(fr[k] == o, 3.0), k)
        for mode in MODES:
            result = p.predict(box=box, point_space="ijk", use_memory=mode == "with")
            propagated[mode][name] = round(dice(result.mask, ref.array == o), 4)
    for table in (per_slice, propagated):
        for mode in MODES:
            table[mode]["mean"] = round(float(np.mean(list(table[mode].values()))), 4)
    return {"box_per_slice": per_slice, "propagation_from_middle_box": propagated}


def synthetic(prompts: Prompts, folder: str, n_cases: int, per_organ: int, margin_mm: float) -> dict:
    import numpy as np

    from FINESegmentationLib.data.datasets import find_cases
    from FINESegmentationLib.io import read_volume

    p = prompts.predictor
    scores = {mode: {o: [] for o in NAMES} for mode in MODES}
    cases = spread(find_cases(folder), n_cases)
    for case in cases:
        p.set_volume(read_volume(case.image))
        fr = p.frame.to_frame(read_volume(case.label, kind="label").array)
        for o in NAMES:
            for k in spread(list(np.nonzero((fr == o).any((1, 2)))[0]), per_organ):
                target = fr[k] == o
                for mode, mask in prompts.answer(int(k), p.enlarged_box(target, margin_mm), o).items():
                    scores[mode][o].append(dice(mask, target))
    return {"cases": [c.case_id for c in cases], "prompts": sum(len(v) for v in scores["without"].values()),
            "dice_per_slice": {mode: mean_row(scores[mode]) for mode in MODES}}


def table(title: str, rows: dict) -> list[str]:
    names = [n for n in list(NAMES.values()) + ["mean"] if n in rows["without"]]
    lines = [f"| {title} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for mode in MODES:
        lines.append(f"| {mode} memory | " + " | ".join(f"{rows[mode][n]:.3f}" for n in names) + " |")
    lines.append("| change | " + " | ".join(f"{rows['with'][n] - rows['without'][n]:+.3f}" for n in names) + " |")
    return lines


def markdown(results: dict) -> str:
    m, s = results["memory"], results["synthetic"]
    lines = [
        f"LiteMedSAM ({results['model']}) with and without memory ({m['examples']} examples, site {m['settings']['site']}, local ratio "
        f"{m['settings']['local_ratio']}, k = {m['settings']['k']}, {m['size_mb']} MB), {results['machine']}, {results['date']}.",
        "",
        "Real CT (ts-example-noncontrast), Dice per organ over the volume:",
        "",
        *table("reference box per slice", results["real_ct"]["box_per_slice"]),
        "",
        *table("one box, propagated", results["real_ct"]["propagation_from_middle_box"]),
        "",
        f"Held-out synthetic CT ({len(s['cases'])} cases of {results['synth_folder']}, {s['prompts']} boxes), Dice per slice:",
        "",
        *table("reference box per slice", s["dice_per_slice"]),
        "",
        f"Retrieved examples of the prompted organ: {results['same_organ_real']:.0%} on the real CT, "
        f"{results['same_organ_synthetic']:.0%} on the synthetic slices.",
        "",
        "| CPU per prompt (median ms) | search | whole prompt |",
        "|---|---|---|",
        f"| without memory | - | {results['prompt_ms']['without']:.0f} |",
        f"| with memory | {results['search_ms']:.1f} | {results['prompt_ms']['with']:.0f} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", required=True, help="LiteMedSAM memory file (fine-seg refiner-memory --refiner litemedsam)")
    parser.add_argument("--model", default=None, help="LiteMedSAM weights (registered name or file; default: the bundled ones); "
                        "the memory must have been built with them")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"))
    parser.add_argument("--synth", default=str(ROOT / "data" / "synth-val"), help="held-out synthetic CT (nnU-Net layout)")
    parser.add_argument("--synth-cases", type=int, default=10)
    parser.add_argument("--slices-per-organ", type=int, default=3)
    parser.add_argument("--margin-mm", type=float, default=3.0, help="reference boxes this much looser than the organ")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import numpy as np
    import torch

    from bench_inference import machine
    from FINESegmentationLib.io import read_volume, write_text_atomically
    from FINESegmentationLib.refiner.litemedsam.memory import SliceMemory
    from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor

    torch.set_num_threads(args.threads)
    memory = SliceMemory.load(args.memory)
    predictor = SlicePredictor(model=args.model, memory=memory, cache_slices=1000)
    prompts = Prompts(predictor, memory)
    data = Path(args.data)
    ct, ref = read_volume(data / "ct.nii.gz"), read_volume(data / "labels.nii.gz", kind="label")
    predictor.set_volume(ct)
    results = {"real_ct": real_ct(prompts, ct, ref, args.margin_mm)}
    same_real = float(np.mean(prompts.same_organ))
    prompts.same_organ.clear()
    results["synthetic"] = synthetic(prompts, args.synth, args.synth_cases, args.slices_per_organ, args.margin_mm)
    results.update({
        "synth_folder": args.synth,
        "model": args.model or "bundled weights",
        "same_organ_real": round(same_real, 3),
        "same_organ_synthetic": round(float(np.mean(prompts.same_organ)), 3),
        "memory": {"file": str(args.memory), "size_mb": round(Path(args.memory).stat().st_size / 2**20, 2), "examples": len(memory),
                   "settings": memory.settings.to_dict(), "built_from": memory.metadata.get("data"),
                   "slices_per_organ": memory.metadata.get("slices_per_organ")},
        "prompt_ms": {mode: round(1000 * statistics.median(prompts.seconds[mode]), 1) for mode in MODES},
        "search_ms": round(1000 * statistics.median(prompts.search_s), 2),
        "prompts_timed": len(prompts.search_s),
        "margin_mm": args.margin_mm,
        "machine": f"{machine()['cpu']}, {args.threads} torch thread(s)",
        "date": datetime.date.today().isoformat(),
    })
    text = markdown(results)
    write_text_atomically(out / "litemedsam_memory.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(out / "litemedsam_memory.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
