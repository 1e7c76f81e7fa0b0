"""benchmarks/real_ct.py: models side by side on a real-CT pair, synthetic anatomy by phase and field of view, phantoms."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from FINESegmentationLib.data.phantoms import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_ct():
    spec = importlib.util.spec_from_file_location("real_ct", ROOT / "benchmarks" / "real_ct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_ct")
    write_dataset(root / "synth", 2, seed=7, in_plane=48, progress=False)
    (root / "synth" / "synth_info.json").write_text(json.dumps({
        "phantom_000": {"phase": "arterial", "fov": "slab"}, "phantom_001": {"phase": "portal-venous", "fov": "full"}}))
    # A one-case "real CT" folder laid out as the shared one: ct.nii.gz + labels.nii.gz.
    (root / "real").mkdir()
    shutil.copy(root / "synth" / "imagesTr" / "phantom_000_0000.nii.gz", root / "real" / "ct.nii.gz")
    shutil.copy(root / "synth" / "labelsTr" / "phantom_000.nii.gz", root / "real" / "labels.nii.gz")
    return root


def test_real_ct_benchmark_writes_models_side_by_side_with_groups_and_kidney_swaps(real_ct, data, coarse_checkpoint, tmp_path):
    # FINE alone (refine-all's LiteMedSAM would take minutes on these phantoms; its switch is tested in test_litemedsam).
    code = real_ct.main(["--model", f"old={coarse_checkpoint}", "--model", f"new={coarse_checkpoint}", "--variant", "quick=fast,stateless",
                         "--variant-models", "new", "--fine-alone",
                         "--real", str(data / "real"), "--synth", str(data / "synth"), "--phantoms", str(data / "synth"),
                         "--device", "cpu", "--threads", "1", "--out", str(tmp_path), "-q"])
    assert code == 0
    report = json.loads((tmp_path / "real_ct.json").read_text())
    assert set(report["datasets"]) == {"real", "synth", "phantoms"}, "the three data sets are evaluated"
    assert list(report["datasets"]["real"]["summary"]) == ["old", "new", "new quick"], \
        "models side by side, then the variant for the model --variant-models names"
    assert "Each runs as FINE alone" in (tmp_path / "real_ct.md").read_text(), "the tables say refine-all was off"
    assert report["datasets"]["real"]["case_ids"] == ["real"], "the image/label pair is one case"
    assert set(report["datasets"]["synth"]["groups"]["phase"]) == {"arterial", "portal-venous"}
    assert report["datasets"]["synth"]["groups"]["fov"]["slab"]["old"]["cases"] == 1, "cases grouped by their field of view"
    old = report["datasets"]["phantoms"]["summary"]["old"]
    assert old == report["datasets"]["phantoms"]["summary"]["new"], "the same checkpoint scores the same under two names"
    assert "right kidney" in old["kidney_swaps"] and old["min_case"] in ("phantom_000", "phantom_001"), "swap shares and worst case"
    md = (tmp_path / "real_ct.md").read_text()
    assert "| Organ | old Dice % | old HD95 mm | new Dice % |" in md and "By phase" in md and "RKi as LKi" in md


def test_real_ct_benchmark_refuses_bad_input_with_one_sentence(real_ct, data, coarse_checkpoint, tmp_path, capsys):
    assert real_ct.main(["--model", f"m={coarse_checkpoint}", "--real", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert real_ct.main(["--model", f"m={coarse_checkpoint}", "--real", str(data / "real"), "--synth", str(data / "real"),
                         "--out", str(tmp_path)]) == 2
    assert "synth_info.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        real_ct.main(["--model", f"m={coarse_checkpoint}", "--variant", "x=mirror"])
    assert "unknown option 'mirror'" in capsys.readouterr().err
    assert real_ct.main(["--model", f"m={coarse_checkpoint}", "--variant", "q=fast", "--variant-models", "other",
                         "--real", str(data / "real"), "--out", str(tmp_path)]) == 2
    assert "--variant-models names no model other" in capsys.readouterr().err
    assert not (tmp_path / "real_ct.json").exists(), "nothing is written for a refused run"
