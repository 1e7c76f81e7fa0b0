"""CT-like volumes around real organ label maps: ``SynthGenerator`` and the nnU-Net data set writer.

A case is deterministic in (seed, index): ``numpy.random.default_rng([seed, index])`` draws, in a fixed
order, the body (:mod:`.body`), the unlabelled structures and organ interiors (:mod:`.organs`), the field of
view and scanner (:mod:`.scanner`), the contrast phase and HU (:mod:`.intensities`) and a small smooth
deformation. Case ``index`` uses map ``maps[perm[index % n]]`` of the split, ``perm`` a seeded permutation,
so consecutive cases go through every map before reusing one.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ...errors import InputError
from ...labels import CLASS_NAMES, ORGANS
from ...volume import Geometry, Volume
from ..phantoms import _manifest as _phantom_manifest
from ..phantoms import _write_image, _write_json
from .anatomy import AnatomyMap, Coarse, read_map, split_maps
from .body import paint_pelvis, paint_psoas, paint_spine, paint_wall, plan_body
from .canvas import Canvas, Deformation
from .intensities import PHASE_WEIGHTS, PHASES, SmoothField, draw_hu
from .organs import OrganDistance, paint_bowel, paint_organs, paint_vessels, plan_organs
from .scanner import FOV_KINDS, FOV_WEIGHTS, acquire, draw_acquisition, resample_labels

logger = logging.getLogger(__name__)

DEFAULT_ANATOMY = Path("../shared/data/anatomy-labels")
DEFAULT_IN_PLANE = 256
DEFAULT_MAX_SLICES = 192
MIN_IN_PLANE = 32
MIN_SLICES = 8
#: A fatty pancreas has this share of its volume (uniform draw) replaced by fat lobules: from visible interlobular
#: fat to marked lipomatosis. At 40 HU parenchyma and -95 HU fat, 0.35 gives a mean near -7 HU, the pancreas of
#: the real non-contrast CT in ``../shared/data/real-ct/`` (5th-95th percentile -53 to 37 HU).
FATTY_PANCREAS_FRACTION = (0.2, 0.6)


@dataclass
class SynthCase:
    """One synthetic CT: ``image`` (int16 HU) and ``label`` (uint8 0..8) on one grid, how it was drawn
    (``info``, the synth_info.json entry) and the ``deformation`` taking its voxels to the map's frame."""

    image: Volume
    label: Volume
    info: dict
    deformation: Deformation


@functools.lru_cache(maxsize=2)
def _analysed(path: Path) -> tuple[AnatomyMap, Coarse, OrganDistance]:
    anatomy = read_map(path)
    coarse = Coarse.of(anatomy)
    return anatomy, coarse, OrganDistance(coarse)


def _check_share(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0.0 <= float(value) <= 1.0:
        raise InputError(f"The {name} must be a number from 0 to 1, got {value!r}.")
    return float(value)


def _check_int(value, name: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise InputError(f"The {name} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


class SynthGenerator:
    """Synthetic CT around the real label maps of one split; ``generate(i)`` is deterministic in (seed, i).

    ``phases`` / ``fovs`` restrict the contrast phases / fields of view drawn (default: all, with the
    weights of :data:`.intensities.PHASE_WEIGHTS` and :data:`.scanner.FOV_WEIGHTS`). ``in_plane`` and
    ``max_slices`` cap the matrix: larger scans get coarser pixels or slices (``capped`` in the info).
    ``fatty_pancreas``: the share of cases whose pancreas has fatty infiltration (fat lobules replacing
    :data:`FATTY_PANCREAS_FRACTION` of it, common in older adults: a non-contrast mean near 0 HU or below);
    drawn from a second stream, so every other draw of a case is the same whatever this share.
    """

    def __init__(
        self,
        anatomy_dir: str | os.PathLike = DEFAULT_ANATOMY,
        seed: int = 0,
        split: str = "train",
        *,
        phases: Sequence[str] | None = None,
        fovs: Sequence[str] | None = None,
        in_plane: int = DEFAULT_IN_PLANE,
        max_slices: int = DEFAULT_MAX_SLICES,
        fatty_pancreas: float = 0.0,
    ):
        self.seed = _check_int(seed, "seed", 0)
        self.fatty_pancreas = _check_share(fatty_pancreas, "share of cases with a fatty pancreas")
        self.in_plane = _check_int(in_plane, "in-plane size", MIN_IN_PLANE)
        self.max_slices = _check_int(max_slices, "largest slice count", MIN_SLICES)
        self.phases = tuple(phases) if phases else PHASES
        self.fovs = tuple(fovs) if fovs else FOV_KINDS
        for p in self.phases:
            if p not in PHASES:
                raise InputError(f"Unknown contrast phase '{p}'; use one of {', '.join(PHASES)}.")
        for f in self.fovs:
            if f not in FOV_KINDS:
                raise InputError(f"Unknown field of view '{f}'; use one of {', '.join(FOV_KINDS)}.")
        self.split = split
        self.maps = split_maps(anatomy_dir, split)
        self.order = np.random.default_rng([self.seed, 7]).permutation(len(self.maps))

    def map_for(self, index: int) -> Path:
        return self.maps[int(self.order[index % len(self.maps)])]

    def _draw_phase(self, rng: np.random.Generator, fov: str) -> str:
        if fov == "cta" and "arterial" in self.phases and rng.random() < 0.85:
            return "arterial"
        weights = np.array([PHASE_WEIGHTS[p] for p in self.phases])
        return self.phases[int(rng.choice(len(self.phases), p=weights / weights.sum()))]

    def generate(self, index: int) -> SynthCase:
        index = _check_int(index, "case index", 0)
        rng = np.random.default_rng([self.seed, index])
        path = self.map_for(index)
        anatomy, coarse, distance = _analysed(path)
        body = plan_body(coarse, rng)
        organs = plan_organs(coarse, body, rng)
        side = np.random.default_rng([self.seed, index, 1])  # draws added later: the first stream stays as it was
        if side.random() < self.fatty_pancreas:
            organs.pancreas_fat_fraction = float(side.uniform(*FATTY_PANCREAS_FRACTION))
        weights = np.array([FOV_WEIGHTS[FOV_KINDS.index(f)] for f in self.fovs])
        fov = self.fovs[int(rng.choice(len(self.fovs), p=weights / weights.sum()))]
        phase = self._draw_phase(rng, fov)
        hu = draw_hu(rng, phase)
        acq = draw_acquisition(rng, body, coarse, self.in_plane, self.max_slices, fov=fov)
        deformation = Deformation.draw(rng, acq.centre, max_mm=rng.uniform(2, 6))

        # Random fields in the map's frame (beyond it they hold their edge values).
        lo = np.array([coarse.x.min(), coarse.y.min(), coarse.z.min()])
        hi = np.array([coarse.x.max(), coarse.y.max(), coarse.z.max()])
        organ_lo, organ_hi = _organ_bounds(coarse)
        fine = SmoothField(rng, organ_lo - 20.0, organ_hi + 20.0, 2.0, 2.5)
        texture = SmoothField(rng, organ_lo - 20.0, organ_hi + 20.0, 5.0, 8.0)
        loops = SmoothField(rng, lo, hi, 4.0, 9.0)
        detail = SmoothField(rng, lo, hi, 3.0, 3.5)
        density = SmoothField(rng, lo, hi, 10.0, 30.0)

        px, py, pz = acq.axes()
        qx, qy, qz = deformation.apply(px, py, pz)
        canvas = Canvas(qx, qy, qz, np.zeros(qx.shape, np.uint8), acq.spacing)
        canvas.label = resample_labels(anatomy, canvas, acq.spacing)
        paint_wall(canvas, body, hu, acq.table_x)
        paint_bowel(canvas, organs, body, hu, distance, loops, detail, density)
        paint_psoas(canvas, body, hu)
        paint_organs(canvas, organs, body, hu, phase, rng, fine, texture)
        paint_vessels(canvas, organs, hu)
        paint_spine(canvas, body, hu)
        paint_pelvis(canvas, body, hu)
        image = acquire(canvas.hu, acq, rng)

        geometry = Geometry(spacing=acq.spacing, origin=(float(px[0]), float(py[0]), float(pz[0])))
        present = np.bincount(canvas.label.ravel(), minlength=len(CLASS_NAMES))
        info = {
            "anatomy": anatomy.name,
            "phase": phase,
            "fov": acq.fov,
            "spacing": [round(s, 4) for s in acq.spacing],
            "shape": list(acq.shape),
            "noise_hu": round(acq.noise_hu, 2),
            "kernel": acq.kernel,
            "offcentre": acq.offcentre,
            "seed": self.seed,
            "index": index,
            "split": self.split,
            "native_spacing": [round(s, 4) for s in acq.native_spacing],
            "capped": bool(acq.capped),
            "slice_thickness_mm": round(acq.thickness_mm, 3),
            "field_of_view_mm": [round(s, 1) for s in acq.size_mm],
            "cropped": acq.cropped,
            "native_noise_hu": round(acq.native_noise_hu, 2),
            "blur_mm": round(acq.blur_mm, 3),
            "organs_in_view": [o.name for o in ORGANS if present[o.label] > 0],
            "deformation_max_mm": round(deformation.max_mm, 2),
            "hu": {k: round(v, 1) for k, v in hu.items()},
            "oral_contrast": organs.oral_contrast is not None,
            "pancreas_fat_fraction": round(organs.pancreas_fat_fraction, 3),
            "arms_in_view": body.arms is not None,
        }
        return SynthCase(Volume(image, geometry), Volume(canvas.label, geometry), info, deformation)


def _organ_bounds(coarse: Coarse) -> tuple[np.ndarray, np.ndarray]:
    k, j, i = np.nonzero(coarse.labels)
    if k.size == 0:
        return np.array([coarse.x[0], coarse.y[0], coarse.z[0]]), np.array([coarse.x[-1], coarse.y[-1], coarse.z[-1]])
    return (
        np.array([coarse.x[i.min()], coarse.y[j.min()], coarse.z[k.min()]], float),
        np.array([coarse.x[i.max()], coarse.y[j.max()], coarse.z[k.max()]], float),
    )


def case_id(index: int) -> str:
    return f"synth_{int(index):04d}"


def _entry(cid: str) -> dict:
    return {"image": f"./imagesTr/{cid}_0000.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"}


def _manifest(training: dict[str, dict]) -> dict:
    """dataset.json: the phantoms' nnU-Net v2 / MSD keys, described as this data set (no licence: see README)."""
    manifest = _phantom_manifest(training, {})
    for key in ("phantom_info", "licence"):
        del manifest[key]
    manifest.update(
        name="FINESynthAnatomy",
        description=(
            "Synthetic CT around real abdominal organ label maps (../shared/data/anatomy-labels), generated by "
            "FINESegmentationLib.data.synth; images are synthetic, labels are resampled real anatomy."
        ),
        reference="FINESegmentation synthetic CT generator; anatomy from the maps named in README",
    )
    return manifest


def _existing(out: Path) -> dict[str, dict]:
    """synth_info of an earlier run in ``out`` for the cases whose files are still there (to grow a set)."""
    path = out / "synth_info.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return {
            cid: entry for cid, entry in old.items()
            if (out / "imagesTr" / f"{cid}_0000.nii.gz").is_file() and (out / "labelsTr" / f"{cid}.nii.gz").is_file()
        }
    except (ValueError, AttributeError):
        logger.warning("Ignoring the unreadable %s; it will be rewritten.", path)
        return {}


def write_synth_dataset(
    out_dir: str | os.PathLike,
    cases: int,
    seed: int = 0,
    *,
    anatomy_dir: str | os.PathLike = DEFAULT_ANATOMY,
    split: str = "train",
    phases: Sequence[str] | None = None,
    fovs: Sequence[str] | None = None,
    in_plane: int = DEFAULT_IN_PLANE,
    max_slices: int = DEFAULT_MAX_SLICES,
    first_index: int = 0,
    progress: bool = True,
    fatty_pancreas: float = 0.0,
) -> list[Path]:
    """Writes ``cases`` synthetic CTs in the nnU-Net v2 / MSD layout plus ``synth_info.json``.

    ``imagesTr/synth_XXXX_0000.nii.gz`` (int16 HU), ``labelsTr/synth_XXXX.nii.gz`` (uint8),
    ``dataset.json`` and ``synth_info.json`` ({case: {anatomy, phase, fov, spacing, shape, noise_hu,
    kernel, offcentre, ...}}). Every file appears atomically and both JSON files are rewritten after each
    case, so an interrupted run leaves a consistent set. Returns the image paths written.
    """
    cases = _check_int(cases, "number of cases", 1)
    first_index = _check_int(first_index, "first case index", 0)
    generator = SynthGenerator(
        anatomy_dir, seed, split, phases=phases, fovs=fovs, in_plane=in_plane, max_slices=max_slices,
        fatty_pancreas=fatty_pancreas,
    )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"The output folder {out} is an existing file; give a folder path instead.")
    images, labels = out / "imagesTr", out / "labelsTr"
    try:
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {out} ({exc.strerror}); choose a writable folder.") from None
    info = _existing(out)
    training = {cid: _entry(cid) for cid in info}
    written = []
    for index in tqdm(range(first_index, first_index + cases), desc="Synthetic CT", unit="case", disable=not progress):
        case = generator.generate(index)
        cid = case_id(index)
        image_path, label_path = images / f"{cid}_0000.nii.gz", labels / f"{cid}.nii.gz"
        _write_image(case.image, image_path, sitk.sitkInt16)
        _write_image(case.label, label_path, sitk.sitkUInt8)
        training[cid] = _entry(cid)
        info[cid] = case.info
        _write_json(_manifest(training), out / "dataset.json")
        _write_json({c: info[c] for c in sorted(info)}, out / "synth_info.json")
        written.append(image_path)
    return written
