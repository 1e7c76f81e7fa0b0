"""The real organ label maps the synthetic CT is built around: finding, splitting and reading them.

The maps (``../shared/data/anatomy-labels/labelNNNN.nii.gz``) hold the project's eight organ labels and
nothing else. They are LPS with an identity direction: index x grows toward the patient's left, y toward
posterior, z toward superior. Everything the generator draws lives in this frame (millimetres,
``world = origin + index * spacing``).

Split: several maps share one scan grid (same pixel spacing, slice spacing and slice count) and overlap
heavily, so they are probably the same scan labelled twice; such maps form one group and a group is never
split between training and validation. :data:`VALIDATION_MAPS` is the result of
:func:`choose_validation`: a seeded shuffle (seed :data:`SPLIT_SEED`) of the sorted groups, taking whole
groups while the total stays at most :data:`VALIDATION_SIZE` maps.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ...errors import InputError
from ...io import case_name

SPLIT_SEED = 12
VALIDATION_SIZE = 7
#: Kept out of training (see :func:`choose_validation`); 0007 and 0169 share a scan grid.
VALIDATION_MAPS: tuple[str, ...] = (
    "label0002", "label0004", "label0007", "label0022", "label0028", "label0038", "label0169",
)
SPLITS = ("train", "val")
COARSE_MM = 3.0  # the analysis grid's in-plane step


def map_name(path: Path) -> str:
    """``label0001`` for ``.../label0001.nii.gz``."""
    return case_name(path)


def list_maps(folder: str | Path) -> list[Path]:
    """The label maps in ``folder``, sorted by name; one clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"The anatomy folder {folder} does not exist; give the folder of organ label maps (../shared/data/anatomy-labels).")
    maps = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
    if not maps:
        raise InputError(f"The anatomy folder {folder} holds no label maps (.nii.gz, .nii, .nrrd, .mha); give the folder of organ label maps.")
    return maps


def choose_validation(grids: dict[str, tuple], size: int = VALIDATION_SIZE, seed: int = SPLIT_SEED) -> list[str]:
    """Names kept for validation: whole grid groups in a seeded order while at most ``size`` maps.

    ``grids`` maps each name to its scan grid (spacing and size, rounded); equal grids form a group.
    """
    groups: dict[tuple, list[str]] = {}
    for name in sorted(grids):
        groups.setdefault(grids[name], []).append(name)
    ordered = sorted(groups.values())
    chosen: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(ordered)):
        if len(chosen) + len(ordered[i]) <= size:
            chosen += ordered[i]
    return sorted(chosen)


def split_maps(folder: str | Path, split: str) -> list[Path]:
    """The maps of ``split`` ('train': all but :data:`VALIDATION_MAPS`, 'val': those)."""
    if split not in SPLITS:
        raise InputError(f"Unknown split '{split}'; use train or val.")
    maps = list_maps(folder)
    chosen = [p for p in maps if (map_name(p) in VALIDATION_MAPS) == (split == "val")]
    if not chosen:
        raise InputError(f"The anatomy folder {folder} holds no label maps of the {split} split; give the folder of organ label maps.")
    return chosen


@dataclass(frozen=True)
class AnatomyMap:
    """One label map: ``labels`` [z, y, x] uint8 with world = origin + index * spacing (x, y, z, mm)."""

    name: str
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, a: int) -> np.ndarray:
        """World coordinates (mm) of the voxel centres along x (0), y (1) or z (2)."""
        n = self.labels.shape[2 - a]
        return (self.origin[a] + np.arange(n) * self.spacing[a]).astype(np.float32)


@functools.lru_cache(maxsize=2)
def read_map(path: Path) -> AnatomyMap:
    """Reads a map, reoriented to LPS with identity direction (the maps already are; others are turned)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"Cannot read the label map {path}; it must be a NIfTI, NRRD or MHA label image.") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The label map {path} must be a 3-D single-channel label image.")
    image = sitk.DICOMOrient(image, "LPS")
    labels = sitk.GetArrayFromImage(image)
    if labels.min() < 0 or labels.max() > 8:
        raise InputError(f"The label map {path} holds values outside 0..8; it must use the project's organ labels.")
    labels = labels.astype(np.uint8)
    labels.setflags(write=False)
    return AnatomyMap(map_name(path), labels, tuple(image.GetSpacing()), tuple(image.GetOrigin()))


@dataclass(frozen=True)
class Coarse:
    """The map on a coarse analysis grid (every ``step``-th pixel in-plane, every slice): cheap to measure."""

    labels: np.ndarray  # [z, y, x]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def of(cls, anatomy: AnatomyMap) -> "Coarse":
        step = max(1, int(round(COARSE_MM / anatomy.spacing[0])))
        off = step // 2
        return cls(
            np.ascontiguousarray(anatomy.labels[:, off::step, off::step]),
            anatomy.axis(0)[off::step], anatomy.axis(1)[off::step], anatomy.axis(2),
        )

    def points(self, label: int, z_index: int | None = None) -> np.ndarray:
        """World (x, y, z) of the coarse voxels of ``label`` (optionally in one slice), as (N, 3)."""
        lab = self.labels if z_index is None else self.labels[z_index : z_index + 1]
        k, j, i = np.nonzero(lab == label)
        z = self.z[k] if z_index is None else np.full(k.size, self.z[z_index], np.float32)
        return np.column_stack([self.x[i], self.y[j], z]).astype(np.float64)

    def z_range(self, label: int | None = None) -> tuple[float, float] | None:
        """Lowest and highest slice centre (mm) holding ``label`` (any organ when None)."""
        present = (self.labels > 0) if label is None else (self.labels == label)
        k = np.nonzero(present.any(axis=(1, 2)))[0]
        if k.size == 0:
            return None
        return float(self.z[k[0]]), float(self.z[k[-1]])
