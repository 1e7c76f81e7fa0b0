"""The refiner's builder and checkpoints (segment-anything's ``build_sam`` shape); configurations in ``config.py``."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import CheckpointError
from .config import RefinerConfig, refiner_config
from .sam3d import MemorizingSAM3D


def build_refiner(config: RefinerConfig | str, **overrides: Any):
    """A :class:`~.sam3d.MemorizingSAM3D` with fresh weights for ``config`` (a name or a config)."""
    if isinstance(config, str):
        config = refiner_config(config, **overrides)
    elif overrides:
        config = replace(config, **overrides)
    return MemorizingSAM3D(config)


CHECKPOINT_FORMAT = "FINESegmentation refiner checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


def save_refiner(path, model, description: str, training: dict[str, Any] | None = None) -> str:
    """Write a refiner checkpoint atomically (weights-only-safe dict with a format marker); returns its SHA256."""
    from ..checkpoints import write_payload

    return write_payload(path, {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "metadata": {"config": model.config.to_dict(), "description": description, "clinical_use": False, "training": training or {}},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    })


def load_refiner(name_or_path=None, sha256: str | None = None):
    """(model in eval mode, metadata, registry entry or None) of a registered refiner name or a checkpoint path.

    ``None`` means the first registered refiner. A registered file is checked against its SHA256
    (and downloaded first when it is not bundled, as FINE models are).
    """
    from ..checkpoints import read_checkpoint, read_registry
    from ..weights import local_checkpoint

    registry = read_registry(kind="refiner")
    if name_or_path is None:
        if not registry:
            raise CheckpointError("No refiner is installed; give a refiner checkpoint file (--model PATH).")
        name_or_path = next(iter(registry))
    path, registered_sha = local_checkpoint(name_or_path, kind="refiner")
    payload = read_checkpoint(path, sha256 or registered_sha, format=CHECKPOINT_FORMAT,
                              format_version=CHECKPOINT_FORMAT_VERSION, what="refiner checkpoint")
    try:
        metadata = dict(payload["metadata"])
        model = build_refiner(RefinerConfig.from_dict(metadata["config"]))
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is a damaged refiner checkpoint: its metadata or weights do not fit ({str(exc).splitlines()[0][:120]}).") from None
    metadata["file"] = str(path)
    return model.eval(), metadata, registry.get(str(name_or_path))
