"""Labelled CT slices as LiteMedSAM sees them, with the frozen encoder's embeddings computed once (a cache folder).

Fine-tuning the prompt encoder and mask decoder never changes the image embeddings, so each chosen
slice is embedded once (about 2.5 s on one CPU core) and training then runs the decoder only. A cache
folder holds:

* ``embeddings.npy``: (N, 256, 64, 64) fp16, memory-mapped when read;
* ``labels.npy``: (N, 256, 256) uint8 organ values on the model input (resized as the image is, padded with 0);
* ``slice_labels.npy``: (N, H, W) uint8 organ values on each slice's own grid (zero-padded to the largest slice);
* ``slices.json``: per slice its case, frame index, size, resized size and pixel spacing, and what the
  cache was built from (the encoder weights' SHA256, the window, the slice choice), so a stale cache is
  rebuilt rather than used.

Slices (:func:`choose_slices`) are spread over each organ's extent from its first to its last slice, so
the small ends of an organ are in the data, not only its large middle.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...errors import InputError
from ...labels import ORGANS
from ...volume import Volume
from .build import IMAGE_SIZE, LiteMedSAM
from .slices import CT_WINDOW, SliceInput, labelled_frame

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
MIN_MODEL_PIXELS = 8  # an organ smaller than this on the model input is not a sample (too few pixels to click)


def choose_slices(labels: np.ndarray, per_organ: int | None) -> list[int]:
    """Frame slices [S, P, L] to use: per organ, ``per_organ`` slices evenly spread from its first to its last
    slice (both ends included); ``None``: every slice that holds an organ."""
    present = [np.flatnonzero((labels == organ.label).any(axis=(1, 2))) for organ in ORGANS]
    if per_organ is None:
        return sorted(set(np.concatenate(present).tolist()))
    chosen: set[int] = set()
    for slices in present:
        if len(slices):
            chosen.update(slices[np.unique(np.round(np.linspace(0, len(slices) - 1, per_organ)).astype(int))].tolist())
    return sorted(chosen)


def model_labels(inputs: SliceInput, labels: np.ndarray) -> np.ndarray:
    """A slice's organ values (H, W) -> (256, 256) on the model input: each organ resized as the image is
    (area when shrinking, bilinear when enlarging), the most present value kept, zero padding."""
    values = np.arange(len(ORGANS) + 1)
    onehot = torch.from_numpy((labels[None] == values[:, None, None]).astype(np.float32))[None]
    size = (inputs.new_height, inputs.new_width)
    if size[0] <= inputs.height and size[1] <= inputs.width:
        resized = F.interpolate(onehot, size=size, mode="area")
    else:
        resized = F.interpolate(onehot, size=size, mode="bilinear", align_corners=False)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    out[: size[0], : size[1]] = resized[0].argmax(0).numpy().astype(np.uint8)
    return out


@dataclass(frozen=True)
class CacheSource:
    """What a cache is built from; a cache whose source differs is rebuilt."""

    cases: tuple[str, ...]
    per_organ: int | None
    weights_sha256: str
    window: tuple[float, float] = CT_WINDOW

    def to_dict(self) -> dict:
        return {"version": CACHE_VERSION, "cases": list(self.cases), "per_organ": self.per_organ,
                "weights_sha256": self.weights_sha256, "window": list(self.window)}


class SliceCache:
    """A cache folder opened for reading: slices, their embeddings and labels, and the (slice, organ) samples."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / "slices.json").read_text())
            self.source = meta["source"]
            self.slices: list[dict] = meta["slices"]
            self.embeddings = np.load(self.folder / "embeddings.npy", mmap_mode="r")
            self.labels = np.load(self.folder / "labels.npy", mmap_mode="r")
            self.slice_labels = np.load(self.folder / "slice_labels.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise InputError(f"{self.folder} is not a complete slice cache ({str(exc).splitlines()[0][:100]}); delete it so that it is rebuilt.") from None
        if not (len(self.slices) == len(self.embeddings) == len(self.labels) == len(self.slice_labels)):
            raise InputError(f"The slice cache {self.folder} is inconsistent (its arrays differ in length); delete it so that it is rebuilt.")
        self.samples: list[tuple[int, int]] = [
            (i, organ.label) for i in range(len(self.slices)) for organ in ORGANS
            if int((self.labels[i] == organ.label).sum()) >= MIN_MODEL_PIXELS
        ]

    def matches(self, source: CacheSource) -> bool:
        return self.source == source.to_dict()

    def __len__(self) -> int:
        return len(self.slices)

    def embedding(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, 256, 64, 64) fp32 image embeddings of the given slices."""
        return torch.from_numpy(np.stack([self.embeddings[i] for i in indices]).astype(np.float32))

    def target(self, index: int, organ: int) -> np.ndarray:
        """bool (256, 256): the organ on the model input."""
        return np.asarray(self.labels[index]) == organ

    def inputs(self, index: int) -> SliceInput:
        s = self.slices[index]
        return SliceInput(s["height"], s["width"], s["new_height"], s["new_width"])

    def slice_target(self, index: int, organ: int) -> np.ndarray:
        """bool (H, W): the organ on the slice's own grid."""
        s = self.slices[index]
        return np.asarray(self.slice_labels[index, : s["height"], : s["width"]]) == organ

    def spacing(self, index: int) -> tuple[float, float]:
        """(x, y) mm of the slice's pixels."""
        return tuple(self.slices[index]["spacing"])  # type: ignore[return-value]

    def organ_samples(self) -> dict[int, list[tuple[int, int]]]:
        """The samples grouped by organ value."""
        grouped: dict[int, list[tuple[int, int]]] = {}
        for sample in self.samples:
            grouped.setdefault(sample[1], []).append(sample)
        return grouped


def build_cache(cases: Iterable[tuple[str, Volume, Volume]], folder: str | os.PathLike, model: LiteMedSAM,
                source: CacheSource, progress: bool = True) -> SliceCache:
    """Embed the chosen slices of labelled cases (case id, CT in HU, organ labels on its grid) into ``folder``.

    The folder is written under a temporary name and renamed when complete; an existing folder is replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    images: list[np.ndarray] = []
    model_label_maps: list[np.ndarray] = []
    slice_label_maps: list[np.ndarray] = []
    for case_id, image, label in cases:
        frame, inputs, hu, labels = labelled_frame(case_id, image, label)
        for z in choose_slices(labels, source.per_organ):
            entries.append({"case": case_id, "z": int(z), "height": inputs.height, "width": inputs.width,
                            "new_height": inputs.new_height, "new_width": inputs.new_width, "spacing": [float(frame.spacing[0]), float(frame.spacing[1])]})
            images.append(np.asarray(hu[z], dtype=np.float32))
            slice_label_maps.append(np.asarray(labels[z], dtype=np.uint8))
            model_label_maps.append(model_labels(inputs, slice_label_maps[-1]))
    if not entries:
        raise InputError("The labelled cases hold no organ on any slice; give a dataset with organ labels 1-8.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        height = max(e["height"] for e in entries)
        width = max(e["width"] for e in entries)
        slice_labels = np.zeros((len(entries), height, width), np.uint8)
        for i, (e, m) in enumerate(zip(entries, slice_label_maps)):
            slice_labels[i, : e["height"], : e["width"]] = m
        np.save(tmp / "slice_labels.npy", slice_labels)
        np.save(tmp / "labels.npy", np.stack(model_label_maps))
        embeddings = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float16,
                                               shape=(len(entries), 256, IMAGE_SIZE // 4, IMAGE_SIZE // 4))
        model = model.eval()
        with torch.inference_mode():
            for i, (e, hu) in enumerate(tqdm(list(zip(entries, images)), desc=f"Embedding slices -> {folder.name}", disable=not progress)):
                embeddings[i] = model.embed(SliceInput(e["height"], e["width"], e["new_height"], e["new_width"]).image(hu, source.window))[0].numpy()
        embeddings.flush()
        del embeddings
        (tmp / "slices.json").write_text(json.dumps({"source": source.to_dict(), "slices": entries}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return SliceCache(folder)


def open_cache(folder: str | os.PathLike, source: CacheSource, cases: Callable[[], Iterable[tuple[str, Volume, Volume]]],
               model: LiteMedSAM, progress: bool = True) -> SliceCache:
    """The cache in ``folder`` when it was built from ``source``; else it is (re)built from ``cases()``."""
    folder = Path(folder)
    if (folder / "slices.json").is_file():
        cache = SliceCache(folder)
        if cache.matches(source):
            return cache
        logger.info("Rebuilding %s: it was built from other cases, slices or weights.", folder)
    return build_cache(cases(), folder, model, source, progress)
