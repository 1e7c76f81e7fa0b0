"""Memorizing SAM in 3-D: image encoder with a memory plug-in, prompt encoder, mask decoder.

``encode`` runs once per crop (the expensive part) and ``decode`` once per click,
as in segment-anything. With ``memory`` (an :class:`.memory.ExternalMemory`) the
crop's descriptor retrieves ``config.knn`` stored examples whose keys and values the
memory block attends to; without it the encoder is a plain ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import RefinerConfig
from .image_encoder import ImageEncoder3D
from .mask_decoder import MaskDecoder3D
from .memory import ExternalMemory, RetrievedMemory
from .prompt_encoder import PromptEncoder3D


@dataclass
class Encoded:
    """What ``decode`` needs from one crop: embedding (B, C, G, G, G); the retrieval, if memory was used."""

    embedding: torch.Tensor
    retrieved: RetrievedMemory | None = None


class MemorizingSAM3D(nn.Module):
    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder3D(config)
        self.prompt_encoder = PromptEncoder3D(config)
        self.mask_decoder = MaskDecoder3D(config)

    def encode(self, image: torch.Tensor, memory: ExternalMemory | RetrievedMemory | None = None) -> Encoded:
        """image (B, 1, S, S, S) normalised crop -> :class:`Encoded`.

        ``memory``: an external memory to search, or an already retrieved one (training), or None.
        """
        tokens = self.image_encoder.prefix(image)
        retrieved = memory
        if isinstance(memory, ExternalMemory):
            retrieved = memory.retrieve(self.image_encoder.descriptor(tokens), self.config.knn)
        return Encoded(self.image_encoder.suffix(tokens, retrieved), retrieved)

    def decode(self, embedding: torch.Tensor, image: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               previous_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (B, C, G, G, G); image (B, 1, S, S, S); points (B, N, 3) crop voxel (x, y, z);
        labels (B, N) in {1, 0, -1}; previous_mask (B, 1, S, S, S) in [0, 1] or None.

        Returns mask logits (B, M, S, S, S) and predicted IoUs (B, M).
        """
        b = embedding.shape[0]
        clicks = self.prompt_encoder.click_maps(points, labels)
        sparse, dense = self.prompt_encoder(points, labels, previous_mask, b, clicks)
        mask_channel = previous_mask.float() if previous_mask is not None else torch.zeros_like(image)
        return self.mask_decoder(embedding, self.prompt_encoder.dense_pe(), sparse, dense, torch.cat([image, mask_channel, clicks], dim=1))

    def forward(self, image: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, previous_mask: torch.Tensor | None,
                memory: ExternalMemory | RetrievedMemory | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass, encoder and decoder: the shapes of :meth:`encode` and :meth:`decode`."""
        return self.decode(self.encode(image, memory).embedding, image, points, labels, previous_mask)
