"""The Refine section of the module's panel: a refiner, a Box, Add and Remove clicks, Undo, Memory.

It follows the Refine logic's jobs on the engine's torch worker with a QTimer, one prompt at a time: a
box drawn, or points placed, while a prompt runs are asked next (the box, or every point placed
meanwhile, as one prompt). A prompt that fails is taken back from the scene: its points are removed and
the box goes back to the last one asked. This file needs Qt and the Slicer application; the logic it
drives (``logic.py``) is tested on slicer-core, this file only statically (``Testing/test_module_ui.py``).
"""
import contextlib
import logging

import numpy as np
import qt
import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from FINESegmentationLib.errors import FINEError
from FINESegmentationLib.mrml import click_points
from FINESegmentationLib.worker import FAILED, FINISHED, PROGRESS

from .logic import LITEMEDSAM, SELECTED_SEGMENT

# Keyboard shortcuts of the Refine section (active while a segment is being refined and the module is shown).
# Undo is Z, not Ctrl+Z, which Slicer's Edit menu already holds (an ambiguous shortcut fires neither).
REFINE_SHORTCUTS = {"positive": "A", "negative": "D", "undo": "Z"}
REFINE_COLOURS = {"positive": (0.1, 0.85, 0.1), "negative": (0.95, 0.1, 0.1), "box": (1.0, 0.85, 0.1)}
REFINE_NODE_NAMES = {"positive": "FINE refine add", "negative": "FINE refine remove", "box": "FINE refine box"}


class RefineSection(VTKObservationMixin):
    """The Refine section of ``FINESegmentationWidget``, whose ``ui``, ``logic`` and parameter node it uses."""

    def __init__(self, moduleWidget) -> None:
        VTKObservationMixin.__init__(self)
        self.moduleWidget = moduleWidget
        self.ui = moduleWidget.ui
        self.session = None  # the logic's RefineSession while a segment is being refined
        self._job = None  # starting a session, or one prompt's prediction
        self._jobKind = None  # "start", "box" or "click"
        self._jobBefore = None  # (points asked, box asked) before the running prompt: what a failure goes back to
        self._used = (0, 0)  # points of the add and remove lists asked so far (applied or running)
        self._boxSent = None  # geometry of the last box asked
        self._boxPending = False  # the box changed while a prompt was running
        self._boxFirstCorner = None  # where the user started drawing the box
        self._settingBox = False  # the box is being changed here, not by the user
        self._applied = []  # (points asked, box asked) before each applied prompt, for Undo
        self._timer = qt.QTimer()
        self._timer.setInterval(50)
        self._timer.timeout.connect(self._poll)
        self._shortcuts = []

    @property
    def _p(self):
        return self.moduleWidget._parameterNode

    @property
    def logic(self):
        return self.moduleWidget.logic

    # ------------------------------------------------------------------ the section's life

    def setup(self) -> None:
        # The segment selector has no parameter node connector: it is kept in sync by hand.
        self.ui.refineSegmentSelector.currentNodeChanged.connect(self.onSegmentationChosen)
        self.ui.refineSegmentSelector.currentSegmentChanged.connect(self.onSegmentChosen)
        for placeWidget in (self.ui.refinePositivePlaceWidget, self.ui.refineNegativePlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.refineBoxPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.refineBoxPlaceWidget.activeMarkupsPlaceModeChanged.connect(self.onBoxPlaceMode)
        self.ui.refineStartButton.clicked.connect(self.onStart)
        self.ui.refineUndoButton.clicked.connect(self.onUndo)
        self.ui.refineResetButton.clicked.connect(self.onReset)
        for key, slot in ((REFINE_SHORTCUTS["positive"], lambda: self._place(self.ui.refinePositivePlaceWidget)),
                          (REFINE_SHORTCUTS["negative"], lambda: self._place(self.ui.refineNegativePlaceWidget)),
                          (REFINE_SHORTCUTS["undo"], self.onUndo)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setEnabled(False)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def cleanup(self) -> None:
        self._timer.stop()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        self.removeObservers()

    def enableShortcuts(self) -> None:
        on = self.session is not None and self.moduleWidget.parent.isEntered
        for shortcut in self._shortcuts:
            shortcut.setEnabled(on)

    def disableShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)  # A, D and Z belong to other modules when this one is not shown

    def update(self) -> None:
        """Show the parameter node and the session's state (called whenever the parameter node changes)."""
        p = self._p
        selector = self.ui.refineSegmentSelector
        if selector.currentNode() != p.refineSegmentation:
            selector.setCurrentNode(p.refineSegmentation)
        if p.refineSegmentation is not None and p.refineSegmentId and selector.currentSegmentID() != p.refineSegmentId:
            selector.setCurrentSegmentID(p.refineSegmentId)
        if self.session is not None and self.session.choice != p.refineRefiner:
            self.end()
            self._setStatus(_("The refiner changed; click Start to refine with it."))
        active, busy = self.session is not None, self._job is not None
        chosen = p.refineOrgan != SELECTED_SEGMENT or (p.refineSegmentation is not None and bool(p.refineSegmentId))
        self.ui.refineStartButton.enabled = p.inputVolume is not None and chosen and not busy
        self.ui.refineStartButton.text = _("Restart") if active else _("Start")
        self.ui.refineUndoButton.enabled = active and not busy and bool(self.session.undo)
        self.ui.refineResetButton.enabled = active
        self.ui.refineBoxPlaceWidget.enabled = active and (self.session.automatic or self.session.refiner == LITEMEDSAM)
        self.ui.refinePositivePlaceWidget.enabled = active
        self.ui.refineNegativePlaceWidget.enabled = active
        memory = self.session is None or self.session.has_memory
        self.ui.refineMemoryCheckBox.enabled = memory
        if memory:
            tip = _("Use the refiner's memory of stored labelled examples (Memorizing-SAM); turn it off to compare.")
        elif self.session.refiner == LITEMEDSAM:
            tip = _("{weights} runs without memory: on the real CT its memory did not help (README); use fine-seg refine --memory to try it.")
        else:
            tip = _("{weights} has no memory registered.")
        self.ui.refineMemoryCheckBox.toolTip = tip.format(weights=self.session.weights if self.session else "")
        self.enableShortcuts()

    def onSegmentationChosen(self, node) -> None:
        if self._p and self._p.refineSegmentation != node:
            self._p.refineSegmentation = node

    def onSegmentChosen(self, segmentId) -> None:
        if self._p and segmentId and self._p.refineSegmentId != segmentId:
            self._p.refineSegmentId = segmentId

    def _promptNode(self, role: str):
        """The parameter node's point list ("positive", "negative") or box ROI ("box"), made (green, red, yellow) if missing."""
        p = self._p
        attribute = {"positive": "refinePositive", "negative": "refineNegative", "box": "refineBox"}[role]
        node = getattr(p, attribute)
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            nodeClass = "vtkMRMLMarkupsROINode" if role == "box" else "vtkMRMLMarkupsFiducialNode"
            node = slicer.mrmlScene.AddNewNodeByClass(nodeClass, slicer.mrmlScene.GenerateUniqueName(REFINE_NODE_NAMES[role]))
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*REFINE_COLOURS[role])
            node.GetDisplayNode().SetColor(*REFINE_COLOURS[role])
            if role != "box":
                node.SetControlPointLabelFormat("+" if role == "positive" else "-")
            setattr(p, attribute, node)
        return node

    # ------------------------------------------------------------------ starting and ending a session

    def onStart(self) -> None:
        if not self.moduleWidget._ensureRequirements():
            return
        self.end()
        p = self._p
        positive, negative, box = (self._promptNode(role) for role in ("positive", "negative", "box"))
        for node in (positive, negative):
            node.RemoveAllControlPoints()
        self._setBox(None)
        self.ui.refinePositivePlaceWidget.setCurrentNode(positive)
        self.ui.refineNegativePlaceWidget.setCurrentNode(negative)
        self.ui.refineBoxPlaceWidget.setCurrentNode(box)
        segment = p.refineSegmentId if p.refineOrgan == SELECTED_SEGMENT else p.refineOrgan
        if p.refineOrgan == SELECTED_SEGMENT and (p.refineSegmentation is None or p.refineSegmentation.GetSegmentation().GetSegment(segment) is None):
            self._setStatus(_("Choose a segment of the segmentation, or an organ (its segment is created if it is missing)."))
            return
        try:
            job = self.logic.refine.startSession(p.inputVolume, p.refineSegmentation, segment, refiner=p.refineRefiner, device=p.device)
        except FINEError as error:
            self._setStatus(str(error))
            return
        self._startJob(job, "start")
        self._setStatus(_("Preparing the refiner..."))

    def _begin(self, session) -> None:
        self.session = session
        self._used, self._boxSent, self._boxPending, self._applied = (0, 0), None, False, []
        p = self._p
        for node in (p.refinePositive, p.refineNegative):
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        self.addObserver(p.refineBox, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onBoxPoint)
        self.addObserver(p.refineBox, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onBoxEdited)
        memory = _("memory on or off with Memory") if session.has_memory else _("no memory")
        if session.automatic:
            how = _("draw a Box around the organ on an axial slice (LiteMedSAM), or place points that add ({add}) or remove "
                    "({remove}): on the segment they go to the Memorizing-SAM refiner, on a missing organ to LiteMedSAM; "
                    "{undo} undoes.")
        elif session.refiner == LITEMEDSAM:
            how = _("draw a Box around the organ on an axial slice, then place points that add ({add}) or remove ({remove}); "
                    "{undo} undoes.")
        else:
            how = _("place points that add ({add}) or remove ({remove}); {undo} undoes.")
        self._setStatus(_("Ready ({weights}; {memory}): ").format(weights=session.weights, memory=memory) + how.format(
            add=REFINE_SHORTCUTS["positive"], remove=REFINE_SHORTCUTS["negative"], undo=REFINE_SHORTCUTS["undo"]))
        self.update()

    def end(self) -> None:
        """Stop refining (the segment stays as it is); a running prompt is cancelled and not applied."""
        if self._job is not None:
            self._job.cancel()
        self._timer.stop()
        self._job = self._jobKind = self._jobBefore = None
        self._boxPending = False
        self._applied = []
        self.session = None
        self.removeObservers()
        for placeWidget in (self.ui.refinePositivePlaceWidget, self.ui.refineNegativePlaceWidget, self.ui.refineBoxPlaceWidget):
            placeWidget.setPlaceModeEnabled(False)
        self.enableShortcuts()

    def onReset(self) -> None:
        self.end()
        p = self._p
        for node in (p.refinePositive, p.refineNegative) if p else ():
            if node is not None:
                node.RemoveAllControlPoints()
        if p:
            self._setBox(None)
            self.update()
        self._setStatus(_("Stopped; the segment stays as it is."))

    # ------------------------------------------------------------------ the box

    @contextlib.contextmanager
    def _changingBox(self):
        self._settingBox = True
        try:
            yield
        finally:
            self._settingBox = False

    def _boxGeometry(self):
        """(centre, size) of the box ROI, or None while it is not drawn."""
        roi = self._p.refineBox if self._p else None
        if roi is None or max(roi.GetSize()) <= 0:
            return None
        return tuple(roi.GetCenter()), tuple(roi.GetSize())

    def _setBox(self, geometry) -> None:
        """Put the box ROI back to ``geometry`` ((centre, size); None: not drawn), without asking a prompt."""
        roi = self._p.refineBox if self._p else None
        if roi is None:
            return
        with self._changingBox():
            if geometry is None:
                roi.RemoveAllControlPoints()
                roi.SetSize(0.0, 0.0, 0.0)
            else:
                roi.SetCenter(*geometry[0])
                roi.SetSize(*geometry[1])

    def onBoxPlaceMode(self, enabled) -> None:
        """Clear the old box when the user starts drawing a new one (Slicer then places a fresh ROI)."""
        if enabled and self._boxGeometry() is not None:
            self._setBox(None)
        self._boxFirstCorner = None

    def onBoxPoint(self, caller=None, event=None) -> None:
        if self._settingBox or self.session is None:
            return
        if max(caller.GetSize()) <= 0:  # the first of the two corners Slicer places
            corner = [0.0, 0.0, 0.0]
            caller.GetNthControlPointPositionWorld(0, corner)
            self._boxFirstCorner = corner
            return
        qt.QTimer.singleShot(0, self._onBoxDrawn)  # after Slicer has finished placing the ROI

    def _onBoxDrawn(self) -> None:
        corner, self._boxFirstCorner = self._boxFirstCorner, None
        if self.session is None or self._boxGeometry() is None:
            return
        if corner is not None and not self._flattenOnItsSlice(corner):
            self._setBox(self._boxSent)
            self._setStatus(_("Draw the box on an axial slice (the red view): LiteMedSAM segments axial slices."))
            return
        self._askBox()

    def _flattenOnItsSlice(self, firstCorner) -> bool:
        """Make a box drawn by two clicks flat on the slice it was drawn on; returns whether that slice is axial.

        Slicer gives such an ROI a depth as large as its shorter side, which would keep the organ inside
        those few slices; flat, the organ is followed as far as it goes. An ROI resized to span slices
        (by its handles) keeps them.
        """
        roi = self._p.refineBox
        centre = [0.0, 0.0, 0.0]
        roi.GetCenterWorld(centre)
        axes = []
        for getAxis in (roi.GetXAxisWorld, roi.GetYAxisWorld, roi.GetZAxisWorld):
            axis = [0.0, 0.0, 0.0]
            getAxis(axis)
            axes.append(np.array(axis))
        offset = np.array(firstCorner) - np.array(centre)
        normal = int(np.argmin([abs(float(offset @ axis)) for axis in axes]))  # the drawn corner lies on the slice
        size = list(roi.GetSize())
        size[normal] = 0.0
        with self._changingBox():
            roi.SetSize(*size)
        return abs(axes[normal][2]) > 0.9

    def onBoxEdited(self, caller=None, event=None) -> None:
        """The box's handles were dragged: ask the new box (not while it is being drawn: that asks once, flat)."""
        if not self._settingBox and self.session is not None and self._boxFirstCorner is None:
            qt.QTimer.singleShot(0, self._askBox)

    def _askBox(self) -> None:
        geometry = self._boxGeometry()
        if self.session is None or geometry is None or geometry == self._boxSent:
            return
        if self._job is not None:
            self._boxPending = True
            return
        self._boxPending = False
        self._ask("box", box=self._p.refineBox, sent=geometry)

    # ------------------------------------------------------------------ clicks

    def _place(self, placeWidget) -> None:
        if self.session is not None:
            placeWidget.setPlaceModeEnabled(True)

    def _counts(self) -> tuple:
        p = self._p
        return tuple(n.GetNumberOfControlPoints() if n is not None else 0 for n in (p.refinePositive, p.refineNegative))

    def onPointPlaced(self, caller=None, event=None) -> None:
        """A point was placed in one of the two lists: refine with it (after the running prompt)."""
        if self.session is not None and self._job is None:
            self._askClicks()

    def _askClicks(self) -> None:
        p = self._p
        counts = self._counts()
        if counts == self._used:
            return
        try:
            points, labels = click_points(p.refinePositive, p.refineNegative, self.session.volumeNode, first=self._used)
        except FINEError as error:
            self._dropPoints(self._used)
            self._setStatus(str(error))
            return
        self._ask("click", points=points, labels=labels, used=counts)

    def _dropPoints(self, keep) -> None:
        """Remove the points placed after the first ``keep`` (add, remove) of each list."""
        p = self._p
        for node, count in zip((p.refinePositive, p.refineNegative), keep):
            while node is not None and node.GetNumberOfControlPoints() > count:
                node.RemoveNthControlPoint(node.GetNumberOfControlPoints() - 1)

    # ------------------------------------------------------------------ prompts on the worker

    def _ask(self, kind: str, box=None, points=None, labels=None, used=None, sent=None) -> None:
        before = (self._used, self._boxSent)
        try:
            job = self.logic.refine.startPrompt(self.session, box=box, points=points, labels=labels, memory=self._p.refineMemory)
        except FINEError as error:
            self._takeBack(before)
            self._setStatus(str(error))
            return
        if kind == "click":
            self._used = used
        else:
            self._boxSent = sent
        self._jobBefore = before
        self._startJob(job, kind)
        self._setStatus(_("Refining..."))

    def _startJob(self, job, kind: str) -> None:
        self._job, self._jobKind = job, kind
        self._timer.start()
        self.update()

    def _takeBack(self, before) -> None:
        """Undo in the scene what a prompt that failed had placed: its points, the box it drew, anything placed meanwhile."""
        self._used, self._boxSent = before
        self._boxPending = False
        self._dropPoints(self._used)
        self._setBox(self._boxSent)

    def _poll(self) -> None:
        if self._job is None:
            self._timer.stop()
            return
        for event in self._job.poll():
            if event.kind == PROGRESS:
                self._setStatus(str(event.value))
                continue
            kind, before = self._jobKind, self._jobBefore
            self._job = self._jobKind = self._jobBefore = None
            self._timer.stop()
            if event.kind == FINISHED:
                if kind == "start":
                    self._begin(event.value)
                else:
                    self._apply(event.value, before)
            elif event.kind == FAILED:
                self._failed(event.value, kind, before)

    def _failed(self, error, kind: str, before) -> None:
        if kind != "start":
            self._takeBack(before)
        if isinstance(error, FINEError):
            self._setStatus(str(error))
        else:
            logging.error("FINESegmentation refinement failed.", exc_info=(type(error), error, error.__traceback__))
            self._setStatus(_("Refining failed ({error}); see the Python console.").format(error=error))
        self.update()

    def _apply(self, result, before) -> None:
        session = self.session
        if session is None:
            return
        try:
            self.logic.refine.applyPrompt(session, result)
        except FINEError as error:
            self._failed(error, result.kind, before)
            return
        self._applied.append(before)
        p = self._p
        if p.refineSegmentation != session.segmentationNode:  # the first box made the segmentation
            p.refineSegmentation = session.segmentationNode
        if p.refineSegmentId != session.segmentId:
            p.refineSegmentId = session.segmentId
        note = ""
        if result.kind == "click" and session.refiner == LITEMEDSAM and not session.clicks_trained:
            note = " " + _("LiteMedSAM's decoder is not tuned on clicks yet and a click can make the segment worse; Undo if it did.")
        self._setStatus(result.summary() + " " + _("{n} step(s) to undo.").format(n=len(session.undo)) + note)
        self.update()
        if self._boxPending:
            self._askBox()
        else:
            self._askClicks()

    def onUndo(self) -> None:
        session = self.session
        if session is None or self._job is not None:
            return
        try:
            undone = self.logic.refine.undo(session)
        except FINEError as error:
            self._setStatus(str(error))
            return
        if not undone:
            self._setStatus(_("Nothing to undo."))
            return
        self._takeBack(self._applied.pop())
        self._setStatus(_("Undone; {n} step(s) left to undo.").format(n=len(session.undo)))
        self.update()

    def _setStatus(self, text: str) -> None:
        self.ui.refineStatusLabel.text = text
