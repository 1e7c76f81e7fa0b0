"""The Refine section's logic with the Memorizing-SAM refiner on a real MRML scene (slicer-core): a segment in,
the same segment refined in place out (LiteMedSAM's boxes: test_slicer_litemedsam.py)."""
import numpy as np
import pytest
from scipy import ndimage

slicer = pytest.importorskip("slicer")

from FINESegmentationLib.data.phantoms import PhantomGenerator  # noqa: E402
from FINESegmentationLib.errors import InputError  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.mrml import SegmentationOutput, SegmentClass, click_points, segment_mask, write_segmentation_node  # noqa: E402
from FINESegmentationLib.worker import TorchWorker  # noqa: E402
from FINESegmentationRefine.logic import MEMORIZING_SAM, RefineLogic  # noqa: E402

OPTIONS = {"device": "cpu", "refiner": MEMORIZING_SAM}
LIVER = next(o for o in ORGANS if o.name == "liver")


@pytest.fixture(scope="module")
def logic():
    refine = RefineLogic(TorchWorker())
    yield refine
    refine.worker.shutdown(timeout=30)


@pytest.fixture(scope="module")
def case():
    return PhantomGenerator(7, in_plane=128).generate(0)


def _scene_state(scene):
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime()) for i in range(scene.GetNumberOfNodes())]


@pytest.fixture
def nodes(mrml_scene, case):
    """The phantom CT and a FINE-like segmentation whose liver is eroded (a segment with a missed rim to refine)."""
    ct = slicer.util.addVolumeFromArray(case.image.array, case.image.geometry.ijk_to_ras(), name="phantom CT")
    labels = case.label.array.copy()
    liver = labels == LIVER.label
    labels[liver & ~ndimage.binary_erosion(liver, iterations=2)] = 0
    segmentation = write_segmentation_node(
        SegmentationOutput(type(case.label)(labels, case.label.geometry), [SegmentClass(o.label, o.name) for o in ORGANS]), ct
    )
    return ct, segmentation


def _ras_of(case, zyx):
    return case.image.geometry.ijk_to_ras() @ np.array([zyx[2], zyx[1], zyx[0], 1.0])


def _missed_voxel(case, eroded):
    """A voxel of the reference liver that the eroded segment misses, deep in the missed rim's largest part."""
    missed = (case.label.array == LIVER.label) & ~eroded
    return np.argwhere(missed)[len(np.argwhere(missed)) // 2]


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _others(segmentation, ct, skip):
    s = segmentation.GetSegmentation()
    return {s.GetNthSegmentID(i): segment_mask(segmentation, s.GetNthSegmentID(i), ct)
            for i in range(s.GetNumberOfSegments()) if s.GetNthSegmentID(i) != skip}


def test_a_click_changes_the_segment_in_place_within_the_box_and_undo_restores_it(logic, mrml_scene, nodes, case):
    ct, segmentation = nodes
    sid = "liver"
    segment = segmentation.GetSegmentation().GetSegment(sid)
    name, colour = segment.GetName(), segment.GetColor()
    assert segment.HasTag("TerminologyEntry")
    before = segment_mask(segmentation, sid, ct)
    others = _others(segmentation, ct, sid)
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "add")
    points.AddControlPoint(*_ras_of(case, _missed_voxel(case, before))[:3])
    count = mrml_scene.GetNumberOfNodes()

    session = logic.start(ct, segmentation, sid, **OPTIONS)
    assert session.has_memory, "the bundled refiner comes with its memory"
    result = logic.prompt(session, points=click_points(points, None, ct)[0], labels=[1])
    after = segment_mask(segmentation, sid, ct)

    changed = after != before
    outside = np.ones(changed.shape, bool)
    outside[result.crop] = False
    assert changed.any(), "the click changed the segment"
    assert not changed[outside].any(), "only voxels inside the refiner's crop box change"
    assert np.array_equal(after, result.mask), "the segment holds the refiner's answer"
    reference = case.label.array == LIVER.label
    assert _dice(after, reference) >= _dice(before, reference), "a click in the missed rim does not make the liver worse"
    segment = segmentation.GetSegmentation().GetSegment(sid)
    assert (segment.GetName(), segment.GetColor(), segment.HasTag("TerminologyEntry")) == (name, colour, True), \
        "name, colour and terminology are kept"
    assert mrml_scene.GetNumberOfNodes() == count, "the segment is changed in place: no new nodes"
    assert all(np.array_equal(m, others[k]) for k, m in _others(segmentation, ct, sid).items()), "other segments untouched"

    assert logic.undo(session), "there is a click to undo"
    assert np.array_equal(segment_mask(segmentation, sid, ct), before), "Undo restores the segment exactly"
    assert not logic.undo(session), "nothing left to undo"


def test_clicks_with_and_without_memory_both_run_and_add_up(logic, mrml_scene, nodes, case):
    ct, segmentation = nodes
    before = segment_mask(segmentation, "liver", ct)
    session = logic.start(ct, segmentation, "liver", **OPTIONS)
    inside = _ras_of(case, np.argwhere(before)[len(np.argwhere(before)) // 2])[:3]
    missed = _ras_of(case, _missed_voxel(case, before))[:3]
    with_memory = logic.prompt(session, points=[missed], labels=[1], memory=True)
    without = logic.prompt(session, points=[inside], labels=[1], memory=False)
    assert with_memory.used_memory and not without.used_memory, "the Memory switch reaches the refiner"
    assert len(session.undo) == 2 and len(without.prompts.labels) == 2, "the second click is asked with the first"
    logic.undo(session)
    logic.undo(session)
    assert np.array_equal(segment_mask(segmentation, "liver", ct), before), "two undos restore the start"


def test_points_come_from_two_point_lists_in_world_coordinates(mrml_scene, nodes):
    ct, _segmentation = nodes
    add = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "add")
    remove = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "remove")
    add.AddControlPoint(1.0, 2.0, 3.0)
    remove.AddControlPoint(4.0, 5.0, 6.0)
    add.AddControlPoint(7.0, 8.0, 9.0)
    points, labels = click_points(add, remove, ct)
    assert np.allclose(points, [[1, 2, 3], [7, 8, 9], [4, 5, 6]]) and labels.tolist() == [1, 1, 0]


def test_errors_leave_the_segment_and_the_scene_as_they_were(logic, mrml_scene, nodes, case):
    ct, segmentation = nodes
    empty_id = segmentation.GetSegmentation().AddEmptySegment("empty", "empty")
    session = logic.start(ct, segmentation, "liver", **OPTIONS)
    before = _scene_state(mrml_scene)
    mask = segment_mask(segmentation, "liver", ct)
    with pytest.raises(InputError, match="is empty"):
        logic.start(ct, segmentation, empty_id, **OPTIONS)
    with pytest.raises(InputError, match="'kidney' is absent"):
        logic.start(ct, segmentation, "kidney", **OPTIONS)
    with pytest.raises(InputError, match="outside the volume"):
        logic.prompt(session, points=[[900.0, 0.0, 0.0]], labels=[1])
    far = _ras_of(case, (2, 2, 2))[:3]  # inside the volume, far from the liver's crop
    with pytest.raises(InputError, match="outside the .* cube"):
        logic.prompt(session, points=[far], labels=[0])
    assert _scene_state(mrml_scene) == before, "nothing added or modified"
    assert np.array_equal(segment_mask(segmentation, "liver", ct), mask) and not session.undo


def test_every_click_is_applied_to_the_segment_refining_started_from_as_fine_seg_refine_does(logic, mrml_scene, nodes, case):
    """The session's segment after two clicks is what one ``fine-seg refine --seg --points`` call computes from both
    clicks on the segment as it was at the start (not the first click's answer asked again)."""
    from FINESegmentationLib.mrml import volume_from_node

    ct, segmentation = nodes
    before = segment_mask(segmentation, "liver", ct)
    session = logic.start(ct, segmentation, "liver", **OPTIONS)
    inside = _ras_of(case, np.argwhere(before)[len(np.argwhere(before)) // 2])[:3]
    missed = _ras_of(case, _missed_voxel(case, before))[:3]
    logic.prompt(session, points=[missed], labels=[1])
    logic.prompt(session, points=[inside], labels=[0])
    after = segment_mask(segmentation, "liver", ct)

    predictor = logic._loaded[1]
    logic._holder = None  # the check below moves the predictor's crop
    predictor.set_volume(volume_from_node(ct), before)
    expected = predictor.predict(np.array([missed, inside]), np.array([1, 0]), use_memory=True).paste(before)
    assert np.array_equal(after, expected), "both clicks asked at once on the starting segment, as fine-seg refine asks them"
    assert not np.array_equal(after, before), "the clicks changed the segment"
