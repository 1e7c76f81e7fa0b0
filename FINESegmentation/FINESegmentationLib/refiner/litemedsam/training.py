"""Fine-tuning LiteMedSAM's prompt encoder and mask decoder for clicks, the image encoder frozen.

Data: 2-D axial slices of a labelled dataset, chosen over each organ's extent and embedded once
(:mod:`.slice_cache`). A step draws ``batch_size`` (slice, organ) samples, organs equally often, and
simulates SAM's interactive training (:mod:`.clicks`):

1. the first prompt is a jittered box (``box_share`` of the steps) or one positive click in the organ;
2. ``k`` correction rounds follow (none in ``first_prompt_share`` of the steps, else 1..``max_clicks``):
   the decoder answers without gradients and a click is added in its errors (positive in a false
   negative, negative in a false positive; in ``no_click_share`` of the rounds no click, only the
   answer), its logits becoming the mask prompt (in ``mask_prompt_share`` of the steps);
3. the decoder answers the prompts after round ``k`` with gradients: MONAI's DiceCE on the mask logits
   (MedSAM's BCE + Dice) plus the squared error of the IoU head against the mask's true IoU (SAM).

Only the answer after the last round carries the loss, so one step costs a few gradient-free decoder
passes and one with gradients (RITM's iterative training), and every depth of the interaction is
trained. AdamW with a linear warm-up and a cosine decay. ``checkpoint.pt`` (the two parts, the optimizer,
the step, the log) is written every ``checkpoint_minutes`` and at the end; ``resume`` continues from it
with the same random stream (each step's generator is seeded by (seed, step)). The result,
``litemedsam-clicks.pt``, holds only the two parts (:mod:`.click_weights`).
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from tqdm import tqdm

from ...checkpoints import load_verified, sha256_of, write_payload
from ...data.datasets import CaseFiles, find_cases
from ...errors import InputError
from ...io import read_volume, write_text_atomically
from ...volume import Volume
from .build import LiteMedSAM, load_litemedsam
from .click_eval import score_slices
from .click_weights import PARTS, save_click_weights, tuned_state
from .clicks import jittered_box, training_click
from .slice_cache import CacheSource, SliceCache, open_cache

CHECKPOINT = "checkpoint.pt"
RESULT = "litemedsam-clicks.pt"
VALIDATION_PER_ORGAN = 6  # samples per organ in the validation run during training


@dataclass
class ClickTrainSettings:
    data: str
    out: str
    val_data: str | None = None
    cache: str | None = None  # folder of the slice caches, one per dataset folder name (default: <out>/cache)
    slices_per_organ: int = 4
    max_cases: int | None = None  # training cases used, evenly spread over the dataset (None: all)
    val_slices_per_organ: int = 3
    val_max_cases: int | None = 10
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 20
    max_clicks: int = 8
    box_share: float = 0.5
    first_prompt_share: float = 0.25
    no_click_share: float = 0.2
    mask_prompt_share: float = 0.75
    iou_weight: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 5.0
    validate_every: int = 50
    description: str = ""
    resume: bool = False
    progress: bool = True


def spread_cases(data: str, max_cases: int | None = None) -> list[CaseFiles]:
    """The labelled cases of a dataset folder, or ``max_cases`` of them evenly spread over its sorted case ids."""
    cases = find_cases(data)
    if max_cases is None or len(cases) <= max_cases:
        return cases
    return [cases[i] for i in np.unique(np.round(np.linspace(0, len(cases) - 1, max_cases)).astype(int))]


def labelled_cases(cases: list[CaseFiles]) -> Iterator[tuple[str, Volume, Volume]]:
    """(case id, CT, organ labels) of each case, read one at a time."""
    for case in cases:
        yield case.case_id, read_volume(case.image), read_volume(case.label, kind="label")


def dataset_cache(data: str, folder: Path, per_organ: int | None, model: LiteMedSAM, weights_sha256: str, progress: bool,
                  max_cases: int | None = None) -> SliceCache:
    """The slice cache of a labelled dataset folder (built, or reused when built from the same cases, slices and weights)."""
    cases = spread_cases(data, max_cases)
    source = CacheSource(tuple(c.case_id for c in cases), per_organ, weights_sha256)
    return open_cache(folder, source, lambda: labelled_cases(cases), model, progress)


def learning_rate(step: int, settings: ClickTrainSettings) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to a tenth of ``lr`` at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class ClickTrainer:
    """The model, its trainable parts, the optimizer and the loss; :meth:`step` runs one training step."""

    def __init__(self, model: LiteMedSAM, cache: SliceCache, settings: ClickTrainSettings) -> None:
        self.model = model
        self.cache = cache
        self.settings = settings
        model.image_encoder.requires_grad_(False)
        self.parameters = [p for part in PARTS for p in getattr(model, part).parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        self.segmentation_loss = DiceCELoss(sigmoid=True)
        self.by_organ = [samples for _, samples in sorted(cache.organ_samples().items())]

    def draw(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """``batch_size`` samples: an organ uniformly, then one of its slices uniformly."""
        groups = rng.integers(len(self.by_organ), size=self.settings.batch_size)
        return [self.by_organ[g][int(rng.integers(len(self.by_organ[g])))] for g in groups]

    def _decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, points: list[list[tuple[float, float, int]]],
                masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = None
        if points and points[0]:
            coords = torch.tensor([[p[:2] for p in row] for row in points], dtype=torch.float32)
            prompt = (coords, torch.tensor([[p[2] for p in row] for row in points]))
        return self.model.decode(embeddings, prompt, boxes, masks)

    def step(self, step: int) -> dict[str, float]:
        """One training step (seeded by (seed, step)); returns its loss terms."""
        s = self.settings
        rng = np.random.default_rng([s.seed, step])
        samples = self.draw(rng)
        embeddings = self.cache.embedding([i for i, _ in samples])
        targets = np.stack([self.cache.target(i, organ) for i, organ in samples])
        limits = [(self.cache.slices[i]["new_width"], self.cache.slices[i]["new_height"]) for i, _ in samples]
        empty = np.zeros_like(targets[0])
        boxes = None
        points: list[list[tuple[float, float, int]]] = [[] for _ in samples]
        if rng.random() < s.box_share:
            boxes = torch.tensor(np.stack([jittered_box(t, rng, lim) for t, lim in zip(targets, limits)]), dtype=torch.float32)
        else:
            for row, target in zip(points, targets):
                row.append(training_click(empty, target, rng) or (0.0, 0.0, -1))
        rounds = 0 if rng.random() < s.first_prompt_share else int(rng.integers(1, s.max_clicks + 1))
        use_mask = rng.random() < s.mask_prompt_share
        masks = None
        with torch.no_grad():
            for _ in range(rounds):
                logits, _ = self._decode(embeddings, boxes, points, masks)
                predictions = logits[:, 0].numpy() > 0
                masks = logits if use_mask else None
                if rng.random() >= s.no_click_share or not points[0]:
                    for row, prediction, target in zip(points, predictions, targets):
                        row.append(training_click(prediction, target, rng) or (0.0, 0.0, -1))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        logits, iou = self._decode(embeddings, boxes, points, masks)
        target = torch.from_numpy(targets[:, None].astype(np.float32))
        with torch.no_grad():
            predicted = (logits > 0).float()
            intersection = (predicted * target).sum((1, 2, 3))
            true_iou = intersection / (predicted.sum((1, 2, 3)) + target.sum((1, 2, 3)) - intersection).clamp(min=1.0)
        segmentation = self.segmentation_loss(logits, target)
        iou_error = F.mse_loss(iou[:, 0], true_iou)
        loss = segmentation + s.iou_weight * iou_error
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "dice_ce": segmentation.item(), "iou_mse": iou_error.item(), "rounds": rounds,
                "box": int(boxes is not None), "train_iou": float(true_iou.mean())}


def validation_samples(cache: SliceCache, per_organ: int = VALIDATION_PER_ORGAN) -> list[tuple[int, int]]:
    """A fixed, evenly spread subset of the validation samples: ``per_organ`` per organ."""
    chosen = []
    for _, samples in sorted(cache.organ_samples().items()):
        picks = np.unique(np.round(np.linspace(0, len(samples) - 1, min(per_organ, len(samples)))).astype(int))
        chosen.extend(samples[i] for i in picks)
    return chosen


def validate(model: LiteMedSAM, cache: SliceCache, samples: list[tuple[int, int]]) -> dict[str, float]:
    """Mean over organs of the box-only Dice and the Dice after 1 and 3 clicks alone."""
    scores = score_slices(model, cache, samples, clicks=(1, 3))
    return {"val_box": scores.mean("box", 0), "val_click1": scores.mean("clicks", 1), "val_click3": scores.mean("clicks", 3)}


def _log_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def train_clicks(settings: ClickTrainSettings) -> Path:
    """Fine-tune for clicks as :class:`ClickTrainSettings` says; returns the written ``litemedsam-clicks.pt``."""
    s = settings
    out = Path(s.out)
    checkpoint = out / CHECKPOINT
    if s.resume and not checkpoint.is_file():
        raise InputError(f"There is no {CHECKPOINT} in {out} to resume from; start without --resume.")
    if not s.resume and checkpoint.is_file():
        raise InputError(f"{out} already holds a training checkpoint; pass --resume to continue it or give another --out folder.")
    for folder in (s.data, s.val_data):
        if folder:
            find_cases(folder)  # a wrong dataset folder is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model, base_path = load_litemedsam()
    base_sha = sha256_of(base_path)
    cache_root = Path(s.cache) if s.cache else out / "cache"
    train_cache = dataset_cache(s.data, cache_root / Path(s.data).name, s.slices_per_organ, model, base_sha, s.progress, s.max_cases)
    val_cache = dataset_cache(s.val_data, cache_root / Path(s.val_data).name, s.val_slices_per_organ, model, base_sha, s.progress,
                              s.val_max_cases) if s.val_data else None
    val_samples = validation_samples(val_cache) if val_cache else []
    trainer = ClickTrainer(model, train_cache, s)
    start, log, elapsed = 0, [], 0.0
    if s.resume:
        state = load_verified(checkpoint, None, "click training checkpoint")
        try:
            model.load_state_dict({**model.state_dict(), **state["state_dict"]}, strict=True)
            trainer.optimizer.load_state_dict(state["optimizer"])
            start, log, elapsed = int(state["step"]), list(state["log"]), float(state["elapsed_s"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{checkpoint} is not a click training checkpoint of this model ({str(exc).splitlines()[0][:100]}); start a new --out folder.") from None
    elif val_cache:
        log.append({"step": 0, "elapsed_s": 0.0, **validate(model, val_cache, val_samples)})

    def save_checkpoint(step: int) -> None:
        write_payload(checkpoint, {"state_dict": tuned_state(model), "optimizer": trainer.optimizer.state_dict(), "step": step,
                                   "log": log, "elapsed_s": elapsed, "settings": asdict(s)})
        write_text_atomically(out / "training_log.csv", _log_csv(log))

    last_save = time.perf_counter()
    began = time.perf_counter() - elapsed
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc="Click fine-tuning", disable=not s.progress)
    for step in bar:
        row = {"step": step + 1, **trainer.step(step)}
        if val_cache and ((step + 1) % s.validate_every == 0 or step + 1 == s.steps):
            row.update(validate(model, val_cache, val_samples))
        elapsed = time.perf_counter() - began
        row["elapsed_s"] = round(elapsed, 1)
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", **({"box": f"{row['val_box']:.3f}", "c3": f"{row['val_click3']:.3f}"} if "val_box" in row else {}))
        if time.perf_counter() - last_save > 60 * s.checkpoint_minutes:
            save_checkpoint(step + 1)
            last_save = time.perf_counter()
    save_checkpoint(s.steps)
    metadata = {"description": s.description, "steps": s.steps, "data": Path(s.data).name, "cases": list(train_cache.source["cases"]),
                "slices": len(train_cache), "samples": len(train_cache.samples), "train_seconds": round(elapsed),
                "validation": [r for r in log if "val_box" in r], "settings": {k: v for k, v in asdict(s).items() if k not in ("progress", "resume")}}
    result = out / RESULT
    save_click_weights(model, result, base_sha, metadata)
    return result
