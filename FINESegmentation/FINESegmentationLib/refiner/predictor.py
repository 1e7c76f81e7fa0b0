"""RefinerPredictor: refine one segment of a volume by clicks (segment-anything's ``SamPredictor`` shape).

``set_volume(volume, segment)`` places the refiner's cubic crop around the segment,
resamples the CT into it, runs the image encoder once, searches the memory once
(the retrieval depends only on the crop) and caches the image embeddings with and
without memory. ``predict(points, labels, previous_mask)`` then only runs the prompt
encoder and the mask decoder, and answers with a mask on the input volume's own grid,
restricted to the crop box::

    predictor = RefinerPredictor()                      # bundled refiner and its memory
    predictor.set_volume(ct, labels.array == 5)         # Volume, bool [z, y, x] mask
    result = predictor.predict([[12.0, -40.5, 88.0]], [1])          # one positive click, RAS mm
    refined = result.paste(labels.array == 5)           # or: segment[result.box] = result.mask
    result = predictor.predict(points, labels, previous_mask=refined)   # the next click

Points are in RAS millimetres (Slicer's world coordinates) or, with
``point_space="ijk"``, continuous (i, j, k) = (x, y, z) voxel indices of the input
volume. Label 1 adds to the segment, 0 removes. A click outside the volume, or
outside the crop box, and an empty segment raise :class:`~FINESegmentationLib.errors.InputError`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..volume import Geometry, Volume
from .build import load_refiner
from .config import DEFAULT_REACH_FACTOR, DEFAULT_REACH_MM, REACH_SEARCH_MM
from .crop import CropGrid, box_on_grid, crop_for_segment, image_crop, inside_cube, logits_to_box, mask_crop
from .memory import ExternalMemory, RetrievedMemory

DEFAULT_MEMORY = "default"
"""``memory=DEFAULT_MEMORY``: the memory registered with the refiner, or none if it has none."""


@dataclass
class RefinerResult:
    """The refined segment inside the crop box.

    mask: bool [z, y, x] of the box's shape, on the input volume's grid; box: the [z, y, x]
    slices of the input grid it covers (clamped to the volume); iou: the refiner's own
    estimate of the mask's IoU; used_memory: whether memory attention took part;
    timings: seconds of the steps of this call.
    """

    mask: np.ndarray
    box: tuple[slice, slice, slice]
    iou: float
    used_memory: bool
    timings: dict[str, float] = field(default_factory=dict)

    def paste(self, segment: np.ndarray) -> np.ndarray:
        """A copy of a full-grid bool ``segment`` with the box replaced by the refined mask."""
        out = np.array(segment, dtype=bool, copy=True)
        out[self.box] = self.mask
        return out


def _resolve_memory(memory: Any, entry) -> tuple[ExternalMemory | None, str]:
    """(memory or None, its name) from a path, a registered name, an ExternalMemory, None or DEFAULT_MEMORY."""
    if memory is None or isinstance(memory, ExternalMemory):
        return memory, "given" if memory is not None else ""
    from ..weights import local_checkpoint

    name = str(memory)
    if name == DEFAULT_MEMORY:
        if entry is None or not entry.memory:
            return None, ""
        name = entry.memory
    path, sha = local_checkpoint(name, kind="refiner-memory")
    return ExternalMemory.load(path, sha), name


class RefinerPredictor:
    """A refiner and, optionally, its memory, loaded once; one volume and segment at a time.

    model: a registered refiner name, a checkpoint path, None (the first registered refiner),
    or a (model, metadata) pair. memory: DEFAULT_MEMORY, a registered memory name, a memory
    file, an :class:`ExternalMemory`, or None for no memory.
    """

    def __init__(self, model: Any = None, memory: Any = DEFAULT_MEMORY, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if isinstance(model, tuple):
            self.model, self.metadata = model
            entry = None
        else:
            self.model, self.metadata, entry = load_refiner(model)
        self.model = self.model.to(self.device).eval()
        self.config = self.model.config
        self.memory, self.memory_name = _resolve_memory(memory, entry)
        if self.memory is not None:
            self.memory.check_compatible(self.model)
        self._volume: Volume | None = None

    @property
    def has_memory(self) -> bool:
        return self.memory is not None

    # ------------------------------------------------------------------ set_volume

    def set_volume(self, volume: Volume, segment: np.ndarray | Volume) -> None:
        """Crop around ``segment`` (bool [z, y, x] on ``volume``'s grid, or a Volume on that grid, nonzero = inside),
        encode the crop and cache its embeddings (with and without memory). Timings in ``self.timings``."""
        start = time.perf_counter()
        mask = np.asarray(segment.array if isinstance(segment, Volume) else segment)
        if isinstance(segment, Volume) and not segment.geometry.allclose(volume.geometry):
            raise InputError("The segment does not lie on the volume's voxel grid; resample it onto the volume first.")
        if mask.shape != volume.shape:
            raise InputError(f"The segment's shape {mask.shape} differs from the volume's {volume.shape}; give a mask on the volume's voxel grid.")
        mask = mask.astype(bool, copy=False)
        if not mask.any():
            raise InputError("The segment to refine is empty; segment the organ first (or paint a rough outline), then refine it with clicks.")
        if not np.isfinite(volume.array).all():
            raise InputError("The volume contains NaN or infinite values; repair or re-export the image before refining.")
        self._volume = None  # a failure below must not leave a half-set state behind
        crop = crop_for_segment(volume.geometry, mask, self.config)
        box = box_on_grid(crop, volume.geometry, volume.shape)
        image = torch.from_numpy(image_crop(volume, crop, self.config))[None, None].to(self.device)
        initial = torch.from_numpy(mask_crop(mask, volume.geometry, crop).astype(np.float32))[None, None].to(self.device)
        prepared = time.perf_counter()
        encoder = self.model.image_encoder
        with torch.inference_mode():
            tokens = encoder.prefix(image)
            embeddings = {False: encoder.suffix(tokens)}
            encoded = time.perf_counter()
            retrieved: RetrievedMemory | None = None
            if self.memory is not None:
                retrieved = self.memory.retrieve(encoder.descriptor(tokens), self.config.knn)
                embeddings[True] = encoder.suffix(tokens, retrieved)
        done = time.perf_counter()
        self._volume, self._crop, self._box, self._image, self._initial = volume, crop, box, image, initial
        # Voxels of the box outside the cube (the corners of an oblique grid's box) keep the previous mask.
        self._inside, self._initial_box = inside_cube(crop, volume.geometry, box), mask[box].copy()
        self._embeddings, self.retrieved = embeddings, retrieved
        self.timings = {"crop_s": prepared - start, "encode_s": encoded - prepared, "memory_s": done - encoded, "total_s": done - start}

    @property
    def crop(self) -> CropGrid:
        self._require_volume()
        return self._crop

    @property
    def box(self) -> tuple[slice, slice, slice]:
        """The [z, y, x] slices of the input grid that predictions cover."""
        self._require_volume()
        return self._box

    def retrieved_examples(self) -> list[dict[str, Any]]:
        """The stored examples the memory retrieved for this crop, nearest first, with weight and distance."""
        self._require_volume()
        if self.retrieved is None:
            return []
        return [
            {**self.memory.examples[int(i)], "weight": float(w), "distance": float(d)}
            for i, w, d in zip(self.retrieved.indices[0], self.retrieved.weights[0], self.retrieved.distances[0])
        ]

    def _require_volume(self) -> None:
        if self._volume is None:
            raise InputError("No volume is set; call set_volume(volume, segment) before predicting.")

    # ------------------------------------------------------------------ predict

    def _crop_points(self, points: np.ndarray, point_space: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) RAS mm or input ijk -> ((N, 3) crop voxel (x, y, z), (N, 3) input ijk), refusing points outside the
        volume or the crop."""
        geometry: Geometry = self._volume.geometry
        if point_space == "ras":
            ijk = np.array([geometry.ras_to_ijk(p) for p in points]).reshape(-1, 3)
        elif point_space == "ijk":
            ijk = points
        else:
            raise InputError(f"Unknown point space '{point_space}'; use 'ras' (millimetres) or 'ijk' (voxel indices).")
        size = np.array(self._volume.shape[::-1])
        for n, p in enumerate(ijk):
            if np.any(p < -0.5) or np.any(p > size - 0.5):
                where = ", ".join(f"{v:.1f}" for v in points[n])
                raise InputError(f"Click {n + 1} ({point_space.upper()} {where}) lies outside the volume; place every click inside the image.")
        lps = (geometry.ijk_to_lps() @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
        voxels = self._crop.lps_to_voxel(lps)
        for n, v in enumerate(voxels):
            if np.any(v < -0.5) or np.any(v > self._crop.size - 0.5):
                side = self._crop.size * self._crop.spacing
                raise InputError(
                    f"Click {n + 1} lies outside the {side:.0f} mm cube the refiner sees around the segment; "
                    "click closer to the segment, or extend the segment to that region first."
                )
        return voxels, ijk

    def _near_clicks(self, ijk: np.ndarray, labels: np.ndarray, previous_box: np.ndarray, reach_mm: float,
                     reach_factor: float) -> np.ndarray:
        """bool [z, y, x] of the crop box: the voxels within each click's reach (input ijk (N, 3), labels (N,)).

        A click's reach is ``reach_mm``, or ``reach_factor`` times its distance to the border of the previous
        mask (``previous_box``) if that is farther: a positive click that far outside the segment (or a negative
        one that deep inside it) marks an error that large. The distance is looked for within
        :data:`REACH_SEARCH_MM` of the click."""
        spacing = np.asarray(self._volume.geometry.spacing, dtype=np.float64)[::-1]  # (z, y, x) mm; the axes are orthonormal
        start = np.array([b.start for b in self._box], dtype=np.float64)
        axes = [np.arange(b.start, b.stop, dtype=np.float64) for b in self._box]  # z, y, x
        near = np.zeros(previous_box.shape, bool)
        for (i, j, k), label in zip(ijk, labels):
            zyx = np.array([k, j, i], dtype=np.float64)
            reach = reach_mm
            if reach_factor > 0:
                centre = np.clip(np.round(zyx - start).astype(int), 0, np.array(previous_box.shape) - 1)
                half = np.ceil(REACH_SEARCH_MM / spacing).astype(int)
                lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, previous_box.shape)
                window = previous_box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                other = np.argwhere(window if label == 1 else ~window)  # the segment (positive click) or what is not
                depth = REACH_SEARCH_MM if not len(other) else float(
                    np.sqrt((((other + lo + start - zyx) * spacing) ** 2).sum(axis=1).min()))
                reach = max(reach_mm, reach_factor * min(depth, REACH_SEARCH_MM))
            near |= (((axes[0] - zyx[0]) * spacing[0])[:, None, None] ** 2 + ((axes[1] - zyx[1]) * spacing[1])[None, :, None] ** 2
                     + ((axes[2] - zyx[2]) * spacing[2])[None, None, :] ** 2) <= reach * reach
        return near

    def _previous_crop(self, previous_mask: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray]:
        """(previous mask in the crop (1, 1, S, S, S), previous mask in the box [z, y, x] bool)."""
        if previous_mask is None:
            return self._initial, self._initial_box
        previous = np.asarray(previous_mask).astype(bool, copy=False)
        geometry = self._volume.geometry
        box_shape = tuple(s.stop - s.start for s in self._box)
        if previous.shape == self._volume.shape:
            # The box covers the cube, so the rest of the volume cannot reach the crop: resample the box only.
            previous = previous[self._box]
        if previous.shape == box_shape:
            start = np.array([self._box[2].start, self._box[1].start, self._box[0].start, 1.0])
            box_geometry = Geometry(geometry.spacing, tuple(geometry.ijk_to_lps()[:3] @ start), geometry.direction)
            crop = mask_crop(previous, box_geometry, self._crop)
        else:
            raise InputError(
                f"The previous mask's shape {previous.shape} is neither the volume's {self._volume.shape} nor the crop box's {box_shape}."
            )
        return torch.from_numpy(crop.astype(np.float32))[None, None].to(self.device), previous

    def predict(self, points: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int] | np.ndarray,
                previous_mask: np.ndarray | None = None, use_memory: bool = True, point_space: str = "ras",
                multimask: bool = False, reach_mm: float | None = DEFAULT_REACH_MM,
                reach_factor: float = DEFAULT_REACH_FACTOR) -> RefinerResult:
        """Refine the segment with clicks.

        points: (N, 3) in RAS mm, or (i, j, k) voxel indices with ``point_space="ijk"``; N may be 0.
        labels: (N,) 1 for a positive click (add), 0 for a negative one (remove).
        previous_mask: bool, on the volume's grid or the crop box's (the last answer, for the
        next click); None uses the segment given to :meth:`set_volume`.
        use_memory: use the memory attention (ignored when no memory is loaded).
        multimask: answer with the best (by predicted IoU) of SAM's three single-click masks
        instead of the mask that answers all clicks together.
        reach_mm: the answer replaces the previous mask only within this many millimetres of a click, or
        ``reach_factor`` times the click's distance to the previous mask's border where that is farther;
        elsewhere the previous mask stays (so no clicks change nothing). None: the whole crop box, as the
        refiner drew it. reach_factor 0: ``reach_mm`` for every click.
        """
        self._require_volume()
        start = time.perf_counter()
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(points):
            raise InputError(f"{len(points)} clicks but {len(labels)} labels; give one label (1 add, 0 remove) per click.")
        if len(labels) and not np.isin(labels, (0, 1)).all():
            raise InputError("Click labels must be 1 (add to the segment) or 0 (remove from it).")
        if reach_mm is not None and not (np.isfinite(reach_mm) and reach_mm > 0):
            raise InputError(f"A click's reach must be a positive number of millimetres, got {reach_mm}; give None for the whole crop.")
        if not (np.isfinite(reach_factor) and reach_factor >= 0):
            raise InputError(f"The reach factor must be 0 or a positive number, got {reach_factor}.")
        voxels, ijk = self._crop_points(points, point_space)
        previous, previous_box = self._previous_crop(previous_mask)
        used_memory = bool(use_memory and self.memory is not None)
        prepared = time.perf_counter()
        with torch.inference_mode():
            masks, iou = self.model.decode(
                self._embeddings[used_memory], self._image,
                torch.from_numpy(voxels).float()[None].to(self.device), torch.from_numpy(labels.astype(np.int64))[None].to(self.device),
                previous,
            )
        decoded = time.perf_counter()
        index = 1 + int(torch.argmax(iou[0, 1:])) if multimask else 0
        logits = masks[0, index].float().cpu().numpy()
        changeable = self._inside if reach_mm is None else self._inside & self._near_clicks(ijk, labels, previous_box, reach_mm, reach_factor)
        mask = np.where(changeable, logits_to_box(logits, self._crop, self._volume.geometry, self._box) > 0, previous_box)
        done = time.perf_counter()
        return RefinerResult(mask, self._box, float(iou[0, index]), used_memory,
                             {"prompts_s": prepared - start, "decoder_s": decoded - prepared, "to_volume_s": done - decoded, "total_s": done - start})
