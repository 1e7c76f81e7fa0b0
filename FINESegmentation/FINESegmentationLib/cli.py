"""``fine-seg``: the command-line front end of the FINESegmentation engine.

Every subcommand is a thin layer over the engine API. Errors a user can cause end
in one sentence on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .cli_arguments import Number, NumberList, Parser
from .cli_clicks import add_litemedsam_train
from .cli_refine import add_refiner_commands
from .errors import FINEError

# nnFormer's published size on Synapse (Zhou et al., nnFormer, Table of model complexity).
NNFORMER_PUBLISHED_PARAMS_M = 150.5


def _cmd_configs(args: argparse.Namespace) -> int:
    import torch

    from .model import CONFIGS, build_model
    from .model.complexity import network_attention_cost

    names = args.names or list(CONFIGS)
    rows = []
    for name in names:
        for label, wt, vt in (("FINE (window + volume tokens)", True, True), ("window tokens only", True, False), ("no tokens (nnFormer-like)", False, False)):
            model = build_model(name, window_tokens=wt, volume_tokens=vt).eval()
            cfg = model.config
            params = sum(p.numel() for p in model.parameters())
            cost = network_attention_cost(cfg)
            shape = "-"
            seconds = float("nan")
            if args.forward:
                torch.manual_seed(0)
                x = torch.randn(1, cfg.in_channels, *cfg.crop_size)
                positions = torch.zeros(1, 3)
                start = time.perf_counter()
                with torch.inference_mode():
                    out = model(x, positions)
                seconds = time.perf_counter() - start
                shape = "x".join(str(s) for s in out.logits.shape)
            rows.append((name, label, params, cost["eq2_macs"], cost["exact_macs"], shape, seconds))
    print(f"{'config':<11} {'tokens':<31} {'params':>9} {'eq.2 GMAC':>10} {'exact GMAC':>11} {'forward out':>17} {'time':>7}")
    for name, label, params, eq2, exact, shape, seconds in rows:
        t = f"{seconds:6.2f}s" if seconds == seconds else "      -"
        print(f"{name:<11} {label:<31} {params / 1e6:8.2f}M {eq2 / 1e9:10.2f} {exact / 1e9:11.2f} {shape:>17} {t}")
    print(f"(nnFormer, published on Synapse: {NNFORMER_PUBLISHED_PARAMS_M}M parameters.)")
    print("eq.2 / exact: attention cost of all blocks for one crop, in multiply-accumulates (see README).")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .checkpoints import read_registry

    registry = read_registry()
    if not registry:
        print("No models are registered.")
    refiners = {**read_registry(kind="refiner"), **read_registry(kind="refiner-memory"), **read_registry(kind="refiner-2d")}
    for entry in [*registry.values(), *refiners.values()]:
        state = "present" if entry.path.is_file() else "missing"
        kind = "" if entry.kind == "fine" else f"[{entry.kind}] "
        print(f"{entry.name:<24} {state:<8} sha256 {entry.sha256[:12]}...  {kind}{entry.description}")
    return 0


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; a folder is one DICOM series, or else every image file inside it, or else one DICOM
    series found in its subfolders (the one with the most files)."""
    from .errors import InputError
    from .io import dicom_series_ids, find_dicom_series

    cases: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise InputError(f"{item} does not exist; give a CT file (NIfTI, NRRD, MHA) or a DICOM folder.")
        if path.is_dir() and not dicom_series_ids(path):
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_IMAGE_SUFFIXES) and not p.name.lower().endswith(".seg.nrrd"))
            if found:
                cases.extend(found)
            elif find_dicom_series(path):  # an export's patient / study / series folders: one CT
                cases.append(path)
            else:
                raise InputError(f"The folder {item} holds neither a DICOM series (in it or its subfolders) nor image files (.nii.gz, .nrrd, .mha).")
        else:
            cases.append(path)
    return cases


def _output_paths(cases: list[Path], output: str | None, extension: str) -> list[Path]:
    from .errors import InputError

    from .io import SEGMENTATION_WRITE_EXTENSIONS

    # -o names a file when it ends in an output extension (one input only), else a folder.
    if output and output.lower().endswith(SEGMENTATION_WRITE_EXTENSIONS) and not Path(output).is_dir():
        if len(cases) > 1:
            raise InputError(f"{len(cases)} inputs need an output folder, not the file {output}.")
        return [Path(output).expanduser()]
    folder = Path(output).expanduser() if output else Path.cwd()
    if output and not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"Cannot create the output folder {folder} ({exc.strerror}); choose a folder you can write to.") from None
    from .io import case_name

    targets = [folder / f"{case_name(c)}{extension}" for c in cases]
    if len(set(targets)) != len(targets):
        raise InputError("Two inputs have the same name, so their outputs would overwrite each other; rename one of them.")
    return targets


class _ProgressBar:
    """tqdm over both passes: 'pass 1/2' while the bank fills, then 'pass 2/2'."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled, self.bar, self.total_done = name, enabled, None, 0

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            # disable=None: no bar when stderr is not a terminal (logs, CI).
            self.bar = tqdm(total=p.passes * p.crops, desc=self.name, unit="crop", file=sys.stderr, dynamic_ncols=True, disable=None)
        done = (p.pass_index - 1) * p.crops + p.crop
        self.bar.set_postfix_str(f"pass {p.pass_index}/{p.passes}, crop {p.crop}/{p.crops}")
        self.bar.update(done - self.total_done)
        self.total_done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SliceBar:
    """tqdm over the slices refine-all redraws."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled, self.bar = name, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.name, unit="slice", file=sys.stderr, dynamic_ncols=True, disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _largest_component_switch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only each organ's largest connected component: every organ (default: every organ but the "
                   "pancreas, which is often found in pieces); --no-largest-component: keep every component")


def _refine_all_switch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine-all", action=argparse.BooleanOptionalAction, default=None,
                   help="after FINE, redraw every organ slice by slice with LiteMedSAM from its own boxes (the default, "
                   "off with --fast; about 1-2 s per slice with organs on a CPU, see README); --no-refine-all: FINE alone")
    p.add_argument("--refine-step", type=float, default=None, metavar="MM",
                   help="refine-all on slices thinner than this embeds slices at most MM apart and interpolates the "
                   "answers in between (default 3 mm; 0: every slice)")
    p.add_argument("--refine-margin", type=Number(at_least=0), default=None, metavar="MM",
                   help="refine-all enlarges each organ's box on a slice by MM around FINE's voxels there before LiteMedSAM "
                   "is asked (default 8 mm, measured in README; 0: FINE's own box)")
    p.add_argument("--refine-rounds", default=None, metavar="ROUNDS",
                   help="how often refine-all asks LiteMedSAM per organ and slice, each round with the box around the "
                   "previous answer and FINE's voxels: a number for every organ and organ:number for single organs, "
                   "comma-separated (for example 2,pancreas:1; default: the rounds measured in README)")


def _cmd_segment(args: argparse.Namespace) -> int:
    import json

    from .io import case_name

    from .inference import Segmenter

    cases = _expand_inputs(args.inputs)
    extension = ".seg.nrrd" if args.format == "seg.nrrd" else ".nii.gz"
    outputs = _output_paths(cases, args.output, extension)
    segmenter = Segmenter(model=args.model, device=args.device, bank=args.bank, fast=args.fast, tta=args.tta,
                          largest_component=args.largest_component, sw_batch_size=args.sw_batch_size, refine_all=args.refine_all,
                          refine_step_mm=args.refine_step, refine_margin_mm=args.refine_margin,
                          refine_box_rounds=args.refine_rounds)
    reports, failures = [], 0
    for case, target in zip(cases, outputs):
        probs = target.with_name(case_name(target) + "_probabilities.nii.gz") if args.probabilities else None
        bar = _ProgressBar(case_name(case), not args.quiet)
        refine_bar = _SliceBar(f"{case_name(case)} refine-all", not args.quiet and segmenter.refine_all)
        try:
            result = segmenter.segment_file(case, target, probabilities_path=probs, progress=bar, refine_progress=refine_bar)
        except FINEError as exc:
            bar.close()
            refine_bar.close()
            if len(cases) == 1:
                raise
            print(f"fine-seg: error: {case}: {exc}", file=sys.stderr)
            failures += 1
            continue
        bar.close()
        refine_bar.close()
        reports.append(result.report)
        t = result.report["timings_s"]
        refined = result.report.get("refine_all")
        refined = (f", refine-all {refined['slices']} slices ({refined['embedded']} embedded) in {refined['total_s']:.1f} s"
                   if refined else "")
        thin = (" on the thin-slab grid " + " x ".join(f"{v:g}" for v in result.report["network_spacing_xyz"]) + " mm"
                if result.report.get("thin_slab") else "")
        print(f"{case} -> {target}  ({t['total']:.1f} s on {result.report['device']}, {result.report['bank']} bank, "
              f"{result.report['crops_per_pass']} crops x {result.report['passes']} pass(es){thin}{refined})")
    if args.report:
        from .io import write_text_atomically

        write_text_atomically(args.report, json.dumps(reports[0] if len(cases) == 1 else reports, indent=2))
    return 1 if failures else 0


def _cmd_attention(args: argparse.Namespace) -> int:
    import json

    from .attention import LEVELS, AttentionMapper, write_figure
    from .io import IMAGE_WRITE_EXTENSIONS, case_name, check_output_path, read_volume, write_text_atomically, write_volume

    check_output_path(args.output, IMAGE_WRITE_EXTENSIONS)
    if args.png:
        check_output_path(args.png, (".png", ".pdf", ".svg"))
    if args.report:
        check_output_path(args.report, (".json",))
    volume = read_volume(args.input, kind="image")
    mapper = AttentionMapper(args.model, device=args.device, bank=args.bank, fast=args.fast)
    bar = _ProgressBar(case_name(Path(args.input)), not args.quiet)
    try:
        amap = mapper.compute(volume, args.point, ijk=args.ijk, stage=args.stage, block=args.block, levels=args.levels, progress=bar)
    finally:
        bar.close()
    out = Path(args.output)
    written = []
    try:
        written.append(write_volume(amap.heat, out))
        if args.levels:
            for name in LEVELS:
                written.append(write_volume(amap.levels[name], out.with_name(f"{case_name(out)}_{name}.nii.gz")))
        if args.png:
            written.append(write_figure(amap, args.png))
        if args.report:
            report = {**amap.report, "input": str(args.input), "point_ras": amap.point_ras, "point_ijk": amap.point_ijk,
                      "crop_center_ras": amap.crop_center_ras, "crop_size_mm": amap.crop_size_mm,
                      "cell_weights": amap.cell_weights.round(5).tolist(), "outputs": [str(p) for p in written]}
            written.append(write_text_atomically(args.report, json.dumps(report, indent=2)))
    except BaseException:
        for p in written:  # all or nothing
            Path(p).unlink(missing_ok=True)
        raise
    s = amap.shares
    print(f"{args.input} -> {out}  ({amap.report['timings_s']['total']:.1f} s, {amap.stage} block {amap.block}, {amap.bank} bank): "
          f"local {100 * s['local']:.1f}%, crop {100 * s['crop']:.1f}%, volume {100 * s['volume']:.1f}%; "
          f"{100 * s['outside_crop']:.1f}% outside the point's crop")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .data.phantoms import write_dataset

    write_dataset(args.out, args.cases, args.seed, in_plane=args.in_plane, first_index=args.first_index, progress=not args.quiet)
    print(f"Wrote {args.cases} synthetic abdominal CT phantom(s) with labels to {args.out} (nnU-Net / MSD layout).")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import time

    from .data.synth import write_synth_dataset

    start = time.perf_counter()
    write_synth_dataset(
        args.out, args.cases, args.seed, anatomy_dir=args.anatomy, split=args.split, phases=args.phase,
        fovs=args.fov, in_plane=args.in_plane, max_slices=args.max_slices, first_index=args.first_index,
        progress=not args.quiet, fatty_pancreas=args.fatty_pancreas,
    )
    print(f"Wrote {args.cases} synthetic CT case(s) around the {args.split} anatomy maps to {args.out} "
          f"(nnU-Net layout, synth_info.json) in {time.perf_counter() - start:.0f} s.")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainSettings, train

    settings = TrainSettings(
        data=args.data, out=args.out, config=args.config, window_tokens=not args.no_window_tokens,
        volume_tokens=not (args.no_volume_tokens or args.no_window_tokens), epochs=args.epochs,
        iterations=args.iterations, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, seed=args.seed, device=args.device,
        target_spacing=tuple(args.target_spacing), bank_probability=args.bank_probability, augment=args.augment, fov_extent=args.fov_extent,
        fov_probability=args.fov_probability, label_map=args.label_map,
        validation_cases=args.hold_out or [], resume=args.resume, init=args.init, progress=not args.quiet, description=args.description,
    )
    path = train(settings)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        from .checkpoints import sha256_of

        print(f"Trained model: {path} (sha256 {sha256_of(path)})")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from .checkpoints import average_checkpoints

    digest = average_checkpoints(args.models, args.out, args.description)
    print(f"Averaged model: {args.out} (sha256 {digest})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, markdown_table, per_case_csv
    from .inference import Segmenter
    from .io import write_text_atomically

    segmenter = Segmenter(model=args.model, device=args.device, bank=args.bank, fast=args.fast,
                          largest_component=args.largest_component, tta=args.tta, refine_all=args.refine_all,
                          refine_step_mm=args.refine_step, refine_margin_mm=args.refine_margin,
                          refine_box_rounds=args.refine_rounds)
    result = evaluate(segmenter, args.data, args.cases, args.label_map, name=args.name, progress=not args.quiet)
    print(markdown_table([result]))
    if result.swaps():
        print(result.swaps())
    if result.missed:
        print(f"({result.missed} organ(s) present in the reference were missed entirely: Dice 0, HD95 undefined.)")
    if args.csv:
        write_text_atomically(args.csv, per_case_csv(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data.phantoms import PhantomGenerator
    from .evaluation import Evaluation, case_metrics, markdown_table
    from .inference import Segmenter
    from .io import write_segmentation, write_text_atomically, write_volume

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # A phantom the demo model never saw: its training set is seed 0, this is seed 2026.
    case = PhantomGenerator(seed=2026, in_plane=args.in_plane).generate(args.case)
    made = time.perf_counter() - t0
    image_path = write_volume(case.image, out / "phantom_ct.nii.gz")
    write_segmentation(case.label, out / "phantom_reference.seg.nrrd")
    segmenter = Segmenter(model=args.model, device=args.device, refine_all=args.refine_all, refine_step_mm=args.refine_step,
                          refine_margin_mm=args.refine_margin,
                          refine_box_rounds=args.refine_rounds)
    bar = _ProgressBar("demo", True)
    refine_bar = _SliceBar("demo refine-all", segmenter.refine_all)
    try:
        result = segmenter.segment_file(image_path, out / "phantom_ct.seg.nrrd", progress=bar, refine_progress=refine_bar)
    finally:
        bar.close()
        refine_bar.close()
    refined = result.report.get("refine_all")
    scores = Evaluation(f"{segmenter.model_name} ({result.report['bank']})", {"demo": case_metrics(result.labels, case.label)})
    write_text_atomically(out / "report.json", __import__("json").dumps(result.report, indent=2))
    print(f"Phantom {case.info.get('case', '')}: {case.image.shape[2]}x{case.image.shape[1]}x{case.image.shape[0]} voxels "
          f"(x, y, z) at {', '.join(f'{s:.2f}' for s in case.image.geometry.spacing)} mm, made in {made:.1f} s.")
    print(f"Segmented in {result.report['timings_s']['total']:.1f} s on {result.report['device']} "
          f"({result.report['crops_per_pass']} crops x {result.report['passes']} passes"
          + (f"; FINE {result.report['timings_s']['total'] - refined['total_s']:.1f} s, then refine-all: {refined['slices']} slices "
             f"in {refined['total_s']:.1f} s" if refined else "; FINE alone") + ").")
    print("Dice (%) per organ against the phantom's reference labels:")
    print(markdown_table([scores]))
    print(f"Outputs in {out}/: phantom_ct.nii.gz, phantom_ct.seg.nrrd (load both in 3D Slicer), phantom_reference.seg.nrrd, report.json")
    print("The bundled models are trained on synthetic CT only (phantoms, and CT-like volumes around real organ label maps): "
          "not for clinical use.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fine-seg",
        description="FINE transformer segmentation of abdominal CT (spleen, kidneys, gallbladder, liver, stomach, aorta, pancreas).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("segment", help="segment CT volumes (NIfTI, NRRD, MHA files, DICOM folders, or folders of files)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CT file, DICOM series folder, or folder of CT files")
    p.add_argument("-o", "--output", help="output file (one input) or folder (default: the current folder)")
    p.add_argument("--model", default=None, help="registered model name or checkpoint path (default: the first registered model)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--bank", choices=["accumulate", "stateless"], default="stateless",
                   help="volume-token bank: start every crop from the learned tokens in one pass (default), or accumulate "
                   "over the volume in two passes (the same Dice for the shipped models, README, at twice the time)")
    p.add_argument("--fast", action="store_true", help="FINE alone (no refine-all unless --refine-all is given) with less crop "
                   "overlap (0.25 instead of 0.5): about 2-3x fewer crops")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="test-time augmentation: average each crop "
                   "over +-10 degree in-plane rotations and 0.9/1.1 scalings (the default, off with --fast; FINE's part 3-5x "
                   "slower, README); --no-tta: one prediction per crop")
    _largest_component_switch(p)
    _refine_all_switch(p)
    p.add_argument("--format", choices=["seg.nrrd", "nii.gz"], default="seg.nrrd", help="Slicer segmentation (default) or NIfTI label map")
    p.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (<name>_probabilities.nii.gz)")
    p.add_argument("--report", metavar="REPORT.json", help="write timings, crops, device, precision and peak memory as JSON")
    p.add_argument("--sw-batch-size", type=Number(int, at_least=1), default=None, help="crops per forward pass (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("attention", help="attention map from one point: where FINE looked, across the whole volume")
    p.add_argument("input", metavar="INPUT", help="CT file or DICOM series folder")
    p.add_argument("--point", required=True, metavar="X,Y,Z", type=NumberList(3, "a point", "-100,50,120"),
                   help="the point: RAS millimetres (Slicer's coordinates, negatives as typed), or indices with --ijk")
    p.add_argument("--ijk", action="store_true", help="--point gives voxel indices (i, j, k) of the input")
    p.add_argument("--stage", default="encoder0", help="encoder0..encoder3 or decoder0..decoder2 (default encoder0, the paper's figure)")
    p.add_argument("--block", type=int, default=1, help="block of the stage (default 1; at block 0 the window tokens hold only "
                   "their learned seed, so the map is local)")
    p.add_argument("-o", "--output", required=True, metavar="HEAT.nii.gz", help="the heat map (0..1) on the input's grid")
    p.add_argument("--png", metavar="FIGURE.png", help="also a three-plane figure (PNG, PDF or SVG) like the paper's Fig. 4")
    p.add_argument("--levels", action="store_true", help="also write the local, crop and volume terms (<name>_local.nii.gz, ...)")
    p.add_argument("--report", metavar="REPORT.json", help="shares per level, crop box, cell weights, timings")
    p.add_argument("--model", default=None, help="registered model name or checkpoint path (default: the first registered model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bank", choices=["accumulate", "stateless"], default="accumulate")
    p.add_argument("--fast", action="store_true", help="the crops of segment --fast (less overlap)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("phantom", help="generate synthetic abdominal CT phantoms with organ labels (nnU-Net / MSD layout)")
    p.add_argument("--out", required=True, help="dataset folder to write (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-plane", type=int, default=512, help="in-plane matrix size (the field of view stays physical)")
    p.add_argument("--first-index", type=int, default=0, help="index of the first case (to extend a dataset)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_phantom)

    from .data.synth.generator import DEFAULT_ANATOMY, DEFAULT_IN_PLANE, DEFAULT_MAX_SLICES
    from .data.synth.intensities import PHASES
    from .data.synth.scanner import FOV_KINDS

    p = sub.add_parser("synth", help="generate synthetic CT around real organ label maps (nnU-Net layout + synth_info.json)")
    p.add_argument("--anatomy", default=str(DEFAULT_ANATOMY), help="folder of organ label maps (default: %(default)s)")
    p.add_argument("--out", required=True, help="dataset folder to write (imagesTr/, labelsTr/, dataset.json, synth_info.json)")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "val"), default="train", help="which anatomy maps: training or the held-out validation maps")
    p.add_argument("--phase", nargs="+", choices=PHASES, help="contrast phases to draw from (default: all)")
    p.add_argument("--fov", nargs="+", choices=FOV_KINDS, help="fields of view to draw from (default: all)")
    p.add_argument("--in-plane", type=int, default=DEFAULT_IN_PLANE, help="largest in-plane matrix; larger scans get coarser pixels (default: %(default)s)")
    p.add_argument("--max-slices", type=int, default=DEFAULT_MAX_SLICES, help="largest slice count; longer scans get thicker slices (default: %(default)s)")
    p.add_argument("--first-index", type=int, default=0, help="index of the first case (to extend a dataset)")
    p.add_argument("--fatty-pancreas", type=float, default=0.0, metavar="SHARE",
                   help="share of cases (0-1) whose pancreas has fatty infiltration, fat lobules in 20-60%% of it "
                        "(default: %(default)s, as the sets the shipped model learned)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a FINE model (one process, or many under torchrun)")
    p.add_argument("--data", required=True, nargs="+", metavar="FOLDER",
                   help="dataset folder(s): nnU-Net / MSD (imagesTr, labelsTr) or BCV (img, label); with several, their cases "
                   "are trained on together and each case id is prefixed with its folder's name (for --hold-out)")
    p.add_argument("--out", required=True, help="folder for model.pt, checkpoint_latest.pt and training_log.csv")
    p.add_argument("--config", default="fine-tiny", help="fine-tiny, fine-small or fine-base")
    p.add_argument("--no-window-tokens", action="store_true", help="ablation: no window tokens (and so no volume tokens)")
    p.add_argument("--no-volume-tokens", action="store_true", help="ablation: window tokens only")
    p.add_argument("--epochs", type=Number(int, at_least=1), default=10)
    p.add_argument("--iterations", type=Number(int, at_least=1), default=100, help="iterations per epoch")
    p.add_argument("--batch-size", type=Number(int, at_least=1), default=2, help="crops per iteration and process")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="sgd: the paper's (momentum 0.99, Nesterov); adamw")
    p.add_argument("--lr", type=Number(above=0), default=1e-2, help="learning rate (1e-2 suits sgd, about 1e-3 adamw)")
    p.add_argument("--seed", type=Number(int, at_least=0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--target-spacing", type=NumberList(3, "a spacing", "3,3,6", positive=True), default=(3.0, 3.0, 6.0),
                   metavar="X,Y,Z", help="mm (commas or spaces)")
    p.add_argument("--bank-probability", type=Number(at_least=0, at_most=1), default=0.5, help="share of iterations that start from a carried bank")
    p.add_argument("--augment", choices=["none", "light", "ct"], default="ct",
                   help="augmentation: ct (default: intensity, contrast, noise, blur/sharpen, low resolution, rotation, tilt, "
                   "scaling of real CT), light (the demo model's: rotation, scaling, small intensity changes) or none")
    p.add_argument("--fov-probability", type=Number(at_least=0, at_most=1), default=0.5,
                   help="share of samples cut from a random partial field of view (slab, tight or off-centre) of their case")
    p.add_argument("--fov-extent", choices=["uniform", "log"], default="uniform",
                   help="how those fields of view's extents are drawn: uniform (default) or log-uniform (as many 40-80 mm "
                   "slabs as 80-160 mm ones: more thin slabs and tight crops)")
    p.add_argument("--label-map", default="identity", help="bcv, identity, or pairs like 6:5,7:6 (file value:organ value)")
    p.add_argument("--hold-out", nargs="*", metavar="CASE", help="case ids kept out of training")
    p.add_argument("--resume", help="continue from a checkpoint_latest.pt")
    p.add_argument("--init", metavar="MODEL", help="fine-tune: start from a registered model or checkpoint (its weights, "
                   "configuration and normalisation) with a fresh learning-rate schedule")
    p.add_argument("--description", default="", help="what the model is (stored in the checkpoint)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("average", help="average the weights of FINE models fine-tuned from one parent (a model soup)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more registered model names or checkpoint paths "
                   "of one architecture, classes and preprocessing")
    p.add_argument("-o", "--out", required=True, help="the averaged checkpoint to write")
    p.add_argument("--description", default=None, help="what the model is (default: the first model's description)")
    p.set_defaults(func=_cmd_average)

    p = sub.add_parser("evaluate", help="Dice and HD95 (mm) per organ on a labelled dataset")
    p.add_argument("--model", default=None, help="registered model name or checkpoint path")
    p.add_argument("--data", required=True, help="dataset folder (nnU-Net / MSD or BCV layout)")
    p.add_argument("--cases", nargs="*", help="case ids to evaluate (default: all)")
    p.add_argument("--label-map", default="identity")
    p.add_argument("--bank", choices=["accumulate", "stateless"], default="stateless")
    p.add_argument("--fast", action="store_true", help="as in segment: FINE alone, less crop overlap")
    _refine_all_switch(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default=None, help="row name in the table")
    p.add_argument("--csv", help="write per-case and mean metrics as CSV")
    p.add_argument("-q", "--quiet", action="store_true")
    _largest_component_switch(p)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="test-time augmentation, as in segment "
                   "(the default, off with --fast)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="segment a synthetic phantom with the bundled demo model and score it")
    p.add_argument("--out", default="demo-output", help="folder for the phantom, its segmentation and the report")
    p.add_argument("--model", default=None, help="registered model name or checkpoint path (default: the demo model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--in-plane", type=int, default=512)
    p.add_argument("--case", type=int, default=0, help="which phantom of the demo series")
    _refine_all_switch(p)
    p.set_defaults(func=_cmd_demo)

    add_refiner_commands(sub)
    add_litemedsam_train(sub)

    p = sub.add_parser("configs", help="list model configs: parameter counts and the paper's eq. 2 attention cost")
    p.add_argument("names", nargs="*", help="configs to show (default: all)")
    p.add_argument("--forward", action="store_true", help="also run one forward pass on a synthetic crop")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except FINEError as exc:
        print(f"fine-seg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fine-seg: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
