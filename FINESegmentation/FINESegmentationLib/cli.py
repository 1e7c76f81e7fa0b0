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
    for entry in registry.values():
        state = "present" if entry.path.is_file() else "missing"
        print(f"{entry.name:<24} {state:<8} sha256 {entry.sha256[:12]}...  {entry.description}")
    return 0


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", *_IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; a folder is one DICOM series, or else every image file inside it."""
    import SimpleITK as sitk

    from .errors import InputError

    cases: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise InputError(f"{item} does not exist; give a CT file (NIfTI, NRRD, MHA) or a DICOM folder.")
        if path.is_dir() and not sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)):
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_IMAGE_SUFFIXES) and not p.name.lower().endswith(".seg.nrrd"))
            if not found:
                raise InputError(f"The folder {item} holds neither a DICOM series nor image files (.nii.gz, .nrrd, .mha).")
            cases.extend(found)
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
    targets = [folder / f"{_case_name(c)}{extension}" for c in cases]
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


def _cmd_segment(args: argparse.Namespace) -> int:
    import json

    from .inference import Segmenter

    cases = _expand_inputs(args.inputs)
    extension = ".seg.nrrd" if args.format == "seg.nrrd" else ".nii.gz"
    outputs = _output_paths(cases, args.output, extension)
    segmenter = Segmenter(model=args.model, device=args.device, bank=args.bank, fast=args.fast, tta=args.tta,
                          largest_component=args.largest_component, sw_batch_size=args.sw_batch_size)
    reports, failures = [], 0
    for case, target in zip(cases, outputs):
        probs = target.with_name(_case_name(target) + "_probabilities.nii.gz") if args.probabilities else None
        bar = _ProgressBar(_case_name(case), not args.quiet)
        try:
            result = segmenter.segment_file(case, target, probabilities_path=probs, progress=bar)
        except FINEError as exc:
            bar.close()
            if len(cases) == 1:
                raise
            print(f"fine-seg: error: {case}: {exc}", file=sys.stderr)
            failures += 1
            continue
        bar.close()
        reports.append(result.report)
        t = result.report["timings_s"]
        print(f"{case} -> {target}  ({t['total']:.1f} s on {result.report['device']}, {result.report['bank']} bank, "
              f"{result.report['crops_per_pass']} crops x {result.report['passes']} pass(es))")
        for warning in result.report["warnings"] + result.report["fallbacks"]:
            print(f"  warning: {warning}", file=sys.stderr)
    if args.report:
        from .io import write_text_atomically

        write_text_atomically(args.report, json.dumps(reports[0] if len(cases) == 1 else reports, indent=2))
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--bank", choices=["accumulate", "stateless"], default="accumulate",
                   help="volume-token bank: accumulate over the volume in two passes (default) or start every crop afresh")
    p.add_argument("--fast", action="store_true", help="less crop overlap (0.25 instead of 0.5): about 2-3x fewer crops")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average the 8 mirrored versions of each crop")
    p.add_argument("--largest-component", action="store_true", help="keep only each organ's largest connected component")
    p.add_argument("--format", choices=["seg.nrrd", "nii.gz"], default="seg.nrrd", help="Slicer segmentation (default) or NIfTI label map")
    p.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (<name>_probabilities.nii.gz)")
    p.add_argument("--report", metavar="REPORT.json", help="write timings, crops, device, precision and peak memory as JSON")
    p.add_argument("--sw-batch-size", type=int, default=None, help="crops per forward pass (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_segment)

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
