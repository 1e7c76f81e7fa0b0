"""Attention cost of a FINE block: the paper's eq. 2 and an exact count.

Symbols as in the paper: c channels; N windows in the crop, Nu visual tokens per
window, Nv window tokens per window; Nw_cap volume tokens of the cells the crop
intersects (K cells x Nw); M cells with Nw volume tokens each.

Eq. 2:  Omega(FINE) = 2c (N(Nu + 2Nv) + Nw_cap + M Nw)(2c + 1)
                    = 4c^2 L + 2c L,   L = N(Nu + Nv) + (N Nv + Nw_cap) + M Nw,

i.e. every token of the three attentions (W-MSA, G-MSA, MSA over volume tokens)
counted once. Its 4c^2 L term is exactly the cost of the q, k, v and output
projections. Its 2c L term stands in for the token-token products, which really
cost 2c L_s^2 for a sequence of length L_s (q k^T and attention x v, one
multiply-add per entry per channel). So eq. 2 is exact for the projections and
an underestimate of the quadratic part; :func:`block_attention_macs` gives the
exact multiply-accumulate count that the modules perform, and the tests check it
against a FLOP count of the real modules.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import FINEConfig
from .tokens import VolumeGrid


@dataclass(frozen=True)
class BlockSizes:
    """The sizes that enter eq. 2 for one block of one stage."""

    c: int
    N: int
    Nu: int
    Nv: int
    Nw_cap: int
    M: int
    Nw: int


def eq2_complexity(s: BlockSizes) -> int:
    """The FINE paper's eq. 2 for one block (multiply-accumulates)."""
    return 2 * s.c * (s.N * (s.Nu + 2 * s.Nv) + s.Nw_cap + s.M * s.Nw) * (2 * s.c + 1)


def attention_macs(length: int, c: int, sequences: int = 1) -> int:
    """Exact multiply-accumulates of multi-head self-attention over ``sequences`` sequences
    of ``length`` tokens: 4 L c^2 for the projections + 2 L^2 c for q k^T and attention x v."""
    return sequences * (4 * length * c * c + 2 * length * length * c)


def block_attention_macs(s: BlockSizes) -> dict[str, int]:
    """Exact attention cost of one FINE block, split as in eq. 1; zero where a token kind is off."""
    parts = {"w_msa": attention_macs(s.Nu + s.Nv, s.c, s.N), "g_msa": 0, "msa": 0}
    if s.Nv:
        parts["g_msa"] = attention_macs(s.N * s.Nv + s.Nw_cap, s.c)
    if s.M:
        parts["msa"] = attention_macs(s.M * s.Nw, s.c)
    return parts


def stage_sizes(config: FINEConfig, stage: int) -> BlockSizes:
    """Eq. 2's sizes for a block of encoder stage ``stage`` (decoder stages share the sizes of their level)."""
    grid = VolumeGrid(crop=config.crop_size[1:], max_size=config.max_volume_size)
    nu = 1
    for w in config.stage_window(stage):
        nu *= w
    nv = config.num_window_tokens if config.window_tokens else 0
    vt = config.volume_tokens
    return BlockSizes(
        c=config.stage_dim(stage),
        N=config.windows_per_crop(stage),
        Nu=nu,
        Nv=nv,
        Nw_cap=grid.cells_per_crop * config.num_volume_tokens if vt else 0,
        M=grid.num_cells if vt else 0,
        Nw=config.num_volume_tokens if vt else 0,
    )


def network_attention_cost(config: FINEConfig) -> dict[str, int]:
    """Eq. 2 and the exact attention count summed over every block of the network
    (encoder and decoder), for one crop."""
    eq2 = exact = 0
    levels = [(s, d) for s, d in enumerate(config.depths)]
    levels += [(len(config.depths) - 2 - i, d) for i, d in enumerate(config.decoder_depths)]
    for stage, depth in levels:
        sizes = stage_sizes(config, stage)
        eq2 += depth * eq2_complexity(sizes)
        exact += depth * sum(block_attention_macs(sizes).values())
    return {"eq2_macs": eq2, "exact_macs": exact}
