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
