"""Training the refiner on labelled CT (the phantoms): perturbed FINE-like masks, then simulated clicks.

Each labelled organ of each training case gives ``crops_per_organ`` crops, placed as
at inference (:func:`.crop.crop_for_segment`) with a random shift. An iteration takes
a batch of crops of *one* organ from different cases, flips them at random, and:

1. perturbs each target into a FINE-like mask (erosion or dilation, shift, holes,
   blobs, a leak into or from a neighbouring organ) that becomes the previous-mask prompt;
2. encodes the crops, half of the iterations with an in-batch memory: each crop's
   memory block attends to the keys and values of its nearest other crops of the batch
   (same organ, other patients: a batch takes one crop per case, as a kNN search in the
   stored memory finds them at inference), so the model learns to use remembered
   examples and also works without;
3. runs the decoder ``iterations`` times: the first prompt has a click at the deepest
   error of the perturbed mask (none in ``no_click_probability`` of the crops), and each
   later one adds a click in the errors of the previous answer, which becomes the new
   previous mask. The first and the last passes carry the loss (MONAI's DiceCE on mask 0,
   the best of masks 1..3 on the first pass, and the IoU head's squared error); the passes
   in between only produce the next click, as cheaply as possible.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from scipy import ndimage
from tqdm import tqdm

from ..errors import InputError
from .build import build_refiner, save_refiner
from .config import RefinerConfig, refiner_config
from .clicks import next_click
from .crop import TrainingCrop, crop_for_segment, organ_crops
from .memory import RetrievedMemory, distance_weights

logger = logging.getLogger(__name__)

def _ball(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    z, y, x = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return x * x + y * y + z * z <= radius * radius


def _paint_ball(mask: np.ndarray, centre: Sequence[int], radius: float, value: bool) -> None:
    ball = _ball(radius)
    r = ball.shape[0] // 2
    lo = [max(c - r, 0) for c in centre]
    hi = [min(c + r + 1, s) for c, s in zip(centre, mask.shape)]
    sub = ball[tuple(slice(l - (c - r), h - (c - r)) for l, h, c in zip(lo, hi, centre))]
    region = mask[tuple(slice(l, h) for l, h in zip(lo, hi))]
    region[sub] = value


def perturb_mask(target: np.ndarray, labels: np.ndarray, organ: int, rng: np.random.Generator) -> np.ndarray:
    """A FINE-like imperfect version of ``target`` (bool [z, y, x]); ``labels`` holds the other organs for leaks."""
    mask = target.copy()
    for kind in rng.choice(["grow", "shift", "holes", "blobs", "leak", "cut"], size=rng.integers(1, 4), replace=False):
        if kind == "grow":
            steps = int(rng.integers(1, 3))
            op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
            mask = op(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=steps)
        elif kind == "shift":
            mask = ndimage.shift(mask.astype(np.uint8), rng.integers(-3, 4, 3), order=0, mode="constant") > 0
        elif kind in ("holes", "blobs"):
            inside = np.argwhere(mask if kind == "holes" else ndimage.binary_dilation(mask, iterations=2) & ~mask)
            for _ in range(int(rng.integers(1, 4)) if len(inside) else 0):
                _paint_ball(mask, inside[rng.integers(len(inside))], rng.uniform(2, 5), kind == "blobs")
        elif kind == "leak":
            # A piece of a neighbouring organ taken for this one (FINE confuses spleen and liver, the kidneys...).
            others = np.argwhere((labels != 0) & (labels != organ) & ndimage.binary_dilation(target, iterations=4))
            if len(others):
                piece = np.zeros_like(mask)
                _paint_ball(piece, others[rng.integers(len(others))], rng.uniform(4, 10), True)
                mask |= piece & (labels != 0) & (labels != organ)
        else:
            # Part of the organ missed: everything beyond a random plane through the outer part of the organ.
            points = np.argwhere(target)
            if len(points):
                normal = rng.normal(size=3)
                normal /= np.linalg.norm(normal)
                depth = points @ normal
                threshold = np.quantile(depth, rng.uniform(0.75, 0.95))
                z, y, x = np.indices(mask.shape, sparse=True)
                mask &= (z * normal[0] + y * normal[1] + x * normal[2]) <= threshold
    if not mask.any():
        mask = ndimage.binary_dilation(target, iterations=1)
    return mask


@dataclass
class RefinerTrainSettings:
    data: str
    out: str
    config: str = "refiner-tiny"
    steps: int = 600
    batch_size: int = 4
    iterations: int = 4  # decoder passes per crop: the initial prompt and one more click each
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 30
    seed: int = 0
    crops_per_organ: int = 2
    memory_probability: float = 0.5
    no_click_probability: float = 0.15
    validation_cases: list[str] = field(default_factory=list)
    description: str = ""
    progress: bool = True
    config_overrides: dict = field(default_factory=dict)


def in_batch_memory(descriptors: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int) -> RetrievedMemory:
    """Each crop's k nearest *other* crops of the batch as its memory.

    descriptors (B, D); keys, values (B, H, N, d) -> RetrievedMemory with (B, K, H, N, d), K = min(k, B - 1).
    """
    distances = torch.cdist(descriptors, descriptors)
    distances.fill_diagonal_(float("inf"))
    found = torch.topk(distances, min(k, descriptors.shape[0] - 1), dim=1, largest=False)
    return RetrievedMemory(keys[found.indices], values[found.indices], distance_weights(found.values), found.indices, found.values)


def _points_tensor(clicks: list[list[tuple[tuple[int, int, int], bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop click lists -> points (B, N, 3) crop (x, y, z) and labels (B, N), padded with label -1."""
    n = max((len(c) for c in clicks), default=0)
    points = torch.zeros(len(clicks), n, 3)
    labels = torch.full((len(clicks), n), -1, dtype=torch.long)
    for b, crop_clicks in enumerate(clicks):
        for i, (xyz, positive) in enumerate(crop_clicks):
            points[b, i] = torch.tensor(xyz, dtype=torch.float32)
            labels[b, i] = int(positive)
    return points, labels


def _iou(masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """masks (B, M, S, S, S) logits, target (B, 1, S, S, S) -> IoU of each binarised mask (B, M)."""
    pred = masks > 0
    inter = (pred & target.bool()).flatten(2).sum(-1).float()
    union = (pred | target.bool()).flatten(2).sum(-1).float()
    return inter / union.clamp_min(1)


class RefinerLoss(torch.nn.Module):
    """DiceCE on mask 0; with ``multimask``, plus the best of masks 1..M-1 per crop; plus the IoU head's MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(sigmoid=True)
        self.dice = DiceLoss(sigmoid=True, reduction="none")

    def forward(self, masks: torch.Tensor, iou: torch.Tensor, target: torch.Tensor, multimask: bool) -> torch.Tensor:
        loss = self.dice_ce(masks[:, :1], target)
        if multimask:
            per_mask = torch.stack([
                self.dice(masks[:, m : m + 1], target).flatten(1).mean(1)
                + F.binary_cross_entropy_with_logits(masks[:, m : m + 1], target, reduction="none").flatten(1).mean(1)
                for m in range(1, masks.shape[1])
            ], dim=1)
            loss = loss + per_mask.min(dim=1).values.mean()
        return loss + F.mse_loss(iou, _iou(masks.detach(), target))


def load_training_crops(data: str, config: RefinerConfig, rng: np.random.Generator, per_organ: int,
                        exclude: Sequence[str] = (), progress: bool = True) -> list[TrainingCrop]:
    from ..data.datasets import find_cases
    from ..io import read_volume

    cases = [c for c in find_cases(data) if c.case_id not in set(exclude)]
    if not cases:
        raise InputError(f"No training cases are left in {data} after holding out {', '.join(exclude)}.")
    crops: list[TrainingCrop] = []
    for c in tqdm(cases, desc="cropping cases", unit="case", disable=not progress):
        crops += organ_crops(c.case_id, read_volume(c.image), read_volume(c.label, kind="label"), config, rng, per_organ)
    return crops


def train_refiner(settings: RefinerTrainSettings) -> Path:
    """Train a refiner; writes ``refiner.pt`` and ``training_log.csv`` into ``settings.out``; returns the checkpoint path."""
    out = Path(settings.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {out} ({exc.strerror}); choose a folder you can write to.") from None
    if settings.batch_size < 2:
        raise InputError("The refiner trains on batches of at least 2 crops (the in-batch memory needs another crop).")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    config = refiner_config(settings.config, **settings.config_overrides)
    crops = load_training_crops(settings.data, config, rng, settings.crops_per_organ, settings.validation_cases, settings.progress)
    by_organ: dict[int, list[int]] = {}
    for i, crop in enumerate(crops):
        by_organ.setdefault(crop.organ, []).append(i)
    organs = sorted(by_organ)

    model = build_refiner(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / settings.warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps)))
    criterion = RefinerLoss()
    log_path = out / "training_log.csv"
    log_rows = []
    bar = tqdm(range(settings.steps), desc="training refiner", unit="step", disable=not settings.progress)
    start = time.perf_counter()
    for step in bar:
        organ = organs[int(rng.integers(len(organs)))]
        # One crop per case, so that no crop has a shifted twin of itself as memory.
        per_case: dict[str, list[int]] = {}
        for i in by_organ[organ]:
            per_case.setdefault(crops[i].case_id, []).append(i)
        cases = list(per_case)
        picked = rng.choice(len(cases), size=settings.batch_size, replace=len(cases) < settings.batch_size)
        chosen = [per_case[cases[c]][int(rng.integers(len(per_case[cases[c]])))] for c in picked]
        images, targets, previous = [], [], []
        for i in chosen:
            axes = tuple(a for a in range(3) if rng.random() < 0.5)
            image = np.flip(crops[i].image.astype(np.float32), axes)
            labels = np.flip(crops[i].labels, axes)
            target = labels == organ
            images.append(image)
            targets.append(target)
            previous.append(perturb_mask(target, labels, organ, rng))
        image_t = torch.from_numpy(np.stack(images)[:, None].copy())
        target_t = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32))
        use_memory = rng.random() < settings.memory_probability

        tokens = model.image_encoder.prefix(image_t)
        retrieved = None
        if use_memory:
            k, v = model.image_encoder.plugin_kv(tokens)
            retrieved = in_batch_memory(model.image_encoder.descriptor(tokens).detach(), k.detach(), v.detach(), config.knn)
        embedding = model.image_encoder.suffix(tokens, retrieved)

        clicks: list[list] = [[] for _ in chosen]
        for b in range(len(chosen)):
            if rng.random() >= settings.no_click_probability:
                click = next_click(previous[b], targets[b], 0, rng)
                if click is not None:
                    clicks[b].append((click.xyz, click.positive))
        prev_t = torch.from_numpy(np.stack(previous)[:, None].astype(np.float32))
        loss = torch.zeros(())
        dice_first = dice_last = 0.0
        for it in range(settings.iterations):
            points, point_labels = _points_tensor(clicks)
            carries_loss = it in (0, settings.iterations - 1)
            with torch.set_grad_enabled(carries_loss):
                masks, iou = model.decode(embedding if carries_loss else embedding.detach(), image_t, points, point_labels, prev_t)
                if carries_loss:
                    loss = loss + criterion(masks, iou, target_t, multimask=(it == 0))
            with torch.no_grad():
                prediction = masks[:, 0:1] > 0
                dice = (2 * (prediction & target_t.bool()).flatten(1).sum(1) / (prediction.flatten(1).sum(1) + target_t.flatten(1).sum(1)).clamp_min(1)).mean().item()
                dice_first = dice if it == 0 else dice_first
                dice_last = dice
            if it == settings.iterations - 1:
                break
            pred_np = prediction[:, 0].numpy()
            for b in range(len(chosen)):
                click = next_click(pred_np[b], targets[b], len(clicks[b]), rng)
                if click is not None:
                    clicks[b].append((click.xyz, click.positive))
            prev_t = prediction.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log_rows.append({"step": step + 1, "loss": round(loss.item(), 5), "dice_first": round(dice_first, 4), "dice_last": round(dice_last, 4),
                         "memory": int(use_memory), "organ": organ, "seconds": round(time.perf_counter() - start, 1)})
        bar.set_postfix_str(f"loss {loss.item():.3f} dice {dice_first:.3f}->{dice_last:.3f}")
    bar.close()

    from ..io import write_text_atomically

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(log_rows[0]))
    writer.writeheader()
    writer.writerows(log_rows)
    write_text_atomically(log_path, buffer.getvalue())
    path = out / "refiner.pt"
    tail = log_rows[-min(50, len(log_rows)):]
    training = {
        "data": str(settings.data),
        "cases": sorted({c.case_id for c in crops}),
        "crops": len(crops),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("data", "out", "progress")},
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss_mean_last_50": round(float(np.mean([r["loss"] for r in tail])), 4),
    }
    save_refiner(path, model.eval(), settings.description or f"{config.name} refiner trained on {settings.data}", training)
    return path
