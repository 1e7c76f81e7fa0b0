"""fine-seg options that take numbers read them as users type them, and a warning is printed once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_ct
from FINESegmentationLib.cli import build_parser, main
from FINESegmentationLib.io import read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
POINT = (-100.0, 50.0, 120.0)

# The ways a point is typed in a shell; each list is the words argparse receives.
POINT_FORMS = {
    "leading negative": ["--point", "-100,50,120"],
    "spaces after commas": ["--point", "-100,", "50,", "120"],
    "quoted with spaces": ["--point", "-100, 50, 120"],
    "equals sign": ["--point=-100,50,120"],
    "equals sign and spaces": ["--point=-100,", "50,", "120"],
    "spaces only": ["--point", "-100", "50", "120"],
    "spaced commas": ["--point", "-100", ",", "50", ",", "120"],
    "brackets, as Python prints a list": ["--point", "[-100,", "50,", "120]"],
    "abbreviated option": ["--poi", "-100,50,120"],
}


def _parse(words):
    return build_parser().parse_args(words)


def _refused(capsys, words):
    """The exit status and the error line of an argv argparse refuses."""
    with pytest.raises(SystemExit) as exc:
        _parse(words)
    err = capsys.readouterr().err
    return exc.value.code, [line for line in err.splitlines() if "error:" in line], err


@pytest.mark.parametrize("form", POINT_FORMS.values(), ids=POINT_FORMS.keys())
@pytest.mark.parametrize("input_first", [True, False], ids=["input first", "input last"])
def test_attention_point_accepts_negative_coordinates_as_typed(form, input_first):
    words = ["attention", "ct.nii.gz", *form, "-o", "heat.nii.gz"] if input_first else ["attention", *form, "ct.nii.gz", "-o", "heat.nii.gz"]
    args = _parse(words)
    assert (args.point, args.input, args.output) == (POINT, "ct.nii.gz", "heat.nii.gz"), \
        f"{' '.join(words)} gives the point {POINT}, and the input and output stay what they were"


SPACING_FORMS = {"spaces": ["3", "3", "6"], "commas": ["3,3,6"], "spaces after commas": ["3,", "3,", "6"], "quoted": ["3, 3, 6"]}


@pytest.mark.parametrize("form", SPACING_FORMS.values(), ids=SPACING_FORMS.keys())
def test_train_target_spacing_accepts_spaces_and_commas(form):
    args = _parse(["train", "--data", "d", "--out", "o", "--target-spacing", *form, "--hold-out", "a", "b"])
    assert args.target_spacing == (3.0, 3.0, 6.0) and args.hold_out == ["a", "b"], f"--target-spacing {' '.join(form)} is 3 x 3 x 6 mm"
    assert _parse(["train", "--data", "d", "--out", "o", f"--target-spacing={','.join(form)}"]).target_spacing == (3.0, 3.0, 6.0)


@pytest.mark.parametrize("words, attribute, value", [
    (["train", "--data", "d", "--out", "o", "--lr", "5e-4"], "lr", 5e-4),
    (["train", "--data", "d", "--out", "o", "--lr=.01"], "lr", 0.01),
    (["train", "--data", "d", "--out", "o", "--bank-probability", "0"], "bank_probability", 0.0),
    (["refiner-train", "--data", "d", "--out", "o", "--memory-probability", "1"], "memory_probability", 1.0),
    (["refiner-evaluate", "--data", "d", "--clicks", "0"], "clicks", 0),
    (["segment", "ct.nii.gz", "--sw-batch-size", "2"], "sw_batch_size", 2),
    (["attention", "ct.nii.gz", "--point", "1,2,3", "-o", "h.nii.gz", "--block", "-1"], "block", -1),
])
def test_numbers_in_range_are_read(words, attribute, value):
    assert getattr(_parse(words), attribute) == value, f"{' '.join(words)} sets {attribute} to {value}"


@pytest.mark.parametrize("words, message", [
    (["train", "--data", "d", "--out", "o", "--lr", "-1e-3"], "argument --lr: -1e-3 is out of range; give a number above 0."),
    (["train", "--data", "d", "--out", "o", "--target-spacing", "-3,", "3,", "6"], "give three positive numbers separated by commas"),
    (["train", "--data", "d", "--out", "o", "--seed", "-1"], "argument --seed: -1 is out of range; give a whole number of at least 0."),
    (["train", "--data", "d", "--out", "o", "--epochs", "ten"], "'ten' is not a whole number"),
    (["train", "--data", "d", "--out", "o", "--bank-probability", "-0.5"], "give a number from 0 to 1"),
    (["refiner-train", "--data", "d", "--out", "o", "--steps", "-5"], "argument --steps: -5 is out of range"),
    (["refiner-evaluate", "--data", "d", "--clicks", "-2"], "argument --clicks: -2 is out of range"),
    (["litemedsam-train", "--data", "d", "--out", "o", "--steps", "0"], "argument --steps: 0 is out of range"),
    (["litemedsam-train", "--data", "d", "--out", "o", "--lr", "-1"], "argument --lr: -1 is out of range; give a number above 0."),
    (["segment", "ct.nii.gz", "--sw-batch-size", "0"], "argument --sw-batch-size: 0 is out of range"),
    (["attention", "ct.nii.gz", "--point", "-100,", "50", "-o", "h.nii.gz"], "'-100, 50' is not a point; give three numbers"),
    (["attention", "ct.nii.gz", "--point", "-1,a,3", "-o", "h.nii.gz"], "'-1,a,3' is not a point"),
    (["attention", "ct.nii.gz", "--point", "nan,1,2", "-o", "h.nii.gz"], "is not a point"),
])
def test_a_wrong_number_ends_in_one_sentence(capsys, words, message):
    code, errors, err = _refused(capsys, words)
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, \
        f"{' '.join(words)}: exit status 2 and one error line saying {message!r}, got {err!r}"


def test_a_missing_value_is_still_reported_as_missing(capsys):
    code, errors, _ = _refused(capsys, ["attention", "ct.nii.gz", "--point", "-o", "h.nii.gz"])
    assert code == 2 and errors and "--point: expected one argument" in errors[0], "an option name is not taken for a value"


def test_words_after_double_dash_stay_positional():
    args = _parse(["segment", "--sw-batch-size", "1", "--", "-1.nii.gz"])
    assert args.inputs == ["-1.nii.gz"] and args.sw_batch_size == 1, "after -- a negative-looking word is an input"


def test_attention_runs_from_a_negative_point_typed_with_spaces(capsys, tmp_path, tiny_checkpoint):
    image = write_volume(make_ct(shape=(24, 96, 96), spacing=(4.0, 4.0, 8.0)), tmp_path / "ct.nii.gz")
    code = main(["attention", str(image), "--point", "-20,", "-30,", "60", "--model", str(tiny_checkpoint), "--device", "cpu",
                 "-q", "-o", str(tmp_path / "heat.nii.gz")])
    assert code == 0, capsys.readouterr().err
    assert read_volume(tmp_path / "heat.nii.gz").array.max() == pytest.approx(1.0), "a heat map from the point (-20, -30, 60) mm"


def _cli(*words):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "FINESegmentation"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "FINESegmentationLib.cli", *map(str, words)], capture_output=True, text=True, env=env)


def test_an_mr_like_warning_is_printed_once(tmp_path, tiny_checkpoint):
    mr = make_ct(shape=(24, 72, 72))
    mr.array[:] = 0.1 * mr.array + 200  # no air near -1000: not like a CT
    (tmp_path / "in").mkdir()
    write_volume(mr, tmp_path / "in" / "mr.nii.gz")
    # A folder of files: also no console noise from the DICOM probe of the folder.
    done = _cli("segment", tmp_path / "in", "--model", tiny_checkpoint, "--device", "cpu", "--fast", "-q", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("not like a CT") == 1 and done.stderr.count("\n") == 1, \
        f"the MR-like warning is the one line on stderr, got {done.stderr!r}"


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_the_post_processing_switches_default_to_the_engine_and_can_be_turned_either_way(command):
    base = [command, "ct.nii.gz"] if command == "segment" else [command, "--data", "d"]
    default = _parse(base)
    assert default.largest_component is None and default.refine_all is None, "None: the engine's default (Segmenter)"
    on = _parse(base + ["--largest-component", "--refine-all"])
    off = _parse(base + ["--no-largest-component", "--no-refine-all"])
    assert (on.largest_component, on.refine_all, off.largest_component, off.refine_all) == (True, True, False, False)
