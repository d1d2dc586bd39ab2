"""VinePPO on a lean branching inference engine.

Public API:
    load_model(path, dtype=None, device="cpu") -> (Transformer, tokenizer | None)
    Engine(model, tokenizer).generate(prompts, SamplingParams(...)) -> list[list[Completion]]
"""
from engine.model import CheckpointError, ConfigError, ModelConfig, Transformer, load_model
from engine.runtime import Completion, Engine, EngineStats, SamplingParams

__all__ = [
    "CheckpointError", "Completion", "ConfigError", "Engine", "EngineStats", "ModelConfig", "SamplingParams",
    "Transformer", "load_model",
]
__version__ = "0.1.0"
