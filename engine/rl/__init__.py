"""RL for reasoning on the Engine's live weights: VinePPO, PPO, GRPO, RLOO, CAPO, RestEM, DPO+, REINFORCE++ (engine.rl.algorithms).

    from engine.rl import Trainer, load_config
    Trainer(load_config("smoke", {"run_dir": "runs/x"})).run()
"""
from engine.rl.advantages import (
    broadcast_steps, gae_advantages, grpo_advantages, rloo_advantages, vineppo_step_advantages, whiten)
from engine.rl.config import ConfigError, TrainConfig, load_config
from engine.rl.loss import Aggregation, KLEstimator, PPOStats, aggregate, kl_penalty, ppo_loss
from engine.rl.steps import STEP_STYLES, StepStyle, split_steps, step_token_ends, token_char_starts


def __getattr__(name: str):
    # The trainer pulls in the Engine and the kernels; load it only when asked for.
    if name in ("Trainer", "TrainingDiverged"):
        from engine.rl import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = [
    "Aggregation", "ConfigError", "KLEstimator", "PPOStats", "STEP_STYLES", "StepStyle", "TrainConfig", "Trainer",
    "TrainingDiverged", "aggregate", "broadcast_steps", "gae_advantages", "grpo_advantages", "kl_penalty",
    "load_config", "ppo_loss", "rloo_advantages", "split_steps", "step_token_ends", "token_char_starts",
    "vineppo_step_advantages", "whiten",
]
