"""REINFORCE++ (Hu 2025, OpenRLHF's default baseline): no critic and no per-prompt groups; each
response's reward is given to its tokens and whitened over every token of the iteration's
batch (all ranks): the batch mean is the baseline, the batch std the scale. The update is the
shared PPO-clip objective with its KL term (`kl_coef`).

`reinforce++-baseline` subtracts each prompt's mean reward first (a group baseline, as GRPO's
without its std), then whitens globally the same way."""
from __future__ import annotations

import torch

from engine.rl.algorithms.base import TrainerContext
from engine.rl.algorithms.policy_gradient import PolicyGradient, groups_of, whiten
from engine.rl.rollout import Episode


class ReinforcePP(PolicyGradient):
    name = "reinforce++"

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        for ep, r in zip(episodes, self.baselined_rewards(episodes)):
            ep.advantages = torch.full((ep.num_tokens,), float(r))
        white = whiten(episodes, ctx)  # over every token of every rank's episodes (a collective)
        for ep in episodes:
            ep.advantages = white[id(ep)]
        return {}

    def baselined_rewards(self, episodes: list[Episode]) -> list[float]:
        return [ep.reward for ep in episodes]


class ReinforcePPBaseline(ReinforcePP):
    name = "reinforce++-baseline"
    uses_prompt_groups = "subtracts each prompt's mean reward"

    def baselined_rewards(self, episodes: list[Episode]) -> list[float]:
        centred: dict[int, float] = {}
        for members in groups_of(episodes).values():
            mean = sum(e.reward for e in members) / len(members)
            for e in members:
                centred[id(e)] = e.reward - mean
        return [centred[id(e)] for e in episodes]
