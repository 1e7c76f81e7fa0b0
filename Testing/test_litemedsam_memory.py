"""Memorizing SAM on LiteMedSAM: the decoder's memory plug-in, its file, retrieval and the predictor's switch.

Slice embeddings are random tensors here (the image encoder is not what the memory changes), so the tests
run the published decoder only; the one test that builds a memory from a dataset embeds a single slice.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from FINESegmentationLib.cli import main
from FINESegmentationLib.errors import CheckpointError, InputError
from FINESegmentationLib.io import write_volume
from FINESegmentationLib.refiner.litemedsam import transformer
from FINESegmentationLib.refiner.litemedsam.build import load_litemedsam
from FINESegmentationLib.refiner.litemedsam.memory import (SITES, MemorySettings, SliceMemory, build_slice_memory, descriptor,
                                                           site_attention)
from FINESegmentationLib.refiner.litemedsam.predictor import SlicePredictor
from FINESegmentationLib.refiner.litemedsam.refine_all import refine_all
from FINESegmentationLib.refiner.memory import RetrievedMemory, memory_attention
from FINESegmentationLib.volume import Geometry, Volume

BOX = torch.tensor([60.0, 70.0, 140.0, 150.0])


@pytest.fixture(scope="module")
def model():
    return load_litemedsam()[0]


def _embeddings(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 256, 64, 64, generator=generator) for _ in range(n)]


@pytest.fixture(scope="module")
def memory(model):
    examples = [(e, BOX + 4 * i, {"case": f"c{i}", "slice": i, "organ": 1 + i % 8}) for i, e in enumerate(_embeddings(6))]
    return build_slice_memory(model, examples, MemorySettings(site="token_to_image.final", roi_grid=4), "test memory")


def _published_forward(self, q, k, v, memory=None):
    """segment-anything's Attention.forward, as the module computed it before the memory existed."""
    assert memory is None, "no attention is handed a memory when the decoder has none"
    out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v)))
    b, _, n, _ = out.shape
    return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


def test_without_memory_the_decoder_computes_exactly_the_published_model(model, monkeypatch):
    embedding = _embeddings(1, seed=3)[0]
    with torch.inference_mode():
        ours = model.decode(embedding, boxes=BOX[None], memory=None)
        empty = model.decode(embedding, boxes=BOX[None], memory={})
        monkeypatch.setattr(transformer.Attention, "forward", _published_forward)
        published = model.decode(embedding, boxes=BOX[None])
    assert all(torch.equal(a, b) for a, b in zip(ours + empty, published + published)), \
        "memory=None (or no site read) gives bit for bit the published decoder's masks and IoU"


def _random_memory(b: int, heads: int, m: int, d: int, weights: torch.Tensor) -> RetrievedMemory:
    generator = torch.Generator().manual_seed(1)
    shape = (b, len(weights[0]), heads, m, d)
    return RetrievedMemory(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), weights,
                           torch.zeros(weights.shape, dtype=torch.long), torch.zeros(weights.shape))


@pytest.mark.parametrize("site", SITES)
def test_memory_attention_is_fused_with_local_attention_by_the_local_ratio_exactly(model, site):
    attention = site_attention(model, site)
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 7, 256, generator=generator), torch.randn(1, 30, 256, generator=generator)
    heads, width = attention.num_heads, attention.internal_dim // attention.num_heads
    retrieved = _random_memory(1, heads, 12, width, torch.tensor([[0.5, 0.3, 0.2]]))
    r = 0.7
    with torch.inference_mode():
        queries = attention._heads(attention.q_proj(q))
        local = F.scaled_dot_product_attention(queries, attention._heads(attention.k_proj(k)), attention._heads(attention.v_proj(k)))
        remembered = memory_attention(queries, retrieved)
        expected = attention.out_proj((r * local + (1 - r) * remembered).transpose(1, 2).reshape(1, 7, attention.internal_dim))
        fused = attention(q, k, k, (retrieved, r))
        only_local = attention(q, k, k, (retrieved, 1.0))
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6, msg="fused = r * local + (1 - r) * memory, then the output projection")
    torch.testing.assert_close(only_local, attention(q, k, k), rtol=0, atol=1e-6, msg="r = 1 is the local attention alone")


def test_nearer_examples_are_retrieved_first_and_weigh_more(memory):
    query = memory.memory.descriptors[2:3]
    distances, indices = memory.memory.search(query, 3)
    retrieved = memory.memory.retrieve(query, 3)
    assert indices[0, 0] == 2 and torch.all(distances[0, 1:] >= distances[0, :-1]), "the example itself first, then by distance"
    assert torch.all(retrieved.weights[0, :-1] > retrieved.weights[0, 1:]) and torch.isclose(retrieved.weights.sum(), torch.tensor(1.0)), \
        "weights decrease with distance and sum to 1"


def test_the_descriptor_is_the_box_region_of_the_embedding():
    embedding = torch.zeros(1, 256, 64, 64)
    embedding[:, :, 40:, 40:] = 1.0  # only the lower right quarter differs
    inside, elsewhere = descriptor(embedding, torch.tensor([170.0, 170.0, 250.0, 250.0])), descriptor(embedding, BOX)
    assert inside.shape == (1, 1024) and torch.isclose(inside.norm(), torch.tensor(1.0)), "1024 numbers, L2-normalised"
    assert not torch.allclose(inside, elsewhere), "another box region gives another search key"


def test_the_memory_file_round_trips_and_a_tampered_or_foreign_file_is_refused(tmp_path, memory, model):
    from FINESegmentationLib.checkpoints import sha256_of

    path = tmp_path / "memory.pt"
    memory.save(path)
    loaded = SliceMemory.load(path, sha256_of(path))
    assert loaded.settings == memory.settings and loaded.memory.examples == memory.memory.examples, "settings and examples round-trip"
    assert torch.equal(loaded.memory.keys, memory.memory.keys) and torch.equal(loaded.memory.descriptors, memory.memory.descriptors), \
        "keys, values and descriptors round-trip"
    assert loaded.memory.keys.shape == (6, 8, 16, 16), "per example: 8 heads x (4 x 4 positions in the box) x 16"
    loaded.check_compatible(model)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        SliceMemory.load(tampered, sha256_of(path))
    assert "does not match" in str(error.value) and "\n" not in str(error.value), "one sentence names the SHA256 mismatch"
    from FINESegmentationLib.resources import models_dir

    with pytest.raises(CheckpointError, match="is not a LiteMedSAM memory file"):
        SliceMemory.load(models_dir() / "refiner-tiny-phantom-memory.pt")
    other = load_litemedsam()[0]
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="built with another refiner"):
        SlicePredictor(model=other, memory=loaded)


def _spy_predictor(model, memory, monkeypatch, slices: int = 5):
    """A predictor on a small volume whose slice embeddings are random, recording what each decode reads."""
    geometry = Geometry((1.5, 1.5, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = Volume(np.zeros((slices, 64, 64), np.float32), geometry)
    predictor = SlicePredictor(model=model, memory=memory)
    predictor.set_volume(volume)
    embeddings = _embeddings(slices, seed=5)
    monkeypatch.setattr(predictor, "embedding", lambda k: embeddings[k])
    reads = []
    decode = model.decode

    def spy(*args, memory=None, **kwargs):
        reads.append(memory)
        return decode(*args, memory=memory, **kwargs)

    monkeypatch.setattr(model, "decode", spy)
    return predictor, volume, reads


def test_the_memory_switch_reaches_every_slice_the_predictor_draws(model, memory, monkeypatch):
    predictor, volume, reads = _spy_predictor(model, memory, monkeypatch)
    box = [[10, 10, 2], [40, 40, 2]]
    on = predictor.predict(box=box, point_space="ijk")
    assert on.used_memory and reads and all(r is not None and set(r) == {memory.settings.site} for r in reads), \
        "a predictor given a memory reads it on the prompted slice and on every propagated one"
    reads.clear()
    off = predictor.predict(box=box, point_space="ijk", use_memory=False)
    assert not off.used_memory and reads and all(r is None for r in reads), "use_memory=False reads nothing"
    reads.clear()
    predictor.use_memory = False
    refine_all(predictor, volume, Volume((np.arange(5 * 64 * 64).reshape(5, 64, 64) % 64 > 30).astype(np.uint8), volume.geometry))
    assert reads and all(r is None for r in reads), "refine-all follows the predictor's switch"
    bare = SlicePredictor(model=model)
    bare.set_volume(volume)
    assert predictor.has_memory and not bare.has_memory, "has_memory says whether a memory is loaded (the Slicer switch reads it)"
    with pytest.raises(InputError, match="No memory is loaded"):
        bare.predict(box=box, point_space="ijk", use_memory=True)


def test_cli_builds_a_litemedsam_memory_and_refine_reads_it_when_given(tmp_path, capsys, model, monkeypatch):
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    geometry = Geometry((2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = np.full((3, 48, 48), -100.0, np.float32)
    labels = np.zeros((3, 48, 48), np.uint8)
    labels[:, 14:34, 10:30] = 5
    ct[labels == 5] = 60.0
    write_volume(Volume(ct, geometry), data / "imagesTr" / "case_0000.nii.gz")
    write_volume(Volume(labels, geometry), data / "labelsTr" / "case.nii.gz")
    out = tmp_path / "memory.pt"
    assert main(["refiner-memory", "--refiner", "litemedsam", "--data", str(data), "-o", str(out), "--slices-per-organ", "1",
                 "--roi-grid", "4", "-q"]) == 0
    built = SliceMemory.load(out)
    assert len(built) == 1 and built.memory.examples == [{"case": "case", "slice": 1, "organ": 5}], "the liver's middle slice"
    assert json.dumps(built.metadata["settings"]) and built.settings.roi_grid == 4, "the settings are stored with the memory"
    assert built.metadata["click_trained"] is True, "by default the memory is built over the click-tuned weights fine-seg refine uses"
    assert main(["refiner-memory", "--refiner", "litemedsam", "--data", str(data), "-o", str(tmp_path / "x.pt"), "--site", "encoder"]) == 1
    assert "Unknown memory site 'encoder'" in capsys.readouterr().err and not (tmp_path / "x.pt").exists(), "a bad site: one sentence, no file"
    embeddings = _embeddings(3, seed=7)
    monkeypatch.setattr(SlicePredictor, "embedding", lambda self, k: embeddings[k])
    box = tmp_path / "box.mrk.json"
    box.write_text(json.dumps({"markups": [{"type": "ROI", "coordinateSystem": "LPS", "center": [39.0, 47.0, 3.0], "size": [44.0, 44.0, 0.0]}]}))
    for flags, used in (([], None), (["--memory", str(out)], str(out)), (["--memory", "litemedsam-memory"], "litemedsam-memory")):
        assert main(["refine", str(data / "imagesTr" / "case_0000.nii.gz"), "--segment", "liver", "--box", str(box),
                     "-o", str(tmp_path / "out.seg.nrrd"), *flags]) == 0, \
            "without --model, the weights the memory was built over (click-tuned for a new one, published for the bundled one)"
        printed = capsys.readouterr().out
        assert ("; memory " in printed) == bool(used) and (used is None or "memory " + used in printed), \
            "fine-seg refine reads the memory given with --memory, only then"


def test_the_bundled_memory_is_registered_fits_the_bundled_weights_and_stays_small(model):
    from FINESegmentationLib.checkpoints import read_registry, sha256_of
    from FINESegmentationLib.refiner.litemedsam.memory import MEMORY_KIND, load_slice_memory

    entry = read_registry(kind=MEMORY_KIND)["litemedsam-memory"]
    assert sha256_of(entry.path) == entry.sha256 and entry.path.stat().st_size <= 10 * 2**20, "registered SHA256, at most 10 MB"
    memory = load_slice_memory("litemedsam-memory")
    memory.check_compatible(model)
    assert memory.settings == MemorySettings() and "not for clinical use" in memory.metadata["description"], \
        "built with the default site, grid and ratio, from synthetic data"
    assert {e["organ"] for e in memory.memory.examples} == set(range(1, 9)), "every organ is remembered"


def test_a_memory_without_weights_picks_the_weights_it_was_built_over():
    from FINESegmentationLib.refiner.litemedsam.click_weights import slice_weights

    if not slice_weights(None)[1]:
        pytest.skip("no click-tuned weights are registered")
    bundled = SlicePredictor(memory="litemedsam-memory")  # built over the published decoder (README's example)
    assert bundled.has_memory and not bundled.click_trained, "the bundled memory brings the published weights it was built with"
    assert SlicePredictor().click_trained, "without a memory the default stays the click-tuned weights"
