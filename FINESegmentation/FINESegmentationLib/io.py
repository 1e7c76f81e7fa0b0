"""Reading and writing CT volumes, label maps, probabilities and Slicer segmentations.

Every file the engine touches goes through this module, and SimpleITK images
become :class:`~FINESegmentationLib.volume.Volume` objects (and back) only in
:func:`volume_from_sitk` and :func:`volume_to_sitk`.

Conventions (those of :mod:`FINESegmentationLib.volume`):

* arrays are indexed ``[z, y, x]``; spacing and origin are ``(x, y, z)`` in mm;
  the direction matrix's columns are the x, y, z index axes; all in **LPS**,
  exactly as SimpleITK reports them (no RAS conversion happens here);
* slicerio (and pynrrd) index voxels ``[i, j, k] = [x, y, z]`` and place them
  with a 4x4 ``ijkToLPS`` matrix; the ``.seg.nrrd`` functions transpose at that
  boundary only.

Geometry precision: NRRD and MetaImage keep geometry to double precision;
NIfTI stores it in float32, so a NIfTI round trip moves the origin by up to
about 1e-5 mm.

Writers are atomic: they write a hidden temporary file with the same extension
in the target folder and rename it onto the target, so a failed or interrupted
write leaves neither a partial file nor a temporary one, and an existing file
is replaced only by a complete new one. Writers do not create folders: a
missing folder is an :class:`~FINESegmentationLib.errors.InputError`, so a
mistyped output path is reported instead of silently creating a tree.

Every error a user can cause is an :class:`InputError` carrying one sentence.
"""
from __future__ import annotations

import logging
import os
import secrets
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .labels import ORGANS, Organ
from .volume import Geometry, Volume

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SEGMENTATION_EXTENSION = ".seg.nrrd"
"""Slicer segmentation file, the product's default output."""

IMAGE_WRITE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
"""Single-file formats the image writers accept.

``.nhdr``/``.mhd`` are readable but not written: they are two files, which cannot be renamed atomically.
"""

SEGMENTATION_WRITE_EXTENSIONS: tuple[str, ...] = (SEGMENTATION_EXTENSION,) + IMAGE_WRITE_EXTENSIONS

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_READABLE_DESCRIPTION = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or DICOM folder"

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
"""SNOMED CT category of every organ segment, as Slicer's TotalSegmentator uses it."""


# --------------------------------------------------------------------------- conversion


def volume_from_sitk(image: sitk.Image) -> Volume:
    """The :class:`Volume` of a 3-D scalar SimpleITK image (array ``[z, y, x]``, dtype kept, geometry in LPS).

    Raises ``ValueError`` for images that are not 3-D scalar images; :func:`read_volume`
    checks files before calling this, so that only programming errors reach it.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"Expected a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel."
        )
    geometry = Geometry(spacing=image.GetSpacing(), origin=image.GetOrigin(), direction=image.GetDirection())
    return Volume(sitk.GetArrayFromImage(image), geometry)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """The SimpleITK image of ``volume`` (same voxels, spacing, origin and LPS direction).

    ``bool`` arrays become ``uint8`` and ``float16`` ones ``float32``, because SimpleITK
    has no pixel type for them (masks and half-precision heat maps are common).
    """
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(array, isVector=False)
    _set_geometry(image, volume.geometry)
    return image


def _set_geometry(image: sitk.Image, geometry: Geometry) -> None:
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)


# --------------------------------------------------------------------------- reading


def read_volume(path: PathLike, *, kind: Literal["image", "label"] = "image") -> Volume:
    """Read a 3-D volume from a NIfTI, NRRD or MetaImage file, or a folder holding a DICOM series.

    Geometry is kept as SimpleITK reports it (LPS). ``kind="image"`` returns a
    ``float32`` array and rejects NaN/inf voxels; ``kind="label"`` returns an
    integer array with the file's own integer type (``uint8``, ``int16``, ...);
    a label map stored as floats is accepted only if every value is a whole
    number, and is then returned as ``uint8`` (or ``int32`` if it does not fit).

    For a DICOM folder the series with the most files is read: those directly in the folder, or
    else those in its subfolders (an export's patient / study / series folders, up to
    ``DICOM_SEARCH_DEPTH`` levels down); when there are several, a warning names the one chosen.

    Raises :class:`InputError` (one sentence) for a missing path, a file that cannot
    be read, an image that is not a single-channel 3-D volume with at least two
    voxels along every axis, and non-finite image values.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}.")
    path = Path(path)
    _require_exists(path)
    image = _read_dicom_folder(path) if path.is_dir() else _read_image_file(path)
    try:
        volume = volume_from_sitk(image)
    except ValueError as error:
        reason = error.args[0].rstrip(".")
        raise InputError(f"{path} has an unusable geometry ({reason}); check or re-export the file.") from None
    volume = _as_image(volume, path) if kind == "image" else _as_label(volume, path)
    logger.info(
        "Read %s: %s voxels (x, y, z), spacing %s mm, %s.",
        path, volume.shape[::-1], tuple(round(s, 4) for s in volume.geometry.spacing), volume.array.dtype,
    )
    return volume


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path or choose another file.")


def _read_image_file(path: Path) -> sitk.Image:
    unreadable = InputError(
        f"Cannot read {path}: it is not a readable {_READABLE_DESCRIPTION}, or it is corrupt; "
        "check the file or export it again."
    )
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    # The header alone tells the layout, so a 4-D or colour file is refused before its voxels are loaded.
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        logger.debug("SimpleITK could not read the header of %s.", path, exc_info=True)
        raise unreadable from None
    _check_layout(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    try:
        return reader.Execute()
    except RuntimeError:
        # A truncated or damaged voxel block often passes the header read and fails only here.
        logger.debug("SimpleITK could not read the voxels of %s.", path, exc_info=True)
        raise unreadable from None


def dicom_series_ids(folder: PathLike) -> tuple[str, ...]:
    """The DICOM series directly in ``folder`` (none for a folder of other files)."""
    with _itk_warnings_off():
        # GDCM prints a warning to the console for a folder without DICOM; callers say it better.
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


# How deep below a given folder DICOM series are looked for (patient / study / series exports are 2-3 deep).
DICOM_SEARCH_DEPTH = 4


def find_dicom_series(folder: PathLike) -> list[tuple[Path, str, tuple[str, ...]]]:
    """The DICOM series directly in ``folder``; when there are none, every series in its subfolders
    (up to ``DICOM_SEARCH_DEPTH`` levels down, as exports nest patient / study / series folders), in
    path order: ``(folder, series id, files)``."""
    def series_in(directory: Path) -> list[tuple[Path, str, tuple[str, ...]]]:
        return [(directory, sid, tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), sid)))
                for sid in dicom_series_ids(directory)]

    def subfolders(directory: Path) -> list[Path]:
        try:
            return [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:  # unreadable (permissions): it holds nothing we can read
            return []

    folder = Path(folder)
    found = series_in(folder)
    if found:
        return found
    level = [folder]
    for _ in range(DICOM_SEARCH_DEPTH):
        level = sorted(p for d in level for p in subfolders(d))
        for directory in level:
            found.extend(series_in(directory))
    return found


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series = find_dicom_series(folder)
    if not series:
        raise InputError(
            f"{folder} is a folder with no DICOM series in it or in its subfolders; choose the folder that "
            "holds the CT's DICOM files, or a NIfTI, NRRD or MetaImage file."
        )
    where, chosen, files = max(series, key=lambda s: len(s[2]))
    if len(series) > 1:
        logger.warning(
            "%s holds %d DICOM series; reading series %s in %s (%d files), the one with the most files.",
            folder, len(series), chosen, where, len(files),
        )
    elif where != folder:
        logger.info("Reading the DICOM series %s in %s.", chosen, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        image = reader.Execute()
    except RuntimeError:
        logger.debug("SimpleITK could not read DICOM series %s in %s.", chosen, where, exc_info=True)
        raise InputError(
            f"Cannot read the DICOM series {chosen} in {where}: its files are damaged or not image slices; "
            "export the series again."
        ) from None
    _check_layout(folder, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    return image


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _check_layout(path: Path, dimension: int, size: Sequence[int], components: int) -> None:
    """Refuse anything but a single-channel 3-D volume with at least two voxels along each axis."""
    if components != 1:
        raise InputError(
            f"{path} is a multi-component (vector or colour) image with {components} values per voxel; "
            "FINE needs a single-channel 3-D CT volume."
        )
    if dimension < 3:
        raise InputError(f"{path} is a {dimension}-D image; FINE needs a 3-D CT volume.")
    shown = " x ".join(str(s) for s in size)
    if dimension > 3:
        raise InputError(
            f"{path} is a {dimension}-D image ({shown} voxels); FINE needs a single 3-D CT volume, "
            "so save one time point or channel as its own file."
        )
    if 0 in size:
        raise InputError(f"{path} is empty ({shown} voxels); choose a file that holds a CT volume.")
    if 1 in size:
        # One voxel thick along any axis is a 2-D image stored as 3-D; FINE's 3-D windows cannot use it.
        raise InputError(
            f"{path} is a single slice ({shown} voxels); FINE needs a 3-D CT volume with several slices."
        )


def _as_image(volume: Volume, path: Path) -> Volume:
    source_is_float = np.issubdtype(volume.array.dtype, np.floating)
    array = volume.array.astype(np.float32, copy=False)
    non_finite = 0
    # Counted after the cast, so float64 values too large for float32 (now inf) are caught as well.
    if source_is_float:
        non_finite += array.size - np.count_nonzero(np.isfinite(array))
    if path.is_file() and _extension(path) in _NIFTI_EXTENSIONS:
        non_finite += _nifti_non_finite_count(path)
    if non_finite:
        plural = "" if non_finite == 1 else "s"
        raise InputError(
            f"{path} has {non_finite} NaN or infinite voxel{plural}; "
            "fix or re-export the image so that every voxel holds a finite number."
        )
    return volume.with_array(array)


def _nifti_non_finite_count(path: Path) -> int:
    """NaN/inf voxels stored in a NIfTI file.

    ITK's NIfTI reader (ITK 5, so SimpleITK 2.x) silently replaces NaN and inf by 0,
    so the stored values are checked with nibabel; integer files cannot hold them.
    """
    import nibabel

    image = nibabel.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return 0
    stored = np.asanyarray(image.dataobj)
    return int(stored.size - np.count_nonzero(np.isfinite(stored)))


def _as_label(volume: Volume, path: Path) -> Volume:
    array = volume.array
    if np.issubdtype(array.dtype, np.integer):
        return volume
    whole = np.isfinite(array).all() and np.array_equal(array, np.round(array))
    if not whole:
        raise InputError(
            f"{path} is not a label map because it holds non-integer values; choose a label map of whole-number labels."
        )
    fits_uint8 = array.min() >= 0 and array.max() <= np.iinfo(np.uint8).max
    return volume.with_array(array.astype(np.uint8 if fits_uint8 else np.int32))


def read_segmentation(path: PathLike, organs: Sequence[Organ] = ORGANS) -> Volume:
    """Read organ labels from a Slicer ``.seg.nrrd`` or a plain label map; returns a ``uint8`` :class:`Volume`.

    In a ``.seg.nrrd`` each segment becomes the label value of the organ it matches:
    first by terminology (SNOMED CT type code, plus the laterality type modifier for
    paired organs), else by name (case-insensitive, ``_`` read as a space); segments
    matching no organ raise :class:`InputError` naming them. Overlapping segments
    (several layers) are flattened, later segments winning. A plain label map must
    already use the organs' label values; other values raise :class:`InputError`.
    """
    path = Path(path)
    _require_exists(path)
    if _extension(path) == SEGMENTATION_EXTENSION:
        return _read_slicer_segmentation(path, organs)
    volume = read_volume(path, kind="label")
    _check_label_values(volume.array, organs, f"{path} holds")
    return volume.with_array(volume.array.astype(_label_dtype(organs)))


def _read_slicer_segmentation(path: Path, organs: Sequence[Organ]) -> Volume:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception:
        # Any parser failure on a user's file is a problem with that file, whatever slicerio raised.
        logger.debug("slicerio could not read %s.", path, exc_info=True)
        raise InputError(
            f"Cannot read {path}: it is not a valid Slicer segmentation (.seg.nrrd) file; save it again from Slicer."
        ) from None
    voxels = segmentation["voxels"]
    if voxels.size == 1:
        # Slicer writes a single voxel for a segmentation with no image data; its geometry means nothing.
        raise InputError(
            f"{path} is an empty segmentation with no voxel data; choose a segmentation that contains organs."
        )

    segment_organs = [(segment, _organ_for_segment(segment, organs)) for segment in segmentation["segments"]]
    unknown = [segment.get("name", segment.get("id", "?")) for segment, organ in segment_organs if organ is None]
    if unknown:
        raise InputError(
            f"{path} has segments that are not organs FINE knows ({', '.join(repr(n) for n in unknown)}); "
            f"remove them or rename them to one of: {', '.join(o.name for o in organs)}."
        )
    # Fortran order like slicerio's voxels, so the masks below index memory in order and the
    # final transpose to [z, y, x] is C-contiguous without a copy.
    labels_ijk = np.zeros(voxels.shape[-3:], dtype=_label_dtype(organs), order="F")
    for segment, organ in segment_organs:
        labels_ijk[slicerio.segment_mask(segmentation, segment)] = organ.label
    try:
        geometry = _geometry_from_ijk_to_lps(segmentation["ijkToLPS"])
    except ValueError:
        raise InputError(
            f"{path} has a degenerate voxel grid (zero or non-finite spacing); save it again from Slicer."
        ) from None
    # slicerio's [i, j, k] = [x, y, z] order becomes the engine's [z, y, x].
    return Volume(labels_ijk.transpose(2, 1, 0), geometry)


def _geometry_from_ijk_to_lps(ijk_to_lps: np.ndarray) -> Geometry:
    matrix = np.asarray(ijk_to_lps, dtype=np.float64)
    scaled_axes = matrix[:3, :3]
    spacing = np.linalg.norm(scaled_axes, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        direction = scaled_axes / spacing
    return Geometry(spacing=tuple(spacing), origin=tuple(matrix[:3, 3]), direction=tuple(direction.ravel()))


def _organ_for_segment(segment: dict, organs: Sequence[Organ]) -> Organ | None:
    terminology = segment.get("terminology")
    if terminology:
        type_code = tuple(terminology["type"][:2])
        modifier = tuple(terminology["typeModifier"][:2]) if "typeModifier" in terminology else None
        for organ in organs:
            organ_modifier = ("SCT", organ.laterality_code) if organ.laterality_code else None
            if type_code == ("SCT", organ.snomed_code) and modifier == organ_modifier:
                return organ
    name = _normalised_name(segment.get("name", ""))
    return next((organ for organ in organs if _normalised_name(organ.name) == name), None)


def _normalised_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


# --------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: PathLike) -> Path:
    """Write ``volume`` (a float32 image, a heat map, ...) with its geometry.

    Formats: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``. The dtype is kept (except
    ``bool`` -> ``uint8``, ``float16`` -> ``float32``). Atomic; returns the path written.
    """
    image = volume_to_sitk(volume)
    return _write_atomically(path, IMAGE_WRITE_EXTENSIONS, partial(_write_sitk, image))


def write_probabilities(probabilities: np.ndarray, geometry: Geometry, path: PathLike) -> Path:
    """Write per-class probabilities ``[C, z, y, x]`` on the 3-D grid ``geometry`` as ``float32``.

    Layout by format:

    * ``.nii``/``.nii.gz``: a 4-D image with the class as the 4th (time) axis, so
      nibabel reads shape ``(x, y, z, C)``; the 4th axis has spacing 1 and origin 0.
    * ``.nrrd``/``.mha``: a 3-D image with one vector component per class
      (``kinds: vector domain domain domain``), which Slicer loads as a vector volume.

    Either way the 3-D spacing, origin and direction are those of ``geometry``. Atomic.
    """
    array = np.asarray(probabilities)
    if array.ndim != 4:
        raise ValueError(f"Probabilities must be [C, z, y, x], got an array of shape {array.shape}.")
    array = array.astype(np.float32, copy=False)
    path = Path(path)
    if _extension(path) in _NIFTI_EXTENSIONS:
        image = sitk.GetImageFromArray(array, isVector=False)
        direction = np.eye(4)
        direction[:3, :3] = geometry.direction_matrix
        image.SetSpacing(geometry.spacing + (1.0,))
        image.SetOrigin(geometry.origin + (0.0,))
        image.SetDirection(direction.ravel().tolist())
    else:
        image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
        _set_geometry(image, geometry)
    return _write_atomically(path, IMAGE_WRITE_EXTENSIONS, partial(_write_sitk, image))


def write_segmentation(labels: Volume, path: PathLike, organs: Sequence[Organ] = ORGANS) -> Path:
    """Write an organ label map; the format follows the extension. Atomic; returns the path written.

    * ``.seg.nrrd`` (the product's output): a Slicer segmentation written with slicerio,
      one segment per organ in ``organs`` (in that order) **even if the organ is absent**,
      so every file has the same predictable segment list. Each segment keeps the
      organ's label value, name and colour, and carries the SNOMED CT terminology of
      :func:`organ_terminology` (Slicer's ``Segment{i}_Tags`` ``TerminologyEntry``).
    * ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``: a plain label map written with SimpleITK.

    Both store ``uint8`` voxels (``uint16`` if an organ label exceeds 255) on the
    geometry of ``labels``. Values other than 0 and the organs' labels raise :class:`InputError`.
    """
    array = labels.array.view(np.uint8) if labels.array.dtype == np.bool_ else labels.array
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"A label map must hold integers, got {array.dtype} values; round or cast it before writing {path}."
        )
    _check_label_values(array, organs, "The label map holds")
    label_volume = labels.with_array(array.astype(_label_dtype(organs), copy=False))
    if _extension(Path(path)) == SEGMENTATION_EXTENSION:
        write = partial(_write_slicerio, _slicer_segmentation(label_volume, organs))
    else:
        write = partial(_write_sitk, volume_to_sitk(label_volume))
    return _write_atomically(path, SEGMENTATION_WRITE_EXTENSIONS, write)


def organ_terminology(organ: Organ) -> dict:
    """The organ's terminology as a slicerio segment ``"terminology"`` dict.

    Category "Anatomical Structure", type = the organ's SNOMED CT code, and for paired
    organs a type modifier holding the laterality, as Slicer's TotalSegmentator does.
    Each code is ``[coding scheme designator, code value, code meaning]``.
    """
    terminology = {
        "contextName": TERMINOLOGY_CONTEXT,
        "category": list(ANATOMICAL_STRUCTURE),
        "type": ["SCT", organ.snomed_code, organ.snomed_meaning],
    }
    if organ.laterality_code:
        terminology["typeModifier"] = ["SCT", organ.laterality_code, organ.laterality_meaning]
    terminology["anatomicContextName"] = ANATOMIC_CONTEXT
    return terminology


def terminology_entry(organ: Organ) -> str:
    """The organ's Slicer ``TerminologyEntry`` tag value, as written in ``Segment{i}_Tags`` of a ``.seg.nrrd``.

    Seven ``~``-separated fields: context, category, type, type modifier, anatomic
    context, anatomic region, anatomic region modifier; codes are ``scheme^value^meaning``
    and empty codes ``^^``. Also usable in Slicer itself: ``segment.SetTag("TerminologyEntry", ...)``.
    """
    def code(triple: Sequence[str] | None) -> str:
        return "^".join(triple) if triple else "^^"

    terminology = organ_terminology(organ)
    return "~".join([
        TERMINOLOGY_CONTEXT,
        code(terminology["category"]),
        code(terminology["type"]),
        code(terminology.get("typeModifier")),
        ANATOMIC_CONTEXT,
        code(None),
        code(None),
    ])


def _slicer_segmentation(labels: Volume, organs: Sequence[Organ]) -> dict:
    """The slicerio segmentation dict of a label volume: voxels ``[i, j, k]``, ``ijkToLPS``, one segment per organ."""
    # [z, y, x] -> slicerio's [i, j, k]: a view; pynrrd writes it in Fortran order, which is its memory order.
    voxels = labels.array.transpose(2, 1, 0)
    full_extent = [bound for size in voxels.shape for bound in (0, size - 1)]
    segments = [
        {
            "id": organ.name.replace(" ", "_"),
            "name": organ.name,
            # Not auto-generated, so Slicer keeps our names and colours when terminology changes.
            "nameAutoGenerated": False,
            "color": list(organ.color_float),
            "colorAutoGenerated": False,
            "labelValue": organ.label,
            "layer": 0,
            # Full extent for every segment, absent ones too: older Slicer versions crop a shared
            # layer to the extent of its first segment.
            "extent": full_extent,
            "terminology": organ_terminology(organ),
        }
        for organ in organs
    ]
    return {
        "voxels": voxels,
        "ijkToLPS": labels.geometry.ijk_to_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }


def _label_dtype(organs: Sequence[Organ]) -> type:
    return np.uint8 if max((o.label for o in organs), default=0) <= np.iinfo(np.uint8).max else np.uint16


def _check_label_values(array: np.ndarray, organs: Sequence[Organ], subject: str) -> None:
    """Raise InputError if ``array`` holds a value that is neither 0 nor an organ's label."""
    known = np.array(sorted({0} | {o.label for o in organs}))
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high <= known[-1]:
        # A lookup table is linear in the voxel count; np.unique would sort the whole volume.
        allowed = np.zeros(known[-1] + 1, dtype=bool)
        allowed[known] = True
        if allowed[array].all():
            return
    unknown = np.setdiff1d(np.unique(array), known)
    raise InputError(
        f"{subject} values that are not organ labels of this model ({', '.join(str(v) for v in unknown[:10])}); "
        f"use only 0 (background) and {', '.join(f'{o.label} ({o.name})' for o in organs)}."
    )


def _write_sitk(image: sitk.Image, target: Path) -> None:
    sitk.WriteImage(image, str(target), useCompression=True)


def _write_slicerio(segmentation: dict, target: Path) -> None:
    import slicerio

    # Label maps are mostly long runs of zeros: gzip level 1 already shrinks them well and is
    # about five times faster than slicerio's default 9 on a 512 x 512 x 300 label map.
    slicerio.write_segmentation(str(target), segmentation, compression_level=1)


def _extension(path: Path) -> str:
    name = path.name.lower()
    for compound in (SEGMENTATION_EXTENSION, ".nii.gz"):
        if name.endswith(compound):
            return compound
    return path.suffix.lower()


CASE_SUFFIXES: tuple[str, ...] = (SEGMENTATION_EXTENSION, ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_name(path: PathLike) -> str:
    """A file's name without its image extension (``ct.nii.gz`` -> ``ct``); a folder's name as it is."""
    name = Path(path).name
    for suffix in CASE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_output_path(path: PathLike, extensions: Sequence[str] = SEGMENTATION_WRITE_EXTENSIONS) -> Path:
    """Refuse an output path that cannot be written (format, folder, permissions) before any work is done."""
    path = Path(path)
    extension = _extension(path)
    if extension not in extensions:
        raise InputError(
            f"Cannot write {path}: '{extension or 'no extension'}' is not a supported output format; "
            f"use {', '.join(extensions)}."
        )
    folder = path.parent
    if not folder.is_dir():
        reason = "it is not a folder" if folder.exists() else "it does not exist"
        raise InputError(
            f"Cannot write to {path}: the folder {folder} cannot be used because {reason}; "
            "choose a folder you can write to."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(
            f"Cannot write to {path}: the folder {folder} is not writable; choose a folder you can write to."
        )
    if path.is_dir():
        raise InputError(f"Cannot write to {path}: a folder of that name exists; choose a file name.")
    return path


def write_text_atomically(path: PathLike, text: str) -> Path:
    """A report or table (.json, .csv, .md, .txt), written all or nothing."""
    return _write_atomically(path, (".json", ".csv", ".md", ".txt"), lambda tmp: tmp.write_text(text))


def _write_atomically(path: PathLike, extensions: Sequence[str], write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary file beside ``path`` and rename it onto ``path``; clean up on any failure."""
    path = check_output_path(path, extensions)
    extension = _extension(path)
    folder = path.parent

    # Same folder (so the rename is atomic) and same extension (so SimpleITK/slicerio pick the format).
    stem = path.name[: len(path.name) - len(extension)]
    temporary = folder / f".{stem}.{secrets.token_hex(6)}.partial{path.name[len(stem):]}"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        # BaseException too: a cancelled (KeyboardInterrupt) write must not leave a partial file either.
        temporary.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            logger.debug("Writing %s failed.", path, exc_info=True)
            if isinstance(error, OSError) and error.strerror:
                reason = error.strerror[0].lower() + error.strerror[1:]
            else:
                reason = "the writer failed (see the debug log)"
            raise InputError(f"Cannot write to {path}: {reason}; choose a folder you can write to.") from None
        raise
    logger.info("Wrote %s.", path)
    return path
