"""fine-seg segment: outputs Slicer reads, batches, and one clear sentence for every bad input."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import make_ct
from FINESegmentationLib.cli import main
from FINESegmentationLib.io import read_segmentation, read_volume, write_volume


def _run(capsys, *args):
    code = main(["segment", "-q", "--device", "cpu", "--fast", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_real_ct_gives_a_slicer_segmentation_with_named_coloured_coded_segments(capsys, tmp_path, tiny_checkpoint, ct_chest_path):
    target = tmp_path / "chest.seg.nrrd"
    code, _, err = _run(capsys, ct_chest_path, "--model", tiny_checkpoint, "-o", target, "--report", tmp_path / "r.json")
    assert code == 0, err
    seg = slicerio.read_segmentation(str(target))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    kidney = seg["segments"][1]
    assert kidney["terminology"]["type"][1] == "64033007" and kidney["terminology"]["typeModifier"][1] == "24028007", "SNOMED codes"
    assert tuple(round(c * 255) for c in seg["segments"][0]["color"]) == (157, 108, 162), "GenericAnatomyColors spleen"
    assert read_segmentation(target).geometry.allclose(read_volume(ct_chest_path).geometry, atol=1e-6), "same geometry as the CT"
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("timings_s", "crops_per_pass", "device", "precision", "peak_memory_mb"):
        assert key in report, f"the report holds {key}"


def test_nifti_label_map_and_probabilities(capsys, tmp_path, tiny_checkpoint):
    source = write_volume(make_ct(), tmp_path / "ct.nii.gz")
    code, _, err = _run(capsys, source, "--model", tiny_checkpoint, "--format", "nii.gz", "--probabilities", "-o", tmp_path / "out")
    assert code == 0, err
    labels = sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz"))
    probs = sitk.ReadImage(str(tmp_path / "out" / "ct_probabilities.nii.gz"))
    assert labels.GetSize() == (72, 72, 24) and probs.GetSize()[:3] == (72, 72, 24), "both outputs on the input grid"


def test_a_folder_is_a_batch_with_one_output_each(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    for i in range(2):
        write_volume(make_ct(seed=i), tmp_path / "in" / f"case{i}.nrrd")
    code, out, err = _run(capsys, tmp_path / "in", "--model", tiny_checkpoint, "-o", tmp_path / "out", "--bank", "stateless", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0.seg.nrrd", "case1.seg.nrrd"]
    assert len(json.loads((tmp_path / "r.json").read_text())) == 2, "one report entry per case"


def _bad_inputs(tmp_path):
    two_d = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.int16)), str(two_d))
    four_d = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 40, 40), np.int16), isVector=False), str(four_d))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a gzip file")
    nan = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 40, 40), np.nan, np.float32)), str(nan))
    return {"2-D": two_d, "4-D": four_d, "corrupt": corrupt, "NaN": nan}


@pytest.mark.parametrize("kind", ["2-D", "4-D", "corrupt", "NaN"])
def test_bad_images_end_in_one_sentence_and_no_output(capsys, tmp_path, tiny_checkpoint, kind):
    source = _bad_inputs(tmp_path)[kind]
    (tmp_path / "out").mkdir()
    code, _, err = _run(capsys, source, "--model", tiny_checkpoint, "-o", tmp_path / "out" / "x.seg.nrrd")
    assert code == 1 and err.startswith("fine-seg: error: ") and err.count("\n") == 1, f"{kind}: one line on stderr, got {err!r}"
    assert not list((tmp_path / "out").iterdir()), f"{kind}: nothing written"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "no-such-model"], "Unknown model"),
        (["--device", "cuda:7"], "not available"),
        (["-o", "/nonexistent-folder/x.seg.nrrd"], "does not exist"),
    ],
)
def test_bad_options_end_in_one_sentence(capsys, tmp_path, tiny_checkpoint, extra, message):
    source = write_volume(make_ct(), tmp_path / "ct.nii.gz")
    args = [source, *(extra if "--model" in extra else ["--model", tiny_checkpoint, *extra])]
    code, _, err = _run(capsys, *args)
    assert code == 1 and message in err and err.count("\n") == 1, err


def test_a_failing_case_in_a_batch_does_not_stop_the_others(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    write_volume(make_ct(), tmp_path / "in" / "good.nrrd")
    (tmp_path / "in" / "bad.nrrd").write_bytes(b"NRRD0004\nbroken")
    code, _, err = _run(capsys, tmp_path / "in", "--model", tiny_checkpoint, "-o", tmp_path / "out", "--bank", "stateless")
    assert code == 1 and "bad.nrrd" in err, "the failure is named and the exit status is non-zero"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.seg.nrrd"], "the good case is still segmented"


def test_demo_generates_segments_and_scores_a_phantom(capsys, tmp_path, tiny_checkpoint):
    code = main(["demo", "--model", str(tiny_checkpoint), "--in-plane", "64", "--out", str(tmp_path / "demo"), "--device", "cpu",
                 "--no-refine-all"])  # refine-all itself: test_litemedsam
    out = capsys.readouterr().out
    assert code == 0
    assert {"phantom_ct.nii.gz", "phantom_ct.seg.nrrd", "phantom_reference.seg.nrrd", "report.json"} <= {p.name for p in (tmp_path / "demo").iterdir()}
    assert "| Method | HD95 (mm) | DSC |" in out and "Segmented in" in out, "the demo prints the time and a Dice table"
    assert "FINE alone" in out, "and says that refine-all was switched off"


def test_a_thin_slab_is_reported_on_the_thin_slab_grid(capsys, tmp_path, tiny_checkpoint):
    slab = write_volume(make_ct(shape=(10, 40, 40), spacing=(4.0, 4.0, 4.0)), tmp_path / "slab.nii.gz")  # 40 mm
    code, out, err = _run(capsys, slab, "--model", tiny_checkpoint, "-o", tmp_path / "out", "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    report = report[0] if isinstance(report, list) else report
    assert report["thin_slab"] and report["network_spacing_xyz"] == [3.0, 3.0, 3.0]
    assert "thin-slab grid 3 x 3 x 3 mm" in out
