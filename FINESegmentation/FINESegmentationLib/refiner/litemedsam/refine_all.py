""""Refine all": every organ of a segmentation redrawn by LiteMedSAM, slice by slice, from its own boxes.

For each axial slice of the volume's :class:`~.slices.SliceFrame` where the segmentation has organs,
the slice is embedded once and each organ there is prompted with the box around its voxels on that
slice, enlarged by ``margin_mm``. Where two organs' answers overlap, the voxel goes to the organ with
the larger logit; a voxel no answer claims becomes background. The slices stay the volume's own, at
full in-plane resolution, and the result has the input's geometry. Organs absent from a slice stay
absent there (no propagation): refine-all redraws the outlines FINE found, it does not look for what
FINE missed.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...errors import CancelledError, InputError
from ...volume import Volume
from .predictor import SlicePredictor

DEFAULT_MARGIN_MM = 3.0  # best of 0, 2, 3, 5 mm with reference boxes on the real CT (README)


@dataclass
class RefineAllResult:
    """labels: the redrawn label map (uint8, the input's geometry); report: organs, slices, boxes and seconds."""

    labels: Volume
    report: dict = field(default_factory=dict)


def refine_all(predictor: SlicePredictor, volume: Volume, labels: Volume, margin_mm: float = DEFAULT_MARGIN_MM,
               progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None) -> RefineAllResult:
    """Redraw every organ of ``labels`` (a label map on ``volume``'s grid) slice by slice from its own boxes.

    progress(done, total) is called after each slice; setting ``cancel`` stops within one slice
    (:class:`~FINESegmentationLib.errors.CancelledError`, nothing returned)."""
    if labels.shape != volume.shape or not labels.geometry.allclose(volume.geometry):
        raise InputError("The segmentation does not lie on the CT's voxel grid; resample it onto the CT before refining.")
    start = time.perf_counter()
    embed_before = predictor.embed_seconds
    if predictor.volume is not volume:
        predictor.set_volume(volume)
    frame = predictor.frame
    source = frame.to_frame(np.asarray(labels.array))
    out = np.zeros(frame.shape, np.uint8)
    todo = [k for k in range(frame.shape[0]) if source[k].any()]
    prompts = 0
    for n, k in enumerate(todo):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Refining was cancelled; the segmentation was left as it was.")
        organs = [int(v) for v in np.unique(source[k]) if v != 0]
        best = torch.full(frame.shape[1:], -torch.inf)
        winner = torch.zeros(frame.shape[1:], dtype=torch.uint8)
        for organ in organs:
            box = predictor.enlarged_box(source[k] == organ, margin_mm)
            logits = predictor.slice_logits(k, box)[0]
            better = logits > best
            best = torch.where(better, logits, best)
            winner[better] = organ
            prompts += 1
        out[k] = np.where(best.numpy() > 0, winner.numpy(), 0)
        if progress is not None:
            progress(n + 1, len(todo))
    seconds = time.perf_counter() - start
    report = {
        "organs": [int(v) for v in np.unique(source) if v != 0],
        "slices": len(todo),
        "boxes": prompts,
        "margin_mm": margin_mm,
        "embed_s": round(predictor.embed_seconds - embed_before, 3),
        "total_s": round(seconds, 3),
    }
    return RefineAllResult(Volume(frame.from_frame(out), labels.geometry), report)
