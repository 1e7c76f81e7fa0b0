"""The FINE network, its configs and its volume-token state."""
from .config import CONFIGS, FINEConfig, get_config
from .network import FINE, FINEOutput, build_model
from .tokens import VolumeGrid, VolumeTokenState

__all__ = ["CONFIGS", "FINE", "FINEConfig", "FINEOutput", "VolumeGrid", "VolumeTokenState", "build_model", "get_config"]
