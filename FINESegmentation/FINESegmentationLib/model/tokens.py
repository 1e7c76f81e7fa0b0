"""Volume-token geometry and state.

The volume is covered by an in-plane grid of cells (constant along z, paper 3.1);
each cell holds ``Nw`` volume tokens per stage. A crop reads and writes the
tokens of the (at most 2 x 2) cells it intersects.

The state of the volume tokens is an explicit object that a forward pass takes
and returns, so inference can carry it across the crops of one volume (a
per-volume bank) while training starts each forward from the learned tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class VolumeGrid:
    """Where a crop falls on the volume-token grid.

    Positions are crop centres minus the volume centre, in preprocessed voxels,
    (z, y, x) order; only y and x matter. The grid of ``grid`` cells of the crop's
    size is centred in a frame of ``max_size`` voxels whose centre is the volume
    centre.
    """

    crop: tuple[int, int]  # (y, x) crop size in voxels, also the cell size
    max_size: tuple[int, int]  # (y, x) largest preprocessed training volume

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(max(1, m // c) for m, c in zip(self.max_size, self.crop))  # type: ignore[return-value]

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cells_per_crop(self) -> int:
        return min(2, self.grid[0]) * min(2, self.grid[1])

    def _axis_cells(self, pos: Tensor, axis: int) -> Tensor:
        """(B, 2 or 1) cell indices along one in-plane axis."""
        crop, size, g = self.crop[axis], self.max_size[axis], self.grid[axis]
        if g == 1:
            return torch.zeros(pos.shape[0], 1, dtype=torch.long, device=pos.device)
        pad = (size - crop * g) // 2 + (size - crop * g) % 2
        rc = pos + size // 2  # crop centre in the max-size frame
        first = torch.div(rc - pad - crop // 2, crop, rounding_mode="floor").long()
        # A crop past the far edge reads the last cells. (The authors' code resets the
        # index to 0 there, which hands the right border the left border's tokens.)
        first = first.clamp(0, g - 2)
        return torch.stack([first, first + 1], dim=1)

    def cells(self, positions: Tensor) -> Tensor:
        """Flat indices (B, cells_per_crop) of the distinct cells each crop intersects.

        Computed per sample, so any batch size works (the authors' code handles at most 2).
        """
        if positions.ndim != 2 or positions.shape[1] not in (2, 3):
            raise ValueError(f"positions must be (B, 3) crop centres (z, y, x), got {tuple(positions.shape)}.")
        yx = positions[:, -2:].float()
        iy = self._axis_cells(yx[:, 0], 0)
        ix = self._axis_cells(yx[:, 1], 1)
        return (iy[:, :, None] * self.grid[1] + ix[:, None, :]).reshape(positions.shape[0], -1)


@dataclass
class VolumeTokenState:
    """Volume tokens of a batch of volumes, per stage, and how often crops wrote each cell.

    ``tokens[stage]`` is (B, M, Nw, C) with M cells; ``visits`` is (B, M).
    A cell with ``visits == 0`` holds the learned tokens untouched by this volume's crops.
    """

    tokens: dict[str, Tensor] = field(default_factory=dict)
    visits: Tensor | None = None

    @property
    def batch_size(self) -> int:
        assert self.visits is not None
        return self.visits.shape[0]

    def detach(self) -> "VolumeTokenState":
        return VolumeTokenState({k: v.detach() for k, v in self.tokens.items()}, None if self.visits is None else self.visits.clone())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "VolumeTokenState":
        return VolumeTokenState(
            {k: v.to(device=device, dtype=dtype) if dtype is not None else v.to(device) for k, v in self.tokens.items()},
            None if self.visits is None else self.visits.to(device),
        )

    def select(self, index: Tensor | list[int]) -> "VolumeTokenState":
        """The state of some samples of the batch (index along dim 0)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        assert self.visits is not None
        return VolumeTokenState({k: v[idx.to(v.device)] for k, v in self.tokens.items()}, self.visits[idx.to(self.visits.device)])
