"""Where FINE looks, model by model: the attention-map shares of block 1 of every stage, from the centre of
the left kidney, on the phantom of `bench_attention.py --shares` and on the real CT.

Shares of the map's mass (README, "What the map is"): local (the point's own window), crop (the crop's other
windows), volume tokens, and the part outside the point's crop. Accumulate bank (the mechanism the map
follows). Writes ``attention_shares.json`` and ``attention_shares.md`` into ``--out``.
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
LEFT_KIDNEY = 3


def shares(mapper, image, ijk) -> list[dict]:
    rows = []
    for stage in mapper.stage_names:
        amap = mapper.compute(image, ijk, ijk=True, stage=stage, block=1)
        rows.append({"stage": stage, **{k: round(float(v), 4) for k, v in amap.shares.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL", help="repeat for more models")
    parser.add_argument("--phantom-seed", type=int, default=2026)
    parser.add_argument("--real-ct", default=str(REAL_CT))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import numpy as np
    import torch

    from bench_inference import machine
    from FINESegmentationLib.attention import AttentionMapper
    from FINESegmentationLib.data.phantoms import PhantomGenerator
    from FINESegmentationLib.io import read_volume, write_text_atomically

    torch.set_num_threads(args.threads)
    case = PhantomGenerator(seed=args.phantom_seed).generate(0)
    real = Path(args.real_ct)
    volumes = {f"phantom seed {args.phantom_seed}": (case.image, case.label.array),
               "real CT": (read_volume(real / "ct.nii.gz"), read_volume(real / "labels.nii.gz", kind="label").array)}
    result = {"machine": machine(), "date": datetime.date.today().isoformat(), "models": {}, "volumes": list(volumes)}
    for spec in args.model:
        name, model = spec.split("=", 1)
        mapper = AttentionMapper(model, device="cpu", bank="accumulate")
        result["models"][name] = {"model": model, "volumes": {}}
        for vname, (image, labels) in volumes.items():
            voxels = np.argwhere(labels == LEFT_KIDNEY)
            ijk = voxels[len(voxels) // 2][::-1].astype(float)
            result["models"][name]["volumes"][vname] = shares(mapper, image, ijk)
    lines = [f"Attention-map shares (%) of block 1 of every stage from the centre of the left kidney, accumulate bank; "
             f"{result['machine']['cpu']}, {result['date']}. Columns: local / crop / volume tokens / outside the crop.", ""]
    for vname in volumes:
        names = list(result["models"])
        lines += [f"**{vname}**", "", "| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        stages = [r["stage"] for r in result["models"][names[0]]["volumes"][vname]]
        for i, stage in enumerate(stages):
            cells = []
            for n in names:
                r = result["models"][n]["volumes"][vname][i]
                cells.append(" / ".join(f"{100 * r[k]:.1f}" for k in ("local", "crop", "volume", "outside_crop")))
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines.append("")
    write_text_atomically(out / "attention_shares.json", json.dumps(result, indent=1) + "\n")
    write_text_atomically(out / "attention_shares.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
