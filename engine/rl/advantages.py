"""Advantages for each algorithm: VinePPO (MC step values), PPO (critic + GAE), GRPO, RLOO.

Every function returns per-token advantages for one response (a 1-D tensor over its
generated tokens) or for a group of responses to one prompt, so the PPO loss sees one
layout whatever the algorithm. Rewards are outcome rewards in {0, 1} (or any float) given
at the last token; gamma = 1 unless stated.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def vineppo_step_advantages(values: Sequence[float], reward: float) -> list[float]:
    """A_i = r_i + V(s_{i+1}) - V(s_i) with gamma 1, a reward only at the last step and V(terminal) = 0.

    values[i] = V(s_i), the estimated value of the state *before* step i (values[0] is the
    prompt alone), one per step. So step i < T-1 gets values[i+1] - values[i] and the last
    step gets reward - values[T-1].
    """
    if not values:
        raise ValueError("a response needs at least one step (and so one state value)")
    nxt = list(values[1:]) + [None]
    return [(reward if n is None else n) - v for v, n in zip(values, nxt)]


def broadcast_steps(step_values: Sequence[float], step_ends: Sequence[int]) -> torch.Tensor:
    """Per-token tensor: every token of step i (tokens [step_ends[i-1], step_ends[i])) gets step_values[i]."""
    if len(step_values) != len(step_ends):
        raise ValueError(f"{len(step_values)} step values for {len(step_ends)} steps")
    if any(b <= a for a, b in zip([0, *step_ends[:-1]], step_ends)):
        raise ValueError(f"step ends must rise strictly from above 0, got {list(step_ends)}")
    lengths = torch.tensor([b - a for a, b in zip([0, *step_ends[:-1]], step_ends)])
    return torch.repeat_interleave(torch.tensor(step_values, dtype=torch.float32), lengths)


def gae_advantages(values: torch.Tensor, reward: float, gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of one response from critic values, with the reward on the last token.

    values[t] = V(prompt + response[:t]) for each generated token t; the state after the
    last token is terminal (V = 0). delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma
    lam)^l delta_{t+l}; returns = A + V are the critic's regression targets.
    """
    values = values.float()
    n = values.numel()
    rewards = torch.zeros(n)
    rewards[-1] = reward
    next_values = torch.cat([values[1:], values.new_zeros(1)])
    deltas = rewards + gamma * next_values - values
    adv = torch.empty(n)
    running = 0.0
    for t in range(n - 1, -1, -1):
        running = float(deltas[t]) + gamma * lam * running
        adv[t] = running
    return adv, adv + values


def grpo_advantages(rewards: Sequence[float], scale_by_std: bool = True, eps: float = 1e-6) -> list[float]:
    """Group-relative advantages of the responses to one prompt: (r - mean) / (std + eps).

    std is the unbiased sample std, as in the GRPO paper and verl; scale_by_std=False is
    Dr.GRPO (no division). A group of one gets advantage 0.
    """
    r = torch.tensor(rewards, dtype=torch.float64)
    if r.numel() < 2:
        return [0.0] * r.numel()
    adv = r - r.mean()
    if scale_by_std:
        adv = adv / (r.std() + eps)
    return adv.tolist()


def rloo_advantages(rewards: Sequence[float]) -> list[float]:
    """Leave-one-out baseline: r_i - mean of the other responses' rewards. A group of one gets 0."""
    r = torch.tensor(rewards, dtype=torch.float64)
    n = r.numel()
    if n < 2:
        return [0.0] * n
    return (r - (r.sum() - r) / (n - 1)).tolist()


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var); masked-out entries -> 0.

    VinePPO whitens the advantages of each optimizer minibatch this way, token-level.
    """
    keep = mask.bool()
    n = int(keep.sum())
    if n == 0:
        return torch.zeros_like(values)
    x = values[keep].double()
    var = x.var(unbiased=True) if n > 1 else x.new_zeros(())
    out = (values.double() - x.mean()) * torch.rsqrt(var + eps)
    return torch.where(keep, out, 0.0).to(values.dtype)
