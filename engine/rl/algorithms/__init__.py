"""One module per RL algorithm, and the registry that maps each `--algo` name to its class.

Adding an algorithm: a module here with a subclass of `Algorithm` (engine/rl/algorithms/base.py
says what each method may do; `PolicyGradient` is the PPO-clip update most reuse, so a new
credit rule is one `credit` method), and one line in REGISTRY. reinforce_pp.py is the example.
"""
from __future__ import annotations

from engine.rl.algorithms.base import (
    Algorithm, LossOut, Minibatch, Trainable, TrainerContext, TrainingDiverged,
)
from engine.rl.algorithms.capo import CAPO
from engine.rl.algorithms.dpo_plus import DPOPlus
from engine.rl.algorithms.grpo import GRPO
from engine.rl.algorithms.ppo import PPO, ValueModel
from engine.rl.algorithms.reinforce_pp import ReinforcePP, ReinforcePPBaseline
from engine.rl.algorithms.restem import RestEM
from engine.rl.algorithms.rloo import RLOO
from engine.rl.algorithms.spo_tree import SPOTree
from engine.rl.algorithms.vineppo import VinePPO

REGISTRY: dict[str, type[Algorithm]] = {
    "vineppo": VinePPO,
    "ppo": PPO,
    "grpo": GRPO,
    "rloo": RLOO,
    "capo": CAPO,
    "restem": RestEM,
    "dpo+": DPOPlus,
    "reinforce++": ReinforcePP,
    "reinforce++-baseline": ReinforcePPBaseline,
    "spo-tree": SPOTree,
}

__all__ = ["Algorithm", "LossOut", "Minibatch", "REGISTRY", "Trainable", "TrainerContext", "TrainingDiverged",
           "ValueModel", "algorithm_class"]


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered under `name` (ValueError naming the choices otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algo {name!r}; choose one of {', '.join(REGISTRY)}") from None
