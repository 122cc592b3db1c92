"""Spec2VolCAMU-Net, its baselines, a model registry and the checkpoint format.

This subpackage depends on nothing else of spec2vol_bids except its error classes.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .registry import build_model, config_from_dict, list_models, model_from_config

__all__ = ["ModelConfig", "build_model", "config_from_dict", "list_models", "load_checkpoint",
           "model_from_config", "save_checkpoint"]
