"""SlicePredictor: one segment of a CT drawn by LiteMedSAM slice by slice (segment-anything's ``SamPredictor`` shape).

``set_volume(volume)`` only looks at the volume's geometry (:class:`~.slices.SliceFrame`); each axial
slice is embedded by the image encoder the first time a prompt needs it, and the embedding is kept
(least recently used first out, ``cache_slices`` at most) for the next prompts on that volume.
``predict(...)`` then prompts, propagates and answers with a mask on the volume's own grid::

    predictor = SlicePredictor()                               # bundled LiteMedSAM weights
    predictor.set_volume(ct)                                   # a Volume (array + geometry)
    result = predictor.predict(box=[[-60, 10, 120], [-20, 50, 120]])          # two RAS corners, one slice
    result.mask                                                # bool [z, y, x] on ct's grid: the whole organ
    result = predictor.predict(points=[[-41, 30, 132]], labels=[0], previous_mask=result.mask)  # a click

How a prompt becomes a 3-D segment (``propagate=True``):

* A box on one slice segments that slice, then each neighbour, up and down, is prompted with the box
  around the previous slice's mask, enlarged by ``box_margin_mm`` (and, with ``mask_prompt``, that
  mask's logits), until the organ ends: the mask is empty or under ``min_area_mm2``, its predicted IoU is
  under ``min_iou``, or it overlaps the previous slice's mask by less than ``min_overlap`` of its own
  area (it jumped to another structure). A box spanning several slices (a 3-D ROI) prompts its middle
  slice and propagation stays inside its slices.
* Clicks on a slice re-prompt that slice (with the box of the segment there, or the drawn box) and
  re-propagate from it, stopping also where the new slice agrees with the previous mask (Dice at
  least ``settle_dice``): a local correction stays local. After clicks, propagation also ends where
  the mask grows by more than ``max_growth`` times the previous slice's (and by over
  ``min_growth_mm2``): an organ's cross-section changes gradually, so such a jump is the mask running
  into a neighbour (a kidney into the liver). Positive clicks near the segment only add to
  it and negative ones only remove (slice by slice, until that changes little); an addition also stops
  where it exceeds ``max_addition`` times what the clicks added on their own slice (and by over
  ``min_growth_mm2``): an answer that creeps a little further into a neighbour on each slice (the
  stomach into bowel) has no sudden jump for the growth stop to catch (0 turns this off); clicks on a slice where
  the segment is empty add the part it missed, and their propagation stops at the first slice that holds
  the segment. A correction keeps the segment on the slice where its propagation stops. With
  ``cut_ignored`` (off; README measures it), when the decoder's answer ignores a negative click (it still
  holds it), the click-tuned decoder is asked for the structure under the click (as a positive click
  alone), and that structure's parts under the clicks are taken away, unless it holds more than
  ``max_removal`` of the segment on the clicked slice (then the structure is the organ itself); the cut
  is followed slice by slice only through parts that touch what it removed on the slice before
  (``removal_reach_mm``), and stops where it would take more than ``max_removal`` of the segment there.
  With ``skip_ignored_removal`` (off; README measures it), such a negative click changes nothing instead
  (what the answer leaves out is not what was asked to go).
* Slices that propagation does not reach keep ``previous_mask``.

The published weights were trained with boxes only: with them, clicks on a slice where the segment is
empty give nothing, so such a request is refused with a sentence saying to draw a box. The click-tuned
weights (``litemedsam-clicks``, :mod:`.click_weights`; the default when registered) answer clicks alone:
a positive click where the segment is empty creates the organ on its slice, which then propagates; on a
slice that holds the segment, the clicks come with the box around the parts of the segment near a
positive click (``click_reach_mm``), widened to take them in, and alone when no part is that near (the
segment there is another structure).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from ...errors import InputError
from ...volume import Volume
from .build import LiteMedSAM, load_litemedsam
from .memory import SliceMemory, load_slice_memory
from .slices import CT_WINDOW, SliceFrame, SliceInput, enlarged_box, mask_box  # noqa: F401 (mask_box: imported from here too)


@dataclass(frozen=True)
class PropagationSettings:
    """How a prompt spreads from slice to slice (README measures the defaults against variants on a real CT)."""

    box_margin_mm: float = 5.0
    mask_prompt: bool = False
    min_area_mm2: float = 20.0
    min_iou: float = 0.5
    relative_iou: float = 0.8
    min_overlap: float = 0.3
    settle_dice: float = 0.95
    click_reach_mm: float = 10.0
    keep_dice: float = 0.5
    settle_change: float = 0.05
    monotone: bool = True
    honour_clicks: bool = False
    cut_ignored: bool = False
    max_growth: float = 1.5
    min_growth_mm2: float = 100.0
    removal_reach_mm: float = 5.0
    max_removal: float = 0.5
    skip_ignored_removal: bool = False
    max_addition: float = 2.0


@dataclass
class SliceAnswer:
    """LiteMedSAM's answer on one frame slice: mask (H, W) bool, model-input logits (1, 1, 256, 256), predicted IoU."""

    mask: np.ndarray
    logits: torch.Tensor
    iou: float


@dataclass
class Prediction:
    """The segment after a prompt.

    mask: bool [z, y, x] on the volume's grid; drawn: predicted IoU of every frame slice redrawn (the
    organ's extent there); prompted: the frame slices prompted directly; stops: why propagation ended
    on each side ("up"/"down" -> reason); used_memory: whether the memory was read; timings: seconds of
    embedding, decoding and in total.
    """

    mask: np.ndarray
    used_memory: bool = False
    drawn: dict[int, float] = field(default_factory=dict)
    prompted: list[int] = field(default_factory=list)
    stops: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _follows(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> bool:
    """Whether a slice mask holds every positive click (x, y) and none of the negative ones."""
    h, w = mask.shape
    for (x, y), label in zip(np.asarray(points).reshape(-1, 2), np.asarray(labels).reshape(-1)):
        if bool(mask[int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))]) != bool(label == 1):
            return False
    return True


def _combine(before: np.ndarray | None, answer: np.ndarray, mode: str) -> np.ndarray:
    """A slice's new mask: positive clicks only add to the segment there, negative ones only remove from it
    (``remove``: the answer is what stays; ``cut``: the answer is the structure under the clicks, which goes)."""
    if mode == "add":
        return before | answer
    if mode == "remove":
        return before & answer
    if mode == "cut":
        return before & ~answer
    return answer


def _parts_at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The connected parts of a slice mask that hold one of the clicks (x, y)."""
    parts, _ = ndimage.label(mask)
    h, w = mask.shape
    held = {int(parts[int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))]) for x, y in np.asarray(points).reshape(-1, 2)}
    held.discard(0)
    return np.isin(parts, list(held)) if held else np.zeros(mask.shape, bool)


def _removal_near(before: np.ndarray, combined: np.ndarray, removed_before: np.ndarray, reach_px: np.ndarray) -> np.ndarray:
    """``combined`` with only those removed parts of ``before`` that touch (within ``reach_px`` (y, x) pixels) what
    was removed on the neighbouring slice: a removal goes on through the structure the click took away, not
    into another part of the segment that the decoder's answer happened to leave out."""
    removed = before & ~combined
    if not removed.any():
        return combined
    if not removed_before.any():
        return before.copy()
    near = ndimage.distance_transform_edt(~removed_before, sampling=(1.0 / reach_px[0], 1.0 / reach_px[1])) <= 1.0
    parts, _ = ndimage.label(removed)
    touching = np.unique(parts[near & removed])
    return before & ~np.isin(parts, touching[touching > 0])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


class SlicePredictor:
    """LiteMedSAM loaded once; one volume at a time, its slice embeddings cached.

    model: a registered weights name (published ``litemedsam`` or click-tuned ``litemedsam-clicks``), a
    weights file, None (the click-tuned weights when registered, else the published ones; with a memory, the
    weights it was built over) or a :class:`~.build.LiteMedSAM`; ``click_trained`` says whether its decoder answers clicks alone. window: the CT window in HU. memory: None, a registered memory name, a
    memory file or a :class:`~.memory.SliceMemory` built with these weights; ``use_memory`` (on when a
    memory is given) or ``predict(use_memory=...)`` switches it.
    """

    def __init__(self, model: Any = None, device: str | torch.device = "cpu", settings: PropagationSettings | None = None,
                 cache_slices: int = 128, window: tuple[float, float] = CT_WINDOW, memory: Any = None) -> None:
        self.device = torch.device(device)
        self.memory: SliceMemory | None = memory if memory is None or isinstance(memory, SliceMemory) else load_slice_memory(memory)
        if model is None and self.memory is not None and not self.memory.metadata.get("click_trained"):
            model = "litemedsam"  # a memory built over the published decoder goes with those weights
        if not isinstance(model, LiteMedSAM):
            from .click_weights import load_slice_model

            model = load_slice_model(model)
        self.model: LiteMedSAM = model.to(self.device).eval()
        self.click_trained = bool(getattr(model, "click_trained", False))
        if self.memory is not None:
            self.memory.check_compatible(self.model)
        self.use_memory = self.memory is not None
        self.settings = settings or PropagationSettings()
        self.cache_slices = cache_slices
        self.window = window
        self._volume: Volume | None = None
        self._embeddings: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.embed_seconds = 0.0

    @property
    def has_memory(self) -> bool:
        """Whether a memory is loaded (what ``use_memory`` can switch on)."""
        return self.memory is not None

    # ------------------------------------------------------------------ volume and embeddings

    def set_volume(self, volume: Volume) -> None:
        """Take a CT (HU); embeddings are computed later, per slice, when a prompt needs them."""
        if not np.isfinite(volume.array).all():
            raise InputError("The volume contains NaN or infinite values; repair or re-export the image before refining.")
        self._volume = volume
        self.frame = SliceFrame.of(volume)
        self.inputs = SliceInput.for_frame(self.frame)
        self._hu = self.frame.to_frame(volume.array)
        self._embeddings.clear()

    @property
    def volume(self) -> Volume | None:
        """The volume set last (None before :meth:`set_volume`)."""
        return self._volume

    def _require_volume(self) -> None:
        if self._volume is None:
            raise InputError("No volume is set; call set_volume(volume) before predicting.")

    @property
    def slices(self) -> int:
        """Number of axial slices of the frame."""
        self._require_volume()
        return self.frame.shape[0]

    def embedding(self, k: int) -> torch.Tensor:
        """The image embedding (1, 256, 64, 64) of frame slice ``k``, computed once and cached."""
        self._require_volume()
        if k in self._embeddings:
            self._embeddings.move_to_end(k)
            return self._embeddings[k]
        start = time.perf_counter()
        with torch.inference_mode():
            embedding = self.model.embed(self.inputs.image(self._hu[k], self.window).to(self.device))
        self.embed_seconds += time.perf_counter() - start
        self._embeddings[k] = embedding
        while len(self._embeddings) > self.cache_slices:
            self._embeddings.popitem(last=False)
        return embedding

    def cached_slices(self) -> list[int]:
        return list(self._embeddings)

    # ------------------------------------------------------------------ one slice

    def _memory_reads(self, use_memory: bool | None) -> bool:
        on = self.use_memory if use_memory is None else use_memory
        if on and self.memory is None:
            raise InputError("No memory is loaded; give SlicePredictor(memory=...) or predict without memory.")
        return on

    def slice_logits(self, k: int, box: np.ndarray | None = None, points: np.ndarray | None = None,
                     labels: np.ndarray | None = None, mask_logits: torch.Tensor | None = None,
                     use_memory: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Prompt frame slice ``k``: box (x0, y0, x1, y1) and clicks (N, 2) in slice pixels (x, y), labels (N,)
        1/0, mask_logits (1, 1, 256, 256); the memory is read when ``use_memory`` (None: ``self.use_memory``).
        Returns (slice logits (H, W), model-input logits, predicted IoU)."""
        embedding = self.embedding(k)
        prompt_points = None
        if points is not None and len(points):
            prompt_points = (self.inputs.points(points).to(self.device),
                             torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(1, -1).to(self.device))
        boxes = self.inputs.box(box).to(self.device) if box is not None else None
        memory = None
        if self._memory_reads(use_memory):
            # The search key is the box's part of the slice; clicks alone search with the whole slice.
            region = boxes[0] if boxes is not None else torch.tensor([0.0, 0.0, self.inputs.new_width - 1, self.inputs.new_height - 1])
            memory = self.memory.read(embedding, region)
        with torch.inference_mode():
            logits, iou = self.model.decode(embedding, prompt_points, boxes, mask_logits, memory=memory)
        return self.inputs.to_slice(logits)[0].cpu(), logits, float(iou[0, 0])

    def predict_slice(self, k: int, box: np.ndarray | None = None, points: np.ndarray | None = None,
                      labels: np.ndarray | None = None, mask_logits: torch.Tensor | None = None,
                      use_memory: bool | None = None) -> SliceAnswer:
        """:meth:`slice_logits` thresholded at 0 (probability 0.5): the mask (H, W) of frame slice ``k``."""
        slice_logits, logits, iou = self.slice_logits(k, box, points, labels, mask_logits, use_memory)
        return SliceAnswer(slice_logits.numpy() > 0, logits, iou)

    def click_box(self, mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """The box that comes with clicks on a frame slice (click-tuned weights), or None for clicks alone.

        With positive clicks: around the parts of the segment there that hold a positive click or lie within
        ``click_reach_mm`` of one, widened to take in the positive clicks (plus ``box_margin_mm``); None when
        no part is that near (the clicks mark an organ the segment missed there: the box of another structure
        would mislead the decoder). With negative clicks only: the box around the whole segment there."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        positive = points[np.asarray(labels).reshape(-1) == 1]
        if not len(positive):
            return self.enlarged_box(mask)
        spacing = np.asarray(self.frame.spacing[:2], dtype=np.float64)
        parts, count = ndimage.label(mask)
        keep = np.zeros(mask.shape, bool)
        if count:
            h, w = mask.shape
            for x, y in positive:
                near = np.zeros(mask.shape, bool)
                xi, yi = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
                near[yi, xi] = True
                reach = ndimage.distance_transform_edt(~near, sampling=(spacing[1], spacing[0])) <= self.settings.click_reach_mm
                for part in np.unique(parts[reach & mask]):
                    keep |= parts == part
        box = self.enlarged_box(keep)
        if box is None:
            return None
        margin = self.settings.box_margin_mm / spacing
        h, w = mask.shape
        lo = np.minimum(box[:2], positive.min(0) - margin)
        hi = np.maximum(box[2:], positive.max(0) + margin)
        return np.clip(np.concatenate([lo, hi]), 0, [w - 1, h - 1, w - 1, h - 1])

    def enlarged_box(self, mask: np.ndarray, margin_mm: float | None = None) -> np.ndarray | None:
        """The box around a frame-slice mask, enlarged by ``margin_mm`` (default ``box_margin_mm``) and kept inside the slice."""
        return enlarged_box(mask, self.frame.spacing[:2], self.settings.box_margin_mm if margin_mm is None else margin_mm)

    # ------------------------------------------------------------------ prompts in 3-D

    def _to_frame(self, points: Any, point_space: str, what: str) -> np.ndarray:
        """(N, 3) RAS mm or source ijk -> frame (x, y, z), refusing points outside the volume."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        geometry = self._volume.geometry
        if point_space == "ras":
            ijk = np.array([geometry.ras_to_ijk(p) for p in points]).reshape(-1, 3)
        elif point_space == "ijk":
            ijk = points
        else:
            raise InputError(f"Unknown point space '{point_space}'; use 'ras' (millimetres) or 'ijk' (voxel indices).")
        size = np.array(self._volume.shape[::-1])
        for n, p in enumerate(ijk):
            if not np.isfinite(p).all() or np.any(p < -0.5) or np.any(p > size - 0.5):
                where = ", ".join(f"{v:.1f}" for v in points[n])
                raise InputError(f"{what} {n + 1} ({point_space.upper()} {where}) lies outside the volume; place it inside the image.")
        return self.frame.ijk_to_frame(ijk)

    def _slice_of(self, z: float) -> int:
        return int(np.clip(np.floor(z + 0.5), 0, self.frame.shape[0] - 1))

    def slices_of(self, points: Any, point_space: str = "ras") -> np.ndarray:
        """The frame slice (N,) each point (N, 3) prompts, as :meth:`predict` places clicks and box corners;
        points outside the volume are refused."""
        self._require_volume()
        return np.array([self._slice_of(z) for z in self._to_frame(points, point_space, "Point")[:, 2]], dtype=np.int64)

    def predict(self, box: Sequence[Sequence[float]] | np.ndarray | None = None,
                points: Sequence[Sequence[float]] | np.ndarray | None = None, labels: Sequence[int] | np.ndarray | None = None,
                previous_mask: np.ndarray | None = None, point_space: str = "ras", propagate: bool = True,
                use_memory: bool | None = None) -> Prediction:
        """Segment or correct one segment.

        box: two opposite corners (2, 3) of a box (RAS mm, or source (i, j, k) with ``point_space="ijk"``);
        points: clicks (N, 3) in the same space, labels (N,) 1 add / 0 remove; previous_mask: bool
        [z, y, x] on the volume's grid (the segment so far; None: empty); use_memory: read the memory on
        every slice drawn (None: ``self.use_memory``). Nothing changes on a refusal.
        """
        self._require_volume()
        use_memory = self._memory_reads(use_memory)
        start = time.perf_counter()
        embed_before = self.embed_seconds
        previous = np.zeros(self._volume.shape, bool) if previous_mask is None else np.asarray(previous_mask).astype(bool)
        if previous.shape != self._volume.shape:
            raise InputError(f"The previous mask's shape {previous.shape} differs from the volume's {self._volume.shape}; give a mask on the volume's voxel grid.")
        clicks = np.zeros((0, 3)) if points is None else self._to_frame(points, point_space, "Click")
        click_labels = np.zeros(0, np.int64) if labels is None else np.asarray(labels).reshape(-1)
        if len(click_labels) != len(clicks):
            raise InputError(f"{len(clicks)} clicks but {len(click_labels)} labels; give one label (1 add, 0 remove) per click.")
        if len(click_labels) and not np.isin(click_labels, (0, 1)).all():
            raise InputError("Click labels must be 1 (add to the segment) or 0 (remove from it).")
        if box is None and not len(clicks):
            raise InputError("Give a box or at least one click to refine the segment with.")
        if len(clicks):  # the same click twice tells the decoder nothing more (and repeated tokens unsettle it)
            _, first = np.unique(np.column_stack([np.round(clicks, 3), click_labels]), axis=0, return_index=True)
            keep = np.sort(first)
            clicks, click_labels = clicks[keep], click_labels[keep]
        anchors = self._anchors(box, point_space, clicks, click_labels)
        current = self.frame.to_frame(previous).copy()
        result = Prediction(mask=previous, used_memory=use_memory)
        for k, rect, z_range, on_slice, on_labels in anchors:
            settle = rect is None  # clicks correct the segment locally; a box redraws the organ
            fill = settle and not current[k].any()  # clicks where the segment is empty add the part it missed
            if rect is None:
                rect = self.click_box(current[k], on_slice, on_labels) if self.click_trained else self.enlarged_box(current[k])
            # Clicks with the box of the segment near them correct it (positive ones only add, negative ones only
            # remove); clicks alone beside a segment elsewhere on the slice (another structure) replace it.
            mode = "box"
            if settle:
                mode = "fill" if fill else "replace" if rect is None else "correct"
                if mode == "correct" and self.settings.monotone:
                    mode = "add" if (on_labels == 1).all() else "remove" if (on_labels == 0).all() else "correct"
            if rect is None and not self.click_trained:
                raise InputError(
                    f"The clicks on slice {k + 1} fall where the segment is empty; draw a box around the organ there "
                    "(these LiteMedSAM weights were trained on boxes only: clicks alone give nothing)."
                )
            if rect is None and not (on_labels == 1).any():
                raise InputError(f"The clicks on slice {k + 1} only remove, where the segment is empty; "
                                 "place a positive click on the organ to create it.")
            answer = self.predict_slice(k, rect, on_slice, on_labels, use_memory=use_memory)
            if mode == "remove" and self.click_trained and self.settings.cut_ignored and not _follows(current[k] & answer.mask, on_slice, on_labels):
                # The answer keeps a negative click (the decoder did not take it): ask for the structure under
                # the clicks instead, as a positive click alone, and take its parts under the clicks away.
                under = self.predict_slice(k, None, on_slice, np.ones_like(on_labels), use_memory=use_memory)
                cut = _parts_at(under.mask, on_slice)
                if cut.any() and int((current[k] & cut).sum()) <= self.settings.max_removal * int(current[k].sum()):
                    answer, mode = SliceAnswer(cut, under.logits, under.iou), "cut"
            if mode == "remove" and self.settings.skip_ignored_removal and not _follows(current[k] & answer.mask, on_slice, on_labels):
                # The answer keeps a voxel the clicks remove (the decoder drew another structure): what it
                # leaves out is not what was asked to go, so the slice and its neighbours stay as they were.
                result.prompted.append(k)
                result.stops = {"up": "the answer kept a removed voxel", "down": "the answer kept a removed voxel"}
                continue
            if settle and rect is not None and self.settings.honour_clicks and not _follows(answer.mask, on_slice, on_labels):
                # The answer with the segment's box ignores a click: ask with the clicks alone; if that ignores one
                # too, the clicks change nothing on this slice.
                alone = self.predict_slice(k, None, on_slice, on_labels, use_memory=use_memory)
                if not _follows(alone.mask, on_slice, on_labels):
                    result.prompted.append(k)
                    result.stops = {"up": "the answer did not follow the clicks", "down": "the answer did not follow the clicks"}
                    continue
                answer, mode = alone, "correct" if mode != "replace" else mode
            before = current.copy()
            current[k] = _combine(before[k], answer.mask, mode)  # propagation goes on from the decoder's own answer
            result.prompted.append(k)
            result.drawn[k] = answer.iou
            if propagate:
                limits = z_range or (0, self.frame.shape[0] - 1)
                for direction, name in ((1, "up"), (-1, "down")):
                    result.stops[name] = self._propagate(k, direction, answer, limits, current, before if settle else None, result.drawn,
                                                         use_memory, mode)
        result.mask = self.frame.from_frame(current)
        result.timings = {"embed_s": self.embed_seconds - embed_before, "total_s": time.perf_counter() - start}
        result.timings["decode_s"] = result.timings["total_s"] - result.timings["embed_s"]
        return result

    def _anchors(self, box: Any, point_space: str, clicks: np.ndarray, labels: np.ndarray) -> list[tuple]:
        """(frame slice, box (x0, y0, x1, y1) or None, slice range of a 3-D box or None, clicks (M, 2), labels) per prompted slice."""
        anchors = []
        click_slices = [self._slice_of(z) for z in clicks[:, 2]]
        box_slice = None
        if box is not None:
            corners = self._to_frame(box, point_space, "Box corner")
            if len(corners) != 2:
                raise InputError(f"A box needs two opposite corners, got {len(corners)} point(s); draw the box again.")
            lo, hi = corners.min(0), corners.max(0)
            if np.any(hi[:2] - lo[:2] < 1.0):
                raise InputError("The box is less than one voxel wide or high; draw a box around the whole organ on the slice.")
            first, last = self._slice_of(lo[2]), self._slice_of(hi[2])
            box_slice = (first + last) // 2
            on = [n for n, s in enumerate(click_slices) if s == box_slice]
            anchors.append((box_slice, np.array([lo[0], lo[1], hi[0], hi[1]]), (first, last) if last > first else None,
                            clicks[on, :2], labels[on]))
        for k in sorted(set(click_slices) - {box_slice}):
            on = [n for n, s in enumerate(click_slices) if s == k]
            anchors.append((k, None, None, clicks[on, :2], labels[on]))
        return anchors

    def _propagate(self, k: int, direction: int, answer: SliceAnswer, limits: tuple[int, int], current: np.ndarray,
                   settle_on: np.ndarray | None, drawn: dict[int, float], use_memory: bool = False, mode: str = "replace") -> str:
        """Redraw slices k + direction, k + 2 direction, ... from their neighbour's mask; returns why it stopped.

        After clicks (``settle_on``: the segment before them), ``mode`` says what they did: ``fill`` added a
        part where the segment was empty, so propagation stops at the first slice that holds the segment;
        ``add`` / ``remove`` (positive / negative clicks near the segment) only add to / remove from each
        slice, and stop where that changes less than ``settle_change`` of it; ``correct`` (both kinds)
        stops where the redrawn slice would no longer resemble the segment there (Dice under ``keep_dice``:
        it went astray); these three keep the segment on the slice where they stop. ``replace`` drew the
        organ away from a segment that is another structure, so it goes on; so does a box (``box``)."""
        s = self.settings
        pixel_mm2 = self.frame.spacing[0] * self.frame.spacing[1]
        source = answer
        ious = [answer.iou]
        if mode == "cut":  # what the cut took away on its slice, and how far a removal may reach from it
            reach_px = s.removal_reach_mm / np.asarray([self.frame.spacing[1], self.frame.spacing[0]], dtype=np.float64)
            removed = settle_on[k] & ~current[k]
        if mode == "add":  # what the clicks added on their own slice
            first_added = max(int((current[k] & ~settle_on[k]).sum()), 1)
        z = k + direction
        while limits[0] <= z <= limits[1]:
            if mode == "fill" and settle_on is not None and settle_on[z].sum() * pixel_mm2 >= s.min_area_mm2:
                return "reached the segment"
            rect = self.enlarged_box(source.mask)
            if rect is None:
                return "empty"
            mask_logits = source.logits if s.mask_prompt else None
            nxt = self.predict_slice(z, rect, mask_logits=mask_logits, use_memory=use_memory)
            area = int(nxt.mask.sum())
            if area * pixel_mm2 < s.min_area_mm2:
                reason = "organ ended (mask too small)"
            elif nxt.iou < s.min_iou or nxt.iou < s.relative_iou * float(np.median(ious)):
                reason = f"organ ended (predicted IoU {nxt.iou:.2f})"
            elif int((nxt.mask & source.mask).sum()) < s.min_overlap * area:
                reason = "organ ended (the mask left the previous slice's)"
            elif (settle_on is not None and area > s.max_growth * int(source.mask.sum())
                  and (area - int(source.mask.sum())) * pixel_mm2 > s.min_growth_mm2):
                reason = "organ ended (the mask grew into a neighbour)"
            else:
                reason = ""
            corrective = mode in ("add", "remove", "cut", "correct")
            if reason:
                if not corrective:  # the organ's end: the slice beyond it is cleared (a correction keeps it)
                    current[z] = False
                drawn[z] = nxt.iou
                return reason
            before = settle_on[z] if settle_on is not None else None
            if mode == "correct" and before.any() and _dice(nxt.mask, before) < s.keep_dice:
                return "the redrawn slice left the previous segment"
            combined = _combine(before, nxt.mask, mode)
            if mode == "cut":
                combined = _removal_near(before, combined, removed, reach_px)
                removed = before & ~combined
                if int(removed.sum()) > s.max_removal * int(before.sum()):
                    return "the removal would take most of the segment"
            if mode in ("add", "remove", "cut") and int((combined != before).sum()) <= s.settle_change * max(int(before.sum()), 1):
                return "agrees with the previous segment"
            if mode == "add" and s.max_addition and before.any():
                added = int((combined & ~before).sum())
                if added > s.max_addition * first_added and (added - first_added) * pixel_mm2 > s.min_growth_mm2:
                    return "the addition outgrew the clicked slice's"
            current[z] = combined
            drawn[z] = nxt.iou
            if before is not None and before.any() and _dice(combined, before) >= s.settle_dice:
                return "agrees with the previous segment"
            source = nxt
            ious.append(nxt.iou)
            z += direction
        return "end of the volume" if z < 0 or z >= self.frame.shape[0] else "end of the box"
