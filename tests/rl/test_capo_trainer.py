"""`--algo capo` in the trainer: the judges, the advantages it trains on, metrics, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.capo import group_token_advantages, token_rewards
from engine.rl.config import ConfigError
from engine.rl.judge import JudgeRequest, ModelJudge
from engine.rl.rollout import Episode
from engine.rl.steps import step_spans
from engine.tasks import Item
from test_trainer import fast_config, make_trainer, rows_of  # the helpers of the same folder


def _episode(trainer, group: int, text: str, reward: float) -> Episode:
    ids = trainer.tokenizer.encode(text)
    return Episode(group=group, item=Item(id=str(group), question="Compute 3+4*2.", answer="14"),
                   prompt_ids=trainer.tokenizer.encode("Compute 3+4*2.\n"), response_ids=ids, text=text,
                   finish_reason="stop", reward=reward)


def test_step_spans_cut_the_decoded_text_at_the_token_steps(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="capo", judge="rule"))
    ids = trainer.tokenizer.encode("3+4=7\n7*2=15\n\n#### 15")
    texts, ends = step_spans(ids, trainer.tokenizer, "newline")
    assert texts == ["3+4=7\n", "7*2=15\n\n#### 15"] and ends == [6, len(ids)]
    assert step_spans([], trainer.tokenizer, "newline") == ([], [])


def test_capo_advantages_with_the_rule_judge_by_hand(tmp_path):
    """Two prompts x two samples with planted errors: flags, token rewards and the advantages
    normalised over all tokens of each prompt's samples."""
    trainer = make_trainer(fast_config(tmp_path, algo="capo", judge="rule"))
    eps = [_episode(trainer, 0, "3+4=7\n7*2=15\n#### 15", 0.0),   # step 2 wrong
           _episode(trainer, 0, "3+4=7\n7*2=14\n#### 14", 1.0),   # all right
           _episode(trainer, 1, "3+4=8\n8*2=16\n#### 16", 0.0),   # step 1 wrong, step 2 right from it
           _episode(trainer, 1, "4*2=8\n3+8=11\n#### 11", 1.0)]
    row = trainer.algorithm.credit(eps, trainer)
    assert [e.step_ends for e in eps] == [[6, len(e.response_ids)] for e in eps]
    flagged = [{1}, set(), {0}, set()]
    rewards = [token_rewards(e.num_tokens, e.step_ends, f, e.reward) for e, f in zip(eps, flagged)]
    assert rewards[0].tolist() == [0.0] * 6 + [-1.0] * (eps[0].num_tokens - 6)
    assert rewards[2].tolist() == [-1.0] * 6 + [0.0] * (eps[2].num_tokens - 6)
    assert set(rewards[1].tolist()) == {2.0}
    expected = group_token_advantages(rewards, [0, 0, 1, 1])
    for e, a in zip(eps, expected):
        torch.testing.assert_close(e.advantages, a)
    group0 = torch.cat(rewards[:2]).double()  # by hand: (R - mean) / (std + 1e-6) over the group's tokens
    manual = ((rewards[0].double() - group0.mean()) / (group0.std() + 1e-6)).float()
    torch.testing.assert_close(eps[0].advantages, manual)
    assert row["judge_flagged_step_frac"] == pytest.approx(2 / 8)
    assert row["judge_flagged_response_frac"] == 0.5 and row["judge_abstain_frac"] == 0.0
    assert row["judge_precision"] == 1.0 and row["judge_recall"] == 1.0
    assert row["judge_true_wrong_step_frac"] == pytest.approx(2 / 8)


def test_two_iterations_of_capo_with_each_judge(tmp_path):
    for judge in ("rule", "model"):
        trainer = make_trainer(fast_config(tmp_path / judge, algo="capo", judge=judge, capo_votes=3,
                                           capo_judge_max_new_tokens=8, judge_oracle="rule"))
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        trainer.run()
        rows = rows_of(trainer)
        assert [r["iteration"] for r in rows] == [0, 1, 2]
        for r in rows[1:]:
            for key in ("reward_mean", "loss", "judge_flagged_step_frac", "judge_abstain_frac", "time_judge",
                        "judge_true_wrong_step_frac", "eval_accuracy"):
                assert key in r and r[key] == r[key], (judge, key)
            assert r["judge_critiques"] == 8 * (1 if judge == "rule" else 3)
            if judge == "model":
                assert r["judge_generated_tokens"] > 0 and r["judge_tokens_per_s"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
        assert math.isfinite(rows[-1]["loss"])


def test_the_judge_prompt_is_prefilled_once_per_response(tmp_path):
    """n critiques of one response fork one prefill: the judge Engine computes or serves each
    prompt's KV once, never once per vote."""
    trainer = make_trainer(fast_config(tmp_path, algo="capo", capo_votes=4, capo_judge_max_new_tokens=6,
                                       kv_cache_tokens=32768))
    judge = trainer.algorithm.judge
    assert isinstance(judge, ModelJudge) and judge.engine.model is not trainer.policy  # frozen, its own Engine
    requests = [JudgeRequest("Compute 1+2.", ["1+2=3\n", "#### 3"], "3"),
                JudgeRequest("Compute 5-1.", ["5-1=4\n", "#### 4"], "4"),
                JudgeRequest("Compute 9+9.", ["9+9=18\n", "#### 18"], "18")]
    result = judge.critique(requests)
    assert [len(cs) for cs in result.critiques] == [4, 4, 4]
    assert result.preemptions == 0
    assert result.prefill_tokens + result.cached_tokens == result.prompt_tokens  # each prompt once
    assert result.forked_sequences == 3 * (4 - 1)  # the other votes are KV forks
    # The next batch (the next iteration's responses) finds the template's shared head cached:
    # the judge is frozen, so its Engine keeps its prefix cache across iterations.
    again = judge.critique([JudgeRequest("Compute 2+2.", ["2+2=4\n", "#### 4"], "4")])
    assert again.cached_tokens > 0 and again.prefill_tokens + again.cached_tokens == again.prompt_tokens


def test_the_judge_weights_stay_frozen_while_the_policy_trains(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="capo", capo_judge_max_new_tokens=4, iterations=1))
    before = [p.detach().clone() for p in trainer.algorithm.judge.engine.model.parameters()]
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.algorithm.judge.engine.model.parameters()))
    assert not any(p.requires_grad for p in trainer.algorithm.judge.engine.model.parameters())


def test_a_separate_judge_checkpoint(tmp_path):
    from engine.model import create_tiny_checkpoint

    judge_dir = tmp_path / "judge"
    create_tiny_checkpoint(judge_dir, seed=7, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    trainer = make_trainer(fast_config(tmp_path / "run", algo="capo", judge_model=str(judge_dir)))
    assert trainer.algorithm.judge.engine.model.config.num_hidden_layers == 1


@pytest.mark.parametrize("overrides, message", [
    ({"capo_voting": "average"}, "capo_voting must be one of intersection, majority, union, got 'average'"),
    ({"capo_votes": 0}, "capo_votes must be an integer >= 1, got 0"),
    ({"capo_w_process": -1.0}, "capo_w_process must be a number >= 0 \\(a penalty\\), got -1.0"),
    ({"judge": "oracle"}, "judge must be one of model, rule, got 'oracle'"),
    ({"judge_model": "/nonexistent/judge"}, "judge_model /nonexistent/judge is not a Hugging Face checkpoint"),
    ({"samples_per_prompt": 1}, "capo compares the samples of a prompt: samples_per_prompt must be >= 2"),
    ({"step_split": "chunks"}, "capo needs reasoning steps a judge can read"),
])
def test_bad_capo_configs_fail_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fast_config(tmp_path, algo="capo", **overrides)
    assert not (tmp_path / "run").exists()


def test_a_judge_checkpoint_without_tokenizer_is_a_clear_error(tmp_path):
    from engine.model import create_tiny_checkpoint

    judge_dir = tmp_path / "judge"
    create_tiny_checkpoint(judge_dir, seed=7)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (judge_dir / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=f"judge_model {judge_dir} has no tokenizer"):
        fast_config(tmp_path, algo="capo", judge_model=str(judge_dir))


def test_the_rule_judge_needs_the_arithmetic_task(tmp_path):
    from engine.rl.config import load_config

    with pytest.raises(ConfigError, match="the rule judge checks the arithmetic task's lines"):
        load_config("default", {"algo": "capo", "judge": "rule", "task": "gsm8k", "task_args": {}})


def test_an_instruct_judge_reads_its_prompt_as_a_chat_turn(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="capo", capo_judge_max_new_tokens=4))
    judge = trainer.algorithm.judge
    request = JudgeRequest("Compute 1+2.", ["1+2=3\n", "#### 3"], "3")
    assert not judge.chat and judge.prompt(request).startswith("You are checking")  # no template: plain text
    judge.engine.tokenizer.chat_template = "{% for m in messages %}[U]{{ m['content'] }}{% endfor %}[A]"
    chat = ModelJudge(judge.engine, votes=2, temperature=1.0, top_p=1.0, max_new_tokens=4, show_answer=True)
    assert chat.chat and chat.prompt(request) == "[U]" + judge.prompt(request) + "[A]"
    assert len(chat.critique([request]).critiques[0]) == 2  # and the Engine serves it
    plain = ModelJudge(judge.engine, votes=1, temperature=1.0, top_p=1.0, max_new_tokens=4, show_answer=True,
                       chat=False)
    assert plain.prompt(request) == judge.prompt(request)
    judge.engine.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="capo_judge_chat is true but the judge's tokenizer has no chat template"):
        ModelJudge(judge.engine, votes=1, temperature=1.0, top_p=1.0, max_new_tokens=4, show_answer=True, chat=True)


def test_a_chat_judge_prompt_holds_one_bos(tmp_path):
    """A template that writes BOS, a tokenizer that adds one when encoding: the judge's ids hold one
    (the rule of engine.tasks.base.chat_prompt, shared with the tasks' chat prompts)."""
    from tokenizers import processors

    trainer = make_trainer(fast_config(tmp_path, algo="capo", capo_judge_max_new_tokens=4))
    tok = trainer.algorithm.judge.engine.tokenizer
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[U]{{ m['content'] }}{% endfor %}[A]"
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    judge = ModelJudge(trainer.algorithm.judge.engine, votes=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                       show_answer=True)
    ids = tok.encode(judge.prompt(JudgeRequest("Compute 1+2.", ["1+2=3\n", "#### 3"], "3")))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_under_fsdp_the_judges_kv_pool_is_released_for_the_update(tmp_path, monkeypatch):
    """Like the policy's pool: freed after the judge's phase, allocated again by its next critique."""
    trainer = make_trainer(fast_config(tmp_path, algo="capo", capo_judge_max_new_tokens=4, iterations=2))
    judge = trainer.algorithm.judge
    monkeypatch.setattr(trainer, "sharded", True)  # (the release path; one process has nothing to gather)
    seen = []
    real = judge.critique

    def critique(*args, **kwargs):
        seen.append(judge.engine.pool.allocated)
        return real(*args, **kwargs)

    monkeypatch.setattr(judge, "critique", critique)
    for it in (1, 2):
        trainer.iteration = it
        trainer.train_iteration()
        assert not judge.engine.pool.allocated
    assert seen == [True, False]  # allocated at the start; after a release, allocated again on use
