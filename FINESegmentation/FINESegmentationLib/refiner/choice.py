"""Which refiner answers a prompt when the user leaves the choice to FINESegmentation (``auto``).

One rule for every front end (``fine-seg refine --refiner auto``, Slicer's Refine section, the Python API):

* a box, an empty or absent segment, or a positive click far (:data:`AUTO_REACH_MM`) outside the segment:
  LiteMedSAM slice by slice, the one refiner that draws an organ afresh;
* clicks alone on a segment FINE found (every positive click within :data:`AUTO_REACH_MM` of its bounding
  box): the Memorizing-SAM 3-D refiner, ahead after five clicks from the default segmentation on the real CT
  and the synthetic volumes, and it does not lose a good organ on the way as LiteMedSAM's clicks can
  (README, "Which refiner, when").
"""
from __future__ import annotations

import numpy as np

from ..volume import Geometry

LITEMEDSAM = "litemedsam"
MEMORIZING_SAM = "memorizing-sam"
AUTO = "auto"
# A positive click farther than this outside an existing segment's box is on an organ FINE put elsewhere.
AUTO_REACH_MM = 20.0


def clicks_near(segment: np.ndarray, geometry: Geometry, points, positive) -> bool:
    """Whether every positive click (RAS mm, ``points`` (N, 3) with ``positive`` (N,)) lies within
    :data:`AUTO_REACH_MM` of the bounding box of ``segment`` (bool [z, y, x] on ``geometry``'s grid)."""
    where = np.nonzero(segment)
    if not len(where[0]):
        return False
    lo = np.array([w.min() for w in where], float)  # (z, y, x)
    hi = np.array([w.max() for w in where], float)
    reach = AUTO_REACH_MM / np.asarray(geometry.spacing, float)[::-1]
    points = np.asarray(points, float).reshape(-1, 3)
    for point in points[np.asarray(positive, bool).reshape(-1)]:
        zyx = np.asarray(geometry.ras_to_ijk(point), float)[::-1]
        if ((zyx < lo - reach) | (zyx > hi + reach)).any():
            return False
    return True


def automatic_refiner(segment: np.ndarray | None, geometry: Geometry | None, *, box: bool, points=None, positive=None) -> str:
    """:data:`LITEMEDSAM` or :data:`MEMORIZING_SAM` for a prompt: a box (``box``) and/or clicks (``points``
    RAS mm with ``positive``) on ``segment`` (bool [z, y, x], None or empty when the organ is missing)."""
    points = np.zeros((0, 3)) if points is None else np.asarray(points, float).reshape(-1, 3)
    if box or not len(points) or segment is None or not segment.any():
        return LITEMEDSAM
    return MEMORIZING_SAM if clicks_near(segment, geometry, points, positive) else LITEMEDSAM
