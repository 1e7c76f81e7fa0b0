"""Synthetic CT around real organ label maps: body, organs, intensities, scanner, tied together by the generator."""
from .anatomy import VALIDATION_MAPS, split_maps
from .generator import SynthCase, SynthGenerator, write_synth_dataset
from .intensities import HU_RANGES, PHASES
from .scanner import FOV_KINDS

__all__ = [
    "FOV_KINDS", "HU_RANGES", "PHASES", "VALIDATION_MAPS", "SynthCase", "SynthGenerator", "split_maps", "write_synth_dataset",
]
