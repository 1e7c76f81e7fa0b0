"""Simulated clicks, as a user correcting a segment would place them (for training and evaluation).

The protocol of Memorizing SAM / SAM-Med3D: a click goes to the deepest point (largest
distance to the error's border, by Euclidean distance transform in mm) of the largest
error region; it is positive in a false negative (the segment misses it) and negative
in a false positive. :func:`deepest_click` works on a volume [z, y, x] or a slice [y, x]. After ``deepest`` such clicks, further clicks fall uniformly at
random in the errors, with the same sign rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Click:
    """An index ``[z, y, x]`` (or ``[y, x]`` on a slice) of the grid it was made on, and whether it adds to the segment."""

    position: tuple[int, ...]
    positive: bool

    @property
    def xyz(self) -> tuple[int, int, int]:
        """The index in (x, y, z) = (i, j, k) order, as points are given to the refiner."""
        return self.position[2], self.position[1], self.position[0]


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(component mask, voxel count) of the largest fully connected (26 in 3-D, 8 in 2-D) component of ``mask`` ((empty, 0) if none)."""
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if count == 0:
        return np.zeros_like(mask), 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes)) + 1
    return labels == best, int(sizes[best - 1])


def deepest_click(prediction: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Click | None:
    """The click at the deepest point of the largest error region, or None when there is no error.

    prediction, target: bool [z, y, x] (or [y, x]) on one grid; spacing: (x, y, z) (or (x, y)) mm of that grid.
    """
    false_negative, fn_size = _largest_component(target & ~prediction)
    false_positive, fp_size = _largest_component(prediction & ~target)
    if fn_size == 0 and fp_size == 0:
        return None
    positive = fn_size >= fp_size
    region = false_negative if positive else false_positive
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    # Pad so that the crop's own border counts as the region's border: the click stays inside.
    inner = (slice(1, -1),) * region.ndim
    distance = ndimage.distance_transform_edt(np.pad(region[box], 1), sampling=tuple(spacing)[: region.ndim][::-1])[inner]
    index = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return Click(tuple(int(i + b.start) for i, b in zip(index, box)), positive)


def random_click(prediction: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> Click | None:
    """A click uniformly at random in the errors (positive in a false negative), or None when there is none."""
    errors = np.flatnonzero(prediction != target)
    if errors.size == 0:
        return None
    z, y, x = np.unravel_index(int(errors[rng.integers(errors.size)]), target.shape)
    return Click((int(z), int(y), int(x)), bool(target[z, y, x]))


def next_click(prediction: np.ndarray, target: np.ndarray, clicks_so_far: int, rng: np.random.Generator,
               spacing: Sequence[float] = (1.0, 1.0, 1.0), deepest: int = 3) -> Click | None:
    """Click number ``clicks_so_far + 1``: at the deepest error point for the first ``deepest`` clicks, then at random."""
    if clicks_so_far < deepest:
        return deepest_click(prediction, target, spacing)
    return random_click(prediction, target, rng)
