"""A volume: a voxel array and the geometry that places it in patient space.

Geometry travels with the array in this one object (never as loose arguments).
Conventions, fixed here once for the whole engine:

* ``array`` is indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order,
  i.e. slowest axis first).
* ``spacing`` and ``origin`` are given in ``(x, y, z)`` order, in millimetres,
  and ``direction`` is the 3x3 matrix whose *columns* are the directions of the
  i, j, k (x, y, z index) axes, all in **LPS** patient coordinates, exactly as
  ITK/SimpleITK and DICOM store them.
* Slicer works in RAS; :meth:`Geometry.ijk_to_ras` / :meth:`Geometry.from_ras_matrix`
  are the only places where LPS and RAS meet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Placement of a voxel grid in LPS patient space (ITK conventions)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.asarray(self.direction).ravel()))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 spacings, 3 origin coordinates and a 3x3 direction matrix.")
        if min(self.spacing) <= 0 or not np.all(np.isfinite(self.spacing)):
            raise ValueError(f"Voxel spacing must be positive and finite, got {self.spacing}.")

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (i, j, k) = (x, y, z) indices to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (i, j, k) indices to RAS mm (Slicer's IJKToRAS)."""
        m = self.ijk_to_lps()
        m[:3, :] = _LPS_TO_RAS @ m[:3, :]
        return m

    @classmethod
    def from_ras_matrix(cls, ijk_to_ras: np.ndarray) -> "Geometry":
        """Inverse of :meth:`ijk_to_ras` (for a Slicer volume node's IJKToRAS matrix)."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        lps = _LPS_TO_RAS @ m[:3, :]
        scaled = lps[:3, :3]
        spacing = np.linalg.norm(scaled, axis=0)
        return cls(spacing=tuple(spacing), origin=tuple(lps[:3, 3]), direction=tuple((scaled / spacing).ravel()))

    def ras_to_ijk(self, ras: Sequence[float]) -> np.ndarray:
        """Continuous (i, j, k) = (x, y, z) index of a RAS point in mm."""
        p = np.append(np.asarray(ras, dtype=np.float64), 1.0)
        return (np.linalg.inv(self.ijk_to_ras()) @ p)[:3]

    def allclose(self, other: "Geometry", atol: float = 1e-4) -> bool:
        return (
            np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


@dataclass
class Volume:
    """A 3-D array ``[z, y, x]`` with its :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"A volume must be 3-D, got an array of shape {self.array.shape}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume on the same grid (same geometry) holding ``array``."""
        if array.shape[-3:] != self.array.shape:
            raise ValueError(f"Array shape {array.shape} does not match the volume grid {self.array.shape}.")
        return Volume(array, self.geometry)
