"""Training augmentation (MONAI), in three strengths: ``none``, ``light`` and ``ct``.

Augmentation runs on crops that are already on the network's grid and normalised (clipped
to the checkpoint's HU window, then z-scored; see ``preprocessing.prepare``), so one unit
of intensity is ``Preprocessing.std`` HU (165 HU for the demo model, whose window is
-1006..236 HU). The ``ct`` strength states its intensity changes in HU and converts them
with the checkpoint's statistics, so it means the same for any training set.

``light`` (the demo model's): in-plane rotation up to 15 degrees, scaling 0.85-1.15,
intensity scale/shift by 10% of a unit, noise of up to 0.05 units.

``ct``: the variation of real CT from any scanner, protocol and contrast phase:

* geometry: in-plane rotation up to 15 degrees (patient positioning), a tilt out of plane
  up to 3 degrees (gantry tilt), scaling 0.8-1.2 per axis (body size and habitus);
* resolution: simulated low resolution (down to half the grid and back: 6 mm in-plane,
  12 mm slices on the default 3 x 3 x 6 mm grid), and reconstruction kernels: Gaussian
  blur (soft kernels) or unsharp masking (sharp ones);
* intensity: contrast phase and calibration, as a scale of 0.8-1.2 about the mean, a shift of
  up to 40 HU, a gamma of 0.7-1.5 over the window (changes the soft-tissue contrast by
  about that factor), and a smooth non-linear remapping of the histogram (organs
  enhancing unlike the training phase);
* noise: Gaussian, with a standard deviation drawn up to 50 HU (low-dose, thin slices;
  resampling to the grid is by interpolation, which does not average the noise away).

Then the image is clipped back to the window, as every real scan is at inference.
No mirroring at any strength: left and right kidney differ only by their side of the body.
"""
from __future__ import annotations

import warnings

import numpy as np
from monai.transforms import (
    Compose,
    Lambdad,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
)

from .checkpoints import Preprocessing
from .errors import InputError

STRENGTHS = ("none", "light", "ct")

# A crop of air only (a corner of a volume, the padding of a thin slab) has nothing to shift: MONAI returns it
# unchanged, which is right, and warns each time.
warnings.filterwarnings("ignore", message="The image's intensity is a single value", category=UserWarning)


def training_augmentation(strength: str, pre: Preprocessing) -> Compose:
    """The transforms for ``{"image": [1, z, y, x], "label": [1, z, y, x]}`` crops of normalised CT.

    MONAI names the spatial axes x, y, z in array order; here arrays are [z, y, x], so a MONAI
    ``sigma_x`` or the first rotation angle concern our z axis (rotation *about* z is in-plane)."""
    if strength not in STRENGTHS:
        raise InputError(f"Unknown augmentation '{strength}'; use one of: {', '.join(STRENGTHS)}.")
    if strength == "none":
        return Compose([])
    if strength == "light":
        return Compose([
            RandAffined(keys=["image", "label"], prob=0.3, rotate_range=(np.pi / 12, 0, 0), scale_range=(0.15, 0.15, 0.15),
                        mode=("bilinear", "nearest"), padding_mode="border"),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3),
            RandGaussianNoised(keys="image", std=0.05, prob=0.2),
        ])
    hu = 1.0 / pre.std  # one HU in normalised units
    low, high = (pre.clip[0] - pre.mean) * hu, (pre.clip[1] - pre.mean) * hu
    tilt = np.deg2rad(3.0)
    return Compose([
        RandAffined(keys=["image", "label"], prob=0.5, rotate_range=(np.pi / 12, tilt, tilt), scale_range=(0.2, 0.2, 0.2),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandSimulateLowResolutiond(keys="image", prob=0.15, zoom_range=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", factors=0.2, prob=0.3),
        RandShiftIntensityd(keys="image", offsets=40.0 * hu, prob=0.3),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
        RandHistogramShiftd(keys="image", num_control_points=(5, 10), prob=0.1),
        # Noise before the kernel blur, so a soft kernel also correlates it, as in a reconstruction.
        RandGaussianNoised(keys="image", std=50.0 * hu, prob=0.5),
        RandGaussianSmoothd(keys="image", sigma_x=(0.0, 0.5), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0), prob=0.2),
        RandGaussianSharpend(keys="image", sigma1_x=(0.1, 0.3), sigma1_y=(0.25, 0.5), sigma1_z=(0.25, 0.5),
                             sigma2_x=0.3, sigma2_y=0.75, sigma2_z=0.75, alpha=(0.5, 2.0), prob=0.15),
        Lambdad(keys="image", func=lambda x: x.clip(low, high)),
    ])
