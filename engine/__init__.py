"""VinePPO on a lean branching inference engine.

Public API:
    load_model(path, dtype=None, device="cpu") -> (Transformer, tokenizer | None)
    Engine(model, tokenizer).generate(prompts, SamplingParams(...)) -> list[list[Completion]]

The names load on first use (PEP 562), so that `import engine.kernels` imports the Triton
kernels alone: the kernels import nothing else from `engine`, and importing them does not pull
in the model, the runtime or transformers either.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below resolves them
    from engine.model import CheckpointError, ConfigError, ModelConfig, Transformer, load_model
    from engine.runtime import Completion, Engine, EngineStats, SamplingParams

_EXPORTS = {
    "CheckpointError": "engine.model", "ConfigError": "engine.model", "ModelConfig": "engine.model",
    "Transformer": "engine.model", "load_model": "engine.model",
    "Completion": "engine.runtime", "Engine": "engine.runtime", "EngineStats": "engine.runtime",
    "SamplingParams": "engine.runtime",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
