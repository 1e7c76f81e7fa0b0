"""Eq. 2 of the FINE paper against the attention cost measured on the real modules."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from FINESegmentationLib.model import build_model
from FINESegmentationLib.model.complexity import block_attention_macs, eq2_complexity, stage_sizes


def _measured_block_macs(model, stage):
    """Multiply-accumulates of each attention module of the first block of an encoder stage, for one crop."""
    cfg = model.config
    block = model.encoder[stage].blocks[0]
    nW = cfg.windows_per_crop(stage)
    c = cfg.stage_dim(stage)
    x = torch.randn(1, *cfg.token_grid(stage), c)
    nv = cfg.num_window_tokens if cfg.window_tokens else 0
    win = torch.randn(1, nW, nv, c) if nv else None
    vol = cells = seen = None
    if cfg.volume_tokens:
        vol = torch.randn(1, model.grid.num_cells, cfg.num_volume_tokens, c)
        cells = model.grid.cells(torch.zeros(1, 3))
        seen = torch.ones(1, model.grid.num_cells, dtype=torch.bool)
    pos = torch.randn(nW, c) if nv else None
    # The math backend runs attention as matmuls the counter sees (fused CPU kernels are not counted).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        block(x, win, vol, cells, pos, seen)
    counts = counter.get_flop_counts()
    total = lambda key: sum(counts.get(f"FINEBlock.{key}", {}).values()) // 2  # FLOPs -> MACs
    return {"w_msa": total("attn"), "g_msa": total("global_attn"), "msa": total("volume_attn")}


@pytest.mark.parametrize("tokens", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("stage", [0, 2])
def test_exact_attention_count_equals_the_flops_of_the_modules(tokens, stage):
    model = build_model("fine-small", window_tokens=tokens[0], volume_tokens=tokens[1])
    sizes = stage_sizes(model.config, stage)
    assert _measured_block_macs(model, stage) == block_attention_macs(sizes), "the exact count is what the modules compute"


def test_eq2_equals_the_projection_cost_and_underestimates_the_token_products():
    model = build_model("fine-small")
    s = stage_sizes(model.config, 0)
    measured = _measured_block_macs(model, 0)
    tokens_total = s.N * (s.Nu + s.Nv) + (s.N * s.Nv + s.Nw_cap) + s.M * s.Nw
    projections = 4 * s.c * s.c * tokens_total
    products = sum(measured.values()) - projections
    assert eq2_complexity(s) == projections + 2 * s.c * tokens_total, "eq. 2 is 4c^2 L + 2c L over all tokens"
    assert products == 2 * s.c * (s.N * (s.Nu + s.Nv) ** 2 + (s.N * s.Nv + s.Nw_cap) ** 2 + (s.M * s.Nw) ** 2), (
        "the measured token-token products are 2c L_s^2 per sequence, not eq. 2's 2c L_s"
    )


def test_token_overhead_is_small_as_eq2_says():
    full = build_model("fine-small")
    base = build_model("fine-small", window_tokens=False, volume_tokens=False)
    for stage in range(4):
        with_tokens = sum(_measured_block_macs(full, stage).values())
        without = sum(_measured_block_macs(base, stage).values())
        s_full, s_base = stage_sizes(full.config, stage), stage_sizes(base.config, stage)
        eq2_overhead = eq2_complexity(s_full) / eq2_complexity(s_base) - 1
        measured_overhead = with_tokens / without - 1
        assert measured_overhead >= 0 and eq2_overhead >= 0
        if stage == 0:  # many windows of 64 voxels: one token per window is a few percent
            assert measured_overhead < 0.10 and eq2_overhead < 0.10, f"stage 0 token overhead {measured_overhead:.3f} (eq. 2: {eq2_overhead:.3f})"
