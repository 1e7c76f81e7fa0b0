"""Memorizing SAM on LiteMedSAM: labelled slices remembered by one of the mask decoder's attentions.

What is stored (:func:`build_slice_memory`): for every example, an organ on a labelled slice, the keys and
values that the chosen attention ``site`` of the two-way transformer (:mod:`.transformer`) computes when
the example is prompted by its reference box, enlarged by ``box_margin_mm`` (3 mm: the best margin around a reference box). The
sides that stand for the image (the keys and values of a tokens -> image attention) are resampled
bilinearly to a ``roi_grid`` x ``roi_grid`` grid inside the box: the organ and its rim, as the paper's
memory holds crops centred on the label, at a fixed size per example. The sides that stand for the
prompt tokens (an image -> tokens attention) are kept whole (7 tokens for a box).

How it is found (:meth:`SliceMemory.read`): the query's descriptor is its slice embedding pooled inside
the prompt box to 2 x 2 cells and L2-normalised (1024 numbers; the memory holds the same for every
example); the ``k`` nearest examples (exact Euclidean search) are weighted by inverse distance
(:func:`..memory.distance_weights`). The search runs per prompt, so it is specific to the organ in the box.

How it is fused (:func:`..memory.fuse`): in the site's attention, per head,
``r * softmax(Q K^T) V + (1 - r) * sum_j w_j softmax(Q K_j^T) V_j`` with the local ratio r.

The file reuses the 3-D refiner's memory format (:class:`..memory.ExternalMemory`: a format marker, a
weights-only load, SHA256 when registered, a fingerprint of the model that computed it); its metadata
say which site, grid, margin and ratio it was built for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import CheckpointError, InputError
from ...labels import ORGANS
from ...volume import Volume
from ..memory import ExternalMemory, RetrievedMemory, weights_fingerprint
from .build import IMAGE_SIZE, LiteMedSAM
from .slices import SliceInput, enlarged_box, labelled_frame
from .transformer import Attention, SiteMemory

SITES = ("token_to_image.0", "token_to_image.1", "token_to_image.final", "image_to_token.0", "image_to_token.1")
REFINER = "litemedsam"
MEMORY_KIND = "refiner-2d-memory"  # models.json kind of a registered LiteMedSAM memory
DESCRIPTOR_CELLS = 2  # the descriptor pools the box to 2 x 2 cells of the embedding
DESCRIPTOR_SAMPLES = 8  # points per side sampled in the box before pooling
MIN_EXAMPLE_PIXELS = 64  # an organ smaller than this on the model input is too small to be a good example


@dataclass(frozen=True)
class MemorySettings:
    """Where the memory sits and how it is read (README measures the sites against each other)."""

    site: str = "token_to_image.1"
    local_ratio: float = 0.7
    k: int = 3
    roi_grid: int = 8
    box_margin_mm: float = 3.0

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise InputError(f"Unknown memory site '{self.site}'; use one of {', '.join(SITES)}.")

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "local_ratio": self.local_ratio, "k": self.k, "roi_grid": self.roi_grid,
                "box_margin_mm": self.box_margin_mm}


def site_attention(model: LiteMedSAM, site: str) -> Attention:
    """The attention module of the mask decoder's transformer that a site names."""
    transformer = model.mask_decoder.transformer
    kind, _, index = site.partition(".")
    if site not in SITES:
        raise ValueError(f"Unknown memory site '{site}'; use one of {', '.join(SITES)}.")
    if index == "final":
        return transformer.final_attn_token_to_image
    layer = transformer.layers[int(index)]
    return layer.cross_attn_token_to_image if kind == "token_to_image" else layer.cross_attn_image_to_token


def roi_sample(maps: torch.Tensor, box: torch.Tensor, grid: int) -> torch.Tensor:
    """Maps (B, C, h, w) covering the model input, a box (4,) in model-input pixels (x0, y0, x1, y1, inclusive)
    -> (B, C, grid, grid), sampled bilinearly at the centres of a grid x grid split of the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    steps = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    # Pixel p covers [p, p + 1) of the input; grid_sample (align_corners=False) maps [0, 256) to [-1, 1).
    xs = (x0 + (x1 - x0 + 1) * steps) / IMAGE_SIZE * 2 - 1
    ys = (y0 + (y1 - y0 + 1) * steps) / IMAGE_SIZE * 2 - 1
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].expand(len(maps), -1, -1, -1)
    return F.grid_sample(maps, points.to(maps), mode="bilinear", padding_mode="border", align_corners=False)


def descriptor(embedding: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The search key of a prompt: the embedding (1, 256, 64, 64) pooled in the box to 2 x 2 cells, L2-normalised (1, 1024)."""
    sampled = roi_sample(embedding.float(), box, DESCRIPTOR_SAMPLES)
    return F.normalize(F.adaptive_avg_pool2d(sampled, DESCRIPTOR_CELLS).flatten(1), dim=1)


def site_kv(model: LiteMedSAM, embedding: torch.Tensor, box: torch.Tensor, site: str,
            roi_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (H, N, d) of a site's attention on one slice embedding (1, 256, 64, 64) prompted by a box
    (4,) in model-input pixels: N = roi_grid^2 image positions inside the box, or the prompt's tokens."""
    attention = site_attention(model, site)
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(attention, f"{name}_proj").register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name in ("k", "v")]
    try:
        with torch.inference_mode():
            model.decode(embedding, boxes=box[None])
    finally:
        for hook in hooks:
            hook.remove()
    kv = []
    for name in ("k", "v"):
        x = seen[name][0]  # (N, width): the projected keys or values of the one prompt
        n, width = x.shape
        if site.startswith("token_to_image"):
            side = int(round(n**0.5))
            x = roi_sample(x.T.reshape(1, width, side, side), box, roi_grid).reshape(width, roi_grid * roi_grid).T
        kv.append(x.reshape(len(x), attention.num_heads, width // attention.num_heads).transpose(0, 1).contiguous())
    return kv[0], kv[1]


def example_box(inputs: SliceInput, spacing_xy: Sequence[float], mask: np.ndarray, margin_mm: float) -> torch.Tensor | None:
    """The model-input box (4,) of an organ's mask on its slice (H, W), enlarged by ``margin_mm``; None if empty."""
    box = enlarged_box(mask, tuple(spacing_xy), margin_mm)
    return None if box is None else inputs.box(box)[0]


class SliceMemory:
    """A memory (:class:`..memory.ExternalMemory`) and the settings it was built with; :meth:`read` serves the decoder."""

    def __init__(self, memory: ExternalMemory, settings: MemorySettings) -> None:
        self.memory = memory
        self.settings = settings

    def __len__(self) -> int:
        return len(self.memory)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.memory.metadata

    def retrieve(self, embedding: torch.Tensor, box: torch.Tensor) -> RetrievedMemory:
        """The k nearest examples of a prompt: a slice embedding (1, 256, 64, 64) and its box (4,) in model-input pixels."""
        found = self.memory.retrieve(descriptor(embedding, box).to(self.memory.descriptors.device), self.settings.k)
        device = embedding.device  # the memory stays in RAM; what one prompt reads goes where the decoder runs
        return RetrievedMemory(found.keys.to(device), found.values.to(device), found.weights.to(device), found.indices, found.distances)

    def read(self, embedding: torch.Tensor, box: torch.Tensor) -> dict[str, SiteMemory]:
        """What the decoder reads for this prompt: {site: (retrieved keys and values, local ratio)}."""
        return {self.settings.site: (self.retrieve(embedding, box), self.settings.local_ratio)}

    def check_compatible(self, model: LiteMedSAM, fingerprint: str | None = None) -> None:
        """Refuse a memory computed by other weights (e.g. built over the base decoder, used with click-tuned weights)."""
        self.memory.check_compatible(model, fingerprint)

    def save(self, path: str | os.PathLike) -> str:
        """Write the memory atomically; returns the file's SHA256."""
        return self.memory.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None = None) -> "SliceMemory":
        """Read a LiteMedSAM memory file (SHA256 check when given, weights-only load, format and shape checks)."""
        memory = ExternalMemory.load(path, sha256)
        try:
            settings = MemorySettings(**memory.metadata["settings"]) if memory.metadata.get("refiner") == REFINER else None
        except (KeyError, TypeError, InputError):
            settings = None
        if settings is None:
            raise CheckpointError(f"{path} is not a LiteMedSAM memory file; build one with fine-seg refiner-memory --refiner litemedsam.")
        return cls(memory, settings)


def load_slice_memory(name_or_path: str | os.PathLike) -> SliceMemory:
    """A registered LiteMedSAM memory (checked against its SHA256) or a memory file."""
    from ...weights import local_checkpoint

    path, sha256 = local_checkpoint(str(name_or_path), kind=MEMORY_KIND)
    return SliceMemory.load(path, sha256)


def build_slice_memory(model: LiteMedSAM, examples: Iterable[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                       settings: MemorySettings = MemorySettings(), description: str = "",
                       progress: Callable[[], None] | None = None) -> SliceMemory:
    """A memory of labelled examples: (slice embedding (1, 256, 64, 64), reference box (4,) in model-input pixels,
    what the example is) each; stores the site's keys and values and the example's descriptor."""
    descriptors, keys, values, infos = [], [], [], []
    model.eval()
    for embedding, box, info in examples:
        k, v = site_kv(model, embedding, box, settings.site, settings.roi_grid)
        descriptors.append(descriptor(embedding, box)[0])
        keys.append(k)
        values.append(v)
        infos.append(dict(info))
        if progress is not None:
            progress()
    if not infos:
        raise CheckpointError("No labelled example was found to build the memory from; give a dataset with organ labels.")
    memory = ExternalMemory(torch.stack(descriptors), torch.stack(keys).half(), torch.stack(values).half(), infos, {
        "refiner": REFINER,
        "refiner_fingerprint": weights_fingerprint(model),
        "click_trained": bool(getattr(model, "click_trained", False)),
        "settings": settings.to_dict(),
        "description": description,
        "examples": len(infos),
    })
    return SliceMemory(memory, settings)


def example_slices(labels: np.ndarray, organ: int, per_organ: int) -> list[int]:
    """``per_organ`` frame slices of an organ (labels [S, P, L]) at the quantiles (i + 1) / (per_organ + 1) of its
    extent: inside the organ, away from its thin ends, whose outlines are the least reliable examples."""
    present = np.flatnonzero((labels == organ).any(axis=(1, 2)))
    if not len(present):
        return []
    return sorted({int(present[int((len(present) - 1) * (i + 1) / (per_organ + 1) + 0.5)]) for i in range(per_organ)})


def dataset_examples(model: LiteMedSAM, cases: Iterable[tuple[str, Volume, Volume]], per_organ: int, margin_mm: float,
                     min_pixels: int = MIN_EXAMPLE_PIXELS) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """(slice embedding, reference box in model-input pixels, {case, slice, organ}) of every example of labelled
    cases (case id, CT in HU, organ labels on its grid); each slice is embedded once, organs under ``min_pixels``
    pixels of the model input are left out."""
    for case_id, image, label in cases:
        frame, inputs, hu, labels = labelled_frame(case_id, image, label)
        pixel_scale = float(np.prod(inputs.scale_xy))
        by_slice: dict[int, list[int]] = {}
        for organ in ORGANS:
            for z in example_slices(labels, organ.label, per_organ):
                if (labels[z] == organ.label).sum() * pixel_scale >= min_pixels:
                    by_slice.setdefault(z, []).append(organ.label)
        for z, organs in sorted(by_slice.items()):
            with torch.inference_mode():
                embedding = model.embed(inputs.image(hu[z]))
            for organ in organs:
                box = example_box(inputs, frame.spacing[:2], labels[z] == organ, margin_mm)
                yield embedding, box, {"case": case_id, "slice": z, "organ": organ}


def slice_memory_from_dataset(model: LiteMedSAM, data: str, case_ids: Sequence[str] | None = None, per_organ: int = 3,
                              settings: MemorySettings = MemorySettings(), description: str = "",
                              progress: bool = True) -> SliceMemory:
    """A memory of the organs of a labelled dataset folder (nnU-Net / MSD or BCV layout): ``per_organ`` slices of
    each organ of each case, prompted by their reference boxes."""
    from tqdm import tqdm

    from ...data.datasets import select_cases
    from ...io import read_volume

    cases = select_cases(data, list(case_ids) if case_ids else None)
    volumes = ((c.case_id, read_volume(c.image), read_volume(c.label, kind="label")) for c in cases)
    bar = tqdm(desc="building memory", unit="example", disable=not progress)
    memory = build_slice_memory(model, dataset_examples(model, volumes, per_organ, settings.box_margin_mm), settings,
                                description, bar.update)
    bar.close()
    memory.metadata.update({"data": str(data), "cases": [c.case_id for c in cases], "slices_per_organ": per_organ})
    return memory
