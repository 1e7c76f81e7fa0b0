"""Dice and HD95 (millimetres) per organ and on average, with MONAI's metrics.

Per case and organ: Dice, and the 95th-percentile Hausdorff distance in mm (MONAI's
``compute_hausdorff_distance`` with the voxel spacing). An organ absent from the
reference is left out of that case's averages (MONAI's ``ignore_empty``); an organ
present in the reference but missed entirely gets Dice 0 and no HD95 (undefined),
and is counted in ``missed``.

For the organs that only context tells apart (the two kidneys, mirror images told
apart by their side of the body; spleen and liver, of similar intensity) each case
also records ``swapped``: the fraction of the organ's reference voxels that the
prediction gave to its partner. Dice mixes that error with boundary errors; this
isolates it.
"""
from __future__ import annotations

import csv
import io as _io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from .labels import ORGAN_BY_NAME, ORGANS
from .volume import Volume

# Organs that context alone tells apart: each one's partner.
CONFUSABLE = {"right kidney": "left kidney", "left kidney": "right kidney", "spleen": "liver", "liver": "spleen"}

SHORT = {"spleen": "Sp", "right kidney": "RKi", "left kidney": "LKi", "gallbladder": "Gb", "liver": "Li", "stomach": "St", "aorta": "Ao", "pancreas": "Pa"}


def case_metrics(prediction: Volume, reference: Volume) -> dict[str, dict[str, float]]:
    """{organ: {"dice": ..., "hd95": ...}} for the organs present in ``reference`` (same grid);
    the organs in ``CONFUSABLE`` also get ``swapped`` (fraction of their reference voxels
    labelled as their partner)."""
    if prediction.shape != reference.shape:
        raise ValueError("Prediction and reference must lie on the same grid.")
    spacing = tuple(reversed(reference.geometry.spacing))  # (z, y, x) like the arrays
    out: dict[str, dict[str, float]] = {}
    for organ in ORGANS:
        gt = torch.from_numpy(reference.array == organ.label)[None, None]
        if not gt.any():
            continue
        pred = torch.from_numpy(prediction.array == organ.label)[None, None]
        dice = float(compute_dice(pred, gt, include_background=True)[0, 0])
        hd = float("nan")
        if pred.any():
            with warnings.catch_warnings():
                # MONAI 1.6 warns about an argument it passes to itself (get_mask_edges).
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                hd = float(compute_hausdorff_distance(pred, gt, include_background=True, percentile=95, spacing=spacing)[0, 0])
        out[organ.name] = {"dice": dice, "hd95": hd}
        partner = CONFUSABLE.get(organ.name)
        if partner is not None:
            given = prediction.array[reference.array == organ.label]
            out[organ.name]["swapped"] = float(np.count_nonzero(given == ORGAN_BY_NAME[partner].label)) / given.size
    return out


@dataclass
class Evaluation:
    """Per-case metrics and their per-organ means."""

    name: str
    cases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def organ_mean(self, organ: str, metric: str) -> float:
        values = [c[organ][metric] for c in self.cases.values() if metric in c.get(organ, {}) and not math.isnan(c[organ][metric])]
        return float(np.mean(values)) if values else float("nan")

    def mean(self, metric: str) -> float:
        values = [self.organ_mean(o.name, metric) for o in ORGANS]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def case_means(self, metric: str = "dice") -> dict[str, float]:
        """{case: mean of ``metric`` over the organs of its reference} (organs without a value left out)."""
        out = {}
        for case, organs in self.cases.items():
            values = [m[metric] for m in organs.values() if metric in m and not math.isnan(m[metric])]
            out[case] = float(np.mean(values)) if values else float("nan")
        return out

    def subset(self, case_ids) -> "Evaluation":
        return Evaluation(self.name, {c: self.cases[c] for c in case_ids if c in self.cases})

    def swaps(self) -> str:
        """One line: the mean share of each confusable organ given to its partner (%)."""
        shares = {o: self.organ_mean(o, "swapped") for o in CONFUSABLE}
        parts = [f"{SHORT[o]} as {SHORT[CONFUSABLE[o]]} {100 * v:.2f}%" for o, v in shares.items() if not math.isnan(v)]
        return "Reference voxels labelled as the partner organ: " + ", ".join(parts) if parts else ""

    @property
    def missed(self) -> int:
        return sum(1 for c in self.cases.values() for m in c.values() if m["dice"] == 0.0)

    def table_row(self) -> list[str]:
        return [self.name, f"{self.mean('hd95'):.1f}", f"{100 * self.mean('dice'):.1f}"] + [
            f"{100 * self.organ_mean(o.name, 'dice'):.1f}" for o in ORGANS
        ]


def table_header() -> list[str]:
    return ["Method", "HD95 (mm)", "DSC"] + [SHORT[o.name] for o in ORGANS]


def markdown_table(evaluations: list[Evaluation]) -> str:
    """Shaped like Table 1 of the FINE paper: average HD95 and Dice, then Dice per organ (in %)."""
    rows = [table_header(), ["---"] * len(table_header())] + [e.table_row() for e in evaluations]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def per_case_csv(evaluation: Evaluation) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "organ", "dice", "hd95_mm", "swapped_to_partner"])
    for case, organs in sorted(evaluation.cases.items()):
        for organ, m in organs.items():
            w.writerow([case, organ, f"{m['dice']:.4f}", "" if math.isnan(m["hd95"]) else f"{m['hd95']:.2f}",
                        f"{m['swapped']:.5f}" if "swapped" in m else ""])
    for o in ORGANS:
        swapped = evaluation.organ_mean(o.name, "swapped")
        w.writerow(["mean", o.name, f"{evaluation.organ_mean(o.name, 'dice'):.4f}", f"{evaluation.organ_mean(o.name, 'hd95'):.2f}",
                    "" if math.isnan(swapped) else f"{swapped:.5f}"])
    w.writerow(["mean", "all", f"{evaluation.mean('dice'):.4f}", f"{evaluation.mean('hd95'):.2f}", ""])
    return buf.getvalue()


def evaluate(segmenter, data: str, case_ids: list[str] | None = None, label_map: str = "identity", name: str | None = None,
             progress: bool = True) -> Evaluation:
    """Segment every labelled case of a dataset folder (or the listed ones) and score it."""
    from .data.datasets import parse_label_map, select_cases

    return evaluate_cases(segmenter, select_cases(data, case_ids), parse_label_map(label_map), name, progress)


def evaluate_cases(segmenter, cases, mapping: dict[int, int] | None = None, name: str | None = None, progress: bool = True) -> Evaluation:
    """Segment and score ``cases`` (``CaseFiles``: an id, an image and its reference label map)."""
    from tqdm import tqdm

    from .data.datasets import LABEL_MAPS, map_labels
    from .io import read_volume

    result = Evaluation(name or segmenter.model_name)
    for c in tqdm(cases, desc="evaluating", unit="case", disable=not progress):
        image = read_volume(c.image)
        reference = read_volume(c.label, kind="label")
        reference = Volume(map_labels(reference.array, mapping or LABEL_MAPS["identity"]), reference.geometry)
        prediction = segmenter.segment(image).labels
        result.cases[c.case_id] = case_metrics(prediction, reference)
    return result
