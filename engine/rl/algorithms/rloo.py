"""RLOO: each sample's advantage is its reward minus the mean reward of its prompt's other samples."""
from __future__ import annotations

from engine.rl import advantages as adv_lib
from engine.rl.algorithms.grpo import GroupRelative


class RLOO(GroupRelative):
    name = "rloo"

    def group_advantages(self, rewards: list[float]) -> list[float]:
        return adv_lib.rloo_advantages(rewards)
