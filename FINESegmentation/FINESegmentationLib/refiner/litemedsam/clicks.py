"""Prompts as SAM was trained with them, simulated on one slice: a jittered box, and clicks in the errors.

SAM's interactive training (Kirillov et al., 2023, appendix A): the first prompt is a box or one
positive click; each later click goes into the error between the previous prediction and the
reference, positive in a false negative, negative in a false positive; the previous mask's logits come
back as the mask prompt. Here a click is placed, at random, either at the deepest point of the largest
error (as a careful user clicks, and as the evaluation does: :func:`..clicks.deepest_click`) or
uniformly inside the error away from its border (SAM's uniform sampling, without clicks on one-pixel
slivers that no user would aim at). Coordinates are pixels (x, y) of the 256 x 256 model input.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..clicks import deepest_click
from .predictor import mask_box

BOX_JITTER = 0.1  # each box side moves by up to this share of the box's size ...
BOX_JITTER_MAX = 5.0  # ... and by at most this many pixels (SAM: 20 px at 1024, i.e. 5 at 256)
INTERIOR_SHARE = 0.3  # uniform clicks fall where the error is at least this share of its deepest point


def jittered_box(mask: np.ndarray, rng: np.random.Generator, limits: tuple[int, int] | None = None) -> np.ndarray:
    """The box around ``mask`` with each side moved at random (SAM's box noise), kept inside ``limits`` (width, height)."""
    box = mask_box(mask)
    size = np.tile(box[2:] - box[:2] + 1, 2)
    shift = rng.uniform(-1.0, 1.0, 4) * np.minimum(BOX_JITTER * size, BOX_JITTER_MAX)
    box = box + shift
    width, height = limits if limits is not None else (mask.shape[1], mask.shape[0])
    box = np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1])
    lo, hi = np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])
    return np.concatenate([lo, hi])


def uniform_click(prediction: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[float, float, int] | None:
    """A click uniformly inside the error's interior: (x, y, 1) in a false negative, (x, y, 0) in a false positive."""
    error = prediction != target
    if not error.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(depth >= max(1.0, INTERIOR_SHARE * depth.max()))
    n = int(rng.integers(len(xs)))
    return float(xs[n]), float(ys[n]), int(target[ys[n], xs[n]])


def training_click(prediction: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                   deepest_share: float = 0.5) -> tuple[float, float, int] | None:
    """The next simulated click (x, y, label 1/0) on a slice, or None when the prediction is already exact.

    With probability ``deepest_share`` at the deepest point of the largest error, else uniformly inside the errors."""
    if rng.random() < deepest_share:
        click = deepest_click(prediction, target)
        if click is None:
            return None
        y, x = click.position
        return float(x), float(y), int(click.positive)
    return uniform_click(prediction, target, rng)
