"""The cubic crop the refiner sees around a segment, and the way back to the input's grid.

The crop is a cube of ``crop_size``^3 voxels, axis-aligned in LPS (whatever the
input's direction), centred on the segment's bounding box. Its voxels are
``config.spacing`` mm wide, or wider when the segment plus ``config.margin`` on each
side would not fit (a liver at 2.5 mm would), so the whole segment is always seen.
Where the cube leaves the volume the image is air (-1024 HU).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..labels import ORGANS
from ..volume import Geometry, Volume
from .config import RefinerConfig

AIR_HU = -1024.0


@dataclass(frozen=True)
class CropGrid:
    """A size^3 grid of isotropic voxels, axis-aligned in LPS; ``origin`` is voxel (0, 0, 0)'s centre (LPS mm)."""

    origin: tuple[float, float, float]
    spacing: float
    size: int

    def lps_to_voxel(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous crop voxel (x, y, z)."""
        return (np.asarray(lps, dtype=np.float64) - np.asarray(self.origin)) / self.spacing

    def reference(self, pixel: int = sitk.sitkFloat32) -> sitk.Image:
        image = sitk.Image([self.size] * 3, pixel)
        image.SetOrigin(self.origin)
        image.SetSpacing([self.spacing] * 3)
        return image


def segment_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Index bounding box (x, y, z) low and high (inclusive) of a [z, y, x] mask, or None when it is empty."""
    bounds = []
    for axis in (2, 1, 0):  # x, y, z
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        bounds.append((hits[0], hits[-1]))
    lo, hi = zip(*bounds)
    return np.array(lo), np.array(hi)


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 8 corners (8, 3) of the box [lo, hi] (per axis)."""
    return np.array([[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)


def crop_for_segment(geometry: Geometry, mask: np.ndarray, config: RefinerConfig) -> CropGrid:
    """The crop centred on a non-empty [z, y, x] mask on ``geometry``'s grid."""
    bounds = segment_bounds(mask)
    if bounds is None:
        raise ValueError("crop_for_segment needs a non-empty mask.")
    corners = _corners(bounds[0] - 0.5, bounds[1] + 0.5)
    lps = (geometry.ijk_to_lps() @ np.c_[corners, np.ones(8)].T).T[:, :3]
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    side = max(config.crop_size * config.spacing, float((hi - lo).max()) * (1 + 2 * config.margin))
    spacing = side / config.crop_size
    origin = (lo + hi) / 2 - (config.crop_size - 1) / 2 * spacing
    return CropGrid(tuple(float(v) for v in origin), float(spacing), config.crop_size)


def box_on_grid(crop: CropGrid, geometry: Geometry, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The [z, y, x] slices of the input grid whose voxel centres the crop's bounding box covers, clamped to the volume.

    On an input grid aligned with LPS (most CT) every voxel of the box lies in the cube; on an
    oblique grid the box's corners may not (see :func:`inside_cube`).
    """
    half = crop.spacing / 2
    lo = np.asarray(crop.origin) - half
    hi = np.asarray(crop.origin) + (crop.size - 1) * crop.spacing + half
    lps = _corners(lo, hi)
    ijk = (np.linalg.inv(geometry.ijk_to_lps()) @ np.c_[lps, np.ones(8)].T).T[:, :3]
    first = np.clip(np.ceil(ijk.min(axis=0) - 1e-6), 0, None).astype(int)
    last = np.minimum(np.floor(ijk.max(axis=0) + 1e-6).astype(int), np.array(shape[::-1]) - 1)
    return tuple(slice(int(first[a]), int(last[a]) + 1) for a in (2, 1, 0))  # type: ignore[return-value]


def inside_cube(crop: CropGrid, geometry: Geometry, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Box-shaped bool [z, y, x]: the voxels of the box whose centres lie in the crop's cube."""
    return logits_to_box(np.ones((crop.size,) * 3, np.float32), crop, geometry, box) > 0


def _sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def image_crop(volume: Volume, crop: CropGrid, config: RefinerConfig) -> np.ndarray:
    """The CT in the crop, linearly resampled, clipped to the HU window and mapped to [-1, 1]: (S, S, S) float32 [z, y, x]."""
    image = sitk.Resample(_sitk(np.asarray(volume.array, dtype=np.float32), volume.geometry), crop.reference(),
                          sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return normalise(sitk.GetArrayFromImage(image), config)


def normalise(hu: np.ndarray, config: RefinerConfig) -> np.ndarray:
    low, high = config.hu_window
    out = np.clip(hu, low, high).astype(np.float32)
    return (out - (low + high) / 2) / ((high - low) / 2)


def mask_crop(mask: np.ndarray, geometry: Geometry, crop: CropGrid) -> np.ndarray:
    """A [z, y, x] mask on ``geometry``'s grid, in the crop: (S, S, S) bool (voxels at least half covered)."""
    image = sitk.Resample(_sitk(mask.astype(np.uint8), geometry), crop.reference(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(image) >= 0.5


def labels_crop(labels: np.ndarray, geometry: Geometry, crop: CropGrid) -> np.ndarray:
    """A label map in the crop by nearest neighbour: (S, S, S) of the input's dtype."""
    image = sitk.Resample(_sitk(labels, geometry), crop.reference(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(image)


def logits_to_box(logits: np.ndarray, crop: CropGrid, geometry: Geometry, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Crop logits (S, S, S) [z, y, x] linearly resampled onto the input grid inside ``box``: box-shaped float32."""
    source = sitk.GetImageFromArray(np.ascontiguousarray(logits, dtype=np.float32))
    source.SetOrigin(crop.origin)
    source.SetSpacing([crop.spacing] * 3)
    start = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
    reference = sitk.Image([box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start], sitk.sitkFloat32)
    reference.SetSpacing(geometry.spacing)
    reference.SetDirection(geometry.direction)
    reference.SetOrigin(tuple(geometry.ijk_to_lps()[:3] @ np.append(start, 1.0)))
    out = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, -20.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


MIN_ORGAN_VOXELS = 50  # smaller label fragments (an organ cut by the field of view) are skipped


@dataclass
class TrainingCrop:
    """One labelled crop: normalised image (S, S, S) float16, organ labels (S, S, S) uint8, the organ's label."""

    case_id: str
    organ: int
    image: np.ndarray
    labels: np.ndarray


def organ_crops(case_id: str, image: Volume, labels: Volume, config: RefinerConfig, rng: np.random.Generator | None,
                per_organ: int = 1, shift: float = 0.1) -> list[TrainingCrop]:
    """Crops around every organ of a labelled case; with ``rng``, each shifted by up to ``shift`` of its side per axis."""
    crops = []
    for organ in ORGANS:
        mask = labels.array == organ.label
        if mask.sum() < MIN_ORGAN_VOXELS:
            continue
        base = crop_for_segment(labels.geometry, mask, config)
        for _ in range(per_organ):
            origin = np.asarray(base.origin)
            if rng is not None:
                origin = origin + rng.uniform(-shift, shift, 3) * base.spacing * base.size
            crop = CropGrid(tuple(float(v) for v in origin), base.spacing, base.size)
            crops.append(TrainingCrop(case_id, organ.label, image_crop(image, crop, config).astype(np.float16),
                                      labels_crop(labels.array.astype(np.uint8), labels.geometry, crop)))
    return crops
