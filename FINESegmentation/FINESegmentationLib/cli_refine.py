"""``fine-seg refine`` and the refiner's training commands (``refiner-train``, ``refiner-memory``, ``refiner-evaluate``).

``refine`` drives two refiners: LiteMedSAM slice by slice (a box, clicks beside a box or on an existing
segment; creates an empty or absent segment) and the Memorizing-SAM 3-D refiner (clicks on an existing
segment). Like every subcommand, errors a user can cause end in one sentence (``cli.main`` prints them).
"""
from __future__ import annotations

import argparse
import sys

from .cli_arguments import Number
from .refiner.config import DEFAULT_REACH_FACTOR, DEFAULT_REACH_MM


def _refiner_predictor(args: argparse.Namespace):
    from .refiner.predictor import DEFAULT_MEMORY, RefinerPredictor

    memory = None if args.no_memory else (args.memory or DEFAULT_MEMORY)
    return RefinerPredictor(model=args.model, memory=memory)


REFINERS = ("auto", "litemedsam", "memorizing-sam")


def _labels_on_ct(args: argparse.Namespace, volume):
    """The segmentation of ``--seg`` on the CT's grid (zeros without ``--seg``)."""
    import numpy as np
    import SimpleITK as sitk

    from .io import read_segmentation, volume_to_sitk
    from .volume import Volume

    if args.seg is None:
        return Volume(np.zeros(volume.shape, np.uint8), volume.geometry)
    labels = read_segmentation(args.seg)
    if labels.shape != volume.shape or not labels.geometry.allclose(volume.geometry):
        # Slicer saves segmentations cropped to their extent: bring the labels onto the CT's grid.
        reference = volume_to_sitk(Volume(np.zeros(volume.shape, np.uint8), volume.geometry))
        moved = sitk.Resample(volume_to_sitk(labels), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        labels = Volume(sitk.GetArrayFromImage(moved), volume.geometry)
    return labels


def _choose_refiner(args: argparse.Namespace, segment: np.ndarray | None = None, volume=None, points=None, positive=None) -> str:
    """``--refiner``, or for ``auto``: the kind of a registered ``--model`` (or of a weights file), else the rule
    every front end shares (:func:`~.refiner.choice.automatic_refiner`): a box, an empty segment or a positive
    click far outside the segment: LiteMedSAM (click-tuned weights when registered); clicks alone on a segment
    FINE found: the Memorizing-SAM refiner."""
    from .checkpoints import read_registry
    from .errors import InputError

    choice = args.refiner
    if choice == "auto":
        if args.model is not None and (args.model in read_registry(kind="refiner-2d") or args.model in read_registry(kind="refiner-2d-clicks")):
            choice = "litemedsam"
        elif args.model is not None and args.model in read_registry(kind="refiner"):
            choice = "memorizing-sam"
        elif args.box:
            choice = "litemedsam"
        elif args.model is not None:  # a weights file: LiteMedSAM's click weights, else a Memorizing-SAM refiner
            from .refiner.litemedsam.click_weights import slice_weights

            choice = "litemedsam" if slice_weights(args.model)[1] else "memorizing-sam"
        else:
            from .refiner.choice import automatic_refiner

            choice = automatic_refiner(segment, volume.geometry if volume is not None else None, box=False,
                                       points=points if args.points else None, positive=positive)
            if choice == "litemedsam" and not read_registry(kind="refiner-2d-clicks"):
                choice = "memorizing-sam"  # LiteMedSAM's published weights do not follow clicks
    if choice == "memorizing-sam":
        if args.box:
            raise InputError("The Memorizing-SAM refiner takes clicks only; use --refiner litemedsam for a box.")
        if not args.points:
            raise InputError("The Memorizing-SAM refiner needs clicks: give --points POINTS.mrk.json.")
        if args.seg is None:
            raise InputError("The Memorizing-SAM refiner refines an existing segment: give --seg with the segmentation.")
    elif not (args.box or args.points):
        raise InputError("Give a box (--box ROI.mrk.json) or clicks (--points POINTS.mrk.json) to refine the segment with.")
    return choice


def _write_refined(labels, segment, mask, organ, volume, output) -> int:
    """Write ``labels`` with ``organ`` replaced by ``mask`` (other organs kept where it does not reach); voxels changed."""
    from .io import write_segmentation
    from .volume import Volume

    refined = labels.array.copy()
    refined[segment & ~mask] = 0
    refined[mask] = organ.label
    write_segmentation(Volume(refined, volume.geometry), output)
    return int((segment != mask).sum())


def _cmd_refine(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import InputError
    from .io import _normalised_name, check_output_path, read_volume
    from .labels import ORGANS
    from .markups import read_markups_box, read_markups_points

    output = check_output_path(args.output)
    organ = next((o for o in ORGANS if _normalised_name(o.name) == _normalised_name(args.segment)), None)
    if organ is None:
        raise InputError(f"There is no segment named '{args.segment}'; name one of: {', '.join(o.name for o in ORGANS)}.")
    volume = read_volume(args.input)
    labels = _labels_on_ct(args, volume)
    segment = labels.array == organ.label
    box = read_markups_box(args.box) if args.box else None
    points, positive = read_markups_points(args.points) if args.points else (np.zeros((0, 3)), np.zeros(0, bool))
    refiner = _choose_refiner(args, segment, volume, points, positive)
    counts = f"{int(positive.sum())} positive, {int((~positive).sum())} negative"
    if refiner == "memorizing-sam":
        if not segment.any():
            raise InputError(f"The segment '{organ.name}' in {args.seg} is empty inside the volume; draw a box around the organ (--box) to create it.")
        predictor = _refiner_predictor(args)
        predictor.set_volume(volume, segment)
        result = predictor.predict(points, positive.astype(int), use_memory=predictor.has_memory, reach_mm=args.click_reach or None,
                                   reach_factor=args.click_reach_factor)
        mask = result.paste(segment)
        memory = f"memory {predictor.memory_name}" if result.used_memory else "no memory"
        changed = _write_refined(labels, segment, mask, organ, volume, output)
        print(f"Refined '{organ.name}' by Memorizing-SAM with {len(points)} click(s) ({counts}; {memory}): {changed} voxel(s) changed, predicted IoU {result.iou:.2f}, "
              f"{1000 * (predictor.timings['total_s'] + result.timings['total_s']):.0f} ms -> {output}")
        return 0
    from .refiner.litemedsam.predictor import SlicePredictor

    # Without --model, a memory goes with the weights it was built over (click-tuned or published).
    predictor = SlicePredictor(model=args.model, memory=None if args.no_memory else args.memory)
    if len(points) and not predictor.click_trained:
        print("fine-seg: warning: these LiteMedSAM weights are trained on boxes only; on the real CT of README one click after "
              "a box lowered the kidneys' Dice from 0.91-0.93 to 0.48-0.50, so prefer a box or the click-tuned weights.", file=sys.stderr)
    predictor.set_volume(volume)
    result = predictor.predict(box=box, points=points if len(points) else None, labels=positive.astype(int) if len(points) else None,
                               previous_mask=segment)
    changed = _write_refined(labels, segment, result.mask, organ, volume, output)
    drawn = sorted(result.drawn)
    clicks = f"{len(points)} click(s) ({counts})"
    prompt = ("a box" + (f" and {clicks}" if len(points) else "")) if box is not None else clicks
    memory = f"; memory {args.memory}" if result.used_memory else ""
    weights = "click-tuned LiteMedSAM" if predictor.click_trained else "LiteMedSAM"
    print(f"Refined '{organ.name}' by {weights} with {prompt}{memory}: slices {drawn[0] + 1}-{drawn[-1] + 1} redrawn "
          f"(up: {result.stops.get('up', '-')}; down: {result.stops.get('down', '-')}), {changed} voxel(s) changed, "
          f"{result.timings['total_s']:.1f} s ({result.timings['embed_s']:.1f} s embedding slices) -> {output}")
    return 0


def _cmd_refiner_train(args: argparse.Namespace) -> int:
    from .refiner.training import RefinerTrainSettings, train_refiner
    from .checkpoints import sha256_of

    path = train_refiner(RefinerTrainSettings(
        data=args.data, out=args.out, config=args.config, steps=args.steps, batch_size=args.batch_size, iterations=args.iterations,
        lr=args.lr, seed=args.seed, crops_per_organ=args.crops_per_organ, memory_probability=args.memory_probability,
        validation_cases=args.hold_out or [], description=args.description, progress=not args.quiet,
    ))
    print(f"Trained refiner: {path} (sha256 {sha256_of(path)})")
    return 0


def _cmd_refiner_memory(args: argparse.Namespace) -> int:
    from .io import check_output_path

    output = check_output_path(args.output, (".pt",))
    if args.refiner == "litemedsam":
        from .refiner.litemedsam.click_weights import load_slice_model
        from .refiner.litemedsam.memory import MemorySettings, slice_memory_from_dataset

        given = {"site": args.site, "local_ratio": args.local_ratio, "k": args.k, "roi_grid": args.roi_grid}
        settings = MemorySettings(**{key: value for key, value in given.items() if value is not None})
        memory = slice_memory_from_dataset(load_slice_model(args.model), args.data, args.cases, args.slices_per_organ, settings,
                                           args.description, progress=not args.quiet)
    else:
        from .refiner.build import load_refiner
        from .refiner.memory import memory_from_dataset

        model, metadata, entry = load_refiner(args.model)
        memory = memory_from_dataset(model, args.data, args.cases, args.description, entry.name if entry else str(args.model), progress=not args.quiet)
    sha = memory.save(output)
    print(f"Memory of {len(memory)} labelled example(s) -> {output} ({output.stat().st_size / 2**20:.1f} MB, sha256 {sha})")
    return 0


def _cmd_refiner_evaluate(args: argparse.Namespace) -> int:
    from .io import check_output_path, write_text_atomically
    from .refiner.evaluation import click_curves

    for target in (args.csv, args.markdown):
        if target:
            check_output_path(target, (".csv", ".md"))
    predictor = _refiner_predictor(args)
    modes = (False, True) if predictor.has_memory else (False,)
    curves = click_curves(predictor, args.data, args.cases, args.clicks, modes, args.seed, progress=not args.quiet, initial=args.initial,
                          reach_mm=args.click_reach or None, reach_factor=args.click_reach_factor)
    table = curves.markdown()
    if curves.missed:
        table += f"\n\n{len(curves.missed)} organ(s) had an empty initial segment (nothing to refine): " + \
            ", ".join(f"{organ} in {case}" for case, organ in curves.missed) + "."
    print(table)
    if args.csv:
        write_text_atomically(args.csv, curves.csv())
    if args.markdown:
        write_text_atomically(args.markdown, table + "\n")
    return 0


def _click_reach_options(p: argparse.ArgumentParser) -> None:
    """``--click-reach`` and ``--click-reach-factor``: how far from its clicks a Memorizing-SAM answer changes the segment."""
    p.add_argument("--click-reach", type=Number(at_least=0), default=DEFAULT_REACH_MM, metavar="MM",
                   help=f"Memorizing-SAM: the answer changes the segment only within MM of a click (default {DEFAULT_REACH_MM:g}; "
                   "0: anywhere in the refiner's crop)")
    p.add_argument("--click-reach-factor", type=Number(at_least=0), default=DEFAULT_REACH_FACTOR, metavar="F",
                   help=f"Memorizing-SAM: a click reaches F times its distance to the segment's border where that is farther than "
                   f"--click-reach (a click deep in a missed part marks a larger error; default {DEFAULT_REACH_FACTOR:g}; 0: --click-reach only)")


def add_refiner_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``refine``, ``refiner-train``, ``refiner-memory`` and ``refiner-evaluate`` on the subparsers."""
    p = sub.add_parser("refine", help="refine or create one segment with a box and clicks (LiteMedSAM) or clicks (Memorizing-SAM)")
    p.add_argument("input", metavar="INPUT", help="the CT the segmentation belongs to")
    p.add_argument("--seg", help="segmentation (.seg.nrrd or label map) holding the segment; the segment may be empty or absent "
                   "(LiteMedSAM creates it from a box, or from a positive click with its click-tuned weights); without --seg the output holds the new segment only")
    p.add_argument("--segment", required=True, help="name of the segment to refine, e.g. liver or 'left kidney'")
    p.add_argument("--box", metavar="BOX.mrk.json", help="Slicer markups file with a box around the organ: an ROI (on one slice, "
                   "or spanning the slices to segment) or a line across the organ on one slice (LiteMedSAM)")
    p.add_argument("--points", metavar="POINTS.mrk.json", help="Slicer markups file with the clicks: a point is "
                   "negative (remove) when its label starts with '-' or its description is 'negative', else positive (add). "
                   "With LiteMedSAM's click-tuned weights (the default weights) a positive click alone segments its slice and propagates; "
                   "the published weights are trained on boxes only")
    p.add_argument("-o", "--output", required=True, help="refined segmentation (.seg.nrrd, or a label map); other segments are kept")
    p.add_argument("--refiner", choices=REFINERS, default="auto", help="litemedsam (2-D, slice by slice: boxes and clicks), "
                   "memorizing-sam (3-D, clicks on an existing segment) or auto (default): memorizing-sam for clicks on a segment FINE "
                   "found (ahead after five clicks, README), litemedsam for a box, an empty segment or a positive click more than 20 mm "
                   "outside the segment")
    p.add_argument("--model", default=None, help="registered refiner name or weights file of the chosen refiner (default: the bundled one; "
                   "LiteMedSAM: litemedsam-clicks, or litemedsam for the published box-only weights)")
    p.add_argument("--memory", default=None, help="registered memory name or memory file (Memorizing-SAM default: the refiner's "
                   "registered memory; LiteMedSAM default: none, see README for why)")
    p.add_argument("--no-memory", action="store_true", help="refine without a memory")
    _click_reach_options(p)
    p.set_defaults(func=_cmd_refine)

    p = sub.add_parser("refiner-train", help="train a Memorizing-SAM refiner on a labelled dataset with simulated clicks")
    p.add_argument("--data", required=True, help="dataset folder: nnU-Net / MSD (imagesTr, labelsTr) or BCV (img, label)")
    p.add_argument("--out", required=True, help="folder for refiner.pt and training_log.csv")
    p.add_argument("--config", default="refiner-tiny", help="refiner-tiny (CPU) or refiner-base (the paper's size)")
    p.add_argument("--steps", type=Number(int, at_least=1), default=700)
    p.add_argument("--batch-size", type=int, default=4, help="crops of one organ per step (at least 2: they are each other's memory)")
    p.add_argument("--iterations", type=Number(int, at_least=1), default=4, help="decoder passes per crop: the initial prompt, then one click more each")
    p.add_argument("--lr", type=Number(above=0), default=1e-3)
    p.add_argument("--seed", type=Number(int, at_least=0), default=0)
    p.add_argument("--crops-per-organ", type=Number(int, at_least=1), default=2, help="randomly shifted crops per organ and case")
    p.add_argument("--memory-probability", type=Number(at_least=0, at_most=1), default=0.5, help="share of steps that train with in-batch memory")
    p.add_argument("--hold-out", nargs="*", metavar="CASE", help="case ids kept out of training")
    p.add_argument("--description", default="", help="what the refiner is (stored in the checkpoint)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_refiner_train)

    p = sub.add_parser("refiner-memory", help="build a refiner's memory file from a labelled dataset")
    p.add_argument("--data", required=True, help="labelled dataset folder (nnU-Net / MSD or BCV layout)")
    p.add_argument("--refiner", choices=REFINERS[1:], default="memorizing-sam", help="the refiner the memory is for")
    p.add_argument("--model", default=None, help="registered refiner name or weights file (default: the bundled one; for "
                   "LiteMedSAM the click-tuned weights, as fine-seg refine uses them, or --model litemedsam for the published ones)")
    p.add_argument("-o", "--output", required=True, help="memory file to write (.pt)")
    p.add_argument("--cases", nargs="*", help="case ids to memorise (default: all)")
    p.add_argument("--description", default="", help="what the memory holds (stored in the file)")
    p.add_argument("--slices-per-organ", type=Number(int, at_least=1), default=3,
                   help="LiteMedSAM: slices remembered per organ and case, spread inside the organ (default 3)")
    p.add_argument("--site", default=None, help="LiteMedSAM: the decoder attention that reads the memory (default: the one README "
                   "measured best): token_to_image.0, token_to_image.1, token_to_image.final, image_to_token.0 or image_to_token.1")
    p.add_argument("--local-ratio", type=Number(at_least=0, at_most=1), default=None,
                   help="LiteMedSAM: weight r of the slice's own attention, 1 - r for the memory's (default 0.7, the paper's)")
    p.add_argument("--k", type=Number(int, at_least=1), default=None, help="LiteMedSAM: examples retrieved per prompt (default 3)")
    p.add_argument("--roi-grid", type=Number(int, at_least=1, at_most=64), default=None,
                   help="LiteMedSAM: image positions kept per example, a grid of this side inside its box (default 8)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_refiner_memory)

    p = sub.add_parser("refiner-evaluate", help="Dice after 0..N simulated clicks per organ, with and without memory")
    p.add_argument("--data", required=True, help="labelled dataset folder (nnU-Net / MSD or BCV layout)")
    p.add_argument("--model", default=None, help="registered refiner name or refiner checkpoint")
    p.add_argument("--memory", default=None, help="registered memory name or memory file (default: the refiner's registered memory)")
    p.add_argument("--no-memory", action="store_true", help="evaluate without memory only")
    p.add_argument("--cases", nargs="*", help="case ids to evaluate (default: all)")
    p.add_argument("--clicks", type=Number(int, at_least=0), default=10)
    p.add_argument("--initial", metavar="DIR", help="start from FINE's segmentations in DIR (<case>.nii.gz or .seg.nrrd, "
                   "as fine-seg segment writes them) instead of perturbed reference masks")
    p.add_argument("--seed", type=Number(int, at_least=0), default=0, help="seed of the initial masks and the random clicks")
    p.add_argument("--csv", help="write one row per case, organ, memory mode and click count")
    p.add_argument("--markdown", help="write the table as markdown")
    _click_reach_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_refiner_evaluate)
