"""Where a model's checkpoint file comes from: the bundled registry, a download cache, or a file the user imports.

The registry (``Resources/Models/models.json``) names every model the product
knows with the SHA256 of its file. A registered file is used where it lies
(the bundled demo model works offline); a registered model whose entry has a
``url`` and whose file is not bundled is downloaded once into the cache and
checked against its SHA256; a hospital without internet copies the file over
by hand and imports it (:func:`import_checkpoint`), which puts a file that
matches a registered SHA256 into the cache under that model's name.

The cache is ``$FINESEG_CACHE`` or the platform's user cache folder
(``~/.cache/FINESegmentation`` on Linux), so the command line, scripts and
3D Slicer share one copy of each download.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import RegistryEntry, read_checkpoint, read_registry, sha256_of
from .errors import CancelledError, CheckpointError

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The folder downloaded and imported checkpoints are kept in (created on first write)."""
    override = os.environ.get("FINESEG_CACHE")
    if override:
        return Path(override).expanduser() / "models"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "FINESegmentation" / "models"


@dataclass(frozen=True)
class ModelChoice:
    """A model as a user picks it: ``name`` is what the engine takes (registered name or checkpoint path)."""

    name: str
    label: str
    available: bool  # usable now without a download
    description: str = ""


@dataclass(frozen=True)
class DownloadProgress:
    """What a progress callback receives while a checkpoint downloads."""

    model: str
    done_bytes: int
    total_bytes: int  # 0 when the server does not say

    def __str__(self) -> str:
        done = self.done_bytes / 2**20
        if self.total_bytes:
            return f"Downloading model {self.model}: {done:.0f} of {self.total_bytes / 2**20:.0f} MB"
        return f"Downloading model {self.model}: {done:.0f} MB"


def model_choices(cache: Path | None = None, registry: dict[str, RegistryEntry] | None = None) -> list[ModelChoice]:
    """Every registered model, in registry order, saying whether it is ready, will download, or must be imported."""
    cache = cache or cache_dir()
    registry = read_registry() if registry is None else registry
    choices = []
    for entry in registry.values():
        if entry.path.is_file() or (cache / entry.file).is_file():
            choices.append(ModelChoice(entry.name, entry.name, True, entry.description))
        elif entry.url:
            choices.append(ModelChoice(entry.name, f"{entry.name} (downloads on first use)", False, entry.description))
        else:
            choices.append(ModelChoice(entry.name, f"{entry.name} (not installed: import its file)", False, entry.description))
    return choices


def local_checkpoint(name_or_path: str | os.PathLike, cache: Path | None = None,
                     progress: Callable[[DownloadProgress], None] | None = None,
                     cancel: threading.Event | None = None, kind: str = "fine") -> tuple[Path, str | None]:
    """(file, expected SHA256 or None) of a registered model name or a checkpoint path, downloading if needed.

    A cached file is checked against the registered SHA256 every time it is handed
    out, so a damaged or altered cache entry is never loaded; it is downloaded again
    when the entry has a ``url``. ``kind`` picks the registry entries searched
    (``"fine"``, ``"refiner"`` or ``"refiner-memory"``).
    """
    cache = cache or cache_dir()
    registry = read_registry(kind=kind)
    key = str(name_or_path)
    entry = registry.get(key)
    if entry is None:
        path = Path(key).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(registry)) or "none registered"
            raise CheckpointError(f"Unknown model '{key}': give a registered model name ({known}) or the path of a checkpoint file.")
        return path, None
    if entry.path.is_file():
        return entry.path, entry.sha256
    cached = cache / entry.file
    if cached.is_file():
        if sha256_of(cached) == entry.sha256.lower():
            return cached, entry.sha256
        if not entry.url:
            raise CheckpointError(
                f"The cached file of model '{key}' ({cached}) does not match its registered SHA256; import the file again."
            )
    if not entry.url:
        raise CheckpointError(
            f"Model '{key}' is not installed and has no download address; import its checkpoint file "
            "(Load checkpoint... in 3D Slicer)."
        )
    download(entry.url, cached, entry.sha256, key, progress, cancel)
    return cached, entry.sha256


def download(url: str, target: Path, sha256: str, model: str = "",
             progress: Callable[[DownloadProgress], None] | None = None,
             cancel: threading.Event | None = None) -> Path:
    """Fetch ``url`` into ``target``, all or nothing: the file appears only when its SHA256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while block := response.read(_CHUNK):
                if cancel is not None and cancel.is_set():
                    raise CancelledError(f"The download of model {model or url} was cancelled; nothing was kept.")
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(DownloadProgress(model or target.name, done, total))
        if digest.hexdigest() != sha256.lower():
            raise CheckpointError(
                f"The file downloaded from {url} does not match the registered SHA256 of model {model or target.name}, "
                "so it was discarded; try again later, or import a copy of the file."
            )
        os.replace(partial, target)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise CheckpointError(
            f"Cannot download model {model or target.name} from {url} ({reason}); check the internet connection, "
            "or fetch the file on another computer and import it."
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def import_checkpoint(path: str | os.PathLike, cache: Path | None = None) -> str:
    """Make a checkpoint file the user has usable; returns the model name to use from now on.

    A file whose SHA256 is a registered model's is copied into the cache, so that the
    registered name works from then on, offline. Any other file must be a loadable FINE
    checkpoint; it is used where it lies and its path is returned.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise CheckpointError(f"{source} does not exist; choose a FINE checkpoint file (.pt).")
    sha = sha256_of(source)
    for entry in read_registry().values():
        if entry.sha256.lower() != sha:
            continue
        if not entry.path.is_file():
            target = (cache or cache_dir()) / entry.file
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
            try:
                shutil.copyfile(source, partial)
                os.replace(partial, target)
            except OSError as exc:
                raise CheckpointError(f"Cannot copy {source} into the model cache {target.parent} ({exc.strerror}); free some disk space or set FINESEG_CACHE.") from None
            finally:
                partial.unlink(missing_ok=True)
        return entry.name
    read_checkpoint(source)
    return str(source)
