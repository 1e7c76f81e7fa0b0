"""Checkpoints: metadata round trip, SHA256 registry, refusal of anything else."""
import json
import pickle

import pytest
import torch

from FINESegmentationLib.checkpoints import (
    ModelInfo, load_checkpoint, read_registry, resolve_model, save_checkpoint, sha256_of,
)
from FINESegmentationLib.errors import CheckpointError
from FINESegmentationLib.model import build_model


@pytest.fixture
def saved(tmp_path):
    model = build_model("fine-tiny")
    info = ModelInfo(config=model.config, training={"data": "unit test"}, description="test model")
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model, info)
    return model, info, path, digest


def test_checkpoint_round_trip_keeps_weights_and_metadata(saved):
    model, info, path, digest = saved
    loaded, loaded_info = load_checkpoint(path, digest)
    assert loaded_info.to_dict() == info.to_dict(), "metadata survives save/load"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), f"weight {k} survives save/load"
    meta = info.to_dict()
    assert meta["volume_grid"]["cells_yx"] == [3, 3] and meta["preprocessing"]["target_spacing"], "grid geometry and spacing are recorded"


def test_tampered_checkpoint_is_refused(saved, tmp_path):
    _, _, path, digest = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its registered SHA256"):
        load_checkpoint(path, digest)


def test_registered_model_with_wrong_hash_is_refused(saved, tmp_path):
    _, _, path, _ = saved
    (tmp_path / "models.json").write_text(json.dumps({"models": [{"name": "m", "file": "m.pt", "sha256": "0" * 64}]}))
    registry = read_registry(tmp_path / "models.json")
    file, sha = resolve_model("m", registry)
    assert file == path and sha == "0" * 64
    with pytest.raises(CheckpointError, match="SHA256"):
        load_checkpoint(file, sha)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", pickle.dumps({"format": "x"})])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "checkpoint" in str(err.value), "one clear sentence"


def test_a_torch_file_without_our_format_marker_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(build_model("fine-tiny").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a FINE checkpoint"):
        load_checkpoint(path)


def test_a_pickle_with_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": "FINESegmentation checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists(), "weights_only loading never runs code from the file"


def test_unknown_model_name_gets_one_clear_sentence(tmp_path):
    (tmp_path / "models.json").write_text(json.dumps({"models": []}))
    with pytest.raises(CheckpointError, match="Unknown model 'nope'"):
        resolve_model("nope", read_registry(tmp_path / "models.json"))


def test_weights_that_do_not_fit_the_config_are_refused(saved, tmp_path):
    _, info, path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(bad)


def test_shipped_registry_is_readable_and_every_listed_file_matches_its_hash():
    for entry in read_registry().values():
        assert entry.path.is_file(), f"{entry.name}: file {entry.path} is shipped"
        assert sha256_of(entry.path) == entry.sha256, f"{entry.name}: shipped file matches its registered SHA256"


def test_shipped_models_say_they_are_for_demonstration_only():
    for entry in read_registry().values():
        _, info = load_checkpoint(entry.path, entry.sha256)
        assert info.clinical_use is False and "not for clinical use" in info.description, f"{entry.name} is marked demo-only"
        assert "phantom" in info.description, f"{entry.name} says it was trained on synthetic phantoms"
