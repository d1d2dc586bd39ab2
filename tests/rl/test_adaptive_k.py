"""The adaptive MC budget: the allocation rule by hand, and mc_values spending it through the Engine."""
from __future__ import annotations

import math

import pytest
from engine.rl.config import ConfigError
from engine.rl.rollout import AdaptiveK, allocate_rollouts, mc_values
from engine.runtime import SamplingParams
from test_trainer import _SevenTask, fast_config, make_trainer, rows_of  # the helpers of the same folder


def test_allocation_goes_to_the_most_uncertain_mixed_states_first():
    # state: 0 all 0 (settled), 1 mixed 1/2 (se .354), 2 mixed 1/4 (se .217), 3 all 1 (settled), 4 mixed at k_max
    counts = [2, 2, 4, 2, 8]
    sums = [0.0, 1.0, 1.0, 2.0, 4.0]
    sq = [0.0, 1.0, 1.0, 2.0, 4.0]  # 0/1 rewards: squares = values
    assert allocate_rollouts(counts, sums, sq, budget=10, k_max=8, step=2) == [0, 2, 2, 0, 0]
    assert allocate_rollouts(counts, sums, sq, budget=3, k_max=8, step=2) == [0, 2, 1, 0, 0]  # budget runs out
    assert allocate_rollouts(counts, sums, sq, budget=10, k_max=3, step=2) == [0, 1, 0, 0, 0]  # capped at k_max
    assert allocate_rollouts([2, 2], [0.0, 2.0], [0.0, 2.0], budget=10, k_max=8, step=2) == [0, 0]  # all settled
    # ties (same standard error): the earlier state first
    assert allocate_rollouts([2, 2], [1.0, 1.0], [1.0, 1.0], budget=2, k_max=8, step=2) == [2, 0]


def test_adaptive_k_needs_ordered_bounds(tmp_path):
    with pytest.raises(ValueError, match="1 <= k_min <= mean k <= k_max; got k_min 4, mean k 3"):
        AdaptiveK(4, 16, 3)
    with pytest.raises(ConfigError, match="k_adaptive needs integers 1 <= k_min <= k <= k_max"):
        fast_config(tmp_path, k_adaptive=True, k=2, k_min=3, k_max=8)


class _ScriptedEngine:
    """Rollouts from a script: state j's rollouts answer "7" (reward 1) or "1" in a fixed pattern."""

    def __init__(self, tokenizer, patterns: dict[int, str]):
        self.tokenizer, self.patterns, self.calls = tokenizer, patterns, []
        self.drawn: dict[int, int] = {}

    def generate(self, prompts, params, progress=False):
        from engine.runtime import Completion

        ns = [p.n for p in params] if isinstance(params, list) else [params.n] * len(prompts)
        self.calls.append(ns)
        out = []
        for prompt, n in zip(prompts, ns):
            j = prompt[-1]  # each state's prefix ends with its own marker token
            done = self.drawn.get(j, 0)
            pattern = self.patterns[j]
            texts = [pattern[(done + i) % len(pattern)] for i in range(n)]
            self.drawn[j] = done + n
            out.append([Completion(token_ids=self.tokenizer.encode(t), finish_reason="stop", text=t) for t in texts])
        return out


def test_mc_values_spends_the_adaptive_budget_on_the_mixed_state():
    from engine.model import char_tokenizer
    from engine.rl.rollout import Episode
    from engine.tasks import Item

    tok = char_tokenizer()
    item = Item(id="0", question="q", answer="7")
    # three episodes, one state each (the prompt); the prompts end with distinct marker tokens
    episodes = [Episode(group=j, item=item, prompt_ids=[5, 6, 10 + j], response_ids=tok.encode("x"), text="x",
                        finish_reason="stop", reward=0.0, step_ends=[1]) for j in range(3)]
    engine = _ScriptedEngine(tok, {10: "7", 11: "1", 12: "71"})  # always right, never, half
    task = _SevenTask(steps=1, max_operand=5, n_test=4, n_train=4)
    stats = mc_values(engine, task, episodes, k=99, params=SamplingParams(temperature=1.0, max_new_tokens=4),
                      adaptive=AdaptiveK(k_min=2, k_max=8, mean_k=4))
    # round 1: 2 each; then the budget left (3 x 4 - 6 = 6) goes 2 at a time to the mixed state only
    assert engine.calls == [[2, 2, 2], [2], [2], [2]]
    assert engine.drawn == {10: 2, 11: 2, 12: 8}
    assert stats.rollouts == 12 and stats.rounds == 4 and stats.k_max_used == 8
    assert [ep.state_values[0] for ep in episodes] == [1.0, 0.0, 0.5]
    # with k_max 4 the mixed state stops at 4 and the rest of the budget is left unspent
    engine = _ScriptedEngine(tok, {10: "7", 11: "1", 12: "71"})
    stats = mc_values(engine, task, episodes, k=99, params=SamplingParams(temperature=1.0, max_new_tokens=4),
                      adaptive=AdaptiveK(k_min=2, k_max=4, mean_k=4))
    assert engine.calls == [[2, 2, 2], [2]] and stats.rollouts == 8
    # a fixed K: one call, k each
    engine = _ScriptedEngine(tok, {10: "7", 11: "1", 12: "71"})
    stats = mc_values(engine, task, episodes, k=3, params=SamplingParams(temperature=1.0, max_new_tokens=4))
    assert engine.calls == [[3, 3, 3]] and stats.rollouts == 9 and stats.rounds == 1


def test_a_vineppo_run_with_an_adaptive_budget(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, k_adaptive=True, k=3, k_min=2, k_max=6))
    trainer.run()
    for r in rows_of(trainer)[1:]:
        assert r["mc_rollouts"] <= 3 * r["mc_states"] and r["mc_rollouts"] >= 2 * r["mc_states"]
        assert 2 <= r["mc_k_max"] <= 6 and r["mc_rounds"] >= 1
        assert math.isfinite(r["loss"])
