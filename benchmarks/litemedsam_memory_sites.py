"""Where LiteMedSAM's memory pays: each decoder attention against the encoder's last attention blocks, on synthetic CT.

Synthetic training volumes only (``--data``, default ``data/synth-train``); the real CT is not looked at.
Cases spread over the folder are split: the memory is built from the first ``--memory-cases`` (the middle
slice of each organ), the queries are the next ``--query-cases`` (``--slices-per-organ`` slices per organ
from its first to its last slice, a reference box 3 mm looser on each). One encoder pass per slice gives both
the tokens entering TinyViT's last stage and the embedding, so the variants share everything but the memory:

* each decoder site of :data:`...memory.SITES` (the memory read per prompt, the slice embedding unchanged);
* the encoder's last stage (2 window-attention blocks, 64 x 64 tokens of width 320): its last block, and both,
  attending to retrieved keys and values of the same examples (an 8 x 8 grid in the reference box, as in the
  decoder), fused by the same local ratio; the last stage and the neck then run once per prompt;
* for the chosen decoder site: local ratios 0.9-0.0, k = 1 and 8, and k = 3 examples drawn at random instead
  of the nearest (does the search matter?).

Writes ``litemedsam_memory_sites.json`` and ``.md`` into ``--out`` and prints the markdown.
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

from bench_litemedsam import NAMES, dice  # noqa: E402
from bench_litemedsam_memory import spread  # noqa: E402

ENCODER_VARIANTS = {"encoder: last block": (1,), "encoder: both last-stage blocks": (0, 1)}


class EncoderMemory:
    """TinyViT's last stage with memory attention in chosen blocks (a measurement device: the product keeps the
    encoder as published). Window attention stays as published; each window's queries also attend to every
    retrieved position, fused by the local ratio."""

    def __init__(self, model, local_ratio: float, grid: int) -> None:
        from FINESegmentationLib.refiner.memory import fuse, memory_attention

        self.encoder, self.local_ratio, self.grid = model.image_encoder, local_ratio, grid
        self.blocks = self.encoder.layers[3].blocks
        self.reads: dict = {}
        for j, block in enumerate(self.blocks):
            attention = block.attn

            def forward(x, attention=attention, j=j):
                b, n, _ = x.shape
                q, k, v = attention.qkv(attention.norm(x)).view(b, n, attention.num_heads, -1).split([attention.key_dim] * 3, dim=3)
                q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
                bias = attention.attention_biases[:, attention.attention_bias_idxs]
                out = ((q @ k.transpose(-2, -1)) * attention.scale + bias).softmax(dim=-1) @ v
                if j in self.reads:
                    queries = q.transpose(0, 1).reshape(1, attention.num_heads, b * n, attention.key_dim)
                    remembered = memory_attention(queries, self.reads[j]).reshape(attention.num_heads, b, n, attention.key_dim)
                    out = fuse(out, remembered.transpose(0, 1), self.local_ratio)
                return attention.proj(out.transpose(1, 2).reshape(b, n, attention.dh))

            attention.forward = forward

    def tokens(self, image):
        """The model input (1, 3, 256, 256) -> the tokens entering the last stage (1, 4096, 320)."""
        x = self.encoder.patch_embed(image)
        for layer in self.encoder.layers[:3]:
            x = layer(x)
        return x

    def finish(self, tokens, box=None):
        """Last stage and neck -> (embedding (1, 256, 64, 64), {block: (keys, values) (H, grid^2, d) in the box} if box)."""
        from FINESegmentationLib.refiner.litemedsam.memory import roi_sample

        kv, x = {}, tokens
        for j, block in enumerate(self.blocks):
            if box is not None:
                a = block.attn
                _, k, v = a.qkv(a.norm(x)).view(1, x.shape[1], a.num_heads, -1).split([a.key_dim] * 3, dim=3)
                kv[j] = [roi_sample(t[0].reshape(64, 64, -1).permute(2, 0, 1)[None], box, self.grid)[0]
                         .reshape(a.num_heads, a.key_dim, -1).transpose(1, 2) for t in (k, v)]
            x = block(x)
        return self.encoder.neck(x.view(1, 64, 64, -1).permute(0, 3, 1, 2)), kv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "synth-train"))
    parser.add_argument("--memory-cases", type=int, default=20)
    parser.add_argument("--query-cases", type=int, default=10)
    parser.add_argument("--slices-per-organ", type=int, default=3)
    parser.add_argument("--site", default="token_to_image.1", help="the decoder site whose ratio and k are varied")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import numpy as np
    import torch

    from bench_inference import machine
    from FINESegmentationLib.data.datasets import find_cases
    from FINESegmentationLib.io import read_volume, write_text_atomically
    from FINESegmentationLib.refiner.litemedsam.build import load_litemedsam
    from FINESegmentationLib.refiner.litemedsam.memory import (MIN_EXAMPLE_PIXELS, SITES, MemorySettings, descriptor, example_box,
                                                               example_slices, site_kv)
    from FINESegmentationLib.refiner.litemedsam.slices import SliceFrame, SliceInput
    from FINESegmentationLib.refiner.memory import ExternalMemory, RetrievedMemory

    torch.set_num_threads(1)
    settings = MemorySettings(site=args.site)
    model = load_litemedsam()[0]
    encoder = EncoderMemory(model, settings.local_ratio, settings.roi_grid)
    cases = spread(find_cases(args.data), args.memory_cases + args.query_cases)
    memory_cases, query_cases = cases[: args.memory_cases], cases[args.memory_cases:]

    def slices_of(case, choose, min_pixels):
        """(tokens, embedding, box, organ) per chosen (slice, organ) of a case; each slice encoded once."""
        image, label = read_volume(case.image), read_volume(case.label, kind="label")
        frame = SliceFrame.of(image)
        inputs = SliceInput.for_frame(frame)
        hu, labels = frame.to_frame(image.array), frame.to_frame(label.array)
        wanted: dict[int, list[int]] = {}
        for organ in NAMES:
            for z in choose(labels, organ):
                if (labels[z] == organ).sum() * float(np.prod(inputs.scale_xy)) >= min_pixels:
                    wanted.setdefault(int(z), []).append(organ)
        for z, organs in sorted(wanted.items()):
            with torch.inference_mode():
                tokens = encoder.tokens(inputs.image(hu[z]))
            for organ in organs:
                yield tokens, example_box(inputs, frame.spacing[:2], labels[z] == organ, settings.box_margin_mm), labels[z], organ, inputs

    start = time.perf_counter()
    stored: dict = {}  # variant -> (keys, values) lists
    descriptors, organs = [], []
    for case in memory_cases:
        for tokens, box, _, organ, _ in slices_of(case, lambda labels, organ: example_slices(labels, organ, 1), MIN_EXAMPLE_PIXELS):
            with torch.inference_mode():
                embedding, kv = encoder.finish(tokens, box)
            descriptors.append(descriptor(embedding, box)[0])
            organs.append(organ)
            for j, pair in kv.items():
                stored.setdefault(("encoder", j), ([], []))
                for part, t in zip(stored[("encoder", j)], pair):
                    part.append(t.half())
            for site in SITES:
                stored.setdefault(site, ([], []))
                for part, t in zip(stored[site], site_kv(model, embedding, box, site, settings.roi_grid)):
                    part.append(t.half())
    memory_s = time.perf_counter() - start
    descriptors = torch.stack(descriptors)
    memories = {key: ExternalMemory(descriptors, torch.stack(k), torch.stack(v), [{}] * len(k)) for key, (k, v) in stored.items()}
    generator = torch.Generator().manual_seed(0)

    def random_read(n):
        index = torch.randint(len(descriptors), (1, n), generator=generator)
        mem = memories[args.site]
        return RetrievedMemory(mem.keys[index].float(), mem.values[index].float(), torch.full((1, n), 1.0 / n), index, torch.zeros(1, n))

    decoder_variants = {site: (site, settings.local_ratio, settings.k) for site in SITES}
    for r in (0.9, 0.5, 0.3, 0.0):
        decoder_variants[f"{args.site}, r = {r}"] = (args.site, r, settings.k)
    for k in (1, 8):
        decoder_variants[f"{args.site}, k = {k}"] = (args.site, settings.local_ratio, k)
    decoder_variants[f"{args.site}, 3 random examples"] = (args.site, settings.local_ratio, "random")
    scores: dict[str, dict[int, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    same_organ = []

    def score(name, logits, target, organ, inputs, t):
        seconds.setdefault(name, []).append(time.perf_counter() - t)
        mask = inputs.to_slice(logits)[0].numpy() > 0
        scores.setdefault(name, {o: [] for o in NAMES})[organ].append(dice(mask, target))

    def spread_over_organ(labels, organ):
        return spread(list(np.nonzero((labels == organ).any((1, 2)))[0]), args.slices_per_organ)

    for case in query_cases:
        for tokens, box, labels, organ, inputs in slices_of(case, spread_over_organ, 32):
            target = labels == organ
            with torch.inference_mode():
                encoder.reads.clear()
                embedding, _ = encoder.finish(tokens)
                key = descriptor(embedding, box)
                _, nearest = memories[args.site].search(key, settings.k)
                same_organ.append(float(np.mean([organs[int(i)] == organ for i in nearest[0]])))
                t = time.perf_counter()
                score("without memory", model.decode(embedding, boxes=box[None])[0], target, organ, inputs, t)
                for name, (site, r, k) in decoder_variants.items():
                    t = time.perf_counter()
                    read = random_read(3) if k == "random" else memories[site].retrieve(descriptor(embedding, box), k)
                    score(name, model.decode(embedding, boxes=box[None], memory={site: (read, r)})[0], target, organ, inputs, t)
                for name, blocks in ENCODER_VARIANTS.items():
                    t = time.perf_counter()  # the last stage and the neck run again: part of the per-prompt cost
                    encoder.reads = {j: memories[("encoder", j)].retrieve(key, settings.k) for j in blocks}
                    changed, _ = encoder.finish(tokens)
                    score(name, model.decode(changed, boxes=box[None])[0], target, organ, inputs, t)
                encoder.reads.clear()

    rows = {}
    for name, per_organ in scores.items():
        row = {NAMES[o]: round(float(np.mean(v)), 4) for o, v in per_organ.items() if v}
        flat = [x for v in per_organ.values() for x in v]
        base = [x for v in scores["without memory"].values() for x in v]
        row["mean"] = round(float(np.mean(flat)), 4)
        row["better"] = int(sum(a > b + 1e-3 for a, b in zip(flat, base)))
        row["worse"] = int(sum(a < b - 1e-3 for a, b in zip(flat, base)))
        row["ms_per_prompt"] = round(1000 * statistics.median(seconds[name]), 1)
        rows[name] = row
    prompts = sum(len(v) for v in scores["without memory"].values())
    results = {
        "data": args.data, "memory_cases": [c.case_id for c in memory_cases], "query_cases": [c.case_id for c in query_cases],
        "memory_examples": len(descriptors), "prompts": prompts, "settings": settings.to_dict(), "memory_build_s": round(memory_s, 1),
        "same_organ": round(float(np.mean(same_organ)), 3), "dice": rows,
        "machine": f"{machine()['cpu']}, 1 torch thread", "date": datetime.date.today().isoformat(),
    }
    names = list(NAMES.values())
    lines = [f"Memory sites on synthetic CT: {len(descriptors)} examples from {len(memory_cases)} cases, {prompts} reference boxes on "
             f"{len(query_cases)} other cases; local ratio {settings.local_ratio}, k = {settings.k}, {settings.roi_grid} x "
             f"{settings.roi_grid} positions per example unless named; retrieved examples of the prompted organ: "
             f"{results['same_organ']:.0%}; {results['machine']}, {results['date']}.", "",
             "| variant | " + " | ".join(names) + " | mean | better / worse boxes | ms per prompt |", "|---|" + "---|" * (len(names) + 3)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.3f}" if n in row else "-" for n in names) +
                     f" | {row['mean']:.4f} | {row['better']} / {row['worse']} | {row['ms_per_prompt']:.0f} |")
    text = "\n".join(lines)
    write_text_atomically(out / "litemedsam_memory_sites.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(out / "litemedsam_memory_sites.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
