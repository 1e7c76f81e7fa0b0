"""The scan being painted: its voxels' positions in the anatomy frame, its HU and its organ labels.

A scan's voxel centre ``p`` (world mm) shows the anatomy at ``q = T(p)``: a small in-plane rotation and
scaling about the scan's centre, a cranio-caudal stretch and a smooth in-plane displacement (the
"small smooth deformations" of each case). Labels are the map sampled at ``q`` and every drawn structure is
evaluated at ``q`` too, so the label map and the image always agree. ``qx``, ``qy`` are full arrays
[z, y, x]; ``qz`` depends on the slice only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_F32 = np.float32


@dataclass(frozen=True)
class Deformation:
    """``q = T(p)`` about ``centre`` (x, y, z mm): in-plane ``angle`` (rad) and ``scale`` (sx, sy),
    cranio-caudal ``scale_z``, plus separable cosine modes in-plane (amplitude ``max_mm``)."""

    centre: tuple[float, float, float]
    angle: float
    scale: tuple[float, float]
    scale_z: float
    wavenumber: np.ndarray  # (modes, 3)
    phase: np.ndarray  # (modes, 3)
    weight: np.ndarray  # (2, modes): x and y displacement per mode
    max_mm: float

    @classmethod
    def draw(cls, rng: np.random.Generator, centre, max_mm: float, modes: int = 4) -> "Deformation":
        weight = rng.normal(size=(2, modes))
        weight *= max_mm / np.abs(weight).sum(axis=1, keepdims=True)
        return cls(
            tuple(float(c) for c in centre), float(np.radians(rng.uniform(-4, 4))),
            (float(rng.uniform(0.94, 1.06)), float(rng.uniform(0.94, 1.06))), float(rng.uniform(0.95, 1.05)),
            2 * math.pi / rng.uniform(120.0, 320.0, size=(modes, 3)), rng.uniform(0, 2 * math.pi, size=(modes, 3)),
            weight, float(max_mm),
        )

    def apply(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anatomy-frame (qx [z, y, x], qy [z, y, x], qz [z]) of the grid with axes ``x``, ``y``, ``z``."""
        cx, cy, cz = self.centre
        c, s = math.cos(self.angle), math.sin(self.angle)
        sx, sy = self.scale
        dx, dy = (x - cx).astype(_F32), (y - cy).astype(_F32)
        fx = np.cos(self.wavenumber[:, 0, None] * x[None, :] + self.phase[:, 0, None]).astype(_F32)
        fy = np.cos(self.wavenumber[:, 1, None] * y[None, :] + self.phase[:, 1, None]).astype(_F32)
        fz = np.cos(self.wavenumber[:, 2, None] * z[None, :] + self.phase[:, 2, None]).astype(_F32)
        shape = (len(z), len(y), len(x))
        out = []
        for k, (a, b, centre) in enumerate(((c * sx, -s * sx, cx), (s * sy, c * sy, cy))):
            q = np.empty(shape, _F32)
            q[...] = _F32(a) * dx[None, None, :] + _F32(b) * dy[None, :, None] + _F32(centre)
            w = self.weight[k]
            for m in range(len(w)):
                q += _F32(w[m]) * fz[m][:, None, None] * fy[m][None, :, None] * fx[m][None, None, :]
            out.append(q)
        qz = (cz + self.scale_z * (z - cz)).astype(_F32)
        return out[0], out[1], qz


class Canvas:
    """HU and label arrays of one scan plus its voxels' anatomy-frame coordinates."""

    def __init__(self, qx: np.ndarray, qy: np.ndarray, qz: np.ndarray, label: np.ndarray, spacing):
        self.qx, self.qy, self.qz = qx, qy, qz
        self.label = label
        self.spacing = tuple(float(s) for s in spacing)  # output voxel size (x, y, z), mm
        self.hu = np.full(label.shape, -1000.0, _F32)
        self.cavity = np.zeros(label.shape, bool)  # set by the body: inside the abdominal/thoracic wall
        self.cavity_depth = np.zeros(label.shape, _F32)  # mm inside the cavity's outline (0 outside)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.label.shape

    def qz3(self, box=None) -> np.ndarray:
        """qz broadcast to [z, 1, 1] (optionally for a box)."""
        qz = self.qz if box is None else self.qz[box[0]]
        return qz[:, None, None]

    def box(self, lo, hi, margin: int = 3):
        """Index box (z, y, x slices) of the voxels whose anatomy position lies in [lo, hi] (x, y, z mm), or None."""
        zs = np.nonzero((self.qz >= lo[2]) & (self.qz <= hi[2]))[0]
        if zs.size == 0:
            return None
        step = 4
        sub = (slice(zs[0], zs[-1] + 1), slice(None, None, step), slice(None, None, step))
        inside = (self.qx[sub] >= lo[0]) & (self.qx[sub] <= hi[0]) & (self.qy[sub] >= lo[1]) & (self.qy[sub] <= hi[1])
        _, j, i = np.nonzero(inside)
        if j.size == 0:
            return None
        ny, nx = self.shape[1:]
        return (
            slice(zs[0], zs[-1] + 1),
            slice(max(0, j.min() * step - step - margin), min(ny, j.max() * step + step + margin + 1)),
            slice(max(0, i.min() * step - step - margin), min(nx, i.max() * step + step + margin + 1)),
        )

    def points(self, box) -> np.ndarray:
        """Anatomy-frame coordinates of a box, stacked (3, z, y, x) in float32 (for shape distance functions)."""
        qx = self.qx[box]
        return np.stack([qx, self.qy[box], np.broadcast_to(self.qz3(box), qx.shape)])
