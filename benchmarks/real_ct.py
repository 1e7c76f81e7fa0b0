"""FINE models side by side on real CT, held-out synthetic anatomy and the old phantoms.

For each model (``--model NAME=MODEL``, a registered name or a checkpoint) and each data set:
Dice (%) and HD95 (mm) per organ, the mean over organs, the mean and the minimum of the
per-case mean Dice, and the share of each kidney's reference voxels labelled as the other
kidney. Held-out synthetic anatomy (a dataset whose root holds ``synth_info.json``,
{case_id: {"phase": ..., "fov": ..., ...}}) is also split by contrast phase and by field of
view. Every model runs as ``fine-seg segment`` runs it by default (what Segment in Slicer
runs: FINE, then refine-all), or as FINE alone with ``--fine-alone``; each ``--variant NAME=OPTIONS`` adds a run with options (comma-separated: fast, tta,
largest-component, no-largest-component, stateless, accumulate, refine-all, no-refine-all, nearest-labels, refine-every-slice, no-thin-slab), for every model or those of
``--variant-models``. Writes real_ct.json and real_ct.md into ``--out``, atomically.

    python benchmarks/real_ct.py --model old=fine-tiny-phantom --model new=runs/x/model.pt \\
        [--real DIR] [--synth DATA] [--phantoms DATA] [--variant product=tta,largest-component] [--out benchmarks]

``--real`` (default: ../shared/data/real-ct/ts-example-noncontrast beside the checkout) is a
folder holding ct.nii.gz and labels.nii.gz, or a dataset folder; ``--synth`` and ``--phantoms``
are dataset folders (nnU-Net / MSD or BCV layout).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))

from FINESegmentationLib.data.datasets import CaseFiles, find_cases  # noqa: E402
from FINESegmentationLib.errors import FINEError  # noqa: E402
from FINESegmentationLib.evaluation import SHORT, Evaluation, evaluate_cases  # noqa: E402
from FINESegmentationLib.inference import Segmenter  # noqa: E402
from FINESegmentationLib.io import write_text_atomically  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"
OPTIONS = {"fast": {"fast": True}, "tta": {"tta": True}, "no-tta": {"tta": False}, "largest-component": {"largest_component": True}, "no-largest-component": {"largest_component": False}, "stateless": {"bank": "stateless"},
           "accumulate": {"bank": "accumulate"}, "refine-all": {"refine_all": True},
           "no-refine-all": {"refine_all": False}, "nearest-labels": {"smooth_labels": False}, "refine-every-slice": {"refine_step_mm": 0.0},
           "no-thin-slab": {"thin_slab": False}}
GROUPINGS = ("phase", "fov")


def _named(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"give {what} as NAME=VALUE, not '{text}'")
    return name, value


def _variant(text: str) -> tuple[str, dict]:
    name, value = _named(text, "a variant")
    options: dict = {}
    for item in value.split(","):
        if item not in OPTIONS:
            raise argparse.ArgumentTypeError(f"unknown option '{item}' in variant {name}; use {', '.join(OPTIONS)}")
        options.update(OPTIONS[item])
    return name, options


def real_cases(folder: Path) -> list[CaseFiles]:
    """The image/label pair of a real CT folder (ct.nii.gz + labels.nii.gz), or a dataset folder's cases."""
    if (folder / "ct.nii.gz").is_file() and (folder / "labels.nii.gz").is_file():
        return [CaseFiles(folder.name, folder / "ct.nii.gz", folder / "labels.nii.gz")]
    return find_cases(folder)


def summary(e: Evaluation) -> dict:
    """The numbers one column of a table shows."""
    per_case = {c: v for c, v in e.case_means("dice").items() if not math.isnan(v)}
    worst = min(per_case, key=per_case.get) if per_case else None
    kidneys = ("right kidney", "left kidney")
    return {
        "cases": len(e.cases),
        "organs": {o.name: {m: e.organ_mean(o.name, m) for m in ("dice", "hd95", "swapped")} for o in ORGANS},
        "mean_dice": e.mean("dice"),
        "mean_hd95": e.mean("hd95"),
        "per_case_mean_dice": float(np.mean(list(per_case.values()))) if per_case else float("nan"),
        "min_case_dice": per_case[worst] if worst else float("nan"),
        "min_case": worst,
        "kidney_swaps": {k: e.organ_mean(k, "swapped") for k in kidneys},
        "cases_with_kidney_swaps": sum(1 for m in e.cases.values() if any(m.get(k, {}).get("swapped", 0) > 0 for k in kidneys)),
    }


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _mm(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.1f}"


def organ_table(columns: dict[str, dict]) -> list[str]:
    """Rows: organs and the summary lines; two columns (Dice %, HD95 mm) per model."""
    names = list(columns)
    rows = ["| Organ | " + " | ".join(f"{n} Dice % | {n} HD95 mm" for n in names) + " |",
            "|---" + "|---|---" * len(names) + "|"]
    for o in ORGANS:
        cells = [f"{_pct(columns[n]['organs'][o.name]['dice'])} | {_mm(columns[n]['organs'][o.name]['hd95'])}" for n in names]
        rows.append(f"| {o.name} | " + " | ".join(cells) + " |")
    rows.append("| mean over organs | " + " | ".join(f"{_pct(columns[n]['mean_dice'])} | {_mm(columns[n]['mean_hd95'])}" for n in names) + " |")
    rows.append("| per-case mean Dice | " + " | ".join(f"{_pct(columns[n]['per_case_mean_dice'])} | " for n in names) + " |")
    rows.append("| min per-case Dice (case) | " + " | ".join(
        f"{_pct(columns[n]['min_case_dice'])} ({columns[n]['min_case']}) | " for n in names) + " |")
    rows.append("| RKi as LKi / LKi as RKi (%) | " + " | ".join(
        f"{_pct(columns[n]['kidney_swaps']['right kidney'])} / {_pct(columns[n]['kidney_swaps']['left kidney'])} | "
        f"{columns[n]['cases_with_kidney_swaps']} case(s) with any" for n in names) + " |")
    return rows


def group_table(grouping: str, groups: dict[str, dict[str, dict]]) -> list[str]:
    """Rows: one per group and model; Dice % / HD95 mm per organ."""
    rows = [f"| {grouping} | cases | model | mean Dice | min case Dice | mean HD95 | "
            + " | ".join(SHORT[o.name] for o in ORGANS) + " |", "|---" * (6 + len(ORGANS)) + "|"]
    for value, columns in groups.items():
        for name, s in columns.items():
            organs = " | ".join(f"{_pct(s['organs'][o.name]['dice'])} / {_mm(s['organs'][o.name]['hd95'])}" for o in ORGANS)
            rows.append(f"| {value} | {s['cases']} | {name} | {_pct(s['mean_dice'])} | {_pct(s['min_case_dice'])} | "
                        f"{_mm(s['mean_hd95'])} | {organs} |")
    return rows


def _finite(x):
    """NaN -> None, so the JSON is standard."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, type=lambda t: _named(t, "a model"), metavar="NAME=MODEL",
                    help="a registered model name or a checkpoint, named for the tables (repeat for more models)")
    ap.add_argument("--variant", action="append", default=[], type=_variant, metavar="NAME=OPTIONS",
                    help=f"an extra run with options, comma-separated from: {', '.join(OPTIONS)}")
    ap.add_argument("--variant-models", nargs="+", default=None, metavar="NAME",
                    help="run the variants only for these models (default: every model)")
    ap.add_argument("--variants-only", action="store_true", help="run only the --variant runs, not each model's base run")
    ap.add_argument("--fine-alone", action="store_true",
                    help="the base run of every model is FINE alone (no refine-all) instead of the default pipeline")
    ap.add_argument("--real", default=str(DEFAULT_REAL), help="real CT: a folder with ct.nii.gz + labels.nii.gz, or a dataset")
    ap.add_argument("--synth", help="held-out synthetic anatomy: a dataset with synth_info.json at its root")
    ap.add_argument("--synth-cases", nargs="+", default=None, metavar="ID", help="only these case ids of --synth (default: all)")
    ap.add_argument("--phantoms", help="old phantoms: a dataset (fine-seg phantom output)")
    ap.add_argument("--max-cases", type=int, default=None, help="at most this many cases per data set (the first by id)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    except FINEError as exc:
        print(f"real_ct.py: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    datasets: list[tuple[str, str, list[CaseFiles], dict]] = []
    real = Path(args.real)
    if real.exists():
        datasets.append(("real", f"Real CT ({real.name})", real_cases(real), {}))
    elif args.real != str(DEFAULT_REAL):
        print(f"real_ct.py: error: the real CT folder {real} does not exist.", file=sys.stderr)
        return 2
    if args.synth:
        info_path = Path(args.synth) / "synth_info.json"
        if not info_path.is_file():
            print(f"real_ct.py: error: {args.synth} has no synth_info.json; give the held-out synthetic dataset.", file=sys.stderr)
            return 2
        info = json.loads(info_path.read_text())
        cases = find_cases(args.synth)
        if args.synth_cases:
            missing = sorted(set(args.synth_cases) - {c.case_id for c in cases})
            if missing:
                print(f"real_ct.py: error: {args.synth} has no case {', '.join(missing)}.", file=sys.stderr)
                return 2
            cases = [c for c in cases if c.case_id in args.synth_cases]
        datasets.append(("synth", f"Held-out synthetic anatomy ({Path(args.synth).name})", cases, info))
    if args.phantoms:
        datasets.append(("phantoms", f"Old phantoms ({Path(args.phantoms).name})", find_cases(args.phantoms), {}))
    if not datasets:
        print("real_ct.py: error: no data set to evaluate; give --real, --synth or --phantoms.", file=sys.stderr)
        return 2
    if args.max_cases:
        datasets = [(k, t, cases[: args.max_cases], info) for k, t, cases, info in datasets]

    unknown = sorted(set(args.variant_models or []) - {name for name, _ in args.model})
    if unknown:
        print(f"real_ct.py: error: --variant-models names no model {', '.join(unknown)}.", file=sys.stderr)
        return 2
    base = {"refine_all": False, "largest_component": False, "tta": False} if args.fine_alone else {}
    runs = [] if args.variants_only else [(name, model, "default", base) for name, model in args.model]
    runs += [(name, model, vname, {**base, **options}) for vname, options in args.variant for name, model in args.model
             if args.variant_models is None or name in args.variant_models]
    results: dict[str, dict[str, Evaluation]] = {key: {} for key, *_ in datasets}
    models, timings = {}, {}
    for name, model, vname, options in runs:
        column = name if vname == "default" else f"{name} {vname}"
        segmenter = Segmenter(model, device=args.device, **options)
        models[name] = {"model": model, "sha256": segmenter.model_sha256, "description": segmenter.info.description}
        for key, _, cases, _ in datasets:
            t0 = time.perf_counter()
            results[key][column] = evaluate_cases(segmenter, cases, name=column, progress=not args.quiet)
            timings[f"{key}: {column}"] = round(time.perf_counter() - t0, 1)
            print(f"{key}: {column}: mean Dice {results[key][column].mean('dice'):.4f} ({timings[f'{key}: {column}']} s)", flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    md = ["# FINE models on real CT, held-out synthetic anatomy and the old phantoms", "",
          "Models: " + "; ".join(f"{n} = {m['model']} (sha256 {str(m['sha256'])[:12]})" for n, m in models.items()) + ".",
          ("Each runs as FINE alone (`fine-seg segment --no-tta --no-largest-component --no-refine-all`: stateless bank, "
           "overlap 0.5, no TTA)" if args.fine_alone else
           "Each runs with the default `fine-seg segment` settings (stateless bank, overlap 0.5, TTA, the largest "
           "component of every organ but the pancreas, then refine-all: what Segment in Slicer runs)")
          + "".join(f"; `{v}` adds {', '.join(f'{k}={o}' for k, o in opts.items())}" for v, opts in args.variant) + ".",
          f"Machine: {machine}.", ""]
    report: dict = {"machine": machine, "models": models, "variants": dict(args.variant), "timings_s": timings, "datasets": {}}
    for key, title, cases, info in datasets:
        columns = {c: summary(e) for c, e in results[key].items()}
        md += [f"## {title}: {len(cases)} case(s)", "", *organ_table(columns), ""]
        entry = {"title": title, "case_ids": [c.case_id for c in cases], "summary": columns,
                 "cases": {c: e.cases for c, e in results[key].items()}, "groups": {}}
        for grouping in GROUPINGS if info else ():
            values = sorted({str(info.get(c.case_id, {}).get(grouping, "unknown")) for c in cases})
            groups = {v: {c: summary(e.subset([k.case_id for k in cases if str(info.get(k.case_id, {}).get(grouping, "unknown")) == v]))
                          for c, e in results[key].items()} for v in values}
            entry["groups"][grouping] = groups
            md += [f"By {grouping} (Dice % / HD95 mm per organ):", "", *group_table(grouping, groups), ""]
        report["datasets"][key] = entry
    md.append("Evaluation time (s): " + ", ".join(f"{k}: {v}" for k, v in timings.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "real_ct.json", json.dumps(_finite(report), indent=1))
    write_text_atomically(out / "real_ct.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
