"""Prompts saved from 3D Slicer as markups files (``.mrk.json``): clicks (a point list) and boxes (an ROI or a line).

Positions are read in the file's ``coordinateSystem`` (LPS, Slicer's default for files, or RAS; RAS
when absent) and returned in RAS millimetres, Slicer's world coordinates. Every failure to read is
one :class:`~FINESegmentationLib.errors.InputError` sentence.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import PathLike, _require_exists

NEGATIVE_POINT_DESCRIPTIONS = ("negative", "-")
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _markups(path: Path, what: str, holding: str) -> list[tuple[dict[str, Any], bool]]:
    """(markup, is LPS) for every markup of a file; refuses unknown coordinate systems."""
    _require_exists(path)
    try:
        markups = json.loads(path.read_text(encoding="utf-8"))["markups"]
        out = []
        for markup in markups:
            system = str(markup.get("coordinateSystem", "RAS")).upper()
            if system not in ("RAS", "LPS"):
                raise InputError(f"{path} uses the coordinate system '{system}'; save the {what} from Slicer in LPS or RAS.")
            out.append((markup, system == "LPS"))
        return out
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise InputError(f"Cannot read {path}: it is not a Slicer markups file (.mrk.json) with {holding}; save the {what} again from Slicer.") from None


def _position(values: Any, lps: bool) -> np.ndarray:
    position = np.asarray(values, dtype=np.float64).reshape(3)
    return position * _LPS_TO_RAS if lps else position


def _defined_points(markup: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in markup.get("controlPoints", []) if p.get("positionStatus", "defined") == "defined"]


def read_markups_points(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Control points of a Slicer markups file as clicks: (RAS mm (N, 3), positive (N,) bool).

    A point is a *negative* click (remove from the segment) when its label starts with ``-`` or its
    description is ``negative`` (any case); every other point is positive. Points whose position is
    not defined (``positionStatus`` other than ``defined``) are skipped. Every markup of the file
    contributes its points.
    """
    path = Path(path)
    points, positive = [], []
    try:
        for markup, lps in _markups(path, "points", "control points"):
            for point in _defined_points(markup):
                negative = str(point.get("label", "")).strip().startswith("-") or \
                    str(point.get("description", "")).strip().casefold() in NEGATIVE_POINT_DESCRIPTIONS
                points.append(_position(point["position"], lps))
                positive.append(not negative)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError(f"Cannot read {path}: it is not a Slicer markups file (.mrk.json) with control points; save the points again from Slicer.") from None
    if not points:
        raise InputError(f"{path} holds no placed control points; place at least one point on the segment to refine.")
    if not np.isfinite(points).all():
        raise InputError(f"{path} has points with non-finite coordinates; place the points again.")
    return np.array(points), np.array(positive, dtype=bool)


def read_markups_box(path: PathLike) -> np.ndarray:
    """Two opposite corners (2, 3) in RAS mm of the box a markups file holds: its first ROI, or else its
    first line (two control points, e.g. the diagonal of the box drawn on one slice).

    An ROI's corners are those of its axis-aligned bounding box in RAS (an ROI rotated in Slicer is
    replaced by the box around it). A flat ROI or a line lying on one slice gives a box on that slice.
    """
    path = Path(path)
    markups = _markups(path, "box", "an ROI or a line")
    try:
        for markup, lps in markups:
            if str(markup.get("type", "")).upper() == "ROI":
                centre = _position(markup["center"], lps)
                size = np.asarray(markup["size"], dtype=np.float64).reshape(3)
                axes = np.asarray(markup.get("orientation", np.eye(3).ravel()), dtype=np.float64).reshape(3, 3)
                if lps:
                    axes = _LPS_TO_RAS[:, None] * axes
                half = np.abs(axes) @ (size / 2)  # half extent along R, A, S of the rotated box
                corners = np.array([centre - half, centre + half])
                break
        else:
            lines = [m for m in markups if str(m[0].get("type", "")).lower() == "line"]
            if not lines:
                raise InputError(f"{path} holds neither an ROI nor a line; draw the box as an ROI (or a line across the organ) in Slicer and save it.")
            points = [_position(p["position"], lines[0][1]) for p in _defined_points(lines[0][0])]
            if len(points) != 2:
                raise InputError(f"The line in {path} has {len(points)} placed point(s); place both ends of the line across the organ.")
            corners = np.array(points)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError(f"Cannot read the box in {path}: its ROI or line is incomplete; save the box again from Slicer.") from None
    if not np.isfinite(corners).all():
        raise InputError(f"The box in {path} has non-finite coordinates; draw the box again.")
    return corners
