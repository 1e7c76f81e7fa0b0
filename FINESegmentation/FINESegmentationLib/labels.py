"""The organs FINE segments: label values, names, colours and SNOMED CT codes.

Codes follow DICOM/SNOMED CT as Slicer's TotalSegmentator terminology uses them;
colours are Slicer's GenericAnatomyColors. Label values are this project's
(0 is background) and are stored in every checkpoint's metadata.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Organ:
    label: int
    name: str
    snomed_code: str
    snomed_meaning: str
    color: tuple[int, int, int]
    laterality_code: str | None = None
    laterality_meaning: str | None = None

    @property
    def color_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]


ORGANS: tuple[Organ, ...] = (
    Organ(1, "spleen", "78961009", "Spleen", (157, 108, 162)),
    Organ(2, "right kidney", "64033007", "Kidney", (185, 102, 83), "24028007", "Right"),
    Organ(3, "left kidney", "64033007", "Kidney", (185, 102, 83), "7771000", "Left"),
    Organ(4, "gallbladder", "28231008", "Gallbladder", (139, 150, 98)),
    Organ(5, "liver", "10200004", "Liver", (221, 130, 101)),
    Organ(6, "stomach", "69695003", "Stomach", (216, 132, 105)),
    Organ(7, "aorta", "15825003", "Aorta", (224, 97, 76)),
    Organ(8, "pancreas", "15776009", "Pancreas", (249, 180, 111)),
)

CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(o.name for o in ORGANS)
NUM_CLASSES = len(CLASS_NAMES)
ORGAN_BY_NAME = {o.name: o for o in ORGANS}
ORGAN_BY_LABEL = {o.label: o for o in ORGANS}
