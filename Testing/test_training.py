"""Datasets, training (one process and two under torchrun), evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from FINESegmentationLib.checkpoints import load_checkpoint, read_checkpoint
from FINESegmentationLib.data.datasets import find_cases, map_labels, parse_label_map
from FINESegmentationLib.data.phantoms import write_dataset
from FINESegmentationLib.errors import InputError
from FINESegmentationLib.evaluation import Evaluation, case_metrics, markdown_table
from FINESegmentationLib.inference import _CropPredictor
from FINESegmentationLib.augmentation import STRENGTHS, training_augmentation
from FINESegmentationLib.checkpoints import Preprocessing
from FINESegmentationLib.sampling import CropSampler
from FINESegmentationLib.training import TrainSettings, train
from FINESegmentationLib.volume import Geometry, Volume

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    write_dataset(out, 2, seed=5, in_plane=64, progress=False)
    return out


def test_training_crop_positions_use_the_frame_of_inference():
    cases = [type("C", (), {"image": np.zeros((40, 100, 90), np.float32), "label": np.zeros((40, 100, 90), np.uint8)})()]
    sampler = CropSampler(cases, (32, 64, 64), -1.0, 0.0, np.random.default_rng(0))
    predictor = _CropPredictor.__new__(_CropPredictor)
    predictor.padded = torch.tensor((40.0, 100.0, 90.0))
    for _ in range(20):
        pos = sampler.sample().position
        start = (2 * pos - np.array([32, 64, 64]) + np.array([40, 100, 90])) / 2
        slices = [[slice(0, 1), slice(None)] + [slice(int(s), int(s) + c) for s, c in zip(start, (32, 64, 64))]]
        assert np.allclose(predictor.positions(slices)[0].numpy(), pos), "training and inference agree on where a crop is"


def _numbered_case(shape):
    """A case whose every voxel holds its own index (so a crop tells where it came from) and two organs."""
    ids = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:9, 4:10] = 1
    label[6:9, 14:20, 12:18] = 5
    return type("C", (), {"image": ids, "label": label})()


def test_partial_field_of_view_positions_are_those_of_sliding_window_inference_on_the_sub_volume_alone():
    from monai.inferers import sliding_window_inference

    shape, crop = (10, 24, 22), (6, 12, 12)
    case = _numbered_case(shape)
    # 10 x 12 x 12 mm voxels: 40 mm slabs are 4 slices and 120 mm fields of view 10 voxels, thinner than the crop.
    sampler = CropSampler([case], crop, -1.0, 0.5, np.random.default_rng(1), fov_probability=1.0, spacing=(12.0, 12.0, 10.0))
    padded_seen = set()
    for _ in range(12):
        c = sampler.sample()
        sub = torch.from_numpy(np.ascontiguousarray(case.image[c.region]))[None, None]
        padded = tuple(max(s, r) for s, r in zip(sub.shape[2:], crop))
        padded_seen.add(tuple(p > s for p, s in zip(padded, sub.shape[2:])))
        predictor = _CropPredictor.__new__(_CropPredictor)
        predictor.padded = torch.tensor(padded, dtype=torch.float32)
        found = []

        def record(patches, slices):
            for patch, sl in zip(patches, slices):
                if torch.equal(patch[0], torch.from_numpy(c.image)):
                    found.append(predictor.positions([sl])[0].numpy())
            return patches

        # Windows one voxel apart: inference could have put a window anywhere the training crop is.
        sliding_window_inference(sub, crop, 64, record, overlap=[(r - 1) / r for r in crop], padding_mode="constant",
                                 cval=-1.0, with_coord=True)
        assert len(found) == 1 and np.allclose(found[0], c.position), \
            "a training crop of a sub-volume has the position inference gives the same crop of a scan of that sub-volume"
    assert any(any(p) for p in padded_seen), "sub-volumes smaller than the crop (padded as MONAI pads them) are covered"


def test_log_uniform_extents_draw_thin_slabs_more_often_and_stay_within_bounds():
    shape, crop = (60, 24, 22), (6, 12, 12)
    case = _numbered_case(shape)
    # 6 mm slices: the 40 mm minimum is 7 slices; the case is 60 slices long.
    thin = {}
    for extent in ("uniform", "log"):
        sampler = CropSampler([case], crop, -1.0, 0.5, np.random.default_rng(3), fov_probability=1.0,
                              spacing=(12.0, 12.0, 6.0), fov_extent=extent)
        z = np.array([(lambda r: r.stop - r.start)(sampler.region(0)[0]) for _ in range(2000)])
        assert z.min() >= 7 and z.max() <= 60, f"{extent}: slab extents {z.min()}..{z.max()} leave 7..60"
        thin[extent] = float(np.mean(z <= 14))
    # Uniform over 7..60: 8 of 54 values are <= 14 (15%); log-uniform: log(15/7) / log(61/7) (35%).
    assert thin["uniform"] < 0.2 and thin["log"] > 0.3, thin
    with pytest.raises(ValueError):
        CropSampler([case], crop, -1.0, 0.5, np.random.default_rng(3), fov_extent="square")


def test_a_sub_volume_always_contains_its_crops_and_the_warm_up_crops_share_it():
    shape, crop = (10, 24, 22), (6, 12, 12)
    case = _numbered_case(shape)
    sampler = CropSampler([case], crop, -1.0, 0.5, np.random.default_rng(2), fov_probability=0.7, spacing=(12.0, 12.0, 10.0))
    for _ in range(200):
        first = sampler.sample()
        for c in (first, sampler.sample(first.case, first.region)):
            assert c.region == first.region, "warm-up crops come from the sample's sub-volume"
            inside = c.image[c.image >= 0].astype(int)
            coords = np.stack(np.unravel_index(inside, shape), axis=1)
            lo, hi = [r.start for r in c.region], [r.stop for r in c.region]
            assert np.all((coords >= lo) & (coords < hi)), "a crop holds only voxels of its sub-volume"
            overlap = np.prod([min(r.stop - r.start, k) for r, k in zip(c.region, crop)])
            assert inside.size == overlap, "a crop lies inside its sub-volume (or holds all of it where it is thinner)"
            assert np.array_equal(c.label[c.image >= 0], case.label.ravel()[inside]) and not c.label[c.image < 0].any(), \
                "labels follow the image; padding is background"


@pytest.mark.parametrize("strength", STRENGTHS)
def test_augmentation_gives_finite_images_in_the_window_and_labels_in_the_label_set(strength):
    pre = Preprocessing(clip=(-1000.0, 300.0), mean=50.0, std=150.0)
    rng = np.random.default_rng(0)
    image = rng.uniform(-7.0, 1.6, (16, 32, 32)).astype(np.float32)
    label = rng.integers(0, 9, (16, 32, 32)).astype(np.uint8)
    augment = training_augmentation(strength, pre)
    low, high = (np.array(pre.clip) - pre.mean) / pre.std
    changed = 0
    for seed in range(30):
        augment.set_random_state(seed=seed)
        out = augment({"image": image[None], "label": label[None]})
        x, y = np.asarray(out["image"]), np.asarray(out["label"])
        assert x.shape == (1, 16, 32, 32) and np.isfinite(x).all(), "augmented images are finite"
        assert set(np.unique(y)) <= set(range(9)), "labels stay in the label set (nearest-neighbour resampling)"
        if strength == "ct":
            assert x.min() >= low - 1e-5 and x.max() <= high + 1e-5, "ct augmentation clips back to the window, as inference does"
        changed += not np.array_equal(x[0], image)
    assert (changed == 0) == (strength == "none"), "none leaves crops alone; the others change them"
    with pytest.raises(InputError, match="Unknown augmentation"):
        training_augmentation("strong", pre)


def test_bcv_and_msd_layouts_and_label_maps(tmp_path, phantoms):
    assert [c.case_id for c in find_cases(phantoms)] == ["phantom_000", "phantom_001"], "MSD/nnU-Net layout from dataset.json"
    for sub in ("img", "label"):
        (tmp_path / "Training" / sub).mkdir(parents=True)
    (tmp_path / "Training" / "img" / "img0001.nii.gz").write_bytes(b"")
    (tmp_path / "Training" / "label" / "label0001.nii.gz").write_bytes(b"")
    assert [c.case_id for c in find_cases(tmp_path)] == ["0001"], "BCV layout (img/ + label/)"
    bcv = parse_label_map("bcv")
    assert map_labels(np.array([6, 11, 5, 13]), bcv).tolist() == [5, 8, 0, 0], "BCV liver->5, pancreas->8, others background"
    with pytest.raises(InputError):
        parse_label_map("6:x")
    with pytest.raises(InputError, match="No labelled cases"):
        find_cases(tmp_path / "Training" / "img")


def test_training_writes_a_loadable_checkpoint_and_resumes(tmp_path, phantoms):
    settings = TrainSettings(data=str(phantoms), out=str(tmp_path / "run"), epochs=1, iterations=2, device="cpu",
                             validation_cases=["phantom_001"], progress=False, bank_probability=1.0, optimizer="adamw", lr=1e-3)
    path = train(settings)
    model, info = load_checkpoint(path)
    assert info.training["cases"] == ["phantom_000"] and info.training["held_out"] == ["phantom_001"], "held-out case not trained on"
    assert info.preprocessing.std > 0 and info.preprocessing.clip[0] < info.preprocessing.clip[1], "intensity statistics from the data"
    assert int(model.trained_visits.sum()) > 0, "training counts the cells its crops visited"
    # Resumed with the command's defaults (SGD, lr 1e-2): the run goes on with its own AdamW and lr.
    train(TrainSettings(data=str(phantoms), out=str(tmp_path / "run"), epochs=2, device="cpu", progress=False,
                        resume=str(tmp_path / "run" / "checkpoint_latest.pt")))
    payload = read_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")
    assert payload["extra"]["epoch"] == 2 and payload["metadata"]["training"]["epochs_done"] == 2, "resumed from epoch 1 to 2"
    run = payload["metadata"]["training"]
    assert (run["settings"]["optimizer"], run["settings"]["lr"], run["settings"]["iterations"]) == ("adamw", 1e-3, 2), \
        "the run's own optimizer, learning rate and iterations"
    assert run["held_out"] == ["phantom_001"], "the run's validation case stays held out"


def test_train_command_takes_several_dataset_folders(tmp_path, phantoms):
    from FINESegmentationLib.cli import main
    from FINESegmentationLib.data.datasets import find_training_cases

    extra = tmp_path / "extra-set"
    write_dataset(extra, 1, seed=9, in_plane=64, progress=False)
    cases = find_training_cases([phantoms, extra])
    assert [c.case_id for c in cases] == [f"{phantoms.name}/phantom_000", f"{phantoms.name}/phantom_001", "extra-set/phantom_000"], \
        "the folders' cases in the given order, each id prefixed with its folder's name"
    assert cases[2].image.parent.parent == extra.resolve() and cases[0].image != cases[2].image, "same-named cases stay apart"
    assert [c.case_id for c in find_training_cases([phantoms])] == ["phantom_000", "phantom_001"], "one folder: ids as before"
    code = main(["train", "--data", str(phantoms), str(extra), "--out", str(tmp_path / "run"), "--epochs", "1", "--iterations", "2",
                 "--device", "cpu", "--optimizer", "adamw", "--lr", "1e-3", "--hold-out", f"{phantoms.name}/phantom_001", "-q"])
    assert code == 0
    _, info = load_checkpoint(tmp_path / "run" / "model.pt")
    assert info.training["cases"] == [f"{phantoms.name}/phantom_000", "extra-set/phantom_000"], "both folders trained on, minus the held-out case"
    assert info.training["data"] == f"{phantoms.name} + extra-set"
    twin = tmp_path / "twin" / phantoms.name
    twin.mkdir(parents=True)
    with pytest.raises(InputError, match="Two dataset folders are named"):
        find_training_cases([phantoms, twin])
    assert main(["train", "--data", str(phantoms), str(twin), "--out", str(tmp_path / "refused"), "--device", "cpu", "-q"]) != 0
    assert not (tmp_path / "refused").exists(), "a refused run writes nothing"
    assert main(["train", "--data", str(phantoms), str(extra), "--out", str(tmp_path / "refused"), "--hold-out", "phantom_001",
                 "--device", "cpu", "-q"]) != 0, "an unprefixed id names no case of several folders"
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("strength", STRENGTHS)
def test_train_command_runs_with_each_augmentation_and_partial_fields_of_view_and_records_them(tmp_path, phantoms, strength):
    from FINESegmentationLib.cli import main

    code = main(["train", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--epochs", "1", "--iterations", "2",
                 "--device", "cpu", "--optimizer", "adamw", "--lr", "1e-3", "--augment", strength, "--fov-probability", "1",
                 "--bank-probability", "1", "-q"])
    assert code == 0
    _, info = load_checkpoint(tmp_path / "run" / "model.pt")
    assert info.training["settings"]["augment"] == strength and info.training["settings"]["fov_probability"] == 1.0, \
        "the command's augmentation and field-of-view settings reach the checkpoint"
    assert TrainSettings(data="d", out="o").augment == "ct", "new runs default to the CT-wide augmentation"


def test_a_field_of_view_probability_outside_0_1_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="fov-probability"):
        train(TrainSettings(data=str(tmp_path / "nothing"), out=str(tmp_path / "run"), fov_probability=1.5, progress=False))
    assert not (tmp_path / "run").exists(), "nothing is written for a refused run"


def test_init_fine_tunes_from_a_model_with_its_normalisation_and_a_new_schedule(tmp_path, phantoms):
    first = train(TrainSettings(data=str(phantoms), out=str(tmp_path / "a"), epochs=1, iterations=2, device="cpu",
                                progress=False, optimizer="adamw", lr=1e-3))
    _, base = load_checkpoint(first)
    tuned = train(TrainSettings(data=str(phantoms), out=str(tmp_path / "b"), epochs=1, iterations=2, device="cpu", progress=False,
                                optimizer="adamw", lr=1e-4, init=str(first), target_spacing=(9.0, 9.0, 9.0), config="fine-small"))
    model, info = load_checkpoint(tuned)
    assert info.preprocessing == base.preprocessing and info.config == base.config, "the model's normalisation and config are kept"
    assert info.training["initialised_from"] == "model.pt" and info.training["initial_training"]["epochs_done"] == 1, "provenance"
    assert read_checkpoint(tmp_path / "b" / "checkpoint_latest.pt")["extra"]["epoch"] == 1, "a fresh schedule, not a resumed one"
    with pytest.raises(InputError, match="not both"):
        train(TrainSettings(data=str(phantoms), out=str(tmp_path / "c"), init=str(first), resume=str(first), progress=False))
    assert not (tmp_path / "c").exists(), "nothing is written for a refused run"


def test_unknown_optimizer_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="Unknown optimizer"):
        train(TrainSettings(data=str(tmp_path / "nothing"), out=str(tmp_path / "run"), optimizer="lion", progress=False))
    assert not (tmp_path / "run").exists(), "nothing is written for a refused run"


def test_two_process_torchrun_training_step(tmp_path, phantoms):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "FINESegmentation"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "FINESegmentationLib.cli", "train", "--data", str(phantoms), "--out", str(tmp_path / "ddp"),
           "--epochs", "1", "--iterations", "2", "--batch-size", "1", "--device", "cpu", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, info = load_checkpoint(tmp_path / "ddp" / "model.pt")
    assert info.training["processes"] == 2, "both processes took part"
    # Each process ran 2 iterations of 1 crop (plus bank warm-up crops): the counts of both are summed.
    assert int(model.trained_visits.sum()) >= 2 * 2 * 4, "visit counts of both processes are summed"


def test_case_metrics_dice_and_hd95_in_millimetres():
    ref = np.zeros((20, 40, 40), np.uint8)
    ref[5:15, 10:30, 10:30] = 5
    pred = np.zeros_like(ref)
    pred[5:15, 10:30, 12:32] = 5  # shifted by 2 voxels along x
    g = Geometry(spacing=(1.5, 1.0, 3.0))
    m = case_metrics(Volume(pred, g), Volume(ref, g))["liver"]
    assert m["dice"] == pytest.approx(0.9), "18 of 20 columns overlap"
    assert m["hd95"] == pytest.approx(3.0), "a 2-voxel shift along x is 3 mm at 1.5 mm spacing"
    perfect = Evaluation("x", {"a": case_metrics(Volume(ref, g), Volume(ref, g))})
    assert perfect.mean("dice") == 1.0 and perfect.mean("hd95") == 0.0
    assert "| Method | HD95 (mm) | DSC | Sp |" in markdown_table([perfect]), "shaped like the paper's Table 1"


def test_case_metrics_count_voxels_given_to_the_partner_organ():
    ref = np.zeros((10, 40, 40), np.uint8)
    ref[2:8, 5:15, 5:15] = 2  # right kidney
    ref[2:8, 5:15, 25:35] = 3  # left kidney
    ref[2:8, 20:30, 5:15] = 5  # liver
    pred = ref.copy()
    pred[2:8, 5:15, 25:30] = 2  # half of the left kidney called right
    g = Geometry(spacing=(1.0, 1.0, 2.0))
    m = case_metrics(Volume(pred, g), Volume(ref, g))
    assert m["left kidney"]["swapped"] == pytest.approx(0.5)
    assert m["right kidney"]["swapped"] == 0.0 and m["liver"]["swapped"] == 0.0
    assert "swapped" not in m.get("aorta", {"dice": 0}) and "spleen" not in m, "only organs in the reference, partners only"
    e = Evaluation("x", {"a": m})
    assert e.organ_mean("left kidney", "swapped") == pytest.approx(0.5)
    assert "LKi as RKi 50.00%" in e.swaps()
    assert e.mean("dice") < 1.0, "the swapped half also costs Dice"


def test_phantom_command_writes_a_dataset(tmp_path):
    from FINESegmentationLib.cli import main

    assert main(["phantom", "--out", str(tmp_path / "p"), "--cases", "1", "--in-plane", "64", "-q"]) == 0
    meta = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and (tmp_path / "p" / "labelsTr" / "phantom_000.nii.gz").exists()


def test_cli_evaluate_prints_the_table_and_writes_the_csv(tmp_path, phantoms, tiny_checkpoint, capsys):
    from FINESegmentationLib.cli import main

    csv_path = tmp_path / "metrics.csv"
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(phantoms), "--cases", "phantom_000", "--device", "cpu",
                 "--bank", "stateless", "--fast", "--largest-component", "--name", "tiny", "--csv", str(csv_path), "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "| tiny |" in out and "HD95" in out, "a Table-1-shaped row per model"
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("case") and any(r.startswith("phantom_000") for r in rows), "per-case metrics as CSV"
    assert rows[0].endswith("swapped_to_partner") and any(r.startswith("phantom_000,left kidney,") and not r.endswith(",") for r in rows)
    assert "Reference voxels labelled as the partner organ: RKi as LKi" in out
