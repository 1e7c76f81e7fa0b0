"""What lies in and between the labelled organs: their inner structure, the unlabelled vessels and bowel.

All of it is derived from the real label map (positions in its LPS frame) and painted on the scan:

* kidneys: cortex, medullary pyramids and the renal sinus (fat, pelvis and calyces) inside each kidney
  label, the sinus opening toward the midline;
* liver: portal branches from the hilum and hepatic veins from the IVC, inside the liver label;
* stomach: wall, fluid or food, and gas rising to the front (the patient lies supine);
* gallbladder: bile with a thin wall; pancreas: lobulated with fat clefts; spleen: arciform in the
  arterial phase; aorta: the odd calcified plaque;
* unlabelled vessels (painted only outside the labels, except portal branches inside the liver): the IVC
  right of the aorta, renal veins (the left one in front of the aorta) and arteries, the portal vein from
  behind the pancreatic neck to the liver hilum, the splenic vein along the back of the pancreas, the
  superior mesenteric vessels and the iliac vessels below the bifurcation;
* bowel in the free abdominal space (never within a few mm of an organ, closer to the kidneys only
  through perirenal fat): a colon frame along the flanks and under the liver and spleen, and small-bowel
  loops with fluid, gas, sometimes positive oral contrast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..phantoms import AORTA, GALLBLADDER, LIVER, PANCREAS, SPLEEN, STOMACH, _Tube
from .anatomy import Coarse
from .body import KIDNEYS, BodyPlan, _sample_grid
from .canvas import Canvas
from .intensities import SmoothField

_F32 = np.float32


@dataclass
class Vessel:
    """A tube (polyline ``points`` (N, 3) mm, ``radii`` per point) filled with ``tissue``.

    It is painted on unlabelled voxels, and also inside the liver label when ``in_liver`` (keeping it liver).
    """

    name: str
    points: np.ndarray
    radii: np.ndarray
    tissue: str
    in_liver: bool = False


@dataclass
class OrganPlan:
    vessels: list[Vessel] = field(default_factory=list)
    kidney_cortex_mm: float = 6.0
    stomach_wall_mm: float = 4.0
    stomach_gas: float = 0.2
    stomach_food: bool = False
    oral_contrast: float | None = None
    calcified: bool = False
    pancreas_fat: float = 1.6
    # Fatty infiltration (pancreatic steatosis/lipomatosis): this share of the pancreas becomes fat lobules.
    pancreas_fat_fraction: float = 0.0
    bowel_fill: float = 0.0
    bowel_gas: float = 2.5
    colon_radius: float = 20.0
    colon_path: np.ndarray | None = None
    colon_gas: float = 0.5
    small_bowel_top: float = 0.0
    bladder: tuple | None = None  # (centre, radii, contrast fraction)
    info: dict = field(default_factory=dict)


def _pick(rng: np.random.Generator, points: np.ndarray, n: int) -> np.ndarray:
    return points[rng.integers(0, len(points), n)] if len(points) else np.zeros((0, 3))


def _line(plan: BodyPlan, name: str, z: float) -> float:
    return float(np.interp(z, plan.z, getattr(plan, name)))


def plan_organs(coarse: Coarse, body: BodyPlan, rng: np.random.Generator) -> OrganPlan:
    """Draws the unlabelled structures' paths and the organs' inner parameters. Fixed ``rng`` order."""
    u = rng.uniform
    plan = OrganPlan(
        kidney_cortex_mm=u(4.5, 8.0), stomach_wall_mm=u(3, 6), stomach_gas=u(0.0, 0.5) if rng.random() < 0.7 else 0.0,
        stomach_food=bool(rng.random() < 0.3), oral_contrast=u(150, 400) if rng.random() < 0.15 else None,
        calcified=bool(rng.random() < 0.4), pancreas_fat=u(1.1, 2.2), bowel_fill=u(-0.7, 0.2), bowel_gas=u(1.8, 3.0),
        colon_radius=u(15, 25), colon_gas=u(0.2, 0.9) if rng.random() < 0.7 else 0.0,
    )
    z_lo, z_hi = float(body.z[0]), float(body.z[-1])
    r_ivc = u(9, 13)
    ivc_dx = u(4, 10)
    liver = coarse.z_range(LIVER)
    z_ivc_top = liver[1] - u(5, 20) if liver else z_hi

    def ivc_at(z: float) -> np.ndarray:
        """IVC centre: right of the aorta in front of the spine, turning forward into the liver's bare area."""
        x = _line(body, "aorta_x", z) - _line(body, "aorta_r", z) - r_ivc - ivc_dx
        y = _line(body, "aorta_y", z)
        rise = np.clip((z - body.z_hiatus + 20.0) / 60.0, 0.0, 1.0)
        return np.array([x - 8.0 * rise, y - 22.0 * rise, z])

    ivc_z = np.linspace(min(body.z_bifurcation - 15.0, z_lo - 20.0) if not body.bifurcation_in_map else body.z_bifurcation - 15.0, z_ivc_top, 8)
    ivc = np.array([ivc_at(z) for z in ivc_z])
    # Kidney hila: the kidney voxel nearest the midline in the kidney's middle third, 5 mm further in.
    hila = {}
    renal_z = []
    for label in KIDNEYS:
        pts = coarse.points(label)
        if len(pts) < 10:
            continue
        z0, z1 = np.percentile(pts[:, 2], [33, 67])
        mid = pts[(pts[:, 2] >= z0) & (pts[:, 2] <= z1)]
        ax = _line(body, "aorta_x", float(np.median(mid[:, 2])))
        hilum = mid[np.argmin(np.abs(mid[:, 0] - ax))].copy()
        hilum[0] += 5.0 * np.sign(ax - hilum[0])
        hila[label] = (hilum, pts.mean(axis=0))
        renal_z.append(hilum[2])
    for label, (hilum, _) in hila.items():
        z = hilum[2]
        ax, ay, ar = _line(body, "aorta_x", z), _line(body, "aorta_y", z), _line(body, "aorta_r", z)
        target = ivc_at(z + 5.0)
        if label == KIDNEYS[1]:  # the left renal vein crosses in front of the aorta
            path = np.array([hilum, [ax, ay - ar - 6.0, z + 4.0], target])
        else:
            path = np.array([hilum, target])
        plan.vessels.append(Vessel("renal vein", path, np.full(len(path), u(4, 6)), "renal_vein"))
        artery = np.array([hilum + [0, 6.0, -4.0], [ax, ay, z - 6.0]])
        plan.vessels.append(Vessel("renal artery", artery, np.array([2.5, 3.5]), "aorta"))
    z_renal = max(renal_z) if renal_z else body.z_hiatus - 40.0
    below = ivc[:, 2] < z_renal
    if below.any():
        plan.vessels.append(Vessel("infrarenal IVC", ivc[: int(below.sum()) + 1], np.full(int(below.sum()) + 1, r_ivc), "ivc_infrarenal"))
    plan.vessels.append(Vessel("IVC", ivc[max(int(below.sum()) - 1, 0):], np.full(len(ivc) - max(int(below.sum()) - 1, 0), r_ivc), "ivc"))

    # Portal system: confluence behind the pancreatic neck, right of the superior mesenteric artery.
    pancreas = coarse.points(PANCREAS)
    if len(pancreas) >= 10:
        zp = float(np.median(pancreas[:, 2]))
        ax, ay, ar = _line(body, "aorta_x", zp), _line(body, "aorta_y", zp), _line(body, "aorta_r", zp)
        neck = pancreas[np.abs(pancreas[:, 0] - (ax - 12.0)) < 12.0]
        neck = neck if len(neck) else pancreas
        confluence = np.array([ax - 12.0, min(float(neck[:, 1].max()) + 4.0, ay - ar - 8.0), float(np.median(neck[:, 2]))])
        # Splenic vein along the back of the pancreas body and tail.
        bins = np.arange(confluence[0], pancreas[:, 0].max() + 1.0, 15.0)
        path = [confluence]
        for x0 in bins[1:]:
            sel = pancreas[(pancreas[:, 0] >= x0 - 7.5) & (pancreas[:, 0] < x0 + 7.5)]
            if len(sel):
                path.append([x0, float(sel[:, 1].max()) + 3.0, float(sel[:, 2].mean())])
        if len(path) > 1:
            plan.vessels.append(Vessel("splenic vein", np.array(path), np.full(len(path), u(3.5, 5)), "portal_vein"))
        smv = np.array([confluence, confluence + [-3.0, -6.0, -60.0], confluence + [-8.0, -10.0, -130.0]])
        plan.vessels.append(Vessel("superior mesenteric vein", smv, np.array([6.0, 5.0, 4.0]), "portal_vein"))
        sma_top = np.array([ax, ay - ar + 2.0, confluence[2] + 12.0])
        sma = np.array([sma_top, sma_top + [0.0, -14.0, -14.0], sma_top + [-2.0, -20.0, -80.0], sma_top + [-6.0, -24.0, -150.0]])
        plan.vessels.append(Vessel("superior mesenteric artery", sma, np.array([3.8, 3.5, 3.0, 2.5]), "aorta"))
    else:
        z_mid = float(np.mean(renal_z)) + 25.0 if renal_z else body.z_hiatus - 20.0
        confluence = ivc_at(z_mid) + [10.0, -25.0, 0.0]
    liver_pts = coarse.points(LIVER)
    if len(liver_pts) >= 10:
        nearest = liver_pts[np.argmin(np.linalg.norm(liver_pts - confluence, axis=1))]
        direction = (nearest - confluence) / max(np.linalg.norm(nearest - confluence), 1.0)
        hilum = nearest + 15.0 * direction
        plan.vessels.append(Vessel("portal vein", np.array([confluence, nearest, hilum]), np.full(3, u(6, 8)), "portal_vein", True))
        for target in _pick(rng, liver_pts, int(rng.integers(6, 11))):
            length = np.linalg.norm(target - hilum)
            end = hilum + (target - hilum) * min(1.0, 90.0 / max(length, 1.0))
            plan.vessels.append(Vessel("portal branch", np.array([hilum, end]), np.array([u(3.5, 5.5), 1.5]), "portal_vein", True))
        upper = liver_pts[liver_pts[:, 2] > np.percentile(liver_pts[:, 2], 55)]
        root = ivc_at(z_ivc_top - 10.0)
        for target in _pick(rng, upper, int(rng.integers(3, 5))):
            plan.vessels.append(Vessel("hepatic vein", np.array([root, target]), np.array([u(4, 6), 1.5]), "hepatic_vein", True))

    # Iliac vessels below the bifurcation.
    if body.bifurcation_in_map:
        zb = body.z_bifurcation
        bif = np.array([_line(body, "aorta_x", zb), _line(body, "aorta_y", zb), zb])
        conf = ivc[0]
        for side in (-1.0, 1.0):
            spread = np.array([side * u(35, 50), u(5, 20), -80.0])
            plan.vessels.append(Vessel("common iliac artery", np.array([bif, bif + spread]), np.array([7.0, 5.5]), "aorta"))
            plan.vessels.append(Vessel("common iliac vein", np.array([conf, conf + spread + [0, 8.0, 0]]), np.array([8.0, 7.0]), "ivc_infrarenal"))

    # Colon: ascending along the right flank, transverse under the liver and across the front, descending on the left.
    spleen = coarse.z_range(SPLEEN)
    kid = [coarse.z_range(k) for k in KIDNEYS if coarse.z_range(k)]
    z_hf = (liver[0] if liver else (np.mean([k[0] for k in kid]) if kid else z_lo)) + u(0, 25)
    z_sf = (spleen[0] if spleen else z_hf) + u(0, 25)
    z_b = z_lo - 60.0
    rc = plan.colon_radius
    theta_a, theta_d = math.pi - u(0.25, 0.6), u(0.25, 0.6)

    def at(theta: float, z: float, inset: float) -> list[float]:
        zc = float(np.clip(z, z_lo, z_hi))
        r = float(np.interp(theta, _THETA, body.cavity_radius(np.array([zc]))[0], period=2 * math.pi)) - rc - inset
        return [_line(body, "cx", zc) + r * math.cos(theta), _line(body, "cy", zc) + r * math.sin(theta), z]

    path = [at(theta_a, z, 6.0) for z in np.linspace(z_b, z_hf, 4)]
    sag = u(20, 70)
    sweep = 2 * math.pi - (theta_a - theta_d)
    for t in np.linspace(0.1, 0.9, 7):
        z = z_hf + t * (z_sf - z_hf) - sag * math.sin(math.pi * t)
        path.append(at(theta_a + t * sweep, z, u(8, 25)))
    path += [at(theta_d, z, 6.0) for z in np.linspace(z_sf, z_b, 4)]
    plan.colon_path = np.array(path)
    pancreas_top = coarse.z_range(PANCREAS)
    plan.small_bowel_top = (pancreas_top[1] if pancreas_top else z_hf) + u(-10, 25)
    if body.bifurcation_in_map:
        sx, sy = _line(body, "spine_x", body.hip_z), _line(body, "spine_y", body.hip_z)
        centre = np.array([sx, sy - body.hip_front - u(55, 75), body.hip_z + u(10, 30)])
        plan.bladder = (centre, np.array([u(30, 55), u(25, 45), u(25, 45)]), u(0.2, 0.6))
    plan.info = {"kidney_hila": len(hila), "vessels": len(plan.vessels)}
    return plan


_THETA = -math.pi + (np.arange(180) + 0.5) * 2 * math.pi / 180


def _depth_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it (the box edge counts as outside)."""
    padded = np.pad(mask, 1)
    d = ndimage.distance_transform_edt(padded, sampling=(spacing[2], spacing[1], spacing[0]))
    return d[1:-1, 1:-1, 1:-1].astype(_F32)


def _label_box(label: np.ndarray, value: int):
    idx = np.nonzero((label == value).any(axis=(1, 2)))[0]
    if idx.size == 0:
        return None
    rows = np.nonzero((label[idx[0] : idx[-1] + 1] == value).any(axis=(0, 2)))[0]
    cols = np.nonzero((label[idx[0] : idx[-1] + 1] == value).any(axis=(0, 1)))[0]
    return slice(idx[0], idx[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def paint_vessels(canvas: Canvas, plan: OrganPlan, hu: dict[str, float]) -> None:
    """Tubes on unlabelled voxels (and inside the liver where allowed); the label map is left as it is."""
    for v in plan.vessels:
        r = float(v.radii.max())
        box = canvas.box(v.points.min(axis=0) - r - 2.0, v.points.max(axis=0) + r + 2.0)
        if box is None:
            continue
        inside = _Tube(v.points, v.radii).sdf(canvas.points(box)) < 0
        lab = canvas.label[box]
        allowed = (lab == 0) | ((lab == LIVER) if v.in_liver else False)
        inside &= allowed & (canvas.cavity[box] | (lab == LIVER))
        canvas.hu[box][inside] = hu[v.tissue]


def paint_organs(
    canvas: Canvas, plan: OrganPlan, body: BodyPlan, hu: dict[str, float], phase: str,
    rng: np.random.Generator, fine: SmoothField, coarse_field: SmoothField,
) -> None:
    """Each labelled organ's HU, texture and inner structure (labels unchanged); before the vessels."""
    lab = canvas.label
    for value, tissue in ((SPLEEN, "spleen"), (LIVER, "liver"), (PANCREAS, "pancreas"), (AORTA, "aorta"), (GALLBLADDER, "gallbladder")):
        box = _label_box(lab, value)
        if box is None:
            continue
        m = lab[box] == value
        hu_b = canvas.hu[box]
        qx, qy, qz = canvas.qx[box], canvas.qy[box], np.broadcast_to(canvas.qz3(box), m.shape)
        if value == LIVER:
            hu_b[m] = hu["liver"] + 4.0 * coarse_field.at(qx[m], qy[m], qz[m])
        elif value == SPLEEN:
            amp = 28.0 if phase == "arterial" else 3.0  # arciform enhancement (Glazer)
            hu_b[m] = hu["spleen"] + amp * coarse_field.at(qx[m] + 500.0, qy[m], qz[m])
        elif value == PANCREAS:
            t = fine.at(qx[m], qy[m], qz[m])
            values = hu["pancreas"] + 5.0 * t
            clefts = t > plan.pancreas_fat
            values[clefts] = 0.5 * (hu["pancreas"] + hu["visceral_fat"])
            if plan.pancreas_fat_fraction > 0 and t.size:
                # Fat replacing the parenchyma between lobules: the texture's highest share of voxels.
                fat = t > np.quantile(t, 1.0 - plan.pancreas_fat_fraction)
                values[fat] = hu["visceral_fat"]
            hu_b[m] = values
        elif value == AORTA:
            hu_b[m] = hu["aorta"]
            if plan.calcified:
                depth = _depth_mm(m, canvas.spacing)
                plaque = m & (depth < 2.5) & (fine.at(qx + 900.0, qy, qz) > 2.0)
                hu_b[plaque] = rng.uniform(400, 900)
        else:  # gallbladder: bile in a thin enhancing wall
            depth = _depth_mm(m, canvas.spacing)
            hu_b[m] = hu["gallbladder"]
            hu_b[m & (depth < 1.5)] = 0.7 * hu["gut_wall"]
    _paint_stomach(canvas, plan, hu, fine)
    for value in KIDNEYS:
        _paint_kidney(canvas, value, plan, body, hu, fine)


@dataclass
class _Region:
    """One organ's bounding box on the scan: its mask, HU view, depth below its surface (mm), positions."""

    mask: np.ndarray
    hu: np.ndarray
    depth: np.ndarray
    qx: np.ndarray
    qy: np.ndarray
    qz: np.ndarray


def _region(canvas: Canvas, value: int) -> _Region | None:
    box = _label_box(canvas.label, value)
    if box is None:
        return None
    m = canvas.label[box] == value
    return _Region(
        m, canvas.hu[box], _depth_mm(m, canvas.spacing), canvas.qx[box], canvas.qy[box],
        np.broadcast_to(canvas.qz3(box), m.shape),
    )


def _paint_stomach(canvas: Canvas, plan: OrganPlan, hu, fine: SmoothField) -> None:
    r = _region(canvas, STOMACH)
    if r is None:
        return
    m, hu_b, depth, qx, qy, qz = r.mask, r.hu, r.depth, r.qx, r.qy, r.qz
    lumen = m & (depth >= plan.stomach_wall_mm)
    if plan.oral_contrast is not None:
        content = np.full(int(lumen.sum()), plan.oral_contrast, _F32)
    elif plan.stomach_food:
        content = 35.0 + 30.0 * fine.at(qx[lumen] + 300.0, qy[lumen], qz[lumen])
    else:
        content = np.full(int(lumen.sum()), hu["fluid"], _F32)
    hu_b[m] = hu["gut_wall"]
    hu_b[lumen] = content
    if plan.stomach_gas > 0:
        ys = qy[m]
        level = float(ys.min() + plan.stomach_gas * (ys.max() - ys.min()))
        hu_b[lumen & (qy < level)] = -1000.0


def _paint_kidney(canvas: Canvas, value: int, plan: OrganPlan, body: BodyPlan, hu, fine: SmoothField) -> None:
    """Cortex, pyramids and a sinus (fat, pelvis) opening toward the midline; urine is bright when excreted."""
    r = _region(canvas, value)
    if r is None:
        return
    m, hu_b, depth, qx, qy, qz = r.mask, r.hu, r.depth, r.qx, r.qy, r.qz
    cx, cy, cz = float(qx[m].mean()), float(qy[m].mean()), float(qz[m].mean())
    half_len = max(float(qz[m].max() - qz[m].min()) / 2.0, 10.0)
    ax = _line(body, "aorta_x", cz)
    medial = 1.0 if ax > cx else -1.0
    # The sinus: an ellipsoid near the hilum (medial and a little anterior of the kidney's centre).
    # Sized by the kidney's in-plane extent: about a third of its width, half its length.
    width = max(float(np.percentile(qx[m], 95) - np.percentile(qx[m], 5)), 20.0)
    depth_y = max(float(np.percentile(qy[m], 95) - np.percentile(qy[m], 5)), 20.0)
    sx, sy = cx + medial * 0.25 * width, cy - 0.08 * depth_y
    e = ((qx - sx) / (0.32 * width)) ** 2 + ((qy - sy) / (0.25 * depth_y)) ** 2 + ((qz - cz) / (0.5 * half_len)) ** 2
    sinus = m & (e < 1.0) & (depth > 0.6 * plan.kidney_cortex_mm)
    pelvis = sinus & (((qx - sx - medial * 3.0) / 9.0) ** 2 + ((qy - sy) / 6.0) ** 2 + ((qz - cz) / (0.4 * half_len)) ** 2 < 1.0)
    calyces = sinus & (fine.at(qx + 200.0, qy, qz) > 1.0)
    pyramids = m & ~sinus & (depth > plan.kidney_cortex_mm) & (fine.at(qx - 200.0, qy, qz) > -0.3)
    hu_b[m] = hu["kidney_cortex"]
    hu_b[pyramids] = hu["kidney_medulla"]
    hu_b[sinus] = hu["visceral_fat"]
    hu_b[pelvis | calyces] = hu["urine"]


def paint_bowel(canvas: Canvas, plan: OrganPlan, body: BodyPlan, hu: dict[str, float], distance: "OrganDistance", loops: SmoothField, detail: SmoothField, density: SmoothField) -> None:
    """Colon and small-bowel loops in free abdominal space below the diaphragm."""
    free = canvas.cavity & (canvas.label == 0)
    k, j, i = np.nonzero(free)
    if k.size == 0:
        return
    qx, qy, qz = canvas.qx[k, j, i], canvas.qy[k, j, i], canvas.qz[k]
    # Room (mm) to the nearest thing bowel must not cross: an organ (perirenal fat around the kidneys), the
    # wall, the diaphragm, the spine with the psoas and great vessels. Loops close with a wall before it.
    d_any, d_kidney = distance.at(qx, qy, qz)
    room = np.minimum(d_any - 3.0, d_kidney - 9.0)
    room = np.minimum(room, canvas.cavity_depth[k, j, i] - 2.0)
    room = np.minimum(room, _sample_grid(body.diaphragm, body.diaphragm_axes, qx, qy) - 8.0 - qz)
    sx, sy = body.at("spine_x", qz), body.at("spine_y", qz)
    room = np.minimum(room, np.maximum(np.abs(qx - sx) - 55.0, sy - body.at("spine_ry", qz) - 30.0 - qy))
    keep = room > 0
    k, j, i, qx, qy, qz, room = (a[keep] for a in (k, j, i, qx, qy, qz, room))
    if k.size == 0:
        return
    values = np.full(k.size, np.nan, _F32)

    # Small bowel: the high set of a band-limited field forms packed loops; its rim is the wall.
    f = loops.at(qx, qy, qz) - 2.0 * np.clip((4.0 - room) / 4.0, 0.0, 1.0)
    h = density.at(qx, qy, qz)
    t = plan.bowel_fill + 0.6 * h
    allowed = qz < plan.small_bowel_top
    lumen = allowed & (f > t)
    wall = allowed & (f > t - 0.3) & ~lumen
    g = detail.at(qx, qy, qz)
    if plan.oral_contrast is not None:
        # Oral contrast fills whole stretches of bowel (those it has reached), not single voxels.
        content = np.where(h > -0.3, plan.oral_contrast + 15.0 * g, hu["fluid"] + 10.0 * g)
    else:
        content = hu["fluid"] + 10.0 * g
    values[lumen] = content[lumen]
    values[lumen & (g > plan.bowel_gas)] = -1000.0
    values[wall] = hu["gut_wall"]

    # Colon: stool (gas mottled with faecal matter), gas rising to the front, thin wall.
    near = np.all((np.stack([qx, qy, qz], 1) > plan.colon_path.min(0) - plan.colon_radius - 5) & (np.stack([qx, qy, qz], 1) < plan.colon_path.max(0) + plan.colon_radius + 5), axis=1)
    if near.any():
        idx = np.nonzero(near)[0]
        sd = _Tube(plan.colon_path, np.full(len(plan.colon_path), plan.colon_radius)).sdf(np.stack([qx[idx], qy[idx], qz[idx]]).astype(_F32))
        sd = np.maximum(sd, 2.0 - room[idx])  # the colon's wall closes before the room ends
        colon = sd < 0
        inner = sd < -2.0
        stool = np.where(g[idx] > 0.7, -700.0 + 200.0 * g[idx], -40.0 + 40.0 * g[idx])
        cy = body.at("cy", qz[idx])
        gas = inner & (qy[idx] < cy - (1.0 - plan.colon_gas) * 80.0) if plan.colon_gas > 0 else np.zeros_like(inner)
        colon_values = np.where(inner, np.where(gas, -1000.0, stool), hu["gut_wall"])
        values[idx[colon]] = colon_values[colon]
    painted = ~np.isnan(values)
    canvas.hu[k[painted], j[painted], i[painted]] = values[painted]
    if plan.bladder is not None:
        _paint_bladder(canvas, plan, hu)


def _paint_bladder(canvas: Canvas, plan: OrganPlan, hu: dict[str, float]) -> None:
    """Urine in a thin muscular wall above the pubis; excreted contrast layers at the back when delayed."""
    centre, radii, layer = plan.bladder
    box = canvas.box(centre - radii - 3.0, centre + radii + 3.0)
    if box is None:
        return
    p = canvas.points(box)
    e = np.sqrt(sum(((p[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))
    free = (canvas.label[box] == 0) & canvas.cavity[box]
    hu_b = canvas.hu[box]
    hu_b[free & (e < 1.0)] = hu["muscle"]
    lumen = free & (e < 1.0 - 3.0 / radii.min())
    hu_b[lumen] = hu["urine"] if hu["urine"] < 100 else hu["fluid"]
    if hu["urine"] >= 100:  # excreted contrast is heavier than urine: it lies posterior (dependent)
        hu_b[lumen & (p[1] > centre[1] + radii[1] * (1.0 - 2.0 * layer))] = hu["urine"]


class OrganDistance:
    """Distance (mm) to the nearest organ and to the nearest kidney, tabulated on the coarse grid."""

    def __init__(self, coarse: Coarse):
        spacing = (
            float(abs(coarse.z[1] - coarse.z[0])) if len(coarse.z) > 1 else 3.0,
            float(abs(coarse.y[1] - coarse.y[0])),
            float(abs(coarse.x[1] - coarse.x[0])),
        )
        self.coarse = coarse
        self.any = ndimage.distance_transform_edt(coarse.labels == 0, sampling=spacing).astype(_F32)
        self.kidney = ndimage.distance_transform_edt(~np.isin(coarse.labels, KIDNEYS), sampling=spacing).astype(_F32)

    def at(self, x, y, z) -> tuple[np.ndarray, np.ndarray]:
        c = self.coarse
        coords = np.stack([
            (z - c.z[0]) / (c.z[1] - c.z[0]) if len(c.z) > 1 else np.zeros_like(z),
            (y - c.y[0]) / (c.y[1] - c.y[0]),
            (x - c.x[0]) / (c.x[1] - c.x[0]),
        ])
        return (
            ndimage.map_coordinates(self.any, coords, order=1, mode="nearest"),
            ndimage.map_coordinates(self.kidney, coords, order=1, mode="nearest"),
        )
