"""SEED-2 image tokenizer pieces: architecture, modules, strict weight loading, unCLIP decoder."""
from .arch import CLIP_MEAN, CLIP_STD, REAL, SeedArch, tiny_arch
from .quantizer import SeedQuantizer
from .weights import CheckpointError, load_seed_weights, save_seed_weights

__all__ = ["CLIP_MEAN", "CLIP_STD", "REAL", "SeedArch", "tiny_arch", "SeedQuantizer", "CheckpointError",
           "load_seed_weights", "save_seed_weights"]
