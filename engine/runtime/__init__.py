"""The sampler: Engine, SamplingParams, Completion (paged KV, radix prefix cache, KV-level forks)."""
from engine.runtime.engine import Engine
from engine.runtime.paged_attention import AttentionStats
from engine.runtime.params import Completion, EngineStats, SamplingParams

__all__ = ["AttentionStats", "Completion", "Engine", "EngineStats", "SamplingParams"]
