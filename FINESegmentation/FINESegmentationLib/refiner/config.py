"""Refiner configurations: the architecture and crop of ``refiner-tiny`` (CPU) and ``refiner-base`` (the paper's).

``refiner-base`` is the paper's setting (FastSAM3D / SAM-Med3D sizes: a 128^3 crop
at 1.5 mm, patch 16, 6 blocks of width 768, memory plug-in at block 4, decoder width
384). ``refiner-tiny`` is sized for a CPU: a 64^3 crop at 2.5 mm, patch 8, 4 blocks
of width 64, so that one click after ``set_volume`` costs a few tens of milliseconds.
The model's parts import this module only, so that the builder can import them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import CheckpointError

DEFAULT_REACH_MM = 20.0
"""``RefinerPredictor.predict(reach_mm=...)``: an answer replaces the segment only this close to a click (mm). The
refiner draws the whole organ again on its coarse crop (2.5 mm voxels or more), so without a reach a click that
fixes one spot also coarsens the rest of a segment that refine-all drew at full resolution (README, "A click's
reach")."""
DEFAULT_REACH_FACTOR = 2.0
"""``predict(reach_factor=...)``: a click reaches this many times its distance to the segment's border where that
is farther than ``reach_mm``: a click deep in a missed part (or deep inside a wrong one) marks a larger error."""
REACH_SEARCH_MM = 40.0
"""How far from a click its distance to the segment's border is looked for (so a reach is at most twice this)."""


@dataclass(frozen=True)
class RefinerConfig:
    """Everything that fixes a refiner's architecture and the crop it sees."""

    name: str
    crop_size: int = 64  # voxels per side of the cubic crop
    spacing: float = 2.5  # mm, isotropic; larger for segments that would not fit (see crop.py)
    margin: float = 0.25  # the crop spans the segment's extent plus this fraction on each side, at least
    hu_window: tuple[float, float] = (-160.0, 240.0)  # HU clipped, then mapped to [-1, 1]
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    memory_block: int = 2  # index of the encoder block whose attention reads the memory
    local_ratio: float = 0.7  # fused = local_ratio * local attention + (1 - local_ratio) * memory attention
    knn: int = 3  # examples retrieved from the memory
    prompt_dim: int = 64  # width of the image embedding after the neck, of prompts and of the decoder
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 256
    num_multimask_outputs: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        if self.crop_size % self.patch_size or (self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"The crop size {self.crop_size} must be a multiple of the patch size {self.patch_size}, a power of two.")
        if not 0 <= self.memory_block < self.depth:
            raise ValueError(f"The memory block {self.memory_block} must be one of the {self.depth} encoder blocks.")
        if not 0.0 <= self.local_ratio <= 1.0:
            raise ValueError(f"The local ratio must lie in [0, 1], got {self.local_ratio}.")

    @property
    def grid_size(self) -> int:
        """Patch tokens per side: the image embedding is ``grid_size``^3."""
        return self.crop_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hu_window"] = list(self.hu_window)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RefinerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


CONFIGS: dict[str, RefinerConfig] = {
    "refiner-tiny": RefinerConfig("refiner-tiny"),
    "refiner-base": RefinerConfig(
        "refiner-base", crop_size=128, spacing=1.5, patch_size=16, embed_dim=768, depth=6, num_heads=6,
        memory_block=4, prompt_dim=384, decoder_heads=8, decoder_mlp_dim=2048,
    ),
}


def refiner_config(name: str, **overrides: Any) -> RefinerConfig:
    """A named configuration, optionally with some fields changed (tests use smaller crops)."""
    if name not in CONFIGS:
        raise CheckpointError(f"Unknown refiner configuration '{name}'; use one of: {', '.join(CONFIGS)}.")
    return replace(CONFIGS[name], **overrides)
