"""VinePPO on a lean branching inference engine.

Public API (grows with the sampler and trainer issues):
    load_model(path, dtype=None, device="cpu") -> (Transformer, tokenizer | None)
"""
from engine.model import CheckpointError, ConfigError, ModelConfig, Transformer, load_model

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "Transformer", "load_model"]
__version__ = "0.1.0"
