"""Synthetic CT around real organ label maps: determinism, labels = anatomy, body and spine placement,
HU per phase, recorded geometry, the train/validation split and the command line.

The tests build a small anatomy folder in the layout of ../shared/data/anatomy-labels (LPS, identity
direction, origin 0, project label values) with ellipsoid organs, and render at a 64-pixel matrix.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FINESegmentationLib.cli import main
from FINESegmentationLib.data.datasets import find_cases
from FINESegmentationLib.data.synth import HU_RANGES, PHASES, VALIDATION_MAPS, SynthGenerator, split_maps, write_synth_dataset
from FINESegmentationLib.data.synth.anatomy import choose_validation, list_maps, map_name
from FINESegmentationLib.data.synth.canvas import Canvas
from FINESegmentationLib.data.synth.intensities import draw_hu, hu_range
from FINESegmentationLib.data.synth.scanner import resample_labels
from FINESegmentationLib.data.synth.anatomy import AnatomyMap
from FINESegmentationLib.errors import InputError
from FINESegmentationLib.io import read_volume
from FINESegmentationLib.labels import CLASS_NAMES, ORGAN_BY_NAME

SMALL = dict(in_plane=64, max_slices=40)
ALL_MAPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "anatomy-labels"
L = {name: o.label for name, o in ORGAN_BY_NAME.items()}
SPACING = (3.0, 3.0, 5.0)
SHAPE_ZYX = (48, 128, 128)
# (label, centre x, y, z mm, semi-axes mm) in LPS: x to the left, y posterior, z superior.
ORGANS = [
    ("liver", (120, 180, 190), (75, 70, 55)),
    ("stomach", (250, 140, 185), (40, 35, 45)),
    ("spleen", (285, 230, 180), (25, 40, 45)),
    ("right kidney", (140, 245, 120), (25, 22, 50)),
    ("left kidney", (255, 245, 130), (25, 22, 50)),
    ("pancreas", (205, 175, 140), (45, 12, 12)),
    ("gallbladder", (115, 120, 140), (15, 15, 25)),
]


def _anatomy(seed_shift: float = 0.0) -> np.ndarray:
    z, y, x = (np.arange(n) * s for n, s in zip(SHAPE_ZYX, SPACING[::-1]))
    z, y, x = np.meshgrid(z, y, x, indexing="ij")
    lab = np.zeros(SHAPE_ZYX, np.uint8)
    for name, c, r in ORGANS:
        inside = ((x - c[0] - seed_shift) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1
        lab[inside] = L[name]
    aorta = ((x - 200 - seed_shift) ** 2 + (y - 215) ** 2 < 10**2) & (z > 40)
    lab[aorta] = L["aorta"]
    return lab


def _write(folder, name, array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def anatomy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anatomy-labels")
    _write(folder, "label0001", _anatomy())
    _write(folder, "label0003", _anatomy(6.0))
    _write(folder, VALIDATION_MAPS[0], _anatomy(-6.0))
    return folder


@pytest.fixture(scope="module")
def cases(anatomy_dir):
    g = SynthGenerator(anatomy_dir, seed=5, **SMALL)
    return [g.generate(i) for i in range(6)]


def _anatomy_at_voxels(case, anatomy_dir):
    """Nearest-neighbour anatomy label at every output voxel (through the case's deformation)."""
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(anatomy_dir / f"{case.info['anatomy']}.nii.gz")))
    g = case.image.geometry
    nz, ny, nx = case.image.shape
    axes = [g.origin[a] + np.arange(n) * g.spacing[a] for a, n in enumerate((nx, ny, nz))]
    qx, qy, qz = case.deformation.apply(*axes)
    idx = [np.rint(q / s).astype(int) for q, s in zip((qx, qy, np.broadcast_to(qz[:, None, None], qx.shape)), SPACING)]
    inside = np.all([(i >= 0) & (i < n) for i, n in zip(idx, SHAPE_ZYX[::-1])], axis=0)
    out = np.zeros(qx.shape, np.uint8)
    out[inside] = src[idx[2][inside], idx[1][inside], idx[0][inside]]
    return out


def test_same_seed_and_index_give_identical_cases_and_other_indices_differ(anatomy_dir, cases):
    again = SynthGenerator(anatomy_dir, seed=5, **SMALL).generate(1)
    assert np.array_equal(again.image.array, cases[1].image.array), "same seed and index must give the same image"
    assert np.array_equal(again.label.array, cases[1].label.array), "same seed and index must give the same labels"
    assert again.info == cases[1].info, "same seed and index must record the same info"
    other = SynthGenerator(anatomy_dir, seed=6, **SMALL).generate(1)
    assert other.info != cases[1].info, "another seed must draw another case"


def test_organ_labels_are_the_anatomy_where_in_view(anatomy_dir, cases):
    for case in cases:
        expected = _anatomy_at_voxels(case, anatomy_dir)
        for value in range(1, 9):
            a, b = expected == value, case.label.array == value
            if a.sum() < 30:  # an organ barely in view: only its presence can be compared
                continue
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            # Smoothed interpolation and nearest sampling differ by about a voxel at the surface.
            assert dice > (0.88 if a.sum() > 500 else 0.75), f"label {value} of {case.info['anatomy']} must be the resampled anatomy, Dice {dice:.2f}"
        assert set(np.unique(case.label.array)) <= set(np.unique(expected)) | {0}, "no organ that is not in view"
        assert case.label.array.any(), "every field of view holds part of an organ"


def test_the_body_encloses_every_organ_with_a_margin(cases):
    for case in cases:
        lab, img = case.label.array, case.image.array
        # Bowel gas may touch the image edge in a tight crop: close such pockets before filling holes.
        body = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(s, iterations=2)) for s in img > -500])
        near = ndimage.binary_dilation(lab > 0, iterations=1)
        near[:, :3], near[:, -3:], near[:, :, :3], near[:, :, -3:] = False, False, False, False  # tight crops cut the body
        assert (body | ~near).all(), f"organs of case {case.info['index']} must lie inside the body, with tissue around them"


def test_the_spine_lies_behind_the_aorta(cases):
    checked = 0
    for case in cases:
        lab, img = case.label.array, case.image.array
        sx, sy, _ = case.image.geometry.spacing
        for k in np.nonzero((lab == L["aorta"]).sum(axis=(1, 2)) > 3)[0][::3]:
            j, i = np.nonzero(lab[k] == L["aorta"])
            jc, ic = int(j.mean()), int(i.mean())
            cols = slice(max(ic - int(15 / sx), 0), ic + int(15 / sx) + 1)
            # A slice may pass through a disc: look at the vertebrae within 12 mm above and below.
            dz = int(12 / case.image.geometry.spacing[2])
            slab = slice(max(k - dz, 0), k + dz + 1)
            behind = img[slab, j.max() + 1 : j.max() + 1 + int(70 / sy), cols]
            front = img[k, max(j.min() - int(70 / sy), 0) : j.min(), cols]
            if behind.shape[1] < int(40 / sy):
                continue
            assert (behind > 400).any(), f"bone must lie behind the aorta (case {case.info['index']}, slice {k})"
            # Arterial contrast (up to 450 HU) fills the vessels in front of the aorta; otherwise nothing there passes 400.
            assert case.info["hu"]["aorta"] > 350 or not (front > 400).any(), f"no bone in front of the aorta (case {case.info['index']}, slice {k})"
            checked += 1
    assert checked > 5


def test_drawn_hu_lie_in_the_published_range_of_each_phase():
    rng = np.random.default_rng(0)
    for phase in PHASES:
        for _ in range(20):
            hu = draw_hu(rng, phase)
            for tissue, value in hu.items():
                lo, hi = hu_range(tissue, phase)
                assert lo <= value <= hi, f"{tissue} in the {phase} phase: {value:.0f} HU outside {lo}-{hi}"
    assert hu_range("liver", "non-contrast") == (40, 65), "unenhanced liver 40-65 HU (Kodama, Boyce; mild steatosis included)"
    assert set(HU_RANGES) >= {"liver", "spleen", "aorta", "kidney_cortex", "pancreas", "muscle"}


def test_organ_hu_in_the_images_follow_the_phase(anatomy_dir):
    medians = {}
    for phase in PHASES:
        case = SynthGenerator(anatomy_dir, seed=11, phases=[phase], fovs=["abdomen"], in_plane=128, max_slices=24).generate(0)
        assert case.info["phase"] == phase
        for organ, tissue in (("liver", "liver"), ("aorta", "aorta")):
            inner = ndimage.binary_erosion(case.label.array == L[organ], iterations=1)
            value = float(np.median(case.image.array[inner]))
            lo, hi = hu_range(tissue, phase)
            assert lo - 15 <= value <= hi + 15, f"{organ} median {value:.0f} HU outside {lo}-{hi} in the {phase} phase"
            medians[phase, organ] = value
    assert medians["arterial", "aorta"] > medians["non-contrast", "aorta"] + 150, "the aorta must be bright in the arterial phase"
    assert medians["portal-venous", "liver"] > medians["non-contrast", "liver"] + 25, "the liver must enhance in the portal-venous phase"


def test_a_fatty_pancreas_turns_part_of_the_pancreas_to_fat_and_changes_nothing_else(anatomy_dir):
    kw = dict(seed=11, phases=["non-contrast"], fovs=["abdomen"], in_plane=128, max_slices=24)
    plain = SynthGenerator(anatomy_dir, **kw).generate(0)
    fatty = SynthGenerator(anatomy_dir, fatty_pancreas=1.0, **kw).generate(0)
    assert plain.info["pancreas_fat_fraction"] == 0.0
    assert 0.2 <= fatty.info["pancreas_fat_fraction"] <= 0.6, fatty.info["pancreas_fat_fraction"]
    assert np.array_equal(plain.label.array, fatty.label.array), "the labels do not change"
    pancreas = plain.label.array == L["pancreas"]
    near = ndimage.binary_dilation(pancreas, iterations=4)  # the scanner's blur carries the change a few voxels
    assert np.array_equal(plain.image.array[~near], fatty.image.array[~near]), "only the pancreas and its edge change"
    before, after = (float(np.mean(c.image.array[pancreas])) for c in (plain, fatty))
    assert after < before - 15, f"a fatty pancreas must be darker: mean {before:.0f} -> {after:.0f} HU"
    fat_before, fat_after = (float(np.mean(c.image.array[pancreas] < -30)) for c in (plain, fatty))
    assert fat_after > fat_before + 0.1, f"fat lobules must appear in the pancreas (voxels below -30 HU: {fat_before:.2f} -> {fat_after:.2f})"
    half = [SynthGenerator(anatomy_dir, seed=11, fatty_pancreas=0.5, **SMALL).generate(i).info["pancreas_fat_fraction"] for i in range(8)]
    assert 0 < sum(f > 0 for f in half) < 8, f"a share of 0.5 must give some fatty and some plain cases: {half}"
    with pytest.raises(InputError, match="from 0 to 1"):
        SynthGenerator(anatomy_dir, fatty_pancreas=1.5)


def test_info_records_the_written_geometry_and_respects_the_caps(cases):
    for case in cases:
        info, g = case.info, case.image.geometry
        assert info["shape"] == list(case.image.shape[::-1]), "shape is (x, y, z) of the array"
        assert np.allclose(info["spacing"], g.spacing, atol=1e-3), "spacing is the image's"
        assert np.allclose(np.array(info["shape"]) * g.spacing, info["field_of_view_mm"], rtol=0.06), "field of view = shape x spacing"
        assert info["shape"][0] <= SMALL["in_plane"] and info["shape"][2] <= SMALL["max_slices"], "the caps hold"
        assert info["capped"] == (not np.allclose(info["spacing"], info["native_spacing"])), "capped says when spacing was coarsened"
        assert info["phase"] in PHASES and info["fov"] in ("slab", "abdomen", "chest-pelvis", "cta")
        for key in ("anatomy", "noise_hu", "kernel", "offcentre"):
            assert key in info


def test_labels_going_to_thin_slices_change_smoothly_not_in_steps():
    z, y, x = np.meshgrid(np.arange(20) * 5.0, np.arange(40) * 2.0, np.arange(40) * 2.0, indexing="ij")
    ball = (((x - 40) ** 2 + (y - 40) ** 2) / 30**2 + (z - 50) ** 2 / 40**2 < 1).astype(np.uint8) * L["liver"]
    anatomy = AnatomyMap("ball", ball, (2.0, 2.0, 5.0), (0.0, 0.0, 0.0))
    zs = np.arange(10.0, 90.0, 1.0).astype(np.float32)
    xs = np.arange(0.0, 80.0, 2.0).astype(np.float32)
    qx = np.broadcast_to(xs[None, None, :], (len(zs), 40, 40)).copy()
    qy = np.broadcast_to(xs[None, :, None], (len(zs), 40, 40)).copy()
    canvas = Canvas(qx, qy, zs, np.zeros(qx.shape, np.uint8), (2.0, 2.0, 1.0))
    area = (resample_labels(anatomy, canvas, (2.0, 2.0, 1.0)) > 0).sum(axis=(1, 2))
    steps = np.count_nonzero(np.diff(area[area > 0]))
    nearest = (ball[np.clip(np.rint(zs / 5.0).astype(int), 0, 19)] > 0).sum(axis=(1, 2))
    staircase = np.count_nonzero(np.diff(nearest[nearest > 0]))  # at most once per 5 mm source slice
    assert steps > 1.5 * staircase, f"organ areas must change between 1 mm slices ({steps} changes), not in 5 mm steps ({staircase})"


def test_validation_maps_never_appear_in_the_train_split(anatomy_dir):
    train = [map_name(p) for p in split_maps(anatomy_dir, "train")]
    val = [map_name(p) for p in split_maps(anatomy_dir, "val")]
    assert not set(train) & set(VALIDATION_MAPS), "a validation map is in the train split"
    assert set(val) <= set(VALIDATION_MAPS) and val, "the val split holds only validation maps"
    g = SynthGenerator(anatomy_dir, seed=0, **SMALL)
    assert all(map_name(g.map_for(i)) not in VALIDATION_MAPS for i in range(10)), "train cases use train maps only"


def test_validation_list_is_the_seeded_choice_of_whole_scan_groups():
    folder = ALL_MAPS
    if not folder.is_dir():
        pytest.skip("../shared/data/anatomy-labels is not here")
    grids = {}
    reader = sitk.ImageFileReader()
    for path in list_maps(folder):
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        grids[map_name(path)] = (round(reader.GetSpacing()[0], 3), round(reader.GetSpacing()[2], 3), reader.GetSize()[2])
    assert tuple(choose_validation(grids)) == VALIDATION_MAPS, "VALIDATION_MAPS must be what choose_validation picks"
    groups = {}
    for name, grid in grids.items():
        groups.setdefault(grid, set()).add(name)
    for members in groups.values():
        assert members <= set(VALIDATION_MAPS) or not members & set(VALIDATION_MAPS), "a scan group is split across train and val"


def test_cli_writes_a_dataset_that_the_dataset_reader_reads(anatomy_dir, tmp_path):
    out = tmp_path / "synth"
    rc = main(["synth", "--anatomy", str(anatomy_dir), "--out", str(out), "--cases", "2", "--seed", "1",
               "--split", "val", "--in-plane", "48", "--max-slices", "24", "-q"])
    assert rc == 0
    found = find_cases(out)
    info = json.loads((out / "synth_info.json").read_text())
    assert [c.case_id for c in found] == sorted(info), "dataset.json and synth_info.json list the same cases"
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels == {name: i for i, name in enumerate(CLASS_NAMES)}, "dataset.json names the project's labels"
    for c in found:
        image, label = read_volume(c.image), read_volume(c.label, kind="label")
        assert image.shape == label.shape
        assert info[c.case_id]["anatomy"] in VALIDATION_MAPS
        assert list(image.shape[::-1]) == info[c.case_id]["shape"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--anatomy", "{missing}"], "does not exist"),
        (["--anatomy", "{empty}"], "holds no label maps"),
        (["--cases", "0"], "number of cases"),
        (["--fatty-pancreas", "2"], "from 0 to 1"),
    ],
)
def test_cli_errors_are_one_sentence_and_write_nothing(anatomy_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "nope", empty=tmp_path / "empty") for a in args]
    if "--anatomy" not in args:
        args += ["--anatomy", str(anatomy_dir)]
    out = tmp_path / "out"
    rc = main(["synth", "--out", str(out), "-q"] + args)
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err, f"one clear error expected, got: {err}"
    assert not out.exists(), "nothing is written when the input is wrong"


def test_an_output_path_that_is_a_file_is_refused(anatomy_dir, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(InputError, match="existing file"):
        write_synth_dataset(target, 1, anatomy_dir=anatomy_dir, **SMALL)
