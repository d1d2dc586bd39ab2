"""RL objectives for the trainer: PPO on per-token advantages, KL estimators, aggregation."""
from engine.rl.loss import Aggregation, KLEstimator, PPOStats, aggregate, kl_penalty, ppo_loss

__all__ = ["Aggregation", "KLEstimator", "PPOStats", "aggregate", "kl_penalty", "ppo_loss"]
