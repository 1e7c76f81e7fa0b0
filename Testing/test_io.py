"""Tests of FINESegmentationLib.io: formats, geometry, Slicer segmentations, errors and atomic writes."""
from __future__ import annotations

import logging
import os
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from FINESegmentationLib import io
from FINESegmentationLib.errors import InputError
from FINESegmentationLib.labels import ORGAN_BY_NAME, ORGANS
from FINESegmentationLib.volume import Geometry, Volume

# An oblique rotation built from two 3-4-5 rotations: its entries are short decimals,
# so DICOM's 16-character decimal strings hold them exactly.
_ROTATE_Z = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
_ROTATE_X = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]])
OBLIQUE = Geometry(
    spacing=(0.75, 0.8, 2.5),
    origin=(-120.5, 33.25, -300.0),
    direction=tuple((_ROTATE_Z @ _ROTATE_X).ravel()),
)
SHAPE = (6, 7, 8)  # [z, y, x]; all different so that a swapped axis cannot pass


def _ct_volume(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(0.0, 300.0, SHAPE).astype(np.float32), OBLIQUE)


def _label_volume() -> Volume:
    """Spleen, both kidneys and liver present; the other organs absent."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = ORGAN_BY_NAME["spleen"].label
    labels[3:5, 1:3, 4:6] = ORGAN_BY_NAME["right kidney"].label
    labels[3:5, 4:6, 4:6] = ORGAN_BY_NAME["left kidney"].label
    labels[0, 5:, 6:] = ORGAN_BY_NAME["liver"].label
    return Volume(labels, OBLIQUE)


def _assert_one_sentence(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    one_sentence = "\n" not in message and message.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", message[:-1])
    assert one_sentence, f"an InputError must carry one sentence on one line, got: {message!r}"


def _folder_listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- reading and round trips


@pytest.mark.parametrize(
    ("extension", "atol"),
    # NIfTI stores geometry in float32; NRRD and MetaImage in full double precision.
    [(".nii.gz", 1e-4), (".nii", 1e-4), (".nrrd", 1e-12), (".mha", 1e-12)],
)
def test_round_trip_keeps_array_and_oblique_geometry(tmp_path, extension, atol):
    volume = _ct_volume()
    path = io.write_volume(volume, tmp_path / f"ct{extension}")
    read = io.read_volume(path)
    kept = (
        read.array.dtype == np.float32
        and np.array_equal(read.array, volume.array)
        and read.geometry.allclose(volume.geometry, atol=atol)
    )
    assert kept, f"{extension} round trip changed the array or geometry: {read.geometry} != {volume.geometry}"


def test_label_kind_returns_the_files_integer_array_unchanged(tmp_path):
    labels = Volume(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 300 - 20, OBLIQUE)
    path = io.write_volume(labels, tmp_path / "labels.nrrd")
    read = io.read_volume(path, kind="label")
    assert read.array.dtype == np.int16 and np.array_equal(read.array, labels.array), (
        f"kind='label' must return the stored int16 values unchanged, got {read.array.dtype}"
    )


def test_real_slicer_ct_reads_as_3d_with_simpleitk_geometry():
    path = slicerio.get_testdata_file("CTChest4.nrrd")
    reference = sitk.ReadImage(path)
    volume = io.read_volume(path)
    expected = Geometry(reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())
    same = (
        volume.shape == reference.GetSize()[::-1]
        and volume.geometry == expected
        and np.array_equal(volume.array, sitk.GetArrayFromImage(reference).astype(np.float32))
    )
    assert same, f"CTChest4.nrrd read as {volume.shape} {volume.geometry}; SimpleITK: {reference.GetSize()} {expected}"


def _write_dicom_series(folder, volume: Volume, series_uid: str) -> None:
    """Write ``volume`` as one CT DICOM file per slice, tagging orientation and position as scanners do."""
    image = sitk.Cast(io.volume_to_sitk(volume), sitk.sitkInt16)
    direction = volume.geometry.direction_matrix
    row_and_column_cosines = (*direction[:, 0], *direction[:, 1])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_image = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0037": "\\".join(f"{c:.6f}" for c in row_and_column_cosines),
            "0020|0032": "\\".join(f"{c:.6f}" for c in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": f"{volume.geometry.spacing[2]:.6f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}-{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder_keeps_values_and_oblique_geometry(tmp_path):
    volume = Volume(np.round(_ct_volume().array), OBLIQUE)
    _write_dicom_series(tmp_path, volume, "1.2.826.0.1.3680043.2.1125.2")
    read = io.read_volume(tmp_path)
    kept = np.array_equal(read.array, volume.array) and read.geometry.allclose(volume.geometry, atol=1e-4)
    assert kept, f"DICOM series read changed values or geometry: {read.geometry} != {volume.geometry}"


def test_dicom_folder_with_two_series_reads_the_larger_and_warns_naming_it(tmp_path, caplog):
    volume = Volume(np.round(_ct_volume().array), OBLIQUE)
    small = Volume(volume.array[:3].copy(), OBLIQUE)
    _write_dicom_series(tmp_path, volume, "1.2.826.0.1.3680043.2.1125.3")
    _write_dicom_series(tmp_path, small, "1.2.826.0.1.3680043.2.1125.4")
    with caplog.at_level(logging.WARNING, logger=io.logger.name):
        read = io.read_volume(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    warned = any("1.2.826.0.1.3680043.2.1125.3" in message for message in warnings)
    assert read.shape == SHAPE and warned, f"expected the 6-slice series and a warning naming it: {warnings}"


# --------------------------------------------------------------------------- bad input


def _write_image(path, array: np.ndarray, is_vector: bool = False):
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path))
    return path


def test_missing_file_raises_one_sentence_input_error(tmp_path):
    with pytest.raises(InputError) as error:
        io.read_volume(tmp_path / "absent.nii.gz")
    _assert_one_sentence(error)


def test_corrupt_file_raises_one_sentence_input_error(tmp_path):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(InputError) as error:
        io.read_volume(path)
    _assert_one_sentence(error)


def test_truncated_file_raises_one_sentence_input_error(tmp_path):
    path = io.write_volume(_ct_volume(), tmp_path / "truncated.nrrd")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(InputError) as error:
        io.read_volume(path)
    _assert_one_sentence(error)


def test_2d_image_raises_input_error_saying_fine_needs_3d(tmp_path):
    path = _write_image(tmp_path / "slice.nrrd", np.zeros((16, 16), np.float32))
    with pytest.raises(InputError, match="is a 2-D image; FINE needs a 3-D CT volume") as error:
        io.read_volume(path)
    _assert_one_sentence(error)


def test_single_slice_3d_image_raises_input_error(tmp_path):
    path = _write_image(tmp_path / "one-slice.mha", np.zeros((1, 16, 16), np.float32))
    with pytest.raises(InputError, match="single slice") as error:
        io.read_volume(path)
    _assert_one_sentence(error)


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_4d_image_raises_input_error(tmp_path, extension):
    path = _write_image(tmp_path / f"series{extension}", np.zeros((3, 4, 5, 6), np.float32))
    with pytest.raises(InputError, match="4-D image") as error:
        io.read_volume(path)
    _assert_one_sentence(error)


def test_vector_image_raises_input_error(tmp_path):
    path = _write_image(tmp_path / "rgb.mha", np.zeros((4, 5, 6, 3), np.uint8), is_vector=True)
    with pytest.raises(InputError, match="multi-component") as error:
        io.read_volume(path)
    _assert_one_sentence(error)


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_image_raises_input_error(tmp_path, bad_value, extension):
    array = _ct_volume().array
    array[2, 3, 4] = bad_value
    path = _write_image(tmp_path / f"nan{extension}", array)
    with pytest.raises(InputError, match="NaN or infinite") as error:
        io.read_volume(path)
    _assert_one_sentence(error)


def test_dicom_export_in_nested_folders_reads_the_largest_series_below(tmp_path, caplog):
    # An export's patient / study / series folders: the CT is two levels down, beside a three-slice scout.
    volume = Volume(np.round(_ct_volume().array), OBLIQUE)
    ct_folder = tmp_path / "PATIENT" / "STUDY" / "SERIES2"
    scout_folder = tmp_path / "PATIENT" / "STUDY" / "SERIES1"
    ct_folder.mkdir(parents=True)
    scout_folder.mkdir(parents=True)
    _write_dicom_series(ct_folder, volume, "1.2.826.0.1.3680043.2.1125.5")
    _write_dicom_series(scout_folder, Volume(volume.array[:3].copy(), OBLIQUE), "1.2.826.0.1.3680043.2.1125.6")
    with caplog.at_level(logging.WARNING, logger=io.logger.name):
        read = io.read_volume(tmp_path)
    kept = np.array_equal(read.array, volume.array) and read.geometry.allclose(volume.geometry, atol=1e-4)
    assert kept, f"nested DICOM export read as {read.shape}, not the {volume.shape} series"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SERIES2" in m and "1.2.826.0.1.3680043.2.1125.5" in m for m in warnings), warnings


def test_cli_takes_a_nested_dicom_export_as_one_case(tmp_path):
    from FINESegmentationLib.cli import _expand_inputs

    volume = Volume(np.round(_ct_volume().array), OBLIQUE)
    series = tmp_path / "export" / "PATIENT" / "SERIES"
    series.mkdir(parents=True)
    _write_dicom_series(series, volume, "1.2.826.0.1.3680043.2.1125.7")
    assert _expand_inputs([str(tmp_path / "export")]) == [tmp_path / "export"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match="neither a DICOM series"):
        _expand_inputs([str(tmp_path / "empty")])


def test_folder_without_dicom_raises_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError) as error:
        io.read_volume(tmp_path)
    _assert_one_sentence(error)


# --------------------------------------------------------------------------- Slicer segmentations


def test_seg_nrrd_round_trip_keeps_voxels_geometry_names_colours_and_snomed_codes(tmp_path):
    labels = _label_volume()
    path = io.write_segmentation(labels, tmp_path / "organs.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    kidneys = {s["name"]: s["terminology"].get("typeModifier", [])[:2] for s in segments if "kidney" in s["name"]}
    kept = (
        np.array_equal(segmentation["voxels"], labels.array.transpose(2, 1, 0))
        and np.array_equal(segmentation["ijkToLPS"], labels.geometry.ijk_to_lps())
        and [s["name"] for s in segments] == [o.name for o in ORGANS]
        and [s["labelValue"] for s in segments] == [o.label for o in ORGANS]
        and [tuple(s["color"]) for s in segments] == [o.color_float for o in ORGANS]
        and [s["terminology"] for s in segments] == [io.organ_terminology(o) for o in ORGANS]
        and [s["terminology"]["type"][1] for s in segments] == [o.snomed_code for o in ORGANS]
        and kidneys == {"right kidney": ["SCT", "24028007"], "left kidney": ["SCT", "7771000"]}
    )
    assert kept, f"slicerio read back different voxels, geometry or segment metadata: {segments}"


def test_seg_nrrd_header_holds_slicer_terminology_entry_tags(tmp_path):
    path = io.write_segmentation(_label_volume(), tmp_path / "organs.seg.nrrd")
    header = path.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
    tags = dict(re.findall(r"^Segment(\d+)_Tags:=(.*)$", header, flags=re.MULTILINE))
    expected = {str(i): f"TerminologyEntry:{io.terminology_entry(o)}|" for i, o in enumerate(ORGANS)}
    spleen_tag = tags.get("0", "")
    ok = tags == expected and "TerminologyEntry:" in spleen_tag and "SCT^78961009^Spleen" in spleen_tag
    assert ok, f"Segment{{i}}_Tags must carry Slicer TerminologyEntry strings with SNOMED codes, got {tags}"


def test_seg_nrrd_lists_every_organ_even_when_absent(tmp_path):
    empty = Volume(np.zeros(SHAPE, np.uint8), OBLIQUE)
    segmentation = slicerio.read_segmentation(str(io.write_segmentation(empty, tmp_path / "empty.seg.nrrd")))
    names = slicerio.segment_names(segmentation)
    assert names == [o.name for o in ORGANS], f"every organ must have a segment, got {names}"


@pytest.mark.parametrize("extension", [".seg.nrrd", ".nii.gz", ".nrrd", ".mha"])
def test_read_segmentation_returns_written_uint8_labels_and_geometry(tmp_path, extension):
    labels = _label_volume()
    read = io.read_segmentation(io.write_segmentation(labels, tmp_path / f"organs{extension}"))
    atol = 1e-4 if extension == ".nii.gz" else 1e-12
    kept = (
        read.array.dtype == np.uint8
        and np.array_equal(read.array, labels.array)
        and read.geometry.allclose(labels.geometry, atol=atol)
    )
    assert kept, f"{extension} label round trip changed labels or geometry: {read.geometry}"


def _slicerio_file(path, labels: Volume, segments: list[dict]):
    segmentation = {
        "voxels": labels.array.transpose(2, 1, 0),
        "ijkToLPS": labels.geometry.ijk_to_lps(),
        "segments": segments,
    }
    slicerio.write_segmentation(str(path), segmentation)
    return path


def test_read_segmentation_maps_segments_by_terminology_then_by_name(tmp_path):
    labels = Volume(np.zeros(SHAPE, np.uint8), OBLIQUE)
    labels.array[0, :2, :2] = 1
    labels.array[1, :2, :2] = 2
    labels.array[2, :2, :2] = 3
    kidney = io.organ_terminology(ORGAN_BY_NAME["right kidney"])
    path = _slicerio_file(tmp_path / "other.seg.nrrd", labels, [
        {"id": "a", "name": "kidney_right", "labelValue": 1, "terminology": kidney},
        {"id": "b", "name": "Liver", "labelValue": 2},
        {"id": "c", "name": "PANCREAS", "labelValue": 3},
    ])
    read = io.read_segmentation(path)
    expected = {z: ORGAN_BY_NAME[name].label for z, name in enumerate(["right kidney", "liver", "pancreas"])}
    got = {z: int(read.array[z, 0, 0]) for z in expected}
    assert got == expected, f"segments must map to organ labels by terminology, else by name; got {got}"


def test_read_segmentation_names_unknown_segments_in_input_error(tmp_path):
    labels = Volume(np.ones(SHAPE, np.uint8), OBLIQUE)
    path = _slicerio_file(tmp_path / "tumour.seg.nrrd", labels, [{"id": "t", "name": "tumour", "labelValue": 1}])
    with pytest.raises(InputError, match="'tumour'") as error:
        io.read_segmentation(path)
    _assert_one_sentence(error)


def test_write_segmentation_refuses_values_that_are_not_organs(tmp_path):
    labels = _label_volume()
    labels.array[0, 0, 0] = 42
    with pytest.raises(InputError, match="42") as error:
        io.write_segmentation(labels, tmp_path / "bad.seg.nrrd")
    _assert_one_sentence(error)
    assert _folder_listing(tmp_path) == [], "a refused label map must not leave a file"


# --------------------------------------------------------------------------- probabilities


def test_probabilities_nifti_has_one_time_point_per_class_on_the_3d_grid(tmp_path):
    probabilities = np.random.default_rng(2).random((len(ORGANS) + 1, *SHAPE)).astype(np.float32)
    path = io.write_probabilities(probabilities, OBLIQUE, tmp_path / "probabilities.nii.gz")
    image = sitk.ReadImage(str(path))
    spatial = Geometry(image.GetSpacing()[:3], image.GetOrigin()[:3], np.reshape(image.GetDirection(), (4, 4))[:3, :3])
    kept = (
        nib.load(path).shape == (*SHAPE[::-1], len(ORGANS) + 1)
        and np.array_equal(sitk.GetArrayFromImage(image), probabilities)
        and spatial.allclose(OBLIQUE, atol=1e-4)
    )
    assert kept, f"4-D NIfTI must be (x, y, z, C) on the 3-D grid, got {nib.load(path).shape} {spatial}"


def test_probabilities_nrrd_has_one_component_per_class_with_exact_geometry(tmp_path):
    probabilities = np.random.default_rng(3).random((3, *SHAPE)).astype(np.float32)
    image = sitk.ReadImage(str(io.write_probabilities(probabilities, OBLIQUE, tmp_path / "probabilities.nrrd")))
    geometry = Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    kept = (
        image.GetNumberOfComponentsPerPixel() == 3
        and np.array_equal(np.moveaxis(sitk.GetArrayFromImage(image), -1, 0), probabilities)
        and geometry.allclose(OBLIQUE, atol=1e-12)
    )
    assert kept, f"NRRD probabilities must hold one component per class on the 3-D grid, got {geometry}"


# --------------------------------------------------------------------------- atomic writes


def _failing_midway(*args, **kwargs):
    """A writer that leaves half a file behind and then fails, as a full disk would."""
    target = next(str(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, os.PathLike)))
    with open(target, "wb") as partial:
        partial.write(b"half a file")
    raise RuntimeError("simulated failure while writing")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd"])
def test_failed_image_write_leaves_no_file_and_keeps_existing_output(tmp_path, monkeypatch, name):
    existing = tmp_path / "existing" / name
    existing.parent.mkdir()
    existing.write_bytes(b"previous result")
    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    monkeypatch.setattr(sitk, "WriteImage", _failing_midway)
    for target in (existing, fresh_folder / name):
        with pytest.raises(InputError) as error:
            io.write_volume(_ct_volume(), target)
        _assert_one_sentence(error)
    clean = (
        _folder_listing(existing.parent) == [name]
        and existing.read_bytes() == b"previous result"
        and _folder_listing(fresh_folder) == []
    )
    assert clean, f"a failed write left files: {_folder_listing(existing.parent)}, {_folder_listing(fresh_folder)}"


def test_failed_seg_nrrd_write_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(slicerio, "write_segmentation", lambda path, *a, **k: _failing_midway(path))
    with pytest.raises(InputError):
        io.write_segmentation(_label_volume(), tmp_path / "organs.seg.nrrd")
    assert _folder_listing(tmp_path) == [], f"a failed .seg.nrrd write left {_folder_listing(tmp_path)}"


def test_interrupted_write_removes_temporary_file_and_reraises(tmp_path, monkeypatch):
    def interrupted(image, target, *args, **kwargs):
        open(target, "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.write_volume(_ct_volume(), tmp_path / "ct.nii.gz")
    assert _folder_listing(tmp_path) == [], f"a cancelled write left {_folder_listing(tmp_path)}"


def test_failed_rename_raises_input_error_and_leaves_no_file(tmp_path, monkeypatch):
    def denied(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(InputError, match="permission denied") as error:
        io.write_volume(_ct_volume(), tmp_path / "ct.mha")
    _assert_one_sentence(error)
    assert _folder_listing(tmp_path) == [], f"a failed rename left {_folder_listing(tmp_path)}"


def test_successful_write_leaves_only_the_target(tmp_path):
    io.write_segmentation(_label_volume(), tmp_path / "organs.seg.nrrd")
    io.write_volume(_ct_volume(), tmp_path / "ct.nii.gz")
    listing = _folder_listing(tmp_path)
    assert listing == ["ct.nii.gz", "organs.seg.nrrd"], f"writers must leave only their targets, got {listing}"


def test_read_only_folder_raises_input_error_and_stays_empty(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        # Root ignores permission bits; report the folder as other users' access(2) would.
        real_access = os.access

        def access_as_other_user(candidate, mode):
            return False if os.fspath(candidate) == os.fspath(folder) else real_access(candidate, mode)

        monkeypatch.setattr(os, "access", access_as_other_user)
    try:
        with pytest.raises(InputError, match="Cannot write to .*not writable") as error:
            io.write_volume(_ct_volume(), folder / "ct.nii.gz")
        listing = _folder_listing(folder)
    finally:
        folder.chmod(0o755)
    _assert_one_sentence(error)
    assert listing == [], f"a refused write must leave the folder empty, got {listing}"


@pytest.mark.parametrize("parent", ["missing", "a-file"])
def test_unusable_output_folder_raises_input_error(tmp_path, parent):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match="Cannot write to .*choose a folder you can write to") as error:
        io.write_segmentation(_label_volume(), tmp_path / parent / "organs.seg.nrrd")
    _assert_one_sentence(error)


def test_unsupported_output_extension_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="not a supported output format") as error:
        io.write_volume(_ct_volume(), tmp_path / "ct.png")
    _assert_one_sentence(error)
