"""Attention-map benchmark: time and peak memory of one map next to segmenting the same volume.

Each run (segment, attention map with the accumulate bank, attention map stateless) is a fresh
subprocess on the same synthetic CT, so each peak resident memory belongs to that run alone. The
model is the registered demo model (``fine-tiny-phantom``) unless ``--model`` says otherwise; the
point is the volume's centre; stage encoder0, block 1 (the defaults of ``fine-seg attention``).

Writes ``attention.json`` (raw numbers, machine) and ``attention.md`` into ``--out`` (default: this
folder) and prints the markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "FINESegmentation"))

from bench_inference import SPACING_XYZ, machine, synthetic_ct, wait_for_quiet, write_atomic  # noqa: E402

KINDS = ("segment", "attention-accumulate", "attention-stateless")


def worker(job: dict) -> dict:
    import resource

    import numpy as np
    import torch

    from FINESegmentationLib.attention import AttentionMapper
    from FINESegmentationLib.inference import Segmenter
    from FINESegmentationLib.volume import Geometry, Volume

    torch.set_num_threads(job["threads"])
    x, y, z = job["size"]
    volume = Volume(synthetic_ct((z, y, x), 0), Geometry(spacing=SPACING_XYZ))
    centre = (np.array(volume.shape[::-1]) - 1) / 2
    kind = job["kind"]
    if kind == "segment":
        runner = Segmenter(job["model"], device=job["device"], bank="accumulate", refine_all=False)
        run = lambda: runner.segment(volume)  # noqa: E731
    else:
        mapper = AttentionMapper(job["model"], device=job["device"], bank=kind.split("-")[1])
        run = lambda: mapper.compute(volume, centre, ijk=True)  # noqa: E731
    times = []
    result = None
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    out = {**job, "seconds": min(times), "all_seconds": times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if kind != "segment":
        out["shares"] = result.shares
        out["crops"] = result.report["crops"]
    else:
        out["crops"] = result.report["crops_per_pass"]
    if torch.cuda.is_available() and job["device"].startswith("cuda"):
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def stage_shares(model: str, seed: int, organ: int, figure: Path | None) -> dict:
    """Where the model looks, block by block: the shares of every stage and block on a phantom, from the
    centre of one organ (accumulate bank). Optionally writes the figure of the most far-reaching block."""
    import numpy as np

    from FINESegmentationLib.attention import AttentionMapper, write_figure
    from FINESegmentationLib.data.phantoms import PhantomGenerator

    case = PhantomGenerator(seed=seed).generate(0)
    voxels = np.argwhere(case.label.array == organ)
    ijk = voxels[len(voxels) // 2][::-1].astype(float)
    mapper = AttentionMapper(model, device="cpu", bank="accumulate")
    rows, best = [], None
    for stage in mapper.stage_names:
        for block in range(mapper.blocks_in(stage)):
            amap = mapper.compute(case.image, ijk, ijk=True, stage=stage, block=block)
            rows.append({"stage": stage, "block": block, **{k: round(v, 4) for k, v in amap.shares.items()},
                         "seconds": amap.report["timings_s"]["total"]})
            if best is None or amap.shares["outside_crop"] > best.shares["outside_crop"]:
                best = amap
    if figure is not None:
        write_figure(best, figure)
    return {"phantom_seed": seed, "organ": organ, "point_ras": list(best.point_ras), "rows": rows,
            "figure": None if figure is None else figure.name, "figure_stage": [best.stage, best.block]}


def run_job(job: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    others, _ = wait_for_quiet(job["quiet_wait_s"])
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**job, "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])}
    return {**json.loads(lines[-1][len("RESULT "):]), "other_cores_before": round(others, 2)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Attention map vs segmentation ({result['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB; device {result['device']}; model {result['model']}; "
        f"volume {'x'.join(map(str, result['size']))} voxels (x, y, z) at {SPACING_XYZ} mm; point at the centre; "
        "stage encoder0, block 1 (the defaults). Each row a fresh process; time is end to end (preprocessing to the map or labels "
        "on the input grid), the fastest of the repeats; peak memory is the process's peak resident set.",
        "",
        "| run | crops | time (s) | time / segment | peak memory (MB) | other processes' cores before |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    seg = next((r for r in result["runs"] if r["kind"] == "segment" and "error" not in r), None)
    shares = result.get("shares")
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['seconds'] / seg['seconds']:.2f}x" if seg else "—"
        crops = f"{r['crops']} + 1" if r["kind"] == "attention-accumulate" else (f"{r['crops']} x 2" if r["kind"] == "segment" else "1")
        lines.append(f"| {r['kind']} | {crops} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | {r.get('other_cores_before', '—')} |")
    if shares:
        lines += [
            "",
            f"## Where {result['model']} looks, block by block",
            "",
            f"Phantom seed {shares['phantom_seed']} case 0 (512 x 512), point at the centre of label {shares['organ']} "
            f"(RAS {', '.join(f'{v:.1f}' for v in shares['point_ras'])} mm), accumulate bank. Shares of the map's mass.",
            "",
            "| stage | block | local (own window) | crop (other windows) | volume tokens | outside the crop |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in shares["rows"]:
            lines.append(f"| {r['stage']} | {r['block']} | {100 * r['local']:.1f}% | {100 * r['crop']:.1f}% | "
                         f"{100 * r['volume']:.1f}% | {100 * r['outside_crop']:.1f}% |")
        if shares.get("figure"):
            lines += ["", f"Figure: `{shares['figure']}` ({shares['figure_stage'][0]} block {shares['figure_stage'][1]})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="512x512x256", help="x x y x z voxels")
    parser.add_argument("--model", default="fine-tiny-phantom")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for other processes to go quiet before each run")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--shares", action="store_true", help="also the shares of every stage and block on a phantom, and its figure")
    parser.add_argument("--phantom-seed", type=int, default=2026)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    size = [int(v) for v in args.size.lower().split("x")]
    runs = [run_job({"kind": k, "size": size, "model": args.model, "device": args.device, "threads": args.threads,
                     "repeats": args.repeats, "quiet_wait_s": args.quiet_wait}) for k in KINDS]
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "device": args.device, "model": args.model,
              "size": size, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.shares:
        result["shares"] = stage_shares(args.model, args.phantom_seed, 3, args.out / "attention_phantom.png")
    write_atomic(args.out / "attention.json", json.dumps(result, indent=2))
    text = markdown(result)
    write_atomic(args.out / "attention.md", text)
    print(text)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
