"""The external memory of Memorizing SAM: keys and values of labelled examples, found again by kNN.

For every stored example (a labelled training crop centred on one organ) the memory
holds the keys and values of the memory block's attention, (H, N, d) each, and a
compact descriptor of the crop (:meth:`.image_encoder.ImageEncoder3D.descriptor`).
A query crop's descriptor retrieves the ``k`` nearest examples (Euclidean distance,
exact search with ``torch.cdist``: a few hundred entries need no index), and their
keys and values enter the memory block weighted by :func:`distance_weights`.

The memory is a file of its own (``torch.save`` of tensors and plain data, loaded
with ``weights_only=True``, a format marker, and a SHA256 when it is registered),
loaded once and held in RAM; the authors' code re-reads the keys and values from
disk on every call. It records a fingerprint of the refiner weights that computed
it, since keys and values from other weights mean nothing to a refiner.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointError

FORMAT = "FINESegmentation refiner memory"
FORMAT_VERSION = 1


@dataclass
class RetrievedMemory:
    """What the memory block reads for a batch of B crops: K retrieved examples each.

    keys, values: (B, K, H, N, d); weights: (B, K), summing to 1 over K;
    indices, distances: (B, K) (indices into the memory, or into the batch when training).
    """

    keys: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor


def distance_weights(distances: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Inverse-distance weights, normalised over the last axis: nearer examples weigh more.

    distances: (..., K) >= 0 -> weights (..., K). (The authors' code uses d_j / sum_i (0.7 / d_i),
    which grows with distance; ``eps`` keeps an exact match from taking all the weight as 1/0.)
    """
    inverse = 1.0 / (distances.clamp_min(0) + eps)
    return inverse / inverse.sum(dim=-1, keepdim=True)


def memory_attention(q: torch.Tensor, memory: RetrievedMemory) -> torch.Tensor:
    """sum_j w_j softmax(Q K_j^T / sqrt(d)) V_j.

    q: (B, H, N, d); memory.keys / values: (B, K, H, M, d); memory.weights: (B, K).
    Returns (B, H, N, d).
    """
    b, k, h, m, d = memory.keys.shape
    n = q.shape[2]
    queries = q.unsqueeze(1).expand(b, k, h, n, d).reshape(b * k, h, n, d)
    per_example = F.scaled_dot_product_attention(
        queries, memory.keys.reshape(b * k, h, m, d).to(q.dtype), memory.values.reshape(b * k, h, m, d).to(q.dtype)
    ).reshape(b, k, h, n, d)
    return torch.einsum("bk,bkhnd->bhnd", memory.weights.to(q.dtype), per_example)


def fuse(local: torch.Tensor, remembered: torch.Tensor, local_ratio: float) -> torch.Tensor:
    """The paper's fusion by a preset local ratio: ``r * local + (1 - r) * memory`` (any matching shapes)."""
    return local_ratio * local + (1.0 - local_ratio) * remembered


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA256 over a model's parameters and buffers, in name order (independent of file encoding)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ExternalMemory:
    """M stored examples: descriptors (M, D) float32; keys, values (M, H, N, d) float16; one dict per example."""

    descriptors: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    examples: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact kNN: query (B, D) -> (distances (B, k'), indices (B, k')), nearest first, k' = min(k, M)."""
        distances = torch.cdist(query.float(), self.descriptors.float())
        found = torch.topk(distances, min(k, len(self)), dim=1, largest=False)
        return found.values, found.indices

    def retrieve(self, query: torch.Tensor, k: int) -> RetrievedMemory:
        """The k nearest examples of each query descriptor (B, D), ready for the memory block (float32)."""
        distances, indices = self.search(query, k)
        return RetrievedMemory(
            keys=self.keys[indices].float(), values=self.values[indices].float(),
            weights=distance_weights(distances), indices=indices, distances=distances,
        )

    def save(self, path: str | os.PathLike) -> str:
        """Write the memory atomically; returns the file's SHA256."""
        from ..checkpoints import write_payload

        return write_payload(path, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata": self.metadata,
            "examples": self.examples,
            "descriptors": self.descriptors.float().contiguous(),
            "keys": self.keys.half().contiguous(),
            "values": self.values.half().contiguous(),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None = None) -> "ExternalMemory":
        """Read a memory file (SHA256 check when given, weights-only load, format and shape checks)."""
        from ..checkpoints import read_checkpoint

        payload = read_checkpoint(path, sha256, format=FORMAT, format_version=FORMAT_VERSION, what="refiner memory file")
        try:
            memory = cls(payload["descriptors"], payload["keys"], payload["values"], list(payload["examples"]), dict(payload["metadata"]))
            m = len(memory)
            consistent = (
                memory.descriptors.ndim == 2 and memory.keys.ndim == 4 and memory.keys.shape == memory.values.shape
                and memory.keys.shape[0] == m and len(memory.examples) == m and m > 0
            )
        except (KeyError, TypeError, AttributeError, IndexError):
            consistent = False
        if not consistent:
            raise CheckpointError(f"{path} is a damaged refiner memory file: its tensors do not fit together; build it again with fine-seg refiner-memory.")
        return memory

    def check_compatible(self, model: torch.nn.Module, fingerprint: str | None = None) -> None:
        """Refuse a memory built by other refiner weights (their keys and values would be meaningless)."""
        expected = self.metadata.get("refiner_fingerprint")
        if expected != (fingerprint or weights_fingerprint(model)):
            raise CheckpointError(
                f"This memory was built with another refiner ({self.metadata.get('refiner', 'unknown')}); "
                "build a memory for this refiner with fine-seg refiner-memory, or run without memory."
            )


def build_memory(model, crops: Sequence[tuple[torch.Tensor, dict[str, Any]]], description: str = "",
                 progress: Callable[[int, int], None] | None = None, refiner_name: str = "") -> ExternalMemory:
    """Run the encoder's first blocks on labelled crops and keep their keys, values and descriptors.

    crops: (image (1, 1, S, S, S) normalised crop, example info) pairs, each crop centred on one
    labelled organ as :func:`.crop.crop_for_segment` places it at inference.
    """
    descriptors, keys, values, examples = [], [], [], []
    model.eval()
    with torch.inference_mode():
        for i, (image, info) in enumerate(crops):
            tokens = model.image_encoder.prefix(image)
            k, v = model.image_encoder.plugin_kv(tokens)
            descriptors.append(model.image_encoder.descriptor(tokens)[0])
            keys.append(k[0])
            values.append(v[0])
            examples.append(dict(info))
            if progress is not None:
                progress(i + 1, len(crops))
    if not examples:
        raise CheckpointError("No labelled example was found to build the memory from; give a dataset with organ labels.")
    return ExternalMemory(
        torch.stack(descriptors), torch.stack(keys).half(), torch.stack(values).half(), examples,
        {
            "refiner": refiner_name,
            "refiner_fingerprint": weights_fingerprint(model),
            "config": model.config.to_dict(),
            "description": description,
            "examples": len(examples),
        },
    )


def memory_from_dataset(model, data: str, case_ids: Sequence[str] | None = None, description: str = "",
                        refiner_name: str = "", progress: bool = True) -> ExternalMemory:
    """A memory of every organ of every labelled case of a dataset folder (one crop per organ, placed as at inference)."""
    from tqdm import tqdm

    from ..data.datasets import select_cases
    from ..io import read_volume
    from .crop import organ_crops

    cases = select_cases(data, case_ids)
    crops = []
    for c in tqdm(cases, desc="cropping cases", unit="case", disable=not progress):
        for crop in organ_crops(c.case_id, read_volume(c.image), read_volume(c.label, kind="label"), model.config, None):
            image = torch.from_numpy(crop.image.astype("float32"))[None, None]
            crops.append((image, {"case": crop.case_id, "organ": int(crop.organ)}))
    bar = tqdm(total=len(crops), desc="building memory", unit="example", disable=not progress)
    memory = build_memory(model, crops, description, lambda done, total: bar.update(1), refiner_name)
    bar.close()
    memory.metadata["data"] = str(data)
    return memory
