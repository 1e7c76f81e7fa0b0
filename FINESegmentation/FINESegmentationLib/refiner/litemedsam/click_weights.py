"""The click-trained prompt encoder and mask decoder: a small file loaded over the bundled LiteMedSAM.

Fine-tuning for clicks leaves the image encoder as published, so the file holds only the
``prompt_encoder.*`` and ``mask_decoder.*`` weights (fp16, about 8 MB), the SHA256 of the LiteMedSAM
weights it was trained over, and what it was trained on. It is registered in ``models.json`` with kind
``refiner-2d-clicks``; loading checks its SHA256, reads it with ``weights_only=True``, requires exactly
the two parts' keys and shapes, and refuses a file made for other base weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from .build import LiteMedSAM, load_litemedsam

CLICKS_KIND = "refiner-2d-clicks"
DEFAULT_CLICK_WEIGHTS = "litemedsam-clicks"
FORMAT = "litemedsam-clicks"
FORMAT_VERSION = 1
PARTS = ("prompt_encoder", "mask_decoder")
WHAT = "LiteMedSAM click weights file"


def tuned_state(model: LiteMedSAM) -> dict[str, torch.Tensor]:
    """The prompt encoder's and mask decoder's weights, keyed as in LiteMedSAM's state dict."""
    return {f"{part}.{k}": v.detach().cpu() for part in PARTS for k, v in getattr(model, part).state_dict().items()}


def save_click_weights(model: LiteMedSAM, path: str | os.PathLike, base_sha256: str, metadata: dict[str, Any]) -> str:
    """Write the two tuned parts in fp16 atomically; returns the file's SHA256."""
    from ...checkpoints import write_payload

    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tuned_state(model).items()}
    return write_payload(Path(path), {"format": FORMAT, "format_version": FORMAT_VERSION, "base_sha256": base_sha256,
                                      "metadata": metadata, "state_dict": state})


def apply_click_weights(model: LiteMedSAM, payload: dict[str, Any], path: Path | str) -> None:
    """Load a click weights payload's two parts into ``model`` (fp32), refusing missing, extra or misshapen keys."""
    state = payload.get("state_dict")
    expected = tuned_state(model)
    if not isinstance(state, dict) or set(state) != set(expected) or \
            any(not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{path} does not hold LiteMedSAM's prompt encoder and mask decoder weights; train it again with fine-seg litemedsam-train.")
    for part in PARTS:
        prefix = f"{part}."
        getattr(model, part).load_state_dict({k[len(prefix):]: v.float() if v.is_floating_point() else v
                                              for k, v in state.items() if k.startswith(prefix)}, strict=True)


def load_litemedsam_clicks(name_or_path: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                           device: str | torch.device = "cpu") -> tuple[LiteMedSAM, Path]:
    """(LiteMedSAM with the click-trained prompt encoder and mask decoder, in eval mode; the click weights file).

    ``name_or_path``: a registered click weights name (default ``litemedsam-clicks``) or a file; ``base``:
    the LiteMedSAM weights under it (default: the bundled ones). A registered file must match its SHA256."""
    from ...checkpoints import read_checkpoint, sha256_of
    from ...weights import local_checkpoint

    path, registered = local_checkpoint(str(name_or_path or DEFAULT_CLICK_WEIGHTS), kind=CLICKS_KIND)
    payload = read_checkpoint(path, registered, format=FORMAT, format_version=FORMAT_VERSION, what=WHAT)
    model, base_path = load_litemedsam(base)
    base_sha = sha256_of(base_path)
    if payload.get("base_sha256") != base_sha:
        raise CheckpointError(
            f"{path} was trained over other LiteMedSAM weights than {base_path}; use it with the weights it was trained over "
            f"(sha256 {str(payload.get('base_sha256'))[:12]}...) or train it again."
        )
    apply_click_weights(model, payload, path)
    model.click_trained = True
    return model.to(device).eval(), path


def slice_weights(model: str | os.PathLike | None = None, registry: Any = None) -> tuple[str | None, bool]:
    """(weights to load, whether they are click-tuned) for ``model``: None means the first registered click-tuned
    weights (kind ``refiner-2d-clicks``) when there are any, else the published LiteMedSAM weights (None); a file
    is click-tuned when it is a click weights payload."""
    from ...checkpoints import read_registry

    clicks = list(read_registry(registry, kind=CLICKS_KIND))
    if model is None:
        return (clicks[0], True) if clicks else (None, False)
    if str(model) in clicks:
        return str(model), True
    path = Path(model).expanduser()
    if not path.is_file():
        from .build import KIND

        published = list(read_registry(registry, kind=KIND))
        if str(model) not in published:
            known = ", ".join(published + clicks) or "none registered"
            raise CheckpointError(f"Unknown LiteMedSAM weights '{model}': give a registered name ({known}) or the path of a weights file.")
        return str(model), False
    if path.stat().st_size < 64 * 2**20:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not readable here: load_litemedsam refuses it in one sentence
            return str(model), False
        return str(model), isinstance(payload, dict) and payload.get("format") == FORMAT
    return str(model), False


def load_slice_model(model: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LiteMedSAM:
    """LiteMedSAM for :class:`.predictor.SlicePredictor`: click-tuned (``click_trained`` True) or published weights,
    as :func:`slice_weights` chooses."""
    weights, tuned = slice_weights(model)
    if tuned:
        return load_litemedsam_clicks(weights, device=device)[0]
    return load_litemedsam(weights, device=device)[0]

