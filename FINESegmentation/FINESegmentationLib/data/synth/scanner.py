"""The scan of a synthetic patient: field of view, grid, reconstruction kernel, noise, and the labels on that grid.

Fields of view (``fov`` in synth_info.json):

* ``slab``: 40-80 mm cranio-caudally, anywhere the map has organs (a thin partial scan);
* ``abdomen``: 150-320 mm, part or all of the abdomen;
* ``chest-pelvis``: the whole label map (the maps reach from the lung bases to the pelvis where the source
  scan did);
* ``cta``: a tight, off-centre in-plane crop of 120-250 mm around the aorta over 100-300 mm, thin slices,
  mostly arterial phase (a CT angiogram's view).

In-plane the field of view fits the body (x 1.0-1.25), is tighter than the body in 15% of the abdomen and
slab scans (flanks cut off), and is off-centre by 5-15% of its width in 35% of them. Pixels are 0.5-1.0
mm (the scanner's 512 matrix over that field of view), or 2.5-3.2 mm for "3 mm volumes" (15%); slices are
0.6-1.0, 1.25-2, 2.5-3 or 4-5 mm thick, sometimes overlapping (3 mm volumes: 3 mm, 6-18 HU noise, no
sharp kernel, as volumes resampled from thinner scans are). The ``in_plane`` and ``max_slices`` caps
keep training sets small: a scan whose matrix would exceed them gets coarser pixels or slices (recorded as
``capped`` with the drawn ``native_spacing``), with the noise averaged down accordingly.

Reconstruction kernels blur in-plane (soft 0.7-1.0 mm, standard 0.45-0.7 mm, sharp 0.25-0.45 mm with edge
overshoot); the slice profile blurs along z (FWHM = slice thickness). Noise is filtered-back-projection
noise: white noise shaped by a ramp-times-Gaussian power spectrum in-plane (fine grain for sharp kernels,
coarser for soft), 8-22 HU at 3 mm with the standard kernel, scaled by thickness and kernel.

Labels: each organ's one-hot map is smoothed a little (about half a source voxel, more when the scan is
coarser than the map) and interpolated linearly at the scan's voxels, and each voxel takes the most likely
class (background included). Going to thinner slices than the map therefore gives smooth organ ends, not a
staircase of 3-5 mm steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from ..phantoms import AORTA
from .anatomy import AnatomyMap, Coarse
from .body import BodyPlan
from .canvas import Canvas

FOV_KINDS = ("slab", "abdomen", "chest-pelvis", "cta")
FOV_WEIGHTS = (0.2, 0.35, 0.25, 0.2)
KERNELS = {"soft": ((0.7, 1.0), 0.75, 0.25), "standard": ((0.45, 0.7), 1.0, 0.4), "sharp": ((0.25, 0.45), 1.7, 0.7)}
_F32 = np.float32


@dataclass
class Acquisition:
    fov: str
    centre: tuple[float, float, float]  # anatomy-frame centre of the scanned box (mm)
    size_mm: tuple[float, float, float]
    native_spacing: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]  # (x, y, z)
    thickness_mm: float
    kernel: str
    blur_mm: float
    native_noise_hu: float
    noise_hu: float
    offcentre: bool
    cropped: bool
    table_x: float

    @property
    def capped(self) -> bool:
        return not np.allclose(self.spacing, self.native_spacing)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scan's voxel-centre coordinates along x, y, z (mm)."""
        return tuple(
            (c + (np.arange(n) - (n - 1) / 2.0) * s).astype(np.float64)
            for c, n, s in zip(self.centre, self.shape, self.spacing)
        )


def _choice(rng: np.random.Generator, options, weights):
    return options[int(rng.choice(len(options), p=np.asarray(weights) / np.sum(weights)))]


def draw_acquisition(
    rng: np.random.Generator, body: BodyPlan, coarse: Coarse, in_plane: int, max_slices: int,
    fov: str | None = None,
) -> Acquisition:
    """Draws a field of view that holds part of at least one organ, a grid, a kernel and a noise level."""
    u = rng.uniform
    kind = fov or _choice(rng, FOV_KINDS, FOV_WEIGHTS)
    z = body.z
    half = float(abs(z[1] - z[0])) / 2.0 if len(z) > 1 else 1.5
    z_lo, z_hi = float(z[0]) - half, float(z[-1]) + half
    organ_z = coarse.z_range() or (z_lo, z_hi)
    aorta_z = coarse.z_range(AORTA) or organ_z
    lo, hi = body.outer_extent()
    for _ in range(50):
        if kind == "slab":
            length = u(40, 80)
            zc = u(organ_z[0], organ_z[1])
        elif kind == "abdomen":
            length = u(150, 320)
            zc = u(organ_z[0], organ_z[1])
        elif kind == "cta":
            length = u(100, 300)
            zc = u(aorta_z[0], aorta_z[1])
        else:
            length = z_hi - z_lo - u(0, 15) - u(0, 15)
            zc = (z_lo + z_hi) / 2.0 + u(-5, 5)
        z0, z1 = max(zc - length / 2.0, z_lo), min(zc + length / 2.0, z_hi)
        if z1 - z0 < 20.0:
            continue
        rows = (z >= z0 - half) & (z <= z1 + half)
        bx0, by0 = lo[rows].min(axis=0)
        bx1, by1 = hi[rows].max(axis=0)
        body_c = np.array([(bx0 + bx1) / 2.0, (by0 + by1) / 2.0])
        width = max(bx1 - bx0, by1 - by0)
        cropped, offcentre = False, False
        if kind == "cta":
            dfov = u(120, 250)
            zm = (z0 + z1) / 2.0
            aorta = np.array([np.interp(zm, z, body.aorta_x), np.interp(zm, z, body.aorta_y)])
            centre_xy = aorta + u(-0.25, 0.25, 2) * dfov
            offcentre = True
            native_xy = u(0.5, 0.8)
        else:
            if rng.random() < 0.15 and kind != "chest-pelvis":
                dfov, cropped = width * u(0.75, 0.95), True
            else:
                dfov = float(np.clip(width * u(1.0, 1.25), 250.0, 500.0))
            offcentre = bool(rng.random() < 0.35)
            angle = u(0, 2 * math.pi)
            shift = (u(0.05, 0.15) if offcentre else u(0.0, 0.03)) * dfov
            centre_xy = body_c - shift * np.array([math.cos(angle), math.sin(angle)])
            native_xy = u(2.5, 3.2) if rng.random() < 0.15 else float(np.clip(dfov / 512.0, 0.5, 1.0))
        if native_xy >= 2.5:
            thickness = native_xy
        elif kind == "cta":
            thickness = u(0.6, 1.0) if rng.random() < 0.7 else u(1.25, 2.0)
        else:
            band = _choice(rng, ((0.6, 1.0), (1.25, 2.0), (2.5, 3.0), (4.0, 5.0)), (0.3, 0.25, 0.25, 0.2))
            thickness = u(*band)
        native_dz = thickness * (u(0.5, 1.0) if rng.random() < 0.25 else 1.0)
        box_lo = np.array([centre_xy[0] - dfov / 2, centre_xy[1] - dfov / 2, z0])
        box_hi = np.array([centre_xy[0] + dfov / 2, centre_xy[1] + dfov / 2, z1])
        if _organ_voxels(coarse, box_lo + 5.0, box_hi - 5.0) > 0:
            break
    else:  # every draw missed the organs: scan the whole map as an abdomen study
        kind, z0, z1 = "abdomen", z_lo, z_hi
        box_lo, box_hi = np.array([lo[:, 0].min(), lo[:, 1].min(), z0]), np.array([hi[:, 0].max(), hi[:, 1].max(), z1])
        dfov = float(max(box_hi[:2] - box_lo[:2]))
        centre_xy = (box_lo[:2] + box_hi[:2]) / 2.0
        native_xy, thickness, native_dz, offcentre, cropped = float(np.clip(dfov / 512, 0.5, 1.0)), 3.0, 3.0, False, False
    length = z1 - z0
    n_xy = max(int(round(dfov / native_xy)), 1)
    xy = native_xy if n_xy <= in_plane else dfov / in_plane
    n_xy = min(n_xy, in_plane)
    n_z = max(int(round(length / native_dz)), 1)
    dz = native_dz if n_z <= max_slices else length / max_slices
    n_z = min(n_z, max_slices)
    if n_z < 8:  # a few slices at least: thin slabs are still volumes
        n_z, dz = 8, length / 8
    resampled = native_xy >= 2.5  # a "3 mm volume": resampled from a thinner scan, so smoother and quieter
    weights = (0.3, 0.45, 0.25) if kind != "cta" and not resampled else (0.4, 0.6, 0.0)
    kernel = _choice(rng, ("soft", "standard", "sharp"), weights)
    (b0, b1), noise_factor, _ = KERNELS[kernel]
    native_noise = u(6, 18) if resampled else u(8, 22) * math.sqrt(3.0 / thickness) * noise_factor
    # Coarser voxels than the scanner's average its noise down.
    averaging = math.sqrt((native_xy**2 * max(native_dz, thickness)) / (xy**2 * max(dz, thickness)))
    noise = float(np.clip(native_noise * min(averaging, 1.0), 3.0, 80.0))
    return Acquisition(
        fov=kind, centre=(float(centre_xy[0]), float(centre_xy[1]), (z0 + z1) / 2.0), size_mm=(dfov, dfov, length),
        native_spacing=(native_xy, native_xy, native_dz), spacing=(xy, xy, dz), shape=(n_xy, n_xy, n_z),
        thickness_mm=thickness, kernel=kernel, blur_mm=u(b0, b1), native_noise_hu=native_noise, noise_hu=noise,
        offcentre=offcentre, cropped=cropped, table_x=float(np.interp((z0 + z1) / 2, z, body.cx) + u(-20, 20)),
    )


def _organ_voxels(coarse: Coarse, lo: np.ndarray, hi: np.ndarray) -> int:
    zs = (coarse.z >= lo[2]) & (coarse.z <= hi[2])
    ys = (coarse.y >= lo[1]) & (coarse.y <= hi[1])
    xs = (coarse.x >= lo[0]) & (coarse.x <= hi[0])
    return int(np.count_nonzero(coarse.labels[np.ix_(zs, ys, xs)]))


def resample_labels(anatomy: AnatomyMap, canvas: Canvas, spacing) -> np.ndarray:
    """The map's labels at the canvas's anatomy positions: per-label smoothed one-hot, linear, most likely class."""
    shape = canvas.qx.shape
    label = np.zeros(shape, np.uint8)
    best = np.zeros(shape, _F32)
    total = np.zeros(shape, _F32)
    src = anatomy.labels
    sx, sy, sz = anatomy.spacing
    ox, oy, oz = anatomy.origin
    # About half a source voxel of smoothing (no staircase), more where the scan is coarser (no aliasing).
    sigma = tuple(0.5 * max(1.0, o / s) for o, s in ((spacing[2], sz), (spacing[1], sy), (spacing[0], sx)))
    pad = [int(math.ceil(3 * s)) + 2 for s in sigma]
    for value in np.unique(src[src > 0]) if src.any() else []:
        k = np.nonzero((src == value).any(axis=(1, 2)))[0]
        sub = src[k[0] : k[-1] + 1]
        j = np.nonzero((sub == value).any(axis=(0, 2)))[0]
        i = np.nonzero((sub == value).any(axis=(0, 1)))[0]
        lo_idx = [max(0, k[0] - pad[0]), max(0, j[0] - pad[1]), max(0, i[0] - pad[2])]
        hi_idx = [min(src.shape[0], k[-1] + pad[0] + 1), min(src.shape[1], j[-1] + pad[1] + 1), min(src.shape[2], i[-1] + pad[2] + 1)]
        lo_w = (ox + lo_idx[2] * sx, oy + lo_idx[1] * sy, oz + lo_idx[0] * sz)
        hi_w = (ox + (hi_idx[2] - 1) * sx, oy + (hi_idx[1] - 1) * sy, oz + (hi_idx[0] - 1) * sz)
        box = canvas.box(lo_w, hi_w)
        if box is None:
            continue
        onehot = (src[lo_idx[0] : hi_idx[0], lo_idx[1] : hi_idx[1], lo_idx[2] : hi_idx[2]] == value).astype(_F32)
        onehot = ndimage.gaussian_filter(onehot, sigma, mode="constant", truncate=3.0)
        qx, qy = canvas.qx[box], canvas.qy[box]
        qz = np.broadcast_to(canvas.qz3(box), qx.shape)
        coords = np.stack([(qz - oz) / sz - lo_idx[0], (qy - oy) / sy - lo_idx[1], (qx - ox) / sx - lo_idx[2]])
        p = ndimage.map_coordinates(onehot, coords.reshape(3, -1), order=1, mode="constant", cval=0.0).reshape(qx.shape)
        total[box] += p
        b, lab = best[box], label[box]
        better = p > b
        b[better] = p[better]
        lab[better] = value
    label[best <= 1.0 - total] = 0
    return label


def _gaussian(hu: np.ndarray, sigma: float, axes) -> None:
    for axis in axes:
        ndimage.gaussian_filter1d(hu, sigma, axis=axis, output=hu, mode="nearest", truncate=3.0)


def acquire(hu: np.ndarray, acq: Acquisition, rng: np.random.Generator, chunk: int = 16) -> np.ndarray:
    """Kernel and slice-profile blur, FBP-like noise, whole HU clipped to -1024..3071; returns int16."""
    xy, dz = acq.spacing[0], acq.spacing[2]
    # The kernel's blur plus the pixel's own footprint (the scene is drawn at voxel centres).
    sigma_xy = math.sqrt((acq.blur_mm / xy) ** 2 + 0.4**2)
    sigma_z = math.sqrt((acq.thickness_mm / 2.355 / dz) ** 2 + 0.3**2)
    _gaussian(hu, sigma_z, (0,))
    if acq.kernel == "sharp":  # edge enhancement: overshoot at edges, as sharp kernels give
        smooth = hu.copy()
        _gaussian(smooth, 1.2 / xy, (1, 2))
        _gaussian(hu, sigma_xy, (1, 2))
        hu += 0.6 * (hu - smooth)
        del smooth
    else:
        _gaussian(hu, sigma_xy, (1, 2))
    _, _, fc = KERNELS[acq.kernel]
    ny, nx = hu.shape[1:]

    def shaping(fx: np.ndarray) -> np.ndarray:
        fr = np.sqrt(fx * fx + np.fft.fftfreq(ny, d=xy)[:, None] ** 2)
        return np.sqrt(fr * np.exp(-((fr / fc) ** 2))).astype(_F32)

    half = shaping(np.fft.rfftfreq(nx, d=xy)[None, :])
    # White unit noise filtered by H has variance mean(|H|^2) over the full spectrum.
    gain = _F32(acq.noise_hu / max(math.sqrt(float(np.mean(shaping(np.fft.fftfreq(nx, d=xy)[None, :]) ** 2))), 1e-9))
    for z0 in range(0, hu.shape[0], chunk):
        white = rng.standard_normal((min(chunk, hu.shape[0] - z0), ny, nx), dtype=_F32)
        noise = scipy.fft.irfft2(scipy.fft.rfft2(white, axes=(1, 2)) * half, s=(ny, nx), axes=(1, 2))
        hu[z0 : z0 + noise.shape[0]] += gain * noise
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    return hu.astype(np.int16)
