"""Whole-volume FINE inference: the ``Segmenter`` that the CLI, the Slicer Logic and scripts call.

A CT goes in as a :class:`~FINESegmentationLib.volume.Volume`; a label map with the
same geometry comes out. In between: reorient/resample/normalise as the checkpoint
says, slide crops over the volume with MONAI's ``sliding_window_inference``
(Gaussian blending, ``with_coord=True`` so each crop knows its position for the
volume tokens), and resample the labels back onto the input grid.

Volume-token bank, two modes:

* ``stateless`` (default): every crop starts from the learned volume tokens (the authors' code). One
  pass; for the shipped models it gives the same Dice as ``accumulate`` (README), at half the time.
* ``accumulate``: a per-volume bank. Pass 1 runs every crop in scan order,
  each batch of crops starting from the bank; the state each crop returns replaces
  the bank (for a batch of several crops, their states are averaged cell by cell; with
  one crop per batch this is exactly the model's own crop-to-crop carry). The state a
  crop returns is the output of the last block's MSA over *all* volume tokens, so after
  pass 1 every cell holds context gathered from every crop. Pass 2 predicts every crop
  starting from that filled bank and leaves it unchanged, so its predictions do not
  depend on the order of the crops. The cost is a second pass over the crops.
  Why carry the whole state: within one forward, the MSA over all volume tokens only
  reaches the voxels through the state handed to a later forward (see README), so
  a bank is what lets a crop see the rest of the volume.
"""
from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from scipy import ndimage

from .checkpoints import ModelInfo, load_checkpoint, read_registry, sha256_of
from .errors import CancelledError, CheckpointError, DeviceError, InputError
from .io import IMAGE_WRITE_EXTENSIONS, check_output_path, read_volume, write_probabilities, write_segmentation
from .labels import ORGAN_BY_NAME
from .model import FINE, VolumeTokenState
from .preprocessing import (
    THIN_SLAB_MM,
    PreparedVolume,
    argmax_on_input_grid,
    labels_to_input_grid,
    network_spacing,
    prepare,
    probabilities_to_input_grid,
)
from .volume import Volume

logger = logging.getLogger(__name__)

BANK_MODES = ("accumulate", "stateless")
# Test-time augmentation: (in-plane rotation in degrees, scale) of each crop, inside what training
# draws (rotation about z up to 15 degrees, scaling 0.85-1.15). No mirroring: the models are trained
# without it, as left and right kidney differ only by their side (a mirrored crop is segmented with
# the wrong anatomy: on a held-out phantom the 8 mirrored crops gave 14% mean Dice instead of 86%).
TTA_VARIANTS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1))


def _tta_matrix(degrees: float, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The 3 x 4 ``affine_grid`` matrix (output -> input, normalised x, y, z coordinates) that rotates a
    crop [z, y, x] about its z axis and scales it, in voxel units (in-plane voxels are square)."""
    d, h, w = shape
    a = np.deg2rad(degrees)
    c, s_ = np.cos(a), np.sin(a)
    # Rotation in voxel units, expressed in each axis's normalised coordinate (half-size units).
    m = np.array([[c, -s_ * h / w, 0.0], [s_ * w / h, c, 0.0], [0.0, 0.0, 1.0]]) / scale
    return torch.tensor(np.concatenate([m, np.zeros((3, 1))], axis=1), dtype=torch.float32)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype)[None].expand(x.shape[0], -1, -1), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class Progress:
    """What a progress callback receives after every batch of crops."""

    pass_index: int  # 1-based
    passes: int
    crop: int  # crops done in this pass
    crops: int  # crops per pass
    elapsed_s: float  # since the sliding windows started
    eta_s: float  # estimated time left for all passes

    def __str__(self) -> str:
        return f"pass {self.pass_index}/{self.passes}, crop {self.crop}/{self.crops}, {self.eta_s:.0f} s left"


ProgressCallback = Callable[[Progress], None]


@dataclass
class SegmentationResult:
    labels: Volume  # uint8 label map on the input's grid, values as in ``info.label_values``
    probabilities: np.ndarray | None  # float32 [C, z, y, x] on the input's grid, when asked for
    report: dict[str, Any] = field(default_factory=dict)


def available_devices() -> list[str]:
    """Devices this machine can run on, best first."""
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a named device must exist."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"'{name}' is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index or 0
        if index >= count:
            raise DeviceError(f"CUDA device {name} is not available (this machine has {count} CUDA device(s)); use --device cpu or auto.")
        return torch.device("cuda", index)
    if device.type == "mps" and name not in available_devices():
        raise DeviceError("MPS is not available on this machine; use --device cpu or auto.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"'{name}' is not a device FINESegmentation runs on; use auto, cpu, cuda, cuda:N or mps.")
    return device


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def default_model_name() -> str:
    registry = read_registry()
    if not registry:
        raise CheckpointError("No FINE model is installed; choose a checkpoint file (fine-seg --model PATH, or Load checkpoint in Slicer).")
    return next(iter(registry))


class VolumeTokenBank:
    """The volume tokens of one volume, carried across its crops (``accumulate`` mode)."""

    def __init__(self, model: FINE, device: torch.device) -> None:
        with torch.no_grad():
            self.state = model.initial_state(1).to(device, torch.float32)

    def for_batch(self, batch: int) -> VolumeTokenState:
        return VolumeTokenState(
            {k: v.expand(batch, -1, -1, -1) for k, v in self.state.tokens.items()},
            self.state.visits.expand(batch, -1),
        )

    def merge(self, out: VolumeTokenState) -> None:
        """The bank becomes the cell-wise mean of the batch's returned states; visits add up."""
        assert out.visits is not None and self.state.visits is not None
        hits = (out.visits - self.state.visits).sum(0, keepdim=True)
        self.state = VolumeTokenState(
            {k: v.float().mean(0, keepdim=True) for k, v in out.tokens.items()},
            self.state.visits + hits,
        )


def count_crops(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Crops ``sliding_window_inference`` takes over a volume (after padding it to the crop)."""
    size = tuple(max(s, r) for s, r in zip(shape, roi))
    interval = tuple(r if r == s else max(1, int(r * (1 - overlap))) for s, r in zip(size, roi))
    return len(dense_patch_slices(size, roi, interval))


class _CropPredictor:
    """The predictor handed to ``sliding_window_inference`` for one pass."""

    def __init__(self, segmenter: "Segmenter", padded: tuple[int, ...], bank: VolumeTokenBank | None, fill_bank: bool,
                 tick: Callable[[int], None], cancel: threading.Event | None) -> None:
        self.model = segmenter.model
        self.padded = torch.tensor(padded, dtype=torch.float32)
        self.bank = bank
        self.fill_bank = fill_bank
        # Each variant's warp and its inverse (None for the identity), once: every crop has the crop size.
        self.warps: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
        if segmenter.tta and not fill_bank:
            for degrees, scale in TTA_VARIANTS[1:]:
                theta = _tta_matrix(degrees, scale, tuple(segmenter.info.config.crop_size))
                self.warps.append((theta, torch.cat([torch.linalg.inv(theta[:, :3]), torch.zeros(3, 1)], dim=1)))
        self.autocast = segmenter.autocast_dtype
        self.tick = tick
        self.cancel = cancel

    def positions(self, slices: list) -> torch.Tensor:
        # Crop centre minus the (padded) volume centre, in voxels of the network's grid.
        starts = torch.tensor([[s.start for s in sl[2:]] for sl in slices], dtype=torch.float32)
        stops = torch.tensor([[s.stop for s in sl[2:]] for sl in slices], dtype=torch.float32)
        return (starts + stops - self.padded) / 2

    def __call__(self, patches: torch.Tensor, slices: list) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("Segmentation was cancelled; nothing was written.")
        b = patches.shape[0]
        positions = self.positions(slices).to(patches.device)
        state = self.bank.for_batch(b) if self.bank is not None else None
        probs = None
        with torch.autocast(patches.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            for warp in self.warps:
                x = patches if warp is None else _warp(patches, warp[0])
                out = self.model(x, positions, state)
                if self.fill_bank:
                    self.bank.merge(out.state)
                    self.tick(b)
                    return torch.zeros_like(patches[:, :1])
                p = torch.softmax(out.logits.float(), dim=1)
                if warp is not None:  # back onto the crop's own voxels
                    p = _warp(p, warp[1])
                probs = p if probs is None else probs + p
        self.tick(b)
        return probs / len(self.warps)


class Segmenter:
    """Segments CT volumes with one FINE model (loaded once, reused for every volume).

    ``model``: a registered model name, a checkpoint path, or a ``(FINE, ModelInfo)`` pair.
    ``bank``: ``accumulate`` (two passes, whole-volume context) or ``stateless``.
    ``fast``: less crop overlap (0.25 instead of 0.5). ``tta``: average each crop's prediction over
    ``TTA_VARIANTS`` (small in-plane rotations and scalings, undone on the probabilities); ``None`` (the
    default): on, unless ``fast``.
    ``largest_component``: keep each organ's largest connected component before refine-all; ``None`` (the
    default): every organ but the pancreas (``NO_LARGEST_COMPONENT``), ``True``: every organ, ``False``: none.
    ``refine_all``: redraw every organ FINE found with LiteMedSAM, slice by slice from its own boxes
    (:func:`~.refiner.litemedsam.refine_all.refine_all`); the probabilities stay FINE's. ``None`` (the
    default): on, unless ``fast`` (then FINE alone: the fast mode keeps FINE's CPU time).
    ``refine_step_mm``: on slices thinner than this, refine-all embeds slices at most this far apart and
    interpolates between them (``None``: ``DEFAULT_SLICE_STEP_MM``, 3 mm; 0: every slice).
    ``refine_margin_mm``: how far refine-all enlarges each organ's box on a slice around FINE's voxels there
    before LiteMedSAM is asked (``None``: ``DEFAULT_MARGIN_MM``, 8 mm; 0: FINE's own box).
    ``refine_box_rounds``: how often refine-all asks LiteMedSAM per organ and slice, each round with the box
    around the previous answer and FINE's voxels (``None``: ``DEFAULT_BOX_ROUNDS``; a number for every organ,
    {label: rounds}, or text such as "gallbladder:2": :func:`~.refiner.litemedsam.refine_all.parse_box_rounds`).
    ``smooth_labels``: labels on the input grid are the argmax of the probabilities resampled linearly (the
    default) or, when False, the network grid's labels resampled nearest-neighbour.
    ``thin_slab``: a scan shorter than :data:`~.preprocessing.THIN_SLAB_MM` (60 mm) along the body is
    segmented on a grid of half the model's slice spacing (the default; False: always the model's grid).
    """

    def __init__(
        self,
        model: str | Path | tuple[FINE, ModelInfo] | None = None,
        device: str = "auto",
        bank: str = "stateless",
        fast: bool = False,
        tta: bool | None = None,
        largest_component: bool | None = None,
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        refine_all: bool | None = None,
        refine_step_mm: float | None = None,
        refine_margin_mm: float | None = None,
        refine_box_rounds: int | str | dict[int, int] | None = None,
        smooth_labels: bool = True,
        thin_slab: bool = True,
    ) -> None:
        if bank not in BANK_MODES:
            raise InputError(f"Unknown bank mode '{bank}'; use one of: {', '.join(BANK_MODES)}.")
        self.device = resolve_device(device)
        if isinstance(model, tuple):
            self.model, self.info = model
            self.model_name, self.model_sha256 = self.info.config.name, None
        else:
            from .weights import local_checkpoint  # bundled, cached, downloaded or a path

            name = str(model) if model is not None else default_model_name()
            path, sha = local_checkpoint(name)
            self.model, self.info = load_checkpoint(path, sha)
            self.model_name, self.model_sha256 = name, sha or sha256_of(path)
        self.model = self.model.to(self.device).eval()
        self.bank_mode = bank if self.info.config.volume_tokens else "stateless"
        self.fast = fast
        self.tta = (not fast) if tta is None else bool(tta)
        # None (default): every organ but those in NO_LARGEST_COMPONENT; True: every organ; False: none.
        names = list(self.info.class_names)
        if largest_component is None:
            self.largest_component_classes = [i for i, n in enumerate(names) if i and n not in NO_LARGEST_COMPONENT]
        else:
            self.largest_component_classes = list(range(1, len(names))) if largest_component else []
        self.largest_component = bool(self.largest_component_classes)
        self.overlap = overlap if overlap is not None else (0.25 if fast else 0.5)
        self.sw_batch_size = sw_batch_size or (4 if self.device.type == "cuda" else 1)
        self.stitch_device = self.device
        self.autocast_dtype = _autocast_dtype(self.device)
        self.refine_all = (not fast) if refine_all is None else bool(refine_all)
        # Labels on the input grid: argmax of the linearly resampled probabilities (True) or the prepared grid's
        # labels resampled nearest-neighbour (False, the blocks of the model's grid).
        self.smooth_labels = bool(smooth_labels)
        self.thin_slab = bool(thin_slab)
        from .refiner.litemedsam.refine_all import DEFAULT_MARGIN_MM, DEFAULT_SLICE_STEP_MM, parse_box_rounds

        step = DEFAULT_SLICE_STEP_MM if refine_step_mm is None else float(refine_step_mm)
        if not (np.isfinite(step) and step >= 0):
            raise InputError(f"The refine-all slice step must be 0 (every slice) or a positive number of millimetres (got {refine_step_mm}).")
        self.refine_step_mm = step
        margin = DEFAULT_MARGIN_MM if refine_margin_mm is None else float(refine_margin_mm)
        if not (np.isfinite(margin) and margin >= 0):
            raise InputError(f"The refine-all box margin must be 0 or a positive number of millimetres (got {refine_margin_mm}).")
        self.refine_margin_mm = margin
        self.refine_box_rounds = parse_box_rounds(refine_box_rounds)  # organ label -> rounds
        self._slice_predictor = None  # LiteMedSAM, loaded on the first refine-all

    def network_spacing(self, volume: Volume) -> tuple[float, float, float]:
        """The grid FINE segments ``volume`` on: the model's, or with half its slice spacing for a thin slab
        (``thin_slab``; :data:`~.preprocessing.THIN_SLAB_MM`)."""
        return network_spacing(volume, self.info.preprocessing, THIN_SLAB_MM if self.thin_slab else None)

    @property
    def precision(self) -> str:
        return str(self.autocast_dtype or torch.float32).replace("torch.", "")

    def segment(self, volume: Volume, *, probabilities: bool = False, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None, refine_progress: Callable[[int, int], None] | None = None) -> SegmentationResult:
        """Segment one CT volume. Raises InputError for a volume that is not a usable CT.

        ``refine_progress(done, total)`` follows refine-all slice by slice (with ``refine_all``)."""
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        prepared = prepare(volume, self.info.preprocessing, self.network_spacing(volume))
        times["preprocess"] = time.perf_counter() - t0
        fallbacks: list[str] = []
        probs = self._run_with_fallbacks(prepared, times, progress, cancel, fallbacks)
        t0 = time.perf_counter()
        result_probs = probabilities_to_input_grid(probs, prepared, volume) if probabilities else None
        labels = probs.argmax(0).astype(np.uint8)
        if self.largest_component_classes:
            before = labels.copy()
            keep_largest_components(labels, self.largest_component_classes)
            removed = before != labels  # the pieces dropped become background on the input grid too
            probs[:, removed] = 0.0
            probs[0, removed] = 1.0
        if self.smooth_labels:
            result_labels = argmax_on_input_grid(probs, prepared, volume)
        else:
            result_labels = labels_to_input_grid(labels, prepared, volume)
        times["postprocess"] = time.perf_counter() - t0
        refined = None
        if self.refine_all:
            from .refiner.litemedsam.predictor import SlicePredictor
            from .refiner.litemedsam.refine_all import refine_all

            t0 = time.perf_counter()
            if self._slice_predictor is None:
                # Boxes only: the published weights (their box-only Dice on the real CT is the higher one, README).
                self._slice_predictor = SlicePredictor("litemedsam", device=self.device)
            refined = refine_all(self._slice_predictor, volume, result_labels, margin_mm=self.refine_margin_mm, slice_step_mm=self.refine_step_mm,
                                 box_rounds=self.refine_box_rounds, progress=refine_progress, cancel=cancel)
            result_labels = refined.labels
            times["refine_all"] = time.perf_counter() - t0
        report = self._report(volume, prepared, times, fallbacks, result_labels)
        report["refine_all"] = refined.report if refined is not None else None  # organs, slices, seconds
        return SegmentationResult(result_labels, result_probs, report)

    def segment_file(self, input_path: str | Path, output_path: str | Path, *, probabilities_path: str | Path | None = None,
                     progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                     refine_progress: Callable[[int, int], None] | None = None) -> SegmentationResult:
        """Read a CT (file or DICOM folder), segment it, write the labels (``.seg.nrrd`` or a label map)
        and optionally the probabilities. Nothing is written unless the whole job succeeds."""
        check_output_path(output_path)
        if probabilities_path is not None:
            check_output_path(probabilities_path, IMAGE_WRITE_EXTENSIONS)
        t0 = time.perf_counter()
        volume = read_volume(input_path, kind="image")
        read_s = time.perf_counter() - t0
        result = self.segment(volume, probabilities=probabilities_path is not None, progress=progress, cancel=cancel,
                              refine_progress=refine_progress)
        t0 = time.perf_counter()
        names = dict(zip(self.info.label_values, self.info.class_names))
        organs = [ORGAN_BY_NAME[names[v]] for v in self.info.label_values if v != 0 and names[v] in ORGAN_BY_NAME]
        written = [write_segmentation(result.labels, output_path, organs)]
        if probabilities_path is not None:
            try:
                written.append(write_probabilities(result.probabilities, result.labels.geometry, probabilities_path))
            except BaseException:
                written[0].unlink(missing_ok=True)  # all or nothing
                raise
        result.report["timings_s"] = {"read": round(read_s, 4), **result.report["timings_s"], "write": round(time.perf_counter() - t0, 4)}
        result.report["timings_s"]["total"] = round(sum(result.report["timings_s"].values()), 4)
        result.report["input"] = str(input_path)
        result.report["outputs"] = [str(p) for p in written]
        return result

    def _run_with_fallbacks(self, prepared: PreparedVolume, times: dict, progress, cancel, fallbacks: list[str]) -> np.ndarray:
        while True:
            try:
                return self._sliding_windows(prepared, times, progress, cancel)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if self.stitch_device.type != "cpu":
                    self.stitch_device = torch.device("cpu")
                    step = "GPU memory ran out; stitching the crops on the CPU instead"
                elif self.sw_batch_size > 1:
                    self.sw_batch_size //= 2
                    step = f"GPU memory ran out; retrying with {self.sw_batch_size} crop(s) per batch"
                elif self.device.type != "cpu":
                    self.device = self.stitch_device = torch.device("cpu")
                    self.model = self.model.to(self.device)
                    self.autocast_dtype = None
                    step = "GPU memory ran out even for one crop; running on the CPU instead"
                else:
                    raise
                logger.warning(step)
                fallbacks.append(step)

    def _sliding_windows(self, prepared: PreparedVolume, times: dict, progress: ProgressCallback | None,
                         cancel: threading.Event | None) -> np.ndarray:
        cfg = self.info.config
        roi = cfg.crop_size
        shape = prepared.array.shape
        padded = tuple(max(s, r) for s, r in zip(shape, roi))
        crops = count_crops(shape, roi, self.overlap)
        passes = 2 if self.bank_mode == "accumulate" else 1
        self.crops_per_pass, self.passes = crops, passes
        image = torch.from_numpy(prepared.array)[None, None]
        air = (self.info.preprocessing.clip[0] - self.info.preprocessing.mean) / self.info.preprocessing.std
        bank = VolumeTokenBank(self.model, self.device) if self.bank_mode == "accumulate" else None
        start = time.perf_counter()
        done = {"crops": 0, "pass": 1}

        def tick(n: int) -> None:
            done["crops"] += n
            if progress is not None:
                elapsed = time.perf_counter() - start
                total_done = (done["pass"] - 1) * crops + done["crops"]
                eta = elapsed / total_done * (passes * crops - total_done)
                progress(Progress(done["pass"], passes, min(done["crops"], crops), crops, elapsed, eta))

        out = None
        with torch.inference_mode():
            for p in range(1, passes + 1):
                done["pass"], done["crops"] = p, 0
                fill = passes == 2 and p == 1
                t0 = time.perf_counter()
                predictor = _CropPredictor(self, padded, bank, fill, tick, cancel)
                out = sliding_window_inference(
                    image, roi, self.sw_batch_size, predictor, overlap=self.overlap, mode="gaussian",
                    sigma_scale=0.125, padding_mode="constant", cval=float(air), sw_device=self.device,
                    device=self.stitch_device, with_coord=True,
                )
                times[f"pass{p}"] = time.perf_counter() - t0
        return out[0].float().cpu().numpy()

    def _report(self, volume: Volume, prepared: PreparedVolume, times: dict, fallbacks: list[str], labels: Volume) -> dict[str, Any]:
        voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
        counts = np.bincount(labels.array.ravel(), minlength=len(self.info.class_names))
        report = {
            "model": self.model_name,
            "model_sha256": self.model_sha256,
            "config": self.info.config.name,
            "device": str(self.device),
            "precision": self.precision,
            "bank": self.bank_mode,
            "fast": self.fast,
            "tta": self.tta,
            "largest_component": [self.info.class_names[i] for i in self.largest_component_classes],
            "overlap": self.overlap,
            "sw_batch_size": self.sw_batch_size,
            "input_shape_zyx": list(volume.shape),
            "input_spacing_xyz": list(volume.geometry.spacing),
            "network_shape_zyx": list(prepared.array.shape),
            "network_spacing_xyz": [round(float(v), 4) for v in prepared.grid.GetSpacing()],
            "thin_slab": tuple(prepared.grid.GetSpacing()) != tuple(float(v) for v in self.info.preprocessing.target_spacing),
            "crops_per_pass": self.crops_per_pass,
            "passes": self.passes,
            "timings_s": {k: round(v, 4) for k, v in times.items()},
            "peak_memory_mb": {"cpu_rss": round(peak_rss_mb(), 1)},
            "warnings": prepared.warnings,
            "fallbacks": fallbacks,
            "organ_volumes_ml": {
                name: round(float(counts[v]) * voxel_ml, 2)
                for name, v in zip(self.info.class_names, self.info.label_values) if v != 0
            },
        }
        if self.device.type == "cuda":
            report["peak_memory_mb"]["gpu_allocated"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return report


# Organs whose largest connected component is not kept by default: the pancreas, thin and often found in
# pieces, kept the wrong piece on the real CT (README, "The default model").
NO_LARGEST_COMPONENT = ("pancreas",)


def keep_largest_components(labels: np.ndarray, values: Any = None) -> None:
    """In place: keep each organ's largest 26-connected component, set the rest to background.

    ``values``: the label values to treat (default: every non-zero value)."""
    structure = np.ones((3, 3, 3), bool)
    chosen = None if values is None else {int(v) for v in values}
    for value in np.unique(labels):
        if value == 0 or (chosen is not None and int(value) not in chosen):
            continue
        mask = labels == value
        components, n = ndimage.label(mask, structure)
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            labels[mask & (components != sizes.argmax())] = 0
