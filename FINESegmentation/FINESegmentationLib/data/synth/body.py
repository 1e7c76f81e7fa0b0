"""The body around the real organs: wall, fat, skin, spine, ribs, pelvis, thorax base and the table.

Everything is placed from the label map, in its LPS frame (x left, y posterior, z superior):

* The spine lies behind the aorta (labelled in every map): the vertebral bodies' front touches the back of
  the abdominal aorta, a little to its right; above the aortic hiatus (just above the kidneys) the
  thoracic aorta runs beside the vertebral bodies instead. Below the aorta's end (its bifurcation, when
  the map reaches it) the column keeps its place and tilts back toward the sacrum.
* The abdominal cavity is, per slice, a star-shaped outline about a centre in front of the spine: a drawn
  ellipse grown wherever an organ of the neighbouring slices (+-15 mm) would come within a few mm of it,
  then smoothed. So the body encloses every organ at every level, with a margin, whatever the map holds.
* The wall stacks outward from that outline: muscle (rectus in front, three flank layers with fat planes,
  paraspinal mass behind, gluteal mass in the pelvis), subcutaneous fat, skin. The back rests on the
  scanner table and is flattened by it.
* Ribs run inside the wall, so they lie lateral and posterior to the liver and spleen at their levels:
  the 12th rib's spinal end sits near the kidneys' upper poles and the ribs descend toward the front.
* Above the diaphragm (two domes, always above the liver, spleen, stomach and kidneys of each column) lie
  the lung bases, the heart and the mediastinal fat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..phantoms import AORTA, LEFT_KIDNEY, LIVER, RIGHT_KIDNEY, SPLEEN, STOMACH, _Body, _Ellipsoid, _Tube
from .anatomy import Coarse
from .canvas import Canvas

KIDNEYS = (RIGHT_KIDNEY, LEFT_KIDNEY)
N_THETA = 180
_F32 = np.float32


def _back_weight(theta):
    """How much of the back's extra fat (pressed against the table) lies at angle ``theta``."""
    return (np.maximum(np.sin(theta), 0.0) ** 4).astype(_F32)


def _angle_from(theta, reference: float):
    """Unsigned angle between ``theta`` and ``reference`` (radians, 0..pi)."""
    return np.abs(np.mod(theta - reference + math.pi, 2 * math.pi) - math.pi)


@dataclass
class BodyPlan:
    """One patient's body, tabulated over the map's slices (``z``) and the in-plane angle.

    ``theta`` is ``atan2(y - cy, x - cx)``: +pi/2 points posterior, -pi/2 anterior, 0 to the patient's left.
    """

    z: np.ndarray
    aorta_x: np.ndarray
    aorta_y: np.ndarray
    aorta_r: np.ndarray
    spine_x: np.ndarray
    spine_y: np.ndarray
    spine_rx: np.ndarray
    spine_ry: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    r_cavity: np.ndarray  # [z, N_THETA]
    muscle_mm: float
    paraspinal_mm: float
    fat_mm: float
    skin_mm: float
    table_y: float
    back_extra: np.ndarray  # [z] extra posterior fat where the back would not reach the table
    z_hiatus: float
    z_bifurcation: float
    bifurcation_in_map: bool
    diaphragm: np.ndarray  # [y, x] on the coarse grid: z of the diaphragm's upper surface
    diaphragm_axes: tuple[np.ndarray, np.ndarray]
    diaphragm_mm: float
    rib_top_z: float
    rib_pitch: float
    rib_drop: float
    rib_height: float
    rib_width: float
    rib_end_angle: np.ndarray
    vertebra_pitch: float
    disc_mm: float
    vertebra_phase: float
    canal_mm: float
    cortex_mm: float
    heart_centre: np.ndarray
    heart_radii: np.ndarray
    iliac_crest_z: float
    hip_z: float  # femoral heads' centre, below the bifurcation
    hip_dx: float
    hip_front: float
    hip_r: float
    gluteal_mm: float
    arms: tuple | None = None  # (radius, gap to the flank, y offset) when the arms lie by the sides

    def at(self, name: str, z: np.ndarray) -> np.ndarray:
        """A per-slice quantity (e.g. 'spine_x') at heights ``z`` (held constant beyond the map)."""
        return np.interp(z, self.z, getattr(self, name)).astype(_F32)

    def cavity_radius(self, z: np.ndarray) -> np.ndarray:
        """The cavity outline [len(z), N_THETA] at heights ``z``."""
        k = np.interp(z, self.z, np.arange(len(self.z)))
        k0 = np.clip(np.floor(k).astype(int), 0, len(self.z) - 1)
        k1 = np.minimum(k0 + 1, len(self.z) - 1)
        w = (k - k0)[:, None]
        return ((1 - w) * self.r_cavity[k0] + w * self.r_cavity[k1]).astype(_F32)

    # The phantoms' wall: rectus in front with notches at the linea alba and semilunar lines, thicker
    # flanks, the paraspinal mass behind; more subcutaneous fat over the belly and flanks than the back.
    muscle_thickness = _Body.muscle_thickness
    fat_thickness = _Body.fat_thickness
    oblique_region = _Body.oblique_region

    def outer_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slice, the body's (x_min, y_min) and (x_max, y_max) in mm: [z, 2] each."""
        theta = -math.pi + (np.arange(N_THETA) + 0.5) * 2 * math.pi / N_THETA
        r = self.r_cavity + (self.muscle_thickness(theta, notches=False) + self.fat_thickness(theta) + self.skin_mm)[None]
        r = r + self.back_extra[:, None] * _back_weight(theta)[None]
        x = self.cx[:, None] + r * np.cos(theta)[None]
        y = np.minimum(self.cy[:, None] + r * np.sin(theta)[None], self.table_y)
        return np.column_stack([x.min(1), y.min(1)]), np.column_stack([x.max(1), y.max(1)])


def _aorta_line(coarse: Coarse) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: centre x, y and radius of the descending aorta (its most posterior part), and which slices hold it."""
    n = len(coarse.z)
    ax, ay, ar = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    k, j, i = np.nonzero(coarse.labels == AORTA)
    cell = float(abs(coarse.x[1] - coarse.x[0]) * abs(coarse.y[1] - coarse.y[0])) if len(coarse.x) > 1 else 9.0
    for kk in np.unique(k):
        sel = k == kk
        x, y = coarse.x[i[sel]], coarse.y[j[sel]]
        back = y > y.max() - 35.0  # the arch's ascending limb lies in front: keep the descending part
        ax[kk], ay[kk] = x[back].mean(), y[back].mean()
        ar[kk] = math.sqrt(back.sum() * cell / math.pi)
    return ax, ay, ar, ~np.isnan(ax)


def _fill(values: np.ndarray, valid: np.ndarray, fallback: float, sigma: float) -> np.ndarray:
    """Missing slices from their neighbours (held constant past the ends), then smoothed along z."""
    idx = np.arange(len(values))
    if not valid.any():
        return np.full(len(values), fallback)
    out = np.interp(idx, idx[valid], values[valid])
    return ndimage.gaussian_filter1d(out, sigma, mode="nearest") if sigma > 0 else out


def plan_body(coarse: Coarse, rng: np.random.Generator) -> BodyPlan:
    """Draws one patient's body around the map's organs. Consumes ``rng`` in a fixed order."""
    u = rng.uniform
    z = coarse.z.astype(np.float64)
    dz = float(abs(z[1] - z[0])) if len(z) > 1 else 3.0
    organs = coarse.labels > 0
    k_o, j_o, i_o = np.nonzero(organs)
    ox, oy = coarse.x[i_o], coarse.y[j_o]

    ax, ay, ar, has_aorta = _aorta_line(coarse)
    sigma = 8.0 / dz
    ax = _fill(ax, has_aorta, float(ox.mean()), sigma)
    ay = _fill(ay, has_aorta, float(oy.mean()) + 40.0, sigma)
    ar = np.clip(_fill(ar, has_aorta, 10.0, sigma), 5.0, 18.0)
    kidney_tops = [r[1] for r in (coarse.z_range(label) for label in KIDNEYS) if r]
    liver = coarse.z_range(LIVER)
    if kidney_tops:
        z_hiatus = max(kidney_tops) + u(10, 30)
    elif liver:
        z_hiatus = liver[1] - u(60, 90)
    else:
        z_hiatus = float(z[-1]) + 100.0
    aorta_z = z[has_aorta] if has_aorta.any() else z
    z_bif = float(aorta_z.min())
    bif_in_map = bool(z_bif > z[0] + 10.0)

    lumbar = np.clip((z_hiatus - z) / 150.0, 0.0, 1.0)
    rx = u(14, 17) + 7.0 * lumbar
    ry = u(11.5, 13.5) + 4.0 * lumbar
    w = np.clip((z - z_hiatus) / 50.0, 0.0, 1.0)  # 0 abdominal, 1 thoracic
    dx = (1 - w) * u(6, 13) + w * (0.9 * rx + 0.3 * ar)
    dy = (1 - w) * (ar + u(1.5, 4) + ry) + w * 0.4 * ry
    spine_x, spine_y = ax - dx, ay + dy
    if bif_in_map:  # L5 and the sacrum tilt back below the bifurcation
        spine_y = spine_y + np.minimum(0.25 * np.clip(z_bif - 30.0 - z, 0.0, None), 40.0)

    depth = u(72, 92)  # cavity centre in front of the spine
    cx, cy = spine_x, spine_y - depth
    a_x, a_ant, a_post = u(80, 110), u(40, 75), depth

    theta = -math.pi + (np.arange(N_THETA) + 0.5) * 2 * math.pi / N_THETA
    c, s = np.cos(theta), np.sin(theta)
    b = np.where(s > 0, a_post, a_ant)
    base = 1.0 / np.sqrt(c * c / a_x**2 + s * s / b**2)

    # Farthest organ voxel per slice and angle bin, about that slice's centre.
    ext = np.zeros((len(z), N_THETA))
    if k_o.size:
        t = np.arctan2(oy - cy[k_o], ox - cx[k_o])
        rho = np.hypot(ox - cx[k_o], oy - cy[k_o])
        bins = np.clip(((t + math.pi) / (2 * math.pi) * N_THETA).astype(int), 0, N_THETA - 1)
        np.maximum.at(ext, (k_o, bins), rho)
    ext = ndimage.maximum_filter1d(ext, 7, axis=1, mode="wrap")
    ext = ndimage.maximum_filter1d(ext, 2 * int(math.ceil(8.0 / dz)) + 1, axis=0, mode="nearest")
    need = ext + u(3, 7)
    r = np.maximum(base[None, :], need)
    r = ndimage.gaussian_filter1d(r, 2.0, axis=1, mode="wrap")
    r = ndimage.gaussian_filter1d(r, 6.0 / dz, axis=0, mode="nearest")
    r = np.maximum(r, ext + 3.0)

    plan = BodyPlan(
        z=z, aorta_x=ax, aorta_y=ay, aorta_r=ar, spine_x=spine_x, spine_y=spine_y, spine_rx=rx, spine_ry=ry,
        cx=cx, cy=cy, r_cavity=r, muscle_mm=u(8, 15), paraspinal_mm=u(55, 80), fat_mm=4.0 + 31.0 * u(0, 1) ** 1.5, skin_mm=u(1.5, 3.0),
        table_y=math.inf, back_extra=np.zeros(len(z)), z_hiatus=float(z_hiatus), z_bifurcation=z_bif, bifurcation_in_map=bif_in_map,
        diaphragm=np.zeros((1, 1)), diaphragm_axes=(coarse.x, coarse.y), diaphragm_mm=u(3.5, 5.5),
        rib_top_z=0.0, rib_pitch=u(20, 26), rib_drop=u(70, 110), rib_height=u(8, 12), rib_width=u(6, 9),
        rib_end_angle=np.array([2.9] * 7 + [2.75, 2.6, 2.35, 1.9, 1.4]) + u(-0.1, 0.1, 12),
        vertebra_pitch=u(29, 36), disc_mm=u(6, 10), vertebra_phase=u(0, 36), canal_mm=u(7, 9.5),
        cortex_mm=u(1.2, 2.2), heart_centre=np.zeros(3), heart_radii=np.array([u(55, 70), u(45, 55), u(48, 60)]),
        iliac_crest_z=z_bif - u(5, 30), hip_z=z_bif - u(150, 185), hip_dx=u(80, 95), hip_front=u(25, 45),
        hip_r=u(21, 26), gluteal_mm=u(25, 50),
    )
    lo, hi = plan.outer_extent()
    # The patient lies on the table: the back is pressed onto it (soft tissue spreads to reach it, the
    # most posterior levels are flattened by it), leaving at most a small lordotic gap.
    back = hi[:, 1]
    plan.table_y = float(np.percentile(back, 60) + u(0, 4))
    gap = np.clip(plan.table_y - back - u(0, 8), 0.0, 80.0)
    plan.back_extra = ndimage.gaussian_filter1d(gap, 20.0 / dz, mode="nearest")
    _plan_diaphragm(plan, coarse, rng)
    # The 12th rib's spinal end lies by the kidneys' upper poles (lower lobe of the liver without kidneys).
    if kidney_tops:
        z12 = max(kidney_tops) - u(5, 30)
    elif liver:
        z12 = liver[0] + u(0, 40)
    else:
        z12 = float(z[0]) - 100.0
    plan.rib_top_z = z12 + 7 * plan.rib_pitch
    if rng.random() < 0.15:  # arms down by the sides (trauma, PET-CT), in view of a wide field
        plan.arms = (u(38, 52), u(5, 30), u(-10, 30))
    return plan


def _plan_diaphragm(plan: BodyPlan, coarse: Coarse, rng: np.random.Generator) -> None:
    """Two domes (the right one higher, over the liver), lifted wherever an organ of the column reaches higher."""
    u = rng.uniform
    x, y = coarse.x.astype(np.float64), coarse.y.astype(np.float64)
    under = np.isin(coarse.labels, (LIVER, SPLEEN, STOMACH) + KIDNEYS)
    has = under.any(axis=0)
    top = np.where(has, coarse.z[np.clip(len(coarse.z) - 1 - np.argmax(under[::-1], axis=0), 0, None)], -np.inf)
    top = ndimage.maximum_filter(top, size=5)
    z_liver = coarse.z_range(LIVER)
    k_mid = len(plan.z) // 2
    apex_z = []
    for labels, side in (((LIVER,), -1.0), ((SPLEEN, STOMACH), 1.0)):
        tops = [r[1] for r in (coarse.z_range(lab) for lab in labels) if r]
        apex_z.append(max(tops) + u(3, 10) if tops else (z_liver[1] - u(10, 25) if z_liver else float(plan.z[-1])))
    spine_x, cy = plan.spine_x[k_mid], plan.cy[k_mid]
    rx, ry = u(100, 125), u(110, 140)
    depth = u(70, 100)
    domes = []
    for zc, side in zip(apex_z, (-1.0, 1.0)):
        x0 = spine_x + side * u(45, 65)
        y0 = cy + u(-5, 15)
        ry_eff = np.where(y[:, None] > y0, ry, 1.6 * ry)  # deep posterior recesses, shallow in front
        domes.append(zc - depth * (((x[None, :] - x0) / rx) ** 2 + ((y[:, None] - y0) / ry_eff) ** 2))
    # The diaphragm hugs the organ tops: an upper envelope of them (bridging gaps of a few cm), and the
    # domes, lowered, where no organ lies beneath.
    cell = float(abs(x[1] - x[0])) if len(x) > 1 else 3.0
    envelope = ndimage.maximum_filter(top, size=max(3, int(round(45.0 / cell))))
    envelope = np.where(np.isfinite(envelope), envelope, -1e4)
    lowered = np.maximum(*domes) - u(15, 40)
    surface = np.maximum(np.maximum(lowered, envelope + plan.diaphragm_mm), top + plan.diaphragm_mm + 2.0)
    plan.diaphragm = ndimage.gaussian_filter(surface, 1.5).astype(_F32)
    plan.diaphragm = np.maximum(plan.diaphragm, (top + plan.diaphragm_mm + 1.0).astype(_F32))
    plan.heart_centre = np.array([spine_x + u(15, 35), cy - u(25, 45), apex_z[0] + u(35, 60)])


def _sample_grid(table: np.ndarray, axes: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a [y, x] table with coordinate axes at world points (x, y)."""
    gx, gy = axes
    fx = (x - gx[0]) / (gx[1] - gx[0])
    fy = (y - gy[0]) / (gy[1] - gy[0])
    return ndimage.map_coordinates(table, np.stack([fy.ravel(), fx.ravel()]), order=1, mode="nearest").reshape(x.shape)


def paint_wall(canvas: Canvas, plan: BodyPlan, hu: dict[str, float], table_x: float, chunk: int = 12) -> None:
    """Table, skin, fat, muscle wall (with ribs and iliac wings), cavity fat and the thorax base."""
    nz = canvas.shape[0]
    theta_tab = (-math.pi + (np.arange(4 * N_THETA) + 0.5) * 2 * math.pi / (4 * N_THETA)).astype(_F32)
    muscle_tab = plan.muscle_thickness(theta_tab).astype(_F32)
    fat_tab = (plan.muscle_thickness(theta_tab, notches=False) + plan.fat_thickness(theta_tab)).astype(_F32)
    flank_tab = plan.oblique_region(theta_tab)
    back_tab = _back_weight(theta_tab)
    back_all = plan.at("back_extra", canvas.qz)
    lo, hi = plan.outer_extent()
    side_x = np.stack([np.interp(canvas.qz, plan.z, lo[:, 0]), np.interp(canvas.qz, plan.z, hi[:, 0])], 1).astype(_F32)
    # Gluteal muscles: posterolateral bulk of the wall below the iliac crest.
    glute_tab = np.exp(-(((_angle_from(theta_tab, math.pi / 2) - 1.1) / 0.45) ** 2)).astype(_F32)
    glute_all = (plan.gluteal_mm * np.clip((plan.iliac_crest_z - canvas.qz) / 60.0, 0.0, 1.0)).astype(_F32)
    if not plan.bifurcation_in_map:
        glute_all[:] = 0.0
    r_all = plan.cavity_radius(canvas.qz)
    cx_all, cy_all = plan.at("cx", canvas.qz), plan.at("cy", canvas.qz)
    lowest_rib = plan.rib_top_z - (len(plan.rib_end_angle) - 1) * plan.rib_pitch - plan.rib_drop
    d_min = float(plan.diaphragm.min())
    for z0 in range(0, nz, chunk):
        z1 = min(z0 + chunk, nz)
        qx, qy, qz = canvas.qx[z0:z1], canvas.qy[z0:z1], canvas.qz[z0:z1][:, None, None]
        hu_c = canvas.hu[z0:z1]
        ddx, ddy = qx - cx_all[z0:z1, None, None], qy - cy_all[z0:z1, None, None]
        theta = np.arctan2(ddy, ddx)
        rho = np.hypot(ddx, ddy)
        del ddx, ddy
        fb = (theta + math.pi) / (2 * math.pi) * N_THETA - 0.5
        i0 = np.floor(fb).astype(np.int32)
        w = (fb - i0).astype(_F32)
        i0 %= N_THETA
        i1 = (i0 + 1) % N_THETA
        rows = np.arange(z1 - z0, dtype=np.int32)[:, None, None] * N_THETA
        r_flat = r_all[z0:z1].ravel()
        out = rho - ((1 - w) * r_flat[rows + i0] + w * r_flat[rows + i1])
        # Wall profiles by angle, looked up in fine tables (4 bins per cavity bin).
        fine_bin = np.clip(((theta + math.pi) * (4 * N_THETA / (2 * math.pi))).astype(np.int32), 0, 4 * N_THETA - 1)
        del fb, i0, i1, w, rho
        t_muscle, fat_end, flank = muscle_tab[fine_bin], fat_tab[fine_bin], flank_tab[fine_bin]
        fat_end = fat_end + back_all[z0:z1, None, None] * back_tab[fine_bin]
        if glute_all[z0:z1].any():
            glute = glute_all[z0:z1, None, None] * glute_tab[fine_bin]
            t_muscle, fat_end = t_muscle + glute, fat_end + glute
        on_table = qy > plan.table_y

        # Scanner table: carbon shell and foam core, curved, centred on the scanner's axis.
        tx = np.abs(qx - table_x)
        depth = qy - (plan.table_y + 0.0006 * tx * tx)
        shell = (depth >= 0) & (depth < 14) & (tx < 230)
        hu_c[shell] = hu["table_shell"]
        hu_c[shell & (depth >= 2) & (depth < 12)] = hu["table_core"]
        del tx, depth, shell

        body = (out < fat_end + plan.skin_mm) & ~on_table
        hu_c[body] = hu["skin"]
        fat = (out < fat_end) & ~on_table
        hu_c[fat] = hu["subcutaneous_fat"]
        muscle = (out < t_muscle) & ~on_table
        hu_c[muscle] = hu["muscle"]
        # Fat planes between the three flank muscles.
        planes = (np.abs(out - 0.36 * t_muscle) < 0.8) | (np.abs(out - 0.68 * t_muscle) < 0.8)
        hu_c[muscle & planes & flank] = hu["subcutaneous_fat"]
        if plan.arms is not None:
            _paint_arms(plan, hu, hu_c, body, qx, qy, qz, z0, z1, side_x)
        cavity = out < 0
        canvas.cavity[z0:z1] = cavity
        np.maximum(-out, 0.0, out=canvas.cavity_depth[z0:z1])
        hu_c[cavity] = hu["visceral_fat"]
        del planes, flank

        if float(qz.max()) > d_min:
            _paint_thorax(plan, hu, hu_c, cavity, qx, qy, qz)
        if float(qz.max()) >= lowest_rib:
            _paint_ribs(plan, hu, hu_c, out, theta, qz)
        if float(qz.min()) < plan.iliac_crest_z and plan.bifurcation_in_map:
            _paint_iliac(plan, hu, hu_c, out, theta, qz)


def _paint_arms(plan, hu, hu_c, body, qx, qy, qz, z0, z1, side_x) -> None:
    """Upper arms beside the flanks: skin, fat, muscle and a humerus (outside the trunk only)."""
    radius, gap, dy = plan.arms
    cy = np.interp(qz.ravel(), plan.z, plan.cy).astype(_F32)[:, None, None] + dy
    for a, sign in ((0, -1.0), (1, 1.0)):
        cx = side_x[z0:z1, a][:, None, None] + sign * (gap + radius)
        d = np.hypot(qx - cx, (qy - cy) * 1.2)
        arm = (d < radius) & ~body & (qy < plan.table_y)
        hu_c[arm] = hu["skin"]
        hu_c[arm & (d < radius - 2.0)] = hu["subcutaneous_fat"]
        hu_c[arm & (d < radius - 10.0)] = hu["muscle"]
        hu_c[arm & (d < 11.0)] = hu["cortical_bone"]
        hu_c[arm & (d < 7.0)] = hu["visceral_fat"]  # marrow


def _paint_thorax(plan, hu, hu_c, cavity, qx, qy, qz) -> None:
    """Diaphragm, lung bases with vessels, heart and the mediastinal fat above the domes."""
    dome = _sample_grid(plan.diaphragm, plan.diaphragm_axes, qx, qy)
    diaphragm = cavity & (qz > dome)
    hu_c[diaphragm] = hu["muscle"]
    thorax = cavity & (qz > dome + plan.diaphragm_mm)
    if not thorax.any():
        return
    # Dependent (posterior) lung is denser; small vessels are brighter dots.
    cy = np.interp(qz.ravel(), plan.z, plan.cy).astype(_F32)[:, None, None]
    gradient = np.clip((qy - cy) / 150.0, -1, 1) * 60.0
    lung = hu["lung"] + gradient
    hu_c[thorax] = lung[thorax]
    sx = np.interp(qz.ravel(), plan.z, plan.spine_x).astype(_F32)[:, None, None]
    sy = np.interp(qz.ravel(), plan.z, plan.spine_y).astype(_F32)[:, None, None]
    ry = np.interp(qz.ravel(), plan.z, plan.spine_ry).astype(_F32)[:, None, None]
    mediastinum = thorax & (np.abs(qx - sx - 8.0) < 32.0) & (qy < sy + 0.3 * ry) & (qy > sy - ry - 70.0)
    hu_c[mediastinum] = hu["visceral_fat"]
    oesophagus = thorax & (np.hypot(qx - sx - 4.0, qy - (sy - ry - 14.0)) < 8.0)
    hu_c[oesophagus] = hu["muscle"]
    c, r = plan.heart_centre, plan.heart_radii
    a = 0.5  # the heart's long axis points forward and to the left
    ex, ey = qx - c[0], qy - c[1]
    e = ((math.cos(a) * ex + math.sin(a) * ey) / r[0]) ** 2 + ((-math.sin(a) * ex + math.cos(a) * ey) / r[1]) ** 2
    e = e + ((qz - c[2]) / r[2]) ** 2
    heart = thorax & (e < 1.0)
    hu_c[thorax & (e < 1.25) & ~heart] = hu["visceral_fat"]  # epicardial and pericardial fat
    hu_c[heart] = hu["myocardium"]
    hu_c[heart & (e < 0.55)] = hu["heart"]


def _paint_ribs(plan, hu, hu_c, out, theta, qz) -> None:
    """Ribs inside the wall, descending toward the front; costal cartilage near the sternum."""
    rib_depth = 0.25 * plan.muscle_mm
    band = (out >= rib_depth) & (out < rib_depth + plan.rib_width)
    idx = np.nonzero(band)
    if idx[0].size == 0:
        return
    th = theta[idx]
    from_spine = _angle_from(th, math.pi / 2)  # 0 at the spine, pi at the sternum
    descent = plan.rib_drop * (from_spine / math.pi) ** 1.3
    zz = qz[idx[0], 0, 0]
    index_f = (plan.rib_top_z - descent - zz) / plan.rib_pitch + 4.0
    n = np.rint(index_f)
    dzr = (index_f - n) * plan.rib_pitch
    dr = out[idx] - (rib_depth + plan.rib_width / 2)
    e = (dzr / (plan.rib_height / 2)) ** 2 + (dr / (plan.rib_width / 2)) ** 2
    valid = (n >= 0) & (n < len(plan.rib_end_angle))
    end = plan.rib_end_angle[np.clip(n, 0, len(plan.rib_end_angle) - 1).astype(int)]
    rib = valid & (e < 1.0) & (from_spine > 0.35) & (from_spine < end)
    values = np.where(e < 0.4, hu["cancellous_bone"], hu["cortical_bone"])
    values = np.where(from_spine > 2.45, hu["cartilage"], values)
    hu_c[idx[0][rib], idx[1][rib], idx[2][rib]] = values[rib]


def _paint_iliac(plan, hu, hu_c, out, theta, qz) -> None:
    """Iliac wings: curved plates at the back of the pelvic wall, widening below the crest."""
    below = np.clip((plan.iliac_crest_z - qz) / 60.0, 0.0, 1.0)
    from_spine = _angle_from(theta, math.pi / 2)
    wing = (below > 0) & (qz > plan.iliac_crest_z - 110.0) & (from_spine > 0.45) & (from_spine < 0.75 + 0.7 * below) & (out > 2.0) & (out < 10.0)
    hu_c[wing] = hu["cancellous_bone"]
    hu_c[wing & ((out < 3.5) | (out > 8.5))] = hu["cortical_bone"]


def paint_psoas(canvas: Canvas, plan: BodyPlan, hu: dict[str, float]) -> None:
    """Psoas beside the lumbar vertebral bodies: from about the kidneys' upper poles, thickening caudally."""
    z_top = plan.z_hiatus - 25.0
    box = canvas.box((-1e4, -1e4, -1e4), (1e4, 1e4, z_top))
    if box is None:
        return
    qx, qy, qz = canvas.qx[box], canvas.qy[box], canvas.qz3(box)
    sx, sy = plan.at("spine_x", qz.ravel())[:, None, None], plan.at("spine_y", qz.ravel())[:, None, None]
    rx = plan.at("spine_rx", qz.ravel())[:, None, None]
    grow = np.clip((z_top - qz) / 140.0, 0.0, 1.0)
    radius = 4.0 + 18.0 * grow
    free = (canvas.label[box] == 0) & canvas.cavity[box]
    for side in (-1.0, 1.0):
        px = sx + side * (rx + 0.7 * radius + 4.0 * grow)
        inside = free & (((qx - px) / radius) ** 2 + ((qy - sy + 2.0) / (radius * 0.85)) ** 2 < 1.0)
        canvas.hu[box][inside] = hu["muscle"]


def paint_spine(canvas: Canvas, plan: BodyPlan, hu: dict[str, float]) -> None:
    """Vertebral bodies (cortex, cancellous core), discs, canal, arches and processes; never over an organ."""
    qz = canvas.qz
    sx, sy = plan.at("spine_x", qz)[:, None, None], plan.at("spine_y", qz)[:, None, None]
    rx, ry = plan.at("spine_rx", qz)[:, None, None], plan.at("spine_ry", qz)[:, None, None]
    lo = (float((sx - 90).min()), float((sy - ry - 10).min()), -1e4)
    hi = (float((sx + 90).max()), float((sy + ry + 2 * plan.canal_mm + 60).max()), 1e4)
    box = canvas.box(lo, hi)
    if box is None:
        return
    qx, qy, z3 = canvas.qx[box] - sx[box[0]], canvas.qy[box] - sy[box[0]], canvas.qz3(box)
    rx, ry = rx[box[0]], ry[box[0]]
    phase = np.mod(z3 - plan.vertebra_phase, plan.vertebra_pitch)
    in_body = phase >= plan.disc_mm
    e = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2)
    column = e < 1.0
    shell = e > 1.0 - plan.cortex_mm / ry
    endplates = (phase < plan.disc_mm + plan.cortex_mm) | (phase > plan.vertebra_pitch - plan.cortex_mm)
    cortical = column & in_body & (shell | endplates)
    yk = ry + plan.canal_mm + 2.0
    rc = np.hypot(qx, qy - yk)
    height = plan.vertebra_pitch - plan.disc_mm
    arch_band = (phase >= plan.disc_mm + 2.0) & (phase < plan.disc_mm + 0.6 * height)
    arch = arch_band & (rc >= plan.canal_mm) & (rc < plan.canal_mm + 6.0) & (qy > yk - plan.canal_mm)
    sp_phase = np.mod(z3 - plan.vertebra_phase + 0.45 * (qy - yk), plan.vertebra_pitch)  # slopes caudally
    spinous = (
        (sp_phase >= plan.disc_mm + 2.0) & (sp_phase < plan.disc_mm + 0.6 * height)
        & (np.abs(qx) < 3.5) & (qy > yk + plan.canal_mm) & (qy < yk + plan.canal_mm + 38.0)
    )
    tp_len = 20.0 + 14.0 * np.clip((plan.z_hiatus - z3) / 150.0, 0.0, 1.0)  # long lumbar transverse processes
    a = np.abs(qx)
    transverse = (
        (phase >= plan.disc_mm + 5.0) & (phase < plan.disc_mm + 12.0)
        & (a >= plan.canal_mm + 2.0) & (a < plan.canal_mm + 2.0 + tp_len) & (np.abs(qy - (yk - 3.0)) < 3.5)
    )
    canal = rc < plan.canal_mm
    free = canvas.label[box] == 0
    hu_b = canvas.hu[box]
    posterior = (arch | spinous | transverse) & free
    hu_b[posterior] = 0.7 * hu["cortical_bone"]
    hu_b[canal & free] = hu["csf"]
    hu_b[column & ~in_body & free] = hu["disc"]
    hu_b[column & in_body & free] = hu["cancellous_bone"]
    hu_b[cortical & free] = hu["cortical_bone"]


def paint_pelvis(canvas: Canvas, plan: BodyPlan, hu: dict[str, float]) -> None:
    """Femoral heads, necks and shafts, acetabula, pubic and ischial rami; never over an organ."""
    if not plan.bifurcation_in_map or float(canvas.qz.min()) > plan.hip_z + plan.hip_r + 40.0:
        return
    box = canvas.box((-1e4, -1e4, -1e4), (1e4, 1e4, plan.hip_z + plan.hip_r + 40.0))
    if box is None:
        return
    p = canvas.points(box)
    sx, sy = float(np.interp(plan.hip_z, plan.z, plan.spine_x)), float(np.interp(plan.hip_z, plan.z, plan.spine_y))
    r = plan.hip_r
    cortical = np.zeros(p.shape[1:], bool)
    bone = np.zeros(p.shape[1:], bool)
    symphysis = np.array([sx, sy - plan.hip_front - 55.0, plan.hip_z - 25.0])
    for side in (-1.0, 1.0):
        c = np.array([sx + side * plan.hip_dx, sy - plan.hip_front, plan.hip_z])
        parts = [
            (_Ellipsoid(c, (r, r, r)), 2.5),  # femoral head
            (_Tube([c, c + [side * 35.0, 5.0, -35.0], c + [side * 42.0, 10.0, -260.0]], [0.6 * r, 15.0, 13.0]), 3.0),
            (_Tube([c + [-side * 12.0, -12.0, -8.0], symphysis + [side * 8.0, 0.0, 0.0]], [11.0, 9.0]), 2.0),  # pubis
            (_Tube([c + [-side * 4.0, 10.0, -10.0], c + [-side * 10.0, 28.0, -55.0]], [13.0, 11.0]), 2.5),  # ischium
        ]
        for shape, shell in parts:
            sd = shape.sdf(p)
            bone |= sd < 0
            cortical |= (sd < 0) & (sd > -shell)
        d = np.sqrt(((p - c.astype(np.float32)[:, None, None, None]) ** 2).sum(axis=0))
        acetabulum = (d > r + 1.5) & (d < r + 7.0) & (side * (p[0] - c[0]) < 8.0)  # the socket's medial rim
        bone |= acetabulum
        cortical |= acetabulum & (d < r + 3.5)
    free = canvas.label[box] == 0
    hu_b = canvas.hu[box]
    hu_b[bone & free] = hu["cancellous_bone"]
    hu_b[cortical & free] = hu["cortical_bone"]
