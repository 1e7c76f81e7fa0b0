"""Model configurations: the paper's BCV setting (``fine-base``) and CPU-sized ones.

A config is plain data (it is stored in every checkpoint's metadata as a dict).
Axis order everywhere: (z, y, x).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..labels import NUM_CLASSES


@dataclass(frozen=True)
class FINEConfig:
    """Architecture of one FINE network (nnFormer-style U-shaped 3-D Swin + memory tokens).

    ``window_tokens`` / ``volume_tokens`` are the paper's ablation switches (Table 3);
    both off gives the nnFormer-like baseline. Volume tokens need window tokens,
    because G-MSA (eq. 1, second line) runs over the window tokens.
    """

    name: str = "fine-base"
    crop_size: tuple[int, int, int] = (64, 128, 128)
    patch_size: tuple[int, int, int] = (2, 4, 4)
    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 4
    decoder_depths: tuple[int, ...] = (2, 2, 2)
    decoder_heads: tuple[int, ...] = (24, 12, 6)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    window_tokens: bool = True
    volume_tokens: bool = True
    num_window_tokens: int = 1  # Nv, per window
    num_volume_tokens: int = 1  # Nw, per volume-grid cell
    # Largest preprocessed training volume, in-plane (y, x) voxels: the volume-token grid is
    # floor(max_volume_size / crop) cells per axis (BCV at 0.758 mm: 660 x 660 -> 5 x 5).
    max_volume_size: tuple[int, int] = (660, 660)

    def __post_init__(self) -> None:
        for name in ("crop_size", "patch_size", "depths", "num_heads", "decoder_depths", "decoder_heads", "max_volume_size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.volume_tokens and not self.window_tokens:
            raise ValueError("Volume tokens need window tokens: G-MSA runs over the window tokens of a crop.")
        if len(self.depths) != len(self.num_heads):
            raise ValueError("depths and num_heads must have one entry per encoder stage.")
        if len(self.decoder_depths) != len(self.depths) - 1 or len(self.decoder_heads) != len(self.depths) - 1:
            raise ValueError("The decoder has one stage fewer than the encoder.")
        if self.window_tokens and min(self.depths + self.decoder_depths) < 2:
            # G-MSA updates the window tokens after the voxels' W-MSA, so they reach the
            # voxels only in the next block of the stage.
            raise ValueError("With window tokens every stage needs at least 2 blocks.")
        grid = self.token_grid(0)
        if any(c % p for c, p in zip(self.crop_size, self.patch_size)):
            raise ValueError(f"crop_size {self.crop_size} must be divisible by patch_size {self.patch_size}.")
        for s in range(len(self.depths)):
            res = self.token_grid(s)
            if any(r < 1 for r in res) or any(r * 2**s != g for r, g in zip(res, grid)):
                raise ValueError(f"Stage {s} token grid {res} is not a whole downsampling of {grid}.")
            if any(r % w for r, w in zip(res, self.stage_window(s))):
                raise ValueError(f"Stage {s} token grid {res} is not divisible by its window {self.stage_window(s)}.")

    def token_grid(self, stage: int) -> tuple[int, int, int]:
        """Visual-token grid (z, y, x) of encoder stage ``stage`` (0 = highest resolution)."""
        return tuple((c // p) // 2**stage for c, p in zip(self.crop_size, self.patch_size))  # type: ignore[return-value]

    def stage_window(self, stage: int) -> tuple[int, int, int]:
        """Window of a stage; clipped to the token grid where the grid is smaller (as Swin does)."""
        return tuple(min(self.window_size, r) for r in self.token_grid(stage))  # type: ignore[return-value]

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def windows_per_crop(self, stage: int) -> int:
        n = 1
        for r, w in zip(self.token_grid(stage), self.stage_window(stage)):
            n *= r // w
        return n

    @property
    def volume_grid(self) -> tuple[int, int]:
        """In-plane volume-token cells (y, x); the tokens are constant along z (paper, 3.1)."""
        return tuple(max(1, m // c) for m, c in zip(self.max_volume_size, self.crop_size[1:]))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FINEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown config keys: {sorted(unknown)}.")
        return cls(**data)

    def with_tokens(self, window_tokens: bool, volume_tokens: bool) -> "FINEConfig":
        """The same architecture with the ablation switches set (Table 3 of the paper)."""
        return replace(self, window_tokens=window_tokens, volume_tokens=volume_tokens)


CONFIGS: dict[str, FINEConfig] = {
    # The paper's BCV setting, as in the authors' public code (nnFormer Synapse backbone).
    "fine-base": FINEConfig(),
    # CPU-sized: same shape of network, 4x fewer channels, smaller crop.
    "fine-small": FINEConfig(
        name="fine-small", crop_size=(32, 64, 64), embed_dim=48, num_heads=(3, 6, 12, 24),
        decoder_heads=(12, 6, 3), max_volume_size=(192, 192),
    ),
    # Trains in minutes on two CPU cores (the bundled demo model's architecture).
    "fine-tiny": FINEConfig(
        name="fine-tiny", crop_size=(32, 64, 64), embed_dim=24, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16),
        decoder_heads=(8, 4, 2), max_volume_size=(192, 192),
    ),
}


def get_config(name: str, **overrides: Any) -> FINEConfig:
    """A named config, optionally with fields replaced (e.g. ``window_tokens=False``)."""
    if name not in CONFIGS:
        raise ValueError(f"Unknown model config '{name}'. Choose one of: {', '.join(CONFIGS)}.")
    return replace(CONFIGS[name], **overrides) if overrides else CONFIGS[name]
