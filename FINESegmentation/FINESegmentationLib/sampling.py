"""Training crops with their positions, from whole cases or from partial fields of view.

A crop's position (what the volume tokens use) is its centre minus the centre of the
volume it was cut from, after MONAI's padding of a volume smaller than the crop (by
``diff // 2`` in front): the frame ``inference`` uses with ``sliding_window_inference``.

Partial fields of view: most real scans do not cover the abdomen the way the training
volumes do (a 40 mm slab, a tight CTA field of view, a scan off-centre), so a crop's
position must not be its only clue. With ``fov_probability`` a sample first cuts a random
sub-volume out of the case (z extent from ``MIN_SLAB_MM`` to the full length; in-plane a
square of ``MIN_IN_PLANE_MM`` up to the full width, anywhere that holds the anchor voxel; each extent
drawn uniformly, or log-uniformly with ``fov_extent="log"``),
and the crop and its position are then taken as inference would take them on a scan that
covered only that sub-volume. The warm-up crops of a carried bank come from the same
sub-volume (``region``), as all the crops of one scan do at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SLAB_MM = 40.0  # the thinnest slab in the held-out real data
MIN_IN_PLANE_MM = 120.0  # a tight CTA-like field of view
#: How a partial field of view's extents are drawn: uniformly between the minimum and the case's size, or
#: log-uniformly (thin slabs and tight crops as often as each doubling of the extent).
FOV_EXTENTS = ("uniform", "log")

Region = tuple[slice, slice, slice]


@dataclass
class Crop:
    case: int  # index of the case in the sampler
    image: np.ndarray  # [z, y, x] float32
    label: np.ndarray  # [z, y, x] uint8
    position: np.ndarray  # (z, y, x): crop centre minus the padded sub-volume's centre, in voxels
    region: Region  # the sub-volume of the case that played the scan (the whole case when not cut)


def extract(array: np.ndarray, start: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """``array[start:start + size]`` where the box may reach outside ``array``; outside is ``fill``."""
    out = np.full(tuple(int(s) for s in size), fill, dtype=array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, array.shape)
    if np.all(hi > lo):
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        out[dst] = array[src]
    return out


class CropSampler:
    """Random crops of prepared cases (``image`` and ``label`` [z, y, x] on the network's grid of
    ``spacing`` (x, y, z) mm); a share ``foreground_fraction`` is centred on an organ voxel."""

    def __init__(self, cases, crop: tuple[int, int, int], air: float, foreground_fraction: float, rng: np.random.Generator,
                 fov_probability: float = 0.0, spacing: tuple[float, float, float] = (3.0, 3.0, 6.0),
                 fov_extent: str = "uniform") -> None:
        if fov_extent not in FOV_EXTENTS:
            raise ValueError(f"fov_extent must be one of {FOV_EXTENTS}, not {fov_extent!r}")
        self.fov_extent = fov_extent
        self.crop = np.array(crop)
        self.air = air
        self.fg = foreground_fraction
        self.fov_probability = fov_probability
        self.rng = rng
        zyx = np.array(spacing, dtype=float)[::-1]
        self.min_extent = np.ceil(np.array([MIN_SLAB_MM, MIN_IN_PLANE_MM, MIN_IN_PLANE_MM]) / zyx).astype(int)
        self.cases = [(c.image, c.label, {v: np.argwhere(c.label == v) for v in np.unique(c.label) if v}) for c in cases]

    def region(self, index: int, anchor: np.ndarray | None = None) -> Region:
        """A random sub-volume of case ``index`` that holds ``anchor`` (a voxel, default random)."""
        shape = np.array(self.cases[index][0].shape)
        if anchor is None:
            anchor = np.array([int(self.rng.integers(s)) for s in shape])
        low = np.minimum(self.min_extent, shape)
        z = self._extent(low[0], shape[0])
        side = self._extent(max(low[1], low[2]), max(shape[1], shape[2]))  # square in-plane, like a scan's field of view
        lengths = np.array([z, min(side, shape[1]), min(side, shape[2])])
        starts = [int(self.rng.integers(max(0, a - n + 1), min(a, s - n) + 1)) for a, n, s in zip(anchor, lengths, shape)]
        return tuple(slice(int(s), int(s + n)) for s, n in zip(starts, lengths))

    def _extent(self, low: int, high: int) -> int:
        """A sub-volume's extent along one axis, ``low``..``high`` voxels: uniform, or log-uniform (``fov_extent``
        "log": a 40 mm slab as likely as a 40-80 mm one or a 160-320 mm one)."""
        if self.fov_extent == "uniform" or high <= low:
            return int(self.rng.integers(low, high + 1))
        return int(np.clip(np.round(np.exp(self.rng.uniform(np.log(low), np.log(high + 1)))), low, high))

    def _organ_voxel(self, organs: dict, region: Region | None = None) -> np.ndarray | None:
        """A voxel of a random organ (of those inside ``region``, when given), or None if there is none."""
        choices = list(organs.values())
        if region is not None:
            lo, hi = np.array([r.start for r in region]), np.array([r.stop for r in region])
            choices = [v[np.all((v >= lo) & (v < hi), axis=1)] for v in choices]
            choices = [v for v in choices if len(v)]
        if not choices:
            return None
        voxels = choices[int(self.rng.integers(len(choices)))]
        return voxels[int(self.rng.integers(len(voxels)))]

    def sample(self, index: int | None = None, region: Region | None = None) -> Crop:
        """A crop of case ``index`` (default: a random case), cut from ``region`` (default: with
        ``fov_probability`` a random sub-volume, else the whole case)."""
        i = int(self.rng.integers(len(self.cases))) if index is None else index
        image, label, organs = self.cases[i]
        centred = bool(organs) and self.rng.random() < self.fg
        if region is None:
            anchor = self._organ_voxel(organs) if centred else None
            cut = self.fov_probability > 0 and self.rng.random() < self.fov_probability  # no draw when off: runs stay reproducible
            region = self.region(i, anchor) if cut else tuple(slice(0, s) for s in image.shape)
        else:
            anchor = self._organ_voxel(organs, region) if centred else None
        first = np.array([r.start for r in region])
        shape = np.array([r.stop - r.start for r in region])
        padded = np.maximum(shape, self.crop)
        front = (padded - shape) // 2  # MONAI pads a volume smaller than the crop by diff // 2 in front
        high = padded - self.crop
        if anchor is not None:
            start = np.clip(anchor - first + front - self.crop // 2, 0, high)
        else:
            start = np.array([int(self.rng.integers(h + 1)) for h in high])
        # Padded sub-volume coordinates -> case coordinates; outside the sub-volume is air.
        origin = start - front
        crop_image = extract(image[region], origin, self.crop, self.air)
        crop_label = extract(label[region], origin, self.crop, 0)
        position = (2 * start + self.crop - padded) / 2.0
        return Crop(i, crop_image, crop_label, position, region)
