"""Checkpoints: metadata round trip, SHA256 registry, refusal of anything else."""
import json
import pickle

import pytest
import torch

from FINESegmentationLib.checkpoints import (
    ModelInfo, average_checkpoints, load_checkpoint, read_registry, resolve_model, save_checkpoint, sha256_of,
)
from FINESegmentationLib.cli import main as cli_main
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


def _saved_model(path, seed, visits, **overrides):
    torch.manual_seed(seed)
    model = build_model("fine-tiny", **overrides)
    model.trained_visits.copy_(torch.tensor(visits))
    save_checkpoint(path, model, ModelInfo(config=model.config, training={"seed": seed}, description=f"model {seed}"))
    return model


def test_averaged_checkpoint_holds_the_mean_weights_and_names_its_sources(tmp_path):
    a = _saved_model(tmp_path / "a.pt", 1, [5, 0, 7, 0, 0, 0, 0, 0, 0])
    b = _saved_model(tmp_path / "b.pt", 2, [3, 4, 0, 0, 0, 0, 0, 0, 0])
    digest = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "avg.pt", "the average")
    model, info = load_checkpoint(tmp_path / "avg.pt", digest)
    sa, sb = a.state_dict(), b.state_dict()
    differing = 0
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (sa[key] + sb[key]) / 2, atol=1e-7), f"{key} is the mean of the two models' {key}"
            differing += not torch.equal(sa[key], sb[key])
    assert differing > 100, "the two source models differ, so the mean is not one of them"
    assert model.trained_visits.tolist() == [5, 4, 7, 0, 0, 0, 0, 0, 0], "a grid cell counts as seen if either model saw it"
    assert info.description == "the average" and info.config == a.config
    sources = info.training["average_of"]
    assert [s["sha256"] for s in sources] == [sha256_of(tmp_path / "a.pt"), sha256_of(tmp_path / "b.pt")]
    assert [s["training"] for s in sources] == [{"seed": 1}, {"seed": 2}]


def test_models_that_cannot_be_averaged_are_refused_and_nothing_is_written(tmp_path, capsys):
    _saved_model(tmp_path / "a.pt", 1, [0] * 9)
    _saved_model(tmp_path / "wide.pt", 2, [0] * 9, embed_dim=48)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "avg.pt"
    with pytest.raises(CheckpointError, match="another architecture"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "wide.pt"], out)
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([tmp_path / "a.pt"], out)
    assert cli_main(["average", str(tmp_path / "a.pt"), str(tmp_path / "broken.pt"), "-o", str(out)]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("fine-seg: error:") and "broken.pt" in message and len(message.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "broken.pt", "wide.pt"], "no output, no temporary file"
