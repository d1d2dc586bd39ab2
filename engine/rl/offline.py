"""The critic-free baselines of the VinePPO paper: RestEM's filter and DPO+'s pairs and loss.

RestEM (ReST-EM, Singh et al. 2023): keep the correct samples of each prompt (optionally at
most `max_per_prompt` of them) and fine-tune on them with cross-entropy.

DPO+ ("DPO-Positive", DPOP, Pal et al. 2024, arXiv 2402.13228, Eq. 3), as the VinePPO
authors implement it (their `dpo_positive` trainer): per (chosen, rejected) pair, with
sequence log-probs (sums over the response tokens) of the policy (pi) and the frozen
reference (ref),

    logits = (pi_c - pi_r) - (ref_c - ref_r) - lam * max(0, ref_c - pi_c)
    loss   = -log sigmoid(beta * logits)            averaged over pairs

The lam term is a hinge NLL penalty on the chosen response, relative to the reference:
it is zero while the policy gives the chosen response at least the reference's likelihood.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.rl.rollout import Episode

CORRECT = 1.0  # the tasks' rewards are binary: 1.0 = a correct final answer


def _by_prompt(episodes: Sequence[Episode]) -> dict[int, list[Episode]]:
    """Episodes grouped by `group` (the prompt's index within its iteration), in first-seen order."""
    groups: dict[int, list[Episode]] = {}
    for ep in episodes:
        groups.setdefault(ep.group, []).append(ep)
    return groups


def restem_select(episodes: Sequence[Episode], max_per_prompt: int | None, rng: random.Random) -> list[Episode]:
    """The correct episodes (reward == 1), at most `max_per_prompt` per prompt (a random subset
    drawn with `rng` when a prompt has more); prompts keep their order."""
    kept: list[Episode] = []
    for members in _by_prompt(episodes).values():
        correct = [e for e in members if e.reward == CORRECT]
        if max_per_prompt is not None and len(correct) > max_per_prompt:
            correct = rng.sample(correct, max_per_prompt)
        kept += correct
    return kept


@dataclass
class Pairs:
    """DPO+ training pairs of one iteration."""

    pairs: list[tuple[Episode, Episode]]  # (chosen: correct, rejected: incorrect), same prompt
    prompts: int                         # prompts sampled
    prompts_without_pair: int            # prompts whose samples were all correct or all incorrect


def restem_pick_epoch(accuracies: Sequence[float], mode: str) -> int:
    """Which epoch's model RestEM keeps, from validation accuracies after epochs 0..E (epoch 0 =
    the weights before training).

    first-drop: ReST-EM's early stopping (the authors' "restem_paper_original"): walk forward
    while each epoch is strictly more accurate than the one before; the last such epoch.
    best: the most accurate epoch (the earliest on ties).
    """
    if not accuracies:
        raise ValueError("restem_pick_epoch needs the accuracy of at least epoch 0")
    if mode == "first-drop":
        chosen = 0
        while chosen + 1 < len(accuracies) and accuracies[chosen + 1] > accuracies[chosen]:
            chosen += 1
        return chosen
    if mode == "best":
        return max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))
    raise ValueError(f"unknown RestEM early-stop mode {mode!r}; choose first-drop or best")


def dpo_pairs(episodes: Sequence[Episode], max_per_prompt: int | None, rng: random.Random) -> Pairs:
    """(chosen, rejected) pairs per prompt: every (correct, incorrect) combination of its
    samples, then a random `max_per_prompt` of them (drawn with `rng`) when there are more.

    As the authors' math_dpo_positive_episode_generator: all combinations, then a uniform
    random subset without replacement (`max_pairs_per_question: 8`). A prompt with no correct
    or no incorrect sample gives no pair and is counted.
    """
    pairs: list[tuple[Episode, Episode]] = []
    groups = _by_prompt(episodes)
    without = 0
    for members in groups.values():
        correct = [e for e in members if e.reward == CORRECT]
        wrong = [e for e in members if e.reward != CORRECT]
        combos = [(c, r) for c in correct for r in wrong]
        if not combos:
            without += 1
            continue
        if max_per_prompt is not None and len(combos) > max_per_prompt:
            combos = rng.sample(combos, max_per_prompt)
        pairs += combos
    return Pairs(pairs, len(groups), without)


def dpop_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, *, beta: float, nll_coef: float,
              num_pairs: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO-Positive loss of [P] sequence log-probs; the sum over pairs divided by `num_pairs`
    (default P; a whole minibatch's count makes micro-batch losses add up to its mean).

    Returns the loss and statistics summed over these pairs (divide by the pair count):
    reward margin beta * ((pi_c - ref_c) - (pi_r - ref_r)), accuracy (margin > 0), and the
    chosen response's penalty max(0, ref_c - pi_c).
    """
    if beta <= 0 or nll_coef < 0:
        raise ValueError(f"beta must be > 0 and nll_coef >= 0; got {beta}, {nll_coef}")
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()  # the reference is a constant
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    penalty = (ref_chosen - policy_chosen).clamp_min(0.0)
    logits = margin - nll_coef * penalty
    losses = -F.logsigmoid(beta * logits)
    loss = losses.sum() / (len(losses) if num_pairs is None else num_pairs)
    with torch.no_grad():
        stats = {"dpo_reward_margin": float((beta * margin).sum()), "dpo_pair_accuracy": float((margin > 0).sum()),
                 "dpo_chosen_penalty": float(penalty.sum())}
    return loss, stats
