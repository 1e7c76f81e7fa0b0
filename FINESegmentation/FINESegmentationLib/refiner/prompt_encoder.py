"""The refiner's prompt encoder: clicks as sparse tokens, the previous mask as a dense prompt.

Points are given in the crop's continuous voxel coordinates ``(x, y, z)`` (index
order i, j, k; voxel centres at integers) with labels 1 (positive: belongs to the
segment), 0 (negative) or -1 (padding, so crops with different click counts share a
batch). A point token is the random-Fourier encoding of its position plus a learned
embedding of its label (SAM). The previous mask (FINE's segment at first, then the
last answer) is downscaled by strided convolutions to the embedding grid and added
to the image embedding; with no mask a learned "no mask" embedding is added instead.
The clicks are also drawn as two dense maps (Gaussian blobs at the positive and at the
negative clicks, as SAM-Med3D-turbo and nnInteractive give them), which enter the
dense prompt with the mask and the decoder's full-resolution branch: a click then acts
on the voxels around it directly, not only through the coarse patch grid.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import RefinerConfig


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of positions normalised to [0, 1]^3: (..., 3) -> (..., dim)."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"The position embedding width must be even, got {dim}.")
        self.register_buffer("gaussian", scale * torch.randn(3, dim // 2))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        projected = 2 * math.pi * ((2 * coords - 1) @ self.gaussian)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def dense(self, size: int) -> torch.Tensor:
        """Encoding of every cell centre of a size^3 grid: (dim, size, size, size), cells indexed [z, y, x]."""
        centres = (torch.arange(size, dtype=torch.float32, device=self.gaussian.device) + 0.5) / size
        z, y, x = torch.meshgrid(centres, centres, centres, indexing="ij")
        return self(torch.stack([x, y, z], dim=-1)).permute(3, 0, 1, 2)


class PromptEncoder3D(nn.Module):
    """(points, labels, previous mask) -> sparse (B, N, C) and dense (B, C, G, G, G) prompt embeddings."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        c = config.prompt_dim
        self.crop_size = config.crop_size
        self.grid_size = config.grid_size
        self.pe = PositionEmbeddingRandom3D(c)
        self.point_embeddings = nn.Embedding(2, c)  # 0: negative, 1: positive
        self.not_a_point = nn.Embedding(1, c)
        self.no_mask = nn.Embedding(1, c)
        # Halve the resolution until the mask reaches the embedding grid (crop / patch = 2^levels).
        levels = int(math.log2(config.patch_size))
        channels = [3] + [max(c // 2 ** (levels - i), 4) for i in range(1, levels)] + [c]  # mask, positive, negative clicks
        layers: list[nn.Module] = []
        for i in range(levels):
            layers.append(nn.Conv3d(channels[i], channels[i + 1], kernel_size=2, stride=2))
            if i < levels - 1:
                layers += [nn.GroupNorm(1, channels[i + 1]), nn.GELU()]
        self.mask_downscaling = nn.Sequential(*layers)

    def click_maps(self, points: torch.Tensor, labels: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
        """points (B, N, 3) crop voxel (x, y, z), labels (B, N) -> (B, 2, S, S, S): positive and negative click maps.

        Each click is exp(-r^2 / (2 sigma^2)) around it (sigma in crop voxels); overlapping blobs take the maximum.
        """
        b, s = points.shape[0], self.crop_size
        maps = torch.zeros(b, 2, s, s, s, device=points.device)
        axis = torch.arange(s, dtype=torch.float32, device=points.device)
        for n in range(points.shape[1]):
            # Separable: exp(-(dx^2 + dy^2 + dz^2) / 2 sigma^2) = gx * gy * gz.
            g = torch.exp(-((axis[None, None, :] - points[:, n, :, None].float()) ** 2) / (2 * sigma**2))  # (B, 3, S) for x, y, z
            blob = g[:, 2, :, None, None] * g[:, 1, None, :, None] * g[:, 0, None, None, :]  # [z, y, x]
            for channel, value in ((0, 1), (1, 0)):
                chosen = (labels[:, n] == value).float().reshape(b, 1, 1, 1)
                maps[:, channel] = torch.maximum(maps[:, channel], blob * chosen)
        return maps

    def dense_pe(self) -> torch.Tensor:
        """(1, C, G, G, G): the position encoding of the image embedding's cells."""
        return self.pe.dense(self.grid_size).unsqueeze(0)

    def forward(self, points: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None, batch: int,
                clicks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """points (B, N, 3) crop voxel (x, y, z); labels (B, N) in {1, 0, -1}; masks (B, 1, S, S, S) in [0, 1] or None;
        clicks (B, 2, S, S, S), the :meth:`click_maps` of the points (computed here when not given).

        Returns sparse (B, N, C) and dense (B, C, G, G, G).
        """
        coords = (points.float() + 0.5) / self.crop_size
        sparse = self.pe(coords)
        labels = labels.long()
        sparse = torch.where((labels == -1).unsqueeze(-1), self.not_a_point.weight.expand_as(sparse), sparse)
        sparse = sparse + torch.where(
            (labels == 1).unsqueeze(-1), self.point_embeddings.weight[1], self.point_embeddings.weight[0]
        ) * (labels != -1).unsqueeze(-1)
        if clicks is None:
            clicks = self.click_maps(points, labels)
        if masks is None:
            g = self.grid_size
            dense = self.no_mask.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, g, g, g)
            dense = dense + self.mask_downscaling(torch.cat([torch.zeros_like(clicks[:, :1]), clicks], dim=1))
        else:
            dense = self.mask_downscaling(torch.cat([masks.float(), clicks], dim=1))
        return sparse, dense
