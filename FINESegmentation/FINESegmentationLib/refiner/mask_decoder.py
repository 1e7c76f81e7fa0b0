"""The refiner's mask decoder: a two-way transformer, several mask tokens and an IoU head (SAM, in 3-D).

Output tokens (one IoU token, 1 + ``num_multimask_outputs`` mask tokens) and the
prompt tokens attend to the image embedding and the image embedding attends back
(two-way), twice. The embedding is then upsampled to the crop's resolution by
transposed convolutions; each mask token, through its own small MLP, becomes a
vector whose dot product with every upsampled voxel gives that mask's logits. A
cheap full-resolution branch (two 1x1x1 convolutions of the crop's intensities, the
previous mask and the two click maps) is added to the upsampled features, so the refiner can keep
edges finer than its patch grid. Mask 0 answers all the clicks at once (used while
refining); masks 1..3 are SAM's ambiguity-aware answers to a single click.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RefinerConfig


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DownsampledAttention(nn.Module):
    """Multi-head attention whose inner width is ``dim / downsample`` (SAM's token-to-image attention)."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % num_heads:
            raise ValueError(f"The attention width {inner} must be divisible by the {num_heads} heads.")
        self.num_heads = num_heads
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        out = F.scaled_dot_product_attention(self._heads(self.q(q)), self._heads(self.k(k)), self._heads(self.v(v)))
        b, h, n, d = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, tokens attend to the image, MLP on tokens, the image attends to the tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = DownsampledAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_token_to_image = DownsampledAttention(dim, num_heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.cross_image_to_token = DownsampledAttention(dim, num_heads, downsample=2)
        self.norm4 = nn.LayerNorm(dim)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, C), image (B, G^3, C) and their position encodings of the same shapes."""
        if self.skip_first_layer_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm2(tokens + self.cross_token_to_image(q, k, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norm4(image + self.cross_image_to_token(k, q, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token-to-image attention."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth))
        self.final_attn = DownsampledAttention(dim, num_heads, downsample=2)
        self.norm_final = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C, G, G, G), image_pe (1, C, G, G, G), tokens (B, T, C) -> tokens (B, T, C), image (B, G^3, C)."""
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, image = layer(queries, image, tokens, image_pe)
        q, k = queries + tokens, image + image_pe
        queries = self.norm_final(queries + self.final_attn(q, k, image))
        return queries, image


class MaskDecoder3D(nn.Module):
    """Image embedding + prompts -> mask logits at the crop's resolution and predicted IoUs."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        c = config.prompt_dim
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(config.decoder_depth, c, config.decoder_heads, config.decoder_mlp_dim)
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        # One x2 transposed convolution per halving of the patch: G^3 -> S^3.
        levels = int(math.log2(config.patch_size))
        channels = [c] + [max(c // 4 // 2**i, 8) for i in range(levels)]
        layers: list[nn.Module] = []
        for i in range(levels):
            layers.append(nn.ConvTranspose3d(channels[i], channels[i + 1], kernel_size=2, stride=2))
            if i < levels - 1:
                layers += [nn.GroupNorm(1, channels[i + 1]), nn.GELU()]
        self.upscaling = nn.Sequential(*layers)
        out = channels[-1]
        self.full_resolution = nn.Sequential(nn.Conv3d(4, out, 1), nn.GELU(), nn.Conv3d(out, out, 1))
        self.hypernetworks = nn.ModuleList(MLP(c, c, out, 3) for _ in range(self.num_mask_tokens))
        self.iou_head = MLP(c, c, self.num_mask_tokens, 3)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                full_resolution: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding (B, C, G, G, G); image_pe (1, C, G, G, G); sparse (B, N, C); dense (B, C, G, G, G);
        full_resolution (B, 4, S, S, S): the normalised crop, the previous mask and the positive and negative click maps.

        Returns mask logits (B, M, S, S, S) and IoU predictions (B, M), M = 1 + num_multimask_outputs.
        """
        b = image_embedding.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight]).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse], dim=1)
        src = image_embedding + dense
        hs, src = self.transformer(src, image_pe, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        g = image_embedding.shape[-1]
        upscaled = self.upscaling(src.transpose(1, 2).reshape(b, -1, g, g, g)) + self.full_resolution(full_resolution)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)  # (B, M, c)
        masks = torch.einsum("bmc,bczyx->bmzyx", hyper, upscaled)
        return masks, self.iou_head(iou_out)
