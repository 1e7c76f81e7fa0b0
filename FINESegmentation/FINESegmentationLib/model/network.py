"""The FINE network: an nnFormer-style U-shaped 3-D Swin transformer with memory tokens."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .blocks import FINEBlock
from .config import FINEConfig
from .tokens import VolumeGrid, VolumeTokenState


class FINEOutput(NamedTuple):
    """``logits`` (B, classes, *crop); ``deep`` deep-supervision logits at half resolution
    (empty unless asked for); ``state`` the volume tokens after this forward (None without volume tokens)."""

    logits: Tensor
    deep: list[Tensor]
    state: VolumeTokenState | None


class _ChannelsLastNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, Z, Y, X)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class PatchEmbedding(nn.Module):
    """Two strided 3x3x3 convolution blocks; together they downsample by ``patch`` (2x4x4 in the paper)."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        first = tuple(max(1, p // 2) for p in patch)
        second = tuple(p // f for p, f in zip(patch, first))
        self.conv1 = nn.Conv3d(in_channels, dim // 2, 3, stride=first, padding=1)
        self.act = nn.GELU()
        self.norm1 = _ChannelsLastNorm(dim // 2)
        self.conv2 = nn.Conv3d(dim // 2, dim, 3, stride=second, padding=1)
        self.norm2 = _ChannelsLastNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.norm1(self.act(self.conv1(x)))))


class FINEStage(nn.Module):
    """A stage of FINE blocks sharing one token grid, with the stage's learned tokens:
    window-token seed g (Nv, C), window positional embedding P (nW, C) and volume tokens V (M, Nw, C)."""

    def __init__(self, config: FINEConfig, stage: int, depth: int, heads: int, drop_paths: list[float], num_cells: int) -> None:
        super().__init__()
        dim = config.stage_dim(stage)
        resolution = config.token_grid(stage)
        window = config.stage_window(stage)
        nv = config.num_window_tokens if config.window_tokens else 0
        self.blocks = nn.ModuleList(
            FINEBlock(dim, resolution, heads, window, shifted=i % 2 == 1, mlp_ratio=config.mlp_ratio,
                      drop_path=drop_paths[i], num_window_tokens=nv, volume_tokens=config.volume_tokens)
            for i in range(depth)
        )
        if nv:
            self.window_token = nn.Parameter(torch.zeros(1, 1, nv, dim))
            self.window_pos = nn.Parameter(torch.zeros(config.windows_per_crop(stage), dim))
            nn.init.trunc_normal_(self.window_token, std=0.02)
            nn.init.trunc_normal_(self.window_pos, std=0.02)
        if config.volume_tokens:
            self.volume_tokens = nn.Parameter(torch.zeros(num_cells, config.num_volume_tokens, dim))
            nn.init.trunc_normal_(self.volume_tokens, std=0.02)
        self.windows = config.windows_per_crop(stage)

    def forward(self, x: Tensor, vol: Tensor | None, cells: Tensor | None, seen: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (B,Z,Y,X,C) channels last; vol (B,M,Nw,C) or None."""
        win = None
        pos = None
        if hasattr(self, "window_token"):
            win = self.window_token.expand(x.shape[0], self.windows, -1, -1)
            pos = self.window_pos
        for block in self.blocks:
            x, win, vol = block(x, win, vol, cells, pos, seen)
        return x, vol


class FINE(nn.Module):
    """FINE (Themyr et al., 2022) for crops of ``config.crop_size``.

    forward(x (B, in_channels, *crop), positions (B, 3) crop centre minus volume centre in
    preprocessed voxels (z, y, x), state) -> FINEOutput. ``positions`` is needed only with
    volume tokens; ``state=None`` starts every sample from the learned volume tokens.
    """

    def __init__(self, config: FINEConfig) -> None:
        super().__init__()
        self.config = config
        self.grid = self.grid_of(config)
        stages = len(config.depths)
        self.patch_embed = PatchEmbedding(config.in_channels, config.embed_dim, config.patch_size)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(1, total - 1) for i in range(total)]  # stochastic depth, linear in depth
        self.encoder = nn.ModuleList()
        self.downsample = nn.ModuleList()
        start = 0
        for s in range(stages):
            d = config.depths[s]
            self.encoder.append(FINEStage(config, s, d, config.num_heads[s], rates[start : start + d], self.grid.num_cells))
            start += d
            if s < stages - 1:
                dim = config.stage_dim(s)
                self.downsample.append(nn.Sequential(_ChannelsLastNorm(dim), nn.Conv3d(dim, 2 * dim, 2, stride=2)))
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i, s in enumerate(range(stages - 2, -1, -1)):
            dim = config.stage_dim(s)
            self.upsample.append(nn.ConvTranspose3d(2 * dim, dim, 2, stride=2))
            d = config.decoder_depths[i]
            self.decoder.append(FINEStage(config, s, d, config.decoder_heads[i], [0.0] * d, self.grid.num_cells))
        self.head = nn.ConvTranspose3d(config.embed_dim, config.num_classes, config.patch_size, stride=config.patch_size)
        self.deep_head = nn.ConvTranspose3d(config.stage_dim(1), config.num_classes, config.patch_size, stride=config.patch_size)
        # Crops seen per cell during training (the warm-up mask: never-trained cells are masked
        # as keys). Counted in training mode only; the authors' code also counts at inference,
        # which makes a model's output depend on what it segmented before.
        self.register_buffer("trained_visits", torch.zeros(self.grid.num_cells, dtype=torch.long))
        self.apply(self._init_weights)

    @staticmethod
    def grid_of(config: FINEConfig) -> VolumeGrid:
        return VolumeGrid(crop=config.crop_size[1:], max_size=config.max_volume_size)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def stage_names(self) -> list[str]:
        return [f"encoder{i}" for i in range(len(self.encoder))] + [f"decoder{i}" for i in range(len(self.decoder))]

    def _stages(self) -> list[tuple[str, FINEStage]]:
        return list(zip(self.stage_names, [*self.encoder, *self.decoder]))

    def initial_state(self, batch_size: int) -> VolumeTokenState:
        """Every sample's volume tokens set to the learned ones, no cell visited."""
        if not self.config.volume_tokens:
            raise ValueError("This model has no volume tokens.")
        tokens = {name: stage.volume_tokens[None].expand(batch_size, -1, -1, -1) for name, stage in self._stages()}
        visits = torch.zeros(batch_size, self.grid.num_cells, dtype=torch.long, device=self.trained_visits.device)
        return VolumeTokenState(tokens, visits)

    def forward(self, x: Tensor, positions: Tensor | None = None, state: VolumeTokenState | None = None,
                deep_supervision: bool = False, return_state: bool = True) -> FINEOutput:
        """``return_state=False`` leaves the state out of the output (a training step whose loss does
        not use it: DistributedDataParallel requires every output to reach the loss)."""
        cfg = self.config
        if tuple(x.shape[2:]) != cfg.crop_size or x.shape[1] != cfg.in_channels:
            raise ValueError(f"FINE '{cfg.name}' takes crops of shape (B, {cfg.in_channels}, {cfg.crop_size}), got {tuple(x.shape)}.")
        b = x.shape[0]
        cells = seen = visits = None
        if cfg.volume_tokens:
            if positions is None:
                raise ValueError("A model with volume tokens needs the crop positions.")
            state = state if state is not None else self.initial_state(b)
            if state.batch_size != b:
                raise ValueError(f"The volume-token state holds {state.batch_size} volumes, the batch {b}.")
            cells = self.grid.cells(positions.to(x.device))
            hit = torch.zeros(b, self.grid.num_cells, dtype=torch.bool, device=x.device).scatter(1, cells, True)
            visits = state.visits.to(x.device) + hit.long()
            seen = (visits > 0) | (self.trained_visits > 0)[None]
            if self.training:
                self.trained_visits += hit.sum(0)
        tokens: dict[str, Tensor] = {}
        h = self.patch_embed(x).movedim(1, -1)
        skips = []
        for s, stage in enumerate(self.encoder):
            name = f"encoder{s}"
            h, tokens_out = stage(h, state.tokens[name] if cells is not None else None, cells, seen)
            if tokens_out is not None:
                tokens[name] = tokens_out
            skips.append(h)
            if s < len(self.downsample):
                h = self.downsample[s](h.movedim(-1, 1)).movedim(1, -1)
        deep = []
        for i, (up, stage) in enumerate(zip(self.upsample, self.decoder)):
            name = f"decoder{i}"
            h = up(h.movedim(-1, 1)).movedim(1, -1) + skips[-2 - i]
            h, tokens_out = stage(h, state.tokens[name] if cells is not None else None, cells, seen)
            if tokens_out is not None:
                tokens[name] = tokens_out
            if deep_supervision and i == len(self.decoder) - 2:
                deep.append(self.deep_head(h.movedim(-1, 1)))
        logits = self.head(h.movedim(-1, 1))
        return FINEOutput(logits, deep, VolumeTokenState(tokens, visits) if cells is not None and return_state else None)


def build_model(config: FINEConfig | str, **overrides) -> FINE:
    """Build a FINE network from a config or the name of one (see ``CONFIGS``)."""
    from .config import get_config

    if isinstance(config, str):
        config = get_config(config, **overrides)
    elif overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    return FINE(config)
