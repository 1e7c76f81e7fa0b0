"""Synthetic contrast-enhanced abdominal CT with organ labels, deterministic from a seed.

No labelled abdominal CT exists on the machines this project runs on, so it
trains and tests on phantoms made here. They imitate the BCV ("Synapse")
multi-organ data set: portal venous phase CT, 512 x 512 pixels of 0.6-0.9 mm,
80-200 slices of 2.5-5 mm, labels 1..8 as in :mod:`FINESegmentationLib.labels`.

Conventions
-----------
* Arrays are ``[z, y, x]``; geometry is LPS with identity direction, so index
  x grows towards the patient's **left**, y towards **posterior**, z towards
  **superior**. In radiological display (array shown as an image, row 0 at the
  top) the liver therefore appears on the image left and the spine at the bottom.
* The anatomy is written in a *body frame* in millimetres: same axes as LPS,
  origin at the centre of the abdominal cavity in-plane and at the liver dome in z.
  A scan places that frame in scanner coordinates with an in-plane offset (the
  patient lies off the isocentre) and a cranio-caudal field of view that starts
  anywhere from just below the liver dome to ~9 cm above it.
* Every shape is an approximate signed distance function (mm, negative inside)
  evaluated on coordinate grids, only inside each structure's bounding box.
  Organs are posed (random scale 0.85-1.15, rotation, shift) and then all inner
  structures are warped by one smooth random displacement field, so the label
  map and the intensities always agree.
* Intensities are whole Hounsfield units in -1024..3071 held in float32, blurred
  by a small point spread function (partial volume at edges) plus correlated
  Gaussian noise of 10-20 HU.
* The same ``seed`` and case index give bit-identical arrays. The anatomy does
  not depend on the requested grid size: a case rendered at ``in_plane=96`` is
  the same patient as at 512, seen with coarser voxels over the same field of view.

Properties that make global context necessary (as in real CT): left and right
kidney are drawn from one mirrored shape and share their intensities, so only
their position tells them apart; spleen and liver are within ~12 HU of each
other; the field of view and in-plane centring vary from case to case.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from ..errors import InputError
from ..labels import CLASS_NAMES, ORGAN_BY_NAME
from ..volume import Geometry, Volume

logger = logging.getLogger(__name__)

SPLEEN = ORGAN_BY_NAME["spleen"].label
RIGHT_KIDNEY = ORGAN_BY_NAME["right kidney"].label
LEFT_KIDNEY = ORGAN_BY_NAME["left kidney"].label
GALLBLADDER = ORGAN_BY_NAME["gallbladder"].label
LIVER = ORGAN_BY_NAME["liver"].label
STOMACH = ORGAN_BY_NAME["stomach"].label
AORTA = ORGAN_BY_NAME["aorta"].label
PANCREAS = ORGAN_BY_NAME["pancreas"].label

#: Physical ranges the generator draws from (BCV-like acquisitions).
PIXEL_SPACING_MM = (0.6, 0.9)
SLICE_SPACING_MM = (2.5, 5.0)
DEFAULT_SLICE_RANGE = (80, 200)
MIN_IN_PLANE = 32
MIN_SLICES = 8

_F32 = np.float32
_MIRROR_X = np.diag([-1.0, 1.0, 1.0])
AIR_HU = -1000.0
_THETA = np.linspace(-math.pi, math.pi, 721)  # angles at which body outlines are measured


# --------------------------------------------------------------------------- shapes


def _rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles in radians about the x, y, z axes."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(matrix: np.ndarray, points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``matrix @ (points - centre)`` for coordinates stacked as ``(3, ...)``, in float32."""
    m = np.asarray(matrix, dtype=_F32)
    flat = points.reshape(3, -1)
    out = m @ flat
    out -= (m @ np.asarray(centre, dtype=_F32))[:, None]
    return out.reshape(points.shape)


def _angle_from(theta: np.ndarray, reference: float) -> np.ndarray:
    """Unsigned angle between ``theta`` and ``reference`` (radians, 0..pi)."""
    return np.abs(np.angle(np.exp(1j * (theta - reference))))


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: unions of SDFs blend over ``k`` mm instead of creasing."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * (k * 0.25)


class _Shape:
    """An approximate signed distance function in mm (negative inside)."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Distance at points ``p`` of shape ``(3, ...)`` ordered (x, y, z)."""
        raise NotImplementedError


class _Ellipsoid(_Shape):
    """Ellipsoid with semi-axes ``radii`` in its own frame, placed by ``rotation`` about ``centre``."""

    def __init__(self, centre: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None = None):
        self.centre = np.asarray(centre, dtype=float)
        self.radii = np.asarray(radii, dtype=float)
        self.rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)

    def bounds(self):
        half = np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1))
        return self.centre - half, self.centre + half

    def sdf(self, p):
        q = _affine(self.rotation.T, p, self.centre)
        shape = (3,) + (1,) * (q.ndim - 1)
        q *= (1.0 / self.radii).astype(_F32).reshape(shape)
        k0 = np.sqrt(np.einsum("i...,i...->...", q, q))
        q *= (1.0 / self.radii).astype(_F32).reshape(shape)
        k1 = np.sqrt(np.einsum("i...,i...->...", q, q))
        # Quilez's k0 (k0 - 1) / k1 bound; the epsilons keep the exact centre strongly inside.
        eps = _F32(1e-6)
        return (k0 - 1.0) * (k0 + eps) / (k1 + eps / _F32(self.radii.min()))


class _Tube(_Shape):
    """Chain of capsules along ``points`` whose radius varies linearly between ``radii``."""

    def __init__(self, points: Sequence[Sequence[float]], radii: Sequence[float]):
        self.points = np.asarray(points, dtype=float)
        self.radii = np.asarray(radii, dtype=float)
        if len(self.points) < 2 or len(self.radii) != len(self.points):
            raise ValueError("A tube needs at least two points and one radius per point.")

    def bounds(self):
        r = self.radii[:, None]
        return (self.points - r).min(axis=0), (self.points + r).max(axis=0)

    def sdf(self, p):
        flat = p.reshape(3, -1)
        pp = np.einsum("ij,ij->j", flat, flat)
        best = None
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            ba = b - a
            length2 = float(ba @ ba)
            proj = np.asarray([ba, a], dtype=_F32) @ flat
            s = proj[0] - _F32(a @ ba)  # (p - a) . (b - a)
            t = np.clip(s / _F32(length2), 0.0, 1.0)
            # |p - a - t (b - a)|^2 expanded so that only two dot products touch the big array.
            d2 = pp - 2.0 * proj[1] + _F32(a @ a) - 2.0 * t * s + t * t * _F32(length2)
            d = np.sqrt(np.maximum(d2, 0.0)) - (_F32(ra) + _F32(rb - ra) * t)
            best = d if best is None else np.minimum(best, d)
        return best.reshape(p.shape[1:])


class _Union(_Shape):
    def __init__(self, parts: Sequence[_Shape], blend: float = 0.0):
        self.parts, self.blend = list(parts), blend

    def bounds(self):
        lows, highs = zip(*(s.bounds() for s in self.parts))
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def sdf(self, p):
        d = self.parts[0].sdf(p)
        for s in self.parts[1:]:
            d = _smooth_min(d, s.sdf(p), self.blend)
        return d


class _Difference(_Shape):
    """``base`` with ``cut`` carved out (smoothly over ``blend`` mm)."""

    def __init__(self, base: _Shape, cut: _Shape, blend: float = 0.0):
        self.base, self.cut, self.blend = base, cut, blend

    def bounds(self):
        return self.base.bounds()

    def sdf(self, p):
        return -_smooth_min(-self.base.sdf(p), self.cut.sdf(p), self.blend)


class _Lobulated(_Shape):
    """Adds a small periodic ripple to the surface (the lobulated contour of the pancreas)."""

    def __init__(self, base: _Shape, amplitude: float, wavelength: float, phase: Sequence[float]):
        self.base, self.amplitude = base, amplitude
        self.k, self.phase = 2 * math.pi / wavelength, np.asarray(phase, dtype=float)

    def bounds(self):
        lo, hi = self.base.bounds()
        return lo - self.amplitude, hi + self.amplitude

    def sdf(self, p):
        ripple = np.sin(self.k * p[0] + _F32(self.phase[0]))
        ripple *= np.sin(self.k * p[1] + _F32(self.phase[1]))
        ripple *= np.sin(self.k * p[2] + _F32(self.phase[2]))
        return self.base.sdf(p) + _F32(self.amplitude) * ripple


@dataclass(frozen=True)
class _Pose:
    """Places a shape written in local mm: ``world = centre + linear @ local``.

    ``linear`` holds rotation, scale and (for the left kidney) the left-right
    mirror; distances scale by ``scale`` = |det|^(1/3).
    """

    centre: np.ndarray
    linear: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def scale(self) -> float:
        return abs(float(np.linalg.det(self.linear))) ** (1.0 / 3.0)

    def to_world(self, local: np.ndarray) -> np.ndarray:
        return self.centre + np.atleast_2d(local) @ self.linear.T

    def to_local(self, q: np.ndarray) -> np.ndarray:
        return _affine(np.linalg.inv(self.linear), q, self.centre)

    def world_bounds(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        w = self.to_world(corners)
        return w.min(axis=0), w.max(axis=0)


class _SmoothDisplacement:
    """A smooth random displacement field (mm): a few separable cosine modes.

    Each component is bounded by ``max_mm`` (so a box grown by ``margin_mm`` per
    side holds everything that can warp into it) and the modes have wavelengths
    of 12-32 cm, so the warp bends organs without folding them. Separable modes
    make evaluation on a box one small matrix product per component.
    """

    def __init__(self, rng: np.random.Generator, max_mm: float, modes: int = 4):
        self.wavenumber = 2 * math.pi / rng.uniform(120.0, 320.0, size=(modes, 3))
        self.phase = rng.uniform(0.0, 2 * math.pi, size=(modes, 3))
        weight = rng.normal(size=(3, modes))
        self.weight = weight * (max_mm / np.abs(weight).sum(axis=1, keepdims=True))
        self.max_mm = max_mm
        self.margin_mm = max_mm + 1.0

    def warped_grid(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Points ``p + d(p)`` of the grid with axes ``x``, ``y``, ``z``, stacked as (3, nz, ny, nx) float32.

        Evaluating shapes there warps the anatomy by the field (backward mapping).
        """
        fx = np.cos(self.wavenumber[:, 0, None] * x[None, :] + self.phase[:, 0, None])
        fy = np.cos(self.wavenumber[:, 1, None] * y[None, :] + self.phase[:, 1, None])
        fz = np.cos(self.wavenumber[:, 2, None] * z[None, :] + self.phase[:, 2, None])
        yx = (fy[:, :, None] * fx[:, None, :]).reshape(len(fx), -1).astype(_F32)
        q = np.empty((3, len(z), len(y), len(x)), dtype=_F32)
        for c in range(3):
            np.matmul((fz.T * self.weight[c][None, :]).astype(_F32), yx, out=q[c].reshape(len(z), -1))
        q[0] += x[None, None, :]
        q[1] += y[None, :, None]
        q[2] += z[:, None, None]
        return q


# --------------------------------------------------------------------------- anatomy


@dataclass
class _Body:
    """Body wall, thorax base and scanner table, all as functions of in-plane angle and z.

    ``theta`` is ``atan2(y, x)`` in the body frame: +pi/2 is the posterior midline.
    """

    semi_x: float
    semi_anterior: float
    semi_posterior: float
    harmonics: np.ndarray  # rows (order, relative amplitude, phase)
    indent_mm: float  # the cavity wraps around the vertebral bodies at the posterior midline
    muscle_mm: float
    paraspinal_mm: float
    fat_mm: float
    skin_mm: float
    girth: tuple[float, float, float]  # relative amplitude, wavelength, phase of the girth along z
    diaphragm_right: tuple[float, float, float]
    diaphragm_left: tuple[float, float, float]
    diaphragm_depth: float
    diaphragm_radii: tuple[float, float]
    diaphragm_mm: float
    rib_top_z: float
    rib_pitch: float
    rib_drop: float
    rib_height: float
    rib_width: float
    rib_end_angle: np.ndarray  # per rib: how far round from the spine it reaches (radians)
    table_y: float

    def cavity_radius(self, theta: np.ndarray) -> np.ndarray:
        c, s = np.cos(theta), np.sin(theta)
        b = np.where(s > 0, self.semi_posterior, self.semi_anterior)
        r = 1.0 / np.sqrt(c * c / self.semi_x**2 + s * s / b**2)
        wobble = np.ones_like(theta)
        for order, amp, phase in self.harmonics:
            wobble += amp * np.cos(order * theta + phase)
        return r * wobble - self.indent_mm * np.exp(-(((theta - math.pi / 2) / 0.3) ** 2))

    def muscle_thickness(self, theta: np.ndarray, notches: bool = True) -> np.ndarray:
        """Rectus in front, thicker flanks, paraspinal mass behind.

        With ``notches`` the wall thins at the linea alba and the semilunar lines;
        subcutaneous fat fills those notches, so the skin is laid over the wall without them.
        """
        front, back = _angle_from(theta, -math.pi / 2), _angle_from(theta, math.pi / 2)
        t = self.muscle_mm * (1.0 + 0.5 * np.cos(theta) ** 2)
        if notches:
            t = t * (1.0 - 0.45 * np.exp(-(((front - 0.62) / 0.08) ** 2)))
            t = t * (1.0 - 0.75 * np.exp(-((front / 0.035) ** 2)))
        return t + self.paraspinal_mm * np.exp(-((back / 0.5) ** 2))

    def oblique_region(self, theta: np.ndarray) -> np.ndarray:
        """Where the flank wall is three muscle layers (external, internal oblique, transversus)."""
        return (_angle_from(theta, -math.pi / 2) > 0.72) & (_angle_from(theta, math.pi / 2) > 0.9)

    def fat_thickness(self, theta: np.ndarray) -> np.ndarray:
        # More subcutaneous fat over the belly and flanks than over the back.
        return self.fat_mm * (1.0 + 0.35 * np.maximum(-np.sin(theta), 0.0) + 0.15 * np.cos(2 * theta))

    def girth_factor(self, z: np.ndarray) -> np.ndarray:
        amp, wavelength, phase = self.girth
        return 1.0 + amp * np.cos(2 * math.pi * z / wavelength + phase)

    def outer_radius(self, theta: np.ndarray, girth: float | np.ndarray = 1.0) -> np.ndarray:
        return (
            self.cavity_radius(theta) * girth
            + self.muscle_thickness(theta, notches=False)
            + self.fat_thickness(theta)
            + self.skin_mm
        )

    def diaphragm_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm's upper surface: two domes, the right one higher."""
        rx, ry = self.diaphragm_radii
        # Deep posterior recesses, shallow in front where the heart rests on the central tendon.
        ry = np.where(y > 0, ry, 1.6 * ry)
        domes = [
            z0 - self.diaphragm_depth * (((x - x0) / rx) ** 2 + ((y - y0) / ry) ** 2)
            for x0, y0, z0 in (self.diaphragm_right, self.diaphragm_left)
        ]
        return np.maximum(*domes)


@dataclass
class _Spine:
    """Vertebral column along z: bodies and discs repeat with ``pitch``; lumbar lordosis."""

    y0: float
    lordosis_mm: float
    zscale: float
    semi_x: float
    semi_y: float
    pitch: float
    disc_mm: float
    phase: float
    canal_mm: float
    cortex_mm: float

    def centre_y(self, z):
        return self.y0 - self.lordosis_mm * np.clip((-z / self.zscale - 150.0) / 150.0, 0.0, 1.0)

    def radii(self, z):
        grow = np.clip(-z / (300.0 * self.zscale), 0.0, 1.0)  # lumbar bodies are larger
        return self.semi_x + 6.0 * grow, self.semi_y + 4.0 * grow


@dataclass
class _Structure:
    """One painted structure: a posed shape, its label and how it is filled.

    ``clip`` limits it to a body compartment ("abdomen", "thorax", "cavity" or
    None). ``halo_mm`` turns other organs' voxels within that distance into fat,
    so that touching organs keep the thin fat plane real CT shows between them.
    A wall of ``wall_mm`` gets ``wall_hu``; inside it, voxels anterior of the
    world ``gas_level_y`` hold gas (the patient lies supine, gas rises forward).
    ``inserts`` are (shape, HU) details in the same local frame painted only
    inside this structure, keeping its label (vessels inside the liver).
    """

    name: str
    shape: _Shape
    pose: _Pose
    label: int = 0
    hu: float = 0.0
    clip: str | None = "abdomen"
    halo_mm: float = 0.0
    background_only: bool = False
    wall_mm: float = 0.0
    wall_hu: float = 0.0
    gas_level_y: float | None = None
    inserts: tuple = ()


@dataclass
class _Acquisition:
    fov_mm: float
    centre_offset: tuple[float, float]
    top_mm: float  # top of the scan above the liver dome (body frame z)
    length_mm: float
    slice_preference: float  # 0..1: where in the feasible slice-count range this scan lies
    dome_z_scanner: float
    noise_sd: float
    psf_sigma_xy: float = 0.6  # voxels; the reconstruction kernel also gives the noise its grain
    psf_sigma_z: float = 0.5


@dataclass
class _Scene:
    acquisition: _Acquisition
    body: _Body
    spine: _Spine
    displacement: _SmoothDisplacement
    structures: list[_Structure]
    hu: dict[str, float]
    info: dict


# One bean for both kidneys, written for the right one (hilum towards +x, the midline); the
# left kidney is its mirror image, so the two differ only in where they lie.
_KIDNEY_HILUM = np.array([27.0, -7.0, 0.0])
_KIDNEY = _Difference(_Ellipsoid((0, 0, 0), (29, 24, 56)), _Ellipsoid(_KIDNEY_HILUM, (14, 11, 26)), blend=4.0)


class _Patient:
    """One patient's habitus: scales the nominal anatomy and draws organ poses.

    Nominal positions are written for a cavity of 130 x 90 mm semi-axes; ``at``
    stretches them to this patient's cavity and height.
    """

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        u = rng.uniform
        self.semi_x, self.semi_anterior, self.semi_posterior = u(118, 142), u(82, 102), u(86, 100)
        self.sx = self.semi_x / 130.0
        self.sy = (self.semi_anterior + self.semi_posterior) / 180.0
        self.sz = u(0.92, 1.08)
        self.scales: dict[str, float] = {}

    def at(self, x: float, y: float, z: float) -> np.ndarray:
        return np.array([x * self.sx, y * self.sy, z * self.sz])

    def path(self, *points: tuple[float, float, float]) -> np.ndarray:
        """Nominal points scaled by :meth:`at`, stacked as (N, 3)."""
        return np.array([self.at(*q) for q in points])

    def pose(self, name: str, pivot: np.ndarray, base: np.ndarray | None = None, mirror: bool = False) -> _Pose:
        """Random pose about ``pivot``: scale 0.85-1.15 (+-5% per axis), rotation and shift up to 10 deg / 10 mm."""
        u, normal = self.rng.uniform, self.rng.normal
        s = u(0.85, 1.15)
        stretch = u(0.95, 1.05, 3)
        angles = np.radians(np.clip(normal(0, 5, 3), -10, 10))
        shift = np.clip(normal(0, 5, 3), -10, 10)
        linear = _rotation(*angles) @ (np.eye(3) if base is None else base) @ np.diag(s * stretch)
        if mirror:
            linear, shift = _MIRROR_X @ linear, _MIRROR_X @ shift
        self.scales[name] = round(float(s), 4)
        return _Pose(pivot + shift, linear)


def _fixed(points: np.ndarray) -> tuple[_Pose, np.ndarray]:
    """Identity pose about the points' mean, and the points relative to it (small numbers keep float32 exact)."""
    pivot = points.mean(axis=0)
    return _Pose(pivot), points - pivot


def _draw_spine(p: _Patient) -> _Spine:
    u = p.rng.uniform
    return _Spine(
        y0=40.0 * p.sy,
        lordosis_mm=u(6, 14),
        zscale=p.sz,
        semi_x=u(18, 21),
        semi_y=u(14, 16.5),
        pitch=u(29, 34) * p.sz,
        disc_mm=u(6, 9),
        phase=u(0, 30),
        canal_mm=u(7.5, 9.5),
        cortex_mm=u(1.5, 2.5),
    )


def _draw_body(p: _Patient, spine: _Spine) -> _Body:
    u = p.rng.uniform
    diaphragm_mm = u(3.5, 5.0)
    body = _Body(
        semi_x=p.semi_x,
        semi_anterior=p.semi_anterior,
        semi_posterior=p.semi_posterior,
        harmonics=np.column_stack(
            [np.arange(2, 6), np.clip(p.rng.normal(0, 0.015, 4), -0.03, 0.03), u(0, 2 * math.pi, 4)]
        ),
        indent_mm=max(p.semi_posterior - (spine.y0 + spine.semi_y + 4.0), 0.0),
        muscle_mm=u(8, 14),
        paraspinal_mm=u(45, 60),
        fat_mm=u(6, 40),
        skin_mm=u(1.5, 2.5),
        girth=(u(0.0, 0.04), u(250, 450), u(0, 2 * math.pi)),
        # The right dome carries the liver dome (z = 0 is the top of the abdomen below it).
        diaphragm_right=(-55.0 * p.sx, 0.0, diaphragm_mm),
        diaphragm_left=(55.0 * p.sx, 5.0 * p.sy, -u(5, 18)),
        diaphragm_depth=u(80, 100),
        diaphragm_radii=(u(100, 120) * p.sx, u(110, 130) * p.sy),
        diaphragm_mm=diaphragm_mm,
        rib_top_z=u(60, 80) * p.sz,  # posterior end of the 5th rib; ribs 1-4 lie above it
        rib_pitch=u(22, 27) * p.sz,
        rib_drop=u(80, 110),
        rib_height=u(9, 12),
        rib_width=u(7, 10),
        rib_end_angle=np.array([2.9] * 4 + [2.9, 2.85, 2.75, 2.6, 2.35, 2.0, 1.6, 1.2]) + u(-0.1, 0.1, 12),
        table_y=0.0,
    )
    widest = body.outer_radius(_THETA, 1.0 + body.girth[0])
    # The patient lies on the table: the back touches it, flattened into it by a few mm at most.
    body.table_y = float(np.max(widest * np.sin(_THETA))) + u(-3.0, 2.0)
    return body


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    """Tissue intensities of one portal venous phase scan (HU)."""
    u = rng.uniform
    liver, aorta, ivc, cortex = u(100, 130), u(150, 250), u(110, 160), u(150, 195)
    return {
        "fat": u(-110, -90),
        "subcutaneous_fat": u(-115, -95),
        "muscle": u(45, 60),
        "skin": u(10, 50),
        "lung": u(-880, -820),
        "cortical_bone": u(700, 1000),
        "cancellous_bone": u(180, 300),
        "disc": u(70, 100),
        "csf": u(5, 20),
        "cartilage": u(90, 150),
        "liver": liver,
        "spleen": liver + u(-12, 12),  # similar on purpose: only shape and position separate them
        "kidney_cortex": cortex,  # one value for both kidneys: only their side tells them apart
        "kidney_medulla": cortex - u(15, 40),
        "gallbladder": u(0, 20),
        "stomach_wall": u(60, 90),
        "stomach_content": u(0, 25),
        "pancreas": u(80, 110),
        "aorta": aorta,
        "portal_vein": float(np.clip(aorta * u(0.75, 0.95), 130, 220)),
        "ivc": ivc,
        "hepatic_vein": ivc + u(0, 20),
        "heart": u(110, 160),
        "bowel_wall": u(40, 70),
        "bowel_content": u(0, 30),
        "table_shell": u(100, 200),
        "table_core": u(-950, -850),
    }


def _draw_acquisition(p: _Patient, body: _Body) -> _Acquisition:
    u = p.rng.uniform
    widest = body.outer_radius(_THETA, 1.0 + body.girth[0])
    width = 2.0 * float(np.max(np.abs(widest * np.cos(_THETA))))
    # The operator fits the field of view to the patient, within BCV's 0.6-0.9 mm pixels at 512.
    fov = float(np.clip(width * u(1.05, 1.25), PIXEL_SPACING_MM[0] * 512, PIXEL_SPACING_MM[1] * 512))
    wants_offset = p.rng.random() < 0.4
    magnitude = (u(0.07, 0.15) if wants_offset else u(0.0, 0.03)) * fov
    angle = u(0, 2 * math.pi)
    # Off-centre, but the abdominal cavity (every organ) stays inside the field of view.
    cx = float(np.clip(magnitude * math.cos(angle), -(fov / 2 - p.semi_x - 5), fov / 2 - p.semi_x - 5))
    cy = float(np.clip(magnitude * math.sin(angle), -(fov / 2 - p.semi_anterior - 5), fov / 2 - p.semi_posterior - 5))
    top = u(-12, 90)
    bottom = -u(265, 380) * p.sz  # always below the kidneys, sometimes down to the iliac vessels
    return _Acquisition(
        fov_mm=fov,
        centre_offset=(cx, cy),
        top_mm=top,
        length_mm=top - bottom,
        slice_preference=u(0.0, 1.0),
        dome_z_scanner=u(-300, -100),
        noise_sd=u(10, 20),
    )


def _organs(p: _Patient, hu: dict[str, float]) -> tuple[list[_Structure], list[_Pose], float]:
    """The labelled organs but the aorta, in painting order.

    Also returns the kidney poses (the renal veins start at their hila) and how
    much lower the right kidney sits.
    """
    u, at = p.rng.uniform, p.at
    out = []

    # Liver: right lobe, medial segment/caudate and left lobe blended; intrahepatic veins inside.
    pivot = at(-40, 0, -70)
    liver_shape = _Union(
        [
            _Ellipsoid(at(-66, 10, -72) - pivot, (64, 80, 80)),
            _Ellipsoid(at(-18, -12, -58) - pivot, (40, 55, 46)),
            _Ellipsoid(at(25, -55, -45) - pivot, (60, 26, 36), _rotation(az=-0.25)),
        ],
        blend=18.0,
    )
    hepatic, porta = at(-22, 25, -25) - pivot, at(-35, -5, -95) - pivot
    hepatic_veins = (((-95, -5, -45), 5.0), ((-45, -50, -30), 4.5), ((10, -45, -25), 4.0))
    portal_branches = (((-88, 15, -80), 6.0), ((-60, -40, -70), 4.5), ((0, -35, -62), 5.0))
    inserts = tuple(
        [(_Tube([hepatic, at(*end) - pivot], (r, r * 0.45)), hu["hepatic_vein"]) for end, r in hepatic_veins]
        + [(_Tube([porta, at(*end) - pivot], (r, r * 0.4)), hu["portal_vein"]) for end, r in portal_branches]
    )
    out.append(_Structure("liver", liver_shape, p.pose("liver", pivot), LIVER, hu["liver"], inserts=inserts))

    # Stomach: J-shaped tube from the fundus under the left dome to the pylorus; gas over fluid.
    distension = u(0.8, 1.15)
    pts = p.path((58, 18, -22), (68, -5, -55), (52, -38, -88), (25, -58, -110), (-2, -62, -118), (-25, -50, -112))
    radii = np.array([34, 36, 32, 25, 19, 14]) * distension
    pivot = pts.mean(axis=0)
    stomach_pose = p.pose("stomach", pivot)
    world = stomach_pose.to_world(pts - pivot)
    r_world = radii * stomach_pose.scale
    y_front, y_back = float(np.min(world[:, 1] - r_world)), float(np.max(world[:, 1] + r_world))
    out.append(
        _Structure(
            "stomach", _Tube(pts - pivot, radii), stomach_pose, STOMACH, hu["stomach_content"], halo_mm=2.0,
            wall_mm=u(4, 6), wall_hu=hu["stomach_wall"], gas_level_y=y_front + u(0.0, 0.45) * (y_back - y_front),
        )
    )

    # Spleen: a crescent along the posterolateral wall (ellipsoid with a concave hilum).
    inward = -np.array([1.0, 0.45, 0.0]) / math.hypot(1.0, 0.45)
    spleen_shape = _Difference(
        _Ellipsoid((0, 0, 0), (30, 62, 58), _rotation(ax=0.2, az=0.45)),
        _Ellipsoid(inward * 48.0, (32, 32, 40)),
        blend=8.0,
    )
    out.append(_Structure("spleen", spleen_shape, p.pose("spleen", at(90, 42, -55)), SPLEEN, hu["spleen"], halo_mm=2.0))

    # Pancreas: uncinate and head in the duodenal sweep, body across the aorta, tail to the splenic hilum.
    pts = p.path((-22, -5, -148), (-32, -14, -134), (-5, -30, -122), (28, -28, -112), (58, -5, -102), (80, 18, -92))
    pivot = pts.mean(axis=0)
    pancreas_shape = _Lobulated(
        _Tube(pts - pivot, (12, 17, 12, 11, 10, 9)), amplitude=1.2, wavelength=9.0, phase=u(0, 2 * math.pi, 3)
    )
    out.append(_Structure("pancreas", pancreas_shape, p.pose("pancreas", pivot), PANCREAS, hu["pancreas"], halo_mm=1.5))

    # Gallbladder: pear on the undersurface of the liver, fundus pointing anterior-inferior.
    gb_shape = _Ellipsoid((0, 0, 0), (15, 16, 34), _rotation(ax=-0.7, az=0.3))
    gb_pose = p.pose("gallbladder", at(-40, -45, -108))
    out.append(_Structure("gallbladder", gb_shape, gb_pose, GALLBLADDER, hu["gallbladder"], halo_mm=1.5))

    # Kidneys: the shared bean, the left one mirrored.
    tilt = _rotation(ax=-0.2, ay=0.2, az=-0.5)  # upper pole medial and posterior; hilum anteromedial
    drop = u(5, 25)  # the right kidney sits lower, under the liver
    cortex_mm = u(6, 8)
    kidney_poses = []
    for name, label, mirror in (("right kidney", RIGHT_KIDNEY, False), ("left kidney", LEFT_KIDNEY, True)):
        # In the paravertebral gutters, a fixed depth in front of the posterior wall.
        pivot = at(-60, 0, -150) + np.array([0.0, p.semi_posterior - 40.0, -drop / 2])
        if mirror:
            pivot = _MIRROR_X @ pivot + np.array([0.0, 0.0, drop])
        kidney_pose = p.pose(name, pivot, base=tilt, mirror=mirror)
        kidney_poses.append(kidney_pose)
        out.append(
            _Structure(
                name, _KIDNEY, kidney_pose, label, hu["kidney_medulla"],
                halo_mm=2.0, wall_mm=cortex_mm, wall_hu=hu["kidney_cortex"],
            )
        )
    return out, kidney_poses, drop


def _vessels(p: _Patient, spine: _Spine, kidneys: list[_Pose], hu: dict[str, float]) -> tuple[list[_Structure], float]:
    """Aorta (labelled), IVC, portal system, renal and iliac vessels; returns them and the aortic bifurcation z."""
    u, sx, sz = p.rng.uniform, p.sx, p.sz
    r_ao, r_ivc = u(9, 12.5), u(10, 13)
    z_bif = -u(215, 250) * sz

    def prevertebral(z: float, r: float, gap: float) -> float:
        """y of a vessel of radius ``r`` lying ``gap`` mm in front of the vertebral body at height z."""
        return float(spine.centre_y(z) - spine.radii(z)[1] - gap - r)

    # Thoracic aorta beside the vertebral bodies, abdominal aorta in front of them.
    ao_z = [140.0, 40.0, -20.0, -70.0, -130.0, -190.0, z_bif]
    ao_pts = np.array(
        [[spine.semi_x + r_ao + 2, spine.y0 - 5, z] for z in ao_z[:2]]
        + [[x * sx, prevertebral(z, r_ao, 3.0), z] for x, z in zip((20, 14, 12, 10, 8), ao_z[2:])]
    )
    ao_r = [r_ao + 1.5, r_ao + 1.0, r_ao, r_ao, r_ao, r_ao - 0.5, r_ao - 1.0]
    ivc_pts = np.array(
        [
            [-26 * sx, prevertebral(z, r_ivc, -4.0) - (18 if z > 0 else 0), z]  # intrahepatic part runs forwards
            for z in (60.0, 0.0, -60.0, -130.0, -200.0, z_bif - 20)
        ]
    )
    bif, confluence = ao_pts[-1], ivc_pts[-1]
    # Veins (label 0) cut through the organs they cross, as the real ones do.
    veins = [
        (ivc_pts, [r_ivc + 2] + [r_ivc] * 5),
        (np.array([confluence, confluence + [-25 * sx, 8, -110 * sz]]), [r_ivc - 2, 8]),
        (np.array([confluence, confluence + [60 * sx, 12, -110 * sz]]), [r_ivc - 2, 8]),
    ]
    portal = [
        (p.path((-5, -12, -128), (-35, -5, -98)), [7.5, 7.0]),  # portal vein to the porta hepatis
        (p.path((-5, -12, -128), (28, -14, -114), (58, 6, -104), (78, 24, -88)), [5.5, 5, 5, 4.5]),  # splenic
        (p.path((-8, -16, -128), (-12, -30, -210)), [6, 5]),  # superior mesenteric vein
    ]
    for kidney_pose, side in zip(kidneys, (-1, 1)):
        h = kidney_pose.to_world(_KIDNEY_HILUM)[0]
        ivc_y = prevertebral(h[2], r_ivc, -4.0)
        if side < 0:
            pts = np.array([h, [-26 * sx, ivc_y, h[2]]])
        else:  # the left renal vein crosses in front of the aorta
            in_front_of_aorta = [12 * sx, prevertebral(h[2], r_ao, 3.0) - r_ao - 6, h[2] + 5]
            pts = np.array([h, in_front_of_aorta, [-26 * sx, ivc_y, h[2] + 8]])
        veins.append((pts, [5.0] * len(pts)))
    arteries = [
        (p.path((10, -2, -118), (8, -22, -140), (4, -30, -205)), [4.5, 4.0, 3.5]),  # superior mesenteric
        (np.array([bif, bif + [-40 * sx, 12, -110 * sz]]), [r_ao * 0.65, 6.0]),  # common iliacs
        (np.array([bif, bif + [40 * sx, 12, -110 * sz]]), [r_ao * 0.65, 6.0]),
    ]
    out = []
    for group, value in ((veins, hu["ivc"]), (portal, hu["portal_vein"])):
        for pts, r in group:
            pose, local = _fixed(pts)
            out.append(_Structure("vein", _Tube(local, r), pose, hu=value, clip="cavity"))
    pose, local = _fixed(ao_pts)
    out.append(_Structure("aorta", _Tube(local, ao_r), pose, AORTA, hu["aorta"], clip="cavity"))
    for pts, r in arteries:
        pose, local = _fixed(pts)
        out.append(_Structure("artery", _Tube(local, r), pose, hu=hu["aorta"], clip="cavity"))
    return out, z_bif


def _psoas(p: _Patient, spine: _Spine, hu: dict[str, float]) -> list[_Structure]:
    """Psoas muscles: appear at the upper lumbar spine and thicken caudally; never over an organ."""
    out = []
    for side in (-1.0, 1.0):
        pts = []
        for z, lateral in ((-125, 10), (-200, 18), (-290, 26), (-420, 32)):
            z = z * p.sz
            pts.append([side * (spine.radii(z)[0] + lateral), spine.centre_y(z) + 2, z])
        pose, local = _fixed(np.array(pts))
        psoas = _Tube(local, (3, 14, 21, 22))
        out.append(_Structure("psoas", psoas, pose, hu=hu["muscle"], clip="cavity", background_only=True))
    return out


def _bowel(p: _Patient, hu: dict[str, float]) -> list[_Structure]:
    """Mesenteric vessels, duodenum, colon and small-bowel loops (label 0): what a model must reject.

    Vessels first and loops over them: the vessels run between the loops.
    """
    u, at, rng = p.rng.uniform, p.at, p.rng
    out = []
    for _ in range(int(rng.integers(10, 15))):
        start = at(u(-15, 5), u(-35, -15), u(-210, -140))
        mid = start + np.array([u(-35, 35), u(-35, 5), u(-50, -10)])
        end = mid + np.array([u(-45, 45), u(-40, 10), u(-60, 0)])
        pose, local = _fixed(np.array([start, mid, end]))
        out.append(_Structure("mesenteric vessel", _Tube(local, (u(2, 3), 1.8, 1.2)), pose, hu=hu["portal_vein"]))

    def loop(name: str, points: np.ndarray, radius: float, wall: float, content: float, gas_fraction: float):
        pose, local = _fixed(points)
        y_front, y_back = float(np.min(points[:, 1]) - radius), float(np.max(points[:, 1]) + radius)
        level = y_front + gas_fraction * (y_back - y_front) if gas_fraction > 0 else None
        tube = _Tube(local, np.full(len(points), radius))
        out.append(
            _Structure(name, tube, pose, hu=content, wall_mm=wall, wall_hu=hu["bowel_wall"], gas_level_y=level)
        )

    duodenum = p.path(
        (-38, -42, -112), (-55, -25, -122), (-58, -10, -150), (-35, -12, -172),
        (0, -18, -176), (25, -12, -166), (40, -25, -150),
    )
    loop("duodenum", duodenum, u(10, 13), 2.5, hu["bowel_content"], u(0.0, 0.3))
    colon = [
        p.path((-95, 15, -330), (-98, 5, -240), (-95, -15, -165), (-80, -45, -140)),  # ascending
        p.path((-80, -45, -140), (-40, -75, -160), (10, -78, -168), (50, -70, -150), (88, -35, -115)),  # transverse
        p.path((88, -35, -115), (100, 15, -150), (100, 20, -235), (85, 15, -330)),  # descending
    ]
    for pts in colon:
        gas = u(0.4, 1.0) if rng.random() < 0.65 else 0.0
        loop("colon", pts, u(15, 22), 2.0, u(-60, 20), gas)
    for _ in range(int(rng.integers(30, 45))):
        centre = at(u(-85, 85), u(-90, 10), u(-340, -140))
        d1, d2 = rng.normal(size=3) * [1, 1, 0.5], rng.normal(size=3) * [1, 1, 0.5]
        length = u(30, 70)
        half = length / 2
        pts = np.array([centre - d1 / np.linalg.norm(d1) * half, centre, centre + d2 / np.linalg.norm(d2) * half])
        gas = u(0.1, 0.5) if rng.random() < 0.3 else 0.0
        loop("small bowel", pts, u(10, 16), 2.5, hu["bowel_content"] + u(-8, 8), gas)
    return out


def _build_scene(rng: np.random.Generator) -> _Scene:
    """Draws one patient and acquisition. Consumes ``rng`` in a fixed order (determinism)."""
    p = _Patient(rng)
    spine = _draw_spine(p)
    body = _draw_body(p, spine)
    hu = _draw_hu(rng)
    acquisition = _draw_acquisition(p, body)
    displacement = _SmoothDisplacement(rng, max_mm=rng.uniform(3, 7))

    # Heart: only in view when the scan starts well above the liver dome.
    heart_shape = _Ellipsoid((0, 0, 0), (62, 50, 55), _rotation(az=0.5))
    heart = _Structure("heart", heart_shape, _Pose(p.at(25, -40, 58)), hu=hu["heart"], clip="thorax")
    bowel = _bowel(p, hu)
    organs, kidneys, drop = _organs(p, hu)
    vessels, z_bif = _vessels(p, spine, kidneys, hu)
    # Painting order: later structures win where they overlap.
    structures = [heart] + bowel + organs + vessels + _psoas(p, spine, hu)

    info = {
        "body_semi_axes_mm": [round(p.semi_x, 1), round(p.semi_anterior, 1), round(p.semi_posterior, 1)],
        "subcutaneous_fat_mm": round(body.fat_mm, 1),
        "organ_scale": p.scales,
        "kidney_drop_mm": round(float(drop), 1),
        "aortic_bifurcation_z_mm": round(float(z_bif), 1),
        "deformation_max_mm": round(displacement.max_mm, 2),
        "noise_sd_hu": round(acquisition.noise_sd, 2),
        "hu": {k: round(float(v), 1) for k, v in hu.items()},
    }
    return _Scene(acquisition, body, spine, displacement, structures, hu, info)


# --------------------------------------------------------------------------- rendering


@dataclass
class _Grid:
    """Voxel-centre coordinates in the body frame (mm), one increasing vector per axis."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.z), len(self.y), len(self.x)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box (z, y, x) of the voxels whose centres lie in ``[lo, hi]`` (x, y, z order), or None."""
        out = []
        for coords, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1]):
            i0, i1 = int(np.searchsorted(coords, a, "left")), int(np.searchsorted(coords, b, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def axes(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The x, y, z coordinate vectors of ``box``."""
        return self.x[box[2]], self.y[box[1]], self.z[box[0]]


class _Canvas:
    """The HU and label arrays being painted, plus the body compartments organs are clipped to."""

    def __init__(self, grid: _Grid, body: _Body):
        self.grid = grid
        self.hu = np.full(grid.shape, AIR_HU, dtype=_F32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.cavity = np.zeros(grid.shape, dtype=bool)
        self.diaphragm_z = body.diaphragm_z(grid.x[None, :], grid.y[:, None]).astype(_F32)
        self.diaphragm_mm = body.diaphragm_mm

    def compartment(self, kind: str | None, box) -> np.ndarray | None:
        if kind is None:
            return None
        cavity = self.cavity[box]
        if kind == "cavity":
            return cavity
        z = self.grid.z[box[0]][:, None, None]
        dome = self.diaphragm_z[box[1], box[2]][None]
        if kind == "abdomen":
            return cavity & (z < dome - self.diaphragm_mm)
        if kind == "thorax":
            return cavity & (z > dome)
        raise ValueError(f"Unknown body compartment {kind!r}.")


def _paint_body(canvas: _Canvas, body: _Body, hu: dict[str, float], table_x: float, chunk: int = 16) -> None:
    """Table (centred at body-frame ``table_x``), skin, fat, muscle wall with ribs, diaphragm and lung bases."""
    g = canvas.grid
    x, y = g.x[None, :], g.y[:, None]
    rho = np.hypot(x, y).astype(_F32)
    theta = np.arctan2(y, x)
    r_cavity = body.cavity_radius(theta).astype(_F32)
    t_muscle = body.muscle_thickness(theta).astype(_F32)
    # Subcutaneous fat ends where it would end over a wall without notches.
    fat_end = (body.muscle_thickness(theta, notches=False) + body.fat_thickness(theta)).astype(_F32)
    obliques = body.oblique_region(theta)
    # Ribs: angle from the posterior midline, 0 at the spine and pi at the sternum.
    from_spine = np.arctan2(np.abs(x), y).astype(_F32)
    rib_descent = (body.rib_drop * (from_spine / math.pi) ** 1.3).astype(_F32)
    rib_depth = 0.25 * body.muscle_mm
    lowest_rib = body.rib_top_z - (len(body.rib_end_angle) - 4) * body.rib_pitch - body.rib_drop

    # Scanner table: a curved carbon shell with a foam core under the patient's back, centred
    # on the scanner (the patient may lie off its middle).
    tx = np.abs(x - table_x)
    ty = body.table_y - 0.0006 * tx * tx
    depth = y - ty
    table = (depth >= 0) & (depth < 14) & (tx < 230)
    core = table & (depth >= 2) & (depth < 12)
    canvas.hu[:, table] = hu["table_shell"]
    canvas.hu[:, core] = hu["table_core"]

    for z0 in range(0, g.shape[0], chunk):
        z1 = min(z0 + chunk, g.shape[0])
        zc = g.z[z0:z1][:, None, None]
        hu_c = canvas.hu[z0:z1]
        # Radial distance outside the cavity boundary; the wall layers stack outwards from it.
        out = rho[None] - r_cavity[None] * body.girth_factor(zc).astype(_F32)
        hu_c[out < fat_end + body.skin_mm] = hu["skin"]
        hu_c[out < fat_end] = hu["subcutaneous_fat"]
        hu_c[out < t_muscle] = hu["muscle"]
        # Thin fat planes between the three flank muscles.
        planes = (np.abs(out - 0.36 * t_muscle) < 0.7) | (np.abs(out - 0.68 * t_muscle) < 0.7)
        hu_c[planes & obliques] = hu["subcutaneous_fat"]
        cavity = out < 0
        canvas.cavity[z0:z1] = cavity
        hu_c[cavity] = hu["fat"]
        dome = canvas.diaphragm_z[None]
        hu_c[cavity & (zc > dome - body.diaphragm_mm)] = hu["muscle"]  # the diaphragm itself
        hu_c[cavity & (zc > dome)] = hu["lung"]

        if zc.max() < lowest_rib:
            continue
        band = (out >= rib_depth) & (out < rib_depth + body.rib_width)
        idx = np.nonzero(band)
        if idx[0].size == 0:
            continue
        yx = idx[1], idx[2]
        index_f = (body.rib_top_z - rib_descent[yx] - zc[idx[0], 0, 0]) / body.rib_pitch + 4.0
        n = np.rint(index_f)
        dz = (index_f - n) * body.rib_pitch
        dr = out[idx] - (rib_depth + body.rib_width / 2)
        e = (dz / (body.rib_height / 2)) ** 2 + (dr / (body.rib_width / 2)) ** 2
        valid = (n >= 0) & (n < len(body.rib_end_angle))
        end = body.rib_end_angle[np.clip(n, 0, len(body.rib_end_angle) - 1).astype(int)]
        angle = from_spine[yx]
        rib = valid & (e < 1.0) & (angle > 0.35) & (angle < end)
        values = np.where(e < 0.35, hu["cancellous_bone"], hu["cortical_bone"])
        values = np.where(angle > 2.45, hu["cartilage"], values)  # costal cartilage towards the sternum
        hu_c[idx[0][rib], idx[1][rib], idx[2][rib]] = values[rib]


def _paint_structure(canvas: _Canvas, s: _Structure, field_: _SmoothDisplacement, fat_hu: float) -> None:
    """Evaluates ``s`` on the warped grid inside its bounding box and paints its HU and label."""
    lo, hi = s.pose.world_bounds(*s.shape.bounds())
    margin = field_.margin_mm
    box = canvas.grid.box(lo - margin, hi + margin)
    if box is None:
        return
    g = canvas.grid
    q = field_.warped_grid(*g.axes(box))
    local = s.pose.to_local(q)
    del q
    sd = s.shape.sdf(local)
    sd *= _F32(s.pose.scale)
    inside = sd < 0
    compartment = canvas.compartment(s.clip, box)
    if compartment is not None:
        inside &= compartment
    lab, hu = canvas.label[box], canvas.hu[box]
    if s.background_only:
        inside &= lab == 0
    if s.halo_mm > 0:
        rim = (sd >= 0) & (sd < s.halo_mm) & (lab != 0) & (lab != s.label)
        lab[rim] = 0
        hu[rim] = fat_hu
    hu[inside] = s.hu
    if s.wall_mm > 0:
        lumen = sd <= -s.wall_mm
        hu[inside & ~lumen] = s.wall_hu
        if s.gas_level_y is not None:
            gas = inside & lumen & (g.y[box[1]][None, :, None] < s.gas_level_y)
            hu[gas] = AIR_HU
    lab[inside] = s.label
    for shape, value in s.inserts:
        sub = _sub_box(canvas.grid, box, *s.pose.world_bounds(*shape.bounds()), margin)
        if sub is None:
            continue
        detail = shape.sdf(local[(slice(None),) + sub]) < 0
        detail &= inside[sub]
        hu[sub][detail] = value


def _sub_box(grid: _Grid, box, lo: np.ndarray, hi: np.ndarray, margin: float):
    """The part of ``box`` covering world bounds ``[lo, hi]`` (+ margin), relative to ``box``; None if empty."""
    inner = grid.box(lo - margin, hi + margin)
    if inner is None:
        return None
    out = []
    for outer_s, inner_s in zip(box, inner):
        a, b = max(outer_s.start, inner_s.start), min(outer_s.stop, inner_s.stop)
        if b <= a:
            return None
        out.append(slice(a - outer_s.start, b - outer_s.start))
    return tuple(out)


def _paint_spine(canvas: _Canvas, spine: _Spine, field_: _SmoothDisplacement, hu: dict[str, float]) -> None:
    """Vertebral bodies (cortical shell, cancellous core), discs, canal, arches and processes."""
    g = canvas.grid
    margin = field_.margin_mm
    lo = np.array([-80.0, spine.y0 - spine.semi_y - spine.lordosis_mm - 8.0, g.z[0]]) - [margin, margin, 0]
    hi = np.array([80.0, spine.y0 + spine.semi_y + 2 * spine.canal_mm + 50.0, g.z[-1]]) + [margin, margin, 0]
    box = g.box(lo, hi)
    if box is None:
        return
    qx, qy, qz = field_.warped_grid(*g.axes(box))
    yc = spine.centre_y(qz)
    rx, ry = spine.radii(qz)
    phase = np.mod(qz - spine.phase, spine.pitch)
    in_body = phase >= spine.disc_mm
    e = np.sqrt((qx / rx) ** 2 + ((qy - yc) / ry) ** 2)
    column = e < 1.0
    shell = e > 1.0 - spine.cortex_mm / ry
    endplates = (phase < spine.disc_mm + spine.cortex_mm) | (phase > spine.pitch - spine.cortex_mm)
    cortical = column & in_body & (shell | endplates)
    yk = yc + ry + spine.canal_mm + 2.0
    rc = np.hypot(qx, qy - yk)
    height = spine.pitch - spine.disc_mm
    arch_band = (phase >= spine.disc_mm + 2.0) & (phase < spine.disc_mm + 0.6 * height)
    arch = arch_band & (rc >= spine.canal_mm) & (rc < spine.canal_mm + 6.0) & (qy > yk - spine.canal_mm)
    # The spinous process slopes caudally as it runs backwards.
    sp_phase = np.mod(qz - spine.phase + 0.45 * (qy - yk), spine.pitch)
    spinous = (
        (sp_phase >= spine.disc_mm + 2.0) & (sp_phase < spine.disc_mm + 0.6 * height)
        & (np.abs(qx) < 3.5) & (qy > yk + spine.canal_mm) & (qy < yk + spine.canal_mm + 38.0)
    )
    tp_len = 22.0 + 12.0 * np.clip(-qz / (250.0 * spine.zscale), 0.0, 1.0)  # lumbar transverse processes are long
    ax = np.abs(qx)
    transverse = (
        (phase >= spine.disc_mm + 5.0) & (phase < spine.disc_mm + 12.0)
        & (ax >= spine.canal_mm + 2.0) & (ax < spine.canal_mm + 2.0 + tp_len) & (np.abs(qy - (yk - 3.0)) < 3.5)
    )
    canal = rc < spine.canal_mm
    lab, hu_b = canvas.label[box], canvas.hu[box]
    posterior = arch | spinous | transverse
    hu_b[posterior] = 0.7 * hu["cortical_bone"]
    hu_b[canal] = hu["csf"]
    hu_b[column & ~in_body] = hu["disc"]
    hu_b[column & in_body] = hu["cancellous_bone"]
    hu_b[cortical] = hu["cortical_bone"]
    lab[posterior | canal | column] = 0


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=float)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).astype(_F32)


def _acquire(hu: np.ndarray, acq: _Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Scanner point spread (partial volume at every edge) and spatially correlated noise.

    The slice profile blurs the clean image along z; white noise is then added
    and the in-plane kernel blurs both, which gives CT noise its grain, as the
    reconstruction kernel does. Uses ``hu`` as scratch space (it is overwritten).
    """
    blurred = np.empty_like(hu)
    ndimage.correlate1d(hu, _gaussian_kernel(acq.psf_sigma_z), axis=0, output=blurred, mode="nearest")
    k = _gaussian_kernel(acq.psf_sigma_xy)
    # White noise scaled so that after the two in-plane passes its SD is exactly the drawn one.
    noise = rng.standard_normal(hu.shape, dtype=_F32)
    noise *= _F32(acq.noise_sd / float((k**2).sum()))
    blurred += noise
    del noise
    ndimage.correlate1d(blurred, k, axis=1, output=hu, mode="nearest")
    ndimage.correlate1d(hu, k, axis=2, output=blurred, mode="nearest")
    # Scanners store whole HU in int16 (-1024..3071); so does the data set writer, losslessly.
    np.rint(blurred, out=blurred)
    np.clip(blurred, -1024.0, 3071.0, out=blurred)
    return blurred


def _slice_count(length_mm: float, preference: float, slice_range: tuple[int, int]) -> int:
    """A slice count in ``slice_range`` giving 2.5-5 mm slices where that is possible, placed by ``preference``."""
    lo, hi = slice_range
    n_lo = max(lo, math.ceil(length_mm / SLICE_SPACING_MM[1]))
    n_hi = min(hi, math.floor(length_mm / SLICE_SPACING_MM[0]))
    if n_lo > n_hi:  # a range the caller chose that cannot give 2.5-5 mm slices over this field of view
        n_lo, n_hi = lo, hi
    return int(round(n_lo + preference * (n_hi - n_lo)))


# --------------------------------------------------------------------------- public API


@dataclass
class PhantomCase:
    """One synthetic CT: ``image`` (float32 HU) and ``label`` (uint8, 0..8) on the same grid.

    ``info`` is JSON-serialisable and records how the case was drawn: among others
    ``z_offset_mm`` (how far above the liver dome the scan starts; negative when
    it starts below), ``centre_offset_mm`` (body centre minus image centre,
    LPS x and y), ``off_centre`` (offset above 5% of the field of view),
    ``spacing`` (x, y, z mm), and the HU values and organ scales used.
    """

    image: Volume
    label: Volume
    info: dict


class PhantomGenerator:
    """Makes synthetic abdominal CT cases; ``generate(i)`` is deterministic in (seed, i).

    ``in_plane`` sets the matrix size (512 like BCV; 96-128 for fast tests) over
    the same physical field of view, so the pixel spacing grows as it shrinks.
    The slice count is chosen in ``slice_range`` (keeping 2.5-5 mm slices where
    possible) or fixed by ``slices``; either way the cranio-caudal field of view
    of a case stays the same and only the slice spacing changes.
    """

    def __init__(
        self,
        seed: int = 0,
        in_plane: int = 512,
        slice_range: tuple[int, int] = DEFAULT_SLICE_RANGE,
        *,
        slices: int | None = None,
    ):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise InputError(f"The phantom seed must be a non-negative integer, got {seed!r}.")
        if not isinstance(in_plane, (int, np.integer)) or in_plane < MIN_IN_PLANE:
            raise InputError(
                f"The in-plane size must be an integer of at least {MIN_IN_PLANE} pixels, got {in_plane!r}."
            )
        try:
            lo, hi = (int(v) for v in slice_range)
        except (TypeError, ValueError):
            raise InputError(f"The slice range must be two integers (fewest, most), got {slice_range!r}.") from None
        if lo < MIN_SLICES or hi < lo:
            raise InputError(f"The slice range must satisfy {MIN_SLICES} <= fewest <= most, got {slice_range!r}.")
        if slices is not None and (not isinstance(slices, (int, np.integer)) or slices < MIN_SLICES):
            raise InputError(f"The slice count must be an integer of at least {MIN_SLICES}, got {slices!r}.")
        self.seed = int(seed)
        self.in_plane = int(in_plane)
        self.slice_range = (lo, hi)
        self.slices = None if slices is None else int(slices)

    def generate(self, index: int) -> PhantomCase:
        """Case ``index`` of this seed (``numpy.random.default_rng([seed, index])``)."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
            raise InputError(f"The phantom case index must be a non-negative integer, got {index!r}.")
        rng = np.random.default_rng([self.seed, int(index)])
        scene = _build_scene(rng)
        acq = scene.acquisition

        n = self.slices or _slice_count(acq.length_mm, acq.slice_preference, self.slice_range)
        pixel, dz = acq.fov_mm / self.in_plane, acq.length_mm / n
        origin_xy = -(self.in_plane - 1) / 2.0 * pixel  # image centre on the scanner isocentre
        ij = np.arange(self.in_plane, dtype=float) * pixel + origin_xy
        z_body = acq.top_mm - acq.length_mm + (np.arange(n) + 0.5) * dz
        grid = _Grid(
            (ij - acq.centre_offset[0]).astype(_F32),
            (ij - acq.centre_offset[1]).astype(_F32),
            z_body.astype(_F32),
        )
        canvas = _Canvas(grid, scene.body)
        _paint_body(canvas, scene.body, scene.hu, table_x=-acq.centre_offset[0])
        for structure in scene.structures:
            _paint_structure(canvas, structure, scene.displacement, scene.hu["fat"])
        _paint_spine(canvas, scene.spine, scene.displacement, scene.hu)
        image = _acquire(canvas.hu, acq, rng)

        geometry = Geometry(spacing=(pixel, pixel, dz), origin=(origin_xy, origin_xy, z_body[0] + acq.dome_z_scanner))
        offset = [round(acq.centre_offset[0], 2), round(acq.centre_offset[1], 2)]
        info = {
            "case": case_id(index),
            "seed": self.seed,
            "index": int(index),
            "shape_zyx": list(grid.shape),
            "spacing": [round(pixel, 6), round(pixel, 6), round(dz, 6)],
            "field_of_view_mm": [round(acq.fov_mm, 2), round(acq.fov_mm, 2), round(acq.length_mm, 2)],
            "z_offset_mm": round(acq.top_mm, 2),
            "liver_dome_z_mm": round(acq.dome_z_scanner, 2),
            "centre_offset_mm": offset,
            "off_centre": bool(math.hypot(*acq.centre_offset) > 0.05 * acq.fov_mm),
            **scene.info,
        }
        return PhantomCase(Volume(image, geometry), Volume(canvas.label, geometry), info)


def case_id(index: int) -> str:
    """File stem of case ``index``: ``phantom_003``."""
    return f"phantom_{int(index):03d}"


def _write_image(volume: Volume, path: Path, pixel_type: int) -> None:
    """Writes with SimpleITK through a temporary name, so no half-written file is ever left behind."""
    image = sitk.Cast(sitk.GetImageFromArray(volume.array), pixel_type)
    image.SetSpacing(volume.geometry.spacing)
    image.SetOrigin(volume.geometry.origin)
    image.SetDirection(volume.geometry.direction)
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.tmp{os.getpid()}.nii.gz")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _manifest(training: dict[str, dict], phantom_info: dict[str, dict]) -> dict:
    """dataset.json: nnU-Net v2 keys, the MSD keys and the phantom parameters of every case."""
    order = sorted(training)
    return {
        "name": "FINEPhantoms",
        "description": (
            "Synthetic abdominal CT phantoms (portal venous phase, BCV-like) generated by "
            "FINESegmentationLib.data.phantoms; not patient data."
        ),
        "reference": "FINESegmentation synthetic phantom generator",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "channel_names": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(CLASS_NAMES)},
        "numTraining": len(order),
        "numTest": 0,
        "file_ending": ".nii.gz",
        "training": [training[c] for c in order],
        "test": [],
        "phantom_info": {c: phantom_info.get(c, {}) for c in order},
    }


def _existing_cases(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Training entries (and their info) of an existing dataset.json whose files are still present."""
    path = out / "dataset.json"
    training, info = {}, {}
    if not path.is_file():
        return training, info
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        for entry in old.get("training", []):
            cid = Path(entry["label"]).name[: -len(".nii.gz")]
            if (out / entry["image"]).is_file() and (out / entry["label"]).is_file():
                training[cid] = entry
                info[cid] = old.get("phantom_info", {}).get(cid, {})
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("Ignoring unreadable %s; it will be rewritten.", path)
        return {}, {}
    return training, info


def write_dataset(
    out_dir: str | os.PathLike,
    cases: int,
    seed: int = 0,
    *,
    in_plane: int = 512,
    first_index: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Writes ``cases`` phantoms in the nnU-Net v2 / Medical Segmentation Decathlon layout.

    ``out_dir/imagesTr/phantom_XXX_0000.nii.gz`` (int16 HU, as scanners store CT;
    the generated values are whole HU so nothing is lost), ``out_dir/labelsTr/
    phantom_XXX.nii.gz`` (uint8) and ``out_dir/dataset.json`` (nnU-Net v2 keys plus
    the MSD ``training`` list and ``phantom_info`` per case). Cases already listed
    in an existing ``dataset.json`` whose files are still there are kept, so a data
    set can be grown with ``first_index``. Every file appears atomically and
    dataset.json is rewritten after each case, so an interrupted run leaves a
    consistent data set of the finished cases. Returns the image paths written.
    """
    if not isinstance(cases, (int, np.integer)) or isinstance(cases, bool) or cases < 1:
        raise InputError(f"The number of phantom cases must be a positive integer, got {cases!r}.")
    if not isinstance(first_index, (int, np.integer)) or isinstance(first_index, bool) or first_index < 0:
        raise InputError(f"The first case index must be a non-negative integer, got {first_index!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"The phantom output folder {out} is an existing file; give a folder path instead.")
    generator = PhantomGenerator(seed, in_plane=in_plane)
    images_dir, labels_dir = out / "imagesTr", out / "labelsTr"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"Cannot create the phantom output folder {out} ({exc.strerror}); choose a writable folder."
        ) from None

    training, phantom_info = _existing_cases(out)
    written = []
    for index in tqdm(range(first_index, first_index + cases), desc="Phantoms", unit="case", disable=not progress):
        case = generator.generate(index)
        cid = case.info["case"]
        image_path, label_path = images_dir / f"{cid}_0000.nii.gz", labels_dir / f"{cid}.nii.gz"
        _write_image(case.image, image_path, sitk.sitkInt16)
        _write_image(case.label, label_path, sitk.sitkUInt8)
        training[cid] = {"image": f"./imagesTr/{cid}_0000.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"}
        phantom_info[cid] = case.info
        _write_json(_manifest(training, phantom_info), out / "dataset.json")
        written.append(image_path)
    return written
