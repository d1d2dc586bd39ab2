"""GRPO: each sample's advantage is its reward against its prompt's group (mean, and by default
divided by the group's std); Dr.GRPO (`grpo_scale_by_std: false`) leaves out the std and
normalises each sequence's summed loss by a constant."""
from __future__ import annotations

import torch

from engine.rl import advantages as adv_lib
from engine.rl.algorithms.base import TrainerContext
from engine.rl.algorithms.policy_gradient import PolicyGradient, groups_of
from engine.rl.config import ConfigError, TrainConfig
from engine.rl.rollout import Episode


class GroupRelative(PolicyGradient):
    """Sequence-level advantages from the rewards of a prompt's samples, given to every token."""

    uses_prompt_groups = "compares the samples of a prompt"

    def group_advantages(self, rewards: list[float]) -> list[float]:
        raise NotImplementedError

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        for members in groups_of(episodes).values():
            for ep, a in zip(members, self.group_advantages([e.reward for e in members])):
                ep.advantages = torch.full((ep.num_tokens,), float(a))
        return {}


class GRPO(GroupRelative):
    name = "grpo"

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if not cfg.grpo_scale_by_std and cfg.loss_aggregation != "seq-mean-token-sum-norm":
            raise ConfigError("Dr.GRPO (grpo_scale_by_std: false) divides each sequence's summed loss by a constant "
                              "(max_new_tokens); set loss_aggregation: seq-mean-token-sum-norm "
                              f"(got {cfg.loss_aggregation!r})")
        if not cfg.grpo_scale_by_std and cfg.whiten:
            raise ConfigError("Dr.GRPO (grpo_scale_by_std: false) leaves advantages unscaled; whitening would divide "
                              f"them by the minibatch std again: set whiten_advantages: false "
                              f"(got {cfg.whiten_advantages!r})")

    def group_advantages(self, rewards: list[float]) -> list[float]:
        return adv_lib.grpo_advantages(rewards, scale_by_std=self.cfg.grpo_scale_by_std)
