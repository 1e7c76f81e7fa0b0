"""The Slicer Logic on a real MRML scene (slicer-core): volume nodes in, segmentation nodes out, batches of files.

Every run uses a random-weight fine-tiny model on a coarse grid: the tests check
what the Logic does with the scene, not how well the network segments.
"""
import hashlib
import json
import shutil
import threading

import numpy as np
import pytest
import slicerio

from conftest import make_ct

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)

from FINESegmentationLib import Segmenter  # noqa: E402
from FINESegmentationLib.errors import CancelledError, CheckpointError, InputError  # noqa: E402
from FINESegmentationLib.inference import Progress  # noqa: E402
from FINESegmentationLib.io import read_volume, terminology_entry, write_volume  # noqa: E402
from FINESegmentationLib.labels import ORGANS  # noqa: E402
from FINESegmentationLib.mrml import FINESegmentationLogicCore, SegmentationOutput, volume_from_node  # noqa: E402
from FINESegmentationLib.volume import Geometry  # noqa: E402
from FINESegmentationLib.weights import DownloadProgress, import_checkpoint, local_checkpoint, model_choices  # noqa: E402

FAST = {"device": "cpu", "bank": "stateless", "fast": True}


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    core = FINESegmentationLogicCore(cache=tmp_path_factory.mktemp("cache"))
    yield core
    core.worker.shutdown(timeout=30)


@pytest.fixture
def chest_node(mrml_scene, ct_chest_path):
    """CTChest4.nrrd loaded the way Slicer loads a file: a storage node read by the Volumes logic."""
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(ct_chest_path), "CTChest", 0)
    assert node is not None, "the Volumes logic reads the test CT"
    return node


def _volume_node(volume, name="synthetic CT"):
    return slicer.util.addVolumeFromArray(volume.array, volume.geometry.ijk_to_ras(), name=name)


def _segments(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]


def _segment_ids(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _tag(segment, name):
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def _matrix(get):
    m = vtk.vtkMatrix4x4()
    get(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _scene_state(scene):
    """The IDs of every node in the scene and each node's modification time."""
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime()) for i in range(scene.GetNumberOfNodes())]


def test_volume_node_becomes_a_volume_with_the_nodes_geometry(chest_node, ct_chest_path):
    volume = volume_from_node(chest_node)
    on_disk = read_volume(ct_chest_path)
    assert volume.shape == on_disk.shape and np.array_equal(volume.array, on_disk.array), "voxels read from MRML equal the file's"
    assert volume.geometry.allclose(on_disk.geometry, atol=1e-6), "IJK-to-RAS of the node gives the file's LPS geometry"


def test_real_ct_gets_named_coloured_coded_segments_on_the_volumes_grid(logic, chest_node, coarse_checkpoint):
    node = logic.segment(chest_node, model=str(coarse_checkpoint), **FAST)

    assert _segment_ids(node) == [o.name.replace(" ", "_") for o in ORGANS], "one segment per organ, in label order"
    for segment, organ in zip(_segments(node), ORGANS):
        assert segment.GetName() == organ.name
        assert np.allclose(segment.GetColor(), organ.color_float), f"{organ.name} has its GenericAnatomyColors colour"
        assert _tag(segment, "TerminologyEntry") == terminology_entry(organ), f"{organ.name} carries its SNOMED CT terminology"

    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()).GetID() == chest_node.GetID()
    labelmap = node.GetBinaryLabelmapInternalRepresentation(node.GetSegmentation().GetNthSegmentID(0))
    assert np.array_equal(_matrix(labelmap.GetImageToWorldMatrix), _matrix(chest_node.GetIJKToRASMatrix)), \
        "the label map lies exactly on the volume's IJK-to-RAS grid"
    assert labelmap.GetDimensions() == chest_node.GetImageData().GetDimensions()

    expected = Segmenter(str(coarse_checkpoint), device="cpu", bank="stateless", fast=True).segment(volume_from_node(chest_node)).labels.array
    for segment_id, organ in zip(_segment_ids(node), ORGANS):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, chest_node)
        assert np.array_equal(mask > 0, expected == organ.label), f"segment {segment_id} holds exactly the engine's {organ.name} voxels"


def test_new_segmentation_sits_in_the_volumes_study_and_under_its_transform(logic, mrml_scene, coarse_checkpoint):
    c, s = np.cos(0.4), np.sin(0.4)
    ct = make_ct(shape=(12, 40, 40), spacing=(6.0, 7.0, 12.0), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    volume_node = _volume_node(ct)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "patient position")
    volume_node.SetAndObserveTransformNodeID(transform.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "abdomen CT study")
    hierarchy.CreateItem(study, volume_node)

    node = logic.segment(volume_node, model=str(coarse_checkpoint), **FAST)

    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study, "the segmentation is in the volume's study (DICOM SEG export)"
    assert node.GetTransformNodeID() == transform.GetID(), "the segmentation moves with the volume"
    labelmap = node.GetBinaryLabelmapInternalRepresentation(_segment_ids(node)[0])
    assert np.array_equal(_matrix(labelmap.GetImageToWorldMatrix), _matrix(volume_node.GetIJKToRASMatrix)), "oblique geometry is kept"
    assert Geometry.from_ras_matrix(_matrix(labelmap.GetImageToWorldMatrix)).allclose(ct.geometry), "and equals the CT's"


def test_cancel_leaves_the_scene_as_it_was(logic, chest_node, mrml_scene, tiny_checkpoint):
    # The finer tiny_checkpoint takes a dozen crops over the chest CT, so the cancel lands mid-run.
    chosen = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's segmentation")
    chosen.GetSegmentation().AddEmptySegment("tumour", "tumour")
    before = _scene_state(mrml_scene)
    cancel = threading.Event()
    seen = []

    def on_progress(event):
        seen.append(event)
        if isinstance(event, Progress):
            cancel.set()

    with pytest.raises(CancelledError):
        logic.segment(chest_node, chosen, model=str(tiny_checkpoint), progress=on_progress, cancel=cancel, **FAST)
    crops = [e for e in seen if isinstance(e, Progress)]
    assert crops and crops[-1].crop < crops[-1].crops, "the run had started and stopped before its last crop"
    assert _scene_state(mrml_scene) == before, "same nodes, same node count, none modified"
    assert _segment_ids(chosen) == ["tumour"]


def test_errors_leave_the_scene_as_it_was(logic, mrml_scene, coarse_checkpoint):
    nan_ct = make_ct(shape=(12, 40, 40))
    nan_ct.array[3, 4, 5] = np.nan
    nan_node = _volume_node(nan_ct, "damaged CT")
    label_node = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    before = _scene_state(mrml_scene)
    with pytest.raises(InputError, match="NaN"):
        logic.segment(nan_node, model=str(coarse_checkpoint), **FAST)
    with pytest.raises(InputError, match="not a CT image"):
        logic.segment(label_node, model=str(coarse_checkpoint), **FAST)
    with pytest.raises(CheckpointError, match="Unknown model"):
        logic.segment(nan_node, model="no-such-model", **FAST)
    assert _scene_state(mrml_scene) == before, "a refused volume or model changes nothing in the scene"


def test_an_existing_segmentation_is_replaced_only_when_chosen(logic, mrml_scene, coarse_checkpoint):
    volume_node = _volume_node(make_ct(shape=(12, 40, 40), spacing=(6.0, 6.0, 12.0)))
    first = logic.segment(volume_node, model=str(coarse_checkpoint), **FAST)
    first_state = (_segment_ids(first), first.GetMTime())
    second = logic.segment(volume_node, model=str(coarse_checkpoint), **FAST)
    assert second.GetID() != first.GetID(), "without a chosen output, every run makes a new segmentation"
    assert (_segment_ids(first), first.GetMTime()) == first_state, "and the earlier one is left untouched"

    chosen = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's segmentation")
    chosen.GetSegmentation().AddEmptySegment("tumour", "tumour")
    count = mrml_scene.GetNumberOfNodes()
    result = logic.segment(volume_node, chosen, model=str(coarse_checkpoint), **FAST)
    assert result.GetID() == chosen.GetID() and mrml_scene.GetNumberOfNodes() == count, "the chosen node is filled, no node is added"
    assert _segment_ids(chosen) == ["tumour"] + [o.name.replace(" ", "_") for o in ORGANS], "the user's own segments are kept"
    again = logic.segment(volume_node, chosen, model=str(coarse_checkpoint), **FAST)
    assert _segment_ids(again) == _segment_ids(chosen) and len(_segment_ids(again)) == 1 + len(ORGANS), "a rerun replaces the organs, not adds more"


def test_a_segmentation_under_another_transform_is_refused(logic, mrml_scene, coarse_checkpoint):
    volume_node = _volume_node(make_ct(shape=(12, 40, 40), spacing=(6.0, 6.0, 12.0)))
    chosen = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moved segmentation")
    chosen.SetAndObserveTransformNodeID(mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(InputError, match="different transform"):
        logic.segment(volume_node, chosen, model=str(coarse_checkpoint), **FAST)
    assert _segment_ids(chosen) == []


def test_a_volume_changed_during_the_run_is_not_written(logic, mrml_scene, coarse_checkpoint):
    volume_node = _volume_node(make_ct(shape=(12, 40, 40), spacing=(6.0, 6.0, 12.0)))
    job = logic.startSegmentation(logic.volumeFromNode(volume_node), model=str(coarse_checkpoint), **FAST)
    output = job.wait()
    assert isinstance(output, SegmentationOutput)
    volume_node.SetSpacing(1.0, 1.0, 1.0)
    count = mrml_scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="changed while it was being segmented"):
        logic.importResult(output, volume_node)
    assert mrml_scene.GetNumberOfNodes() == count


def test_a_failure_while_writing_the_result_removes_the_half_made_node(logic, mrml_scene, coarse_checkpoint, monkeypatch):
    from FINESegmentationLib import mrml

    volume_node = _volume_node(make_ct(shape=(12, 40, 40), spacing=(6.0, 6.0, 12.0)))
    output = logic.startSegmentation(logic.volumeFromNode(volume_node), model=str(coarse_checkpoint), **FAST).wait()
    before = [mrml_scene.GetNthNode(i).GetID() for i in range(mrml_scene.GetNumberOfNodes())]

    def fail(*args):
        raise RuntimeError("subject hierarchy unavailable")

    monkeypatch.setattr(mrml, "_place_in_study", fail)
    with pytest.raises(RuntimeError):
        logic.importResult(output, volume_node)
    assert [mrml_scene.GetNthNode(i).GetID() for i in range(mrml_scene.GetNumberOfNodes())] == before, \
        "neither the new segmentation nor its display node stays in the scene"


def test_progress_reaches_the_caller_on_its_own_thread(logic, chest_node, coarse_checkpoint):
    threads = set()
    events = []

    def on_progress(event):
        threads.add(threading.get_ident())
        events.append(event)

    logic.segment(chest_node, model=str(coarse_checkpoint), device="cpu", bank="accumulate", refine_all=False, progress=on_progress)
    crops = [e for e in events if isinstance(e, Progress)]
    assert threads == {threading.get_ident()}, "callbacks run on the caller's thread, torch on the worker"
    assert {p.pass_index for p in crops} == {1, 2} and crops[-1].crop == crops[-1].crops, "pass i/2 and crop i/N are reported"


def test_batch_segments_every_file_and_reports_a_bad_one(logic, tmp_path, ct_chest_path, coarse_checkpoint, mrml_scene):
    inputs = tmp_path / "in"
    inputs.mkdir()
    chest = inputs / "chest.nrrd"
    shutil.copyfile(ct_chest_path, chest)
    synthetic = write_volume(make_ct(shape=(12, 40, 40), spacing=(6.0, 6.0, 12.0)), inputs / "synthetic.nii.gz")
    broken = inputs / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    out.mkdir()
    count = mrml_scene.GetNumberOfNodes()
    calls = []

    results = logic.segmentFiles([chest, broken, synthetic], out, model=str(coarse_checkpoint),
                                 progress=lambda i, n, event: calls.append((i, n)), **FAST)

    assert [r["output"] for r in results] == [str(out / "chest.seg.nrrd"), None, str(out / "synthetic.seg.nrrd")]
    assert "Cannot read" in results[1]["error"], "a bad case is reported in one sentence and the batch goes on"
    for result in (results[0], results[2]):
        segmentation = slicerio.read_segmentation(result["output"])
        assert [s["name"] for s in segmentation["segments"]] == [o.name for o in ORGANS]
        assert result["report"]["model"] == str(coarse_checkpoint)
    assert sorted(p.name for p in out.iterdir()) == ["chest.seg.nrrd", "synthetic.seg.nrrd"], "nothing is left for the bad case"
    assert {c[0] for c in calls} == {0, 2} and {c[1] for c in calls} == {3}, "progress names the case and the case count"
    assert mrml_scene.GetNumberOfNodes() == count, "a batch does not load anything into the scene"


def test_a_cancelled_batch_keeps_finished_files_and_writes_no_partial_one(logic, tmp_path, tiny_checkpoint, ct_chest_path):
    first = write_volume(make_ct(shape=(12, 40, 40), spacing=(6.0, 6.0, 12.0)), tmp_path / "a.nii.gz")
    second = tmp_path / "b.nrrd"  # a dozen crops with tiny_checkpoint, so the cancel lands mid-case
    shutil.copyfile(ct_chest_path, second)
    out = tmp_path / "out"
    out.mkdir()
    cancel = threading.Event()

    def on_progress(index, count, event):
        if index == 1 and isinstance(event, Progress):
            cancel.set()

    with pytest.raises(CancelledError, match="after 1 of 2"):
        logic.segmentFiles([first, second], out, model=str(tiny_checkpoint), progress=on_progress, cancel=cancel, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd"]


def test_batch_refuses_outputs_that_would_collide(logic, tmp_path, coarse_checkpoint):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_volume(make_ct(shape=(12, 40, 40)), tmp_path / "x" / "ct.nii.gz")
    b = write_volume(make_ct(shape=(12, 40, 40)), tmp_path / "y" / "ct.nii.gz")
    with pytest.raises(InputError, match="same name"):
        logic.segmentFiles([a, b], tmp_path, model=str(coarse_checkpoint), **FAST)
    with pytest.raises(InputError, match="does not exist"):
        logic.segmentFiles([a], tmp_path / "missing", model=str(coarse_checkpoint), **FAST)


def test_the_loaded_model_is_reused_between_runs(logic, chest_node, coarse_checkpoint):
    logic.segment(chest_node, model=str(coarse_checkpoint), **FAST)
    loaded = logic._loaded[1]
    logic.segment(chest_node, model=str(coarse_checkpoint), device="cpu", bank="stateless", fast=False, tta=False, refine_all=False)
    assert logic._loaded[1] is loaded, "changing quality or bank mode does not reload the model"


def test_classes_of_a_custom_checkpoint_become_segments_too(logic, chest_node, tmp_path):
    from FINESegmentationLib.checkpoints import ModelInfo, Preprocessing, save_checkpoint
    from FINESegmentationLib.model import build_model

    model = build_model("fine-tiny", num_classes=3)
    info = ModelInfo(config=model.config, class_names=("background", "tumour", "liver"), label_values=(0, 1, 2),
                     preprocessing=Preprocessing(target_spacing=(8.0, 8.0, 16.0)))
    save_checkpoint(tmp_path / "custom.pt", model, info)
    node = logic.segment(chest_node, model=str(tmp_path / "custom.pt"), **FAST)
    tumour, liver = _segments(node)
    assert (tumour.GetName(), tumour.GetLabelValue(), liver.GetName(), liver.GetLabelValue()) == ("tumour", 1, "liver", 2)
    assert _tag(liver, "TerminologyEntry") == terminology_entry(ORGANS[4])
    assert _tag(tumour, "TerminologyEntry") not in {terminology_entry(o) for o in ORGANS}, \
        "a class that is not a known organ keeps Slicer's default terminology, not an organ's code"
    assert not np.allclose(tumour.GetColor(), liver.GetColor())


def test_device_choices_end_with_the_cpu(logic):
    choices = logic.deviceChoices()
    assert choices[-1][0] == "cpu" and all(label.startswith(device) for device, label in choices)


# --------------------------------------------------------------------------- model weights


@pytest.fixture
def registry(tmp_path, monkeypatch, coarse_checkpoint):
    """A registry with a bundled model, a downloadable one (file:// URL) and one with neither."""
    resources = tmp_path / "Resources"
    (resources / "Models").mkdir(parents=True)
    bundled = resources / "Models" / "bundled.pt"
    shutil.copyfile(coarse_checkpoint, bundled)
    server = tmp_path / "server"
    server.mkdir()
    remote = server / "remote.pt"
    shutil.copyfile(coarse_checkpoint, remote)
    remote.write_bytes(remote.read_bytes() + b"\0")  # another file, so its SHA256 differs from the bundled one
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (bundled, remote)}
    models = [
        {"name": "demo", "file": "bundled.pt", "sha256": sha["bundled.pt"], "description": "bundled"},
        {"name": "big", "file": "remote.pt", "sha256": sha["remote.pt"], "url": remote.as_uri()},
        {"name": "offline", "file": "offline.pt", "sha256": "0" * 64},
    ]
    (resources / "Models" / "models.json").write_text(json.dumps({"models": models}))
    monkeypatch.setenv("FINESEG_RESOURCES", str(resources))
    return {"cache": tmp_path / "cache", "remote": remote, "models": models}


def test_model_choices_say_what_each_model_needs(registry):
    choices = {c.name: c for c in model_choices(registry["cache"])}
    assert choices["demo"].available and choices["demo"].label == "demo"
    assert not choices["big"].available and "downloads on first use" in choices["big"].label
    assert not choices["offline"].available and "import" in choices["offline"].label


def test_a_registered_model_downloads_once_into_the_cache_with_its_sha256_checked(registry):
    seen = []
    path, sha = local_checkpoint("big", registry["cache"], progress=seen.append)
    assert path == registry["cache"] / "remote.pt" and sha == registry["models"][1]["sha256"]
    assert seen and isinstance(seen[-1], DownloadProgress) and seen[-1].done_bytes == path.stat().st_size
    registry["remote"].unlink()
    assert local_checkpoint("big", registry["cache"])[0] == path, "the cached copy is used without the network"
    assert next(c for c in model_choices(registry["cache"]) if c.name == "big").available


def test_a_download_that_does_not_match_its_sha256_is_discarded(registry):
    registry["remote"].write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match the registered SHA256"):
        local_checkpoint("big", registry["cache"])
    assert not registry["cache"].exists() or list(registry["cache"].iterdir()) == [], "no file, not even a partial one, is kept"


def test_an_unreachable_download_says_to_import_the_file(registry):
    registry["remote"].unlink()
    with pytest.raises(CheckpointError, match="import it"):
        local_checkpoint("big", registry["cache"])
    with pytest.raises(CheckpointError, match="no download address"):
        local_checkpoint("offline", registry["cache"])


def test_importing_a_registered_file_makes_its_name_work_offline(registry, tmp_path):
    copy = tmp_path / "usb-stick.pt"
    shutil.copyfile(registry["remote"], copy)
    assert import_checkpoint(copy, registry["cache"]) == "big"
    registry["remote"].unlink()
    assert local_checkpoint("big", registry["cache"])[0] == registry["cache"] / "remote.pt"


def test_importing_another_checkpoint_keeps_its_path_and_refuses_non_checkpoints(logic, registry, tmp_path, tiny_checkpoint):
    assert import_checkpoint(tiny_checkpoint, registry["cache"]) == str(tiny_checkpoint)
    junk = tmp_path / "notes.pt"
    junk.write_text("not a model")
    with pytest.raises(CheckpointError, match="not a FINE checkpoint"):
        logic.importCheckpoint(junk)  # the Logic checks the file on its worker thread; the error comes back here


def test_the_default_model_is_the_first_registered_one(logic, registry, chest_node, monkeypatch):
    monkeypatch.setattr(logic, "cache", registry["cache"])
    node = logic.segment(chest_node, **FAST)
    assert logic._loaded[1].model_name == "demo" and len(_segment_ids(node)) == len(ORGANS)
