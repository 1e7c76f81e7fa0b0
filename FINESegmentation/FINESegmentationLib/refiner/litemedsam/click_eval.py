"""Dice of LiteMedSAM on cached labelled slices under fixed prompts: a box alone, and 1..N clicks alone.

* ``box``: the tight box around the organ on the slice, nothing else.
* ``clicks``: no box; click n goes to the deepest point of the largest error of the answer to clicks
  1..n-1 (:func:`..clicks.deepest_click`, in millimetres on the slice's own grid; click 1 to the organ's
  deepest point), positive in a false negative, negative in a false positive. Every prompt carries all
  clicks so far and, with ``mask_prompt``, the previous answer's logits (SAM's interactive loop).

Masks are the model's logits > 0 brought back to the slice's own grid (as the predictor does), and Dice is
computed there against the slice's labels. Samples are decoded in batches, all at the same step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ...labels import ORGAN_BY_LABEL
from ..clicks import deepest_click
from .build import LiteMedSAM
from .predictor import mask_box
from .slice_cache import SliceCache


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@dataclass
class SliceScores:
    """One row per (slice, organ, protocol, clicks): ``{"case", "z", "organ", "protocol", "clicks", "dice"}``."""

    rows: list[dict] = field(default_factory=list)

    def organ_means(self, protocol: str, clicks: int) -> dict[str, float]:
        """Mean Dice per organ name (organs in label order), for one protocol and click count."""
        values: dict[str, list[float]] = {}
        for r in sorted(self.rows, key=lambda r: r["label"]):
            if r["protocol"] == protocol and r["clicks"] == clicks:
                values.setdefault(r["organ"], []).append(r["dice"])
        return {organ: float(np.mean(v)) for organ, v in values.items()}

    def mean(self, protocol: str, clicks: int) -> float:
        """The mean over organs of the per-organ means (each organ counts once, whatever its slice count)."""
        means = self.organ_means(protocol, clicks)
        return float(np.mean(list(means.values()))) if means else float("nan")

    def counts(self) -> dict[str, int]:
        """Samples (slices) per organ name."""
        counts: dict[str, int] = {}
        for r in self.rows:
            if r["protocol"] == "box":
                counts[r["organ"]] = counts.get(r["organ"], 0) + 1
        return counts


def _decode(model: LiteMedSAM, embeddings: torch.Tensor, points=None, boxes=None, masks=None) -> torch.Tensor:
    with torch.inference_mode():
        logits, _ = model.decode(embeddings, points, boxes, masks)
    return logits


def score_slices(model: LiteMedSAM, cache: SliceCache, samples: Sequence[tuple[int, int]], clicks: Sequence[int] = (1, 3, 5),
                 mask_prompt: bool = True, batch_size: int = 8, progress: bool = False) -> SliceScores:
    """Box-only and clicks-only Dice of ``model`` on ``samples`` ((slice index, organ value) of ``cache``)."""
    scores = SliceScores()
    model = model.eval()
    n_clicks = max(clicks) if clicks else 0
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for chunk in tqdm(chunks, desc="Scoring slices", disable=not progress):
        embeddings = cache.embedding([i for i, _ in chunk])
        targets = [cache.slice_target(i, organ) for i, organ in chunk]
        inputs = [cache.inputs(i) for i, _ in chunk]

        def to_masks(logits: torch.Tensor) -> list[np.ndarray]:
            return [inp.to_slice(logits[b : b + 1])[0].numpy() > 0 for b, inp in enumerate(inputs)]

        def record(protocol: str, count: int, masks: list[np.ndarray]) -> None:
            for (index, organ), mask, target in zip(chunk, masks, targets):
                s = cache.slices[index]
                scores.rows.append({"case": s["case"], "z": s["z"], "label": organ, "organ": ORGAN_BY_LABEL[organ].name,
                                    "protocol": protocol, "clicks": count, "dice": dice(mask, target)})

        boxes = torch.cat([inp.box(mask_box(t)) for inp, t in zip(inputs, targets)])
        record("box", 0, to_masks(_decode(model, embeddings, boxes=boxes)))

        masks = [np.zeros_like(t) for t in targets]
        points: list[list[tuple[float, float]]] = [[] for _ in chunk]
        labels: list[list[int]] = [[] for _ in chunk]
        previous = None
        for n in range(1, n_clicks + 1):
            for b, (index, _) in enumerate(chunk):
                click = deepest_click(masks[b], targets[b], cache.spacing(index))
                # An exact answer gets no new click: SAM's "not a point" label (-1) keeps the batch's click count equal.
                y, x = click.position if click is not None else (0, 0)
                points[b].append((x, y))
                labels[b].append(-1 if click is None else int(click.positive))
            coords = torch.cat([inp.points(np.array(p)) for inp, p in zip(inputs, points)])
            logits = _decode(model, embeddings, (coords, torch.tensor(labels)), masks=previous if mask_prompt else None)
            previous = logits
            masks = to_masks(logits)
            if n in clicks:
                record("clicks", n, masks)
    return scores
