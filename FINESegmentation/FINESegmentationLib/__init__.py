"""FINESegmentation engine: the FINE transformer and everything around it.

Importable with no ``slicer``, ``qt`` or ``ctk``; the Slicer module, the
``fine-seg`` command line and Python scripts all call this package.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Python API, imported lazily so that ``import FINESegmentationLib`` stays light.
    if name in ("Segmenter", "SegmentationResult", "Progress"):
        from . import inference

        return getattr(inference, name)
    if name in ("AttentionMapper", "AttentionMap"):
        from . import attention

        return getattr(attention, name)
    if name in ("read_volume", "read_segmentation", "write_segmentation", "write_volume"):
        from . import io

        return getattr(io, name)
    if name in ("RefinerPredictor", "RefinerResult"):
        from .refiner import predictor

        return getattr(predictor, name)
    if name in ("SlicePredictor", "PropagationSettings", "Prediction"):
        from .refiner.litemedsam import predictor as slice_predictor

        return getattr(slice_predictor, name)
    if name == "refine_all":
        from .refiner.litemedsam.refine_all import refine_all

        return refine_all
    if name in ("read_markups_points", "read_markups_box"):
        from . import markups

        return getattr(markups, name)
    if name in ("Volume", "Geometry"):
        from . import volume

        return getattr(volume, name)
    raise AttributeError(f"module 'FINESegmentationLib' has no attribute '{name}'")
