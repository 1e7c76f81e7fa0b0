"""The Logic's attention maps on a real MRML scene (slicer-core): a markups point in, heat map, crop ROI and grid out."""
import threading

import numpy as np
import pytest

from conftest import make_ct

slicer = pytest.importorskip("slicer")

from FINESegmentationLib.errors import CancelledError, InputError  # noqa: E402
from FINESegmentationLib.io import read_volume  # noqa: E402
from FINESegmentationLib.mrml import FINESegmentationLogicCore, volume_from_node  # noqa: E402

OPTIONS = {"device": "cpu", "bank": "stateless"}


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    core = FINESegmentationLogicCore(cache=tmp_path_factory.mktemp("cache"))
    yield core
    core.worker.shutdown(timeout=30)


def _scene_state(scene):
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime()) for i in range(scene.GetNumberOfNodes())]


@pytest.fixture
def ct_node(mrml_scene):
    volume = make_ct(shape=(24, 96, 96), spacing=(3.0, 3.0, 6.0))
    return slicer.util.addVolumeFromArray(volume.array, volume.geometry.ijk_to_ras(), name="CT")


def _point_list(scene, ras):
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "attention point")
    points.AddControlPoint(*ras)
    return points


def test_point_list_gives_a_heat_map_crop_box_and_grid_on_the_ct(logic, mrml_scene, ct_node, tiny_checkpoint):
    composite = mrml_scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    centre = np.array([0.0, 0.0, 60.0])  # make_ct centres the body on x = y = 0
    points = _point_list(mrml_scene, centre)
    amap, nodes = logic.attentionMap(ct_node, points, model=str(tiny_checkpoint), stage="encoder0", block=1, opacity=0.4, **OPTIONS)
    heat = volume_from_node(nodes.heat)
    ct = volume_from_node(ct_node)
    assert heat.geometry.allclose(ct.geometry) and heat.shape == ct.shape, "the heat map lies on the CT's grid"
    assert np.allclose(heat.array, amap.heat.array) and heat.array.max() == pytest.approx(1.0), "the node holds the map, max 1"
    assert np.allclose(amap.point_ras, centre), "the map starts from the list's point"
    assert composite.GetForegroundVolumeID() == nodes.heat.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.4), \
        "the map is the foreground layer at the chosen opacity"
    display = nodes.heat.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetWindow() == pytest.approx(1.0), "0..1 window, faint values transparent"
    centre_world = [0.0, 0.0, 0.0]
    nodes.crop.GetCenterWorld(centre_world)
    assert np.allclose(centre_world, amap.crop_center_ras, atol=1e-3), "the ROI is the crop that holds the point"
    assert np.allclose(nodes.crop.GetSize(), amap.crop_size_mm), "the ROI has the crop's size"
    bounds = [0.0] * 6
    nodes.crop.GetRASBounds(bounds)
    corners = amap.crop_corners_ras
    assert np.allclose(bounds[::2], corners.min(0), atol=1e-3) and np.allclose(bounds[1::2], corners.max(0), atol=1e-3), "ROI bounds"
    assert nodes.grid.GetPolyData().GetNumberOfCells() == len(amap.grid_planes_ras) > 0, "one quad per cell boundary"
    assert nodes.grid.GetDisplayNode().GetVisibility2D(), "the grid shows as lines in the slice views"

    count = mrml_scene.GetNumberOfNodes()
    points.AddControlPoint(*(centre + np.array([60.0, 40.0, 0.0])))
    second, again = logic.attentionMap(ct_node, points, model=str(tiny_checkpoint), nodes=nodes, **OPTIONS)
    assert (again.heat, again.crop, again.grid) == (nodes.heat, nodes.crop, nodes.grid) and mrml_scene.GetNumberOfNodes() == count, \
        "Show again updates the same nodes"
    assert not np.allclose(volume_from_node(nodes.heat).array, heat.array), "the map follows the new (last) point"


def test_saving_the_map_writes_it_with_its_geometry(logic, mrml_scene, ct_node, tiny_checkpoint, tmp_path):
    amap, nodes = logic.attentionMap(ct_node, (0.0, 0.0, 60.0), model=str(tiny_checkpoint), **OPTIONS)
    path = logic.saveAttentionMap(nodes.heat, tmp_path / "attention.nii.gz")
    saved = read_volume(path)
    assert saved.geometry.allclose(amap.heat.geometry) and np.allclose(saved.array, amap.heat.array), "saved as shown"


def test_errors_and_cancel_leave_the_scene_as_it_was(logic, mrml_scene, ct_node, tiny_checkpoint):
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "no points")
    outside = _point_list(mrml_scene, (900.0, 0.0, 0.0))
    before = _scene_state(mrml_scene)
    with pytest.raises(InputError, match="Place a point first"):
        logic.attentionMap(ct_node, empty, model=str(tiny_checkpoint), **OPTIONS)
    with pytest.raises(InputError, match="outside the volume"):
        logic.attentionMap(ct_node, outside, model=str(tiny_checkpoint), **OPTIONS)
    with pytest.raises(InputError, match="Unknown stage"):
        logic.attentionMap(ct_node, (0.0, 0.0, 60.0), stage="encoder7", model=str(tiny_checkpoint), **OPTIONS)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        logic.attentionMap(ct_node, (0.0, 0.0, 60.0), model=str(tiny_checkpoint), device="cpu", bank="accumulate", cancel=cancel)
    assert _scene_state(mrml_scene) == before, "nothing added or modified"
