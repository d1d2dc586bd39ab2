"""The RL loop end to end on a tiny model: every algorithm, MC values through the Engine,
shared parameters, resume, divergence handling and bad configs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.model import create_tiny_checkpoint, load_model
from engine.rl.config import ConfigError, load_config
from engine.rl.loss import ppo_loss
from engine.rl.rollout import Episode, mc_values, sample_episodes
from engine.rl.steps import step_token_ends
from engine.rl.trainer import Trainer, TrainingDiverged
from engine.runtime import Engine, SamplingParams
from engine.tasks import ArithmeticTask, load_task

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16}
FAST = dict(
    task_args={"steps": 1, "max_operand": 9, "n_test": 16, "n_train": 64}, tiny_model_args=TINY,
    sft_steps=0, iterations=2, prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=12, k=2,
    epochs=2, minibatch_size=4, micro_batch_size=2, lr=1e-3, warmup_ratio=0.0, eval_every=1, eval_items=4,
    save_every=1, kv_cache_tokens=4096, tensorboard=False,
)


class _DigitTask(ArithmeticTask):
    """Reward 1 when the response has a digit: a random tiny model earns it about half the time,
    so the advantages (and the updates) of a short test run are not all zero."""

    def reward(self, response, item, finish_reason="stop"):
        return 1.0 if any(c.isdigit() for c in response) else 0.0


def make_trainer(cfg, **kw) -> Trainer:
    trainer = Trainer(cfg, progress=False, **kw)
    trainer.task = _DigitTask(**cfg.task_args)
    return trainer


def fast_config(tmp_path, **overrides):
    return load_config("smoke", {**FAST, "run_dir": str(tmp_path / "run"), **overrides})


def rows_of(trainer: Trainer) -> list[dict]:
    return [json.loads(x) for x in trainer.metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("algo", ["vineppo", "ppo", "grpo", "rloo"])
def test_two_iterations_of_each_algorithm(tmp_path, algo):
    trainer = make_trainer(fast_config(tmp_path, algo=algo))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.run()
    rows = rows_of(trainer)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("reward_mean", "train_accuracy", "eval_accuracy", "kl_ref", "clip_frac", "entropy", "adv_std",
                    "time_sample", "time_values", "time_update", "sample_tokens_per_s", "update_tokens_per_s",
                    "grad_norm", "lr"):
            assert key in r and r[key] == r[key], (algo, key)  # present and not NaN
    if algo == "vineppo":
        assert rows[1]["mc_states"] >= 1 and rows[1]["mc_rollouts"] == rows[1]["mc_states"] * 2
        assert rows[1]["mc_states_requested"] >= rows[1]["mc_states"]
        assert 0.0 <= rows[1]["prefix_cache_hit_rate"] <= 1.0
    if algo == "ppo":
        assert "value_loss" in rows[1]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))  # it trained
    assert (trainer.run_dir / "curves.png").stat().st_size > 0
    assert (trainer.run_dir / "checkpoints" / "latest").read_text() == "iter_000002"
    reloaded, tok = load_model(trainer.run_dir / "final")
    for p, q in zip(trainer.policy.parameters(), reloaded.parameters()):
        assert torch.equal(p, q)


def test_dr_grpo_divides_summed_losses_by_the_generation_budget(tmp_path, monkeypatch):
    import engine.rl.algorithms.policy_gradient as trainer_module  # (where the PPO-clip loss is called)

    calls = []

    def spy(*args, **kwargs):
        calls.append((args[2].clone(), args[3].clone(), kwargs))
        return ppo_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "ppo_loss", spy)
    cfg = fast_config(tmp_path, algo="grpo", grpo_scale_by_std=False, loss_aggregation="seq-mean-token-sum-norm",
                      iterations=1, epochs=1, micro_batch_size=4)
    make_trainer(cfg).run()
    assert calls
    for adv, mask, kw in calls:
        assert kw["aggregation"] == "seq-mean-token-sum-norm" and kw["norm_length"] == cfg.max_new_tokens
        # Two samples per prompt, 0/1 rewards: Dr.GRPO's advantages are r - mean, unscaled.
        assert set(adv[mask.bool()].tolist()) <= {-0.5, 0.0, 0.5}
    assert any(abs(a) == 0.5 for adv, mask, _ in calls for a in adv[mask.bool()].tolist())  # not all ties


def test_evaluation_seeds_each_item_apart(tmp_path, monkeypatch):
    trainer = make_trainer(fast_config(tmp_path, eval_samples=3, eval_temperature=0.6))
    seen = []
    real = trainer.engine.generate

    def spy(prompts, params, progress=False):
        seen.append(params)
        return real(prompts, params, progress)

    monkeypatch.setattr(trainer.engine, "generate", spy)
    row = trainer.evaluate()
    (params,) = seen
    assert len(params) == len(trainer.eval_sets["test"]) and len({p.seed for p in params}) == len(params)
    assert 0.0 <= row["eval_accuracy"] <= 1.0 and row["eval_stderr"] >= 0.0
    again = trainer.evaluate()  # seeded: the same weights give the same number
    assert (again["eval_accuracy"], again["eval_stderr"]) == (row["eval_accuracy"], row["eval_stderr"])


def test_eval_stderr_is_over_items(tmp_path):
    # Items alternate all-right / all-wrong: mean 0.5; the std of the 4 item means (ddof 1) is
    # 0.577, so the stderr is 0.289 (a binomial formula on 4 items would give 0.25).
    trainer = make_trainer(fast_config(tmp_path, eval_samples=3, eval_temperature=0.6))
    right = {it.id for it in trainer.eval_sets["test"][::2]}
    trainer.task.reward = lambda response, item, finish_reason="stop": float(item.id in right)
    row = trainer.evaluate()
    assert row["eval_accuracy"] == pytest.approx(0.5)
    assert row["eval_stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)


def test_eval_splits_protocol_and_majority_vote(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, eval_samples=3, eval_temperature=0.6, eval_top_p=0.9, eval_items=8,
                      eval_splits=["test", "validation", "train"], validation_items=6)
    trainer = make_trainer(cfg)
    sets = trainer.eval_sets
    assert list(sets) == ["test", "validation", "train"] and [len(v) for v in sets.values()] == [8, 6, 8]
    held = {it.id for it in sets["validation"]}
    assert not held & {it.id for it in trainer.train_items}  # never trained on
    assert {it.id for it in sets["train"]} <= {it.id for it in trainer.train_items}
    assert trainer.eval_sets["validation"] == make_trainer(cfg).eval_sets["validation"]  # fixed for the run
    seen = []
    # Every item: samples "#### 1", "#### 1", "#### 2", and only 2 is right: mean 1/3, majority wrong.
    texts = iter(["#### 1", "#### 1", "#### 2"] * 100)
    monkeypatch.setattr(trainer.task, "reward", lambda response, item, finish_reason="stop": float(response == "#### 2"))

    def scripted(prompts, params, progress=False):
        from engine.runtime.params import Completion
        seen.append(params)
        return [[Completion(text=next(texts), token_ids=[1], finish_reason="stop") for _ in range(p.n)]
                for p in params]

    monkeypatch.setattr(trainer.engine, "generate", scripted)
    row = trainer.evaluate()
    assert all(p.top_p == 0.9 and p.n == 3 and p.temperature == 0.6 for group in seen for p in group)
    for split in ("test", "validation", "train"):
        assert row[f"eval_{split}_accuracy"] == pytest.approx(1 / 3)
        assert row[f"eval_{split}_majority_accuracy"] == 0.0
    assert row["eval_accuracy"] == row["eval_test_accuracy"] and row["eval_majority_accuracy"] == 0.0


def test_validation_carve_is_the_same_in_another_process(tmp_path):
    # --resume rebuilds the trainer in a new process: the held-out items must not depend on it
    # (a per-process hash seed would move them).
    import subprocess
    import sys

    trainer = make_trainer(fast_config(tmp_path, eval_splits=["test", "validation"], validation_items=6))
    held = sorted({it.id for it in trainer.task.items("train")} - {it.id for it in trainer.train_items})
    code = ("import random\n"
            "from engine.tasks import load_task\n"
            f"items = load_task('arithmetic', **{trainer.cfg.task_args!r}).items('train')\n"
            "order = list(items); random.Random('validation-split').shuffle(order)\n"
            "print(','.join(sorted(it.id for it in order[-6:])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert len(held) == 6 and ",".join(held) == out


@pytest.mark.parametrize("splits", [["dev"], [], ["test", "test"], "test"])
def test_unknown_eval_splits_are_config_errors(tmp_path, splits):
    with pytest.raises(ConfigError, match=r"eval_splits must be a non-empty list of distinct names from "
                                          r"\('test', 'validation', 'train'\)"):
        fast_config(tmp_path, eval_splits=splits)


def test_default_preset_builds_its_task():
    cfg = load_config("default")
    task = load_task(cfg.task, **cfg.task_args)
    train = task.items("train")
    bare = sum(it.solution == f"#### {it.answer}" for it in train) / len(train)
    assert 0.45 < bare < 0.55 and all("\n" in it.solution for it in task.items("test"))
    assert len(task.items("test")) >= cfg.eval_items


def test_engine_samples_with_the_optimizers_parameters(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, iterations=1))
    engine_params = list(trainer.engine.model.parameters())
    opt_params = [p for g in trainer.opt.param_groups for p in g["params"]]
    assert trainer.engine.model is trainer.policy
    assert len(engine_params) == len(opt_params)
    assert all(a is b for a, b in zip(engine_params, opt_params))  # the same tensors, not copies
    ptrs = [p.data_ptr() for p in engine_params]
    trainer.run()
    assert [p.data_ptr() for p in trainer.engine.model.parameters()] == ptrs  # updated in place
    # and what the Engine now samples follows the updated weights (full recompute, cache invalidated)
    prompt = trainer.tokenizer.encode("Compute 1+2.\n")
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    got = trainer.engine.generate([prompt], greedy)[0][0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(got)):
            ids.append(int(trainer.policy(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):len(prompt) + len(got)]


class _SevenTask(ArithmeticTask):
    """Reward 1 when the whole response contains a '7', whatever the finish reason."""

    def reward(self, response, item, finish_reason="stop"):
        return 1.0 if "7" in response else 0.0


def test_mc_values_through_the_engine(tmp_path):
    create_tiny_checkpoint(tmp_path / "m", seed=3, **TINY)
    model, tok = load_model(tmp_path / "m")
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=8192)
    task = _SevenTask(steps=1, max_operand=5, n_test=8, n_train=8)
    items = task.items("train")[:3]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16)
    torch.manual_seed(0)
    episodes = sample_episodes(engine, task, items, params)
    for ep in episodes:
        ep.step_ends = step_token_ends(ep.response_ids, tok, chunk_tokens=4)
    k = 5
    engine.stats.reset()
    stats = mc_values(engine, task, episodes, k=k, params=SamplingParams(temperature=1.0, max_new_tokens=16))
    # the prompt state of the 3 samples of an item is estimated once
    assert stats.states_requested == sum(len(e.step_ends) for e in episodes)
    assert stats.states <= stats.states_requested - 2 * len(items)
    assert stats.rollouts == stats.states * k
    # MC states are prefixes of finished responses: served from the radix cache, not recomputed
    assert engine.stats.cached_tokens > 10 * engine.stats.prefill_tokens
    for ep in episodes:
        assert len(ep.state_values) == len(ep.step_ends)
        for value, b in zip(ep.state_values, [0] + ep.step_ends[:-1]):
            assert value * k == pytest.approx(round(value * k))  # a mean of k 0/1 rewards
            prefix = tok.decode(ep.response_ids[:b], skip_special_tokens=True)
            if "7" in prefix:  # graded on prefix + rollout: every rollout from here scores 1
                assert value == 1.0


def test_mc_values_cap_backfills_with_the_return(tmp_path):
    create_tiny_checkpoint(tmp_path / "m", seed=0, **TINY)
    model, tok = load_model(tmp_path / "m")
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=4096)
    task = _SevenTask(steps=1, max_operand=5, n_test=4, n_train=4)
    item = task.items("train")[0]
    prompt = tok.encode(task.prompt(item))
    ep = Episode(group=0, item=item, prompt_ids=prompt, response_ids=tok.encode("1+2=3\n#### 7"), text="1+2=3\n#### 7",
                 finish_reason="stop", reward=1.0, step_ends=[2, 4, 6, 8, 12])
    stats = mc_values(engine, task, [ep], k=2, params=SamplingParams(temperature=1.0, max_new_tokens=4), max_states=2)
    assert stats.states == 2 and stats.backfilled == 3
    assert ep.state_values[2:] == [1.0, 1.0, 1.0]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_") and not k.endswith("_per_s")}


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    assert_resume_reproduces(tmp_path)


def assert_resume_reproduces(tmp_path, **overrides) -> None:
    """3 iterations straight vs stopped after 1 and resumed: the same metrics and weights."""
    full = make_trainer(fast_config(tmp_path / "a", iterations=3, **overrides))
    full.run()
    first = make_trainer(fast_config(tmp_path / "b", iterations=3, stop_after=1, **overrides))
    first.run()
    assert [r["iteration"] for r in rows_of(first)] == [0, 1]
    resumed = make_trainer(fast_config(tmp_path / "b", iterations=3, **overrides), resume=True)
    assert resumed.iteration == 1
    resumed.run()
    a, b = rows_of(full), rows_of(resumed)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    assert [_comparable(r) for r in a] == [_comparable(r) for r in b]
    for p, q in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_a_changed_config(tmp_path):
    Trainer(fast_config(tmp_path, stop_after=1), progress=False).run()
    with pytest.raises(ValueError, match="config differs"):
        Trainer(fast_config(tmp_path, k=3), resume=True, progress=False)


def test_resume_refuses_a_checkpoint_in_the_old_sharded_format(tmp_path):
    # Before torch.distributed.checkpoint, parallel fsdp saved optimizer_rank<r>.pt files and
    # marked trainer_state.pt with fsdp_world_size: this version says it cannot read them.
    Trainer(fast_config(tmp_path, stop_after=1), progress=False).run()
    state_file = tmp_path / "run" / "checkpoints" / "iter_000001" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["fsdp_world_size"] = 2
    torch.save(state, state_file)
    with pytest.raises(ConfigError, match="written by an earlier version of parallel fsdp"):
        Trainer(fast_config(tmp_path), resume=True, progress=False)


def test_an_sft_batch_smaller_than_the_world_size_is_an_error_before_any_work(tmp_path):
    from engine.rl.distributed import Dist

    with pytest.raises(ConfigError, match="sft_batch_size 1 is smaller than the world size 2"):
        Trainer(fast_config(tmp_path, sft_steps=3, sft_batch_size=1), progress=False, dist=Dist(world_size=2))
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(fast_config(tmp_path, iterations=2))
    real = trainer.token_logprobs

    def poisoned(model, packed, with_entropy=False):
        out = real(model, packed, with_entropy)
        if trainer.iteration == 2 and torch.is_grad_enabled():
            return out * float("nan") if not with_entropy else (out[0] * float("nan"), out[1])
        return out

    monkeypatch.setattr(trainer, "token_logprobs", poisoned)
    with pytest.raises(TrainingDiverged, match="iteration 2, epoch 0, minibatch 0"):
        trainer.run()
    assert (trainer.run_dir / "checkpoints" / "latest").read_text() == "iter_000001"
    assert not (trainer.run_dir / "checkpoints" / "iter_000002").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"algo": "dpo"}, "unknown algo 'dpo'"),
    ({"task": "chess"}, "unknown task 'chess'"),
    ({"model": "/nonexistent/model"}, "model directory /nonexistent/model does not exist"),
    ({"k": 0}, "k \\(MC rollouts per state\\) must be an integer >= 1"),
    ({"minibatch_size": 3}, "does not divide into minibatches of 3"),
    ({"micro_batch_size": 3}, "not a multiple of micro_batch_size 3"),
    ({"colour": "blue"}, "unknown config key\\(s\\) colour"),
    ({"algo": "grpo", "samples_per_prompt": 1, "minibatch_size": 4}, "samples_per_prompt must be >= 2"),
    ({"algo": "grpo", "grpo_scale_by_std": False}, "Dr.GRPO .* set loss_aggregation: seq-mean-token-sum-norm"),
    ({"algo": "grpo", "grpo_scale_by_std": False, "loss_aggregation": "seq-mean-token-sum-norm",
      "whiten_advantages": True}, "Dr.GRPO .* set whiten_advantages: false \\(got True\\)"),
    ({"kv_memory_fraction": 0.0}, "kv_memory_fraction must be in \\(0, 1\\]"),
    ({"skip_ratio_above": 1.0}, "skip_ratio_above must be > 1"),
    ({"warmup_type": "cosine"}, "warmup_type must be one of \\('linear', 'log'\\), got 'cosine'"),
])
def test_bad_configs_fail_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fast_config(tmp_path, **overrides)


def test_unknown_preset_and_required_model():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known presets: chains, default, gsm8k, math, smoke, smollm-arith"):
        load_config("nope")
    with pytest.raises(ConfigError, match="needs a value for model"):
        load_config("gsm8k")


def test_resume_in_bf16_keeps_the_optimizer_state_in_fp32(tmp_path):
    make_trainer(fast_config(tmp_path, dtype="bfloat16", stop_after=1)).run()
    resumed = make_trainer(fast_config(tmp_path, dtype="bfloat16"), resume=True)
    state = next(iter(resumed.opt.state.values()))
    assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "compensation"))
    assert next(resumed.policy.parameters()).dtype == torch.bfloat16
    resumed.run()
    assert [r["iteration"] for r in rows_of(resumed)] == [0, 1, 2]


def test_a_fresh_start_clears_the_previous_run(tmp_path):
    make_trainer(fast_config(tmp_path, iterations=3, save_every=3)).run()
    trainer = make_trainer(fast_config(tmp_path, iterations=1))
    assert not (trainer.run_dir / "checkpoints").exists() and not trainer.metrics_path.exists()
    trainer.run()
    assert (trainer.run_dir / "checkpoints" / "latest").read_text() == "iter_000001"
    assert [r["iteration"] for r in rows_of(trainer)] == [0, 1]


@pytest.mark.parametrize("grading", ["strict", "lenient"])
def test_a_stopped_response_without_an_answer_is_unfinished(grading):
    # The reference's rule: no extractable answer = unfinished: reward 0 and no EOS to train.
    from engine.model import char_tokenizer
    from engine.runtime.params import Completion

    tok = char_tokenizer()
    eos = tok.eos_token_id
    task = load_task("gsm8k", data="sample", grading=grading)
    item = task.items("test")[0]
    texts = [f"Adding.\n#### {item.answer}", "So she has 18 apples.", "half a line"]

    class ScriptedEngine:
        tokenizer, eos_token_ids = tok, [eos]

        def generate(self, prompts, params, progress=False):
            return [[Completion(token_ids=tok.encode(t) + [eos], finish_reason="stop", text=t) for t in texts[:2]]
                    + [Completion(token_ids=tok.encode(texts[2]), finish_reason="length", text=texts[2])]]

    done, no_answer, cut = sample_episodes(ScriptedEngine(), task, [item], SamplingParams(n=3))
    assert (done.finish_reason, done.reward, done.response_ids[-1]) == ("stop", 1.0, eos)
    assert cut.finish_reason == "length" and cut.reward == 0.0
    if grading == "strict":  # no "####": unfinished
        assert no_answer.finish_reason == "unfinished" and no_answer.reward == 0.0
        assert no_answer.response_ids == tok.encode(texts[1])  # the EOS is gone
    else:  # lenient reads the last number: a finished (wrong) answer
        assert no_answer.finish_reason == "stop" and no_answer.response_ids[-1] == eos


def test_stop_string_tokens_are_replaced_by_eos():
    from engine.model import char_tokenizer
    from engine.rl.rollout import trim_stop_string

    tok = char_tokenizer()
    ids = tok.encode("x = 4\n#### 4\n\n\nProblem:")
    kept = trim_stop_string(tok, ids, "x = 4\n#### 4", tok.eos_token_id)
    assert kept == tok.encode("x = 4\n#### 4") + [tok.eos_token_id]


def inflate_training_logprobs(trainer: Trainer, monkeypatch, nats: float = 5.0) -> None:
    """Add `nats` to the log-probs the update computes (with grad): every ratio becomes e^nats."""
    real = trainer.token_logprobs

    def inflated(model, packed, with_entropy=False):
        out = real(model, packed, with_entropy)
        return out + nats if torch.is_grad_enabled() and not with_entropy else out

    monkeypatch.setattr(trainer, "token_logprobs", inflated)


def test_far_off_policy_micro_batches_are_skipped(tmp_path, monkeypatch):
    # Inflate the training log-probs by 5 nats: every ratio is e^5 > 10, so VinePPO's guard
    # skips every micro-batch and the weights stay as they were.
    trainer = make_trainer(fast_config(tmp_path, iterations=1, kl_coef=0.0))
    inflate_training_logprobs(trainer, monkeypatch)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    row = trainer.train_iteration()
    # 2 epochs x 2 minibatches x 2 micro-batches, averaged per minibatch step
    assert row["skipped_micro_batches"] == 2.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_a_skipped_micro_batch_still_trains_the_critic(tmp_path, monkeypatch):
    # As in the reference, the ratio guard skips only the policy's gradient.
    trainer = make_trainer(fast_config(tmp_path, algo="ppo", iterations=1, kl_coef=0.0))
    inflate_training_logprobs(trainer, monkeypatch)
    policy = [p.detach().clone() for p in trainer.policy.parameters()]
    head = trainer.algorithm.critic.head.weight.detach().clone()
    row = trainer.train_iteration()
    assert row["skipped_micro_batches"] == 2.0 and row["value_loss"] > 0
    assert all(torch.equal(a, b) for a, b in zip(policy, trainer.policy.parameters()))
    assert not torch.equal(head, trainer.algorithm.critic.head.weight)


def test_value_head_starts_as_the_references(tmp_path):
    import math

    from engine.rl.algorithms.ppo import ValueModel

    trainer = make_trainer(fast_config(tmp_path, algo="ppo", iterations=1, seed=3))
    hidden = trainer.policy.config.hidden_size
    want = torch.randn(1, hidden, generator=torch.Generator().manual_seed(3)) / math.sqrt(hidden + 1)
    assert torch.equal(trainer.algorithm.critic.head.weight.cpu(), want) and not trainer.algorithm.critic.head.bias.any()
    state = torch.random.get_rng_state()
    ValueModel(trainer.policy, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the run's random stream is untouched


def test_gsm8k_preset_values_the_prompt_and_25_step_states(tmp_path):
    from engine.rl.rollout import state_boundaries

    cfg = load_config("gsm8k", {"model": str(tmp_path)})
    ep = Episode(group=0, item=None, prompt_ids=[1], response_ids=list(range(40)), text="", finish_reason="stop",
                 reward=1.0, step_ends=list(range(1, 31)))  # 30 steps
    bounds = state_boundaries(ep, cfg.max_states_per_response)
    assert bounds == [0] + list(range(1, 26))  # the reference's max_step_for_value_estimation: 25
    assert cfg.warmup_type == "log"


def test_ppo_critic_trains_in_training_mode(tmp_path, monkeypatch):
    trainer = make_trainer(fast_config(tmp_path, algo="ppo", iterations=1, gradient_checkpointing=True))
    modes = []
    (critic,) = trainer.trainables
    real = critic.micro_backward
    monkeypatch.setattr(critic, "micro_backward", lambda *a: (modes.append(trainer.algorithm.critic.training), real(*a))[1])
    head = trainer.algorithm.critic.head.weight.detach().clone()
    trainer.run()
    assert modes and all(modes)           # checkpointing (and any train-only behaviour) is on
    assert not trainer.algorithm.critic.training    # and off again for the next value pass
    assert not torch.equal(head, trainer.algorithm.critic.head.weight)


def test_chat_task_prompts_in_the_models_chat_template(tmp_path):
    """task_args chat: true: the trainer hands its tokenizer to the task, so every rollout's prompt
    is a user turn of the checkpoint's chat template (here a one-line template on the tiny model)."""
    create_tiny_checkpoint(tmp_path / "chat-model", **TINY)
    _, tok = load_model(tmp_path / "chat-model")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(str(tmp_path / "chat-model"))
    cfg = fast_config(tmp_path, model=str(tmp_path / "chat-model"), task="word-arithmetic", iterations=1,
                      task_args={"chat": True, "steps": 1, "n_test": 16, "n_train": 64})
    trainer = Trainer(cfg, progress=False)
    item = trainer.train_items[0]
    assert trainer.task.prompt(item) == f"<user>{item.question}\n<assistant>"
    episodes = sample_episodes(trainer.engine, trainer.task, [item], SamplingParams(n=2, max_new_tokens=4))
    assert trainer.tokenizer.decode(episodes[0].prompt_ids) == f"<user>{item.question}\n<assistant>"
    trainer.run()
    assert [r["iteration"] for r in rows_of(trainer)] == [0, 1]


def test_smollm_arith_preset_needs_the_model_and_builds_a_chat_task(tmp_path):
    with pytest.raises(ConfigError, match="needs a value for model"):
        load_config("smollm-arith")
    (tmp_path / "m").mkdir()
    cfg = load_config("smollm-arith", {"model": str(tmp_path / "m")})
    task = load_task(cfg.task, **cfg.task_args)
    assert cfg.task == "word-arithmetic" and task.chat and task.steps == (1, 1)
    assert len(task.items("test")) >= cfg.eval_items
    grpo = load_config("smollm-arith", {"model": str(tmp_path / "m"), "algo": "grpo"})
    assert (cfg.iterations, grpo.iterations) == (12, 20)
