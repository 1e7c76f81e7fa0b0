"""Dice after 0..N simulated clicks per organ, with and without the memory.

For every organ of every labelled case, the initial mask is FINE's segment of it (from
a folder of FINE's outputs, ``initial``), or else a FINE-like mask made from the
reference (the perturbations of training, drawn at the crop's resolution with a seed
fixed per case and organ, then resampled onto the case's own grid). The predictor is
set on it, and clicks are simulated on the input grid inside the crop box
(:func:`.clicks.next_click`: the first three at the deepest point of the largest
error, then at random in the errors). Each answer is pasted into the segment and
becomes the previous mask of the next click. Dice is computed on the whole input
grid against the reference. Clicks = 0 is the refiner's answer to the initial mask
alone; ``initial`` is the Dice of the initial mask itself. Both memory modes start
from the same initial mask and the same random stream. An organ FINE missed entirely
has nothing to refine and is counted in ``missed`` instead.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..errors import InputError
from ..labels import ORGAN_BY_LABEL, ORGANS
from ..volume import Volume
from .clicks import next_click
from .config import DEFAULT_REACH_FACTOR, DEFAULT_REACH_MM
from .crop import MIN_ORGAN_VOXELS, crop_for_segment, labels_crop, logits_to_box
from .predictor import RefinerPredictor
from .training import perturb_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def initial_mask(reference: Volume, organ: int, config, rng: np.random.Generator) -> np.ndarray:
    """A FINE-like imperfect mask of ``organ`` on the reference's grid (bool [z, y, x])."""
    target = reference.array == organ
    crop = crop_for_segment(reference.geometry, target, config)
    labels = labels_crop(reference.array.astype(np.uint8), reference.geometry, crop)
    perturbed = perturb_mask(labels == organ, labels, organ, rng)
    full = np.zeros(reference.shape, bool)
    box = tuple(slice(0, s) for s in reference.shape)
    # Logit-like +-1 resampled linearly: the perturbed mask at the crop's resolution seen on the input grid.
    full[box] = logits_to_box(np.where(perturbed, 1.0, -1.0), crop, reference.geometry, box) > 0
    return full if full.any() else target


@dataclass
class ClickCurves:
    """Rows of (case, organ, memory, clicks, dice); ``initial`` holds the Dice of each initial mask."""

    rows: list[dict] = field(default_factory=list)
    initial: dict[tuple[str, str], float] = field(default_factory=dict)
    missed: list[tuple[str, str]] = field(default_factory=list)

    def mean(self, organ: str | None, memory: bool, clicks: int) -> float:
        values = [r["dice"] for r in self.rows if r["memory"] == memory and r["clicks"] == clicks and (organ is None or r["organ"] == organ)]
        return float(np.mean(values)) if values else float("nan")

    def initial_mean(self, organ: str | None) -> float:
        values = [d for (case, o), d in self.initial.items() if organ is None or o == organ]
        return float(np.mean(values)) if values else float("nan")

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["case", "organ", "memory", "clicks", "dice", "initial_dice"])
        for r in self.rows:
            writer.writerow([r["case"], r["organ"], int(r["memory"]), r["clicks"], f"{r['dice']:.4f}", f"{self.initial[(r['case'], r['organ'])]:.4f}"])
        return buffer.getvalue()

    def markdown(self, clicks: Sequence[int] = (0, 1, 3, 5, 10)) -> str:
        """Mean Dice (%) per organ: initial mask, then after each number of clicks, without / with memory."""
        modes = sorted({r["memory"] for r in self.rows})
        most = max(r["clicks"] for r in self.rows)
        clicks = [c for c in clicks if c <= most]
        header = ["Organ", "initial"] + [f"{c} click{'s' if c != 1 else ''}" + ("" if len(modes) == 1 else " (no mem / mem)") for c in clicks]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        organs = [o.name for o in ORGANS if any(r["organ"] == o.name for r in self.rows)]
        for organ in organs + [None]:
            cells = [organ or "**mean**", f"{100 * self.initial_mean(organ):.1f}"]
            for c in clicks:
                cells.append(" / ".join(f"{100 * self.mean(organ, m, c):.1f}" for m in modes))
            lines.append("| " + " | ".join(cells) + " |")
        curve_header = ["Memory"] + [str(c) for c in range(most + 1)]
        lines += ["", "Mean Dice (%) over all organs after 0..{} clicks:".format(most), "",
                  "| " + " | ".join(curve_header) + " |", "|" + "---|" * len(curve_header)]
        for m in modes:
            lines.append("| " + " | ".join([("with" if m else "without")] + [f"{100 * self.mean(None, m, c):.1f}" for c in range(most + 1)]) + " |")
        return "\n".join(lines)


def _initial_labels(folder: Path, case_id: str, reference: Volume) -> np.ndarray:
    """FINE's label map of a case from ``folder`` (``<case>[_0000]`` + .seg.nrrd / .nii.gz / .nrrd), on the reference grid."""
    from ..io import read_segmentation

    for stem in (case_id, f"{case_id}_0000"):
        for extension in (".seg.nrrd", ".nii.gz", ".nrrd"):
            path = folder / f"{stem}{extension}"
            if path.is_file():
                labels = read_segmentation(path)
                if labels.shape != reference.shape or not labels.geometry.allclose(reference.geometry):
                    raise InputError(f"{path} does not lie on the grid of case {case_id}; give FINE's segmentations of these very images.")
                return labels.array
    raise InputError(f"No segmentation of case {case_id} in {folder}; segment the dataset's images with fine-seg segment first.")


def click_curves(predictor: RefinerPredictor, data: str, case_ids: Sequence[str] | None = None, clicks: int = 10,
                 memory_modes: Sequence[bool] = (False, True), seed: int = 0, progress: bool = True,
                 initial: str | Path | None = None, reach_mm: float | None = DEFAULT_REACH_MM,
                 reach_factor: float = DEFAULT_REACH_FACTOR) -> ClickCurves:
    """Dice after 0..``clicks`` clicks for every organ of every case of a labelled dataset.

    ``initial``: a folder of FINE's segmentations of the dataset's images to start from
    (default: perturbed reference masks). ``reach_mm``, ``reach_factor``: how far from a click an answer
    changes the segment (:meth:`RefinerPredictor.predict`; reach_mm None: the whole crop).
    """
    from ..data.datasets import select_cases
    from ..io import read_volume

    cases = select_cases(data, case_ids)
    if any(memory_modes) and not predictor.has_memory:
        raise InputError("An evaluation with memory needs a refiner memory; give one (--memory) or evaluate without it (--no-memory).")
    curves = ClickCurves()
    for case_index, c in enumerate(tqdm(cases, desc="evaluating refiner", unit="case", disable=not progress)):
        image = read_volume(c.image)
        reference = read_volume(c.label, kind="label")
        spacing = reference.geometry.spacing
        fine = _initial_labels(Path(initial), c.case_id, reference) if initial is not None else None
        for organ in [o.label for o in ORGANS if (reference.array == o.label).sum() >= MIN_ORGAN_VOXELS]:
            name = ORGAN_BY_LABEL[organ].name
            target = reference.array == organ
            if fine is None:
                start = initial_mask(reference, organ, predictor.config, np.random.default_rng([seed, case_index, organ]))
            else:
                start = fine == organ
                if not start.any():
                    curves.missed.append((c.case_id, name))
                    continue
            curves.initial[(c.case_id, name)] = dice(start, target)
            predictor.set_volume(image, start)
            box = predictor.box
            offset = np.array([box[2].start, box[1].start, box[0].start])
            for memory in memory_modes:
                rng = np.random.default_rng([seed, case_index, organ, 1])
                current, points, labels = start, [], []
                for n in range(clicks + 1):
                    if n > 0:
                        click = next_click(current[box], target[box], n - 1, rng, spacing)
                        if click is not None:
                            points.append(offset + np.array(click.xyz))
                            labels.append(int(click.positive))
                    result = predictor.predict(np.array(points, dtype=np.float64).reshape(-1, 3), labels, previous_mask=current if n else None,
                                               use_memory=memory, point_space="ijk", reach_mm=reach_mm,
                                               reach_factor=reach_factor)
                    current = result.paste(current)
                    curves.rows.append({"case": c.case_id, "organ": name, "memory": memory, "clicks": n, "dice": dice(current, target)})
    return curves
