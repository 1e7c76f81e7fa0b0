"""A CT volume seen as LiteMedSAM's 2-D inputs: axial slices, windowed, resized and padded to 256 x 256.

:class:`SliceFrame` reorders a volume's voxel array, without resampling, so that its axes point to
S, P and L (the closest axes of its own grid: an oblique or non-axial acquisition keeps its own slices).
Slice ``k`` of the frame is then an axial image displayed as a radiologist reads it (anterior up,
the patient's right on the left), the view LiteMedSAM was trained on.

:class:`SliceInput` applies LiteMedSAM's preprocessing (its authors' ``CVPR24_LiteMedSAM_infer.py``;
their CT data were windowed at level 40, width 400 HU and scaled to [0, 255]):

1. HU clipped to the window and scaled to [0, 1], repeated to 3 channels;
2. the longest side resized to 256, keeping the aspect ratio in *millimetres* (the same as theirs in
   pixels when pixels are square): area averaging when shrinking (OpenCV's INTER_AREA), bilinear when
   enlarging;
3. min-max normalised to [0, 1]; zero-padded at the bottom and right to 256 x 256.

Boxes and clicks scale with the same factors; a mask's 256 x 256 logits are cropped to the resized
extent and resized bilinearly back to the slice (their ``postprocess_masks``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InputError
from ...volume import Volume
from .build import IMAGE_SIZE

CT_WINDOW = (-160.0, 240.0)  # HU: level 40, width 400, the abdominal window of LiteMedSAM's CT data


@dataclass(frozen=True)
class SliceFrame:
    """The permutation and flips that turn a volume's array [z, y, x] into the frame's [S, P, L] array.

    ``axes[c]``: which source array axis becomes frame axis c; ``flips[c]``: whether it is reversed;
    ``spacing``: (x, y, z) mm of the frame's axes; ``shape``: the frame's array shape (Z, Y, X).
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    source_shape: tuple[int, int, int]

    @classmethod
    def of(cls, volume: Volume) -> "SliceFrame":
        d = volume.geometry.direction_matrix  # columns: the i, j, k axes in LPS
        # perm[a]: the index axis (0 i, 1 j, 2 k) that points closest to LPS axis a (0 L, 1 P, 2 S).
        perm = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[a, p[a]]) for a in range(3)))
        signs = [d[a, perm[a]] >= 0 for a in range(3)]
        # Frame array axes are (S, P, L) = LPS axes (2, 1, 0); index axis n is array axis 2 - n.
        axes = tuple(2 - perm[a] for a in (2, 1, 0))
        flips = tuple(not signs[a] for a in (2, 1, 0))
        spacing = tuple(volume.geometry.spacing[perm[a]] for a in range(3))
        shape = tuple(volume.shape[ax] for ax in axes)
        return cls(axes, flips, spacing, shape, volume.shape)  # type: ignore[arg-type]

    def to_frame(self, array: np.ndarray) -> np.ndarray:
        """A view of a source array [z, y, x] (or [..., z, y, x]) in the frame's [S, P, L] order."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + a for a in self.axes)))
        flipped = tuple(lead + c for c in range(3) if self.flips[c])
        return np.flip(out, flipped) if flipped else out

    def from_frame(self, array: np.ndarray) -> np.ndarray:
        """The source-grid array [z, y, x] of a frame array [S, P, L] (a contiguous copy)."""
        flipped = tuple(c for c in range(3) if self.flips[c])
        out = np.flip(array, flipped) if flipped else array
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.axes)))

    def ijk_to_frame(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous source indices (i, j, k) -> (N, 3) frame indices (x, y, z) = (L, P, S)."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        out = np.empty_like(ijk)
        for c in range(3):  # frame array axis c = (S, P, L)[c] -> frame index component 2 - c
            source = 2 - self.axes[c]  # the source index component of that array axis
            values = ijk[:, source]
            out[:, 2 - c] = (self.source_shape[self.axes[c]] - 1 - values) if self.flips[c] else values
        return out


@dataclass(frozen=True)
class SliceInput:
    """One frame slice (H, W) as LiteMedSAM's input: the resized extent and the pixel -> model scale."""

    height: int
    width: int
    new_height: int
    new_width: int

    @classmethod
    def for_frame(cls, frame: SliceFrame) -> "SliceInput":
        height, width = frame.shape[1], frame.shape[2]
        extent_y, extent_x = height * frame.spacing[1], width * frame.spacing[0]
        scale = IMAGE_SIZE / max(extent_y, extent_x)
        # Theirs: int(side * 256 / longest + 0.5) in pixels; here in millimetres, capped at 256.
        new_h = min(IMAGE_SIZE, max(1, int(extent_y * scale + 0.5)))
        new_w = min(IMAGE_SIZE, max(1, int(extent_x * scale + 0.5)))
        return cls(height, width, new_h, new_w)

    @property
    def scale_xy(self) -> np.ndarray:
        """Model-input pixels per slice pixel along x and y."""
        return np.array([self.new_width / self.width, self.new_height / self.height])

    def image(self, hu: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> torch.Tensor:
        """A slice (H, W) in HU -> the model input (1, 3, 256, 256) in [0, 1]."""
        lo, hi = window
        x = torch.from_numpy(np.ascontiguousarray((np.clip(hu, lo, hi) - lo) / (hi - lo), dtype=np.float32))[None, None]
        size = (self.new_height, self.new_width)
        mode = "area" if size[0] <= self.height and size[1] <= self.width else "bilinear"
        x = F.interpolate(x, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
        low, high = x.min(), x.max()
        x = (x - low) / torch.clamp(high - low, min=1e-8)
        x = F.pad(x, (0, IMAGE_SIZE - size[1], 0, IMAGE_SIZE - size[0]))
        return x.expand(1, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()

    def box(self, box_xyxy: np.ndarray) -> torch.Tensor:
        """(x0, y0, x1, y1) slice pixels -> (1, 4) model-input pixels."""
        scale = np.tile(self.scale_xy, 2)
        return torch.tensor(np.asarray(box_xyxy, dtype=np.float64) * scale, dtype=torch.float32)[None]

    def points(self, points_xy: np.ndarray) -> torch.Tensor:
        """(N, 2) slice pixels (x, y) -> (1, N, 2) model-input pixels."""
        return torch.tensor(np.asarray(points_xy, dtype=np.float64).reshape(-1, 2) * self.scale_xy, dtype=torch.float32)[None]

    def to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-input logits (B, 1, 256, 256) -> slice logits (B, H, W)."""
        x = logits[..., : self.new_height, : self.new_width]
        return F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)[:, 0]


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(x0, y0, x1, y1) pixel bounds (inclusive) of a 2-D mask, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def enlarged_box(mask: np.ndarray, spacing_xy: tuple[float, float], margin_mm: float) -> np.ndarray | None:
    """The box around a 2-D mask (H, W), enlarged by ``margin_mm`` (pixel spacing (x, y) mm) and kept inside it."""
    box = mask_box(mask)
    if box is None:
        return None
    margin = margin_mm / np.asarray(spacing_xy, dtype=np.float64)
    h, w = mask.shape
    return np.clip(box + np.concatenate([-margin, margin]), 0, [w - 1, h - 1, w - 1, h - 1])


def labelled_frame(case_id: str, image: Volume, label: Volume) -> tuple[SliceFrame, SliceInput, np.ndarray, np.ndarray]:
    """(frame, model-input geometry, HU and labels reordered to the frame) of one labelled case; labels not on
    the image's grid are refused in one sentence."""
    if image.shape != label.shape:
        raise InputError(f"Case {case_id}: the labels' shape {label.shape} differs from the image's {image.shape}; give labels on the image's grid.")
    frame = SliceFrame.of(image)
    return frame, SliceInput.for_frame(frame), frame.to_frame(image.array), frame.to_frame(label.array)

