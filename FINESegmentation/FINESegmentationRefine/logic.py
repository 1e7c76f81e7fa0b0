"""Refining one segment of a segmentation node with a box and clicks, each prompt undoable exactly.

Two refiners, and ``auto`` (the default) to let each prompt choose between them by the rule every front end
shares (:func:`FINESegmentationLib.refiner.choice.automatic_refiner`): a box, a click on a missing organ or a
positive click far outside the segment go to LiteMedSAM; clicks on the segment FINE found go to the Memorizing-SAM
refiner; clicks after a box stay with LiteMedSAM (they correct the box's answer). When a prompt moves the session to
the other refiner, that refiner starts from the segment as it is then; undo moves it back.

* ``litemedsam`` (the default): LiteMedSAM slice by slice
  (:class:`~FINESegmentationLib.refiner.litemedsam.predictor.SlicePredictor`). A box (a markups ROI, or a
  line across the organ on one slice) segments its slice, then propagates to the neighbours until the
  organ ends; clicks re-prompt their slice and re-propagate. An empty or absent segment is created by a
  box (an organ gets its name, colour and terminology). When click-tuned weights are registered (kind
  ``refiner-2d-clicks``) they are used; otherwise the published weights, trained on boxes only.
* ``memorizing-sam``: the 3-D Memorizing-SAM refiner: clicks on an existing segment, with its memory.

What LiteMedSAM is asked: the latest box and every click placed since, applied to the segment as it
was when that box was drawn (or when refining started), which is what ``fine-seg refine --seg
--box --points`` computes from the same prompts. A box starts afresh from the segment as it is then;
so does a click after the segment was changed outside the Refine section. The Memorizing-SAM refiner
gets every click so far, applied to the segment as it was when refining started (or when the segment was last
changed outside the Refine section): what ``fine-seg refine --seg --points`` computes from those clicks.

Every step touches MRML on the calling (GUI) thread only; the refiners run on the engine's torch
worker: :meth:`RefineLogic.startSession` and :meth:`RefineLogic.startPrompt` read the scene and return
a :class:`~FINESegmentationLib.worker.Job`; :meth:`RefineLogic.applyPrompt` writes a finished answer
into the segment; :meth:`RefineLogic.undo` takes the last one back. The scene changes in
``applyPrompt`` and ``undo`` only, so a refused prompt (a box or click outside the volume, no volume)
leaves it as it was.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import slicer

from FINESegmentationLib.errors import InputError
from FINESegmentationLib.labels import ORGANS
from FINESegmentationLib.refiner.choice import AUTO, LITEMEDSAM, MEMORIZING_SAM, automatic_refiner
from FINESegmentationLib.mrml import (
    check_same_transform,
    describe_segment,
    new_segmentation_node,
    remove_node,
    segment_id,
    segment_mask,
    volume_from_node,
    world_to_volume,
    write_segment_mask,
)
from FINESegmentationLib.volume import Volume
from FINESegmentationLib.worker import Job, TorchWorker

REFINERS = (AUTO, LITEMEDSAM, MEMORIZING_SAM)
# What the Refine section refines: the segment chosen in its selector, or an organ (created if absent).
SELECTED_SEGMENT = "selected segment"
REFINE_TARGETS = (SELECTED_SEGMENT,) + tuple(o.name for o in ORGANS)


# --------------------------------------------------------------------------- segments and prompts from the scene


def organ_named(name: str):
    """The organ called ``name`` (any case; ``_`` for spaces, as in segment IDs), or None."""
    wanted = " ".join(str(name).replace("_", " ").split()).casefold()
    return next((o for o in ORGANS if o.name == wanted), None)


def resolve_segment(segmentationNode, segment: str) -> tuple[str, str, bool]:
    """(segment ID, name, whether it exists) of ``segment``: an ID or a name in ``segmentationNode``, else the
    segment to create (an organ's ID and name as FINE writes them: ``right_kidney``, "right kidney")."""
    if not segment:
        raise InputError("Choose the segment to refine, or name the organ to create.")
    organ = organ_named(segment)
    if segmentationNode is not None:
        segmentation = segmentationNode.GetSegmentation()
        for candidate in (segment, segment_id(organ.name) if organ else None):
            if candidate and segmentation.GetSegment(candidate) is not None:
                return candidate, segmentation.GetSegment(candidate).GetName(), True
        for name in (segment, organ.name if organ else None):
            found = segmentation.GetSegmentIdBySegmentName(name) if name else ""
            if found:
                return found, segmentation.GetSegment(found).GetName(), True
    if organ is not None:
        return segment_id(organ.name), organ.name, False
    return segment, segment, False


def add_segment(segmentationNode, segmentId: str, name: str) -> None:
    """Add an empty segment (an organ with its colour and terminology)."""
    segmentation = segmentationNode.GetSegmentation()
    segment = slicer.vtkSegment()
    describe_segment(segment, name, segmentation.GetNumberOfSegments())
    segmentation.AddSegment(segment, segmentId)


def box_corners(box, volumeNode) -> np.ndarray:
    """Two opposite corners (2, 3), RAS mm in the volume's frame, of a box given as a markups ROI (its
    axis-aligned bounds in world RAS), a markups line (its two ends: opposite corners on one slice), or two
    corners already in RAS mm of the volume's frame.

    A ROI that is flat along S is a box on one slice (the organ is then propagated as far as it goes); one
    that spans several slices limits the propagation to them.
    """
    if hasattr(box, "IsA"):
        name = box.GetName()
        if box.IsA("vtkMRMLMarkupsROINode"):
            if max(box.GetSize()) <= 0:
                raise InputError(f"The box '{name}' is not drawn yet; draw it around the organ on a slice.")
            bounds = [0.0] * 6
            box.GetRASBounds(bounds)
            corners = [bounds[0::2], bounds[1::2]]
        elif box.IsA("vtkMRMLMarkupsLineNode"):
            if box.GetNumberOfDefinedControlPoints() != 2:
                raise InputError(f"The line '{name}' has {box.GetNumberOfDefinedControlPoints()} placed point(s); "
                                 "place both ends across the organ on one slice.")
            corners = []
            for i in range(2):
                position = [0.0, 0.0, 0.0]
                box.GetNthControlPointPositionWorld(i, position)
                corners.append(position)
        else:
            raise InputError(f"'{name}' is not a box; draw a markups ROI around the organ (or a line across it on one slice).")
        return world_to_volume(corners, volumeNode)
    corners = np.asarray(box, dtype=np.float64)
    if corners.shape != (2, 3) or not np.isfinite(corners).all():
        raise InputError("A box is two opposite corners, RAS millimetres (2 x 3 numbers); draw the box again.")
    return corners


def _changed_region(before: np.ndarray, after: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of the voxels that differ (an empty box when none do)."""
    changed = np.argwhere(before != after)
    if not len(changed):
        return (slice(0, 0),) * 3
    lo, hi = changed.min(0), changed.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _same_volume(a: Volume | None, b: Volume) -> bool:
    """Whether ``a`` holds the same CT as ``b`` (so LiteMedSAM's slice embeddings of ``a`` serve ``b``)."""
    return a is b or (a is not None and a.shape == b.shape and a.geometry.allclose(b.geometry) and np.array_equal(a.array, b.array))


def accepts_memory(predictor) -> bool:
    """Whether a predictor's ``predict`` takes ``use_memory`` (the Memorizing-SAM plug-in's switch)."""
    return "use_memory" in inspect.signature(predictor.predict).parameters


# --------------------------------------------------------------------------- sessions


@dataclass
class Prompts:
    """What LiteMedSAM is asked: ``box`` (2, 3) and the clicks since it (``points`` (N, 3), ``labels`` (N,)
    1 add / 0 remove; RAS mm in the volume's frame), applied to ``base`` (bool [z, y, x]); ``boxed``: the
    box's own answer, which clicks off the box's slice start from. The Memorizing-SAM refiner uses the clicks and ``base``."""

    base: np.ndarray | None = None
    box: np.ndarray | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxed: np.ndarray | None = None

    def with_clicks(self, points: np.ndarray, labels: np.ndarray) -> "Prompts":
        return Prompts(self.base, self.box, np.concatenate([self.points, points]), np.concatenate([self.labels, labels]), self.boxed)


@dataclass
class _Step:
    """One applied prompt, with what undoing it needs: the changed region's voxels before, what it created,
    and the session's prompts and written segment before it."""

    region: tuple[slice, slice, slice]
    before: np.ndarray
    created_segment: bool
    created_node: bool
    prompts: Prompts
    written: np.ndarray
    answered_by: tuple  # the session's refiner, weights, click training and memory before the step


@dataclass(eq=False)
class RefineSession:
    """One segment being refined: its nodes (``segmentationNode`` is None until a box creates one), the CT,
    the refiner (name, weights, whether it has a memory), the prompts so far and the undo stack.

    ``refiner`` is the refiner answering now; with ``automatic`` (the user chose ``auto``) each prompt may move it to
    the other one."""

    volumeNode: Any
    segmentationNode: Any
    segmentId: str
    segmentName: str
    refiner: str
    volume: Volume
    initial: np.ndarray
    model: str | None = None
    device: str = "auto"
    weights: str = ""
    has_memory: bool = False
    clicks_trained: bool = False
    start_s: float = 0.0
    prompts: Prompts = field(default_factory=Prompts)
    written: np.ndarray | None = None  # the segment as the last prompt (or undo) left it
    undo: list[_Step] = field(default_factory=list)
    automatic: bool = False

    @property
    def choice(self) -> str:
        """What the user chose: ``auto``, ``litemedsam`` or ``memorizing-sam``."""
        return AUTO if self.automatic else self.refiner

    def _answered_by(self) -> tuple:
        return self.refiner, self.weights, self.clicks_trained, self.has_memory


@dataclass
class RefineResult:
    """A finished prediction, not yet in the scene.

    mask: the segment after the prompt, bool [z, y, x] on the volume's grid; previous: the segment it was
    computed from (applying refuses if the segment changed meanwhile); prompts: the session's prompts once
    applied; kind: "box" or "click"; slices: slices LiteMedSAM redrew; iou and crop: the Memorizing-SAM refiner's
    estimate and its crop box ([z, y, x] slices: nothing outside it changes).
    """

    mask: np.ndarray
    previous: np.ndarray
    prompts: Prompts
    kind: str
    used_memory: bool
    seconds: float
    embed_seconds: float = 0.0
    slices: int = 0
    stops: dict[str, str] = field(default_factory=dict)
    iou: float | None = None
    crop: tuple[slice, slice, slice] | None = None
    answered_by: tuple = ()  # (refiner, weights, click-trained, has memory) of the refiner that answered

    def summary(self) -> str:
        """One sentence for the status line."""
        memory = "memory used" if self.used_memory else "no memory"
        if self.iou is not None:
            return f"Memorizing-SAM: IoU estimate {self.iou:.2f}, {1000 * self.seconds:.0f} ms, {memory}."
        ends = "; ".join(f"{side}: {why}" for side, why in self.stops.items())
        return (f"LiteMedSAM: {self.slices} slice(s) redrawn in {self.seconds:.1f} s ({self.embed_seconds:.1f} s embedding new slices), "
                f"{memory}" + (f"; {ends}." if ends else "."))


class RefineLogic:
    """Sessions of the two refiners on one torch worker; the loaded refiner is kept for the next session.

    LiteMedSAM keeps its slice embeddings while the CT stays the same, also across sessions.
    """

    def __init__(self, worker: TorchWorker) -> None:
        self.worker = worker
        self._loaded: tuple[tuple, Any, str, bool] | None = None  # (key, predictor, weights, click-tuned): worker thread only
        self._holder: tuple | None = None  # (session, segment) whose crop the Memorizing-SAM predictor holds (worker thread only)

    # ---------------------------------------------------------------- starting

    def startSession(self, volumeNode, segmentationNode, segment: str, *, refiner: str = AUTO, model: str | None = None,
                     device: str = "auto") -> Job:
        """Read the CT and the segment (this thread), then load the refiner on the worker; the job's result is a
        :class:`RefineSession`. ``segment``: an ID or a name; it may be empty or absent for LiteMedSAM (a box
        creates it; with ``segmentationNode`` None, in a new segmentation node). ``auto``: each prompt chooses
        (LiteMedSAM until a click on the segment goes to the Memorizing-SAM refiner)."""
        if refiner not in REFINERS:
            raise InputError(f"Unknown refiner '{refiner}'; choose one of: {', '.join(REFINERS)}.")
        volume = volume_from_node(volumeNode)
        segmentId, name, exists = resolve_segment(segmentationNode, segment)
        if exists:
            initial = segment_mask(segmentationNode, segmentId, volumeNode)
        else:
            if segmentationNode is not None:
                check_same_transform(segmentationNode, volumeNode)
            initial = np.zeros(volume.shape, bool)
        if refiner == MEMORIZING_SAM and not initial.any():
            raise InputError(f"The segment '{name}' is {'empty' if exists else 'absent'}; the Memorizing-SAM refiner corrects "
                             "an existing segment, so draw a box with the LiteMedSAM refiner to create it.")
        automatic = refiner == AUTO
        if automatic:
            if model:
                raise InputError("The automatic refiner choice uses each refiner's bundled weights; choose litemedsam or "
                                 "memorizing-sam to give weights.")
            refiner = LITEMEDSAM
        session = RefineSession(volumeNode, segmentationNode, segmentId, name, refiner, volume, initial, model or None,
                                device or "auto", prompts=Prompts(base=initial), written=initial, automatic=automatic)
        return self.worker.submit(self._start, session)

    def _load(self, refiner: str, model: str | None, device: str) -> tuple[Any, str, bool]:
        """(predictor, weights in words, whether its decoder was tuned on clicks)."""
        from FINESegmentationLib.inference import resolve_device

        torch_device = resolve_device(device)
        if refiner == MEMORIZING_SAM:
            from FINESegmentationLib.refiner.predictor import RefinerPredictor

            return RefinerPredictor(model, device=torch_device), f"Memorizing-SAM refiner '{model or 'bundled'}'", True
        from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor

        from FINESegmentationLib.refiner.litemedsam.click_weights import slice_weights

        weights, tuned = slice_weights(model)
        predictor = SlicePredictor(weights, device=torch_device)
        if tuned:
            return predictor, f"LiteMedSAM, click-tuned weights '{weights}'", True
        return predictor, f"LiteMedSAM, weights '{weights or 'litemedsam'}' (trained on boxes only)", False

    def _ready(self, session: RefineSession, progress: Callable[[Any], None], refiner: str | None = None, base: np.ndarray | None = None):
        """The loaded ``refiner`` (the session's by default) for this session, holding its CT (and, for Memorizing-SAM,
        its crop around ``base``, the segment it started from: the session's initial one by default)."""
        refiner = refiner or session.refiner
        key = (refiner, session.model, session.device)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = self._holder = None  # free the previous refiner before loading the next
            progress("Loading the refiner...")
            self._loaded = (key, *self._load(*key))
        predictor = self._loaded[1]
        if refiner == LITEMEDSAM:
            if not _same_volume(predictor.volume, session.volume):
                predictor.set_volume(session.volume)
        else:
            base = session.initial if base is None else base
            if self._holder is None or self._holder[0] is not session or self._holder[1] is not base:
                self._holder = None
                predictor.set_volume(session.volume, base)
                self._holder = (session, base)
        return predictor

    def _describe(self, refiner: str, predictor) -> tuple:
        """(refiner, weights in words, click-trained, has memory) of the loaded ``predictor``."""
        if refiner == MEMORIZING_SAM:
            has_memory = bool(predictor.has_memory)
        else:
            has_memory = accepts_memory(predictor) and bool(getattr(predictor, "has_memory", True))
        return refiner, self._loaded[2], self._loaded[3], has_memory

    def _start(self, session: RefineSession, progress, cancel) -> RefineSession:
        start = time.perf_counter()
        predictor = self._ready(session, progress)
        _, session.weights, session.clicks_trained, session.has_memory = self._describe(session.refiner, predictor)
        session.start_s = time.perf_counter() - start
        return session

    @staticmethod
    def _refiner_for(session: RefineSession, box, points: np.ndarray, labels: np.ndarray, current: np.ndarray) -> str:
        """The refiner that answers this prompt: the session's, or for ``auto`` the shared rule's choice."""
        if not session.automatic:
            return session.refiner
        if box is None and session.refiner == LITEMEDSAM and session.prompts.box is not None:
            return LITEMEDSAM  # clicks after a box correct the box's answer
        return automatic_refiner(current, session.volume.geometry, box=box is not None, points=points, positive=labels == 1)

    # ---------------------------------------------------------------- prompts

    def _check_nodes(self, session: RefineSession) -> None:
        node, volumeNode = session.segmentationNode, session.volumeNode
        if volumeNode.GetScene() is None or (node is not None and node.GetScene() is None):
            raise InputError("The volume or the segmentation was removed; start refining again.")
        image = volumeNode.GetImageData()
        if image is None or tuple(image.GetDimensions())[::-1] != session.volume.shape:
            raise InputError(f"The volume '{volumeNode.GetName()}' changed while refining; start refining again.")

    def _current(self, session: RefineSession) -> np.ndarray:
        """The segment as it is now on the CT's grid (empty while it does not exist)."""
        node = session.segmentationNode
        if node is None or node.GetSegmentation().GetSegment(session.segmentId) is None:
            return np.zeros(session.volume.shape, bool)
        return segment_mask(node, session.segmentId, session.volumeNode)

    def startPrompt(self, session: RefineSession, *, box=None, points=None, labels=None, memory: bool = True) -> Job:
        """Read the segment and the prompt (this thread) and queue the prediction; the job's result is a :class:`RefineResult`.

        ``box``: a markups ROI or line node, or two corners (RAS mm); ``points`` (N, 3) RAS mm in the volume's
        frame with ``labels`` (N,) 1 add / 0 remove: new clicks. ``memory``: use the refiner's memory where it has one.
        """
        self._check_nodes(session)
        points = np.zeros((0, 3)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 3)
        labels = np.zeros(0, np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(points) != len(labels):
            raise InputError(f"{len(points)} click(s) but {len(labels)} label(s); give one label (1 add, 0 remove) per click.")
        if box is None and not len(points):
            raise InputError("Draw a box or place a click to refine the segment with.")
        current = self._current(session)
        refiner = self._refiner_for(session, box, points, labels, current)
        switched = refiner != session.refiner  # an automatic session moves to the other refiner: it starts from the segment now
        if refiner == MEMORIZING_SAM:
            if box is not None:
                raise InputError("The Memorizing-SAM refiner takes clicks only; choose the LiteMedSAM refiner to draw a box.")
            fresh = switched or session.written is None or not np.array_equal(current, session.written)
            prompts = (Prompts(base=current) if fresh else session.prompts).with_clicks(points, labels)
        elif box is not None:
            prompts = Prompts(current, box_corners(box, session.volumeNode), points, labels)
        elif switched or session.written is None or not np.array_equal(current, session.written):
            prompts = Prompts(current, None, points, labels)  # changed outside the Refine section: start from it
        else:
            prompts = session.prompts.with_clicks(points, labels)
        return self.worker.submit(self._predict, session, refiner, prompts, current, "box" if box is not None else "click", bool(memory))

    def _predict(self, session: RefineSession, refiner: str, prompts: Prompts, current: np.ndarray, kind: str, memory: bool,
                 progress, cancel):
        predictor = self._ready(session, progress, refiner, prompts.base)
        answered_by = self._describe(refiner, predictor)
        has_memory = answered_by[3]
        start = time.perf_counter()
        if refiner == MEMORIZING_SAM:
            # Every click so far on the segment it started from, as fine-seg refine asks (README, "Click curves":
            # asking the last answer instead did worse on the real CT).
            answer = predictor.predict(prompts.points, prompts.labels, previous_mask=prompts.base, use_memory=memory and has_memory)
            return RefineResult(answer.paste(prompts.base), current, prompts, kind, answer.used_memory, time.perf_counter() - start,
                                iou=answer.iou, crop=answer.box, answered_by=answered_by)
        progress("Refining: each slice LiteMedSAM has not seen yet is embedded first (2-4 s on a CPU)...")
        embedded = predictor.embed_seconds
        extra = {"use_memory": memory} if has_memory else {}
        clicks = len(prompts.labels) > 0
        if clicks and prompts.boxed is not None and not self._on_box_slice(predictor, prompts):
            # The box's answer is what predict(box, clicks, base) computes before it turns to clicks off the box's
            # slice, so starting from it gives the same segment without redrawing the box's slices.
            answer = predictor.predict(points=prompts.points, labels=prompts.labels, previous_mask=prompts.boxed, **extra)
        else:
            answer = predictor.predict(box=prompts.box, points=prompts.points if clicks else None,
                                       labels=prompts.labels if clicks else None, previous_mask=prompts.base, **extra)
        if prompts.box is not None and not clicks:
            prompts = Prompts(prompts.base, prompts.box, prompts.points, prompts.labels, answer.mask)
        used = bool(getattr(answer, "used_memory", memory and has_memory))
        return RefineResult(answer.mask, current, prompts, kind, used, time.perf_counter() - start,
                            embed_seconds=predictor.embed_seconds - embedded, slices=len(answer.drawn), stops=dict(answer.stops),
                            answered_by=answered_by)

    @staticmethod
    def _on_box_slice(predictor, prompts: Prompts) -> bool:
        """Whether a click lies on the slice the box prompts (its middle slice), where it is asked together with the box."""
        first, last = sorted(predictor.slices_of(prompts.box))
        return bool(np.any(predictor.slices_of(prompts.points) == (first + last) // 2))

    def applyPrompt(self, session: RefineSession, result: RefineResult) -> None:
        """Write a finished prediction into the segment in place (this thread), creating the segment (and the
        segmentation node) if needed; undoable. The segment keeps its ID, name, colour and terminology."""
        self._check_nodes(session)
        current = self._current(session)
        if not np.array_equal(current, result.previous):
            raise InputError(f"The segment '{session.segmentName}' changed while the refiner was working; place the prompt again.")
        node = session.segmentationNode
        created_node = node is None
        created_segment = created_node or node.GetSegmentation().GetSegment(session.segmentId) is None
        if created_node:
            node = new_segmentation_node(session.volumeNode)
        try:
            if created_segment:
                add_segment(node, session.segmentId, session.segmentName)
            write_segment_mask(result.mask, node, session.segmentId, session.volumeNode)
        except BaseException:
            if created_node:
                remove_node(node.GetScene(), node)
            elif created_segment:
                node.GetSegmentation().RemoveSegment(session.segmentId)
            raise
        session.segmentationNode = node
        region = _changed_region(current, result.mask)
        session.undo.append(_Step(region, current[region].copy(), created_segment, created_node, session.prompts, session.written,
                                  session._answered_by()))
        session.prompts, session.written = result.prompts, result.mask
        if result.answered_by:
            session.refiner, session.weights, session.clicks_trained, session.has_memory = result.answered_by

    def undo(self, session: RefineSession) -> bool:
        """Take the last applied prompt back exactly (a segment or node it created is removed again); False when
        there is nothing to undo."""
        if not session.undo:
            return False
        self._check_nodes(session)
        step, node = session.undo[-1], session.segmentationNode
        if step.created_node:
            remove_node(node.GetScene(), node)
            session.segmentationNode = None
        elif step.created_segment:
            node.GetSegmentation().RemoveSegment(session.segmentId)
        else:
            mask = self._current(session)
            mask[step.region] = step.before
            write_segment_mask(mask, node, session.segmentId, session.volumeNode)
        session.undo.pop()
        session.prompts, session.written = step.prompts, step.written
        session.refiner, session.weights, session.clicks_trained, session.has_memory = step.answered_by
        return True

    # ---------------------------------------------------------------- blocking, for scripts and the Python console

    def start(self, volumeNode, segmentationNode, segment: str, *, refiner: str = AUTO, model: str | None = None,
              device: str = "auto", progress: Callable[[Any], None] | None = None) -> RefineSession:
        return self.startSession(volumeNode, segmentationNode, segment, refiner=refiner, model=model, device=device).wait(progress)

    def prompt(self, session: RefineSession, *, box=None, points=None, labels=None, memory: bool = True,
               progress: Callable[[Any], None] | None = None) -> RefineResult:
        """Refine with a box and/or new clicks and write the answer into the segment; errors change nothing."""
        result = self.startPrompt(session, box=box, points=points, labels=labels, memory=memory).wait(progress)
        self.applyPrompt(session, result)
        return result
