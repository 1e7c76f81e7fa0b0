"""``fine-seg litemedsam-train``: fine-tune LiteMedSAM's prompt encoder and mask decoder for clicks.

Kept beside ``cli.py`` (which registers it) because it is one self-contained subcommand.
"""
from __future__ import annotations

import argparse

from .cli_arguments import Number


def _cmd_litemedsam_train(args: argparse.Namespace) -> int:
    from .checkpoints import sha256_of
    from .refiner.litemedsam.training import ClickTrainSettings, train_clicks

    path = train_clicks(ClickTrainSettings(
        data=args.data, out=args.out, val_data=args.val_data, cache=args.cache, slices_per_organ=args.slices_per_organ,
        max_cases=args.max_cases, val_max_cases=args.val_max_cases,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_clicks=args.max_clicks, seed=args.seed,
        checkpoint_minutes=args.checkpoint_minutes, validate_every=args.validate_every, description=args.description,
        resume=args.resume, progress=not args.quiet,
    ))
    print(f"LiteMedSAM click weights: {path} (sha256 {sha256_of(path)})")
    return 0


def add_litemedsam_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("litemedsam-train", help="fine-tune LiteMedSAM's prompt encoder and mask decoder for clicks (image encoder frozen)")
    p.add_argument("--data", required=True, help="labelled training dataset (nnU-Net / MSD or BCV layout)")
    p.add_argument("--val-data", default=None, help="labelled held-out dataset: box-only and click Dice during training")
    p.add_argument("--val-max-cases", type=Number(int, at_least=1), default=10, help="held-out cases used, evenly spread (validation costs embeddings too)")
    p.add_argument("--out", required=True, help="folder for litemedsam-clicks.pt, checkpoint.pt and training_log.csv")
    p.add_argument("--cache", default=None, help="folder of the slice embedding caches (default: OUT/cache)")
    p.add_argument("--slices-per-organ", type=Number(int, at_least=1), default=4, help="training slices per organ and case, first to last slice")
    p.add_argument("--max-cases", type=Number(int, at_least=1), default=None, help="use this many training cases, evenly spread over the dataset (default: all)")
    p.add_argument("--steps", type=Number(int, at_least=1), default=400)
    p.add_argument("--batch-size", type=Number(int, at_least=1), default=8)
    p.add_argument("--lr", type=Number(above=0), default=1e-4)
    p.add_argument("--max-clicks", type=Number(int, at_least=1), default=8, help="most correction clicks simulated before the step's answer")
    p.add_argument("--seed", type=Number(int, at_least=0), default=0)
    p.add_argument("--checkpoint-minutes", type=Number(above=0), default=5.0, help="write checkpoint.pt this often")
    p.add_argument("--validate-every", type=Number(int, at_least=1), default=50, help="steps between validation runs (with --val-data)")
    p.add_argument("--description", default="", help="what the weights are (stored in the file)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_litemedsam_train)
