"""Inference benchmark: time and peak memory of whole-volume segmentation, side by side in one run.

Measured, each configuration x volume size in a fresh subprocess (so the peak resident memory of
that process belongs to that run alone):

1. FINE (``--config``, accumulate bank, ``--fast`` and default overlap) against volume size, with the
   log-log slope of time against voxel count;
2. FINE with memory tokens against the same network with tokens off (both stateless: the token
   overhead only);
3. FINE against MONAI's SwinUNETR on the same crop grid, preprocessing and postprocessing;
4. accumulate against stateless bank (the price of the second pass).

Writes ``inference.json`` (every raw number and the machine) and ``inference.md`` (tables) into
``--out`` and prints the markdown. Weights are random: no trained model exists yet, and the cost of
a forward pass does not depend on the weights. See ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Sizes of the synthetic CT volumes, (x, y, z) voxels at SPACING_XYZ mm.
SIZES_XYZ = ((128, 128, 64), (256, 256, 128), (384, 384, 192), (512, 512, 256))
SPACING_XYZ = (0.8, 0.8, 2.5)
# Grid the network sees, (x, y, z) mm: the demo model's for the CPU configs, BCV's for fine-base.
TARGET_SPACING_XYZ = {"fine-tiny": (3.0, 3.0, 6.0), "fine-small": (3.0, 3.0, 6.0), "fine-base": (0.758, 0.758, 3.0)}
WARMUP_SHAPE_ZYX = (48, 96, 96)
SEED = 20220517
# Targets (CPU targets are measured with --fast on the largest size).
CPU_TIME_S, CPU_PEAK_MB = 60.0, 4096.0
GPU_TIME_S, GPU_PEAK_MB = 3.0, 8192.0
TOKEN_OVERHEAD = 0.10
# Cores used by other processes during a timed run above which its timing is flagged.
CONTENTION_CORES = 0.25
WORKER_TIMEOUT_S = 1800


# ---------------------------------------------------------------- worker (one run, own process)

def synthetic_ct(shape_zyx: tuple[int, int, int], seed: int):
    """A CT-like float32 volume in HU: air outside a body ellipse of soft tissue with a fat rim,
    liver, spleen, contrast-filled kidneys and aorta, and a spine; Gaussian noise. Built slice by
    slice so generating it adds little to the peak memory beyond the volume itself."""
    import numpy as np

    nz, ny, nx = shape_zyx
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny, dtype=np.float32), np.linspace(-1, 1, nx, dtype=np.float32), indexing="ij")

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1

    body = ellipse(0, 0, 0.85, 0.65)
    inner = ellipse(0, 0, 0.78, 0.58)
    base = np.full((ny, nx), -1000.0, np.float32)
    base[body] = -100.0  # subcutaneous fat
    base[inner] = 40.0  # soft tissue
    base[ellipse(0.0, 0.42, 0.10, 0.09)] = 700.0  # vertebra
    base[ellipse(0.05, 0.22, 0.05, 0.05)] = 250.0  # aorta with contrast
    # Organs present over part of the z range, as fractions of the volume's length.
    organs = [
        (ellipse(-0.35, -0.05, 0.30, 0.25), 60.0, 0.15, 0.75),  # liver
        (ellipse(0.45, 0.10, 0.13, 0.15), 50.0, 0.30, 0.70),  # spleen
        (ellipse(-0.30, 0.30, 0.10, 0.13), 150.0, 0.40, 0.85),  # right kidney
        (ellipse(0.30, 0.30, 0.10, 0.13), 150.0, 0.40, 0.85),  # left kidney
        (ellipse(0.15, -0.25, 0.18, 0.12), 30.0, 0.25, 0.55),  # stomach
    ]
    volume = np.empty(shape_zyx, np.float32)
    noise_sd = np.where(body, 15.0, 5.0).astype(np.float32)
    for k in range(nz):
        t = k / max(1, nz - 1)
        s = volume[k]
        s[...] = base
        for mask, hu, lo, hi in organs:
            if lo <= t <= hi:
                s[mask & inner] = hu
        s += rng.standard_normal((ny, nx), dtype=np.float32) * noise_sd
    return volume


def _cpu_busy_s() -> float:
    """CPU seconds (all cores, user + system + ...) the whole machine has used since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def paired_token_overhead(job: dict, sync) -> dict:
    """Forward time of the network with and without memory tokens, alternating in one process on
    the same crop. Separate fresh processes differ by 10-25% in speed on this kind of machine, as
    much as the overhead itself; pairing the forwards in one process removes that spread."""
    import statistics

    import torch

    from FINESegmentationLib.inference import peak_rss_mb
    from FINESegmentationLib.model import build_model

    device = torch.device(job["device"])
    models = {
        "tokens": build_model(job["config"]).eval().to(device),
        "no_tokens": build_model(job["config"], window_tokens=False, volume_tokens=False).eval().to(device),
    }
    batch = 4 if device.type == "cuda" else 1  # the Segmenter's crops per batch
    x = torch.randn(batch, 1, *models["tokens"].config.crop_size, device=device)
    positions = torch.zeros(batch, 3, device=device)
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    times: dict[str, list[float]] = {name: [] for name in models}
    warmup = 3
    busy0, own0, t_start = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for i in range(warmup + job["pairs"]):
            order = list(models.items()) if i % 2 == 0 else list(models.items())[::-1]
            for name, model in order:
                sync()
                t0 = time.perf_counter()
                model(x, positions)
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    busy1, own1 = _cpu_busy_s(), _own_cpu_s()
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "forward_s_median": median,
        "forward_s": times,
        "token_overhead_network": median["tokens"] / median["no_tokens"] - 1,
        "own_cores": (own1 - own0) / wall,
        "other_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
        "peak_rss_mb": peak_rss_mb(),
        "total_s": wall,
    }


def worker(job: dict) -> dict:
    """Run one configuration on one volume size; return its numbers."""
    sys.path.insert(0, str(ROOT / "FINESegmentation"))
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    from monai.inferers import sliding_window_inference

    from FINESegmentationLib.checkpoints import ModelInfo, Preprocessing
    from FINESegmentationLib.inference import Segmenter, count_crops, peak_rss_mb
    from FINESegmentationLib.model import build_model
    from FINESegmentationLib.preprocessing import labels_to_input_grid, prepare
    from FINESegmentationLib.volume import Geometry, Volume

    torch.manual_seed(0)
    cuda = job["device"].startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(forward, clock: dict):
        """Wrap a forward so the seconds spent in the network add up in clock['s']."""
        def call(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            sync()
            clock["s"] += time.perf_counter() - t0
            clock["calls"] += 1
            return out
        return call

    if job["kind"] == "token-pair":
        return {**job, **paired_token_overhead(job, sync), "torch": torch.__version__, "threads": torch.get_num_threads()}

    tokens = job["kind"] != "fine-notokens"
    model = build_model(job["config"], window_tokens=tokens, volume_tokens=tokens)
    info = ModelInfo(config=model.config, preprocessing=Preprocessing(target_spacing=tuple(job["target_spacing"])))
    seg = Segmenter((model, info), device=job["device"], bank=job.get("bank", "stateless"), fast=job["fast"], refine_all=False, largest_component=False)
    net = {"s": 0.0, "calls": 0}
    geometry = Geometry(spacing=SPACING_XYZ)

    # A fixed small workload, the same in every run: its spread across runs shows contention.
    ref_model = build_model("fine-tiny").eval().to(seg.device)
    ref_x = torch.randn(1, 1, *ref_model.config.crop_size, device=seg.device)
    ref_pos = torch.zeros(1, 3, device=seg.device)
    ref_times = []
    with torch.inference_mode():
        for i in range(6):
            sync()
            t0 = time.perf_counter()
            ref_model(ref_x, ref_pos)
            sync()
            if i:
                ref_times.append(time.perf_counter() - t0)
    del ref_model, ref_x

    if job["kind"] == "swinunetr":
        from monai.networks.nets import SwinUNETR

        swin = SwinUNETR(in_channels=1, out_channels=info.config.num_classes, feature_size=12, spatial_dims=3)
        swin = swin.to(seg.device).eval()
        params = sum(p.numel() for p in swin.parameters())
        swin_forward = timed(swin, net)
        pre = info.preprocessing
        air = float((pre.clip[0] - pre.mean) / pre.std)

        def run(volume: Volume) -> dict:
            # Same preprocessing, crop grid, blending, stitching and postprocessing as the Segmenter.
            times = {}
            t0 = time.perf_counter()
            prepared = prepare(volume, pre)
            times["preprocess"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            image = torch.from_numpy(prepared.array)[None, None]
            with torch.inference_mode(), torch.autocast(seg.device.type, dtype=seg.autocast_dtype, enabled=seg.autocast_dtype is not None):
                out = sliding_window_inference(
                    image, info.config.crop_size, seg.sw_batch_size, lambda x: torch.softmax(swin_forward(x).float(), 1),
                    overlap=seg.overlap, mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=air,
                    sw_device=seg.device, device=seg.device,
                )
            probs = out[0].float().cpu().numpy()
            times["pass1"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            labels_to_input_grid(probs.argmax(0).astype(np.uint8), prepared, volume)
            times["postprocess"] = time.perf_counter() - t0
            return {"timings_s": times, "crops_per_pass": count_crops(prepared.array.shape, info.config.crop_size, seg.overlap),
                    "passes": 1, "network_shape_zyx": list(prepared.array.shape)}
    else:
        params = sum(p.numel() for p in seg.model.parameters())
        seg.model.forward = timed(seg.model.forward, net)

        def run(volume: Volume) -> dict:
            r = seg.segment(volume).report
            return {k: r[k] for k in ("timings_s", "crops_per_pass", "passes", "network_shape_zyx", "bank", "overlap", "precision")}

    warmup = Volume(synthetic_ct(WARMUP_SHAPE_ZYX, SEED + 1), geometry)
    t0 = time.perf_counter()
    run(warmup)
    warmup_s = time.perf_counter() - t0
    x, y, z = job["size_xyz"]
    volume = Volume(synthetic_ct((z, y, x), SEED), geometry)
    del warmup

    if cuda:
        torch.cuda.reset_peak_memory_stats(seg.device)
    rss_before = _rss_mb()
    repeats = []
    for _ in range(job["repeats"]):
        net["s"], net["calls"] = 0.0, 0
        busy0, own0 = _cpu_busy_s(), _own_cpu_s()
        t0 = time.perf_counter()
        detail = run(volume)
        total = time.perf_counter() - t0
        busy1, own1 = _cpu_busy_s(), _own_cpu_s()
        repeats.append({
            "total_s": total, "network_s": net["s"], "network_calls": net["calls"], **detail,
            # CPU use of this process and of everything else on the machine during the timed run.
            "own_cores": (own1 - own0) / total,
            "other_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / total,
        })
    best = min(repeats, key=lambda r: r["total_s"])
    result = {
        **job,
        "params": params,
        **best,
        "repeat_total_s": [r["total_s"] for r in repeats],
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "warmup_s": warmup_s,
        "reference_forward_s": sorted(ref_times)[len(ref_times) // 2],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(seg.device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(seg.device)
    return result


# ---------------------------------------------------------------- orchestration (light process)

def parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; write it as XxYxZ voxels, e.g. 256x256x128.")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def size_name(size: tuple[int, int, int] | list[int]) -> str:
    return "x".join(str(s) for s in size)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "ram_gb": ram_gb, "platform": platform.platform(), "python": platform.python_version()}
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def jobs_for(args) -> list[dict]:
    common = {"config": args.config, "device": args.device, "threads": args.threads, "repeats": args.repeats,
              "target_spacing": list(TARGET_SPACING_XYZ.get(args.config, (3.0, 3.0, 6.0)))}
    kinds = [
        ("fine", {"bank": "accumulate", "fast": True}),
        ("fine", {"bank": "accumulate", "fast": False}),
        ("fine", {"bank": "stateless", "fast": False}),
        ("fine-notokens", {"bank": "stateless", "fast": False}),
    ]
    swin_sizes = set(args.sizes) if args.quick or args.swin_sizes is None else set(args.swin_sizes)
    # Sizes in the outer loop: runs that are compared with each other run close together in time.
    jobs = [{"kind": "token-pair", "size_xyz": None, "pairs": 10 if args.quick else 40, **common}]
    for size in args.sizes:
        jobs += [{"kind": kind, "size_xyz": list(size), **common, **extra} for kind, extra in kinds]
        if size in swin_sizes:
            jobs.append({"kind": "swinunetr", "size_xyz": list(size), "fast": False, **common})
    return jobs


def wait_for_quiet(budget_s: float, threshold: float = 0.3, window_s: float = 2.0) -> tuple[float, float]:
    """Wait (at most ``budget_s``) until other processes use fewer than ``threshold`` cores.
    Returns (cores others used in the last window, seconds waited)."""
    t0 = time.perf_counter()
    while True:
        busy0 = _cpu_busy_s()
        time.sleep(window_s)
        others = (_cpu_busy_s() - busy0) / window_s  # this process sleeps: the rest is others'
        waited = time.perf_counter() - t0
        if others < threshold or waited >= budget_s:
            return others, waited


def run_job(job: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S, env=env)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**job, "error": " | ".join(tail) or f"exit status {proc.returncode}", "process_wall_s": wall}
    return {**json.loads(lines[-1][len("RESULT "):]), "process_wall_s": wall}


def label(run: dict) -> str:
    if run["kind"] == "swinunetr":
        return "SwinUNETR"
    if run["kind"] == "token-pair":
        return f"{run['config']} with / without tokens, paired forwards"
    name = run["config"] + (" (no tokens)" if run["kind"] == "fine-notokens" else "")
    return f"{name}, {run['bank']}" + (", --fast" if run.get("fast") else "")


def find(runs: list[dict], size, kind: str, bank: str | None = None, fast: bool | None = None) -> dict | None:
    for r in runs:
        if r["size_xyz"] == list(size) and r["kind"] == kind and "error" not in r \
                and (bank is None or r.get("bank") == bank) and (fast is None or r.get("fast") == fast):
            return r
    return None


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    import numpy as np

    x, y = zip(*points)
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def contended(*runs: dict | None) -> str:
    """A warning for a measurement taken while other processes used the machine."""
    return ", under contention: unreliable" if any(r and r["other_cores"] > CONTENTION_CORES for r in runs) else ""


def summarise(runs: list[dict], args) -> dict:
    sizes = [list(s) for s in args.sizes]
    voxels = {size_name(s): math.prod(s) for s in sizes}
    slopes = {}
    for fast in (True, False):
        pts = [(voxels[size_name(s)], r["total_s"]) for s in sizes if (r := find(runs, s, "fine", "accumulate", fast))]
        key = "fast" if fast else "default"
        slopes[key] = {"all_sizes": loglog_slope(pts), "sizes": len(pts),
                       "without_smallest": loglog_slope(pts[1:]) if len(pts) >= 3 else None}
        net_pts = [(voxels[size_name(s)], r["network_s"]) for s in sizes if (r := find(runs, s, "fine", "accumulate", fast))]
        slopes[key]["network_all_sizes"] = loglog_slope(net_pts)
    comparisons = []
    for s in sizes:
        st = find(runs, s, "fine", "stateless", False)
        row = {"size_xyz": s}
        if st:
            if (nt := find(runs, s, "fine-notokens")):
                row["token_overhead_total"] = st["total_s"] / nt["total_s"] - 1
                row["token_overhead_network"] = st["network_s"] / nt["network_s"] - 1
            if (ac := find(runs, s, "fine", "accumulate", False)):
                row["accumulate_over_stateless_total"] = ac["total_s"] / st["total_s"]
                row["accumulate_over_stateless_network"] = ac["network_s"] / st["network_s"]
            if (sw := find(runs, s, "swinunetr")):
                row["swinunetr_over_fine_total"] = sw["total_s"] / st["total_s"]
                row["swinunetr_over_fine_network"] = sw["network_s"] / st["network_s"]
        comparisons.append(row)
    largest = max(sizes, key=math.prod)
    targets = []
    fast_big = find(runs, largest, "fine", "accumulate", True)
    full_size = tuple(largest) == SIZES_XYZ[-1]
    on_gpu = args.device.startswith("cuda")
    where = f"{args.config}, --fast, accumulate, {size_name(largest)}"
    if on_gpu:
        targets.append({"target": f"CPU: --fast on 512x512x256 within {CPU_TIME_S:g} s and {CPU_PEAK_MB / 1024:g} GB",
                        "measured": "not measured: this run is on the GPU", "met": None})
    elif fast_big and full_size:
        targets.append({"target": f"CPU: --fast on 512x512x256 within {CPU_TIME_S:g} s ({where})",
                        "measured": f"{fast_big['total_s']:.1f} s" + contended(fast_big), "met": fast_big["total_s"] <= CPU_TIME_S})
        targets.append({"target": f"CPU: --fast on 512x512x256 within {CPU_PEAK_MB / 1024:g} GB peak memory ({where})",
                        "measured": f"{fast_big['peak_rss_mb']:.0f} MB", "met": fast_big["peak_rss_mb"] <= CPU_PEAK_MB})
    else:
        targets.append({"target": f"CPU: --fast on 512x512x256 within {CPU_TIME_S:g} s and {CPU_PEAK_MB / 1024:g} GB",
                        "measured": "not measured: 512x512x256 not in --sizes", "met": None})
    tok = next((c for c in reversed(comparisons) if "token_overhead_network" in c), None)
    pair = next((r for r in runs if r["kind"] == "token-pair" and "error" not in r), None)
    if pair:
        measured = f"{pair['token_overhead_network']:+.1%} (paired forwards, median)"
        if tok:
            measured += (f"; separate whole-volume runs at {size_name(tok['size_xyz'])}: network {tok['token_overhead_network']:+.1%}, "
                         f"end to end {tok['token_overhead_total']:+.1%}")
        targets.append({"target": f"token overhead <= {TOKEN_OVERHEAD:.0%} (network time, {pair['config']})",
                        "measured": measured + contended(pair), "met": pair["token_overhead_network"] <= TOKEN_OVERHEAD})
    elif tok:
        targets.append({"target": f"token overhead <= {TOKEN_OVERHEAD:.0%} (network time, stateless, {size_name(tok['size_xyz'])})",
                        "measured": f"{tok['token_overhead_network']:+.1%} (end to end {tok['token_overhead_total']:+.1%})"
                        + contended(find(runs, tok["size_xyz"], "fine", "stateless", False), find(runs, tok["size_xyz"], "fine-notokens")),
                        "met": tok["token_overhead_network"] <= TOKEN_OVERHEAD})
    gpu_target = f"GPU: fine-base, bf16, --fast on 512x512x256 within {GPU_TIME_S:g} s and {GPU_PEAK_MB / 1024:g} GB"
    if not on_gpu:
        targets.append({"target": gpu_target, "measured": "not measured: no GPU in this session", "met": None})
    elif args.config != "fine-base" or not (fast_big and full_size):
        targets.append({"target": gpu_target, "measured": "not measured: needs --config fine-base and 512x512x256", "met": None})
    else:
        gb = fast_big.get("peak_gpu_mb", float("nan"))
        targets.append({"target": gpu_target, "measured": f"{fast_big['total_s']:.2f} s, {gb:.0f} MB GPU ({fast_big.get('precision')})",
                        "met": fast_big["total_s"] <= GPU_TIME_S and gb <= GPU_PEAK_MB})
    ok = [r for r in runs if "error" not in r]
    refs = [r["reference_forward_s"] for r in ok if "reference_forward_s" in r]
    others = [r["other_cores"] for r in ok]
    contention = {
        "reference_forward_s_min": min(refs) if refs else None,
        "reference_forward_s_max": max(refs) if refs else None,
        "other_cores_max": max(others) if others else None,
        "other_cores_mean": sum(others) / len(others) if others else None,
    }
    # Other processes' CPU time is the evidence. The reference workload is shown but not used:
    # on a quiet machine it already varies by up to 50% between fresh processes.
    contention["observed"] = bool(others) and max(others) > CONTENTION_CORES
    return {"slopes": slopes, "comparisons": comparisons, "targets": targets, "contention": contention}


def _fmt(v, spec: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def markdown(result: dict) -> str:
    m, runs, s, a = result["machine"], result["runs"], result["summary"], result["settings"]
    cores = f"{m['cores']} core{'s' if m['cores'] != 1 else ''}"
    lines = [
        "# Inference benchmark",
        "",
        f"Run {result['date']} on {m['cpu']}, {cores} (torch threads: {a['threads']}), {m['ram_gb']} GB RAM, "
        f"device `{a['device']}`, torch {result.get('torch', '?')}, MONAI {result.get('monai', '?')}, "
        f"Python {m['python']}, commit {m.get('git_commit', '?')}. Whole benchmark: {result['wall_s']:.0f} s.",
        "",
        f"**Weights are random** (no trained model exists yet; the cost does not depend on the weights). "
        f"Inputs are synthetic CT-like volumes (HU, body ellipse with organs, bone and noise) at "
        f"{' x '.join(f'{v:g}' for v in SPACING_XYZ)} mm (x, y, z), resampled to the network grid of "
        f"{' x '.join(f'{v:g}' for v in a['target_spacing'])} mm. Each row is one fresh process: one warm-up "
        f"segmentation of a {'x'.join(str(v) for v in WARMUP_SHAPE_ZYX[::-1])} volume, then {a['repeats']} timed "
        "segmentation(s) of the same volume, end to end (preprocessing + sliding windows + postprocessing, no file IO); "
        "the fastest counts. "
        "Peak memory is the process's peak resident set (Python, torch, model and input volume included).",
        "",
        f"## Time and memory against volume size ({a['config']}, accumulate bank)",
        "",
        "| size (x,y,z) | voxels (M) | network grid (z,y,x) | overlap | crops x passes | total s | preprocess s | pass 1 s "
        "| pass 2 s | postprocess s | network s | network ms per crop | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fast in (True, False):
        for r in runs:
            if r["kind"] != "fine" or r.get("bank") != "accumulate" or r.get("fast") != fast:
                continue
            name = size_name(r["size_xyz"]) + (" --fast" if fast else "")
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} |" + " |" * 11)
                continue
            t = r["timings_s"]
            forwards = r["crops_per_pass"] * r["passes"]
            lines.append(
                f"| {name} | {math.prod(r['size_xyz']) / 1e6:.1f} | {'x'.join(map(str, r['network_shape_zyx']))} | {r['overlap']:g} "
                f"| {r['crops_per_pass']} x {r['passes']} | {r['total_s']:.2f} | {t['preprocess']:.2f} | {t['pass1']:.2f} "
                f"| {t.get('pass2', 0):.2f} | {t['postprocess']:.2f} | {r['network_s']:.2f} | {1000 * r['network_s'] / forwards:.0f} "
                f"| {r['peak_rss_mb']:.0f} |"
            )
    lines.append("")
    for key, sl in s["slopes"].items():
        extra = f"; without the smallest size {_fmt(sl['without_smallest'])}" if sl["without_smallest"] is not None else ""
        lines.append(
            f"Log-log slope of time against voxel count ({key} overlap, {sl['sizes']} sizes): end to end "
            f"**{_fmt(sl['all_sizes'])}**{extra}; network time alone {_fmt(sl['network_all_sizes'])} "
            "(1 = linear).  "
        )
    lines += [
        "",
        "The crops are whole steps of the crop grid, so the crop count (and the time) grows in steps rather than "
        "exactly with the voxel count; the smallest size is a single crop padded to the crop size.",
        "",
        "## Comparisons (default overlap 0.5, same crop grid)",
        "",
        "| size (x,y,z) | run | crops x passes | total s | network s | peak MB | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if (r["kind"] == "fine" and r.get("fast")) or r["kind"] == "token-pair":
            continue
        name = size_name(r["size_xyz"])
        if "error" in r:
            lines.append(f"| {name} | {label(r)}: failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {label(r)} | {r['crops_per_pass']} x {r['passes']} | {r['total_s']:.2f} | {r['network_s']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['params'] / 1e6:.2f}M |")
    lines += [
        "",
        "| size (x,y,z) | token overhead: tokens / no tokens - 1 (network; end to end) | accumulate / stateless (network; end to end) "
        "| SwinUNETR / FINE stateless (network; end to end) |",
        "|---|---|---|---|",
    ]

    def pair(c: dict, key: str, pct: bool) -> str:
        n, t = c.get(f"{key}_network"), c.get(f"{key}_total")
        if n is None:
            return "—"
        return f"{n:+.1%}; {t:+.1%}" if pct else f"{n:.2f}x; {t:.2f}x"

    for c in s["comparisons"]:
        lines.append(f"| {size_name(c['size_xyz'])} | {pair(c, 'token_overhead', True)} | {pair(c, 'accumulate_over_stateless', False)} "
                     f"| {pair(c, 'swinunetr_over_fine', False)} |")
    for r in runs:
        if r["kind"] == "token-pair" and "error" not in r:
            med = r["forward_s_median"]
            lines += ["", f"Token overhead measured in one process, {r['pairs']} alternating forwards of the same crop each "
                      f"(median): {r['config']} with tokens {1000 * med['tokens']:.1f} ms, without {1000 * med['no_tokens']:.1f} ms: "
                      f"**{r['token_overhead_network']:+.1%}**. Separate processes differ in speed by as much as the overhead, "
                      "so this paired number is the one the target is judged on."]
    lines += [
        "",
        "SwinUNETR is MONAI's (`feature_size=12`, 9 classes), run through the same preprocessing, "
        "`sliding_window_inference` (Gaussian blending, same overlap and padding), softmax, argmax and resampling "
        "back to the input grid. FINE without tokens runs stateless (it has no volume tokens).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in s["targets"]:
        met = "—" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    c = s["contention"]
    lines += ["", "## Contention", ""]
    if c["reference_forward_s_min"] is not None:
        lines.append(
            f"Every process first timed the same fixed workload (one fine-tiny forward, median of 5): "
            f"{1000 * c['reference_forward_s_min']:.0f} to {1000 * c['reference_forward_s_max']:.0f} ms across processes "
            "(fresh processes differ in speed even on a quiet machine). "
            f"Other processes on the machine used on average {c['other_cores_mean']:.2f} cores "
            f"(at most {c['other_cores_max']:.2f}) during the timed runs. "
            + ("**Contention observed: timings may be inflated.**" if c["observed"] else "No significant contention observed.")
        )
        waited = sum(r.get("waited_s", 0.0) for r in runs)
        if waited > 0:
            lines[-1] += (f" Before the runs, the benchmark waited {waited:.0f} s in all (at most {a['max_wait_s']:g} s) "
                          "for other processes to go quiet.")
        busy = [r for r in runs if "error" not in r and r["other_cores"] > CONTENTION_CORES]
        if busy:
            lines += ["", f"Timed runs during which other processes used more than {CONTENTION_CORES:g} cores: " + "; ".join(
                f"{size_name(r['size_xyz']) + ' ' if r['size_xyz'] else ''}{label(r)} ({r['other_cores']:.2f} cores, own {r['own_cores']:.2f})" for r in busy) + "."]
    failed = [r for r in runs if "error" in r]
    if failed:
        lines += ["", f"**{len(failed)} run(s) failed**; see `inference.json`."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(SIZES_XYZ), metavar="XxYxZ",
                        help="volume sizes in voxels, x y z (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the smallest size only")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder for inference.json and inference.md")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--config", default="fine-tiny", choices=sorted(TARGET_SPACING_XYZ), help="FINE model config (default: fine-tiny)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--swin-sizes", nargs="*", type=parse_size, default=[SIZES_XYZ[1], SIZES_XYZ[3]], metavar="XxYxZ",
                        help="sizes (among --sizes) that also run SwinUNETR; none to skip it (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed segmentations per process; the fastest counts (default: 2)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds in all to wait for other processes to go quiet before runs (default: %(default)s; 0 with --quick)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.sizes, args.repeats = [min(args.sizes, key=math.prod)], 1
    args.sizes = sorted({tuple(s) for s in args.sizes}, key=math.prod)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    runs = []
    jobs = jobs_for(args)
    wait_left = 0.0 if args.quick else args.max_wait
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {size_name(job['size_xyz']) + ': ' if job['size_xyz'] else ''}{label({**job, 'bank': job.get('bank')})} ...", end=" ", file=sys.stderr, flush=True)
        others, waited = wait_for_quiet(wait_left) if wait_left > 0 else (None, 0.0)
        wait_left -= waited
        run = {**run_job(job), "other_cores_before": others, "waited_s": waited}
        runs.append(run)
        print(f"failed: {run['error']}" if "error" in run else f"{run['total_s']:.2f} s, {run['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
    ok = [r for r in runs if "error" not in r]
    result = {
        "benchmark": "inference",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": ok[0]["torch"] if ok else None,
        "monai": _version("monai"),
        "numpy": _version("numpy"),
        "SimpleITK": _version("SimpleITK"),
        "weights": "random (no trained model exists yet; timing does not depend on the weights)",
        "settings": {"config": args.config, "device": args.device, "threads": args.threads,
                     "target_spacing": list(TARGET_SPACING_XYZ[args.config]), "input_spacing": list(SPACING_XYZ),
                     "sizes_xyz": [list(s) for s in args.sizes], "warmup_shape_zyx": list(WARMUP_SHAPE_ZYX), "seed": SEED,
                     "repeats": args.repeats, "quick": args.quick, "max_wait_s": args.max_wait},
        "runs": runs,
    }
    result["summary"] = summarise(runs, args)
    result["wall_s"] = time.perf_counter() - start
    md = markdown(result)
    write_atomic(args.out / "inference.json", json.dumps(result, indent=2) + "\n")
    write_atomic(args.out / "inference.md", md)
    print(md)
    return 1 if len(ok) < len(runs) else 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
