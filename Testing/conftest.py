"""Shared fixtures. The engine package lives in ../FINESegmentation (Slicer's module layout)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FINESegmentation"))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A fine-tiny checkpoint with random weights on a coarse 3 x 3 x 6 mm grid (fast on a CPU)."""
    from FINESegmentationLib.checkpoints import ModelInfo, Preprocessing, save_checkpoint
    from FINESegmentationLib.model import build_model

    torch.manual_seed(0)
    model = build_model("fine-tiny")
    info = ModelInfo(config=model.config, preprocessing=Preprocessing(target_spacing=(3.0, 3.0, 6.0)), description="random weights, tests only")
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="session")
def ct_chest_path():
    """A real CT shipped with slicerio (CTChest4.nrrd, MIT licence)."""
    import importlib.resources

    return Path(str(importlib.resources.files("slicerio") / "data" / "CTChest4.nrrd"))


def make_ct(shape=(24, 72, 72), spacing=(4.0, 4.0, 8.0), direction=None, seed=0):
    """A small CT-like volume: air around a soft-tissue ellipse with a bright 'spine' and noise."""
    import numpy as np

    from FINESegmentationLib.volume import Geometry, Volume

    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    cz, cy, cx = [(s - 1) / 2 for s in shape]
    body = ((y - cy) / (0.4 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2 < 1
    a = np.full(shape, -1000.0, np.float32)
    a[body] = 40.0
    a[body & (((y - cy - 0.25 * shape[1]) ** 2 + (x - cx) ** 2) < (0.06 * shape[1]) ** 2)] = 700.0
    a += rng.normal(0, 10, shape).astype(np.float32)
    geometry = Geometry(spacing=spacing, origin=(-cx * spacing[0], -cy * spacing[1], 0.0), direction=direction or (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return Volume(a, geometry)
