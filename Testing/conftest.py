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


def _random_checkpoint(tmp_path_factory, name: str, spacing, seed: int):
    """A fine-tiny checkpoint with random weights on a coarse grid (fast on a CPU)."""
    from FINESegmentationLib.checkpoints import ModelInfo, Preprocessing, save_checkpoint
    from FINESegmentationLib.model import build_model

    torch.manual_seed(seed)
    model = build_model("fine-tiny")
    info = ModelInfo(config=model.config, preprocessing=Preprocessing(target_spacing=spacing), description="random weights, tests only")
    path = tmp_path_factory.mktemp("models") / f"{name}.pt"
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Random weights on a 3 x 3 x 6 mm grid."""
    return _random_checkpoint(tmp_path_factory, "tiny", (3.0, 3.0, 6.0), 0)


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


@pytest.fixture(scope="session")
def coarse_checkpoint(tmp_path_factory):
    """Random weights on an 8 x 8 x 16 mm grid: one crop covers a chest CT (MRML tests)."""
    return _random_checkpoint(tmp_path_factory, "coarse", (8.0, 8.0, 16.0), 1)


@pytest.fixture
def mrml_scene():
    """A real MRML scene (slicer-core) with the Volumes, Segmentations, Markups, Colors and Subject Hierarchy logics.

    ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` are set as in 3D Slicer, so the
    ``slicer.util`` helpers work; both are restored afterwards.
    """
    import types

    slicer = pytest.importorskip("slicer")
    import vtk

    scene = slicer.vtkMRMLScene()
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(scene)
    # The Colors logic complains that it has no home folder for colour files; none are needed here.
    warnings = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        logics = {}
        for name, cls in (("colors", slicer.vtkSlicerColorLogic), ("volumes", slicer.vtkSlicerVolumesLogic),
                          ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                          ("markups", slicer.vtkSlicerMarkupsLogic), ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
            logic = cls()
            logic.SetMRMLApplicationLogic(application)
            logic.SetMRMLScene(scene)
            logics[name] = logic
        # Module logics find each other through the application logic, by module name, as in Slicer.
        application.SetColorLogic(logics["colors"])
        for module, name in (("Colors", "colors"), ("Volumes", "volumes"), ("Segmentations", "segmentations"),
                             ("Markups", "markups"), ("SubjectHierarchy", "subjecthierarchy")):
            application.SetModuleLogic(module, logics[name])
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warnings)
    saved = {name: getattr(slicer, name) for name in ("mrmlScene", "modules") if hasattr(slicer, name)}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in logics.items()})
    yield scene
    scene.Clear(True)
    for name in ("mrmlScene", "modules"):
        if name in saved:
            setattr(slicer, name, saved[name])
        else:
            delattr(slicer, name)
