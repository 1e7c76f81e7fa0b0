"""Click fine-tuning of LiteMedSAM: simulated clicks, the click weights file, one training step, the CLI's refusals."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from FINESegmentationLib.checkpoints import read_registry, sha256_of
from FINESegmentationLib.cli import main
from FINESegmentationLib.errors import CheckpointError, InputError
from FINESegmentationLib.io import read_segmentation, read_volume, write_segmentation
from FINESegmentationLib.labels import ORGAN_BY_NAME
from FINESegmentationLib.refiner.clicks import deepest_click
from FINESegmentationLib.refiner.litemedsam.build import load_litemedsam
from FINESegmentationLib.refiner.litemedsam.click_weights import load_litemedsam_clicks, save_click_weights, slice_weights
from FINESegmentationLib.refiner.litemedsam.clicks import jittered_box, training_click, uniform_click
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor
from FINESegmentationLib.refiner.litemedsam.slice_cache import CacheSource, build_cache
from FINESegmentationLib.refiner.litemedsam.training import ClickTrainer, ClickTrainSettings
from FINESegmentationLib.resources import models_dir
from FINESegmentationLib.volume import Geometry, Volume


def _disk(shape, centre, radius):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def test_deepest_click_is_positive_at_the_centre_of_a_missed_region_and_negative_in_a_false_positive():
    target = _disk((64, 64), (32, 32), 20)
    missed = np.zeros_like(target)
    missed[22:43, 22:43] = True  # a 21 x 21 square inside the organ, centre (32, 32)
    prediction = target & ~missed
    x, y, label = training_click(prediction, target, np.random.default_rng(0), deepest_share=1.0)
    assert (label, x, y) == (1, 32, 32), "a click in a false negative is positive and at the missed square's deepest point"
    extra = _disk((64, 64), (8, 56), 5) & ~target
    x, y, label = training_click(target | extra, target, np.random.default_rng(0), deepest_share=1.0)
    assert label == 0 and extra[int(y), int(x)] and (x, y) == (56, 8), "a click in a false positive is negative and at its deepest point"


def test_uniform_clicks_stay_inside_the_error_and_take_its_sign():
    target = _disk((64, 64), (32, 32), 20)
    prediction = _disk((64, 64), (32, 40), 20)  # misses the left part, adds on the right
    rng = np.random.default_rng(1)
    for _ in range(30):
        x, y, label = uniform_click(prediction, target, rng)
        assert prediction[int(y), int(x)] != target[int(y), int(x)], "a uniform click lies in the error region"
        assert label == int(target[int(y), int(x)]), "positive in a false negative, negative in a false positive"
    assert training_click(target, target, rng) is None, "an exact prediction gets no click"


def test_jittered_box_stays_near_the_organ_and_inside_the_image():
    target = _disk((64, 64), (32, 32), 10)
    for seed in range(20):
        box = jittered_box(target, np.random.default_rng(seed), limits=(64, 64))
        assert np.all(np.abs(box - [22, 22, 42, 42]) <= 2.1) and box[0] <= box[2] and box[1] <= box[3], \
            "each side moves by at most 10% of the box's size and the corners stay ordered"


@pytest.fixture(scope="module")
def base_model():
    return load_litemedsam()[0]


@pytest.fixture()
def registered_clicks(tmp_path, monkeypatch, base_model):
    """A registry with the bundled LiteMedSAM and a click weights file whose decoder differs from it."""
    models = tmp_path / "Resources" / "Models"
    models.mkdir(parents=True)
    base_file = models_dir() / "litemedsam.pt"
    (models / "litemedsam.pt").symlink_to(base_file)
    tuned = copy.deepcopy(base_model)
    torch.nn.init.constant_(tuned.mask_decoder.iou_token.weight, 0.25)
    sha = save_click_weights(tuned, models / "clicks.pt", sha256_of(base_file), {"description": "test"})
    registry = json.loads((models_dir() / "models.json").read_text())
    registry["models"] = [m for m in registry["models"] if m["name"] == "litemedsam"] + [
        {"name": "litemedsam-clicks", "kind": "refiner-2d-clicks", "file": "clicks.pt", "sha256": sha, "description": "test"}]
    (models / "models.json").write_text(json.dumps(registry))
    monkeypatch.setenv("FINESEG_RESOURCES", str(tmp_path / "Resources"))
    return models / "clicks.pt"


def test_click_weights_load_over_the_base_model_and_a_tampered_file_is_refused(registered_clicks):
    model, path = load_litemedsam_clicks()
    assert torch.all(model.mask_decoder.iou_token.weight == 0.25), "the registered click weights replace the base decoder's"
    data = bytearray(registered_clicks.read_bytes())
    data[-100] ^= 0xFF
    registered_clicks.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as refused:
        load_litemedsam_clicks()
    message = str(refused.value)
    assert "SHA256" in message and "\n" not in message and message.endswith("."), "a tampered file is refused in one sentence"


def _small_ct() -> tuple[Volume, Volume]:
    """Two 96 x 96 slices at 2 mm: a soft-tissue body with a bright disk organ (label 1) and a dark one (label 5)."""
    hu = np.full((2, 96, 96), -1000.0, np.float32)
    body = _disk((96, 96), (48, 48), 44)
    labels = np.zeros((2, 96, 96), np.uint8)
    labels[:, _disk((96, 96), (40, 30), 10)] = 1
    labels[:, _disk((96, 96), (55, 62), 14)] = 5
    hu[:, body] = 20.0
    hu[labels == 1] = 180.0
    hu[labels == 5] = 80.0
    geometry = Geometry(spacing=(2.0, 2.0, 5.0))
    return Volume(hu, geometry), Volume(labels, geometry)


def test_one_training_step_lowers_the_loss_on_its_batch(tmp_path, base_model):
    image, labels = _small_ct()
    cache = build_cache([("small", image, labels)], tmp_path / "cache", base_model, CacheSource(("small",), None, "test"), progress=False)
    assert len(cache) == 2 and {o for _, o in cache.samples} == {1, 5}, "both slices and both organs are cached"
    settings = ClickTrainSettings(data="", out="", batch_size=4, lr=1e-4, warmup=1, first_prompt_share=1.0)
    trainer = ClickTrainer(base_model, cache, settings)
    before = trainer.step(0)["loss"]
    after = trainer.step(0)["loss"]  # the same seed: the same samples and prompts
    assert after < before, f"a step lowers the loss on the batch it trained on ({before:.4f} -> {after:.4f})"


def test_litemedsam_train_refuses_bad_options_in_one_sentence(tmp_path, capsys):
    data = tmp_path / "data"
    out = tmp_path / "run"
    cases = [
        (["--data", str(data), "--out", str(out)], "does not exist"),
        (["--data", str(data), "--out", str(out), "--resume"], "to resume from"),
    ]
    for argv, expected in cases:
        assert main(["litemedsam-train", *argv]) == 1, f"{argv} exits with status 1"
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, f"{argv} is refused in one sentence: {err!r}"
        assert not out.exists(), f"{argv} writes nothing"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    assert main(["litemedsam-train", "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and err.count("\n") == 0, "an existing checkpoint is not overwritten without --resume"
    shutil.rmtree(out)


def test_click_tuned_litemedsam_weights_are_the_default_once_registered(tmp_path):
    registry = {"models": [{"name": "litemedsam", "kind": "refiner-2d", "file": "litemedsam.pt", "sha256": "0" * 64}]}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(registry))
    assert slice_weights(None, path) == (None, False), "without click-tuned weights: the published ones"
    registry["models"].append({"name": "litemedsam-clicks", "kind": "refiner-2d-clicks", "file": "c.pt", "sha256": "1" * 64})
    path.write_text(json.dumps(registry))
    assert slice_weights(None, path) == ("litemedsam-clicks", True), "registered click-tuned weights are the default"
    assert slice_weights("litemedsam", path) == ("litemedsam", False), "a chosen model is kept"
    with pytest.raises(CheckpointError, match=r"Unknown LiteMedSAM weights 'nope': give a registered name \(litemedsam, litemedsam-clicks\)"):
        slice_weights("nope", path)  # every registered name is offered, the click-tuned ones too


# ----------------------------------------------------------------------------- clicks in 3-D with the bundled click weights

REAL = Path(__file__).parent / "data" / "ts-example-noncontrast"
MEASURED_ONE_CLICK = 0.928  # Dice of the left kidney created by one click on the real CT (README)


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_the_bundled_click_weights_are_registered_and_the_slice_predictors_default():
    entry = read_registry(kind="refiner-2d-clicks")["litemedsam-clicks"]
    assert sha256_of(entry.path) == entry.sha256, "the bundled click weights are the registered file"
    assert entry.path.stat().st_size < 10 * 2**20, "prompt encoder + mask decoder only, fp16"
    predictor = SlicePredictor()
    assert predictor.click_trained, "SlicePredictor() loads the click-tuned weights when they are registered"
    assert not SlicePredictor("litemedsam").click_trained, "the published weights stay selectable"


def test_the_box_that_comes_with_clicks_keeps_only_the_segment_near_a_positive_click():
    geometry = Geometry(spacing=(1.0, 1.0, 3.0))
    predictor = SlicePredictor(cache_slices=1)
    predictor.set_volume(Volume(np.zeros((2, 80, 80), np.float32), geometry))
    mask = np.zeros((80, 80), bool)
    mask[10:20, 10:20] = True  # a part of the segment far (> 10 mm) from the click below
    mask[50:60, 50:60] = True  # and one 4 mm from it
    box = predictor.click_box(mask, np.array([[64.0, 55.0]]), np.array([1]))
    assert np.allclose(box, [50 - 5, 50 - 5, 64 + 5, 59 + 5]), f"the near part and the click, 5 mm looser, got {box}"
    assert predictor.click_box(mask, np.array([[35.0, 75.0]]), np.array([1])) is None, \
        "a positive click far from every part of the segment comes alone (the segment there is another structure)"
    assert np.allclose(predictor.click_box(mask, np.array([[15.0, 15.0]]), np.array([0])), [5, 5, 64, 64]), \
        "negative clicks alone come with the box of the whole segment on the slice"


def test_a_negative_click_where_the_segment_is_empty_is_refused_and_changes_nothing():
    ct = read_volume(REAL / "ct.nii.gz")
    predictor = SlicePredictor()
    predictor.set_volume(ct)
    previous = np.zeros(ct.shape, bool)
    with pytest.raises(InputError, match="only remove") as refused:
        predictor.predict(points=[[60.0, 50.0, 15.0]], labels=[0], previous_mask=previous, point_space="ijk")
    assert "\n" not in str(refused.value) and predictor.cached_slices() == [] and not previous.any(), "one sentence, nothing computed"


def _points_file(path: Path, ras_points: np.ndarray, positive: list[bool]) -> Path:
    """A Slicer point list file (LPS); a negative click's label starts with '-'."""
    points = [{"label": ("F-" if p else "-F-") + str(n + 1), "position": (np.asarray(r) * [-1, -1, 1]).tolist()}
              for n, (r, p) in enumerate(zip(ras_points, positive))]
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": points}]}))
    return path


def test_cli_one_click_creates_an_organ_missing_from_the_segmentation(tmp_path, capsys):
    ct = read_volume(REAL / "ct.nii.gz")
    labels = read_volume(REAL / "labels.nii.gz", kind="label")
    left_kidney = ORGAN_BY_NAME["left kidney"].label
    target = labels.array == left_kidney
    others = labels.array.copy()
    others[target] = 0
    seg = write_segmentation(Volume(others, labels.geometry), tmp_path / "ct.seg.nrrd")
    click = deepest_click(np.zeros_like(target), target, ct.geometry.spacing)
    z, y, x = click.position
    ras = (ct.geometry.ijk_to_ras() @ np.array([x, y, z, 1.0]))[:3]
    out = tmp_path / "refined.seg.nrrd"
    rc = main(["refine", str(REAL / "ct.nii.gz"), "--seg", str(seg), "--segment", "left kidney",
               "--points", str(_points_file(tmp_path / "click.mrk.json", np.array([ras]), [True])), "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "click-tuned LiteMedSAM with 1 click(s)" in captured.out and "warning" not in captured.err
    after = read_segmentation(out).array
    score = _dice(after == left_kidney, target)
    assert score >= MEASURED_ONE_CLICK - 0.05, f"one click creates the absent left kidney (Dice {score:.3f}, measured {MEASURED_ONE_CLICK})"
    kept = (others != 0) & (after != left_kidney)
    assert np.array_equal(after[kept], others[kept]), "the other segments are kept where the kidney did not go"


def test_cli_auto_sends_clicks_on_a_found_organ_to_the_3d_refiner_and_a_far_click_or_a_missing_organ_to_litemedsam(tmp_path, capsys):
    """--refiner auto (the default): clicks on a segment FINE found go to the Memorizing-SAM refiner (ahead after
    five clicks from the default segmentation, README); an empty segment, a positive click more than 20 mm
    outside the segment's box, or a box go to LiteMedSAM, the refiner that draws an organ afresh."""
    import argparse

    from FINESegmentationLib.cli_refine import _choose_refiner

    ct = read_volume(REAL / "ct.nii.gz")
    labels = read_volume(REAL / "labels.nii.gz", kind="label")
    kidney = labels.array == ORGAN_BY_NAME["left kidney"].label
    inside = deepest_click(np.zeros_like(kidney), kidney, ct.geometry.spacing).position  # (z, y, x)
    to_ras = lambda zyx: (ct.geometry.ijk_to_ras() @ np.array([zyx[2], zyx[1], zyx[0], 1.0]))[:3]  # noqa: E731
    near, far = np.array([to_ras(inside)]), np.array([to_ras((inside[0], inside[1], 2))])  # far: the CT's other side
    assert abs(far[0, 0] - near[0, 0]) > 60
    args = argparse.Namespace(refiner="auto", model=None, box=None, points="p.mrk.json", seg="s.seg.nrrd")
    assert _choose_refiner(args, kidney, ct, near, np.array([True])) == "memorizing-sam", "a click on a found organ"
    assert _choose_refiner(args, kidney, ct, near, np.array([False])) == "memorizing-sam", "a negative click on it"
    assert _choose_refiner(args, np.zeros_like(kidney), ct, near, np.array([True])) == "litemedsam", "an empty segment"
    assert _choose_refiner(args, kidney, ct, far, np.array([True])) == "litemedsam", "a positive click far from the segment"
    assert _choose_refiner(args, kidney, ct, far, np.array([False])) == "memorizing-sam", "a far negative click only removes"
    boxed = argparse.Namespace(**{**vars(args), "box": "b.mrk.json"})
    assert _choose_refiner(boxed, kidney, ct, near, np.array([True])) == "litemedsam", "a box"
    chosen = argparse.Namespace(**{**vars(args), "refiner": "litemedsam"})
    assert _choose_refiner(chosen, kidney, ct, near, np.array([True])) == "litemedsam", "--refiner is obeyed"

    seg = write_segmentation(labels, tmp_path / "ct.seg.nrrd")
    out = tmp_path / "refined.seg.nrrd"
    rc = main(["refine", str(REAL / "ct.nii.gz"), "--seg", str(seg), "--segment", "left kidney",
               "--points", str(_points_file(tmp_path / "click.mrk.json", near, [True])), "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "by Memorizing-SAM with 1 click(s)" in captured.out, captured.out


def _stub_answers(monkeypatch, predictor, answer_mask):
    """predict_slice answers ``answer_mask`` on every slice (predicted IoU 0.9), without the network."""
    from FINESegmentationLib.refiner.litemedsam.predictor import SliceAnswer

    monkeypatch.setattr(predictor, "predict_slice", lambda k, *a, **kw: SliceAnswer(answer_mask.copy(), torch.zeros(1, 1, 256, 256), 0.9))


def test_after_clicks_propagation_fills_gaps_adds_or_removes_and_keeps_the_segment_when_it_goes_astray(monkeypatch):
    predictor = SlicePredictor(cache_slices=1)
    predictor.set_volume(Volume(np.zeros((8, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0))))
    organ = _disk((64, 64), (32, 32), 10)
    previous = np.zeros((8, 64, 64), bool)
    previous[4:7] = _disk((64, 64), (33, 32), 10)  # the segment holds slices 4-6
    _stub_answers(monkeypatch, predictor, organ)
    filled = predictor.predict(points=[[32.0, 32.0, 1.0]], labels=[1], previous_mask=previous, point_space="ijk")
    assert filled.stops["up"] == "reached the segment" and np.array_equal(filled.mask[4:], previous[4:]), \
        "a click where the segment is empty fills the gap and stops at the segment, which it keeps"
    assert all(np.array_equal(filled.mask[z], organ) for z in range(4)) and filled.stops["down"] == "end of the volume", \
        "slices 0-3 drawn from the click's slice down to the volume's end"

    elsewhere = _disk((64, 64), (12, 12), 8)  # a correction whose propagation would leave the segment
    _stub_answers(monkeypatch, predictor, elsewhere)
    mixed = predictor.predict(points=[[32.0, 32.0, 5.0], [40.0, 32.0, 5.0]], labels=[0, 1], previous_mask=previous, point_space="ijk")
    assert mixed.stops == {"up": "the redrawn slice left the previous segment", "down": "the redrawn slice left the previous segment"}
    assert np.array_equal(mixed.mask[[4, 6]], previous[[4, 6]]), "the neighbours keep the segment"

    _stub_answers(monkeypatch, predictor, elsewhere)
    added = predictor.predict(points=[[32.0, 32.0, 5.0]], labels=[1], previous_mask=previous, point_space="ijk")
    assert np.array_equal(added.mask[5], previous[5] | elsewhere), "positive clicks near the segment only add to it"
    removed = predictor.predict(points=[[32.0, 32.0, 5.0]], labels=[0], previous_mask=previous, point_space="ijk")
    assert not removed.mask[5].any() and removed.mask[4].sum() <= previous[4].sum(), "negative clicks only remove"


def test_with_honour_clicks_an_answer_that_ignores_the_clicks_changes_nothing(monkeypatch):
    from FINESegmentationLib.refiner.litemedsam.predictor import PropagationSettings

    predictor = SlicePredictor(cache_slices=1, settings=PropagationSettings(honour_clicks=True))
    predictor.set_volume(Volume(np.zeros((4, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0))))
    previous = np.zeros((4, 64, 64), bool)
    previous[1:3] = _disk((64, 64), (32, 32), 10)
    _stub_answers(monkeypatch, predictor, _disk((64, 64), (12, 12), 8))  # never holds the click at (32, 44)
    result = predictor.predict(points=[[44.0, 32.0, 1.0], [32.0, 32.0, 1.0]], labels=[1, 0], previous_mask=previous, point_space="ijk")
    assert np.array_equal(result.mask, previous) and result.stops["up"] == "the answer did not follow the clicks"


def test_after_clicks_propagation_stops_where_the_mask_suddenly_grows_into_a_neighbour(monkeypatch):
    from FINESegmentationLib.refiner.litemedsam.predictor import SliceAnswer

    predictor = SlicePredictor(cache_slices=1)
    predictor.set_volume(Volume(np.zeros((6, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0))))
    organ, spilled = _disk((64, 64), (32, 32), 8), _disk((64, 64), (32, 36), 14)  # 201 px, then 613 px (3x)

    def predict_slice(k, box=None, points=None, labels=None, **kw):
        return SliceAnswer((organ if k in (2, 3) else spilled).copy(), torch.zeros(1, 1, 256, 256), 0.9)
    monkeypatch.setattr(predictor, "predict_slice", predict_slice)
    result = predictor.predict(points=[[32.0, 32.0, 2.0]], labels=[1], previous_mask=np.zeros((6, 64, 64), bool), point_space="ijk")
    assert result.stops == {"up": "organ ended (the mask grew into a neighbour)", "down": "organ ended (the mask grew into a neighbour)"}
    assert [z for z in range(6) if result.mask[z].any()] == [2, 3], "the slices where the mask tripled are left out"


def test_with_cut_ignored_a_negative_click_the_answer_ignores_cuts_away_the_structure_under_it_unless_that_is_most_of_the_segment(monkeypatch):
    from FINESegmentationLib.refiner.litemedsam.predictor import PropagationSettings, SliceAnswer

    predictor = SlicePredictor(cache_slices=1, settings=PropagationSettings(cut_ignored=True))
    predictor.set_volume(Volume(np.zeros((5, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0))))
    organ = _disk((64, 64), (32, 24), 10)
    leak = _disk((64, 64), (32, 44), 8)  # another structure the segment spilled into, on slices 1-3
    previous = np.zeros((5, 64, 64), bool)
    previous[:] = organ
    previous[1:4] |= leak

    def answers(under_click):
        def predict_slice(k, box=None, points=None, labels=None, **kw):
            # With a box the decoder keeps the whole segment (it ignores the negative click); a click alone
            # answers the structure under it; a box from that structure's mask follows it to the next slice.
            if box is None:
                mask = under_click
            else:
                mask = leak if box[0] > 30 else previous[k]
            return SliceAnswer(mask.copy(), torch.zeros(1, 1, 256, 256), 0.9)
        monkeypatch.setattr(predictor, "predict_slice", predict_slice)

    answers(leak)
    cut = predictor.predict(points=[[46.0, 32.0, 2.0]], labels=[0], previous_mask=previous, point_space="ijk")
    assert all(np.array_equal(cut.mask[z], organ) for z in range(5)), "the leak is cut away on slices 1-3 and the organ kept"
    assert cut.stops == {"up": "agrees with the previous segment", "down": "agrees with the previous segment"}

    answers(_disk((64, 64), (32, 34), 22))  # the structure under the click holds the whole segment: not taken
    kept = predictor.predict(points=[[46.0, 32.0, 2.0]], labels=[0], previous_mask=previous, point_space="ijk")
    assert np.array_equal(kept.mask, previous), "a cut that would take most of the segment changes nothing"


def test_with_max_addition_a_positive_click_stops_adding_where_the_answer_creeps_into_a_neighbour(monkeypatch):
    from FINESegmentationLib.refiner.litemedsam.predictor import PropagationSettings, SliceAnswer

    organ = _disk((64, 64), (32, 20), 8)
    creep = {z: _disk((64, 64), (32, 31 + r), r) for z, r in enumerate((3, 3, 4, 5, 6, 7, 8, 9))}  # grows a little per slice
    previous = np.zeros((8, 64, 64), bool)
    previous[:] = organ
    results = {}
    for limit in (0.0, 2.0):
        predictor = SlicePredictor(cache_slices=1, settings=PropagationSettings(max_addition=limit))
        predictor.set_volume(Volume(np.zeros((8, 64, 64), np.float32), Geometry(spacing=(2.0, 2.0, 3.0))))
        monkeypatch.setattr(predictor, "predict_slice", lambda k, *a, **kw: SliceAnswer(organ | creep[k], torch.zeros(1, 1, 256, 256), 0.9))
        results[limit] = predictor.predict(points=[[31.0, 32.0, 2.0]], labels=[1], previous_mask=previous, point_space="ijk")
    added = [int((creep[z] & ~organ).sum()) for z in range(8)]
    first = added[2]
    stop = next(z for z in range(3, 8) if added[z] > 2 * first and (added[z] - first) * 4.0 > 100.0)
    assert all(np.array_equal(results[0.0].mask[z], organ | creep[z]) for z in range(2, 8)), "without the limit it adds up to the volume's end"
    assert results[2.0].stops["up"] == "the addition outgrew the clicked slice's"
    assert all(np.array_equal(results[2.0].mask[z], organ | creep[z]) for z in range(2, stop)), "additions up to the limit are kept"
    assert all(np.array_equal(results[2.0].mask[z], organ) for z in range(stop, 8)), f"from slice {stop} on the segment is kept as it was"


def test_with_skip_ignored_removal_a_negative_click_the_answer_keeps_removes_nothing_else(monkeypatch):
    from FINESegmentationLib.refiner.litemedsam.predictor import PropagationSettings

    organ = _disk((64, 64), (32, 24), 10)
    bowel = _disk((64, 64), (32, 44), 8)  # where the segment crept; the click asks for it to go
    previous = np.zeros((5, 64, 64), bool)
    previous[:] = organ | bowel
    results = {}
    for skip in (False, True):
        predictor = SlicePredictor(cache_slices=1, settings=PropagationSettings(skip_ignored_removal=skip))
        predictor.set_volume(Volume(np.zeros((5, 64, 64), np.float32), Geometry(spacing=(1.0, 1.0, 3.0))))
        _stub_answers(monkeypatch, predictor, bowel)  # the decoder draws the clicked structure, not what should stay
        results[skip] = predictor.predict(points=[[46.0, 32.0, 2.0]], labels=[0], previous_mask=previous, point_space="ijk")
    assert not results[False].mask[2][organ].any(), "without the option the organ is what goes (the answer is what stays)"
    assert np.array_equal(results[True].mask, previous), "with it, the slice and its neighbours stay as they were"
    assert results[True].stops["up"] == "the answer kept a removed voxel"


@pytest.mark.parametrize("problem, message", [
    ("unreadable points", "not a Slicer markups file"),
    ("click outside", "lies outside the volume"),
])
def test_cli_click_refusals_exit_1_with_one_sentence_and_write_nothing(tmp_path, capsys, problem, message):
    points = tmp_path / "clicks.mrk.json"
    if problem == "unreadable points":
        points.write_text("{ not json")
    else:
        _points_file(points, np.array([[0.0, 0.0, 5000.0]]), [True])
    out = tmp_path / "refined.seg.nrrd"
    rc = main(["refine", str(REAL / "ct.nii.gz"), "--segment", "spleen", "--points", str(points), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err and err.count("\n") == 0 and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".refined*")), "nothing is written"
