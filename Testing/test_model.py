"""The FINE network: shapes, tokens, cells, ablations, determinism."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from FINESegmentationLib.model import CONFIGS, FINEConfig, VolumeGrid, build_model, get_config
from FINESegmentationLib.model.blocks import FINEBlock


def _positions(b, spread=60.0):
    g = torch.Generator().manual_seed(b)
    return (torch.rand(b, 3, generator=g) - 0.5) * 2 * spread


@pytest.mark.parametrize("name", ["fine-tiny", "fine-small"])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_output_shapes_of_cpu_configs_for_batch_1_to_4(name, batch):
    model = build_model(name).eval()
    cfg = model.config
    with torch.no_grad():
        out = model(torch.randn(batch, 1, *cfg.crop_size), _positions(batch), deep_supervision=True)
    assert out.logits.shape == (batch, cfg.num_classes, *cfg.crop_size), "full-resolution logits must match the crop"
    assert out.deep[0].shape == (batch, cfg.num_classes, *(c // 2 for c in cfg.crop_size)), "deep supervision is half resolution"
    assert out.state.visits.shape == (batch, model.grid.num_cells), "the returned state covers every cell of every sample"


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_fine_base_shapes_match_the_paper_setting(batch):
    with torch.device("meta"):
        model = build_model("fine-base")
        out = model(torch.empty(batch, 1, 64, 128, 128), torch.zeros(batch, 3), deep_supervision=True)
    assert model.config.token_grid(0) == (32, 32, 32) and model.config.windows_per_crop(0) == 512, "BCV setting: 32^3 tokens, 512 windows"
    assert model.grid.grid == (5, 5), "BCV's 660x660 largest volume gives a 5x5 in-plane grid"
    assert out.logits.shape == (batch, 9, 64, 128, 128), "fine-base logits cover the 64x128x128 crop"
    assert out.deep[0].shape == (batch, 9, 32, 64, 64), "fine-base deep supervision is half resolution"


def _grid_model(**overrides):
    # A 3x3 grid so a crop touches 4 of 9 cells.
    return build_model("fine-tiny", max_volume_size=(192, 192), **overrides)


def test_gradient_reaches_exactly_the_volume_tokens_of_the_crop_cells():
    model = _grid_model().train()
    positions = torch.tensor([[0.0, -40.0, 50.0]])
    out = model(torch.randn(1, 1, *model.config.crop_size), positions)
    out.logits.square().mean().backward()
    expected = set(model.grid.cells(positions)[0].tolist())
    assert len(expected) == 4
    for name, stage in [*zip(model.stage_names, [*model.encoder, *model.decoder])]:
        grad = stage.volume_tokens.grad.abs().sum(dim=(1, 2))
        touched = set(torch.nonzero(grad).flatten().tolist())
        assert touched == expected, f"{name}: gradient reached cells {sorted(touched)}, the crop intersects {sorted(expected)}"


def test_through_a_carried_state_every_warmed_up_cell_reaches_the_next_crop():
    # Within one forward the volume MSA only feeds the last block's G-MSA, whose output the
    # voxels never read; its effect reaches the segmentation through the state passed on.
    model = _grid_model().train()
    model.trained_visits.fill_(1)  # every cell seen in training: none is masked any more
    x = torch.randn(1, 1, *model.config.crop_size)
    first = model(x, torch.tensor([[0.0, -60.0, -60.0]]))
    second = model(x, torch.tensor([[0.0, 60.0, 60.0]]), state=first.state)
    second.logits.square().mean().backward()
    grad = model.encoder[0].volume_tokens.grad.abs().sum(dim=(1, 2))
    assert bool((grad > 0).all()), "with all cells warmed up, the MSA over volume tokens lets every cell reach the next crop"


def _two_blocks(window_tokens: bool):
    dim, res, win = 16, (4, 8, 8), (4, 4, 4)
    blocks = [FINEBlock(dim, res, 2, win, shifted=False, num_window_tokens=1 if window_tokens else 0, volume_tokens=False) for _ in range(2)]
    for blk in blocks:  # weights at a trained scale: at init (std 0.02) the token path is real but ~1e-5
        for name, p in blk.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(p, std=0.3)
    nw = (8 // 4) * (8 // 4)
    return blocks, dim, res, nw


@pytest.mark.parametrize("window_tokens", [True, False])
def test_window_tokens_carry_information_between_windows(window_tokens):
    blocks, dim, res, nw = _two_blocks(window_tokens)
    x = torch.randn(1, *res, dim)
    x2 = x.clone()
    x2[:, :, :4, :4] += torch.randn(1, 4, 4, 4, dim)  # change the voxels of window 0 only
    pos = torch.randn(nw, dim) * 0.02
    seed = torch.randn(1, 1, 1, dim) * 0.02

    def run(inp):
        h, win = inp, seed.expand(1, nw, 1, dim) if window_tokens else None
        for blk in blocks:
            h, win, _ = blk(h, win, None, None, pos if window_tokens else None, None)
        return h

    with torch.no_grad():
        changed = (run(x) - run(x2))[:, :, 4:, 4:].abs().max().item()  # window 3
    if window_tokens:
        assert changed > 1e-2, "with window tokens, a change in one window reaches another window's voxels"
    else:
        assert changed == 0.0, "without tokens, unshifted windows are independent"


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-2000, 2000), st.floats(-2000, 2000),
    st.integers(16, 256), st.integers(16, 256), st.integers(16, 1024), st.integers(16, 1024),
)
def test_crops_anywhere_map_to_distinct_valid_cells(py, px, cy, cx, my, mx):
    grid = VolumeGrid(crop=(cy, cx), max_size=(my, mx))
    cells = grid.cells(torch.tensor([[0.0, py, px]]))
    assert cells.shape == (1, grid.cells_per_crop)
    values = cells[0].tolist()
    assert all(0 <= c < grid.num_cells for c in values) and len(set(values)) == len(values), f"cells {values} of a {grid.grid} grid"


def test_crops_at_the_volume_edges_read_the_border_cells():
    grid = VolumeGrid(crop=(128, 128), max_size=(660, 660))  # 5 x 5
    half = 330 - 64
    corners = {(-half, -half): {0, 1, 5, 6}, (half, half): {18, 19, 23, 24}, (-half, half): {3, 4, 8, 9}, (half, -half): {15, 16, 20, 21}}
    for (y, x), expected in corners.items():
        got = set(grid.cells(torch.tensor([[0.0, y, x]]))[0].tolist())
        assert got == expected, f"crop at the ({y}, {x}) corner reads {got}, expected the corner cells {expected}"
    far = set(grid.cells(torch.tensor([[0.0, 5000.0, 5000.0]]))[0].tolist())
    assert far == {18, 19, 23, 24}, "a crop past the far edge clamps to the last cells instead of wrapping to 0"


def test_each_sample_of_a_batch_is_computed_as_if_alone():
    model = _grid_model().eval()
    x = torch.randn(3, 1, *model.config.crop_size)
    pos = torch.tensor([[0.0, -60.0, -60.0], [0.0, 0.0, 0.0], [0.0, 60.0, 60.0]])
    with torch.no_grad():
        batched = model(x, pos).logits
        single = torch.cat([model(x[i : i + 1], pos[i : i + 1]).logits for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-4), "cells are indexed per sample, so batching changes nothing"


def test_both_token_kinds_off_leaves_only_baseline_parameters():
    full = dict(build_model("fine-tiny").named_parameters())
    base = dict(build_model("fine-tiny", window_tokens=False, volume_tokens=False).named_parameters())
    token_parts = ("window_token", "window_pos", "volume_tokens", "global_attn", "volume_attn")
    assert not [n for n in base if any(t in n for t in token_parts)], "the baseline must hold no token parameters"
    assert set(base) == {n for n in full if not any(t in n for t in token_parts)}, "removing the token parts of FINE gives the baseline exactly"
    assert all(base[n].shape == full[n].shape for n in base), "shared parameters keep their shapes"


def test_volume_tokens_without_window_tokens_is_refused():
    with pytest.raises(ValueError, match="Volume tokens need window tokens"):
        get_config("fine-tiny", window_tokens=False, volume_tokens=True)


def test_same_input_and_seed_give_the_same_output():
    def run():
        torch.manual_seed(1234)
        model = build_model("fine-tiny").eval()
        x = torch.randn(2, 1, *model.config.crop_size)
        with torch.no_grad():
            return model(x, _positions(2)).logits

    assert torch.equal(run(), run()), "the network is deterministic for a fixed seed"


def test_the_state_carries_writes_from_one_crop_to_the_next():
    model = _grid_model().eval()
    x = torch.randn(1, 1, *model.config.crop_size)
    a = torch.tensor([[0.0, -60.0, -60.0]])
    b = torch.tensor([[0.0, 60.0, 60.0]])
    with torch.no_grad():
        fresh = model(x, b)
        after_a = model(x, a)
        carried = model(x, b, state=after_a.state)
    assert int(carried.state.visits.sum()) == 8, "two crops of four cells each are counted in the state"
    assert not torch.allclose(fresh.logits, carried.logits), "tokens written by an earlier crop change a later crop's output"
    assert torch.equal(model.trained_visits, torch.zeros_like(model.trained_visits)), "inference does not change the model"


def test_config_round_trips_through_a_dict():
    for cfg in CONFIGS.values():
        assert FINEConfig.from_dict(cfg.to_dict()) == cfg, f"{cfg.name} survives to_dict/from_dict"


def test_wrong_crop_shape_is_refused_with_a_clear_message():
    model = build_model("fine-tiny")
    with pytest.raises(ValueError, match="takes crops of shape"):
        model(torch.randn(1, 1, 16, 64, 64), torch.zeros(1, 3))
