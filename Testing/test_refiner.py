"""The Memorizing-SAM refiner: its parts, the memory, clicks, the predictor, the CLI and a short training run.

Everything runs a tiny configuration (16^3 crops of 12 mm voxels) on small phantoms, so the
file takes seconds; the shipped refiner is checked only through the registry and its files.
"""
import json

import numpy as np
import pytest
import torch

from FINESegmentationLib.cli import main
from FINESegmentationLib.data.phantoms import PhantomGenerator, write_dataset
from FINESegmentationLib.errors import CheckpointError, InputError
from FINESegmentationLib.io import read_segmentation, write_segmentation, write_volume
from FINESegmentationLib.labels import ORGAN_BY_NAME
from FINESegmentationLib.refiner.build import build_refiner, load_refiner, save_refiner
from FINESegmentationLib.refiner.clicks import deepest_click, next_click
from FINESegmentationLib.refiner.image_encoder import Attention, fuse, memory_attention
from FINESegmentationLib.refiner.memory import ExternalMemory, RetrievedMemory, distance_weights, memory_from_dataset
from FINESegmentationLib.refiner.predictor import RefinerPredictor
from FINESegmentationLib.volume import Volume

TINY = dict(crop_size=16, spacing=12.0, patch_size=4, embed_dim=16, depth=2, num_heads=2, memory_block=1,
            prompt_dim=16, decoder_heads=2, decoder_mlp_dim=32)
LIVER = ORGAN_BY_NAME["liver"].label


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_refiner("refiner-tiny", **TINY).eval()


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("refiner") / "tiny-refiner.pt"
    save_refiner(path, tiny_model, "random weights, tests only")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    write_dataset(out, 2, seed=5, in_plane=48, progress=False)
    return out


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory, tiny_model, dataset):
    memory = memory_from_dataset(tiny_model, str(dataset), progress=False)
    path = tmp_path_factory.mktemp("memory") / "memory.pt"
    memory.save(path)
    return path


@pytest.fixture(scope="module")
def case():
    return PhantomGenerator(seed=9, in_plane=48, slices=20).generate(0)


@pytest.fixture(scope="module")
def predictor(refiner_file, memory_file):
    return RefinerPredictor(str(refiner_file), memory=str(memory_file))


# ----------------------------------------------------------------------------- parts


def test_each_part_has_the_documented_shapes(tiny_model):
    c = tiny_model.config
    image = torch.randn(2, 1, c.crop_size, c.crop_size, c.crop_size)
    tokens = tiny_model.image_encoder.prefix(image)
    assert tokens.shape == (2, c.grid_size**3, c.embed_dim), "prefix gives one token per patch"
    k, v = tiny_model.image_encoder.plugin_kv(tokens)
    assert k.shape == v.shape == (2, c.num_heads, c.grid_size**3, c.embed_dim // c.num_heads), "memory keys/values per head"
    assert tiny_model.image_encoder.descriptor(tokens).shape == (2, 8 * c.embed_dim), "descriptor pools to 2^3 cells"
    embedding = tiny_model.image_encoder.suffix(tokens)
    assert embedding.shape == (2, c.prompt_dim, c.grid_size, c.grid_size, c.grid_size), "image embedding on the patch grid"
    points, labels = torch.rand(2, 3, 3) * c.crop_size, torch.tensor([[1, 0, -1], [1, -1, -1]])
    sparse, dense = tiny_model.prompt_encoder(points, labels, torch.zeros(2, 1, *image.shape[-3:]), 2)
    assert sparse.shape == (2, 3, c.prompt_dim) and dense.shape == embedding.shape, "one token per point, dense like the embedding"
    masks, iou = tiny_model.decode(embedding, image, points, labels, None)
    assert masks.shape == (2, 4, c.crop_size, c.crop_size, c.crop_size) and iou.shape == (2, 4), "4 masks at crop resolution + IoUs"


def _random_memory(b=1, k=3, h=2, m=8, d=4, weights=None):
    weights = torch.tensor([[0.5, 0.3, 0.2]]) if weights is None else weights
    return RetrievedMemory(torch.randn(b, k, h, m, d), torch.randn(b, k, h, m, d), weights, torch.zeros(b, k, dtype=torch.long), torch.zeros(b, k))


def test_memory_attention_is_used_and_fused_by_the_local_ratio_exactly():
    torch.manual_seed(1)
    attention = Attention(8, 2, local_ratio=0.7).eval()
    x = torch.randn(1, 5, 8)
    memory = _random_memory(h=2, d=4)
    with torch.no_grad():
        q, k, v = attention.qkv_heads(x)
        local = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        remembered = memory_attention(q, memory)
        expected = attention.proj((0.7 * local + 0.3 * remembered).transpose(1, 2).reshape(1, 5, 8))
        with_memory, without = attention(x, memory), attention(x)
    assert not torch.allclose(with_memory, without), "the memory changes the block's output"
    torch.testing.assert_close(with_memory, expected, rtol=0, atol=1e-6, msg="fused = r * local + (1 - r) * memory attention")
    assert torch.equal(fuse(local, remembered, 0.7), 0.7 * local + 0.3 * remembered), "fuse is the paper's convex combination"


def test_memory_attention_is_softmax_qk_over_each_example_weighted_by_retrieval():
    torch.manual_seed(2)
    q = torch.randn(1, 2, 5, 4)
    memory = _random_memory(weights=torch.tensor([[1.0, 0.0, 0.0]]))
    only_first = torch.softmax(q @ memory.keys[:, 0].transpose(-1, -2) / 2.0, dim=-1) @ memory.values[:, 0]
    torch.testing.assert_close(memory_attention(q, memory), only_first, msg="softmax(Q K_j^T / sqrt(d)) V_j of the weighted example")


def test_nearer_examples_weigh_more():
    weights = distance_weights(torch.tensor([[0.1, 0.5, 2.0]]))
    assert torch.all(weights[0, :-1] > weights[0, 1:]), "weights decrease with the retrieval distance"
    assert torch.isclose(weights.sum(), torch.tensor(1.0)), "weights sum to 1"


def test_knn_search_returns_the_nearest_descriptors():
    torch.manual_seed(3)
    descriptors = torch.randn(20, 6)
    memory = ExternalMemory(descriptors, torch.zeros(20, 1, 2, 2), torch.zeros(20, 1, 2, 2), [{}] * 20)
    query = descriptors[[7, 11]] + 0.01 * torch.randn(2, 6)
    distances, indices = memory.search(query, 3)
    brute = torch.cdist(query, descriptors).argsort(dim=1)[:, :3]
    assert indices[:, 0].tolist() == [7, 11], "a stored descriptor is its own nearest neighbour"
    assert torch.equal(indices, brute) and torch.all(distances[:, :-1] <= distances[:, 1:]), "k nearest, nearest first"


def test_memory_file_round_trips_and_refuses_tampering_and_other_refiners(tmp_path, memory_file, tiny_model):
    from FINESegmentationLib.checkpoints import sha256_of

    memory = ExternalMemory.load(memory_file, sha256_of(memory_file))
    assert len(memory) == len(memory.examples) > 0 and memory.keys.dtype == torch.float16, "examples with half-precision keys"
    again = tmp_path / "again.pt"
    memory.save(again)
    reloaded = ExternalMemory.load(again)
    assert torch.equal(reloaded.descriptors, memory.descriptors) and torch.equal(reloaded.values, memory.values), "round trip"
    memory.check_compatible(tiny_model)
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(memory_file.read_bytes()[:-40] + b"x" * 40)
    with pytest.raises(CheckpointError, match="does not match its registered SHA256"):
        ExternalMemory.load(tampered, sha256_of(memory_file))
    with pytest.raises(CheckpointError, match="refiner memory file"):
        ExternalMemory.load(tampered)
    torch.manual_seed(123)
    with pytest.raises(CheckpointError, match="built with another refiner"):
        memory.check_compatible(build_refiner("refiner-tiny", **TINY))


# ----------------------------------------------------------------------------- clicks


def test_first_click_is_at_the_deepest_point_of_the_largest_error_with_the_right_sign():
    target = np.zeros((20, 20, 20), bool)
    target[2:18, 2:18, 2:18] = True
    missed = target.copy()
    missed[4:13, 4:13, 4:13] = False  # a 9^3 hole: false negative, deepest at its centre
    missed[15:17, 15:17, 15:17] = False  # a smaller one
    click = deepest_click(missed, target)
    assert click.positive and click.position == (8, 8, 8), "positive click at the centre of the larger missed region"
    extra = target.copy()
    extra[0:2, 0:20, 0:20] = True  # a false-positive slab
    click = deepest_click(extra, target)
    assert not click.positive and click.position[0] in (0, 1), "negative click inside the false positive"
    assert next_click(target, target, 0, np.random.default_rng(0)) is None, "no error, no click"


# ----------------------------------------------------------------------------- predictor


def test_predictor_encodes_once_and_answers_inside_the_crop_box_on_the_input_grid(predictor, case):
    encoder = predictor.model.image_encoder
    calls = []
    original = encoder.prefix
    encoder.prefix = lambda image: calls.append(1) or original(image)
    try:
        segment = case.label.array == LIVER
        predictor.set_volume(case.image, segment)
        centre = np.argwhere(segment).mean(axis=0)[::-1]  # (x, y, z) index
        first = predictor.predict([centre], [1], point_space="ijk")
        second = predictor.predict([centre, centre + 1], [1, 0], previous_mask=first.paste(segment), point_space="ijk", use_memory=False)
    finally:
        encoder.prefix = original
    assert len(calls) == 1, "predict reuses the embedding cached by set_volume"
    box = first.box
    assert all(0 <= s.start < s.stop <= n for s, n in zip(box, case.image.shape)), "the crop box is clamped to the volume"
    assert first.mask.shape == tuple(s.stop - s.start for s in box) and first.mask.dtype == bool, "the mask fills the crop box"
    assert first.paste(segment).shape == case.image.shape, "pasting gives a mask on the input grid"
    assert first.used_memory and not second.used_memory, "memory is used when asked for"
    assert predictor.retrieved_examples() and predictor.retrieved_examples()[0]["weight"] >= predictor.retrieved_examples()[-1]["weight"]


def test_points_in_ras_and_ijk_give_the_same_answer(predictor, case):
    segment = case.label.array == LIVER
    predictor.set_volume(case.image, segment)
    ijk = np.argwhere(segment).mean(axis=0)[::-1]
    ras = (case.image.geometry.ijk_to_ras() @ np.append(ijk, 1.0))[:3]
    a = predictor.predict([ijk], [1], point_space="ijk")
    b = predictor.predict([ras], [1])
    assert np.array_equal(a.mask, b.mask), "RAS millimetres and voxel indices address the same voxel"


@pytest.mark.parametrize("label", [1, 0])
def test_a_click_changes_the_segment_only_within_its_reach(predictor, case, label):
    from scipy import ndimage

    from FINESegmentationLib.refiner.config import REACH_SEARCH_MM

    segment = case.label.array == LIVER
    predictor.set_volume(case.image, segment)
    sx, sy, sz = case.image.geometry.spacing
    depth_map = ndimage.distance_transform_edt(segment, sampling=(sz, sy, sx))
    zyx = np.unravel_index(int(np.argmax(depth_map)), segment.shape)  # the liver's deepest voxel
    click = np.array(zyx[::-1], float)  # (x, y, z) index
    whole = predictor.predict([click], [label], point_space="ijk", reach_mm=None)
    reach_mm = 1.5 * max(sx, sy, sz)
    # A positive click inside the segment reaches reach_mm; a negative one twice its depth, when that is farther.
    expected = reach_mm if label == 1 else max(reach_mm, 2.0 * min(float(depth_map[zyx]), REACH_SEARCH_MM))
    local = predictor.predict([click], [label], point_space="ijk", reach_mm=reach_mm, reach_factor=2.0)
    box = whole.box
    z, y, x = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
    distance = np.sqrt(((x - click[0]) * sx) ** 2 + ((y - click[1]) * sy) ** 2 + ((z - click[2]) * sz) ** 2)
    near = distance <= expected + 1e-6
    assert near.any() and (~near).any() and (label == 1 or expected > reach_mm), "the reach test needs both sides"
    assert (whole.mask != segment[box])[~near].any(), "without a reach the answer redraws the segment far from the click"
    assert np.array_equal(local.mask[~near], segment[box][~near]), "beyond the reach the segment stays as it was"
    inside = near & predictor._inside
    assert np.array_equal(local.mask[inside], whole.mask[inside]), "within the reach the refiner's answer is taken"
    fixed = predictor.predict([click], [label], point_space="ijk", reach_mm=reach_mm, reach_factor=0.0)
    assert np.array_equal(fixed.mask[distance > reach_mm + 1e-6], segment[box][distance > reach_mm + 1e-6]), "factor 0: reach_mm only"
    assert np.array_equal(predictor.predict(np.zeros((0, 3)), [], point_space="ijk").mask, segment[box]), "no click, no change"
    with pytest.raises(InputError, match="reach must be a positive number"):
        predictor.predict([click], [label], point_space="ijk", reach_mm=0.0)
    with pytest.raises(InputError, match="reach factor must be 0 or a positive number"):
        predictor.predict([click], [label], point_space="ijk", reach_factor=-1.0)


def test_clicks_outside_the_volume_and_empty_segments_are_refused_in_one_sentence(predictor, case):
    with pytest.raises(InputError, match="segment to refine is empty"):
        predictor.set_volume(case.image, np.zeros(case.image.shape, bool))
    predictor.set_volume(case.image, case.label.array == LIVER)
    with pytest.raises(InputError, match="Click 1 .* lies outside the volume"):
        predictor.predict([[1e4, 0.0, 0.0]], [1])
    with pytest.raises(InputError, match="one label"):
        predictor.predict([[0.0, 0.0, 0.0]], [1, 0], point_space="ijk")


# ----------------------------------------------------------------------------- command line


def _markups(path, points_ras, labels=None, descriptions=None, system="LPS"):
    flip = np.array([-1.0, -1.0, 1.0]) if system == "LPS" else np.ones(3)
    control = [
        {"id": str(i + 1), "label": (labels or [f"P-{i}"] * len(points_ras))[i], "description": (descriptions or [""] * len(points_ras))[i],
         "position": list(np.asarray(p) * flip), "positionStatus": "defined"}
        for i, p in enumerate(points_ras)
    ]
    path.write_text(json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                                "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm", "controlPoints": control}]}))
    return path


@pytest.fixture(scope="module")
def cli_case(tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("cli")
    ct = write_volume(case.image, folder / "ct.nii.gz")
    labels = case.label.array.copy()
    labels[labels == ORGAN_BY_NAME["gallbladder"].label] = 0
    seg = write_segmentation(Volume(labels, case.label.geometry), folder / "ct.seg.nrrd")
    inside = np.argwhere(labels == LIVER).mean(axis=0)[::-1]
    ras = (case.image.geometry.ijk_to_ras() @ np.append(inside, 1.0))[:3]
    points = _markups(folder / "clicks.mrk.json", [ras, ras + [5.0, 0.0, 0.0]], labels=["add", "-remove"])
    return folder, ct, seg, points, ras


def test_cli_refine_writes_the_refined_segment_and_keeps_the_others(cli_case, refiner_file, memory_file, capsys):
    folder, ct, seg, points, _ = cli_case
    out = folder / "refined.seg.nrrd"
    rc = main(["refine", str(ct), "--seg", str(seg), "--segment", "Liver", "--points", str(points), "-o", str(out),
               "--model", str(refiner_file), "--memory", str(memory_file)])
    assert rc == 0 and out.is_file(), capsys.readouterr().err
    assert "1 positive, 1 negative; memory" in capsys.readouterr().out, "the markups convention: a label starting with '-' is negative"
    before, after = read_segmentation(seg).array, read_segmentation(out).array
    others = (before != LIVER) & (before != 0) & (after != LIVER)
    assert np.array_equal(after[others], before[others]), "other segments keep their labels where the liver did not grow"
    assert not np.any((after != before) & (after != LIVER) & (before != LIVER)), "only the liver changed"


def test_cli_refine_click_reach_limits_the_change_and_0_lifts_it(cli_case, refiner_file, memory_file, tmp_path, capsys):
    folder, ct, seg, points, ras = cli_case
    base = ["refine", str(ct), "--seg", str(seg), "--segment", "liver", "--points", str(points), "--model", str(refiner_file), "--memory", str(memory_file)]
    changed = {}
    for reach in ("10", "0"):
        out = tmp_path / f"reach{reach}.seg.nrrd"
        assert main(base + ["-o", str(out), "--click-reach", reach, "--click-reach-factor", "0"]) == 0, capsys.readouterr().err
        changed[reach] = (read_segmentation(out).array == LIVER) != (read_segmentation(seg).array == LIVER)
    to_ras = read_segmentation(seg).geometry.ijk_to_ras()
    moved = (to_ras @ np.c_[np.argwhere(changed["10"])[:, ::-1], np.ones(int(changed["10"].sum()))].T).T[:, :3]
    clicks = np.array([ras, ras + [5.0, 0.0, 0.0]])
    nearest = np.linalg.norm(moved[:, None] - clicks[None], axis=2).min(axis=1)
    assert changed["10"].any() and nearest.max() <= 10.0 + 1e-6, "with --click-reach 10 nothing changes farther than 10 mm from a click"
    assert changed["0"].sum() > changed["10"].sum(), "--click-reach 0 lets the answer change the whole crop"
    out = tmp_path / "factor.seg.nrrd"
    assert main(base + ["-o", str(out), "--click-reach", "10"]) == 0, capsys.readouterr().err
    grown = (read_segmentation(out).array == LIVER) != (read_segmentation(seg).array == LIVER)
    assert grown.sum() > changed["10"].sum() and not (grown & ~changed["0"]).any(), \
        "by default the negative click deep in the liver reaches farther, within what the whole crop changes"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["-o", str(tmp_path / "bad.seg.nrrd"), "--click-reach", "-5"])
    assert exit_info.value.code == 2 and "out of range" in capsys.readouterr().err and not (tmp_path / "bad.seg.nrrd").exists()


@pytest.mark.parametrize("problem, message", [
    ("outside", "lies outside the volume"),
    ("empty", "is empty"),
    ("unknown", "no segment named 'appendix'"),
    ("memory", "not a refiner memory file"),
])
def test_cli_refine_errors_exit_1_with_one_sentence_and_write_nothing(cli_case, refiner_file, memory_file, tmp_path, capsys, problem, message):
    folder, ct, seg, points, ras = cli_case
    segment, memory = "liver", str(memory_file)
    if problem == "outside":
        points = _markups(tmp_path / "far.mrk.json", [ras + [0.0, 0.0, 5000.0]], system="RAS")
    elif problem == "empty":
        segment = "gallbladder"
    elif problem == "unknown":
        segment = "appendix"
    else:
        memory = tmp_path / "memory.pt"
        memory.write_bytes(b"not a memory")
    out = tmp_path / "refined.seg.nrrd"
    rc = main(["refine", str(ct), "--seg", str(seg), "--segment", segment, "--points", str(points), "-o", str(out),
               "--model", str(refiner_file), "--memory", str(memory)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err, err
    assert err.count("\n") == 0 and "Traceback" not in err, "one sentence, no traceback"
    assert not out.exists() and not list(tmp_path.glob(".refined*")), "nothing is written"


def test_markups_negative_by_description_and_ras_files(tmp_path):
    from FINESegmentationLib.markups import read_markups_points

    path = _markups(tmp_path / "p.mrk.json", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], descriptions=["", "Negative"], system="RAS")
    points, positive = read_markups_points(path)
    assert np.allclose(points, [[1, 2, 3], [4, 5, 6]]) and positive.tolist() == [True, False], "description 'negative' marks a negative click"
    lps = _markups(tmp_path / "q.mrk.json", [[1.0, 2.0, 3.0]], system="LPS")
    assert np.allclose(read_markups_points(lps)[0], [[1, 2, 3]]), "LPS files are converted to RAS"


# ----------------------------------------------------------------------------- training and evaluation


def test_a_short_training_run_lowers_the_loss(dataset, tmp_path):
    import csv

    from FINESegmentationLib.refiner.training import RefinerTrainSettings, train_refiner

    path = train_refiner(RefinerTrainSettings(data=str(dataset), out=str(tmp_path), steps=40, batch_size=2, iterations=2, lr=3e-3, warmup=5,
                                              crops_per_organ=1, progress=False, config_overrides=TINY))
    rows = list(csv.DictReader(open(tmp_path / "training_log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]), f"the loss decreases ({np.mean(losses[:8]):.3f} -> {np.mean(losses[-8:]):.3f})"
    model, metadata, _ = load_refiner(str(path))
    assert metadata["config"]["crop_size"] == 16 and metadata["clinical_use"] is False, "the checkpoint records its configuration"


def test_click_curves_report_dice_per_click_with_and_without_memory(predictor, dataset):
    from FINESegmentationLib.refiner.evaluation import click_curves

    curves = click_curves(predictor, str(dataset), ["phantom_000"], clicks=2, progress=False)
    organs = {r["organ"] for r in curves.rows}
    assert {(r["memory"], r["clicks"]) for r in curves.rows} == {(m, c) for m in (False, True) for c in range(3)}, "both modes, 0..2 clicks"
    assert len(curves.rows) == len(organs) * 2 * 3 and all(0 <= r["dice"] <= 1 for r in curves.rows)
    assert "**mean**" in curves.markdown() and curves.csv().startswith("case,organ,memory,clicks,dice"), "table and CSV"


def test_click_curves_can_start_from_fine_segmentations_and_count_missed_organs(predictor, dataset, tmp_path):
    from FINESegmentationLib.io import read_volume
    from FINESegmentationLib.refiner.evaluation import click_curves

    labels = read_volume(dataset / "labelsTr" / "phantom_000.nii.gz", kind="label")
    fine = labels.array.copy()
    fine[fine == LIVER] = 0  # FINE "missed" the liver
    write_segmentation(Volume(fine, labels.geometry), tmp_path / "phantom_000_0000.nii.gz")
    curves = click_curves(predictor, str(dataset), ["phantom_000"], clicks=1, memory_modes=(False,), progress=False, initial=tmp_path)
    assert curves.missed == [("phantom_000", "liver")], "an organ FINE missed is counted, not refined"
    assert set(curves.initial.values()) == {1.0}, "the initial masks are the given segmentations"


def test_shipped_refiner_and_memory_match_their_sha256_fit_together_and_say_demo_only():
    from FINESegmentationLib.checkpoints import read_registry, sha256_of

    refiners, memories = read_registry(kind="refiner"), read_registry(kind="refiner-memory")
    assert refiners and memories, "a demo refiner and its memory are registered"
    assert not set(refiners) & set(read_registry()), "refiners are not offered as FINE segmentation models"
    for entry in refiners.values():
        assert sha256_of(entry.path) == entry.sha256, f"{entry.name}: shipped file matches its registered SHA256"
        model, metadata, _ = load_refiner(entry.name)
        assert metadata["clinical_use"] is False and "not for clinical use" in metadata["description"], f"{entry.name} is demo-only"
        assert "phantom" in metadata["description"], f"{entry.name} says it was trained on synthetic phantoms"
        memory_entry = memories[entry.memory]
        memory = ExternalMemory.load(memory_entry.path, memory_entry.sha256)
        memory.check_compatible(model)
        assert "not for clinical use" in memory.metadata["description"] and "phantom" in memory.metadata["description"]


def test_every_voxel_of_the_box_is_clickable_and_oblique_corners_keep_the_previous_mask(predictor, case):
    from FINESegmentationLib.volume import Geometry

    segment = case.label.array == LIVER
    predictor.set_volume(case.image, segment)
    box = predictor.box
    corner = np.array([box[2].stop - 1, box[1].stop - 1, box[0].stop - 1], float)
    predictor.predict([corner], [0], point_space="ijk")  # the far corner of the box is inside the cube: no error
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    g = case.image.geometry
    oblique = Geometry(g.spacing, g.origin, (c, -s, 0, s, c, 0, 0, 0, 1))
    predictor.set_volume(Volume(case.image.array, oblique), segment)
    result = predictor.predict(np.zeros((0, 3)), [], reach_mm=None)
    outside = ~predictor._inside
    assert outside.any(), "an oblique grid's box has corners outside the cube"
    assert np.array_equal(result.mask[outside], segment[result.box][outside]), "voxels outside the cube keep the previous mask"


def test_refiner_modules_import_one_way():
    """No import circle in refiner/ (also not through imports inside functions): memory.py no longer reaches training.py."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "FINESegmentation" / "FINESegmentationLib" / "refiner"
    graph = {}
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        parts = module.split(".")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = parts[: len(parts) - node.level] if path.name != "__init__.py" else parts[: len(parts) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                targets |= {name} | {f"{name}.{a.name}" for a in node.names}
        graph[module] = targets
    graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}

    def reaches(start, goal, seen=()):
        return any(t == goal or (t not in seen and reaches(t, goal, (*seen, t))) for t in graph[start])

    circles = sorted(m for m in graph if reaches(m, m))
    assert not circles, f"modules importing themselves through others: {circles}"
