"""From a CT volume to the network's grid and intensities, and back.

The network sees the image reoriented to the checkpoint's orientation (LPS by
default), resampled to its target spacing, clipped and z-scored as its metadata
says. Predictions go back to the input's own grid by resampling in physical
space, so the output's geometry equals the input's exactly, oblique or not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .checkpoints import Preprocessing
from .errors import InputError
from .io import volume_to_sitk
from .volume import Volume

logger = logging.getLogger(__name__)

AIR_HU = -1024.0


@dataclass
class PreparedVolume:
    """The network's view of a volume: a z-scored float32 array [z, y, x] on the resampled grid."""

    array: np.ndarray
    grid: sitk.Image  # an image of the resampled grid (geometry only is used), for resampling back
    warnings: list[str] = field(default_factory=list)


def check_ct(volume: Volume) -> list[str]:
    """Refuse what cannot be a CT and return warnings for what may not be one."""
    a = volume.array
    if a.size == 0 or min(a.shape) < 2:
        raise InputError(f"The volume of shape {a.shape} is too small to segment; load a 3-D CT with several slices.")
    if not np.isfinite(a).all():
        raise InputError("The volume contains NaN or infinite values; repair or re-export the image before segmenting it.")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-3:
        raise InputError(f"The volume is empty (every voxel is {lo:g}); load a CT that holds an image.")
    warnings = []
    # A CT has air near -1000 HU and reaches soft tissue and bone above 100 HU. An MR or a
    # rescaled image does not; FINE is trained on CT only, so it may segment nonsense.
    if lo > -500 or hi < 100:
        warnings.append(
            f"The intensities range from {lo:g} to {hi:g}, not like a CT in Hounsfield units (air near -1000); "
            "this looks like an MR or a rescaled image, and FINE is trained on CT only."
        )
    return warnings


# Thin slabs: a scan shorter than this along the body's axis is segmented on a grid of half the model's
# slice spacing (3 mm instead of 6 for the bundled model), so that a 40 mm slab spans 13 network slices
# instead of 7. Measured on 40 mm slabs (three of the real CT, fourteen cut from held-out synthetic
# volumes) and the held-out synthetic slabs of 46 and 54 mm; on the 67 mm synthetic slab and on whole
# volumes (the real CT's 90 mm included) the finer grid lost, so it stops below 60 mm (README, "Thin slabs").
THIN_SLAB_MM = 60.0


def axial_extent_mm(volume: Volume) -> float:
    """The scan's length along the body's (superior-inferior) axis: the extent of the voxel axis closest
    to it, whatever the file's orientation."""
    direction = volume.geometry.direction_matrix  # columns: the voxel axes i, j, k in LPS
    axis = int(np.argmax(np.abs(direction[2, :])))
    size = volume.shape[::-1][axis]
    return float(size * volume.geometry.spacing[axis])


def network_spacing(volume: Volume, pre: Preprocessing, thin_slab_mm: float | None = THIN_SLAB_MM) -> tuple[float, float, float]:
    """The grid (x, y, z mm) FINE segments ``volume`` on: the model's ``target_spacing``, with half its
    slice spacing for a scan shorter than ``thin_slab_mm`` along the body (None: never)."""
    x, y, z = (float(v) for v in pre.target_spacing)
    axial = pre.orientation[2:3].upper() in ("S", "I")
    if thin_slab_mm is not None and axial and axial_extent_mm(volume) < thin_slab_mm:
        return (x, y, z / 2.0)
    return (x, y, z)


def prepare(volume: Volume, pre: Preprocessing, spacing: tuple[float, float, float] | None = None) -> PreparedVolume:
    """Reorient, resample (linear) to ``spacing`` (default ``pre.target_spacing``) and normalise a CT."""
    warnings = check_ct(volume)
    for w in warnings:
        logger.warning(w)
    image = sitk.DICOMOrient(volume_to_sitk(volume), pre.orientation)
    spacing_in = np.array(image.GetSpacing())
    target = np.array(pre.target_spacing if spacing is None else spacing, dtype=float)
    size = np.maximum(1, np.round(np.array(image.GetSize()) * spacing_in / target)).astype(int)
    # Keep the physical extent: the first voxel centre moves by half the spacing change.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((target - spacing_in) / 2)
    resampled = sitk.Resample(
        image, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(), target.tolist(),
        image.GetDirection(), AIR_HU, sitk.sitkFloat32,
    )
    array = sitk.GetArrayFromImage(resampled)
    np.clip(array, pre.clip[0], pre.clip[1], out=array)
    array -= pre.mean
    array /= pre.std
    return PreparedVolume(array=array, grid=resampled, warnings=warnings)


def _reference_grid(reference: Volume, pixel: int) -> sitk.Image:
    """An image on ``reference``'s grid (its voxels are not used, only its geometry)."""
    grid = sitk.Image([int(n) for n in reference.shape[::-1]], pixel)
    grid.SetSpacing(reference.geometry.spacing)
    grid.SetOrigin(reference.geometry.origin)
    grid.SetDirection(reference.geometry.direction)
    return grid


def _on_prepared_grid(array: np.ndarray, prepared: PreparedVolume) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(prepared.grid)
    return image


def labels_to_input_grid(labels: np.ndarray, prepared: PreparedVolume, reference: Volume) -> Volume:
    """Nearest-neighbour resampling of a label map [z, y, x] on the prepared grid onto the input's grid."""
    image = _on_prepared_grid(labels.astype(np.uint8, copy=False), prepared)
    out = sitk.Resample(image, _reference_grid(reference, sitk.sitkUInt8), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return Volume(sitk.GetArrayFromImage(out), reference.geometry)


def argmax_on_input_grid(probabilities: np.ndarray, prepared: PreparedVolume, reference: Volume, chunk_slices: int = 32) -> Volume:
    """The label map on the input's grid from per-class probabilities [C, z, y, x] (class 0 background) on the
    prepared grid, each class resampled linearly and the argmax taken there (as nnU-Net exports): outlines at the
    input's resolution instead of the prepared grid's blocks. Outside the prepared grid, background (as
    nearest-neighbour resampling gives).

    Only where a class can win is it resampled: the interpolated probabilities still sum to 1, so a class wins
    only where it reaches 1/C, hence within one prepared voxel of where it reaches 1/C on the prepared grid.
    Background is resampled over the box around every organ's such region, each organ over its own box, in
    slabs of ``chunk_slices`` input slices (memory: a few float slabs besides the result)."""
    n = probabilities.shape[0]
    labels = np.zeros(reference.shape, np.uint8)
    can_win = probabilities[1:] >= 1.0 / n
    if not can_win.any():
        return Volume(labels, reference.geometry)
    grid = _reference_grid(reference, sitk.sitkFloat32)

    def input_box(mask: np.ndarray) -> tuple[slice, ...] | None:
        """The input-grid index box (z, y, x slices) within one prepared voxel of ``mask`` (prepared grid)."""
        where = np.nonzero(mask)
        if not where[0].size:
            return None
        lo = [int(w.min()) - 1 for w in where]  # (z, y, x) prepared indices
        hi = [int(w.max()) + 1 for w in where]
        corners = [(x, y, z) for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
        points = [prepared.grid.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner]) for corner in corners]
        index = np.array([grid.TransformPhysicalPointToContinuousIndex(p) for p in points])  # (x, y, z) input
        start = np.maximum(np.floor(index.min(0)).astype(int), 0)
        stop = np.minimum(np.ceil(index.max(0)).astype(int) + 1, np.array(reference.shape[::-1]))
        if (stop <= start).any():
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))

    def resample(c: int, box: tuple[slice, ...]) -> np.ndarray:
        sub = sitk.Image([b.stop - b.start for b in box[::-1]], sitk.sitkFloat32)
        sub.SetSpacing(grid.GetSpacing())
        sub.SetDirection(grid.GetDirection())
        sub.SetOrigin(grid.TransformIndexToPhysicalPoint([b.start for b in box[::-1]]))
        image = _on_prepared_grid(np.ascontiguousarray(probabilities[c], dtype=np.float32), prepared)
        return sitk.GetArrayFromImage(sitk.Resample(image, sub, sitk.Transform(), sitk.sitkLinear, 1.0 if c == 0 else 0.0, sitk.sitkFloat32))

    union = input_box(can_win.any(0))
    if union is None:
        return Volume(labels, reference.geometry)
    boxes = {c: input_box(can_win[c - 1]) for c in range(1, n)}
    step = max(1, int(chunk_slices))
    for z0 in range(union[0].start, union[0].stop, step):
        slab = (slice(z0, min(z0 + step, union[0].stop)), union[1], union[2])
        best = resample(0, slab)
        region = labels[slab]  # a view: the organs are written into labels through it
        for c, box in boxes.items():
            if box is None:
                continue
            box = tuple(slice(max(b.start, u.start), min(b.stop, u.stop)) for b, u in zip(box, slab))
            if any(b.stop <= b.start for b in box):
                continue
            inner = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, slab))
            values = resample(c, box)
            held = best[inner]
            better = values > held
            np.copyto(held, values, where=better)
            region[inner][better] = c
    return Volume(labels, reference.geometry)


def scalar_to_input_grid(array: np.ndarray, prepared: PreparedVolume, reference: Volume) -> np.ndarray:
    """Linear resampling of one float map [z, y, x] on the prepared grid onto the input's grid.

    Holds one input-sized copy besides the result (SimpleITK's image, freed on return)."""
    image = _on_prepared_grid(np.ascontiguousarray(array, dtype=np.float32), prepared)
    resampled = sitk.Resample(image, _reference_grid(reference, sitk.sitkFloat32), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def probabilities_to_input_grid(probabilities: np.ndarray, prepared: PreparedVolume, reference: Volume) -> np.ndarray:
    """Linear resampling of per-class probabilities [C, z, y, x] onto the input's grid, one class at a time."""
    grid = _reference_grid(reference, sitk.sitkFloat32)
    out = np.empty((probabilities.shape[0], *reference.shape), np.float32)
    for c, p in enumerate(probabilities):
        image = _on_prepared_grid(np.ascontiguousarray(p, dtype=np.float32), prepared)
        out[c] = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    return out
