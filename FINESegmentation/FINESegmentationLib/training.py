"""Training FINE on a labelled dataset, on one machine or many (torchrun + DistributedDataParallel).

As in the paper and the authors' code: random crops with their positions (for the
volume tokens), about a third of them centred on an organ voxel; Dice + cross-entropy
with deep supervision (full and half resolution, weights 1 and 0.5); SGD with
momentum 0.99 and Nesterov (or AdamW, ``optimizer="adamw"``, which converges in fewer
iterations where compute is short), polynomial learning-rate decay (power 0.9), gradient
clipping at 12, mixed precision (bf16) on CUDA; never-visited volume tokens masked.
Augmentation (MONAI, ``augmentation.py``): ``ct`` (the default) covers the intensity,
resolution and geometry variation of real CT; ``light`` is the demo model's; no mirroring.
Partial fields of view (``sampling.py``): with ``fov_probability`` a sample is cut from a
random sub-volume of the case (a slab, a tight or off-centre field of view), its position
taken as inference would take it on a scan of that sub-volume alone.

Accumulated banks: inference runs the ``accumulate`` bank by default, so in a share
of the iterations (``bank_probability``) every sample first runs one or two other crops
of the same volume without gradient, carrying the volume-token state, and the
training crop then starts from that state, as pass 2 of inference does.

Under torchrun each process trains on its own random crops (seeded by rank); gradients
are averaged by DDP; rank 0 writes the log and checkpoints. The warm-up visit counts
are summed over processes when a checkpoint is written.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss

from .augmentation import STRENGTHS, training_augmentation
from .checkpoints import ModelInfo, Preprocessing, read_checkpoint, resolve_model, save_checkpoint
from .data.datasets import PreparedCase, find_training_cases, largest_in_plane_size, load_prepared, parse_label_map
from .errors import InputError
from .inference import resolve_device
from .io import read_volume
from .model import FINE, get_config
from .sampling import FOV_EXTENTS, Crop, CropSampler

logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    data: str | Path | list[str | Path]  # one dataset folder, or several (their cases in the given order)
    out: str
    config: str = "fine-tiny"
    window_tokens: bool = True
    volume_tokens: bool = True
    epochs: int = 10
    iterations: int = 100  # per epoch
    batch_size: int = 2
    optimizer: str = "sgd"  # "sgd" (the paper's) or "adamw"
    lr: float = 1e-2
    momentum: float = 0.99
    grad_clip: float = 12.0
    seed: int = 0
    device: str = "auto"
    target_spacing: tuple[float, float, float] = (3.0, 3.0, 6.0)  # (x, y, z) mm
    foreground_fraction: float = 0.33
    bank_probability: float = 0.5
    augment: str = "ct"  # "none", "light" (the demo model's) or "ct" (real CT of any scanner and phase)
    fov_probability: float = 0.5  # share of samples cut from a random partial field of view of their case
    fov_extent: str = "uniform"  # how those fields of view's extents are drawn: "uniform" or "log" (more thin slabs)
    label_map: str = "identity"
    validation_cases: list[str] = field(default_factory=list)  # case ids kept out of training
    resume: str | None = None
    init: str | None = None  # start from this model's weights, config and normalisation, with a fresh schedule
    progress: bool = True
    description: str = ""  # stored in the checkpoint: what the model is, what it is for


def intensity_statistics(cases, mapping, samples_per_case: int = 20000, seed: int = 0) -> tuple[tuple[float, float], float, float]:
    """nnU-Net's CT normalisation from the labelled voxels: clip to their 0.5-99.5 percentiles, then z-score."""
    from .data.datasets import map_labels

    rng = np.random.default_rng(seed)
    values = []
    for c in cases:
        image = read_volume(c.image).array
        label = map_labels(read_volume(c.label, kind="label").array, mapping)
        fg = image[label > 0]
        if fg.size:
            values.append(rng.choice(fg, min(samples_per_case, fg.size), replace=False))
    if not values:
        raise InputError("The training labels hold no organ voxels; check the label map.")
    v = np.concatenate(values)
    lo, hi = np.percentile(v, [0.5, 99.5])
    v = np.clip(v, lo, hi)
    return (float(lo), float(hi)), float(v.mean()), float(v.std())


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


# What a run is: ``--resume`` continues with the values the run started with (a resumed AdamW run given the
# default optimizer would otherwise load AdamW's state into SGD and fail, or silently change course).
RUN_SETTINGS = ("config", "window_tokens", "volume_tokens", "iterations", "batch_size", "optimizer", "lr", "momentum",
                "grad_clip", "seed", "target_spacing", "foreground_fraction", "bank_probability", "augment",
                "fov_probability", "fov_extent", "label_map", "validation_cases")


def resumed_settings(settings: TrainSettings, payload: dict) -> TrainSettings:
    """``settings`` with the run-defining values recorded in a resumed checkpoint; ``epochs`` only grows
    (a run may be extended, never cut short by a default)."""
    stored = ((payload.get("metadata") or {}).get("training") or {}).get("settings") or {}
    changes: dict[str, Any] = {}
    for name in RUN_SETTINGS:
        if name in stored:
            value = tuple(stored[name]) if isinstance(getattr(settings, name), tuple) else stored[name]
            if value != getattr(settings, name):
                changes[name] = value
    if int(stored.get("epochs", 0)) > settings.epochs:
        changes["epochs"] = int(stored["epochs"])
    if changes and settings.progress:
        print("Resuming with the run's own settings: " + ", ".join(f"{k} {v}" for k, v in changes.items()), flush=True)
    return replace(settings, **changes)


def train(settings: TrainSettings) -> Path:
    """Train a FINE model; returns the path of the final checkpoint (``<out>/model.pt``)."""
    if settings.resume and settings.init:
        raise InputError("Give either --resume (continue a run) or --init (start a new run from a model's weights), not both.")
    resume_payload = read_checkpoint(settings.resume) if settings.resume else None
    if resume_payload is not None:
        settings = resumed_settings(settings, resume_payload)
    if settings.optimizer not in ("sgd", "adamw"):
        raise InputError(f"Unknown optimizer '{settings.optimizer}'; use sgd or adamw.")
    if settings.augment not in STRENGTHS:
        raise InputError(f"Unknown augmentation '{settings.augment}'; use one of: {', '.join(STRENGTHS)}.")
    if settings.fov_extent not in FOV_EXTENTS:
        raise InputError(f"Unknown --fov-extent '{settings.fov_extent}'; use one of: {', '.join(FOV_EXTENTS)}.")
    if not 0.0 <= settings.fov_probability <= 1.0:
        raise InputError(f"--fov-probability must lie between 0 and 1, not {settings.fov_probability:g}.")
    mapping = parse_label_map(settings.label_map)
    all_cases = find_training_cases(settings.data)
    held_out = set(settings.validation_cases)
    unknown = sorted(held_out - {c.case_id for c in all_cases})
    if unknown:
        raise InputError(f"Held-out case {unknown[0]} is not in the training data; give case ids as listed there "
                         "(with several folders: FOLDER/CASE).")
    cases = [c for c in all_cases if c.case_id not in held_out]
    if not cases:
        raise InputError("Every case is held out for validation; leave some for training.")
    rank, world, local_rank = _distributed()
    device = resolve_device(settings.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    out = Path(settings.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, rank])
    augment_rng = np.random.default_rng([settings.seed, rank, 1])  # its own stream: the crops drawn do not depend on it

    start_epoch = 0
    extra: dict[str, Any] = {}
    init_weights = None
    if settings.init:
        # Fine-tuning keeps the model's normalisation: its weights only make sense on inputs scaled the same way.
        payload = read_checkpoint(*resolve_model(settings.init))
        info = ModelInfo.from_dict(payload["metadata"])
        info.description = settings.description or info.description
        init_weights = payload["state_dict"]
    elif settings.resume:
        payload = resume_payload
        info = ModelInfo.from_dict(payload["metadata"])
        extra = payload.get("extra", {})
        start_epoch = int(extra.get("epoch", 0))
    else:
        # The files are read twice (statistics here, preparation below): the statistics must be known
        # before any case is normalised, and keeping every raw volume in memory would cost gigabytes.
        clip, mean, std = intensity_statistics(cases, mapping, seed=settings.seed)
        pre = Preprocessing(target_spacing=tuple(settings.target_spacing), clip=clip, mean=mean, std=std)
        info = ModelInfo(config=get_config(settings.config), preprocessing=pre, description=settings.description)
    prepared = load_prepared(cases, info.preprocessing, mapping, progress=settings.progress and rank == 0)
    if not (settings.resume or settings.init):
        cfg = get_config(settings.config, window_tokens=settings.window_tokens, volume_tokens=settings.volume_tokens,
                         max_volume_size=largest_in_plane_size(prepared))
        info.config = cfg
    cfg = info.config

    model = FINE(cfg).to(device)
    if settings.resume:
        model.load_state_dict(payload["state_dict"])
    elif init_weights is not None:
        model.load_state_dict(init_weights)
    visits_at_sync = model.trained_visits.clone()
    net: torch.nn.Module = model
    if world > 1:
        # Volume-token MSA of a stage's last block only feeds the returned state, so some
        # parameters get no gradient; buffers are not broadcast so each rank counts its own visits.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                                        find_unused_parameters=True, broadcast_buffers=False)
    total_iters = settings.epochs * settings.iterations
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True, weight_decay=3e-5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_iters, power=0.9)
    if extra:
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    augment = training_augmentation(settings.augment, info.preprocessing)
    air = (info.preprocessing.clip[0] - info.preprocessing.mean) / info.preprocessing.std
    sampler = CropSampler(prepared, cfg.crop_size, air, settings.foreground_fraction, rng,
                          fov_probability=settings.fov_probability, spacing=info.preprocessing.target_spacing,
                          fov_extent=settings.fov_extent)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    info.training = {
        "data": " + ".join(Path(d).resolve().name for d in ([settings.data] if isinstance(settings.data, (str, Path)) else settings.data)),
        "cases": [c.case_id for c in cases],
        "held_out": sorted(held_out),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items() if k not in ("data", "out", "resume", "init", "progress", "description")},
        **({"initialised_from": Path(settings.init).name,
            "initial_training": payload["metadata"].get("training", {})} if settings.init else {}),
        "processes": world,
    }
    log_path = out / "training_log.csv"
    if rank == 0 and not (settings.resume and log_path.exists()):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["epoch", "iteration", "loss", "lr", "seconds"])

    from tqdm import tqdm

    started = time.perf_counter()
    for epoch in range(start_epoch, settings.epochs):
        net.train()
        losses = []
        bar = tqdm(range(settings.iterations), desc=f"epoch {epoch + 1}/{settings.epochs}", disable=not (settings.progress and rank == 0))
        for it in bar:
            batch = [sampler.sample() for _ in range(settings.batch_size)]
            # One seed per sample: its warm-up crops get the same augmentation draws (one scan, one scanner).
            seeds = [int(s) for s in augment_rng.integers(2**31, size=len(batch))]
            x, y, positions = _to_batch(batch, seeds, augment, device)
            state = None
            if cfg.volume_tokens and rng.random() < settings.bank_probability:
                with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    for _ in range(int(rng.integers(1, 3))):
                        warm = [sampler.sample(c.case, c.region) for c in batch]
                        wx, _, wp = _to_batch(warm, seeds, augment, device)
                        state = model(wx, wp, state).state
                state = state.detach()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                output = net(x, positions, state, deep_supervision=True, return_state=False)
                loss = loss_fn(output.logits.float(), y)
                loss = loss + 0.5 * loss_fn(output.deep[0].float(), y[:, :, ::2, ::2, ::2])
                loss = loss / 1.5
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if rank == 0 and (it + 1) % 10 == 0:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([epoch + 1, epoch * settings.iterations + it + 1, f"{np.mean(losses[-10:]):.5f}",
                                            f"{scheduler.get_last_lr()[0]:.6f}", f"{time.perf_counter() - started:.1f}"])
        visits_at_sync = _sync_visits(model, visits_at_sync, world)
        info.training["epochs_done"] = epoch + 1
        info.training["final_loss"] = round(float(np.mean(losses[-max(1, len(losses) // 4):])), 5)
        info.training["seconds"] = round(time.perf_counter() - started, 1)
        if rank == 0:
            save_checkpoint(out / "checkpoint_latest.pt", model, info,
                            extra={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch + 1})
            logger.info("epoch %d: loss %.4f", epoch + 1, info.training["final_loss"])
    final = out / "model.pt"
    if rank == 0:
        save_checkpoint(final, model, info)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return final


def _to_batch(crops: list[Crop], seeds: list[int], augment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmented images [B, 1, z, y, x], labels [B, 1, z, y, x] and positions [B, 3] of crops."""
    items = []
    for crop, seed in zip(crops, seeds):
        augment.set_random_state(seed=seed)
        items.append(augment({"image": crop.image[None], "label": crop.label[None]}))
    x = torch.stack([torch.as_tensor(d["image"]) for d in items]).float().to(device)
    y = torch.stack([torch.as_tensor(d["label"]) for d in items]).long().to(device)
    positions = torch.tensor(np.stack([c.position for c in crops]), dtype=torch.float32, device=device)
    return x, y, positions


def _sync_visits(model: FINE, at_sync: torch.Tensor, world: int) -> torch.Tensor:
    """Sum every process's new warm-up visits into each process's counter."""
    if world > 1:
        delta = model.trained_visits - at_sync
        dist.all_reduce(delta)
        model.trained_visits.copy_(at_sync + delta)
    return model.trained_visits.clone()
