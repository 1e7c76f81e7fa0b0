"""The Slicer side of the engine: MRML nodes in, MRML nodes out, and the Logic's work.

This is the only engine file that imports ``slicer`` or ``vtk``, and only the
module's Logic (``FINESegmentation.py`` and the Refine section's ``FINESegmentationRefine/logic.py``) calls it. It needs no Qt and no
``slicer.app``: every node is reached through the scene of the nodes it is given,
and the segmentation is built with VTK objects, so the same code runs in 3D Slicer
and on the ``slicer-core`` wheel in CI.

Threading: MRML and VTK are touched on the calling (GUI) thread only; all torch
work runs on the one :class:`~FINESegmentationLib.worker.TorchWorker` thread. A
segmentation is therefore three steps: :func:`volume_from_node` (GUI thread),
:meth:`FINESegmentationLogicCore.startSegmentation` (worker), and
:meth:`FINESegmentationLogicCore.importResult` (GUI thread). The scene is changed
only in the last step, after the network succeeded, so an error or a cancel leaves
it exactly as it was.

Refining a segment (the module's ``FINESegmentationRefine`` package) follows the same split:
:func:`segment_mask` and :func:`click_points` read the scene (GUI thread), a refiner runs on the
worker, and :func:`write_segment_mask` changes the segment in place (GUI thread), only after the
prediction succeeded.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import CancelledError, FINEError, InputError
from .io import case_name
from .labels import ORGAN_BY_NAME
from .volume import Geometry, Volume
from .worker import Job, TorchWorker

logger = logging.getLogger(__name__)

# Colours for classes of a custom checkpoint that are not among the product's organs.
_OTHER_COLOURS = ((0.90, 0.60, 0.0), (0.35, 0.70, 0.90), (0.0, 0.60, 0.50), (0.95, 0.90, 0.25), (0.80, 0.40, 0.70))


def segment_id(class_name: str) -> str:
    """The segment ID of a class, as in the ``.seg.nrrd`` files the engine writes (``right_kidney``)."""
    return class_name.replace(" ", "_")


# --------------------------------------------------------------------------- nodes -> arrays


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_from_node(volumeNode) -> Volume:
    """The CT of a scalar volume node as a :class:`Volume` (float32 ``[z, y, x]``, geometry in LPS).

    The geometry is the node's own IJK-to-RAS matrix; a parent transform is not
    applied (the segmentation is placed under the same transform instead).
    """
    if volumeNode is None:
        raise InputError("No input volume is selected; load a CT and select it as the input volume.")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{volumeNode.GetName()}' is not a CT image (it is a {volumeNode.GetClassName()}); select a scalar CT volume.")
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"The volume '{volumeNode.GetName()}' holds no image data; load the CT again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"The volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "FINE needs a single-channel CT."
        )
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    # Copied (astype), so the network never reads VTK memory that the GUI may change meanwhile.
    array = scalars.reshape(dims[2], dims[1], dims[0]).astype(np.float32)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijk_to_ras)
    return Volume(array, Geometry.from_ras_matrix(_matrix_to_numpy(ijk_to_ras)))


# --------------------------------------------------------------------------- arrays -> nodes


@dataclass(frozen=True)
class SegmentClass:
    """One segment to create: its label value in the label map and its class name."""

    label: int
    name: str


@dataclass
class SegmentationOutput:
    """What the worker hands back to the GUI thread: the label map, its classes, and the engine's report."""

    labels: Volume
    classes: list[SegmentClass]
    report: dict[str, Any] = field(default_factory=dict)


def _labelmap_image(labels: Volume, ijk_to_ras: vtk.vtkMatrix4x4):
    """A ``vtkOrientedImageData`` holding the label map on the volume's grid."""
    image = slicer.vtkOrientedImageData()
    z, y, x = labels.shape
    image.SetDimensions(x, y, z)
    image.SetImageToWorldMatrix(ijk_to_ras)
    # C order of [z, y, x] is VTK's point order (x fastest); deep copy, so VTK owns its memory.
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(labels.array, dtype=np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    scalars.SetName("labels")
    image.GetPointData().SetScalars(scalars)
    return image


def describe_segment(segment, name: str, other_index: int = 0) -> bool:
    """Name a ``vtkSegment``; an organ gets its colour and SNOMED CT ``TerminologyEntry`` tag, any other name
    the ``other_index``-th of a few distinct colours. Returns whether ``name`` is an organ."""
    from .io import terminology_entry

    segment.SetName(name)
    organ = ORGAN_BY_NAME.get(name)
    if organ is not None:
        segment.SetColor(*organ.color_float)
        segment.SetTag("TerminologyEntry", terminology_entry(organ))
    else:
        segment.SetColor(*_OTHER_COLOURS[other_index % len(_OTHER_COLOURS)])
    # Our names and colours are deliberate: Slicer must not replace them from the terminology.
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    return organ is not None


def _segments(labels: Volume, classes: Sequence[SegmentClass], ijk_to_ras: vtk.vtkMatrix4x4) -> list[tuple[str, Any]]:
    """(segment ID, vtkSegment) per class, all sharing one label map layer (as Slicer's own .seg.nrrd reader does)."""
    image = _labelmap_image(labels, ijk_to_ras)
    representation = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segments, others = [], 0
    for cls in classes:
        segment = slicer.vtkSegment()
        if not describe_segment(segment, cls.name, others):
            others += 1
        segment.SetLabelValue(cls.label)
        segment.AddRepresentation(representation, image)
        segments.append((segment_id(cls.name), segment))
    return segments


def _same_grid(labels: Volume, volumeNode) -> vtk.vtkMatrix4x4:
    """The volume's IJK-to-RAS matrix, after checking the labels still fit its grid (the user may have changed it meanwhile)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijk_to_ras)
    image = volumeNode.GetImageData()
    dims = tuple(image.GetDimensions()) if image is not None else ()
    if dims != labels.shape[::-1] or not labels.geometry.allclose(Geometry.from_ras_matrix(_matrix_to_numpy(ijk_to_ras))):
        raise InputError(
            f"The volume '{volumeNode.GetName()}' changed while it was being segmented; segment it again."
        )
    return ijk_to_ras


def _place_in_study(segmentationNode, volumeNode) -> None:
    """Put the segmentation beside the volume in the subject hierarchy (its study), so DICOM SEG export finds both."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volumeNode)
    parent = hierarchy.GetItemParent(volume_item) if volume_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(segmentationNode)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        # Slicer's subject hierarchy plugins create the item on NodeAdded; without Qt (slicer-core) nobody does.
        hierarchy.CreateItem(parent, segmentationNode)


def new_segmentation_node(volumeNode):
    """An empty segmentation node for ``volumeNode``: "<CT> FINE segmentation", with display nodes, under the
    volume's parent transform, its reference geometry the volume's, in the volume's study. Nothing stays on an error."""
    scene = volumeNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volumeNode.GetName()} FINE segmentation"))
    try:
        was_modifying = node.StartModify()
        try:
            node.CreateDefaultDisplayNodes()
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        finally:
            node.EndModify(was_modifying)
        _place_in_study(node, volumeNode)
    except BaseException:
        remove_node(scene, node)
        raise
    return node


def remove_node(scene, node) -> None:
    """Remove a node and its display nodes (the scene does not remove those by itself)."""
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display_node in display_nodes:
        if display_node is not None:
            scene.RemoveNode(display_node)


def write_segmentation_node(output: SegmentationOutput, volumeNode, segmentationNode=None):
    """Put the labels into ``segmentationNode`` (replacing its segments of the same classes) or into a new node.

    Each class becomes a named, coloured segment, an organ with its SNOMED CT
    ``TerminologyEntry`` tag; the node's reference geometry is the volume's; a new
    node is placed in the volume's study and under the volume's parent transform.
    Segments of an existing node that are not classes of this model are kept.
    Returns the segmentation node.
    """
    ijk_to_ras = _same_grid(output.labels, volumeNode)
    if segmentationNode is not None and segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        raise InputError(
            f"The segmentation '{segmentationNode.GetName()}' is under a different transform than the volume "
            f"'{volumeNode.GetName()}'; choose another output segmentation or create a new one."
        )
    segments = _segments(output.labels, output.classes, ijk_to_ras)
    created = segmentationNode is None
    if created:
        segmentationNode = new_segmentation_node(volumeNode)
    try:
        was_modifying = segmentationNode.StartModify()
        try:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentation = segmentationNode.GetSegmentation()
            for sid, segment in segments:
                if segmentation.GetSegment(sid) is not None:
                    segmentation.RemoveSegment(sid)
                segmentation.AddSegment(segment, sid)
        finally:
            segmentationNode.EndModify(was_modifying)
    except BaseException:
        if created:
            remove_node(volumeNode.GetScene(), segmentationNode)
        raise
    return segmentationNode


# --------------------------------------------------------------------------- attention maps -> nodes


@dataclass
class AttentionNodes:
    """The nodes that show one attention map: the heat map, the crop's box, the volume-token grid."""

    heat: Any
    crop: Any
    grid: Any


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _heat_colour_node(scene):
    """Slicer's PET heat colour map when the Colors logic made it, else the built-in Rainbow table."""
    for node_id in ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeRainbow"):
        node = scene.GetNodeByID(node_id)
        if node is not None:
            return node
    return None


def _grid_polydata(planes: np.ndarray):
    points = vtk.vtkPoints()
    cells = vtk.vtkCellArray()
    for quad in planes:
        ids = [points.InsertNextPoint(*map(float, corner)) for corner in quad]
        cells.InsertNextCell(4)
        for i in ids:
            cells.InsertCellPoint(i)
    polydata = vtk.vtkPolyData()
    polydata.SetPoints(points)
    polydata.SetPolys(cells)
    return polydata


def show_attention_map(amap, volumeNode, nodes: AttentionNodes | None = None, opacity: float = 0.6) -> AttentionNodes:
    """Show an :class:`~FINESegmentationLib.attention.AttentionMap` of ``volumeNode``'s CT.

    The heat map becomes a scalar volume node on the CT's grid (heat colours, window 0..1,
    values below 0.01 transparent) and the foreground layer of every slice view at
    ``opacity``; the crop that holds the point becomes a markups ROI; the volume-token
    cell boundaries become a model whose intersections draw the grid as lines in the
    slice views. ``nodes`` from an earlier call are updated instead of adding new ones.
    Everything is placed under the CT's parent transform. On an error the scene is left
    as it was (nodes made by this call are removed).
    """
    ijk_to_ras = _same_grid(amap.heat, volumeNode)
    scene = volumeNode.GetScene()
    name = volumeNode.GetName()
    made = []
    try:
        def reuse_or_add(existing, node_class: str, suffix: str):
            if existing is not None and scene.IsNodePresent(existing):
                return existing
            node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(f"{name} {suffix}"))
            made.append(node)
            node.CreateDefaultDisplayNodes()
            return node

        heat = reuse_or_add(nodes.heat if nodes else None, "vtkMRMLScalarVolumeNode", "FINE attention")
        crop = reuse_or_add(nodes.crop if nodes else None, "vtkMRMLMarkupsROINode", "FINE attention crop")
        grid = reuse_or_add(nodes.grid if nodes else None, "vtkMRMLModelNode", "FINE token grid")

        image = vtk.vtkImageData()
        z, y, x = amap.heat.shape
        image.SetDimensions(x, y, z)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(amap.heat.array, dtype=np.float32).ravel(), deep=True,
                                             array_type=vtk.VTK_FLOAT)
        scalars.SetName("attention")
        image.GetPointData().SetScalars(scalars)
        heat.SetIJKToRASMatrix(ijk_to_ras)
        heat.SetAndObserveImageData(image)
        heat.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        display = heat.GetDisplayNode()
        colour = _heat_colour_node(scene)
        if colour is not None:
            display.SetAndObserveColorNodeID(colour.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetLowerThreshold(0.01)
        display.SetUpperThreshold(1.0)
        display.ApplyThresholdOn()
        heat.SetAttribute("FINESegmentation.AttentionPoint", ",".join(f"{v:.3f}" for v in amap.point_ras))
        heat.SetAttribute("FINESegmentation.AttentionStage", f"{amap.stage} block {amap.block}, {amap.bank} bank")

        axes = np.eye(4)
        axes[:3, :3] = amap.crop_axes_ras  # the network grid's axes: the crop is a box along them
        crop.GetObjectToNodeMatrix().DeepCopy(_numpy_to_matrix(axes))
        crop.SetCenter(*amap.crop_center_ras)
        crop.SetSize(*amap.crop_size_mm)
        crop.SetLocked(True)
        crop.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        crop.GetDisplayNode().SetHandlesInteractive(False)

        grid.SetAndObservePolyData(_grid_polydata(amap.grid_planes_ras))
        grid.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        grid_display = grid.GetDisplayNode()
        grid_display.SetColor(1.0, 0.9, 0.1)
        grid_display.SetVisibility2D(True)
        grid_display.SetVisibility3D(False)
        grid_display.SetSliceIntersectionThickness(1)
        set_attention_layer(scene, heat, opacity)
    except BaseException:
        for node in made:
            remove_node(scene, node)
        raise
    return AttentionNodes(heat, crop, grid)


def set_attention_layer(scene, heatNode, opacity: float) -> None:
    """Put ``heatNode`` into the foreground layer of every slice view, at ``opacity`` (0..1)."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        composite.SetForegroundVolumeID(heatNode.GetID() if heatNode is not None else None)
        composite.SetForegroundOpacity(float(min(1.0, max(0.0, opacity))))


def fiducial_point(markupsNode) -> tuple[float, float, float]:
    """The world (RAS) position of the last control point of a markups point list."""
    if markupsNode is None or markupsNode.GetNumberOfControlPoints() == 0:
        raise InputError("Place a point first: the attention map starts from a point in the CT.")
    position = [0.0, 0.0, 0.0]
    markupsNode.GetNthControlPointPositionWorld(markupsNode.GetNumberOfControlPoints() - 1, position)
    return tuple(position)  # type: ignore[return-value]


# --------------------------------------------------------------------------- refining a segment by clicks


def _segment_or_error(segmentationNode, segmentId):
    if segmentationNode is None:
        raise InputError("No segmentation is selected; choose the segmentation and the segment to refine.")
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId or "")
    if segment is None:
        raise InputError(f"The segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'; choose a segment to refine.")
    return segment


def _grid_of(volumeNode) -> tuple[vtk.vtkMatrix4x4, tuple[int, int, int]]:
    """(IJK-to-RAS matrix, [z, y, x] shape) of a volume node's voxel grid."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijk_to_ras)
    x, y, z = volumeNode.GetImageData().GetDimensions()
    return ijk_to_ras, (z, y, x)


def check_same_transform(segmentationNode, volumeNode) -> None:
    if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        raise InputError(
            f"The segmentation '{segmentationNode.GetName()}' is under a different transform than the volume "
            f"'{volumeNode.GetName()}'; put both under the same transform (or none) to refine."
        )


def segment_mask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """A segment as a bool ``[z, y, x]`` mask on ``volumeNode``'s voxel grid (nearest-neighbour resampled if needed).

    Works on shared label map layers (the segment's own label value is taken). Touches no node.
    """
    segment = _segment_or_error(segmentationNode, segmentId)
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise InputError("No CT volume with image data is selected; select the CT the segment belongs to as the input volume.")
    check_same_transform(segmentationNode, volumeNode)
    ijk_to_ras, (z, y, x) = _grid_of(volumeNode)
    layer = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, layer)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, x - 1, 0, y - 1, 0, z - 1)
    reference.SetImageToWorldMatrix(ijk_to_ras)
    resampled = slicer.vtkOrientedImageData()
    if layer.GetPointData() is None or layer.GetPointData().GetScalars() is None:
        return np.zeros((z, y, x), bool)
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(layer, reference, resampled, False, True)
    if resampled.GetPointData().GetScalars() is None:
        return np.zeros((z, y, x), bool)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(z, y, x)
    return values == segment.GetLabelValue()


def write_segment_mask(mask: np.ndarray, segmentationNode, segmentId: str, volumeNode) -> None:
    """Replace a segment's voxels by a bool ``[z, y, x]`` mask on ``volumeNode``'s grid, in place.

    The segment keeps its ID, name, colour and tags; other segments are untouched (Slicer moves
    the segment to a layer of its own where it now overlaps them).
    """
    _segment_or_error(segmentationNode, segmentId)
    check_same_transform(segmentationNode, volumeNode)
    ijk_to_ras, shape = _grid_of(volumeNode)
    if tuple(mask.shape) != shape:
        raise InputError(f"The volume '{volumeNode.GetName()}' changed while refining; start refining again.")
    image = slicer.vtkOrientedImageData()
    z, y, x = shape
    image.SetExtent(0, x - 1, 0, y - 1, 0, z - 1)
    image.SetImageToWorldMatrix(ijk_to_ras)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    # The whole grid, not an extent: with an extent, Slicer drops the rest of a segment that it moves out of a
    # shared layer. Outside the refiner's box the mask is the segment as it was, so only the box changes.
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
        raise InputError(f"The segment '{segmentId}' could not be updated; check that the segmentation is not locked.")


def click_points(positiveNode=None, negativeNode=None, volumeNode=None, first: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """(points (N, 3) RAS mm in the volume's own frame, labels (N,): 1 add, 0 remove) from two markups point lists,
    from their ``first`` points on (the points placed since).

    Positions are read in world coordinates and moved into the volume's frame when it is under a transform.
    """
    points, labels = [], []
    for node, label, start in ((positiveNode, 1, first[0]), (negativeNode, 0, first[1])):
        if node is None:
            continue
        for i in range(start, node.GetNumberOfControlPoints()):
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, position)
            points.append(position)
            labels.append(label)
    return world_to_volume(points, volumeNode), np.array(labels, dtype=np.int64)


def world_to_volume(points, volumeNode) -> np.ndarray:
    """(N, 3) world (RAS) positions moved into the frame of ``volumeNode`` (unchanged when it is under no transform)."""
    points_array = np.array(points, dtype=np.float64).reshape(-1, 3)
    if volumeNode is not None and volumeNode.GetParentTransformNode() is not None and len(points_array):
        transform = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volumeNode.GetParentTransformNode(), transform)
        points_array = np.array([transform.TransformPoint(*p) for p in points_array])
    return points_array


# --------------------------------------------------------------------------- the Logic's work


def device_choices() -> list[tuple[str, str]]:
    """(device, label) for every device this machine can run on, best first: CUDA with free memory, MPS, CPU."""
    import torch

    from .inference import available_devices

    choices = []
    for device in available_devices():
        if device.startswith("cuda"):
            index = int(device.split(":")[1])
            free, total = torch.cuda.mem_get_info(index)
            label = f"{device}: {torch.cuda.get_device_name(index)} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
        elif device == "mps":
            label = "mps: Apple GPU"
        else:
            label = "cpu (slow)"
        choices.append((device, label))
    return choices


@dataclass(frozen=True)
class _Options:
    model: str | None
    device: str
    bank: str
    fast: bool
    tta: bool | None
    refine_all: bool | None = None  # None: on unless fast (Segmenter's default)


def _refine_all_progress(progress: Callable[[Any], None]) -> Callable[[int, int], None]:
    """Refine-all's ``(done, total)`` slices as a status sentence for the GUI."""
    return lambda done, total: progress(f"Refine all (LiteMedSAM): slice {done} of {total} redrawn.")


class FINESegmentationLogicCore:
    """Everything the module's Logic does, without Qt: segment volume nodes or files with FINE.

    One loaded model is kept between runs (the last one used), so segmenting
    several volumes with the same model and device loads it once.
    """

    def __init__(self, worker: TorchWorker | None = None, cache: Path | None = None) -> None:
        self.worker = worker or TorchWorker()
        self.cache = cache
        self._loaded: tuple[tuple[str | None, str], Any] | None = None  # touched on the worker thread only

    # ---------------------------------------------------------------- models

    def modelChoices(self):
        """The registered models (see :func:`FINESegmentationLib.weights.model_choices`)."""
        from .weights import model_choices

        return model_choices(self.cache)

    def importCheckpoint(self, path: str | os.PathLike) -> str:
        """Make a checkpoint file usable and return the model name to select (a registered name or the path).

        Checking the file loads it with torch, so it runs on the worker thread.
        """
        from .weights import import_checkpoint

        def run(progress, cancel):
            return import_checkpoint(path, self.cache)

        return self.worker.submit(run).wait()

    def deviceChoices(self) -> list[tuple[str, str]]:
        return device_choices()

    # ---------------------------------------------------------------- one volume node

    def volumeFromNode(self, volumeNode) -> Volume:
        return volume_from_node(volumeNode)

    def startSegmentation(self, volume: Volume, *, model: str | None = None, device: str = "auto", bank: str = "stateless",
                          fast: bool = False, tta: bool | None = None, refine_all: bool | None = None,
                          cancel: threading.Event | None = None) -> Job:
        """Queue the network on the worker thread; the job's result is a :class:`SegmentationOutput`.

        Progress events carry a :class:`~FINESegmentationLib.inference.Progress` (crops), a
        :class:`~FINESegmentationLib.weights.DownloadProgress` (a model being fetched) or a sentence
        (loading; refine-all's slices). ``refine_all``: then redraw every organ slice by slice with
        LiteMedSAM (``Segmenter(refine_all=...)``; None, the default: on unless ``fast``).
        """
        options = _Options(model or None, device or "auto", bank, bool(fast), None if tta is None else bool(tta), None if refine_all is None else bool(refine_all))
        return self.worker.submit(self._run, volume, options, cancel=cancel)

    def importResult(self, output: SegmentationOutput, volumeNode, segmentationNode=None):
        """Write a finished job's labels into the scene (GUI thread); returns the segmentation node."""
        return write_segmentation_node(output, volumeNode, segmentationNode)

    def segment(self, volumeNode, segmentationNode=None, *, model: str | None = None, device: str = "auto",
                bank: str = "stateless", fast: bool = False, tta: bool | None = None, refine_all: bool | None = None,
                progress: Callable[[Any], None] | None = None, cancel: threading.Event | None = None):
        """Segment a CT volume node; returns the segmentation node (new unless ``segmentationNode`` is given).

        Blocks until done. ``progress`` is called on this thread with each
        :class:`~FINESegmentationLib.inference.Progress` (or ``DownloadProgress``);
        setting ``cancel`` stops within one crop and raises ``CancelledError`` with
        the scene unchanged.
        """
        volume = volume_from_node(volumeNode)
        job = self.startSegmentation(volume, model=model, device=device, bank=bank, fast=fast, tta=tta, refine_all=refine_all,
                                     cancel=cancel)
        output = job.wait(progress)
        return self.importResult(output, volumeNode, segmentationNode)

    # ---------------------------------------------------------------- files

    def segmentFiles(self, inputPaths: Sequence[str | os.PathLike], outputDir: str | os.PathLike, *,
                     model: str | None = None, device: str = "auto", bank: str = "stateless", fast: bool = False,
                     tta: bool | None = None, refine_all: bool | None = None, extension: str = ".seg.nrrd",
                     progress: Callable[[int, int, Any], None] | None = None,
                     cancel: threading.Event | None = None) -> list[dict[str, Any]]:
        """Segment CT files (or DICOM folders) into ``outputDir/<name><extension>``; the scene is not touched.

        Returns one entry per input: ``{"input", "output", "report"}`` when it worked,
        ``{"input", "output": None, "error": sentence}`` when that case failed (the
        others go on). ``progress(case_index, case_count, event)`` is called on this
        thread. ``cancel`` stops the batch within one crop and raises ``CancelledError``;
        files already written stay, the current one is not written.
        """
        from .io import SEGMENTATION_WRITE_EXTENSIONS

        if extension not in SEGMENTATION_WRITE_EXTENSIONS:
            raise InputError(f"'{extension}' is not an output format; use one of {', '.join(SEGMENTATION_WRITE_EXTENSIONS)}.")
        folder = Path(outputDir).expanduser()
        if not folder.is_dir():
            raise InputError(f"The output folder {folder} does not exist; create it or choose another folder.")
        inputs = [Path(p).expanduser() for p in inputPaths]
        targets = [folder / f"{case_name(p)}{extension}" for p in inputs]
        if len(set(targets)) != len(targets):
            raise InputError("Two inputs have the same name, so their outputs would overwrite each other; rename one of them.")
        options = _Options(model or None, device or "auto", bank, bool(fast), None if tta is None else bool(tta), None if refine_all is None else bool(refine_all))
        results: list[dict[str, Any]] = []
        for index, (source, target) in enumerate(zip(inputs, targets)):
            job = self.worker.submit(self._run_file, source, target, options, cancel=cancel)
            try:
                report = job.wait(None if progress is None else lambda event, i=index: progress(i, len(inputs), event))
            except CancelledError:
                raise CancelledError(f"The batch was cancelled after {index} of {len(inputs)} cases; the current case was not written.") from None
            except FINEError as error:
                logger.warning("%s: %s", source, error)
                results.append({"input": str(source), "output": None, "error": str(error)})
                continue
            results.append({"input": str(source), "output": str(target), "report": report})
        return results

    # ---------------------------------------------------------------- worker thread

    def _segmenter(self, options: _Options, progress, cancel):
        """The Segmenter for these options, reusing the loaded model when the model and device are unchanged."""
        from .inference import Segmenter, default_model_name
        from .weights import local_checkpoint

        name = options.model or default_model_name()
        key = (name, options.device)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model before loading the next
            path, sha = local_checkpoint(name, self.cache, progress, cancel)
            progress(f"Loading model {Path(name).name}...")
            base = Segmenter(str(path), device=options.device)
            base.model_name, base.model_sha256 = name, sha or base.model_sha256
            self._loaded = (key, base)
        base = self._loaded[1]
        segmenter = Segmenter((base.model, base.info), device=str(base.device), bank=options.bank, fast=options.fast, tta=options.tta,
                              refine_all=options.refine_all)
        segmenter.model_name, segmenter.model_sha256 = base.model_name, base.model_sha256
        return segmenter

    def _run(self, volume: Volume, options: _Options, progress, cancel) -> SegmentationOutput:
        segmenter = self._segmenter(options, progress, cancel)
        result = segmenter.segment(volume, progress=progress, cancel=cancel, refine_progress=_refine_all_progress(progress))
        classes = [SegmentClass(int(v), n) for v, n in zip(segmenter.info.label_values, segmenter.info.class_names) if v != 0]
        return SegmentationOutput(result.labels, classes, result.report)

    # ---------------------------------------------------------------- attention maps

    def startAttentionMap(self, volume: Volume, point_ras: Sequence[float], *, stage: str = "encoder0", block: int = 1,
                          model: str | None = None, device: str = "auto", bank: str = "accumulate", fast: bool = False,
                          cancel: threading.Event | None = None) -> Job:
        """Queue an attention map on the worker thread; the job's result is an ``AttentionMap``."""
        options = _Options(model or None, device or "auto", bank, bool(fast), False)
        return self.worker.submit(self._attention, volume, tuple(float(v) for v in point_ras), stage, int(block), options, cancel=cancel)

    def showAttentionMap(self, amap, volumeNode, nodes: AttentionNodes | None = None, opacity: float = 0.6) -> AttentionNodes:
        """Show a finished map in the scene (GUI thread); see :func:`show_attention_map`."""
        return show_attention_map(amap, volumeNode, nodes, opacity)

    def attentionMap(self, volumeNode, point, *, stage: str = "encoder0", block: int = 1, model: str | None = None,
                     device: str = "auto", bank: str = "accumulate", fast: bool = False, nodes: AttentionNodes | None = None,
                     opacity: float = 0.6, progress: Callable[[Any], None] | None = None,
                     cancel: threading.Event | None = None) -> tuple[Any, AttentionNodes]:
        """Compute and show the attention map from ``point`` (RAS mm, or a markups point list: its last point).

        Blocks until done; returns ``(AttentionMap, AttentionNodes)``. Errors and cancel leave the scene unchanged.
        """
        point_ras = fiducial_point(point) if hasattr(point, "GetNumberOfControlPoints") else tuple(point)
        volume = volume_from_node(volumeNode)
        amap = self.startAttentionMap(volume, point_ras, stage=stage, block=block, model=model, device=device, bank=bank,
                                      fast=fast, cancel=cancel).wait(progress)
        return amap, self.showAttentionMap(amap, volumeNode, nodes, opacity)

    def saveAttentionMap(self, heatNode, path: str | os.PathLike) -> Path:
        """Write a shown heat map node to a file (NIfTI, NRRD or MHA) with its geometry, all or nothing."""
        from .io import write_volume

        return write_volume(volume_from_node(heatNode), path)

    def _attention(self, volume: Volume, point_ras, stage: str, block: int, options: _Options, progress, cancel):
        from .attention import AttentionMapper

        base = self._segmenter(options, progress, cancel)
        mapper = AttentionMapper((base.model, base.info), device=str(base.device), bank=options.bank, fast=options.fast)
        return mapper.compute(volume, point_ras, stage=stage, block=block, progress=progress, cancel=cancel)

    def _run_file(self, source: Path, target: Path, options: _Options, progress, cancel) -> dict[str, Any]:
        return self._segmenter(options, progress, cancel).segment_file(source, target, progress=progress, cancel=cancel,
                                                                       refine_progress=_refine_all_progress(progress)).report
