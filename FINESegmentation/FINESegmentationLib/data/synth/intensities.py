"""Hounsfield units per tissue and contrast phase, drawn per case within published ranges; organ texture.

Ranges (HU, mean attenuation of the tissue) were compiled from:

* [Bae] K. T. Bae, "Intravenous contrast medium administration and scan timing at CT", Radiology
  256:32-61, 2010: aorta ~250-350 HU in the (late) arterial phase (CTA protocols 300-450), 150-200 HU at
  70 s; hepatic enhancement ~10-20 HU arterial and ~50 HU portal-venous; equilibrium (delayed) ~100-140 HU
  in the vessels.
* [Kodama] Y. Kodama et al., "Comparison of CT methods for determining the fat content of the liver",
  AJR 188:1307-1312, 2007, and [Boyce] C. J. Boyce et al., "Hepatic steatosis (fatty liver disease) in
  asymptomatic adults identified by unenhanced low-dose CT", AJR 194:623-628, 2010: normal unenhanced liver
  ~50-65 HU, about 8-10 HU above the spleen (35-55 HU); 40-50 HU with mild steatosis, which is common in
  adults, so the range drawn here starts at 40.
* [Glazer] G. M. Glazer et al., "Dynamic CT of the normal spleen", AJR 137:343-346, 1981: arciform
  (heterogeneous) splenic enhancement in the arterial phase, homogeneous later.
* [Yuh] B. I. Yuh, R. H. Cohan, "Different phases of renal enhancement", AJR 173:747-755, 1999, and
  [Cohan] R. H. Cohan et al., Radiology 196:445-451, 1995: unenhanced parenchyma 30-40 HU; corticomedullary
  phase cortex 140-240 HU against medulla 60-110; nephrographic phase homogeneous 120-200 HU; excretory
  phase contrast in the collecting system (hundreds of HU).
* [Lu] D. S. Lu et al., "Two-phase helical CT for pancreatic tumors", Radiology 199:697-701, 1996:
  pancreas 35-50 HU unenhanced (lower with the fatty infiltration of older patients: 25-50 here), peak ~110-150 HU in the late arterial (pancreatic) phase, 80-115 HU
  portal-venous.
* [Pickhardt] P. J. Pickhardt et al., "Opportunistic screening for osteoporosis using abdominal CT",
  Ann Intern Med 158:588-595, 2013: L1 trabecular bone ~100-280 HU in adults.
* [Kvist] H. Kvist et al., Am J Clin Nutr 48:1351-1361, 1988: adipose tissue -190 to -30 HU, mode near
  -100; [Goodpaster] B. H. Goodpaster et al., J Appl Physiol 89:104-110, 2000: skeletal muscle ~40-60 HU.
* Unenhanced blood 35-50 HU (hematocrit-dependent), bile and gastric fluid 0-20 HU, urine 0-15 HU,
  lung bases -900 to -750 HU: textbook values (e.g. Webb, Brant, Major, "Fundamentals of Body CT").

Each case draws one bolus strength shared by every enhancing tissue (a patient's cardiac output and
dose move all of them together), then each tissue within its range around it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

PHASES = ("non-contrast", "arterial", "portal-venous", "delayed")
#: How often each phase is drawn when none is asked for (portal-venous is the common abdominal scan).
PHASE_WEIGHTS = {"non-contrast": 0.2, "arterial": 0.2, "portal-venous": 0.45, "delayed": 0.15}

_NC, _ART, _PV, _DEL = PHASES
# tissue: {phase: (low, high)}; one tuple means the same range in every phase.
HU_RANGES: dict[str, dict[str, tuple[float, float]] | tuple[float, float]] = {
    "liver": {_NC: (40, 65), _ART: (60, 85), _PV: (95, 130), _DEL: (75, 100)},  # Kodama, Boyce, Bae
    "spleen": {_NC: (35, 55), _ART: (90, 150), _PV: (100, 130), _DEL: (75, 100)},  # Boyce, Glazer
    "pancreas": {_NC: (25, 50), _ART: (100, 150), _PV: (80, 115), _DEL: (65, 90)},  # Lu
    "kidney_cortex": {_NC: (30, 40), _ART: (140, 240), _PV: (140, 200), _DEL: (110, 160)},  # Yuh, Cohan
    "kidney_medulla": {_NC: (28, 38), _ART: (60, 110), _PV: (110, 170), _DEL: (110, 160)},  # Yuh, Cohan
    "urine": {_NC: (0, 15), _ART: (0, 15), _PV: (0, 20), _DEL: (300, 1000)},  # Yuh (excretory)
    "aorta": {_NC: (35, 50), _ART: (250, 450), _PV: (140, 210), _DEL: (100, 140)},  # Bae
    "heart": {_NC: (35, 50), _ART: (200, 400), _PV: (130, 200), _DEL: (100, 140)},  # Bae (blood pool)
    "ivc": {_NC: (35, 50), _ART: (70, 130), _PV: (110, 160), _DEL: (100, 140)},  # Bae; arterial: renal return
    "ivc_infrarenal": {_NC: (35, 50), _ART: (40, 80), _PV: (100, 150), _DEL: (100, 140)},  # Bae: unmixed
    "portal_vein": {_NC: (35, 50), _ART: (90, 160), _PV: (150, 220), _DEL: (100, 140)},  # Bae
    "hepatic_vein": {_NC: (35, 50), _ART: (40, 70), _PV: (130, 190), _DEL: (100, 140)},  # Bae
    "renal_vein": {_NC: (35, 50), _ART: (120, 200), _PV: (140, 190), _DEL: (100, 140)},  # Yuh: early return
    "muscle": {_NC: (40, 60), _ART: (45, 65), _PV: (50, 70), _DEL: (50, 65)},  # Goodpaster
    "myocardium": {_NC: (35, 50), _ART: (80, 140), _PV: (90, 130), _DEL: (80, 110)},
    "gut_wall": {_NC: (30, 45), _ART: (70, 130), _PV: (70, 110), _DEL: (60, 90)},  # enhancing mucosa
    "gallbladder": (0, 20),
    "fluid": (-5, 25),  # gastric and small-bowel content
    "subcutaneous_fat": (-120, -90),  # Kvist
    "visceral_fat": (-110, -80),  # Kvist: slightly denser than subcutaneous fat
    "skin": (0, 60),
    "lung": (-900, -780),
    "cortical_bone": (700, 1200),
    "cancellous_bone": (120, 280),  # Pickhardt
    "disc": (70, 110),
    "csf": (5, 30),
    "cartilage": (100, 200),
    "table_shell": (200, 450),  # carbon fibre shell of the couch
    "table_core": (-950, -850),  # its foam core
}
ENHANCING = {t for t, r in HU_RANGES.items() if isinstance(r, dict) and r[_ART] != r[_NC]}


def hu_range(tissue: str, phase: str) -> tuple[float, float]:
    r = HU_RANGES[tissue]
    return r[phase] if isinstance(r, dict) else r


def draw_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One case's HU per tissue, each within its range for ``phase``; enhancing tissues move together."""
    bolus = rng.uniform(0.0, 1.0)
    out = {}
    for tissue in HU_RANGES:
        lo, hi = hu_range(tissue, phase)
        t = np.clip(bolus + rng.normal(0.0, 0.2), 0.0, 1.0) if tissue in ENHANCING else rng.uniform()
        out[tissue] = float(lo + t * (hi - lo))
    if phase == _NC:  # unenhanced liver stays above the spleen (Boyce)
        out["spleen"] = min(out["spleen"], out["liver"] - rng.uniform(3, 10))
        out["spleen"] = max(out["spleen"], HU_RANGES["spleen"][_NC][0])
    return out


class SmoothField:
    """Band-limited random field in the world frame, about unit SD; sampled at any world points.

    Drawn on a coarse grid over ``lo``-``hi`` (mm) with cells of ``cell_mm`` and smoothed by
    ``sigma_mm``, so the same world point gets the same value whatever the scan's grid.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, cell_mm: float, sigma_mm: float):
        self.lo = np.asarray(lo, np.float64)
        self.cell = float(cell_mm)
        shape = np.maximum(np.ceil((np.asarray(hi) - self.lo) / cell_mm).astype(int) + 2, 2)[::-1]
        field = rng.standard_normal(tuple(shape)).astype(np.float32)
        field = ndimage.gaussian_filter(field, sigma_mm / cell_mm, mode="wrap")
        field /= max(float(field.std()), 1e-6)
        self.field = field

    def at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Values at world points given as equally shaped (or broadcastable) x, y, z arrays."""
        x, y, z = np.broadcast_arrays(x, y, z)
        coords = np.stack([(z - self.lo[2]) / self.cell, (y - self.lo[1]) / self.cell, (x - self.lo[0]) / self.cell])
        return ndimage.map_coordinates(self.field, coords.reshape(3, -1), order=1, mode="nearest").reshape(x.shape)
