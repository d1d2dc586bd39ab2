"""Advantages of each algorithm against hand-worked examples."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.advantages import (
    broadcast_steps, gae_advantages, grpo_advantages, rloo_advantages, vineppo_step_advantages, whiten)


def test_vineppo_step_advantages_by_hand():
    # States s0 (prompt), s1, s2 valued 0.5, 0.75, 0.25; the response is correct (R = 1).
    # A0 = V(s1) - V(s0) = 0.25; A1 = V(s2) - V(s1) = -0.5; A2 = R - V(s2) = 0.75.
    assert vineppo_step_advantages([0.5, 0.75, 0.25], 1.0) == pytest.approx([0.25, -0.5, 0.75])
    # A wrong response: the last step gets 0 - V(s2).
    assert vineppo_step_advantages([0.5, 0.75, 0.25], 0.0) == pytest.approx([0.25, -0.5, -0.25])
    # One step: R - V(s0).
    assert vineppo_step_advantages([0.4], 1.0) == pytest.approx([0.6])
    # Advantages telescope: their sum is R - V(s0) whatever the intermediate values.
    vals = [0.1, 0.9, 0.3, 0.6]
    assert sum(vineppo_step_advantages(vals, 1.0)) == pytest.approx(1.0 - 0.1)
    with pytest.raises(ValueError, match="at least one step"):
        vineppo_step_advantages([], 1.0)


def test_vineppo_backfill_gives_zero_past_the_cap():
    # A cap of 2 states on a 4-step response: values [V0, V1, R, R] (back-filled with R = 1).
    adv = vineppo_step_advantages([0.5, 0.25, 1.0, 1.0], 1.0)
    assert adv == pytest.approx([-0.25, 0.75, 0.0, 0.0])  # the boundary step gets R - V(s1)


def test_broadcast_steps_to_tokens():
    out = broadcast_steps([0.25, -0.5, 0.75], [2, 5, 6])
    assert out.tolist() == [0.25, 0.25, -0.5, -0.5, -0.5, 0.75]
    with pytest.raises(ValueError, match="3 step values for 2 steps"):
        broadcast_steps([1.0, 2.0, 3.0], [2, 4])
    with pytest.raises(ValueError, match="rise strictly"):
        broadcast_steps([1.0, 2.0], [3, 3])


def test_gae_lambda_one_is_return_minus_value():
    values = torch.tensor([0.2, 0.4, 0.7])
    adv, ret = gae_advantages(values, reward=1.0, gamma=1.0, lam=1.0)
    # lambda = gamma = 1: A_t = R - V_t; returns = R everywhere.
    assert adv.tolist() == pytest.approx([0.8, 0.6, 0.3])
    assert ret.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gae_by_hand_with_lambda_and_gamma():
    values = torch.tensor([0.5, 0.25])
    gamma, lam = 0.9, 0.5
    # deltas: d1 = 1 + 0 - 0.25 = 0.75; d0 = 0 + 0.9 * 0.25 - 0.5 = -0.275
    # A1 = 0.75; A0 = -0.275 + 0.9 * 0.5 * 0.75 = 0.0625
    adv, ret = gae_advantages(values, reward=1.0, gamma=gamma, lam=lam)
    assert adv.tolist() == pytest.approx([0.0625, 0.75])
    assert ret.tolist() == pytest.approx([0.5625, 1.0])


def test_grpo_by_hand():
    # rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3).
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert grpo_advantages([1, 0, 0, 1]) == pytest.approx([a, -a, -a, a])
    # Dr.GRPO: no std division.
    assert grpo_advantages([1, 0, 0, 1], scale_by_std=False) == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # All equal: zero advantage (no signal), finite thanks to eps.
    assert grpo_advantages([1, 1, 1]) == pytest.approx([0.0, 0.0, 0.0])
    assert grpo_advantages([1.0]) == [0.0]


def test_rloo_by_hand():
    # r = [1, 0, 0, 1]: each baseline is the mean of the other three.
    assert rloo_advantages([1, 0, 0, 1]) == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert rloo_advantages([1, 0]) == pytest.approx([1.0, -1.0])
    assert rloo_advantages([0.5]) == [0.0]


def test_whiten_masked_token_level():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + 1e-8)
    assert out[mask].tolist() == pytest.approx(expected.tolist())
    assert out[~mask].tolist() == [0.0, 0.0]
    assert float(out[mask].mean()) == pytest.approx(0.0, abs=1e-6)
