""""Refine all": every organ of a segmentation redrawn by LiteMedSAM, slice by slice, from its own boxes.

For each axial slice of the volume's :class:`~.slices.SliceFrame` where the segmentation has organs,
the slice is embedded once and each organ there is prompted with the box around its voxels on that
slice, enlarged by ``margin_mm``. Where two organs' answers overlap, the voxel goes to the organ with
the larger logit; a voxel no answer claims becomes background. An answer that covers less than
``min_cover`` of the organ's own voxels on the slice has left the organ for another structure in the box
(a kidney's box that takes in bowel, say); there the organ keeps its input outline. The slices stay the
volume's own, at full in-plane resolution, and the result has the input's geometry. Organs absent from a slice stay
absent there (no propagation): refine-all redraws the outlines FINE found, it does not look for what
FINE missed.

Thin slices: with ``slice_step_mm`` > 0, only slices at most that far apart are embedded and prompted (and each
organ's first and last slice); on a slice in between, an organ present on both refined neighbours takes the
answers' logits interpolated linearly along z (an organ changes little over a few millimetres), guarded like an
answer, and an organ missing from a neighbour keeps its input outline. On a 0.6 mm abdomen this embeds about
one slice in six, the cost that dominates on a CPU.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...errors import CancelledError, InputError
from ...labels import ORGAN_BY_NAME, ORGANS
from ...volume import Volume
from .predictor import SlicePredictor

# Best of 3, 5, 8 and 12 mm with FINE's own boxes on the real CT and the held-out synthetic set (README,
# benchmarks/refine_all_margin.md): FINE's outline on a slice is often smaller than the organ, and a looser box
# lets LiteMedSAM find the organ's edge (with the reference's exact boxes 2-3 mm was best).
DEFAULT_MARGIN_MM = 8.0
# An answer must cover this share of the organ's input voxels on the slice, or the input outline stays there.
# Chosen on the real CT and 3 synthetic volumes over 0 / 0.3 / 0.5 / 0.7 and Dice / precision gates (README).
DEFAULT_MIN_COVER = 0.3
# Refined slices at most this far apart on thinner slices; those in between interpolate (README, benchmarks).
DEFAULT_SLICE_STEP_MM = 3.0
# Box rounds per organ label (organs not named here: one). In a second round the box is drawn around the first
# answer and FINE's voxels together, with the same margin, and LiteMedSAM is asked again: where FINE found only part
# of an organ on a slice, its enlarged box can still cut the organ. Two for the gallbladder, chosen over one round /
# the gallbladder / every organ but the pancreas (README, "Box rounds"; benchmarks/refine_all_rounds.md): the real
# CT's gallbladder 78.4 -> 87.8, the held-out synthetic gallbladders 63.1 -> 61.3.
DEFAULT_BOX_ROUNDS: dict[int, int] = {ORGAN_BY_NAME["gallbladder"].label: 2}
MAX_BOX_ROUNDS = 5
_CLIP = 30.0  # logits are clipped to +-this before interpolation (a kept outline is +-inf)


def parse_box_rounds(spec: "str | int | dict[int, int] | None") -> dict[int, int]:
    """Box rounds for every organ label: None (the default rounds), a number (every organ), {label: rounds} (the
    rest: one), or text: a number for every organ and ``organ:rounds`` for single organs, comma-separated
    ("2", "gallbladder:2", "2,pancreas:1"; organ names as in the label table, spaces or underscores)."""
    if spec is None:
        spec = DEFAULT_BOX_ROUNDS
    rounds = {o.label: 1 for o in ORGANS}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(rounds))
        if unknown:
            raise InputError(f"Box rounds name unknown organ label(s) {unknown}; the organs are labels 1-{len(ORGANS)}.")
        rounds.update({int(k): v for k, v in spec.items()})
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        rounds = dict.fromkeys(rounds, int(spec))
    elif isinstance(spec, str) and spec.strip():
        names = {o.name.replace(" ", "_"): o.label for o in ORGANS}
        for part in (p.strip() for p in spec.split(",")):
            organ, sep, value = part.rpartition(":")
            if not value.strip().isdigit():
                raise InputError(f"Box rounds '{spec}': give a number, or organ:number (for example gallbladder:2), not '{part}'.")
            if not sep:
                rounds = dict.fromkeys(rounds, int(value))
                continue
            key = organ.strip().lower().replace(" ", "_")
            if key not in names:
                raise InputError(f"Box rounds '{spec}': unknown organ '{organ.strip()}'; the organs are {', '.join(n.replace('_', ' ') for n in names)}.")
            rounds[names[key]] = int(value)
    else:
        raise InputError(f"Box rounds must be a number, organ:number pairs or a mapping of organ labels (got {spec!r}).")
    bad = {k: v for k, v in rounds.items() if not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_BOX_ROUNDS}
    if bad:
        raise InputError(f"Box rounds must lie between 1 and {MAX_BOX_ROUNDS} for every organ (got {bad}).")
    return {k: int(v) for k, v in rounds.items()}


@dataclass
class RefineAllResult:
    """labels: the redrawn label map (uint8, the input's geometry); report: organs, slices, boxes and seconds."""

    labels: Volume
    report: dict = field(default_factory=dict)


def refined_slices(todo: list[int], source: np.ndarray, spacing_mm: float, step_mm: float) -> list[int]:
    """The slices of ``todo`` to embed: all of them when ``step_mm`` <= 0 or the slices are at least that thick;
    otherwise slices at most ``step_mm`` apart, plus the first and last slice of every organ in ``source``."""
    if step_mm <= 0 or spacing_mm >= step_mm or len(todo) < 3:
        return list(todo)
    stride = max(1, int(step_mm / spacing_mm + 1e-6))
    chosen = {k for k in todo if (k - todo[0]) % stride == 0} | {todo[-1]}
    present = source.reshape(source.shape[0], -1)
    for organ in (int(v) for v in np.unique(source) if v != 0):
        on = np.flatnonzero((present == organ).any(axis=1))
        chosen |= {int(on[0]), int(on[-1])}
    # Gaps in todo (slices without organs) break interpolation: a slice that follows a gap is refined.
    chosen |= {b for a, b in zip(todo, todo[1:]) if b - a > 1} | {a for a, b in zip(todo, todo[1:]) if b - a > 1}
    return sorted(chosen)


def refine_all(predictor: SlicePredictor, volume: Volume, labels: Volume, margin_mm: float = DEFAULT_MARGIN_MM,
               min_cover: float = DEFAULT_MIN_COVER, slice_step_mm: float = DEFAULT_SLICE_STEP_MM,
               edge_min_cover: float | None = None, box_rounds: "int | str | dict[int, int] | None" = None,
               progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None) -> RefineAllResult:
    """Redraw every organ of ``labels`` (a label map on ``volume``'s grid) slice by slice from its own boxes.

    ``min_cover`` (0..1): the share of the organ's voxels on a slice that the answer must cover to replace
    them (0: every answer replaces). ``slice_step_mm``: on thinner slices, embed slices at most this far apart
    and interpolate in between (0: every slice). ``box_rounds``: how often each organ is asked on a slice, each
    round with the box around the previous answer and FINE's voxels (:func:`parse_box_rounds`; None:
    ``DEFAULT_BOX_ROUNDS``). progress(done, total) is called after each embedded slice; setting
    ``cancel`` stops within one slice (:class:`~FINESegmentationLib.errors.CancelledError`, nothing returned)."""
    if labels.shape != volume.shape or not labels.geometry.allclose(volume.geometry):
        raise InputError("The segmentation does not lie on the CT's voxel grid; resample it onto the CT before refining.")
    if not 0.0 <= min_cover <= 1.0:
        raise InputError(f"min_cover must lie between 0 and 1 (got {min_cover}).")
    if edge_min_cover is not None and not (np.isfinite(edge_min_cover) and edge_min_cover >= 0):
        raise InputError(f"edge_min_cover must be 0 or more (above 1: FINE's outline always stays at the image's edge; got {edge_min_cover}).")
    if not (np.isfinite(slice_step_mm) and slice_step_mm >= 0):
        raise InputError(f"slice_step_mm must be 0 (every slice) or a positive number of millimetres (got {slice_step_mm}).")
    rounds = parse_box_rounds(box_rounds)
    start = time.perf_counter()
    embed_before = predictor.embed_seconds
    if predictor.volume is not volume:
        predictor.set_volume(volume)
    frame = predictor.frame
    source = frame.to_frame(np.asarray(labels.array))
    out = np.zeros(frame.shape, np.uint8)
    todo = [k for k in range(frame.shape[0]) if source[k].any()]
    chosen = refined_slices(todo, source, float(frame.spacing[2]), slice_step_mm)
    counts = {"boxes": 0, "kept": 0, "interpolated": 0}

    def guard(logits: torch.Tensor, own: np.ndarray) -> torch.Tensor:
        inside = torch.from_numpy(own)
        need = min_cover
        if edge_min_cover is not None and (own[0].any() or own[-1].any() or own[:, 0].any() or own[:, -1].any()):
            need = edge_min_cover
        if int((logits[inside] > 0).sum()) < need * int(inside.sum()):
            # The answer left the organ: its input outline stays, held against the other organs' answers.
            counts["kept"] += 1
            return torch.where(inside, torch.tensor(float("inf")), torch.tensor(-float("inf")))
        return logits

    def assign(k: int, answers: dict[int, torch.Tensor]) -> None:
        best = torch.full(frame.shape[1:], -torch.inf)
        winner = torch.zeros(frame.shape[1:], dtype=torch.uint8)
        for organ, logits in answers.items():
            better = logits > best
            best = torch.where(better, logits, best)
            winner[better] = organ
        out[k] = np.where(best.numpy() > 0, winner.numpy(), 0)

    previous: tuple[int, dict[int, torch.Tensor]] | None = None
    for n, k in enumerate(chosen):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Refining was cancelled; the segmentation was left as it was.")
        answers = {}
        for organ in (int(v) for v in np.unique(source[k]) if v != 0):
            own = source[k] == organ
            box = predictor.enlarged_box(own, margin_mm)
            logits = predictor.slice_logits(k, box)[0]
            counts["boxes"] += 1
            for _ in range(rounds.get(organ, 1) - 1):  # each round: the box around the answer and FINE's voxels
                grown = predictor.enlarged_box((logits.numpy() > 0) | own, margin_mm)
                if grown is None or np.array_equal(grown, box):
                    break
                box = grown
                logits = predictor.slice_logits(k, box)[0]
                counts["boxes"] += 1
            answers[organ] = guard(logits, own)
        assign(k, answers)
        if previous is not None and k - previous[0] > 1:
            a, below = previous
            for j in range(a + 1, k):
                t = (j - a) / (k - a)
                between = {}
                for organ in (int(v) for v in np.unique(source[j]) if v != 0):
                    own = source[j] == organ
                    if organ in below and organ in answers:
                        mixed = (1 - t) * below[organ].clamp(-_CLIP, _CLIP) + t * answers[organ].clamp(-_CLIP, _CLIP)
                        between[organ] = guard(mixed, own)
                        counts["interpolated"] += 1
                    else:
                        between[organ] = torch.where(torch.from_numpy(own), torch.tensor(float("inf")), torch.tensor(-float("inf")))
                assign(j, between)
        previous = (k, answers)
        if progress is not None:
            progress(n + 1, len(chosen))
    seconds = time.perf_counter() - start
    report = {
        "organs": [int(v) for v in np.unique(source) if v != 0],
        "slices": len(todo),
        "embedded": len(chosen),  # slices embedded and prompted; the rest interpolate between them
        "boxes": counts["boxes"],
        "interpolated": counts["interpolated"],  # organ outlines on in-between slices from interpolated answers
        "kept": counts["kept"],  # organ outlines on a slice left as they were (the answer covered too little of them)
        "margin_mm": margin_mm,
        "slice_step_mm": slice_step_mm,
        "box_rounds": {k: v for k, v in rounds.items() if v != 1},  # organ label -> rounds (the rest: one)
        "min_cover": min_cover,
        "edge_min_cover": edge_min_cover,
        "embed_s": round(predictor.embed_seconds - embed_before, 3),
        "total_s": round(seconds, 3),
    }
    return RefineAllResult(Volume(frame.from_frame(out), labels.geometry), report)
