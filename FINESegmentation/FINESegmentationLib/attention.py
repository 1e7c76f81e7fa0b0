"""Attention maps: where FINE looked, from one voxel, across the whole volume.

For a point and one FINE block b of a stage (default: block 1 of the first encoder stage, the
paper's Fig. 4), the map follows, backwards, what the point's visual token read in block b:
an attention-rollout product of the levels. Every attention row below is the softmax over the
keys, averaged over the heads, and computed only for the rows the point needs (forward hooks
re-evaluate those rows from the inputs the attention layers received; no attention matrix is
ever stored whole):

* alpha (block b): W-MSA row of the point's visual token u_p over [v_j ; u] of its (possibly
  shifted) window: weights on its window tokens v_j and on the window's visual tokens.
* The window token v_j that row reads was written by block b-1's G-MSA; so, at block b-1:
  beta_j: G-MSA row of v_j over [w_k (the crop's cells) ; v (all windows of the crop)];
  eps_c,v: W-MSA row of window token v of crop c over its window's visual tokens,
  renormalised over them (what the window token read from the voxels);
  delta_c,k: G-MSA row of volume token w_k in crop c over that crop's window tokens,
  renormalised over them (what crop c wrote into cell k).
* gamma: the MSA over all volume tokens that last mixed what block b-1's G-MSA read: block
  b-2 of the same forward; for b = 1 with the ``accumulate`` bank, the stage's last block in the
  last crop of pass 1 (the mixing that left the bank as it is); for b = 1 without a bank, none
  (identity: the learned tokens).

The map is a density over the voxels of the network's grid, summing to one, made of

    local(q)  = alpha(u_q)                                    q in the point's window
    crop(q)   = sum_j alpha(v_j) sum_v beta_j(v) eps_v(q)     q in the point's crop
    volume(q) = sum_j alpha(v_j) sum_k beta_j(w_k) sum_k' gamma(k, k') R_k'(q)

where R_k' is what cell k' holds: with the ``accumulate`` bank, the mean over the crops
of pass 1 that touched k' of sum_v delta_c,k'(v) eps_c,v(q) at block b-1 (each such crop
weighs the same; the bank's repeated mixings are reduced to the last one); for a cell no crop
of this volume wrote (every cell without a bank), the learned tokens, spread evenly over the
cell's footprint (its in-plane square, all slices), the region the token stands for. A
token's mass is spread evenly over the voxels it covers (patch size x 2^stage). At block 0 the
window tokens are the stage's learned seed, which holds nothing of this volume, so the map is
the local term alone (the seed's share is left out). Without window tokens only ``local``
remains: nothing lies outside the point's window, the bounded view of a Swin/nnFormer block.

The map is computed on the network's grid (reoriented and resampled as for
segmenting), then resampled linearly onto the input's grid and scaled so its maximum
is 1. Memory: one pass over the crops (as segmenting's first pass) plus, per crop, the
window-token rows (one float per token of the chosen stage); no per-class
probabilities are kept, so a map needs less memory than segmenting the same volume.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from torch import Tensor

from .errors import CancelledError, InputError
from .inference import Progress, ProgressCallback, Segmenter, VolumeTokenBank
from .model.blocks import Attention, FINEBlock
from .model.network import FINEStage
from .preprocessing import prepare, scalar_to_input_grid
from .volume import Volume

LEVELS = ("local", "crop", "volume")
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass
class AttentionMap:
    """An attention map from one point, on the input's grid, with what is needed to draw it.

    ``heat`` is float32 in [0, 1] (maximum 1) with the input's geometry; ``levels`` (when asked
    for) holds the three terms (local, crop, volume) on the same scale, so they add up to ``heat``.
    Coordinates in RAS millimetres (Slicer's frame). ``shares`` are fractions of the map's
    mass: per level, ``outside_crop`` (outside the crop that holds the point) and
    ``outside_window`` (outside the point's own attention window).
    """

    heat: Volume
    levels: dict[str, Volume]
    shares: dict[str, float]
    point_ras: tuple[float, float, float]
    point_ijk: tuple[float, float, float]
    stage: str
    block: int
    bank: str
    crop_center_ras: tuple[float, float, float]
    crop_size_mm: tuple[float, float, float]  # along crop_axes_ras columns (x, y, z of the network grid)
    crop_axes_ras: np.ndarray  # (3, 3) columns: the network grid's x, y, z axes in RAS
    crop_corners_ras: np.ndarray  # (8, 3)
    grid_planes_ras: np.ndarray  # (P, 4, 3) corners of the volume-token cell boundaries (planes along z)
    cell_weights: np.ndarray  # (grid_y, grid_x) volume-level mass per cell, before spreading to voxels
    network: dict[str, Any] = field(default_factory=dict)  # the map on the network's grid, for figures
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# attention rows from hooks


def attention_rows(attn: Attention, x: Tensor, rows: Sequence[int] | slice, mask: Tensor | None = None) -> Tensor:
    """Softmax attention, mean over heads, of the query ``rows`` of ``x`` (..., L, C) over all L keys.

    Returns (..., R, L). ``mask`` is what ``Attention.forward`` received (broadcast to
    (..., heads, L, L)): a float mask is added, a boolean mask keeps True entries.
    """
    *lead, length, dim = x.shape
    heads = attn.num_heads
    d = dim // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    xq = x[..., rows, :]
    r = xq.shape[-2]
    q = F.linear(xq, w[:dim], b[:dim]).reshape(*lead, r, heads, d).transpose(-2, -3)
    k = F.linear(x, w[dim : 2 * dim], b[dim : 2 * dim]).reshape(*lead, length, heads, d).transpose(-2, -3)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)  # (..., heads, R, L)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask[..., rows, :].float()
    return logits.softmax(-1).mean(-3)


class _WindowLayout:
    """Where each token of a block's token grid sits in the block's (shifted) windows."""

    def __init__(self, block: FINEBlock) -> None:
        grid = block.resolution
        window = block.window
        t = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1)  # (Z, Y, X, 3) token coordinates
        r = (t - np.array(block.shift)) % np.array(grid)  # coordinates after the block's roll by -shift
        nwin = [g // w for g, w in zip(grid, window)]
        wi = r // np.array(window)
        li = r % np.array(window)
        self.window = (wi[..., 0] * nwin[1] + wi[..., 1]) * nwin[2] + wi[..., 2]  # (Z, Y, X) window index
        self.local = (li[..., 0] * window[1] + li[..., 1]) * window[2] + li[..., 2]  # (Z, Y, X) index in the window
        self.grid = grid

    def to_grid(self, windowed: np.ndarray) -> np.ndarray:
        """(..., nW, Nu) per-window rows -> (..., Z, Y, X) on the token grid."""
        return windowed[..., self.window, self.local]


@dataclass
class _Record:
    cells: np.ndarray | None = None  # (K,) cells of the crop
    eps: np.ndarray | None = None  # (Nv, Z, Y, X) window-token rows on the token grid
    delta: np.ndarray | None = None  # (K, Nw, nW, Nv) volume-token G-MSA rows over window tokens
    alpha_v: np.ndarray | None = None  # (Nv,)
    alpha_u: np.ndarray | None = None  # (Z, Y, X) the point's row over its window's visual tokens
    beta: np.ndarray | None = None  # (Nv, K*Nw + nW*Nv)
    gamma: np.ndarray | None = None  # (M*Nw, M*Nw)


class _Recorder:
    """Forward hooks: the point's W-MSA row at block b; at block b-1 (the source of the window token that
    row reads) the window tokens' rows over their voxels, the G-MSA rows and the crop's cells; and the
    volume-token MSA that mixed what that G-MSA read (block b-2, or for b-1 = 0 the stage's last block)."""

    def __init__(self, stage: FINEStage, block: int) -> None:
        self.stage = stage
        self.block = stage.blocks[block]
        self.layout = _WindowLayout(self.block)
        self.source = stage.blocks[block - 1] if block > 0 else None
        self.source_layout = _WindowLayout(self.source) if self.source is not None else None
        self.gamma_block = (stage.blocks[block - 2] if block > 1 else stage.blocks[-1]) if block > 0 else None
        self.point: tuple[int, int, int] | None = None  # token coordinates of the point, when its crop runs
        self.writers = False
        self.record = _Record()

    @contextmanager
    def attached(self) -> Iterator["_Recorder"]:
        handles = [self.block.attn.attn.register_forward_hook(self._point_attention)]
        if self.source is not None and self.source.num_window_tokens:
            handles.append(self.source.register_forward_pre_hook(self._block_inputs))
            handles.append(self.source.attn.attn.register_forward_hook(self._window_attention))
            handles.append(self.source.global_attn.register_forward_hook(self._global_attention))
            if self.gamma_block.volume_attn is not None:
                handles.append(self.gamma_block.volume_attn.register_forward_hook(self._volume_attention))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def start(self, point: tuple[int, int, int] | None, writers: bool) -> _Record:
        self.point, self.writers = point, writers
        self.record = _Record()
        return self.record

    @property
    def point_window(self) -> int:
        return int(self.layout.window[self.point])

    def _block_inputs(self, module, args) -> None:
        cells = args[3] if len(args) > 3 else None
        self.record.cells = None if cells is None else cells[0].cpu().numpy()

    def _point_attention(self, module, args, output) -> None:
        if self.point is None:
            return
        x, mask = args[0][:1], args[1]
        nv = self.block.num_window_tokens
        win = self.point_window
        row = nv + int(self.layout.local[self.point])
        m = None if mask is None else mask[min(win, mask.shape[0] - 1)]
        a = attention_rows(module, x[:, win], [row], m)[0, 0].cpu().numpy()  # (Nv + Nu,)
        self.record.alpha_v = a[:nv]
        in_window = self.layout.window == win
        grid = np.zeros(self.layout.grid, np.float64)
        grid[in_window] = a[nv:][self.layout.local[in_window]]
        self.record.alpha_u = grid

    def _window_attention(self, module, args, output) -> None:
        x, mask = args[0][:1], args[1]
        nv = self.source.num_window_tokens
        rows = attention_rows(module, x, slice(0, nv), mask)[0]  # (nW, Nv, L)
        eps = rows[..., nv:]
        eps = eps / eps.sum(-1, keepdim=True).clamp_min(1e-12)
        self.record.eps = self.source_layout.to_grid(eps.transpose(0, 1).cpu().numpy())  # (Nv, Z, Y, X)

    def _global_attention(self, module, args, output) -> None:
        seq = args[0][:1]
        nv = self.source.num_window_tokens
        nwin = self.stage.windows
        kn = seq.shape[1] - nwin * nv  # K * Nw volume-token rows come first
        if self.point is not None:
            # The window token of the point's window at block b is the G-MSA output of the same token at b-1.
            win = self.point_window
            self.record.beta = attention_rows(module, seq, [kn + win * nv + j for j in range(nv)])[0].cpu().numpy()
        if self.writers and kn:
            d = attention_rows(module, seq, slice(0, kn))[0, :, kn:]  # (K*Nw, nW*Nv)
            d = d / d.sum(-1, keepdim=True).clamp_min(1e-12)
            k = len(self.record.cells)
            self.record.delta = d.reshape(k, kn // k, nwin, nv).cpu().numpy()

    def _volume_attention(self, module, args, output) -> None:
        self.record.gamma = attention_rows(module, args[0][:1], slice(None), args[1][:1])[0].cpu().numpy()


# ---------------------------------------------------------------------------------------------
# the mapper


class AttentionMapper:
    """Computes attention maps with one FINE model (loaded once).

    ``model``: a registered model name, a checkpoint path or a ``(FINE, ModelInfo)`` pair;
    ``bank``: ``accumulate`` (the crops of pass 1 fill the bank the point's crop reads) or
    ``stateless``; ``fast``: the crop overlap of ``fine-seg segment --fast``.
    """

    def __init__(self, model: Any = None, device: str = "auto", bank: str = "accumulate", fast: bool = False) -> None:
        self.segmenter = Segmenter(model, device=device, bank=bank, fast=fast, sw_batch_size=1, refine_all=False)
        self.model = self.segmenter.model
        self.info = self.segmenter.info

    @property
    def stage_names(self) -> list[str]:
        return self.model.stage_names

    def blocks_in(self, stage: str) -> int:
        return len(self._stage(stage)[0].blocks)

    def _stage(self, name: str) -> tuple[FINEStage, int]:
        names = self.model.stage_names
        if name not in names:
            raise InputError(f"Unknown stage '{name}'; choose one of: {', '.join(names)}.")
        i = names.index(name)
        n_enc = len(self.model.encoder)
        if i < n_enc:
            return self.model.encoder[i], i
        return self.model.decoder[i - n_enc], n_enc - 2 - (i - n_enc)

    def compute(self, volume: Volume, point: Sequence[float], *, ijk: bool = False, stage: str = "encoder0", block: int = 1,
                levels: bool = False, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None) -> AttentionMap:
        """The attention map of ``point`` (RAS mm, or (i, j, k) = (x, y, z) indices of ``volume`` with ``ijk``).

        ``levels=True`` also resamples the three terms onto the input grid (``AttentionMap.levels``);
        each costs as much memory as the map itself, so they are left out unless asked for.
        """
        stage_module, resolution_index = self._stage(stage)
        depth = len(stage_module.blocks)
        if not 0 <= block < depth:
            raise InputError(f"Stage {stage} has blocks 0 to {depth - 1}; block {block} does not exist.")
        point = np.asarray(point, dtype=np.float64)
        if point.shape != (3,) or not np.isfinite(point).all():
            raise InputError("A point needs three finite coordinates, such as 10.5,-20,35.")
        point_ijk = point if ijk else volume.geometry.ras_to_ijk(point)
        size_xyz = np.array(volume.shape[::-1])
        if np.any(point_ijk < -0.5) or np.any(point_ijk > size_xyz - 0.5):
            def fmt(v):
                return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"

            where = f"index {fmt(point_ijk)}" if ijk else f"RAS {fmt(point)} mm (index {fmt(point_ijk)})"
            size = " x ".join(str(int(n)) for n in size_xyz)
            raise InputError(f"The point at {where} lies outside the volume of {size} voxels; pick a point inside it.")
        point_ras = volume.geometry.ijk_to_ras() @ np.append(point_ijk, 1.0)

        t_start = time.perf_counter()
        cfg = self.info.config
        device = self.segmenter.device
        prepared = prepare(volume, self.info.preprocessing, self.segmenter.network_spacing(volume))  # Segment's grid
        shape = np.array(prepared.array.shape)
        roi = np.array(cfg.crop_size)
        padded = np.maximum(shape, roi)
        front = (padded - shape) // 2
        lps = (volume.geometry.ijk_to_lps() @ np.append(point_ijk, 1.0))[:3]
        p_net = np.array(prepared.grid.TransformPhysicalPointToContinuousIndex(lps.tolist()))[::-1]  # (z, y, x)
        p = np.clip(np.round(p_net).astype(int), 0, shape - 1) + front

        overlap = self.segmenter.overlap
        interval = tuple(int(r) if r == s else max(1, int(r * (1 - overlap))) for s, r in zip(padded, roi))
        slices = dense_patch_slices(tuple(int(s) for s in padded), tuple(int(r) for r in roi), interval)
        starts = np.array([[s.start for s in sl] for sl in slices])
        inside = np.all((starts <= p) & (p < starts + roi), axis=1)
        centre_dist = np.linalg.norm(starts + roi / 2 - p, axis=1) + np.where(inside, 0, np.inf)
        point_crop = int(np.argmin(centre_dist))

        air = (self.info.preprocessing.clip[0] - self.info.preprocessing.mean) / self.info.preprocessing.std
        pad = [(int(f), int(s - n - f)) for f, s, n in zip(front, padded, shape)]
        image = torch.from_numpy(np.pad(prepared.array, pad, constant_values=air))
        tokens = np.array(cfg.token_grid(resolution_index))
        factor = roi // tokens  # voxels per token
        recorder = _Recorder(stage_module, block)
        layout = recorder.layout
        bank_mode = self.segmenter.bank_mode
        model = self.model

        def positions(start: np.ndarray) -> Tensor:
            return torch.tensor((2 * start + roi - padded) / 2, dtype=torch.float32, device=device)[None]

        def crop_of(start: np.ndarray) -> Tensor:
            sl = tuple(slice(int(a), int(a + r)) for a, r in zip(start, roi))
            return image[sl][None, None].to(device)

        writers: list[_Record] = []
        gamma_bank = None
        t0 = time.perf_counter()
        bank = VolumeTokenBank(model, device) if bank_mode == "accumulate" else None
        with torch.inference_mode(), recorder.attached():
            if bank is not None:
                for i, start in enumerate(starts):
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("The attention map was cancelled; nothing was written.")
                    rec = recorder.start(None, writers=True)
                    out = model(crop_of(start), positions(start), bank.for_batch(1))
                    bank.merge(out.state)
                    writers.append(rec)
                    if progress is not None:
                        elapsed = time.perf_counter() - t0
                        progress(Progress(1, 1, i + 1, len(starts) + 1, elapsed, elapsed / (i + 1) * (len(starts) - i)))
                gamma_bank = writers[-1].gamma if block == 1 else None
            start = starts[point_crop]
            t_point = np.floor((p - start) / factor).astype(int)
            rec = recorder.start(tuple(int(v) for v in t_point), writers=False)
            model(crop_of(start), positions(start), bank.for_batch(1) if bank is not None else None)
            if progress is not None:  # the bank's crops, then the point's crop: one pass of N + 1 crops
                n = len(starts) + 1 if bank is not None else 1
                progress(Progress(1, 1, n, n, time.perf_counter() - t0, 0.0))
        t_passes = time.perf_counter() - t0

        # compose the three levels on the padded network grid (densities per voxel)
        maps = {name: np.zeros(tuple(padded), np.float32) for name in LEVELS}
        voxels_per_token = float(np.prod(factor))

        def add_tokens(target: np.ndarray, start: np.ndarray, token_mass: np.ndarray) -> None:
            dens = token_mass / voxels_per_token
            up = dens.repeat(factor[0], 0).repeat(factor[1], 1).repeat(factor[2], 2)
            target[tuple(slice(int(a), int(a + r)) for a, r in zip(start, roi))] += up.astype(np.float32)

        add_tokens(maps["local"], start, rec.alpha_u)
        grid_obj = model.grid
        boundaries = _cell_boundaries(grid_obj, padded, front)  # network-grid indices (y list, x list)
        cell_weights = np.zeros(grid_obj.num_cells)
        if rec.alpha_v is not None and rec.alpha_v.size and rec.beta is not None:
            source_layout = recorder.source_layout
            nv = rec.alpha_v.size
            nwin = stage_module.windows
            kn = rec.beta.shape[1] - nwin * nv
            win_w = (rec.alpha_v[:, None] * rec.beta[:, kn:]).sum(0).reshape(nwin, nv)  # (nW, Nv)
            add_tokens(maps["crop"], start, _window_weighted(win_w, rec.eps, source_layout))
            if kn:
                k = len(rec.cells)
                nw = kn // k
                read = np.zeros((grid_obj.num_cells, nw))
                read[rec.cells] += (rec.alpha_v[:, None] * rec.beta[:, :kn]).sum(0).reshape(k, nw)
                gamma = rec.gamma if block > 1 else gamma_bank
                source = read.reshape(-1) @ gamma if gamma is not None else read.reshape(-1)
                source = source.reshape(grid_obj.num_cells, nw)
                cell_weights = source.sum(1)
                written = np.zeros(grid_obj.num_cells, int)
                for w in writers:
                    written[w.cells] += 1
                for w, wstart in zip(writers, starts):
                    win_w = np.zeros((nwin, nv))
                    for kappa, cell in enumerate(w.cells):
                        win_w += np.einsum("i,iwj->wj", source[cell] / written[cell], w.delta[kappa])
                    add_tokens(maps["volume"], wstart, _window_weighted(win_w, w.eps, source_layout))
                for cell in np.flatnonzero((written == 0) & (cell_weights > 0)):
                    _spread_over_cell(maps["volume"], cell, cell_weights[cell], grid_obj, boundaries, front, shape)

        # shares on the network grid, then back to the input grid
        crop_sl = tuple(slice(int(a), int(a + r)) for a, r in zip(start, roi))
        unpad = tuple(slice(int(f), int(f + n)) for f, n in zip(front, shape))
        total = sum(float(m[unpad].sum()) for m in maps.values())
        heat_net = sum(maps.values())
        in_crop = float(heat_net[crop_sl].sum()) if total else 0.0
        win_mask = _window_mask(layout, t_point, factor, start, padded)
        shares = {name: float(maps[name][unpad].sum()) / total if total else 0.0 for name in LEVELS}
        shares["outside_crop"] = max(0.0, 1.0 - in_crop / total) if total else 0.0
        shares["outside_window"] = max(0.0, 1.0 - float(heat_net[win_mask].sum()) / total) if total else 0.0
        heat_array = scalar_to_input_grid(heat_net[unpad], prepared, volume)
        scale = float(heat_array.max()) or 1.0
        heat_array /= scale
        np.clip(heat_array, 0.0, 1.0, out=heat_array)
        heat = volume.with_array(heat_array)
        level_maps = {}
        if levels:
            for name in LEVELS:
                level = scalar_to_input_grid(maps[name][unpad], prepared, volume)
                level /= scale
                level_maps[name] = volume.with_array(level)

        net_scale = float(heat_net[unpad].max()) or 1.0
        grid_net = prepared.grid
        crop_lo = start - front - 0.5  # voxel edges, network-grid indices (z, y, x)
        crop_hi = crop_lo + roi
        corners_idx = np.array([[c[2], c[1], c[0]] for c in _box_corners(crop_lo, crop_hi)])
        corners_ras = np.array([_index_to_ras(grid_net, c) for c in corners_idx])
        axes = np.array(grid_net.GetDirection()).reshape(3, 3) * _LPS_TO_RAS[:, None]
        spacing_net = np.array(grid_net.GetSpacing())  # (x, y, z)
        planes = _boundary_planes(boundaries, shape, grid_net)
        report = {
            "stage": stage, "block": block, "bank": bank_mode, "crops": len(starts), "point_crop": point_crop,
            "network_shape_zyx": shape.tolist(), "timings_s": {"passes": round(t_passes, 3), "total": round(time.perf_counter() - t_start, 3)},
            "shares": {k: round(v, 4) for k, v in shares.items()}, "device": str(device),
        }
        return AttentionMap(
            heat=heat,
            levels=level_maps,
            shares=shares,
            point_ras=tuple(float(v) for v in point_ras[:3]),
            point_ijk=tuple(float(v) for v in point_ijk),
            stage=stage,
            block=block,
            bank=bank_mode,
            crop_center_ras=tuple(float(v) for v in corners_ras.mean(0)),
            crop_size_mm=tuple(float(v) for v in roi[::-1] * spacing_net),
            crop_axes_ras=axes,
            crop_corners_ras=corners_ras,
            grid_planes_ras=planes,
            cell_weights=cell_weights.reshape(grid_obj.grid),
            network={
                "image": prepared.array, "heat": heat_net[unpad] / net_scale,
                "levels": {name: maps[name][unpad] / net_scale for name in LEVELS},
                "point_zyx": p - front, "crop_start_zyx": start - front, "crop_size_zyx": roi,
                "spacing_zyx": spacing_net[::-1], "boundaries_yx": boundaries,
            },
            report=report,
        )


def _window_weighted(win_w: np.ndarray, eps: np.ndarray, layout: _WindowLayout) -> np.ndarray:
    """Token-grid mass: each window's weight (nW, Nv) spread by its window tokens' rows eps (Nv, Z, Y, X)."""
    return (win_w[layout.window].transpose(3, 0, 1, 2) * eps).sum(0)


def _window_mask(layout: _WindowLayout, t_point: np.ndarray, factor: np.ndarray, start: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """Voxels of the padded network grid in the point's attention window."""
    win = layout.window == layout.window[tuple(t_point)]
    up = win.repeat(factor[0], 0).repeat(factor[1], 1).repeat(factor[2], 2)
    mask = np.zeros(tuple(padded), bool)
    mask[tuple(slice(int(a), int(a) + n) for a, n in zip(start, up.shape))] = up
    return mask


def _cell_boundaries(grid, padded: np.ndarray, front: np.ndarray) -> tuple[list[float], list[float]]:
    """Cell edges of the volume-token grid in network-grid indices, (y edges, x edges).

    Cell i of an axis spans [pad + i * crop, pad + (i + 1) * crop) in the frame of ``max_size``
    voxels centred on the padded volume's centre (see ``VolumeGrid``).
    """
    edges = []
    for axis in (0, 1):
        crop, size, g = grid.crop[axis], grid.max_size[axis], grid.grid[axis]
        off = (size - crop * g) // 2 + (size - crop * g) % 2
        frame_to_padded = padded[axis + 1] / 2 - size // 2
        edges.append([float(off + i * crop + frame_to_padded - front[axis + 1] - 0.5) for i in range(g + 1)])
    return edges[0], edges[1]


def _spread_over_cell(target: np.ndarray, cell: int, mass: float, grid, boundaries: tuple[list[float], list[float]],
                      front: np.ndarray, shape: np.ndarray) -> None:
    """Spread ``mass`` evenly over the cell's footprint (in-plane square, all slices) inside the volume;
    ``boundaries`` are the cell edges from :func:`_cell_boundaries`."""
    ys, xs = boundaries
    iy, ix = divmod(int(cell), grid.grid[1])
    lo = [front[1] + ys[iy] + 0.5, front[2] + xs[ix] + 0.5]
    hi = [front[1] + ys[iy + 1] + 0.5, front[2] + xs[ix + 1] + 0.5]
    sl_y = slice(int(max(front[1], math.ceil(lo[0]))), int(min(front[1] + shape[1], math.ceil(hi[0]))))
    sl_x = slice(int(max(front[2], math.ceil(lo[1]))), int(min(front[2] + shape[2], math.ceil(hi[1]))))
    sl = (slice(int(front[0]), int(front[0] + shape[0])), sl_y, sl_x)
    n = int(np.prod([max(0, s.stop - s.start) for s in sl]))
    if n:
        target[sl] += np.float32(mass / n)


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    return [np.array([(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]]) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def _index_to_ras(image: sitk.Image, index_xyz: Sequence[float]) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_xyz])) * _LPS_TO_RAS


def _boundary_planes(boundaries: tuple[list[float], list[float]], shape: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Quads (P, 4, 3) in RAS: one per cell boundary, across the volume's extent and all its slices."""
    ys, xs = boundaries
    z0, z1 = -0.5, shape[0] - 0.5
    y0, y1 = min(ys[0], -0.5), max(ys[-1], shape[1] - 0.5)
    x0, x1 = min(xs[0], -0.5), max(xs[-1], shape[2] - 0.5)
    quads = []
    for y in ys:
        quads.append([(x0, y, z0), (x1, y, z0), (x1, y, z1), (x0, y, z1)])
    for x in xs:
        quads.append([(x, y0, z0), (x, y1, z0), (x, y1, z1), (x, y0, z1)])
    return np.array([[_index_to_ras(image, c) for c in q] for q in quads])


def write_figure(amap: AttentionMap, path: str | Path, title: str | None = None) -> Path:
    """A three-plane figure (axial, coronal, sagittal through the point) like the paper's Fig. 4:
    the CT in grey, the map in a heat colour map, the crop as a rectangle, the cell grid as
    dashed lines and the point as a cross. Written atomically (PNG, PDF or SVG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Rectangle

    from .io import check_output_path

    path = Path(path)
    check_output_path(path, (".png", ".pdf", ".svg"))
    net = amap.network
    img, heat = net["image"], net["heat"]
    pz, py, px = (int(v) for v in net["point_zyx"])
    cz, cy, cx = (float(v) - 0.5 for v in net["crop_start_zyx"])
    sz, sy, sx = (float(v) for v in net["crop_size_zyx"])
    dz, dy, dx = (float(v) for v in net["spacing_zyx"])
    ys, xs = net["boundaries_yx"]
    views = [
        ("axial", img[pz], heat[pz], (cx, cy, sx, sy), dy / dx, px, py, xs, ys, "upper"),
        ("coronal", img[:, py], heat[:, py], (cx, cz, sx, sz), dz / dx, px, pz, xs, [], "lower"),
        ("sagittal", img[:, :, px], heat[:, :, px], (cy, cz, sy, sz), dz / dy, py, pz, ys, [], "lower"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), constrained_layout=True)
    norm = PowerNorm(gamma=0.4, vmin=0.0, vmax=1.0)  # a power scale keeps the faint long-range context visible
    last = None
    for ax, (name, ct, hm, (r0, r1, rw, rh), aspect, u, v, vlines, hlines, origin) in zip(axes, views):
        ax.imshow(ct, cmap="gray", aspect=aspect, origin=origin, interpolation="nearest")
        last = ax.imshow(np.ma.masked_less_equal(hm, 1e-4), cmap="jet", norm=norm, alpha=0.55, aspect=aspect, origin=origin,
                         interpolation="nearest")
        ax.add_patch(Rectangle((r0, r1), rw, rh, fill=False, edgecolor="white", linewidth=1.5))
        for e in vlines:
            ax.axvline(e, color="yellow", linestyle="--", linewidth=0.7)
        for e in hlines:
            ax.axhline(e, color="yellow", linestyle="--", linewidth=0.7)
        ax.plot(u, v, marker="+", color="white", markersize=14, markeredgewidth=2)
        ax.set_xlim(-0.5, ct.shape[1] - 0.5)
        ax.set_ylim(*((ct.shape[0] - 0.5, -0.5) if origin == "upper" else (-0.5, ct.shape[0] - 0.5)))
        ax.set_title(name)
        ax.set_axis_off()
    fig.colorbar(last, ax=axes, shrink=0.8, label="attention (max 1, power scale)")
    shares = amap.shares
    fig.suptitle(title or (f"FINE attention from RAS ({', '.join(f'{v:.0f}' for v in amap.point_ras)}) mm, {amap.stage} block {amap.block}, "
                           f"{amap.bank} bank: {100 * shares['outside_crop']:.0f}% outside the crop (white), "
                           f"{100 * shares['volume']:.0f}% through volume tokens"))
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
