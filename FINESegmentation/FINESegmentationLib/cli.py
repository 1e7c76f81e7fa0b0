"""``fine-seg``: the command-line front end of the FINESegmentation engine.

Every subcommand is a thin layer over the engine API. Errors a user can cause end
in one sentence on stderr and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fine-seg",
        description="FINE transformer segmentation of abdominal CT (spleen, kidneys, gallbladder, liver, stomach, aorta, pancreas).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
