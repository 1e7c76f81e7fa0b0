"""Datasets on disk and their preparation for training and evaluation.

Two layouts are read:

* nnU-Net / Medical Segmentation Decathlon: ``imagesTr/<case>_0000.nii.gz`` (or
  ``<case>.nii.gz``), ``labelsTr/<case>.nii.gz`` and a ``dataset.json``; the
  ``training`` list of the MSD format is used when present, else files are paired by name.
* BCV / Synapse (as distributed): ``img/img0001.nii.gz`` + ``label/label0001.nii.gz``
  (optionally under ``Training/`` or ``RawData/Training/``).

Label values are mapped to the project's organs (``labels.ORGANS``) with a
``label_map`` {file value: organ value}; unmapped values become background.
``LABEL_MAPS["bcv"]`` maps the 13 BCV labels.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..checkpoints import Preprocessing
from ..errors import InputError
from ..io import read_volume, volume_to_sitk
from ..preprocessing import prepare
from ..volume import Volume

logger = logging.getLogger(__name__)

LABEL_MAPS: dict[str, dict[int, int]] = {
    "identity": {v: v for v in range(1, 9)},
    # BCV: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
    # 8 aorta, 9 IVC, 10 portal and splenic vein, 11 pancreas, 12/13 adrenal glands.
    "bcv": {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8},
}


def parse_label_map(text: str) -> dict[int, int]:
    """``bcv``, ``identity`` or ``"6:5,7:6,..."`` (file value : organ value)."""
    if text in LABEL_MAPS:
        return dict(LABEL_MAPS[text])
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        mapping = {int(a): int(b) for a, b in pairs}
    except ValueError:
        raise InputError(f"Cannot read the label map '{text}'; use bcv, identity or pairs like 6:5,7:6.") from None
    if not mapping or any(not 0 <= v <= 8 for v in mapping.values()):
        raise InputError(f"The label map '{text}' must map file values to organ values 0..8.")
    return mapping


@dataclass(frozen=True)
class CaseFiles:
    case_id: str
    image: Path
    label: Path


def _strip(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(root: str | Path) -> list[CaseFiles]:
    """The labelled cases of a dataset folder in either supported layout, sorted by case id."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"The dataset folder {root} does not exist; give the folder that holds imagesTr/labelsTr or img/label.")
    cases: list[CaseFiles] = []
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        meta = root / "dataset.json"
        entries = json.loads(meta.read_text()).get("training") if meta.is_file() else None
        if entries:
            for e in entries:
                label = (root / e["label"]).resolve()
                image = (root / e["image"]).resolve()
                if not image.exists():  # nnU-Net v2 adds the channel suffix to image files
                    image = image.with_name(_strip(image.name) + "_0000" + image.name[len(_strip(image.name)):])
                cases.append(CaseFiles(_strip(label.name), image, label))
        else:
            for label in sorted((root / "labelsTr").iterdir()):
                cid = _strip(label.name)
                matches = [p for p in (root / "imagesTr").iterdir() if _strip(p.name) in (cid, f"{cid}_0000")]
                if matches:
                    cases.append(CaseFiles(cid, matches[0], label))
    else:
        for base in (root, root / "Training", root / "RawData" / "Training"):
            if (base / "img").is_dir() and (base / "label").is_dir():
                for image in sorted((base / "img").iterdir()):
                    cid = _strip(image.name).replace("img", "", 1)
                    label = base / "label" / image.name.replace("img", "label", 1)
                    if label.exists():
                        cases.append(CaseFiles(cid, image, label))
                break
    if not cases:
        raise InputError(f"No labelled cases found in {root}; expected imagesTr/ + labelsTr/ (nnU-Net, MSD) or img/ + label/ (BCV).")
    missing = [c.image for c in cases if not c.image.exists()]
    if missing:
        raise InputError(f"The dataset lists {len(missing)} image file(s) that do not exist, e.g. {missing[0]}.")
    return sorted(cases, key=lambda c: c.case_id)


@dataclass
class PreparedCase:
    """A case on the network's grid: z-scored image and organ labels, both [z, y, x]."""

    case_id: str
    image: np.ndarray  # float32
    label: np.ndarray  # uint8, organ values
    info: dict



def find_training_cases(folders: str | Path | list[str | Path]) -> list[CaseFiles]:
    """The labelled cases of one dataset folder, or of several in the given order.

    With several folders each case id is prefixed with its folder's name (``synth-train/synth_0000``), so
    cases of the same name in two sets stay apart and ``--hold-out`` can name either; the folders' names must
    differ.
    """
    if isinstance(folders, (str, Path)):
        return find_cases(folders)
    folders = [Path(f) for f in folders]
    if len(folders) == 1:
        return find_cases(folders[0])
    names = [f.resolve().name for f in folders]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"Two dataset folders are named {repeated[0]}; give folders with different names "
                         "(their case ids are prefixed with the folder's name).")
    return [replace(c, case_id=f"{name}/{c.case_id}") for folder, name in zip(folders, names) for c in find_cases(folder)]


def select_cases(root: str | Path, case_ids: list[str] | None = None) -> list[CaseFiles]:
    """The dataset's cases, or only the listed ones (every listed id must exist)."""
    cases = find_cases(root)
    if case_ids:
        unknown = set(case_ids) - {c.case_id for c in cases}
        if unknown:
            raise InputError(f"Cases not in {root}: {', '.join(sorted(unknown))}.")
        cases = [c for c in cases if c.case_id in set(case_ids)]
    return cases

def map_labels(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(int(label.max()), max(mapping)) + 1, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[label.astype(np.int64)]


def prepare_case(case_id: str, image: Volume, label: Volume, pre: Preprocessing, mapping: dict[int, int] | None = None) -> PreparedCase:
    """Resample an image (linear) and its labels (nearest) onto the network's grid."""
    prepared = prepare(image, pre)
    lab = map_labels(label.array, mapping or LABEL_MAPS["identity"])
    lab_image = sitk.DICOMOrient(volume_to_sitk(Volume(lab, label.geometry)), pre.orientation)
    resampled = sitk.Resample(lab_image, prepared.grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return PreparedCase(case_id, prepared.array, sitk.GetArrayFromImage(resampled), {"shape": list(prepared.array.shape)})


def load_prepared(cases: list[CaseFiles], pre: Preprocessing, mapping: dict[int, int] | None = None, progress: bool = True) -> list[PreparedCase]:
    """Read and prepare every case (kept in memory: at the network's spacing a case is a few MB)."""
    from tqdm import tqdm

    out = []
    for c in tqdm(cases, desc="preparing cases", unit="case", disable=not progress):
        out.append(prepare_case(c.case_id, read_volume(c.image), read_volume(c.label, kind="label"), pre, mapping))
    return out


def largest_in_plane_size(cases: list[PreparedCase]) -> tuple[int, int]:
    """(y, x) of the largest prepared volume: it sets the volume-token grid (FINE's 'largest training volume')."""
    return (max(c.image.shape[1] for c in cases), max(c.image.shape[2] for c in cases))
