"""Where the product's resources live (UI, icons, model registry, bundled models).

They sit in ``Resources/`` at the top of the checkout, beside the ``FINESegmentation/``
module folder, so an editable install, the Slicer extension build and Slicer's
"Additional module paths" all find them. ``FINESEG_RESOURCES`` overrides the location.
"""
from __future__ import annotations

import os
from pathlib import Path


def resources_dir() -> Path:
    override = os.environ.get("FINESEG_RESOURCES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "Resources"


def models_dir() -> Path:
    return resources_dir() / "Models"


def registry_path() -> Path:
    return models_dir() / "models.json"
