"""`python -m engine.analysis values`: the metric math by hand, the rollout bookkeeping, the CLI
end to end on a tiny random model, and its bad input."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from engine.analysis import main
from engine.analysis.values import (NO_STEPS, binomial_se, constant_mae, estimator_metrics, pearson, ranking_accuracy,
                                    value_analysis)
from engine.model import load_model
from engine.runtime import Engine
from engine.runtime.params import Completion
from engine.tasks import load_task

TASK_ARGS = dict(steps=2, max_operand=9, n_test=8)


@pytest.fixture(scope="module")
def engine(tiny_policy_dir):
    model, tok = load_model(tiny_policy_dir)
    return Engine(model, tok, kv_cache_tokens=4096)


# ---------------------------------------------------------------------------- metric math by hand

def test_estimator_metrics_by_hand():
    truth = [0.0, 0.5, 1.0]
    m = estimator_metrics(truth, [0.0, 1.0, 1.0])                      # one repeat, errors 0, .5, 0
    assert m["mae"] == pytest.approx(0.5 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(0.25 / 3))
    assert m["correlation"] == pytest.approx(0.8660254, abs=1e-6)      # corr([0,1,1],[0,.5,1]) = sqrt(3)/2
    # two repeats: MAE/RMSE pool every state and repeat; the correlation averages the repeats'
    m = estimator_metrics(truth, [[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]])   # errors 0,0,0 and 1,0,1
    assert m["mae"] == pytest.approx(2 / 6)
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 6))
    assert m["correlation"] == pytest.approx(0.0)                      # (1 + -1) / 2
    # a constant repeat has no correlation: only the defined one counts; none defined -> None
    assert estimator_metrics(truth, [[0.5, 0.5, 0.5], [0.0, 0.5, 1.0]])["correlation"] == pytest.approx(1.0)
    assert estimator_metrics(truth, [0.2, 0.2, 0.2])["correlation"] is None
    assert estimator_metrics([1.0, 1.0], [0.0, 1.0])["correlation"] is None   # constant truth
    assert pearson([1.0], [2.0]) is None
    with pytest.raises(ValueError):
        estimator_metrics(truth, [0.0, 1.0])


def test_binomial_se_and_constant_baseline_by_hand():
    assert binomial_se([0.5, 0.0, 1.0], 1) == pytest.approx(0.5 / 3)
    assert binomial_se([0.5, 0.5], 4) == pytest.approx(0.25)
    assert constant_mae([0.0, 1.0, 1.0, 1.0]) == pytest.approx((0.75 + 3 * 0.25) / 4)
    assert constant_mae([0.3, 0.3]) == 0.0


def test_ranking_accuracy_by_hand():
    truth = [[1.0, 0.0, 0.5], [0.2, 0.2]]          # group 2 has no pair with different truth
    # pairs of group 1: (0,1) truth 0 above 1, (0,2) 0 above 2, (1,2) 2 above 1
    assert ranking_accuracy(truth, [[0.9, 0.1, 0.5], [0.0, 1.0]]) == (1.0, 3)
    assert ranking_accuracy(truth, [[0.1, 0.9, 0.5], [0.0, 1.0]]) == (0.0, 3)
    assert ranking_accuracy(truth, [[0.5, 0.5, 0.5], [0.0, 1.0]]) == (0.5, 3)   # ties count half
    acc, pairs = ranking_accuracy(truth, [[1.0, 0.0, 0.0], [0.0, 0.0]])           # right, right, tie
    assert pairs == 3 and acc == pytest.approx(2.5 / 3)
    assert ranking_accuracy([[0.5, 0.5]], [[0.0, 1.0]]) == (None, 0)


# ---------------------------------------------------------------------------- rollout bookkeeping

class Rewriting:
    """The real engine, with the completions of chosen phases (recognised by their n) replaced
    by fixed texts, and a count of completions per n."""

    def __init__(self, engine, texts: dict[int, list[str]]):
        self.inner, self.texts, self.counts = engine, texts, Counter()
        self.tokenizer, self.eos_token_ids = engine.tokenizer, engine.eos_token_ids

    def generate(self, prompts, params, progress=False):
        outs = self.inner.generate(prompts, params, progress=progress)
        n = (params[0] if isinstance(params, list) else params).n
        self.counts[n] += sum(len(o) for o in outs)
        if n not in self.texts:
            return outs
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        fake = []
        for o in outs:
            row = []
            for i in range(len(o)):
                text = self.texts[n][i % len(self.texts[n])]
                ids = tok.encode(text.removesuffix("<eos>"), add_special_tokens=False)
                ids += [eos] if text.endswith("<eos>") else []
                row.append(Completion(token_ids=ids, finish_reason="stop", text=text.removesuffix("<eos>")))
            fake.append(row)
        return fake


def test_mc_estimates_come_from_fresh_rollouts_not_the_truth_ones(engine, monkeypatch):
    """The truth phase's rollouts all score 1, every other rollout 0: V* = 1 and V_K = 0, so an
    MAE of 1 for every K (0 if V_K reused the truth rollouts); rollout counts are exact."""
    task = load_task("arithmetic", **TASK_ARGS)
    monkeypatch.setattr(task, "reward", lambda text, item, finish="stop": float(text.endswith("@")))
    M, ks, R, A = 5, [1, 2], 2, 4   # phases: responses n=1, truth n=5, estimates n=R*3=6, alternatives n=4, ranking n=3
    spy = Rewriting(engine, {5: ["@"], 6: ["x"], 3: ["x"]})
    report = value_analysis(spy, task, task.items("test")[:4], states=3, truth_rollouts=M, ks=ks, repeats=R,
                            ranking_states=2, alternatives=A, temperature=1.0, max_new_tokens=16, seed=0)
    assert report["states"] == 3 <= report["candidate_states"]
    assert report["mae"] == {"1": 1.0, "2": 1.0} and report["rmse"] == {"1": 1.0, "2": 1.0}
    assert report["correlation"] == {"1": None, "2": None}      # V* is constant
    assert report["constant_mae"] == 0.0 and report["truth_mean"] == 1.0
    assert report["binomial_se"] == {"1": 0.0, "2": 0.0}
    alts = report["ranking_alternatives"]
    assert alts + report["ranking_terminal_alternatives"] == 2 * A
    # states * (M + R * sum K) + ranking work, and nothing else besides the responses
    assert spy.counts == Counter({1: 4, 5: 3 * M + alts * M, 6: 3 * R * 3, 4: 2 * A, 3: alts * 3})
    assert report["rollouts"] == {"truth": 3 * M, "estimates": 3 * R * 3, "alternatives": 2 * A,
                                  "ranking": alts * (M + 3)}


def test_step_ranking_orders_alternatives_by_their_truth(engine, monkeypatch):
    """Alternatives 'A!' (value 1), 'B!', 'D!' (value 0) and an answer that ends the response (left
    out): MC estimators rank both pairs of every ranking state right; a constant critic ties (1/2)."""
    task = load_task("arithmetic", **TASK_ARGS)
    monkeypatch.setattr(task, "reward",
                        lambda text, item, finish="stop": float("A!\n" in text and text.endswith("@")))
    spy = Rewriting(engine, {4: ["A!\n", "B!\n", "C!<eos>", "D!\n"], 5: ["@"], 3: ["@"]})
    calls = []

    def critic(states):
        calls.append(len(states))
        return [0.5] * len(states)

    report = value_analysis(spy, task, task.items("test")[:3], states=3, truth_rollouts=5, ks=[1, 2], repeats=1,
                            critic=critic, ranking_states=2, alternatives=4, temperature=1.0, max_new_tokens=16)
    assert report["ranking_terminal_alternatives"] == 2 and report["ranking_alternatives"] == 6
    assert report["ranking_pairs"] == 4
    assert report["ranking_accuracy"] == {"1": 1.0, "2": 1.0, "critic": 0.5}
    assert calls == [3, 6]                                    # the states, then the alternatives' states
    assert report["mae"]["critic"] == pytest.approx(0.5)      # V* = 0 for the sampled states
    assert report["correlation"]["critic"] is None


def test_no_states_is_a_clear_error(engine):
    task = load_task("arithmetic", **TASK_ARGS)
    with pytest.raises(ValueError, match="no steps to evaluate"):
        value_analysis(engine, task, [], states=2, truth_rollouts=2, ks=[1])
    assert "the model's responses have no steps to evaluate" in NO_STEPS


# ---------------------------------------------------------------------------- the CLI

def test_cli_end_to_end_with_a_critic(tiny_policy_dir, tiny_ppo_checkpoint, tmp_path, monkeypatch):
    counts = Counter()
    real = Engine.generate

    def counting(self, prompts, params=None, progress=False):
        outs = real(self, prompts, params, progress)
        counts[(params[0] if isinstance(params, list) else params).n] += sum(len(o) for o in outs)
        return outs

    monkeypatch.setattr(Engine, "generate", counting)
    out = tmp_path / "report.json"
    M, R, A, S = 4, 2, 2, 2
    report = main(["values", "--model", str(tiny_policy_dir), "--task", "arithmetic", "--task-args", json.dumps(TASK_ARGS),
                   "--items", "4", "--states", "6", "--truth-rollouts", str(M), "--k", "1", "3", "--repeats", str(R),
                   "--critic", str(tiny_ppo_checkpoint), "--ranking-states", str(S), "--alternatives", str(A),
                   "--temperature", "1.0", "--max-new-tokens", "20", "--quiet", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert (tmp_path / "report.png").stat().st_size > 0
    for key in ("mae", "rmse", "correlation"):
        assert set(saved[key]) == {"1", "3", "critic"}
        assert all(v is None or isinstance(v, float) for v in saved[key].values())
    assert set(saved["ranking_accuracy"]) == {"1", "3", "critic"} and set(saved["binomial_se"]) == {"1", "3"}
    assert all(0.0 <= v <= 1.0 for v in saved["mae"].values())
    assert isinstance(saved["ranking_pairs"], int) and isinstance(saved["constant_mae"], float)
    assert saved["truth_rollouts"] == M and saved["repeats"] == R and saved["seconds"] > 0
    assert saved["config"]["k"] == [1, 3] and saved["config"]["critic"] == str(tiny_ppo_checkpoint)
    assert saved["states"] == min(6, saved["candidate_states"]) and saved["mae"] == report["mae"]
    # every rollout accounted for: responses, states * (M + R * sum K), then the ranking's
    alts = saved["ranking_alternatives"]
    assert sum(counts.values()) == 4 + saved["states"] * (M + R * 4) + S * A + alts * (M + 4)
    assert counts[R * 4] == saved["states"] * R * 4   # the MC estimates: their own rollouts


@pytest.mark.parametrize("flag, value", [("--states", "0"), ("--truth-rollouts", "0"), ("--repeats", "0"),
                                         ("--alternatives", "0"), ("--k", "0")])
def test_bad_counts_fail_before_loading_anything(flag, value, capsys, tmp_path):
    args = {"--states": "4", "--truth-rollouts": "4", "--repeats": "2", "--alternatives": "2", "--k": "1"}
    args[flag] = value
    argv = ["values", "--model", str(tmp_path / "no-such-model"), "--task", "arithmetic"]
    for k, v in args.items():
        argv += [k, v]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err and "no-such-model" not in err   # the count, before the model


def test_missing_model_dir_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["values", "--model", str(tmp_path / "nope"), "--task", "arithmetic", "--states", "2",
              "--truth-rollouts", "2", "--k", "1"])
    assert e.value.code == 2 and "model directory" in capsys.readouterr().err


def test_critic_dir_without_value_head_is_a_clear_error(tiny_policy_dir, capsys, tmp_path):
    (tmp_path / "ckpt" / "critic").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["values", "--model", str(tiny_policy_dir), "--task", "arithmetic", "--states", "2", "--truth-rollouts", "2",
              "--k", "1", "--critic", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "ckpt" / "critic" / "value_head.safetensors") in err


def test_adaptive_estimates_consume_each_pool_in_order_by_hand():
    from engine.analysis.values import adaptive_estimates
    from engine.rl.rollout import AdaptiveK

    pools = [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1]]
    # k_min 2: [1,1] settled, [0,0] settled, [1,0] mixed -> it alone gets the 3 x 3 - 6 = 3 left, 2 then 1
    values, used = adaptive_estimates(pools, AdaptiveK(k_min=2, k_max=6, mean_k=3))
    assert used == 9 and values == [1.0, 0.0, pytest.approx(4 / 5)]
    values, used = adaptive_estimates(pools, AdaptiveK(k_min=2, k_max=3, mean_k=3))
    assert used == 7 and values == [1.0, 0.0, pytest.approx(2 / 3)]  # k_max caps it; the rest is unspent


def test_the_cli_rejects_a_bad_adaptive_budget(tmp_path, capsys):
    from engine.analysis import main

    with pytest.raises(SystemExit) as e:
        main(["values", "--model", str(tmp_path), "--task", "arithmetic", "--states", "2", "--truth-rollouts", "4",
              "--k", "1", "--k-adaptive", "4", "8", "2"])
    assert e.value.code == 2 and "1 <= k_min <= mean k <= k_max" in capsys.readouterr().err
