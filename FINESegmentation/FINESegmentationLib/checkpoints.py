"""FINE checkpoints: one file per model holding the weights and everything needed to use them.

A checkpoint is a ``torch.save``'d dict of tensors and plain data only, so it loads
with ``torch.load(weights_only=True)`` (no code runs on load). The registry
``Resources/Models/models.json`` lists the models the product knows, each with
the SHA256 of its file; a file that does not match is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .labels import CLASS_NAMES
from .model import FINE, FINEConfig
from .resources import models_dir, registry_path

FORMAT = "FINESegmentation checkpoint"
FORMAT_VERSION = 1


@dataclass
class Preprocessing:
    """How a CT is prepared for the network: reorient, resample, clip and z-score."""

    target_spacing: tuple[float, float, float] = (0.758, 0.758, 3.0)  # (x, y, z) mm, BCV plans
    orientation: str = "LPS"  # ITK orientation code the network sees (i, j, k axes towards L, P, S)
    clip: tuple[float, float] = (-958.0, 326.0)  # HU
    mean: float = 82.95
    std: float = 136.95


@dataclass
class ModelInfo:
    """Everything a checkpoint says about its model besides the weights."""

    config: FINEConfig
    class_names: tuple[str, ...] = CLASS_NAMES
    label_values: tuple[int, ...] = tuple(range(len(CLASS_NAMES)))
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    training: dict[str, Any] = field(default_factory=dict)  # data, epochs, seed, metrics, ...
    description: str = ""
    clinical_use: bool = False

    def to_dict(self) -> dict[str, Any]:
        grid = FINE.grid_of(self.config)
        return {
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "label_values": list(self.label_values),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.preprocessing).items()},
            "volume_grid": {"cells_yx": list(grid.grid), "crop_yx": list(grid.crop), "max_size_yx": list(grid.max_size)},
            "training": self.training,
            "description": self.description,
            "clinical_use": self.clinical_use,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        pre = data.get("preprocessing", {})
        return cls(
            config=FINEConfig.from_dict(data["config"]),
            class_names=tuple(data["class_names"]),
            label_values=tuple(int(v) for v in data["label_values"]),
            preprocessing=Preprocessing(
                target_spacing=tuple(pre["target_spacing"]), orientation=pre["orientation"],
                clip=tuple(pre["clip"]), mean=float(pre["mean"]), std=float(pre["std"]),
            ),
            training=dict(data.get("training", {})),
            description=str(data.get("description", "")),
            clinical_use=bool(data.get("clinical_use", False)),
        )


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: FINE, info: ModelInfo, extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` and ``info`` atomically (temp file + rename); returns the file's SHA256.

    ``extra`` holds further weights-only-safe entries (optimizer state, epoch) for resuming training.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": info.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload["extra"] = extra
    return write_payload(path, payload)


def write_payload(path: str | os.PathLike, payload: dict[str, Any]) -> str:
    """``torch.save`` a weights-only-safe dict atomically (temp folder + rename); returns the file's SHA256.

    The file is saved under its final name inside a temporary folder beside it, because ``torch.save``
    names the archive's inner folder after the file: a random temporary name would make the same
    weights give a different SHA256 on every save."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = folder / path.name
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # a model file is meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        folder.rmdir()
    return sha256_of(path)


def load_verified(path: str | os.PathLike, sha256: str | None, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a file that exists and, when ``sha256`` is given, matches it.

    ``what`` names the file in the one-sentence errors (e.g. "FINE checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what[0].upper()}{what[1:]} {path} does not exist; give the path of a {what} file or a registered model name.")
    if sha256 is not None and sha256_of(path) != sha256.lower():
        raise CheckpointError(
            f"{what[0].upper()}{what[1:]} {path} does not match its registered SHA256, so it is damaged or was altered; copy or download it again."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a {what} that can be loaded safely ({reason[:120]}).") from None


def read_checkpoint(path: str | os.PathLike, sha256: str | None = None, *, format: str = FORMAT,
                    format_version: int = FORMAT_VERSION, what: str = "FINE checkpoint") -> dict[str, Any]:
    """The raw checkpoint dict, after the SHA256 check (when one is given) and format checks.

    ``format``, ``format_version`` and ``what`` (its name in messages) let other files of the
    product (refiner checkpoints, refiner memories) share these checks.
    """
    path = Path(path)
    payload = load_verified(path, sha256, what)
    if not isinstance(payload, dict) or payload.get("format") != format:
        raise CheckpointError(f"{path} is not a {what} (it lacks the {format} format marker).")
    if payload.get("format_version") != format_version:
        raise CheckpointError(f"{path} has {what} format version {payload.get('format_version')}; this version of FINESegmentation reads version {format_version}.")
    return payload


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None, device: str | torch.device = "cpu") -> tuple[FINE, ModelInfo]:
    """Load a FINE model (in eval mode) and its metadata; refuse anything that does not check out."""
    payload = read_checkpoint(path, sha256)
    try:
        info = ModelInfo.from_dict(payload["metadata"])
        model = FINE(info.config)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is a damaged FINE checkpoint: its metadata or weights do not fit ({str(exc).splitlines()[0][:120]}).") from None
    return model.to(device).eval(), info


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    file: str
    sha256: str
    description: str = ""
    url: str = ""
    kind: str = "fine"  # "fine" (a FINE segmentation model), "refiner", "refiner-memory" or "refiner-2d"
    memory: str = ""  # a refiner's default memory: the name of a "refiner-memory" entry
    licence: str = ""  # the licence of third-party weights: a file beside models.json
    source: str = ""  # where third-party weights come from
    folder: Path = field(default_factory=models_dir)  # where ``file`` lies: the registry's folder

    @property
    def path(self) -> Path:
        return self.folder / self.file


def read_registry(path: str | os.PathLike | None = None, kind: str = "fine") -> dict[str, RegistryEntry]:
    """Files of one ``kind`` listed in ``models.json``, by name (entries without a kind are FINE models)."""
    path = Path(path) if path is not None else registry_path()
    try:
        data = json.loads(path.read_text())
        entries = (RegistryEntry(**m, folder=path.parent) for m in data["models"])
        return {e.name: e for e in entries if e.kind == kind}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"The model registry {path} cannot be read ({exc}); reinstall FINESegmentation.") from None


def resolve_model(name_or_path: str | os.PathLike, registry: dict[str, RegistryEntry] | None = None) -> tuple[Path, str | None]:
    """(file, expected SHA256 or None) for a registered model name or a checkpoint path.

    A path that is also a registered model's file is checked against its registered SHA256.
    """
    registry = read_registry() if registry is None else registry
    key = str(name_or_path)
    if key in registry:
        entry = registry[key]
        if not entry.path.is_file():
            raise CheckpointError(f"Model '{key}' is registered but its file {entry.path} is missing; reinstall FINESegmentation or import the file.")
        return entry.path, entry.sha256
    path = Path(key).expanduser()
    if path.is_file():
        for entry in registry.values():
            if entry.path.is_file() and entry.path.resolve() == path.resolve():
                return path, entry.sha256
        return path, None
    known = ", ".join(sorted(registry)) or "none registered"
    raise CheckpointError(f"Unknown model '{key}': give a registered model name ({known}) or the path of a checkpoint file.")


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FINE, ModelInfo]:
    """Resolve, verify and load a model by registry name or path."""
    path, sha = resolve_model(name_or_path)
    return load_checkpoint(path, sha, device)


def average_checkpoints(models: list[str | os.PathLike], out: str | os.PathLike, description: str | None = None) -> str:
    """Write the average of the weights of FINE checkpoints to ``out``; returns its SHA256.

    Averaging weights (a "model soup", Wortsman et al. 2022) suits models fine-tuned from one parent on
    different data: one model as cheap to run as each of them. ``models`` are registered names or paths,
    each verified as ``load_model`` does; they must share the architecture, classes and preprocessing.
    Floating-point weights are averaged; integer buffers (FINE's count of the volume-grid cells seen in
    training) take their element-wise maximum. The result records every source (file, SHA256, training)
    and, unless ``description`` is given, the first model's description. Written atomically."""
    if len(models) < 2:
        raise CheckpointError("Give at least two checkpoints to average.")
    out = Path(out)
    if not out.parent.is_dir():
        raise CheckpointError(f"The folder of {out} does not exist; create it first.")
    loaded = []
    for name in models:
        path, sha = resolve_model(name)
        model, info = load_checkpoint(path, sha)
        loaded.append((path, info, model.state_dict()))
    first_path, first, _ = loaded[0]
    for path, info, _ in loaded[1:]:
        for what, a, b in (("architecture", first.config.to_dict(), info.config.to_dict()),
                           ("classes", (first.class_names, first.label_values), (info.class_names, info.label_values)),
                           ("preprocessing", asdict(first.preprocessing), asdict(info.preprocessing))):
            if a != b:
                raise CheckpointError(f"{path} has another {what} than {first_path}; only models of one architecture, classes and preprocessing can be averaged.")
    averaged = {}
    for key, value in loaded[0][2].items():
        stack = torch.stack([weights[key] for _, _, weights in loaded])
        averaged[key] = stack.double().mean(0).to(value.dtype) if value.is_floating_point() else stack.amax(0)
    sources = [{"file": path.name, "sha256": sha256_of(path), "description": info.description, "training": info.training}
               for path, info, _ in loaded]
    model = FINE(first.config)
    model.load_state_dict(averaged, strict=True)
    info = ModelInfo(config=first.config, class_names=first.class_names, label_values=first.label_values,
                     preprocessing=first.preprocessing, training={"average_of": sources},
                     description=first.description if description is None else description, clinical_use=False)
    return save_checkpoint(out, model, info)
