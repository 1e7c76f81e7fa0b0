"""Synthetic abdominal CT phantoms: determinism, anatomy, global-context cues and the data set writer.

Cases are rendered at a small matrix (96 x 96) over the same physical field of
view as the 512 x 512 default, so physical quantities (mL, mm) are comparable.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FINESegmentationLib.data.phantoms import PhantomGenerator, write_dataset
from FINESegmentationLib.errors import InputError
from FINESegmentationLib.labels import CLASS_NAMES, ORGAN_BY_NAME

SMALL = 96
N_CASES = 6
LABEL = {o.name: o.label for o in ORGAN_BY_NAME.values()}
# Plausible adult volumes (mL); BCV organs fall in these ranges.
VOLUME_ML = {
    "spleen": (80, 500),
    "right kidney": (80, 300),
    "left kidney": (80, 300),
    "gallbladder": (10, 100),
    "liver": (800, 2500),
    "stomach": (100, 1200),
    "aorta": (20, 300),
    "pancreas": (30, 150),
}


@pytest.fixture(scope="module")
def cases():
    generator = PhantomGenerator(seed=0, in_plane=SMALL)
    return [generator.generate(i) for i in range(N_CASES)]


def _volumes_ml(case):
    sx, sy, sz = case.label.geometry.spacing
    counts = np.bincount(case.label.array.ravel(), minlength=len(CLASS_NAMES))
    return {name: counts[label] * sx * sy * sz / 1000.0 for name, label in LABEL.items()}


def _centroid_lps(case, mask):
    """Physical LPS centroid (x, y, z) of a boolean mask."""
    k, j, i = np.nonzero(mask)
    ijk = np.array([i.mean(), j.mean(), k.mean(), 1.0])
    return (case.label.geometry.ijk_to_lps() @ ijk)[:3]


def _interior_mean(case, label):
    """Mean HU one voxel inside the organ surface (partial-volume edges excluded)."""
    inner = ndimage.binary_erosion(case.label.array == label)
    return float(case.image.array[inner].mean())


def test_same_seed_and_index_give_identical_arrays_and_others_differ(cases):
    again = PhantomGenerator(seed=0, in_plane=SMALL).generate(0)
    other_seed = PhantomGenerator(seed=1, in_plane=SMALL).generate(0)
    first = cases[0]
    same = np.array_equal(again.image.array, first.image.array) and np.array_equal(again.label.array, first.label.array)
    differs = other_seed.image.shape != first.image.shape or not np.array_equal(other_seed.label.array, first.label.array)
    assert same and differs and again.info == first.info, "seed and case index must fully determine a phantom"


def test_arrays_are_float32_hu_and_uint8_labels_on_one_lps_grid(cases):
    for case in cases:
        g = case.image.geometry
        image, label = case.image.array, case.label.array
        ok = (
            image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
            and g.allclose(case.label.geometry) and np.allclose(g.direction_matrix, np.eye(3))
            and set(np.unique(label)) <= set(range(len(CLASS_NAMES)))
            and image[:, :3, :3].mean() < -900  # air in the corner, outside the body
            and 0.6 * 512 <= g.spacing[0] * SMALL <= 0.9 * 512 and 2.5 <= g.spacing[2] <= 5.0
            and 80 <= image.shape[0] <= 200
            and abs(g.origin[0] + g.spacing[0] * (SMALL - 1) / 2) < 1e-3  # image centred on the isocentre
        )
        assert ok, f"{case.info['case']}: image/label must be float32 HU and uint8 labels on a BCV-like LPS grid"


def test_every_organ_is_present_with_a_plausible_volume(cases):
    bad = {}
    for case in cases:
        for name, ml in _volumes_ml(case).items():
            lo, hi = VOLUME_ML[name]
            if not lo <= ml <= hi:
                bad[f"{case.info['case']} {name}"] = round(ml, 1)
    assert not bad, f"organ volumes (mL) outside adult ranges: {bad}"


def test_organ_volumes_are_physical_and_do_not_depend_on_matrix_size(cases):
    finer = PhantomGenerator(seed=0, in_plane=160).generate(1)
    coarse, fine = _volumes_ml(cases[1]), _volumes_ml(finer)
    organs = ("liver", "spleen", "right kidney", "left kidney", "stomach")
    ratios = {name: round(coarse[name] / fine[name], 3) for name in organs}
    assert all(0.9 < r < 1.1 for r in ratios.values()), f"the same case at 96 and 160 pixels must keep organ volumes: {ratios}"


def test_liver_lies_on_the_patients_right_of_the_spine_and_spleen_on_the_left(cases):
    for case in cases:
        x_liver = _centroid_lps(case, case.label.array == LABEL["liver"])[0]
        x_spleen = _centroid_lps(case, case.label.array == LABEL["spleen"])[0]
        x_spine = _centroid_lps(case, case.image.array > 450)[0]  # cortical bone: spine and symmetric ribs
        assert x_liver < x_spine < x_spleen, f"{case.info['case']}: LPS x must order liver < spine < spleen"


def test_kidneys_differ_only_by_side_not_by_intensity(cases):
    for case in cases:
        right = _centroid_lps(case, case.label.array == LABEL["right kidney"])[0]
        left = _centroid_lps(case, case.label.array == LABEL["left kidney"])[0]
        gap = abs(_interior_mean(case, LABEL["right kidney"]) - _interior_mean(case, LABEL["left kidney"]))
        assert right < left and gap < 8.0, (
            f"{case.info['case']}: the right kidney must lie at lower LPS x with the left one's HU (gap {gap:.1f})"
        )


def test_liver_and_spleen_have_similar_intensity(cases):
    gaps = [abs(_interior_mean(c, LABEL["liver"]) - _interior_mean(c, LABEL["spleen"])) for c in cases]
    assert max(gaps) < 25.0, f"liver and spleen mean HU must differ by < 25 HU, got {np.round(gaps, 1)}"


def test_intensities_follow_portal_venous_ct(cases):
    case = cases[0]
    means = {name: _interior_mean(case, label) for name, label in LABEL.items() if name != "stomach"}
    ok = (
        95 <= means["liver"] <= 135 and 140 <= means["aorta"] <= 260 and -10 <= means["gallbladder"] <= 30
        and 75 <= means["pancreas"] <= 115 and means["right kidney"] > means["liver"]
        and float(np.percentile(case.image.array, 99.9)) > 300  # bone
    )
    assert ok, f"organ HU must match portal venous phase CT, got { {k: round(v) for k, v in means.items()} }"


def test_field_of_view_varies_in_z_and_some_cases_are_off_centre(cases):
    liver_top_below_scan_top = []
    for case in cases:
        rows = np.nonzero((case.label.array == LABEL["liver"]).any(axis=(1, 2)))[0]
        liver_top_below_scan_top.append((case.label.shape[0] - 1 - rows.max()) * case.label.geometry.spacing[2])
    off = [c for c in cases if c.info["off_centre"]]
    # The bone centroid (spine + symmetric ribs) marks the body midline in x.
    consistent = all(abs(_centroid_lps(c, c.image.array > 450)[0] - c.info["centre_offset_mm"][0]) < 15 for c in cases)
    spread = max(liver_top_below_scan_top) - min(liver_top_below_scan_top)
    assert spread > 30 and off and len(off) < len(cases) and consistent, (
        f"cases must vary in z coverage (liver top spread {spread:.0f} mm) "
        f"and in-plane centring ({len(off)} off-centre)"
    )


def test_write_dataset_writes_nnunet_layout_that_reads_back_exactly(tmp_path):
    out = tmp_path / "phantoms"
    written = write_dataset(out, cases=2, seed=3, in_plane=48, progress=False)
    manifest = json.loads((out / "dataset.json").read_text())
    expected = PhantomGenerator(seed=3, in_plane=48).generate(1)
    image = sitk.ReadImage(str(out / "imagesTr" / "phantom_001_0000.nii.gz"))
    label = sitk.ReadImage(str(out / "labelsTr" / "phantom_001.nii.gz"))
    ok = (
        [p.name for p in written] == ["phantom_000_0000.nii.gz", "phantom_001_0000.nii.gz"]
        and manifest["numTraining"] == 2 and manifest["file_ending"] == ".nii.gz"
        and manifest["channel_names"] == {"0": "CT"} and manifest["modality"] == {"0": "CT"}
        and manifest["labels"] == {name: i for i, name in enumerate(CLASS_NAMES)}
        and manifest["training"][1]
        == {"image": "./imagesTr/phantom_001_0000.nii.gz", "label": "./labelsTr/phantom_001.nii.gz"}
        and set(manifest["phantom_info"]) == {"phantom_000", "phantom_001"}
        and "synthetic" in manifest["description"].lower()
        and np.array_equal(sitk.GetArrayFromImage(image), expected.image.array)
        and np.array_equal(sitk.GetArrayFromImage(label), expected.label.array)
        and np.allclose(image.GetSpacing(), expected.image.geometry.spacing)
        and np.allclose(label.GetOrigin(), expected.label.geometry.origin)
        and not [p for p in out.rglob(".*")]  # no temporary files left
    )
    assert ok, "write_dataset must write imagesTr/labelsTr/dataset.json that read back to the generated arrays"


def test_write_dataset_grows_an_existing_dataset(tmp_path):
    write_dataset(tmp_path, cases=1, seed=0, in_plane=32, progress=False)
    write_dataset(tmp_path, cases=1, seed=0, in_plane=32, first_index=1, progress=False)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    grown = manifest["numTraining"] == 2 and len(manifest["training"]) == 2
    assert grown, "a second run with first_index must add its case to dataset.json"


def test_interrupted_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    def write_then_fail(image, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, cases=1, in_plane=32, progress=False)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], f"an interrupted write must leave no files behind, found {leftovers}"


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: write_dataset(tmp / "d", cases=0, progress=False),
        lambda tmp: write_dataset(tmp / "d", cases=1, in_plane=16, progress=False),
        lambda tmp: write_dataset(tmp / "file.txt", cases=1, progress=False),
        lambda tmp: PhantomGenerator(seed=-1),
        lambda tmp: PhantomGenerator(in_plane=31),
        lambda tmp: PhantomGenerator(slice_range=(50, 10)),
        lambda tmp: PhantomGenerator(slices=2),
        lambda tmp: PhantomGenerator().generate(-1),
    ],
    ids=[
        "no-cases", "tiny-matrix", "out-dir-is-file", "negative-seed",
        "in-plane-31", "inverted-slice-range", "two-slices", "negative-index",
    ],
)
def test_bad_arguments_raise_input_error_with_one_sentence(tmp_path, call):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(InputError) as err:
        call(tmp_path)
    message = str(err.value)
    assert message.endswith(".") and message.count(". ") == 0, f"InputError must be one clear sentence, got {message!r}"
