"""`python -m engine.analysis credit`: the localisation, advantage and gradient-noise statistics by
hand, the gradient against the loss written out, the CLI end to end on a tiny random model, and
its bad input."""
from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch

from engine.analysis import main
from engine.analysis.credit import (CreditCase, _policy_gradient, advantage_stats, credit_config, first_wrong_step,
                                    gradient_noise, gram_matrix, localisation_metrics, mean_cosine,
                                    step_mean_advantages)
from engine.model import create_tiny_checkpoint

TASK_ARGS = dict(steps=2, max_operand=9, n_train=200, n_test=8)


# ---------------------------------------------------------------------------- the statistics by hand

def test_first_wrong_step_reads_the_lines():
    assert first_wrong_step(["3+4=7\n", "7-2=5\n", "5+1=6\n#### 6"]) is None
    assert first_wrong_step(["3+4=7\n", "7-2=4\n", "4+1=6\n#### 6"]) == 1     # steps 1 and 2 are false
    assert first_wrong_step(["3+4=8\n", "8-2=6\n#### 6"]) == 0                # step 1 is right from a wrong 8
    assert first_wrong_step([]) is None


def test_step_mean_advantages():
    adv = torch.tensor([1.0, 1.0, -2.0, 0.0, 4.0])
    assert step_mean_advantages(adv, [2, 3, 5]) == [1.0, -2.0, 2.0]


def test_localisation_metrics_by_hand():
    cases = [
        # first wrong step 1 is the unique lowest: a hit
        CreditCase(step_advantages=[0.5, -1.0, 0.0], step_lengths=[2, 3, 1], first_wrong=1),
        # the lowest is step 2, not the first wrong step 0: a miss
        CreditCase(step_advantages=[-0.2, 0.3, -0.9], step_lengths=[1, 1, 2], first_wrong=0),
        # one advantage for the whole response (GRPO-like): a 4-way tie at the minimum
        CreditCase(step_advantages=[-0.5] * 4, step_lengths=[1, 1, 1, 1], first_wrong=2),
    ]
    m = localisation_metrics(cases)
    assert m["responses"] == 3
    assert m["accuracy"] == pytest.approx(1 / 3)                         # ties are misses
    assert m["tied_frac"] == pytest.approx(1 / 3)
    assert m["accuracy_random_tiebreak"] == pytest.approx((1 + 0 + 1 / 4) / 3)
    assert m["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 4) / 3)
    # token-weighted pools: first wrong steps (3 tokens of -1, 1 of -0.2, 1 of -0.5)
    assert m["first_wrong_adv"] == pytest.approx((-3.0 - 0.2 - 0.5) / 5)
    assert m["before_adv"] == pytest.approx((2 * 0.5 + 2 * -0.5) / 4)   # case 1 step 0, case 3 steps 0, 1
    assert m["after_adv"] == pytest.approx((0.0 + 0.3 - 1.8 - 0.5) / 5)


def test_localisation_metrics_edge_cases():
    m = localisation_metrics([])
    assert m["responses"] == 0 and m["accuracy"] is None and m["first_wrong_adv"] is None and m["chance"] is None
    # the first wrong step is the first step: nothing before it
    m = localisation_metrics([CreditCase([-1.0, 0.0], [2, 2], 0)])
    assert m["before_adv"] is None and m["accuracy"] == 1.0 and m["after_adv"] == 0.0
    # a constant-advantage estimator is at chance exactly, with random tie-breaking
    cases = [CreditCase([0.3] * n, [1] * n, n - 1) for n in (2, 4, 5)]
    m = localisation_metrics(cases)
    assert m["accuracy"] == 0.0 and m["tied_frac"] == 1.0
    assert m["accuracy_random_tiebreak"] == pytest.approx(m["chance"])
    with pytest.raises(ValueError):
        localisation_metrics([CreditCase([0.0], [1], 1)])


def test_advantage_stats_by_hand():
    adv = [torch.tensor([0.0, 0.0, 1.0]), torch.tensor([-1.0, 0.0]), torch.zeros(3)]
    s = advantage_stats(adv, [1.0, 0.0, 0.0])
    assert s["tokens"] == 8
    assert s["zero_frac"] == pytest.approx(6 / 8)
    assert s["zero_response_frac"] == pytest.approx(1 / 3)
    assert s["mean"] == pytest.approx(0.0) and s["abs_mean"] == pytest.approx(2 / 8)
    assert s["std"] == pytest.approx(math.sqrt(2 / 7))
    assert s["correct_mean"] == pytest.approx(1 / 3) and s["correct_abs_mean"] == pytest.approx(1 / 3)
    assert s["incorrect_mean"] == pytest.approx(-1 / 5) and s["incorrect_abs_mean"] == pytest.approx(1 / 5)
    assert advantage_stats([torch.ones(2)], [1.0])["incorrect_mean"] is None
    with pytest.raises(ValueError):
        advantage_stats([torch.ones(2)], [1.0, 0.0])


def test_gradient_noise_identical_gradients_have_no_noise():
    g = torch.tensor([3.0, 4.0, 0.0])
    n = gradient_noise(gram_matrix([g, g, g]))
    assert n["cosine"] == pytest.approx(1.0) and n["noise_to_signal"] == pytest.approx(0.0)
    assert n["cosine_se"] == pytest.approx(0.0, abs=1e-12)
    assert n["noise_to_signal_unbiased"] == pytest.approx(0.0)
    assert n["grad_norm"] == pytest.approx(5.0) and n["mean_grad_norm"] == pytest.approx(5.0)


def test_gradient_noise_by_hand():
    # g = mean (1, 0) plus noise (0, +-1): |mean|^2 = 1, noise 1 each
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    n = gradient_noise(gram_matrix([a, b]))
    assert n["cosine"] == pytest.approx(0.0)
    assert n["noise_to_signal"] == pytest.approx(1.0)
    assert n["noise_to_signal_unbiased"] is None            # a . b = 0: no signal above the noise
    assert n["grad_norm"] == pytest.approx(math.sqrt(2)) and n["mean_grad_norm"] == pytest.approx(1.0)
    # opposite gradients: mean 0, no ratio
    n = gradient_noise(gram_matrix([a, -a]))
    assert n["cosine"] == pytest.approx(-1.0) and n["noise_to_signal"] is None
    # three: (2,0), (0,2), (1,1): mean (1,1), |mean|^2 = 2; deviations 2, 2, 0 -> noise 4/3
    vs = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])]
    n = gradient_noise(gram_matrix(vs))
    assert n["noise_to_signal"] == pytest.approx((4 / 3) / 2)
    assert n["cosine"] == pytest.approx((0 + 2 * math.sqrt(0.5)) / 3)
    # off-diagonal mean (0 + 2 + 2) / 3, diagonal mean (4 + 4 + 2) / 3
    assert n["noise_to_signal_unbiased"] == pytest.approx((10 / 3 - 4 / 3) / (4 / 3))
    # jackknife: without batch 0, 1, 2 the mean cosine is sqrt(.5), sqrt(.5), 0
    loo = [math.sqrt(0.5), math.sqrt(0.5), 0.0]
    centre = sum(loo) / 3
    assert n["cosine_se"] == pytest.approx(math.sqrt(2 / 3 * sum((c - centre) ** 2 for c in loo)))
    one = gradient_noise(gram_matrix([a]))
    assert one["cosine"] is None and one["noise_to_signal"] == 0.0 and one["noise_to_signal_unbiased"] is None
    assert one["cosine_se"] is None and gradient_noise(gram_matrix([a, b]))["cosine_se"] is None


def test_mean_cosine_by_hand():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0])]       # mean (1, 1)
    b = [torch.tensor([0.0, 3.0])]                                  # mean (0, 3)
    cross = (torch.stack(a) @ torch.stack(b).T).tolist()
    assert mean_cosine(cross, gram_matrix(a), gram_matrix(b)) == pytest.approx(1 / math.sqrt(2))
    assert mean_cosine(cross, gram_matrix(a), gram_matrix(a)) is not None
    zero = [torch.zeros(2)]
    assert mean_cosine([[0.0]], gram_matrix(zero), gram_matrix(zero)) is None


# ---------------------------------------------------------------------------- the gradient is the loss's

def test_policy_gradient_is_the_token_mean_surrogate_at_ratio_one(tiny_policy_dir):
    """-(1/N) sum_t A_t grad log pi(y_t) over the batch's N response tokens, micro-batches or not."""
    from engine.rl.packed import Packed
    from engine.rl.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = credit_config(str(tiny_policy_dir), "arithmetic", TASK_ARGS, prompts=3, samples=2, k=1, max_new_tokens=12,
                            run_dir=run_dir, kv_cache_tokens=4096)
        assert cfg.micro_batch_size == 6 and cfg.minibatch_size == 6 and cfg.kl_coef == 0.0
        trainer = Trainer(cfg, progress=False)
        trainer.iteration = 1
        episodes = trainer._sample_episodes()
        gen = torch.Generator().manual_seed(0)
        adv = {id(e): torch.randn(e.num_tokens, generator=gen) for e in episodes}
        grad = _policy_gradient(trainer, episodes, adv)

        trainer.policy.zero_grad(set_to_none=True)
        packed = Packed.build(episodes, trainer.device)
        lp = trainer.token_logprobs(trainer.policy, packed)
        n = sum(e.num_tokens for e in episodes)
        (-(torch.cat([adv[id(e)] for e in episodes]) * lp).sum() / n).backward()
        expected = torch.cat([p.grad.flatten() for p in trainer.policy.parameters()])
        assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)
        trainer.cfg.micro_batch_size = 2                      # accumulated over 3 micro-batches: the same
        assert torch.allclose(_policy_gradient(trainer, episodes, adv), expected, atol=1e-6, rtol=1e-4)
        assert not _policy_gradient(trainer, episodes, {k: torch.zeros_like(v) for k, v in adv.items()}).any()


# ---------------------------------------------------------------------------- the CLI

def test_cli_end_to_end_with_a_critic(tiny_policy_dir, tiny_ppo_checkpoint, tmp_path):
    out = tmp_path / "credit.json"
    report = main(["credit", "--model", str(tiny_policy_dir), "--task", "arithmetic", "--task-args", json.dumps(TASK_ARGS),
                   "--prompts", "3", "--samples", "2", "--k", "2", "--batches", "2", "--temperature", "1.0",
                   "--max-new-tokens", "16", "--critic", str(tiny_ppo_checkpoint), "--quiet", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert (tmp_path / "credit.png").stat().st_size > 0
    est = ["vineppo", "grpo", "rloo", "ppo", "capo"]
    assert saved["estimators"] == est and saved["responses"] == 12 and saved["batches"] == 2
    assert [b["responses"] for b in saved["per_batch"]] == [6, 6]
    for e in est:
        a = saved["advantages"][e]
        assert 0.0 <= a["zero_frac"] <= 1.0 and a["tokens"] > 0
        g = saved["gradient"][e]
        assert g["batches"] == 2 and g["grad_norm"] >= 0.0
        assert set(g) >= {"cosine", "cosine_se", "noise_to_signal", "noise_to_signal_unbiased", "cosine_to_vineppo_mean",
                          "cosine_to_vineppo_same_batch"}
        loc = saved["localisation"][e]
        assert set(loc) >= {"first_wrong_adv", "before_adv", "after_adv", "accuracy", "tied_frac",
                            "accuracy_random_tiebreak", "chance", "responses"}
    assert saved["gradient"]["vineppo"]["cosine_to_vineppo_same_batch"] in (None, pytest.approx(1.0))
    assert saved["mc"]["rollouts"] > 0 and saved["gradient"]["parameters"] > 0
    assert all(len(saved["gradient"]["gram"][e]) == 2 for e in est)     # the batches' dot products
    # the random model answers nothing right: GRPO and RLOO give every token advantage 0
    if saved["reward_mean"] == 0.0:
        assert saved["advantages"]["grpo"]["zero_frac"] == 1.0 and saved["advantages"]["rloo"]["zero_frac"] == 1.0
    assert saved["config"]["critic"] == str(tiny_ppo_checkpoint) and saved["advantages"] == report["advantages"]
    assert saved["localisation"]["tie_rule"]


def test_cli_with_tree_rollouts_reports_spo_tree_on_its_own_leaves(tiny_policy_dir, tmp_path):
    out = tmp_path / "credit-tree.json"
    main(["credit", "--model", str(tiny_policy_dir), "--task", "arithmetic", "--task-args", json.dumps(TASK_ARGS),
          "--prompts", "2", "--tree-branching", "2", "2", "--tree-segment-tokens", "4", "--batches", "2",
          "--temperature", "1.0", "--max-new-tokens", "16", "--quiet", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["estimators"] == ["spo-tree", "capo"] and saved["gradient"]["reference"] == "spo-tree"
    assert all(1 <= b["responses"] <= 2 * 2 * 2 for b in saved["per_batch"])  # a tree's leaves per prompt
    assert saved["advantages"]["spo-tree"]["tokens"] > 0 and "spo-tree" in saved["localisation"]


def test_credit_analysis_on_hand_made_responses(tiny_policy_dir, monkeypatch):
    """Fixed responses and MC rollouts: the first wrong step of a response with a false line gets
    VinePPO's lowest advantage; GRPO's is one value per response."""
    from engine.analysis.credit import credit_analysis
    from engine.rl import rollout
    from engine.rl.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = credit_config(str(tiny_policy_dir), "arithmetic", TASK_ARGS, prompts=2, samples=2, k=2, max_new_tokens=16,
                            run_dir=run_dir, kv_cache_tokens=4096)
        trainer = Trainer(cfg, progress=False)
        tok = trainer.tokenizer
        responses = ["1+1=2\n2+1=3\n#### 3", "1+1=3\n3+1=4\n#### 4"]   # right; wrong from step 0

        def fake_sample(self):
            items = self.train_items[:2]   # the same prompts every batch
            eps = []
            for g, it in enumerate(items):
                for text in responses:
                    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
                    eps.append(rollout.Episode(group=g, item=it, prompt_ids=tok.encode(self.task.prompt(it)),
                                               response_ids=ids, text=text, finish_reason="stop",
                                               reward=float(text.startswith("1+1=2"))))
            return eps

        def fake_mc(engine, task, episodes, **kw):
            for ep in episodes:   # V(prompt) = 0.5, after a right line 1, after a wrong one 0
                ep.state_values = [0.5] + [float(ep.reward)] * (len(ep.step_ends) - 1)
            return rollout.MCStats(states=1, rollouts=2)

        monkeypatch.setattr(Trainer, "_sample_episodes", fake_sample)
        monkeypatch.setattr("engine.rl.algorithms.vineppo.mc_values", fake_mc)
        report = credit_analysis(trainer, batches=2)
    loc = report["localisation"]
    assert loc["wrong_responses"] == 4 and loc["correct_with_wrong_line"] == 0
    assert loc["vineppo"]["accuracy"] == 1.0 and loc["vineppo"]["first_wrong_adv"] == pytest.approx(-0.5)
    assert loc["vineppo"]["before_adv"] is None and loc["vineppo"]["after_adv"] == pytest.approx(0.0)
    assert loc["grpo"]["accuracy"] == 0.0 and loc["grpo"]["tied_frac"] == 1.0
    assert loc["grpo"]["accuracy_random_tiebreak"] == pytest.approx(loc["grpo"]["chance"]) == pytest.approx(0.5)
    # GRPO: (0 - 0.5) / std([1, 0]) for every token of the wrong response; RLOO: 0 - 1
    assert loc["grpo"]["first_wrong_adv"] == pytest.approx(-0.5 / math.sqrt(0.5), rel=1e-4)
    assert loc["rloo"]["first_wrong_adv"] == pytest.approx(-1.0)
    # the same responses every batch: identical gradients, no noise
    for e in ("vineppo", "grpo", "rloo"):
        assert report["gradient"][e]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert report["gradient"][e]["noise_to_signal"] == pytest.approx(0.0, abs=1e-5)
    # VinePPO: the second step of both responses has advantage 0 (V after step 0 = the reward)
    assert 0.0 < report["advantages"]["vineppo"]["zero_frac"] < 1.0 and report["reward_mean"] == 0.5
    assert report["advantages"]["grpo"]["zero_frac"] == 0.0


@pytest.mark.parametrize("flag, value", [("--prompts", "0"), ("--samples", "0"), ("--samples", "1"), ("--k", "0"),
                                         ("--batches", "0"), ("--max-new-tokens", "0")])
def test_bad_counts_fail_before_loading_anything(flag, value, capsys, tmp_path):
    args = {"--prompts": "2", "--samples": "2", "--k": "1", "--batches": "2", "--max-new-tokens": "8"}
    args[flag] = value
    argv = ["credit", "--model", str(tmp_path / "no-such-model"), "--task", "arithmetic"]
    for k, v in args.items():
        argv += [k, v]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err and "no-such-model" not in err   # the count, before the model


def test_missing_model_and_unknown_task_are_clear_errors(capsys, tmp_path, tiny_policy_dir):
    with pytest.raises(SystemExit) as e:
        main(["credit", "--model", str(tmp_path / "nope"), "--task", "arithmetic"])
    assert e.value.code == 2 and "model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["credit", "--model", str(tiny_policy_dir), "--task", "gsm9k"])
    assert e.value.code == 2 and "unknown task 'gsm9k'" in capsys.readouterr().err
    (tmp_path / "ckpt" / "critic").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["credit", "--model", str(tiny_policy_dir), "--task", "arithmetic", "--critic", str(tmp_path / "ckpt")])
    assert e.value.code == 2 and "value_head.safetensors" in capsys.readouterr().err


def test_a_task_without_the_line_checker_skips_localisation_with_a_note(tmp_path, tiny_policy_args):
    create_tiny_checkpoint(tmp_path / "m", seed=0, **{**tiny_policy_args, "max_position_embeddings": 1024})  # GSM8K prompts
    out = tmp_path / "gsm8k.json"
    report = main(["credit", "--model", str(tmp_path / "m"), "--task", "gsm8k", "--task-args", "{data: sample}",
                   "--prompts", "2", "--samples", "2", "--k", "1", "--batches", "1", "--max-new-tokens", "8",
                   "--quiet", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert "localisation" not in saved and "gsm8k has none" in saved["localisation_note"]
    assert saved["gradient"]["vineppo"]["cosine"] is None          # one batch: no pair
    assert report["localisation_note"] == saved["localisation_note"]
