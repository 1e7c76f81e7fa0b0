"""Memorizing-SAM refiner: refine one segment with clicks, helped by a memory of labelled examples.

One file per part (segment-anything's layout): ``image_encoder`` (3-D ViT with the
memorizing plug-in), ``prompt_encoder``, ``mask_decoder`` (two-way transformer), ``memory``
(the external kNN memory), ``sam3d`` (the model), ``build`` (configs, checkpoints),
``crop`` (the cube around a segment), ``clicks`` (simulated clicks), ``training``,
``evaluation`` and ``predictor`` (:class:`RefinerPredictor`, the API the CLI and Slicer use).

``litemedsam/`` holds the second refiner: LiteMedSAM, a pretrained medical SAM prompted by boxes,
applied slice by slice (:class:`~.litemedsam.predictor.SlicePredictor`, refine-all).
"""


def __getattr__(name: str):
    # Imported lazily so that ``import FINESegmentationLib.refiner`` stays light.
    if name in ("RefinerPredictor", "RefinerResult", "DEFAULT_MEMORY"):
        from . import predictor

        return getattr(predictor, name)
    if name in ("ExternalMemory",):
        from . import memory

        return getattr(memory, name)
    raise AttributeError(f"module 'FINESegmentationLib.refiner' has no attribute '{name}'")
