"""LiteMedSAM: its weights, the slice frame, boxes and propagation on a real CT, refine-all, and refusals.

The real CT (Testing/data/ts-example-noncontrast, 122 x 101 x 30 at 3 mm, TotalSegmentator's labels as
reference) is cut to slices 14-20 so that few slices need an embedding (about 2 s each on one CPU core);
one predictor serves the module, so a slice is embedded once. Dice thresholds are the values measured
here (README, "LiteMedSAM on the real CT") minus a margin.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from FINESegmentationLib.checkpoints import read_registry, sha256_of
from FINESegmentationLib.cli import main
from FINESegmentationLib.errors import CheckpointError, InputError
from FINESegmentationLib.inference import Segmenter
from FINESegmentationLib.io import read_segmentation, read_volume, write_segmentation
from FINESegmentationLib.labels import ORGAN_BY_NAME
from FINESegmentationLib.refiner.litemedsam.build import KIND, load_litemedsam
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor
from FINESegmentationLib.refiner.litemedsam.refine_all import refine_all
from FINESegmentationLib.refiner.litemedsam.slices import SliceFrame
from FINESegmentationLib.resources import models_dir
from FINESegmentationLib.volume import Geometry, Volume

DATA = Path(__file__).parent / "data" / "ts-example-noncontrast"
FIRST, LAST = 14, 20  # slices of the real CT the tests use (z of its array)
LIVER, SPLEEN, RIGHT_KIDNEY, GALLBLADDER = (ORGAN_BY_NAME[n].label for n in ("liver", "spleen", "right kidney", "gallbladder"))


def _slab(volume: Volume, first: int, last: int) -> Volume:
    """Slices first..last of a volume, placed where they were."""
    origin = volume.geometry.ijk_to_lps() @ np.array([0.0, 0.0, first, 1.0])
    geometry = Geometry(volume.geometry.spacing, tuple(origin[:3]), volume.geometry.direction)
    return Volume(np.ascontiguousarray(volume.array[first : last + 1]), geometry)


def _dice(a, b) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _box_ijk(mask2d: np.ndarray, k: int, margin: float = 1.0) -> np.ndarray:
    """Two (i, j, k) corners around a mask on array slice k, ``margin`` voxels looser."""
    js, is_ = np.nonzero(mask2d)
    return np.array([[is_.min() - margin, js.min() - margin, k], [is_.max() + margin, js.max() + margin, k]], float)


@pytest.fixture(scope="module")
def real():
    ct = _slab(read_volume(DATA / "ct.nii.gz"), FIRST, LAST)
    labels = _slab(read_volume(DATA / "labels.nii.gz", kind="label"), FIRST, LAST)
    return ct, labels


@pytest.fixture(scope="module")
def predictor(real):
    p = SlicePredictor("litemedsam", cache_slices=64)  # the published weights: the measurements below are theirs
    p.set_volume(real[0])
    return p


# ----------------------------------------------------------------------------- weights


def test_bundled_weights_load_strictly_in_fp32_and_match_their_registered_sha256():
    entry = read_registry(kind=KIND)["litemedsam"]
    assert sha256_of(entry.path) == entry.sha256, "the bundled file is the registered one"
    assert (models_dir() / entry.licence).is_file() and "Apache License" in (models_dir() / entry.licence).read_text(), \
        "the weights' Apache-2.0 licence ships beside them and models.json names it"
    assert entry.path.stat().st_size <= 25 * 2**20, "the fp16 file stays within 25 MB"
    model, path = load_litemedsam()
    assert path == entry.path and all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters()), \
        "weights stored in fp16 compute in fp32"


def test_a_tampered_weights_file_is_refused_in_one_sentence(tmp_path, monkeypatch):
    resources = tmp_path / "Resources"
    (resources / "Models").mkdir(parents=True)
    shutil.copy(models_dir() / "models.json", resources / "Models" / "models.json")
    data = bytearray((models_dir() / "litemedsam.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (resources / "Models" / "litemedsam.pt").write_bytes(bytes(data))
    monkeypatch.setenv("FINESEG_RESOURCES", str(resources))
    with pytest.raises(CheckpointError) as error:
        load_litemedsam()
    message = str(error.value)
    assert "does not match its registered SHA256" in message and "\n" not in message, "one sentence names the mismatch"
    other = tmp_path / "other.pt"
    other.write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="cannot be loaded safely|not a LiteMedSAM weights file"):
        load_litemedsam(other)


# ----------------------------------------------------------------------------- the slice frame


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, -1, 0)])
def test_the_slice_frame_is_an_exact_reordering_whose_axes_point_to_l_p_s(direction):
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(size=(4, 5, 6)).astype(np.float32), Geometry((1.0, 2.0, 3.0), (0, 0, 0), direction))
    frame = SliceFrame.of(volume)
    framed = frame.to_frame(volume.array)
    assert np.array_equal(frame.from_frame(framed), volume.array), "from_frame undoes to_frame exactly"
    x, y, z = frame.ijk_to_frame(np.array([[1.0, 2.0, 3.0]]))[0].round().astype(int)
    assert framed[z, y, x] == volume.array[3, 2, 1], "a point's frame index finds the same voxel"
    origin = frame.ijk_to_frame(np.zeros((1, 3)))[0]
    for axis in range(3):
        step = frame.ijk_to_frame(np.eye(3)[axis][None])[0] - origin
        c = int(np.argmax(np.abs(step)))
        towards = volume.geometry.direction_matrix[:, axis]
        assert np.abs(step).sum() == 1 and c == int(np.argmax(np.abs(towards))) and np.sign(step[c]) == np.sign(towards[c]), \
            "each index axis becomes the frame axis (x L, y P, z S) it points to, in the same sense"


def test_non_square_pixels_keep_their_shape_in_millimetres():
    from FINESegmentationLib.refiner.litemedsam.slices import SliceInput

    volume = Volume(np.zeros((2, 100, 100), np.float32), Geometry((1.0, 2.0, 5.0)))
    inputs = SliceInput.for_frame(SliceFrame.of(volume))
    assert (inputs.new_height, inputs.new_width) == (256, 128), "100 x 200 mm becomes 128 x 256 model pixels, not a square"
    assert inputs.image(np.zeros((100, 100), np.float32)).shape == (1, 3, 256, 256), "padded to the model's 256 x 256 input"


# ----------------------------------------------------------------------------- boxes and propagation on the real CT


@pytest.mark.parametrize("organ, measured", [(LIVER, 0.973), (SPLEEN, 0.962)])
def test_a_box_on_a_real_slice_segments_the_organ(predictor, real, organ, measured):
    k = 1  # slice 15 of the CT
    target = real[1].array[k] == organ
    result = predictor.predict(box=_box_ijk(target, k), point_space="ijk", propagate=False)
    score = _dice(result.mask[k], target)
    assert score >= measured - 0.05, f"a box around the organ gives Dice {score:.3f} on its slice (measured {measured})"
    assert not result.mask[np.arange(result.mask.shape[0]) != k].any(), "without propagation only the prompted slice is drawn"


def test_one_box_propagates_over_the_organ_and_stops_where_it_ends(predictor, real):
    target = real[1].array == RIGHT_KIDNEY  # slices 14-18 of the CT: 0-4 here
    ends = np.nonzero(target.any((1, 2)))[0]
    assert ends.tolist() == list(range(5)), "the reference kidney ends inside the slab"
    k = 2
    result = predictor.predict(box=_box_ijk(target[k], k), point_space="ijk")
    score = _dice(result.mask, target)
    assert score >= 0.90, f"one box on one slice gives the kidney in 3-D with Dice {score:.3f} (measured 0.950)"
    assert not result.mask[5:].any() and "organ ended" in result.stops["up"], "propagation stops where the kidney ends"


def test_refine_all_redraws_every_organ_on_the_input_geometry(predictor, real):
    ct, labels = real
    result = refine_all(predictor, ct, labels)
    assert result.labels.shape == labels.shape and result.labels.geometry == labels.geometry, "refine-all keeps the input's geometry"
    assert result.labels.array.dtype == np.uint8
    score = _dice(result.labels.array == LIVER, labels.array == LIVER)
    assert score >= 0.89, f"refine-all from reference boxes redraws the liver (Dice {score:.3f}, measured 0.943)"


def test_refine_all_keeps_an_organs_outline_where_the_answer_left_it_for_another_structure(monkeypatch):
    import torch

    predictor = SlicePredictor("litemedsam", cache_slices=1)
    volume = Volume(np.zeros((2, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0)))
    predictor.set_volume(volume)
    yy, xx = np.mgrid[:64, :64]
    organ = (np.abs(yy - 32) < 8) & (np.abs(xx - 20) < 8)  # FINE's organ (label 2) on both slices
    grown = (np.abs(yy - 32) < 9) & (np.abs(xx - 20) < 12)  # slice 0: an answer that redraws it (covers it all)
    elsewhere = (np.abs(yy - 32) < 8) & (np.abs(xx - 45) < 8)  # slice 1: an answer on another structure
    answers = {0: grown, 1: elsewhere}
    frame = predictor.frame
    monkeypatch.setattr(predictor, "slice_logits", lambda k, box=None, **kw: (
        torch.from_numpy(np.where(frame.to_frame(np.stack([answers[0], answers[1]]))[k], 5.0, -5.0).astype(np.float32)),
        torch.zeros(1, 1, 256, 256), 0.9))
    labels = Volume(np.stack([organ, organ]).astype(np.uint8) * 2, volume.geometry)
    result = refine_all(predictor, volume, labels)
    assert np.array_equal(result.labels.array[0] == 2, grown), "an answer that covers the organ replaces its outline"
    assert np.array_equal(result.labels.array[1] == 2, organ), "an answer that left the organ does not: the outline stays"
    assert result.report["kept"] == 1 and result.report["min_cover"] == 0.3
    every = refine_all(predictor, volume, labels, min_cover=0.0)
    assert np.array_equal(every.labels.array[1] == 2, elsewhere), "min_cover=0: every answer replaces"
    with pytest.raises(InputError, match="min_cover must lie between 0 and 1"):
        refine_all(predictor, volume, labels, min_cover=1.5)


def test_refine_all_asks_more_of_an_answer_where_the_organ_runs_off_the_image(monkeypatch):
    """An organ cut by the image's edge (a tight field of view): an answer covering half of FINE's organ there
    replaces it under the general rule (0.3) but not under ``edge_min_cover``; away from the edge nothing changes."""
    import torch

    predictor = SlicePredictor("litemedsam", cache_slices=1)
    volume = Volume(np.zeros((2, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0)))
    predictor.set_volume(volume)
    yy, xx = np.mgrid[:64, :64]
    at_edge = (np.abs(yy - 32) < 10) & (xx < 20)  # slice 0: FINE's organ runs off the image on the left
    inside = (np.abs(yy - 32) < 10) & (np.abs(xx - 40) < 10)  # slice 1: the same organ inside the image
    half = [at_edge & (xx >= 10), inside & (xx >= 40)]  # answers covering half of it on each slice
    frame = predictor.frame
    answers = frame.to_frame(np.stack(half))
    monkeypatch.setattr(predictor, "slice_logits", lambda k, box=None, **kw: (
        torch.from_numpy(np.where(answers[k], 5.0, -5.0).astype(np.float32)), torch.zeros(1, 1, 256, 256), 0.9))
    labels = Volume(np.stack([at_edge, inside]).astype(np.uint8) * 5, volume.geometry)
    general = refine_all(predictor, volume, labels, edge_min_cover=None)
    assert np.array_equal(general.labels.array[0] == 5, half[0]), "the general rule takes the half answer at the edge"
    edge = refine_all(predictor, volume, labels, edge_min_cover=0.9)
    assert np.array_equal(edge.labels.array[0] == 5, at_edge), "at the edge FINE's outline stays: the answer covered half"
    assert np.array_equal(edge.labels.array[1] == 5, half[1]), "inside the image the general rule still applies"
    assert edge.report["kept"] == 1 and edge.report["edge_min_cover"] == 0.9
    with pytest.raises(InputError, match="edge_min_cover must be 0 or more"):
        refine_all(predictor, volume, labels, edge_min_cover=-0.1)


def test_box_rounds_redraw_the_box_around_the_answer_and_ask_again(monkeypatch):
    """FINE found a corner of an organ on the slice: the first box, FINE's enlarged by the margin, still cuts the
    organ and so does the answer; each further round, with the box around the last answer, takes in more of it, and
    the rounds stop once the box no longer grows. The answers are what a box-bound model gives: the organ's part
    inside the box."""
    import torch

    predictor = SlicePredictor("litemedsam", cache_slices=1)
    volume = Volume(np.zeros((1, 80, 80), np.float32), Geometry(spacing=(1.0, 1.0, 3.0)))
    predictor.set_volume(volume)
    yy, xx = np.mgrid[:80, :80]
    organ = (yy >= 30) & (yy < 50) & (xx >= 30) & (xx < 50)  # 20 x 20 pixels
    corner = organ & (yy < 34) & (xx < 34)  # FINE's part of it: 4 x 4
    organ_frame = predictor.frame.to_frame(organ[None])[0]
    asked = []

    def answer(k, box=None, **kw):
        asked.append(np.asarray(box).copy())
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        inside = np.zeros_like(organ_frame)
        inside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
        return torch.from_numpy(np.where(organ_frame & inside, 5.0, -5.0).astype(np.float32)), torch.zeros(1, 1, 256, 256), 0.9

    monkeypatch.setattr(predictor, "slice_logits", answer)

    def dice(result):
        found = result.labels.array[0] == 4
        return 2 * (found & organ).sum() / (found.sum() + organ.sum())

    labels = Volume((corner[None] * 4).astype(np.uint8), volume.geometry)
    scores = []
    for rounds in (1, 2, 3):
        asked.clear()
        result = refine_all(predictor, volume, labels, margin_mm=5.0, box_rounds=f"gallbladder:{rounds}")
        assert len(asked) == rounds and result.report["boxes"] == rounds, f"{rounds} round(s): LiteMedSAM asked {len(asked)} time(s)"
        assert result.report["box_rounds"] == ({} if rounds == 1 else {4: rounds})
        scores.append(dice(result))
    assert scores[0] < 0.5 and scores[1] > scores[0] + 0.2 and scores[2] > scores[1] + 0.2, f"each round takes in more: {scores}"
    other = refine_all(predictor, volume, labels, margin_mm=5.0, box_rounds={1: 3})
    assert dice(other) == scores[0], "rounds for another organ leave this one at one round"
    asked.clear()
    whole = refine_all(predictor, volume, Volume((organ[None] * 4).astype(np.uint8), volume.geometry), margin_mm=5.0, box_rounds=5)
    assert len(asked) == 1 and dice(whole) == 1.0, "FINE's outline was the organ: the box does not grow, so one round is asked"


@pytest.mark.parametrize("spec, expected", [
    ("2", dict.fromkeys(range(1, 9), 2)),
    ("gallbladder:2", {**dict.fromkeys(range(1, 9), 1), 4: 2}),
    ("2, pancreas:1", {**dict.fromkeys(range(1, 9), 2), 8: 1}),
    ("right kidney:3,left_kidney:2", {**dict.fromkeys(range(1, 9), 1), 2: 3, 3: 2}),
    (3, dict.fromkeys(range(1, 9), 3)),
    ({4: 2}, {**dict.fromkeys(range(1, 9), 1), 4: 2}),
])
def test_box_rounds_are_read_from_a_number_organ_pairs_or_a_mapping(spec, expected):
    from FINESegmentationLib.refiner.litemedsam.refine_all import parse_box_rounds

    assert parse_box_rounds(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("0", "between 1 and 5"), ("9", "between 1 and 5"), ("kidney:2", "unknown organ 'kidney'"), ("liver:two", "organ:number"),
    ("", "must be a number"), ({9: 2}, "unknown organ label"), (1.5, "must be a number"),
])
def test_box_rounds_refuse_what_they_cannot_read(spec, message):
    from FINESegmentationLib.refiner.litemedsam.refine_all import parse_box_rounds

    with pytest.raises(InputError, match=message):
        parse_box_rounds(spec)


def test_refined_slices_on_thin_slices_are_at_most_the_step_apart_and_take_in_every_organs_ends():
    from FINESegmentationLib.refiner.litemedsam.refine_all import refined_slices

    source = np.zeros((20, 4, 4), np.uint8)
    source[2:18, 0, 0] = 5  # an organ on slices 2..17
    source[7:12, 1, 1] = 4  # another on 7..11
    todo = list(range(2, 18))
    chosen = refined_slices(todo, source, 0.6, 3.0)  # 0.6 mm slices, 3 mm apart: every fifth
    assert chosen == [2, 7, 11, 12, 17], chosen
    assert max(b - a for a, b in zip(chosen, chosen[1:])) * 0.6 <= 3.0 + 1e-9, "refined slices at most 3 mm apart"
    assert refined_slices(todo, source, 3.0, 3.0) == todo, "slices as thick as the step: every slice"
    assert refined_slices(todo, source, 0.6, 0.0) == todo, "step 0: every slice"
    gap = [2, 3, 4, 9, 10, 11, 12, 13]  # slices 5..8 have no organ
    assert {4, 9} <= set(refined_slices(gap, source, 0.6, 3.0)), "slices on either side of a gap are refined"


def test_refine_all_on_thin_slices_interpolates_the_answers_between_the_slices_it_embeds(monkeypatch):
    import torch

    predictor = SlicePredictor("litemedsam", cache_slices=1)
    volume = Volume(np.zeros((10, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 1.0)))
    predictor.set_volume(volume)
    yy, xx = np.mgrid[:64, :64]
    assert predictor.frame.shape == (10, 64, 64)
    asked = []

    def answer(k, box=None, **kw):
        asked.append(k)
        if box[0] < 16:  # the small organ's box: an answer a little larger than its outline
            logits = np.where((yy < 8) & (xx < 8), 5.0, -5.0)
        else:  # the large organ: a square whose half-width grows by 2 pixels per slice, as a signed distance
            logits = (4 + 2 * k) - np.maximum(np.abs(yy - 32), np.abs(xx - 32)) + 0.5
        return torch.from_numpy(logits.astype(np.float32)), torch.zeros(1, 1, 256, 256), 0.9

    monkeypatch.setattr(predictor, "slice_logits", answer)
    fine = (np.abs(yy - 32) <= 6) & (np.abs(xx - 32) <= 6)  # FINE's large organ: the same square on every slice
    labels = np.stack([fine] * 10).astype(np.uint8) * 5
    small = np.zeros((64, 64), bool)
    small[2:6, 2:6] = True
    labels[[0, 1, 5, 6]] += small.astype(np.uint8) * 4  # the small organ: slices 0-1 and 5-6
    result = refine_all(predictor, volume, Volume(labels, volume.geometry), slice_step_mm=3.0)
    assert sorted(set(asked)) == [0, 3, 6, 9], "slices 3 mm apart (and every organ's ends) are embedded, no others"
    assert result.report["embedded"] == 4 and result.report["slices"] == 10 and result.report["interpolated"] > 0
    # Slice 4 lies between the refined slices 3 (half-width 10) and 6 (16): the interpolated answer reaches 12.
    width = int((result.labels.array[4, 32] == 5).sum())
    assert width == 2 * 12 + 1, f"slice 4 takes the answers interpolated along z (width {width}, 25 expected)"
    every = refine_all(predictor, volume, Volume(labels, volume.geometry), slice_step_mm=0.0)
    assert every.report["embedded"] == 10 and int((every.labels.array[4, 32] == 5).sum()) == 2 * 12 + 1
    small_answer = (yy < 8) & (xx < 8)
    assert np.array_equal(result.labels.array[0] == 4, small_answer), "a refined slice takes the small organ's answer"
    for k in (1, 5):  # between a refined slice with the small organ and one without it: its outline stays
        assert np.array_equal(result.labels.array[k] == 4, small), f"slice {k} keeps the small organ's input outline"
    with pytest.raises(InputError, match="slice_step_mm must be 0"):
        refine_all(predictor, volume, Volume(labels, volume.geometry), slice_step_mm=-1.0)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("prompt, message", [
    ({"box": [[-5.0, 10.0, 3.0], [40.0, 50.0, 3.0]]}, "Box corner 1 .* lies outside the volume"),
    ({"points": [[10.0, 10.0, 30.0]], "labels": [1]}, "Click 1 .* lies outside the volume"),
    ({"box": [[10.0, 10.0, 3.0], [10.2, 50.0, 3.0]]}, "less than one voxel wide"),
    ({"points": [[5.0, 5.0, 3.0]], "labels": [1]}, "draw a box around the organ there"),
    ({"points": [[5.0, 5.0, 3.0]], "labels": [2]}, "must be 1 .* or 0"),
])
def test_bad_prompts_are_refused_in_one_sentence_and_change_nothing(predictor, prompt, message):
    cached = predictor.cached_slices()
    previous = np.zeros(predictor.volume.shape, bool)
    with pytest.raises(InputError, match=message) as error:
        predictor.predict(point_space="ijk", previous_mask=previous, **prompt)
    assert "\n" not in str(error.value), "one sentence"
    assert predictor.cached_slices() == cached and not previous.any(), "a refused prompt computes and changes nothing"


# ----------------------------------------------------------------------------- markups and the command line


def _roi(path: Path, corners_ras: np.ndarray) -> Path:
    """A Slicer ROI markups file (LPS, as Slicer saves it) spanning two RAS corners."""
    lo, hi = corners_ras.min(0), corners_ras.max(0)
    centre = (lo + hi) / 2 * np.array([-1, -1, 1])
    path.write_text(json.dumps({"markups": [{"type": "ROI", "coordinateSystem": "LPS", "roiType": "Box",
                                             "center": centre.tolist(), "size": (hi - lo).tolist(),
                                             "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]}]}))
    return path


def test_markups_boxes_read_from_rois_and_lines_in_ras(tmp_path):
    from FINESegmentationLib.markups import read_markups_box

    corners = np.array([[10.0, -20.0, 30.0], [40.0, 5.0, 36.0]])
    assert np.allclose(read_markups_box(_roi(tmp_path / "r.mrk.json", corners)), corners), "an ROI's corners in RAS"
    line = tmp_path / "l.mrk.json"
    line.write_text(json.dumps({"markups": [{"type": "Line", "coordinateSystem": "LPS", "controlPoints": [
        {"position": [-10.0, 20.0, 30.0]}, {"position": [-40.0, -5.0, 30.0]}]}]}))
    assert np.allclose(read_markups_box(line), [[10.0, -20.0, 30.0], [40.0, 5.0, 30.0]]), "a line's two ends in RAS"
    points = tmp_path / "p.mrk.json"
    points.write_text(json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2, 3]}]}]}))
    with pytest.raises(InputError, match="neither an ROI nor a line"):
        read_markups_box(points)


def test_cli_refine_creates_an_absent_segment_from_a_box(tmp_path, capsys):
    ct = _slab(read_volume(DATA / "ct.nii.gz"), 14, 16)
    labels = _slab(read_volume(DATA / "labels.nii.gz", kind="label"), 14, 16)
    target = labels.array == SPLEEN
    others = labels.array.copy()
    others[target] = 0
    from FINESegmentationLib.io import write_volume

    ct_path = write_volume(ct, tmp_path / "ct.nii.gz")
    seg = write_segmentation(Volume(others, labels.geometry), tmp_path / "ct.seg.nrrd")
    box = _box_ijk(target[1], 1)
    ras = np.array([(ct.geometry.ijk_to_ras() @ np.append(c, 1.0))[:3] for c in box])
    out = tmp_path / "refined.seg.nrrd"
    rc = main(["refine", str(ct_path), "--seg", str(seg), "--segment", "spleen", "--box", str(_roi(tmp_path / "box.mrk.json", ras)),
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "LiteMedSAM with a box" in capsys.readouterr().out
    after = read_segmentation(out).array
    score = _dice(after == SPLEEN, target)
    assert score >= 0.90, f"a box creates the absent spleen over the 3 slices (Dice {score:.3f}, measured 0.957)"
    kept = (others != 0) & (after != SPLEEN)
    assert np.array_equal(after[kept], others[kept]), "the other segments are kept where the spleen did not go"


@pytest.mark.parametrize("problem, message", [
    ("unreadable box", "not a Slicer markups file"),
    ("box outside", "lies outside the volume"),
    ("nothing", "Give a box"),
])
def test_cli_refine_refusals_exit_1_with_one_sentence_and_write_nothing(tmp_path, capsys, problem, message):
    ct_path = DATA / "ct.nii.gz"
    out = tmp_path / "refined.seg.nrrd"
    args = ["refine", str(ct_path), "--segment", "spleen", "-o", str(out), "--refiner", "litemedsam"]
    if problem == "unreadable box":
        bad = tmp_path / "box.mrk.json"
        bad.write_text("{ not json")
        args += ["--box", str(bad)]
    elif problem == "box outside":
        args += ["--box", str(_roi(tmp_path / "far.mrk.json", np.array([[0.0, 0.0, 5000.0], [30.0, 30.0, 5000.0]])))]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err, err
    assert err.count("\n") == 0 and "Traceback" not in err, "one sentence, no traceback"
    assert not out.exists() and not list(tmp_path.glob(".refined*")), "nothing is written"


def test_segment_refine_all_switch_redraws_fines_organs_on_the_input_grid(tmp_path, tiny_checkpoint, capsys):
    from FINESegmentationLib.io import write_volume

    ct = _slab(read_volume(DATA / "ct.nii.gz"), 14, 15)
    source = write_volume(ct, tmp_path / "ct.nii.gz")
    out, report = tmp_path / "ct.seg.nrrd", tmp_path / "r.json"
    rc = main(["segment", "-q", "--device", "cpu", "--fast", "--model", str(tiny_checkpoint), "--refine-all", str(source),
               "-o", str(out), "--report", str(report)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["refine_all"] is not None and data["refine_all"]["slices"] <= 2 and "refine_all" in data["timings_s"], \
        "the report says what refine-all redrew and how long it took"
    assert read_segmentation(out).geometry.allclose(ct.geometry, atol=1e-6), "the refined segmentation keeps the CT's geometry"

    for flags, runs in (([], True), (["--fast"], False), (["--fast", "--refine-all"], True), (["--no-refine-all"], False)):
        rc = main(["segment", "-q", "--device", "cpu", "--model", str(tiny_checkpoint), *flags, str(source), "-o", str(out),
                   "--report", str(report)])
        assert rc == 0, capsys.readouterr().err
        assert (json.loads(report.read_text())["refine_all"] is not None) == runs, \
            f"refine-all runs by default and is skipped by --fast or --no-refine-all ({flags}: {'on' if runs else 'off'})"

    for flags, tta in (([], True), (["--fast"], False), (["--fast", "--tta"], True), (["--no-tta"], False)):
        rc = main(["segment", "-q", "--device", "cpu", "--model", str(tiny_checkpoint), "--no-refine-all", *flags, str(source),
                   "-o", str(out), "--report", str(report)])
        assert rc == 0, capsys.readouterr().err
        assert json.loads(report.read_text())["tta"] is tta, f"TTA is on by default and off with --fast or --no-tta ({flags})"

    for step, expected in ((None, 3.0), ("0", 0.0), ("5", 5.0)):
        rc = main(["segment", "-q", "--device", "cpu", "--fast", "--refine-all", "--model", str(tiny_checkpoint), str(source),
                   "-o", str(out), "--report", str(report), *(["--refine-step", step] if step else [])])
        assert rc == 0, capsys.readouterr().err
        assert json.loads(report.read_text())["refine_all"]["slice_step_mm"] == expected, f"--refine-step {step} reaches refine-all"
    for margin, expected in ((None, 8.0), ("0", 0.0), ("12", 12.0)):
        rc = main(["segment", "-q", "--device", "cpu", "--fast", "--refine-all", "--model", str(tiny_checkpoint), str(source),
                   "-o", str(out), "--report", str(report), *(["--refine-margin", margin] if margin else [])])
        assert rc == 0, capsys.readouterr().err
        assert json.loads(report.read_text())["refine_all"]["margin_mm"] == expected, f"--refine-margin {margin} reaches refine-all"
    from FINESegmentationLib.refiner.litemedsam.refine_all import DEFAULT_BOX_ROUNDS

    default_rounds = {str(k): v for k, v in DEFAULT_BOX_ROUNDS.items() if v != 1}
    for rounds, expected in ((None, default_rounds), ("2,pancreas:1", {str(v): 2 for v in range(1, 8)})):
        rc = main(["segment", "-q", "--device", "cpu", "--fast", "--refine-all", "--model", str(tiny_checkpoint), str(source),
                   "-o", str(out), "--report", str(report), *(["--refine-rounds", rounds] if rounds else [])])
        assert rc == 0, capsys.readouterr().err
        assert json.loads(report.read_text())["refine_all"]["box_rounds"] == expected, f"--refine-rounds {rounds} reaches refine-all"
    before = out.read_bytes()
    rc = main(["segment", "-q", "--device", "cpu", "--model", str(tiny_checkpoint), "--refine-rounds", "spleen:x", str(source), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "Box rounds 'spleen:x'" in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == before, "refused rounds leave the earlier output as it was"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "-q", "--device", "cpu", "--model", str(tiny_checkpoint), "--refine-margin", "-1", str(source), "-o", str(out)])
    assert exit_info.value.code == 2 and "out of range" in capsys.readouterr().err
    with pytest.raises(InputError, match="box margin must be 0 or a positive number"):
        Segmenter(str(tiny_checkpoint), device="cpu", refine_margin_mm=float("nan"))
    rc = main(["segment", "-q", "--device", "cpu", "--model", str(tiny_checkpoint), "--refine-step", "-2", str(source), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "slice step must be 0" in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == before, "a refused step leaves the earlier output as it was"
