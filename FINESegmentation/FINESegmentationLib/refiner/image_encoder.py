"""The refiner's image encoder: a 3-D ViT over the cubic crop, with a memorizing plug-in at one block.

Patch tokens (no class token) with learned absolute position embeddings and global
self-attention in every block. One block (``RefinerConfig.memory_block``) can also
attend to key/value pairs retrieved from an external memory (Memorizing SAM):

    fused = r * softmax(Q K^T / sqrt(d)) V + (1 - r) * sum_j w_j softmax(Q K_j^T / sqrt(d)) V_j

with r the local ratio, (K_j, V_j) the keys and values of retrieved example j at
this block, and w_j its retrieval weight, which *decreases* with the retrieval
distance and sums to 1 (see :func:`.memory.distance_weights`). The authors' code
computes the memory attention softmax(Q K_j^T) and then does not use it (it adds
sum_j w_j A V_j, the *local* attention applied to the memory values), and its
weights grow with distance; both are done as the paper describes here.

The forward pass is split where the memory enters, so that a predictor can run the
blocks before the plug-in once, search the memory with their output, and finish:
``tokens = prefix(image)``; ``descriptor(tokens)``; ``plugin_kv(tokens)``;
``suffix(tokens, memory)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import RefinerConfig
from .memory import RetrievedMemory, fuse, memory_attention


class Attention(nn.Module):
    """Multi-head global self-attention over the patch tokens, optionally fused with memory attention."""

    def __init__(self, dim: int, num_heads: int, local_ratio: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"The width {dim} must be divisible by the {num_heads} heads.")
        self.num_heads = num_heads
        self.local_ratio = local_ratio
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, N, C) -> q, k, v each (B, H, N, C / H)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, memory: RetrievedMemory | None = None) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        if memory is not None:
            out = fuse(out, memory_attention(q, memory), self.local_ratio)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, local_ratio: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, local_ratio)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, memory: RetrievedMemory | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))


class ImageEncoder3D(nn.Module):
    """(B, 1, S, S, S) crop -> (B, prompt_dim, G, G, G) image embedding, G = S / patch_size."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        c, g = config.embed_dim, config.grid_size
        self.patch_embed = nn.Conv3d(1, c, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g**3, c))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(c, config.num_heads, config.mlp_ratio, config.local_ratio if i == config.memory_block else 1.0)
            for i in range(config.depth)
        )
        # SAM's neck: to the prompt width, 1x1 then 3x3 convolutions with channel layer norms.
        self.neck = nn.Sequential(
            nn.Conv3d(c, config.prompt_dim, 1, bias=False),
            nn.GroupNorm(1, config.prompt_dim),
            nn.Conv3d(config.prompt_dim, config.prompt_dim, 3, padding=1, bias=False),
            nn.GroupNorm(1, config.prompt_dim),
        )

    def prefix(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> tokens (B, G^3, embed_dim) entering the memory block."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks[: self.config.memory_block]:
            x = block(x)
        return x

    def plugin_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the memory block's attention, each (B, H, G^3, embed_dim / H): what the memory stores."""
        block = self.blocks[self.config.memory_block]
        _, k, v = block.attn.qkv_heads(block.norm1(tokens))
        return k, v

    def descriptor(self, tokens: torch.Tensor) -> torch.Tensor:
        """Compact crop descriptor for the kNN search: tokens pooled to 2^3 cells, L2-normalised; (B, 8 * embed_dim).

        The authors search on the raw 128^3 voxels (8 MiB per entry); features pooled from the
        encoder are a few hundred numbers and compare anatomy rather than noise and intensity offsets.
        """
        b, n, c = tokens.shape
        g = self.config.grid_size
        grid = tokens.transpose(1, 2).reshape(b, c, g, g, g)
        return F.normalize(F.adaptive_avg_pool3d(grid, 2).flatten(1), dim=1)

    def suffix(self, tokens: torch.Tensor, memory: RetrievedMemory | None = None) -> torch.Tensor:
        """Tokens from :meth:`prefix` -> embedding (B, prompt_dim, G, G, G); ``memory`` is read by the memory block only."""
        x = tokens
        for i, block in enumerate(self.blocks[self.config.memory_block:], start=self.config.memory_block):
            x = block(x, memory if i == self.config.memory_block else None)
        b, n, c = x.shape
        g = self.config.grid_size
        return self.neck(x.transpose(1, 2).reshape(b, c, g, g, g))

    def forward(self, image: torch.Tensor, memory: RetrievedMemory | None = None) -> torch.Tensor:
        return self.suffix(self.prefix(image), memory)
