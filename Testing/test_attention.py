"""Attention maps from one point: the rows the hooks record, the composition, its geometry, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_ct
from FINESegmentationLib.attention import AttentionMapper, attention_rows, write_figure
from FINESegmentationLib.checkpoints import ModelInfo, Preprocessing
from FINESegmentationLib.errors import InputError
from FINESegmentationLib.model import build_model
from FINESegmentationLib.model.blocks import Attention

ROOT = Path(__file__).resolve().parents[1]
SPACING = (3.0, 3.0, 6.0)


def _model(window_tokens=True, volume_tokens=True, seed=0):
    torch.manual_seed(seed)
    model = build_model("fine-tiny", window_tokens=window_tokens, volume_tokens=volume_tokens, max_volume_size=(192, 192))
    return model.eval(), ModelInfo(config=model.config, preprocessing=Preprocessing(target_spacing=SPACING))


@pytest.fixture(scope="module")
def ct():
    # At the model's spacing and in LPS, so the network grid is the input grid (no resampling blur).
    return make_ct(shape=(32, 128, 128), spacing=SPACING)


CENTRE = (64, 64, 16)


@pytest.fixture(scope="module")
def mapper():
    return AttentionMapper(_model(), device="cpu")


@pytest.fixture(scope="module")
def second_block_map(mapper, ct):
    """With the accumulate bank, from the second block of the first stage (window tokens carry context there)."""
    return mapper.compute(ct, CENTRE, ijk=True, block=1, levels=True)


def _crop_mask(amap, volume):
    net = amap.network
    mask = np.zeros(volume.shape, bool)
    mask[tuple(slice(int(a), int(a + n)) for a, n in zip(net["crop_start_zyx"], net["crop_size_zyx"]))] = True
    return mask


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_recorded_rows_are_the_attention_the_layer_applies(mask_kind):
    torch.manual_seed(1)
    attn = Attention(16, 1)  # one head: the mean over heads is the head itself
    x = torch.randn(2, 7, 16)
    mask = {"none": None, "float": torch.randn(1, 7, 7), "bool": torch.rand(2, 1, 1, 7) > 0.3}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True
    rows = attention_rows(attn, x, slice(None), mask)
    v = torch.nn.functional.linear(x, attn.qkv.weight[32:], attn.qkv.bias[32:])
    expected = attn(x, mask)
    assert torch.allclose(attn.proj(rows @ v), expected, atol=1e-5), "rows x values through the projection give the layer's output"
    assert torch.allclose(rows.sum(-1), torch.ones(2, 7)), "each row is a distribution over the keys"


def test_map_is_normalised_and_has_the_input_geometry(mapper, ct, second_block_map):
    amap = second_block_map
    assert amap.heat.geometry == ct.geometry and amap.heat.shape == ct.shape, "the map lies on the input's grid"
    assert amap.heat.array.dtype == np.float32 and amap.heat.array.min() >= 0 and amap.heat.array.max() == pytest.approx(1.0), "0..1, max 1"
    total = sum(level.array for level in amap.levels.values())
    assert np.allclose(total, amap.heat.array, atol=1e-6), "the three levels add up to the map"
    assert sum(amap.shares[k] for k in ("local", "crop", "volume")) == pytest.approx(1.0), "shares of the three levels"
    assert amap.crop_corners_ras.shape == (8, 3) and amap.grid_planes_ras.shape[1:] == (4, 3), "crop box and grid planes in RAS"
    assert np.allclose(amap.crop_size_mm, (64 * 3.0, 64 * 3.0, 32 * 6.0)), "the crop box is one crop of the network grid"
    for module in mapper.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, "no hook stays on the model"


def test_map_moves_with_the_point(mapper, ct):
    stateless = AttentionMapper((mapper.model, mapper.info), device="cpu", bank="stateless")
    peaks = []
    for ijk in ((30, 40, 8), (100, 90, 24)):
        amap = stateless.compute(ct, ijk, ijk=True, levels=True)
        peak = np.unravel_index(np.argmax(amap.levels["local"].array), ct.shape)[::-1]
        assert np.all(np.abs(np.array(peak) - ijk) <= (16, 16, 8)), "the local term peaks in the point's window"
        peaks.append(amap)
    assert not np.allclose(peaks[0].heat.array, peaks[1].heat.array), "another point, another map"
    assert peaks[0].crop_center_ras != peaks[1].crop_center_ras, "the crop box follows the point"


def test_without_tokens_nothing_lies_outside_the_point_window(ct):
    amap = AttentionMapper(_model(window_tokens=False, volume_tokens=False), device="cpu").compute(ct, CENTRE, ijk=True, block=1)
    heat = amap.heat.array
    assert heat[~_crop_mask(amap, ct)].max() == 0.0, "a Swin/nnFormer block sees nothing outside its crop"
    assert amap.shares["outside_crop"] == 0.0 and amap.shares["outside_window"] == pytest.approx(0.0, abs=1e-6), "only the window"
    assert np.count_nonzero(heat) <= 8 * 16 * 16, "no more voxels than one 8 x 16 x 16 attention window"
    assert amap.levels == {}, "the terms are resampled only when asked for (each costs the map's memory)"


def test_at_block_0_the_window_tokens_carry_nothing_of_the_volume(mapper, ct):
    amap = AttentionMapper((mapper.model, mapper.info), device="cpu", bank="stateless").compute(ct, CENTRE, ijk=True, block=0)
    assert amap.shares["local"] == 1.0 and amap.shares["outside_window"] == pytest.approx(0.0, abs=1e-6), \
        "block 0 reads the learned seed through its window token: only the local term is left"


def test_with_volume_tokens_the_map_reaches_beyond_the_crop(ct, second_block_map):
    amap = second_block_map
    outside = amap.heat.array[~_crop_mask(amap, ct)]
    assert np.count_nonzero(outside) > 0.5 * outside.size, "volume tokens carry context from most of the volume"
    assert amap.shares["outside_crop"] > 0 and amap.shares["volume"] > 0, "mass reaches the rest of the volume"
    window_only = AttentionMapper(_model(volume_tokens=False), device="cpu").compute(ct, CENTRE, ijk=True, block=1)
    assert window_only.heat.array[~_crop_mask(window_only, ct)].max() == 0.0, "window tokens alone stay inside the crop"
    assert window_only.shares["crop"] > 0, "but reach the crop's other windows"


def test_demo_model_deep_stage_looks_substantially_outside_its_crop():
    from FINESegmentationLib.data.phantoms import PhantomGenerator

    case = PhantomGenerator(seed=7, in_plane=128).generate(0)
    kidney = np.argwhere(case.label.array == 3)
    ijk = kidney[len(kidney) // 2][::-1].astype(float)
    amap = AttentionMapper("fine-tiny-phantom", device="cpu", bank="stateless").compute(case.image, ijk, ijk=True, stage="encoder3", block=1)
    assert amap.shares["outside_crop"] > 0.05, f"the trained model's last encoder stage looks outside its crop ({amap.shares})"


def test_accumulate_bank_spreads_the_volume_level_over_the_crops_that_wrote_it(mapper, ct, second_block_map):
    acc = second_block_map
    stateless = AttentionMapper((mapper.model, mapper.info), device="cpu", bank="stateless").compute(ct, CENTRE, ijk=True, block=1, levels=True)
    vol_s = stateless.levels["volume"].array
    # Without a bank no voxel of this volume wrote the tokens: each cell's share is even over its footprint.
    assert len(np.unique(vol_s[vol_s > 0])) <= mapper.model.grid.num_cells, "one value per cell footprint"
    vol_a = acc.levels["volume"].array
    assert len(np.unique(vol_a[vol_a > 0])) > 10 * mapper.model.grid.num_cells, "the windows that wrote the bank shape the map, voxel by voxel"
    assert acc.report["crops"] > 1 and acc.bank == "accumulate" and stateless.bank == "stateless"


@pytest.mark.parametrize("point, ijk, message", [
    ((64, 64, 32), True, "outside the volume"),
    ((-1, 10, 10), True, "outside the volume"),
    ((9999, 0, 0), False, "outside the volume"),
    ((np.nan, 0, 0), False, "three finite coordinates"),
])
def test_a_point_outside_the_volume_is_refused(mapper, ct, point, ijk, message):
    with pytest.raises(InputError, match=message):
        mapper.compute(ct, point, ijk=ijk)


def test_unknown_stage_or_block_is_refused(mapper, ct):
    with pytest.raises(InputError, match="Unknown stage"):
        mapper.compute(ct, (1, 1, 1), ijk=True, stage="middle")
    with pytest.raises(InputError, match="blocks 0 to 1"):
        mapper.compute(ct, (1, 1, 1), ijk=True, block=2)


def test_figure_is_written_atomically(second_block_map, tmp_path):
    amap = second_block_map
    path = write_figure(amap, tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["fig.png"], "one PNG, no partial file"
    with pytest.raises(InputError, match="not a supported output format"):
        write_figure(amap, tmp_path / "fig.jpg")


def test_cli_attention_writes_the_map_figure_and_report(tmp_path):
    from FINESegmentationLib.io import read_volume, write_volume

    image = tmp_path / "ct.nii.gz"
    write_volume(make_ct(shape=(24, 96, 96), spacing=(4.0, 4.0, 8.0)), image)
    env = {"PYTHONPATH": str(ROOT / "FINESegmentation"), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "FINESegmentationLib.cli", "attention", str(image), "--point", "0,-20,60", "-q",
           "-o", str(tmp_path / "heat.nii.gz"), "--png", str(tmp_path / "fig.png"), "--report", str(tmp_path / "r.json"), "--levels"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    heat = read_volume(tmp_path / "heat.nii.gz")
    assert heat.geometry.allclose(read_volume(image).geometry) and heat.array.max() == pytest.approx(1.0), "heat map on the input grid"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stage"] == "encoder0" and report["block"] == 1 and report["point_ras"] == [0.0, -20.0, 60.0], "report"
    assert {p.name for p in tmp_path.iterdir()} == {"ct.nii.gz", "heat.nii.gz", "heat_local.nii.gz", "heat_crop.nii.gz",
                                                    "heat_volume.nii.gz", "fig.png", "r.json"}, "every output, nothing else"
    bad = subprocess.run(cmd[:6] + ["0,-20,900", "-o", str(tmp_path / "other.nii.gz")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "outside the volume" in bad.stderr and "Traceback" not in bad.stderr, "one sentence"
    assert not (tmp_path / "other.nii.gz").exists(), "nothing written for a refused point"
