"""RestEM and DPO+: the filter, the pairs, the DPO-Positive loss, and both run end to end."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from engine.rl.algorithms import Minibatch
from engine.rl.algorithms.dpo_plus import reference_seq_logprobs
from engine.rl.config import ConfigError
from engine.rl.offline import dpo_pairs, dpop_loss, restem_select
from engine.rl.rollout import Episode
from engine.tasks import Item
from test_trainer import assert_resume_reproduces, fast_config, make_trainer, rows_of  # the helpers of the same folder

OFFLINE = ("restem", "dpo+")


def _backward(trainer, micro: list, batch: Minibatch) -> dict[str, float]:
    """The algorithm's loss of one micro-batch, backpropagated as the trainer does; its statistics."""
    out = trainer.algorithm.loss(micro, batch, trainer)
    out.loss.backward()
    return out.stats


def _ep(group: int, reward: float, n: int = 3) -> Episode:
    return Episode(group=group, item=Item(id=str(group), question="q", answer="1"), prompt_ids=[1, 2],
                   response_ids=list(range(3, 3 + n)), text="", finish_reason="stop", reward=reward)


# ---------------------------------------------------------------- RestEM's filter
def test_restem_keeps_only_correct_samples_with_a_cap_per_prompt():
    eps = [_ep(0, 1.0), _ep(0, 0.0), _ep(0, 1.0), _ep(0, 1.0), _ep(1, 0.0), _ep(1, 0.0), _ep(2, 1.0)]
    kept = restem_select(eps, None, random.Random(0))
    assert kept == [eps[0], eps[2], eps[3], eps[6]]  # all correct ones, prompts in order
    capped = restem_select(eps, 2, random.Random(0))
    assert len(capped) == 3 and all(e.reward == 1.0 for e in capped)
    assert sum(e.group == 0 for e in capped) == 2 and capped[-1] is eps[6]
    assert restem_select([_ep(0, 0.0), _ep(1, 0.5)], None, random.Random(0)) == []  # partial credit is not kept


# ---------------------------------------------------------------- DPO+ pairs
def test_dpo_pairs_per_prompt_and_prompts_without_pair_are_counted():
    eps = [_ep(0, 1.0), _ep(0, 0.0), _ep(0, 0.0),  # 1 x 2 -> 2 pairs
           _ep(1, 1.0), _ep(1, 1.0),               # all correct -> none
           _ep(2, 0.0), _ep(2, 0.0),               # all wrong -> none
           _ep(3, 1.0), _ep(3, 1.0), _ep(3, 0.0), _ep(3, 0.0), _ep(3, 0.0)]  # 2 x 3 = 6 pairs
    found = dpo_pairs(eps, None, random.Random(0))
    assert found.prompts == 4 and found.prompts_without_pair == 2
    assert len(found.pairs) == 8
    for c, r in found.pairs:
        assert c.group == r.group and c.reward == 1.0 and r.reward == 0.0
    assert {(id(c), id(r)) for c, r in found.pairs if c.group == 3} == \
        {(id(c), id(r)) for c in eps[7:9] for r in eps[9:]}
    capped = dpo_pairs(eps, 4, random.Random(0))
    assert len(capped.pairs) == 2 + 4 and len({(id(c), id(r)) for c, r in capped.pairs}) == 6
    none = dpo_pairs([_ep(0, 1.0), _ep(0, 1.0)], 8, random.Random(0))
    assert none.pairs == [] and none.prompts_without_pair == 1


# ---------------------------------------------------------------- DPO+ loss
def test_dpop_loss_by_hand():
    beta, lam = 0.1, 50.0
    # pair 1: the policy keeps the chosen above the reference: no penalty.
    # pair 2: chosen 0.2 nats below the reference: penalty 0.2 inside the sigmoid.
    pc, pr = torch.tensor([-2.0, -3.2]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-2.5, -3.0]), torch.tensor([-4.0, -4.5])
    loss, st = dpop_loss(pc, pr, rc, rr, beta=beta, nll_coef=lam)
    l1 = -math.log(1 / (1 + math.exp(-0.1 * ((-2.0 + 2.5) - (-5.0 + 4.0)))))          # logits 1.5
    l2 = -math.log(1 / (1 + math.exp(-0.1 * ((-3.2 + 3.0) - (-4.0 + 4.5) - 50 * 0.2))))  # logits -10.7
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    assert st["dpo_chosen_penalty"] == pytest.approx(0.2, rel=1e-5)
    assert st["dpo_pair_accuracy"] == 1.0  # margins 1.5 > 0, -0.7 < 0
    assert st["dpo_reward_margin"] == pytest.approx(0.1 * (1.5 - 0.7), rel=1e-5)
    # lam = 0 is plain DPO; num_pairs rescales the sum (micro-batches of one minibatch add up)
    plain, _ = dpop_loss(pc, pr, rc, rr, beta=beta, nll_coef=0.0)
    assert plain.item() == pytest.approx(-(F.logsigmoid(torch.tensor([0.15, -0.07]))).mean().item(), rel=1e-6)
    half, _ = dpop_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=beta, nll_coef=lam, num_pairs=2)
    other, _ = dpop_loss(pc[1:], pr[1:], rc[1:], rr[1:], beta=beta, nll_coef=lam, num_pairs=2)
    assert (half + other).item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError):
        dpop_loss(pc, pr, rc, rr, beta=0.0, nll_coef=lam)


def test_dpo_backward_matches_autograd_on_a_tiny_model(tmp_path):
    """The trainer's packed, fused DPO+ gradient equals autograd through plain per-sequence
    forwards and log_softmax of the same model."""
    trainer = make_trainer(fast_config(tmp_path, algo="dpo+", dpo_nll_coef=5.0, temperature=0.7))
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(3):
        c, r = _ep(i, 1.0, n=4 + i), _ep(i, 0.0, n=6 - i)
        for e in (c, r):
            e.response_ids = torch.randint(3, 12, (e.num_tokens,), generator=g).tolist()
        pairs.append((c, r))
    episodes = [e for p in pairs for e in p]
    reference_seq_logprobs(episodes, trainer)
    for e in episodes:  # move the reference away from the policy so the penalty term is active for some
        e.ref_logprobs = e.ref_logprobs + (0.3 if e.reward == 1.0 else -0.2)
    trainer.policy.zero_grad(set_to_none=True)
    batch = Minibatch(pairs, num_units=3, num_tokens=0, where="test")
    st = [_backward(trainer, pairs[:2], batch), _backward(trainer, pairs[2:], batch)]  # two micro-batches
    assert sum(s["dpo_chosen_penalty"] for s in st) > 0  # the hinge term is active in the compared gradient
    fused = [p.grad.clone() for p in trainer.policy.parameters()]

    trainer.policy.zero_grad(set_to_none=True)
    model = trainer.policy

    def seq_logprob(e: Episode) -> torch.Tensor:
        ids = torch.tensor(e.prompt_ids + e.response_ids)[None]
        logits = model(ids, cu_seqlens=torch.tensor([0, ids.shape[1]]))[0].float() / 0.7
        p = len(e.prompt_ids)
        lp = torch.log_softmax(logits[p - 1: -1], -1)
        return lp.gather(-1, torch.tensor(e.response_ids)[:, None]).sum()

    losses = []
    for c, r in pairs:
        pc, pr = seq_logprob(c), seq_logprob(r)
        rc, rr = c.ref_logprobs.sum(), r.ref_logprobs.sum()
        logits = (pc - rc) - (pr - rr) - 5.0 * torch.clamp(rc - pc, min=0.0)
        losses.append(-F.logsigmoid(0.1 * logits))
    torch.stack(losses).mean().backward()
    for a, p in zip(fused, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("algo", OFFLINE)
def test_two_iterations_of_restem_and_dpo_plus(tmp_path, algo):
    trainer = make_trainer(fast_config(tmp_path, algo=algo))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.run()
    rows = rows_of(trainer)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    keys = ["restem_kept", "restem_kept_frac"] if algo == "restem" else \
        ["dpo_pairs", "dpo_prompts_without_pair", "dpo_reward_margin", "dpo_pair_accuracy"]
    for r in rows[1:]:
        for key in ("reward_mean", "train_accuracy", "eval_accuracy", "update_skipped", "time_sample", *keys):
            assert key in r and r[key] == r[key], (algo, key)
    trained = [r for r in rows[1:] if r["update_skipped"] == 0]
    assert trained, "the digit task gives both outcomes: some iteration must have data"
    for r in trained:
        assert math.isfinite(r["loss"]) and r["optimizer_steps"] >= 2 and r["grad_norm"] > 0
    if algo == "restem":
        assert all(r["restem_kept"] == round(r["restem_kept_frac"] * 8) for r in rows[1:])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    assert (trainer.run_dir / "checkpoints" / "latest").read_text() == "iter_000002"


def test_restem_from_base_restarts_from_the_starting_model(tmp_path, monkeypatch):
    trainer = make_trainer(fast_config(tmp_path, algo="restem", iterations=1))
    base = [p.detach().clone() for p in trainer.ref.parameters()]
    seen = []
    real = trainer._update

    def spy(units):
        seen.append([p.detach().clone() for p in trainer.policy.parameters()])
        return real(units)

    with torch.no_grad():  # pretend an earlier iteration moved the policy
        for p in trainer.policy.parameters():
            p.add_(0.01)
    monkeypatch.setattr(trainer, "_update", spy)
    trainer.task.reward = lambda response, item, finish_reason="stop": 1.0  # every finished sample is kept
    trainer.iteration = 1
    row = trainer.train_iteration()
    assert row["update_skipped"] == 0 and row["restem_kept"] == round(8 * row["train_accuracy"]) > 0
    assert len(seen) == 1
    assert all(torch.equal(a, b) for a, b in zip(seen[0], base))  # fine-tuned from the base, not the moved one
    assert any(not torch.equal(a, b) for a, b in zip(base, trainer.policy.parameters()))  # and then trained
    cont = make_trainer(fast_config(tmp_path / "c", algo="restem", restem_from_base=False))
    assert cont.ref is None  # continuing needs no copy of the base


def test_an_iteration_without_pairs_skips_the_update(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="dpo+", iterations=1))
    trainer.task.reward = lambda response, item, finish_reason="stop": 0.0  # nothing is ever correct
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.iteration = 1
    with pytest.warns(RuntimeWarning, match="update is skipped"):
        row = trainer.train_iteration()
    assert row["update_skipped"] == 1 and row["dpo_pairs"] == 0 and row["dpo_prompts_without_pair"] == 4
    assert row["optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


@pytest.mark.parametrize("algo", OFFLINE)
def test_resume_restem_and_dpo_plus(tmp_path, algo):
    assert_resume_reproduces(tmp_path, algo=algo)


@pytest.mark.parametrize("overrides, message", [
    ({"algo": "dpo+", "dpo_beta": 0.0}, "dpo_beta must be a positive number, got 0.0"),
    ({"algo": "dpo+", "dpo_beta": -1.0}, "dpo_beta must be a positive number"),
    ({"algo": "dpo+", "dpo_nll_coef": -0.5}, "dpo_nll_coef must be a number >= 0, got -0.5"),
    ({"algo": "dpo+", "samples_per_prompt": 1}, "dpo\\+ pairs .* samples_per_prompt must be >= 2, got 1"),
    ({"algo": "restem", "restem_max_per_prompt": 0}, "restem_max_per_prompt must be an integer >= 1 or null"),
    ({"algo": "dpo+", "dpo_max_pairs_per_prompt": 0}, "dpo_max_pairs_per_prompt must be an integer >= 1 or null"),
])
def test_bad_offline_configs_fail_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fast_config(tmp_path, **overrides)
    assert not (tmp_path / "run").exists()


def test_default_preset_takes_restem_and_dpo_plus():
    from engine.rl.config import load_config

    for algo in OFFLINE:
        assert load_config("default", {"algo": algo}).algo == algo


# ---------------------------------------------------------------- RestEM's epoch pick (early stopping)
def test_restem_pick_epoch_by_hand():
    from engine.rl.offline import restem_pick_epoch

    assert restem_pick_epoch([0.5, 0.6, 0.7, 0.65, 0.9], "first-drop") == 2  # stops at the first non-improvement
    assert restem_pick_epoch([0.5, 0.6, 0.7, 0.65, 0.9], "best") == 4
    assert restem_pick_epoch([0.5, 0.5, 0.9], "first-drop") == 0  # a tie is no improvement
    assert restem_pick_epoch([0.5, 0.4, 0.3], "first-drop") == 0  # training never helped: keep the start
    assert restem_pick_epoch([0.5, 0.8, 0.8, 0.3], "best") == 1  # the earliest of equals
    assert restem_pick_epoch([0.7], "first-drop") == 0
    with pytest.raises(ValueError, match="unknown RestEM early-stop mode 'last'"):
        restem_pick_epoch([0.5], "last")
    with pytest.raises(ValueError, match="at least epoch 0"):
        restem_pick_epoch([], "best")


@pytest.mark.parametrize("mode, accuracies, chosen, trained", [
    ("best", [0.5, 0.9, 0.6, 0.7], 1, 3),        # all epochs trained, the second model kept
    ("best", [0.5, 0.6, 0.7, 0.8], 3, 3),        # the last model is the best: nothing to restore
    ("first-drop", [0.5, 0.7, 0.6, 0.99], 1, 2),  # stops after the first drop; epoch 3 never runs
    ("first-drop", [0.5, 0.4, 0.9, 0.99], 0, 1),  # the weights before training are kept
])
def test_restem_early_stop_keeps_the_picked_epochs_weights(tmp_path, monkeypatch, mode, accuracies, chosen, trained):
    """The validation accuracies are scripted: the test checks which weights the iteration ends
    with, how many epochs ran, and the metrics, against the accuracies it fed in."""
    trainer = make_trainer(fast_config(tmp_path, algo="restem", iterations=1, epochs=3, restem_early_stop=mode,
                                       eval_splits=["test", "validation"], validation_items=8))
    trainer.task.reward = lambda response, item, finish_reason="stop": 1.0  # every finished sample is kept
    real_evaluate = trainer.evaluate
    snapshots = []

    def scripted(splits=None):
        if splits is None:
            return real_evaluate()
        assert tuple(splits) == ("validation",)
        snapshots.append([p.detach().clone() for p in trainer.policy.parameters()])
        return {"eval_validation_accuracy": accuracies[len(snapshots) - 1]}

    monkeypatch.setattr(trainer, "evaluate", scripted)
    trainer.iteration = 1
    row = trainer.train_iteration()
    assert len(snapshots) == trained + 1  # epoch 0 (before training) and each trained epoch
    assert row["restem_chosen_epoch"] == chosen and row["restem_epochs_trained"] == trained
    assert row["restem_val_accuracy_by_epoch"] == accuracies[: trained + 1]
    assert row["restem_val_accuracy"] == accuracies[chosen] and row["restem_val_accuracy_start"] == accuracies[0]
    steps_per_epoch = math.ceil(row["restem_kept"] / 4)  # minibatch_size 4
    assert row["optimizer_steps"] == trained * steps_per_epoch
    for p, q in zip(trainer.policy.parameters(), snapshots[chosen]):
        assert torch.equal(p, q)  # the policy (the Engine's tensors) holds the picked model
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # epochs did change the weights


def test_restem_early_stop_runs_end_to_end_on_real_validation(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="restem", iterations=1, epochs=2, restem_early_stop="best",
                                       eval_splits=["test", "validation"], validation_items=8))
    trainer.run()
    row = rows_of(trainer)[-1]
    assert row["update_skipped"] == 0  # (the digit task rewards about half the tiny model's samples)
    from engine.rl.offline import restem_pick_epoch

    accs = row["restem_val_accuracy_by_epoch"]
    assert len(accs) == 3 and row["restem_chosen_epoch"] == restem_pick_epoch(accs, "best")
    # Evaluation is seeded: the end-of-iteration evaluation of the kept model reproduces its accuracy.
    assert row["eval_validation_accuracy"] == pytest.approx(row["restem_val_accuracy"])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_restem_loss_aggregation_matches_autograd(tmp_path, aggregation):
    """RestEM's packed cross-entropy gradient equals plain autograd: token-mean over the
    minibatch, or (the authors' trainer) each response's token mean, then the mean over responses."""
    trainer = make_trainer(fast_config(tmp_path, algo="restem", loss_aggregation=aggregation))
    g = torch.Generator().manual_seed(1)
    eps = [_ep(i, 1.0, n=2 + 3 * i) for i in range(3)]
    for e in eps:
        e.response_ids = torch.randint(3, 12, (e.num_tokens,), generator=g).tolist()
    trainer.policy.zero_grad(set_to_none=True)
    batch = Minibatch(eps, num_units=len(eps), num_tokens=sum(e.num_tokens for e in eps), where="test")
    _backward(trainer, eps[:2], batch)
    _backward(trainer, eps[2:], batch)  # two micro-batches of one minibatch
    packed = [p.grad.clone() for p in trainer.policy.parameters()]
    trainer.policy.zero_grad(set_to_none=True)
    nll = []
    for e in eps:
        ids = torch.tensor(e.prompt_ids + e.response_ids)[None]
        logits = trainer.policy(ids, cu_seqlens=torch.tensor([0, ids.shape[1]]))[0].float()
        p = len(e.prompt_ids)
        lp = torch.log_softmax(logits[p - 1: -1], -1).gather(-1, torch.tensor(e.response_ids)[:, None])
        nll.append(-lp.squeeze(-1))
    if aggregation == "token-mean":
        loss = torch.cat(nll).sum() / sum(e.num_tokens for e in eps)
    else:
        loss = torch.stack([x.mean() for x in nll]).mean()
    loss.backward()
    for a, p in zip(packed, trainer.policy.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- presets and "all" prompts
def test_gsm8k_and_math_presets_carry_the_papers_restem_and_dpo_plus_settings(tmp_path):
    from engine.rl.config import load_config

    model = str(tmp_path)  # any existing folder satisfies the preset's "???"
    vine = load_config("gsm8k", {"model": model})
    assert (vine.iterations, vine.prompts_per_iteration, vine.epochs) == (650, 64, 2)  # untouched
    restem = load_config("gsm8k", {"model": model, "algo": "restem"})
    assert (restem.iterations, restem.prompts_per_iteration, restem.samples_per_prompt, restem.epochs) == \
        (10, "all", 8, 8)
    assert restem.restem_early_stop == "first-drop" and restem.loss_aggregation == "seq-mean-token-mean"
    assert restem.lr == 1e-6 and restem.minibatch_size == 64 and restem.task_args == {"grading": "strict"}
    for preset, beta in (("gsm8k", 0.3), ("math", 0.1)):
        dpo = load_config(preset, {"model": model, "algo": "dpo+"})
        assert (dpo.iterations, dpo.prompts_per_iteration, dpo.samples_per_prompt, dpo.epochs) == (1, "all", 64, 3)
        assert (dpo.dpo_beta, dpo.dpo_nll_coef, dpo.dpo_max_pairs_per_prompt) == (beta, 50.0, 64)
    # the command line still wins over the per-algorithm section
    assert load_config("gsm8k", {"model": model, "algo": "dpo+", "epochs": 5, "dpo_beta": 0.2}).epochs == 5
    cpu = load_config("default", {"algo": "restem"})
    assert cpu.restem_early_stop == "first-drop" and "validation" in cpu.eval_splits


@pytest.mark.parametrize("text, message", [
    ("per_algo: {sarsa: {epochs: 3}}", "per_algo in preset p.yaml names unknown algorithm\\(s\\) sarsa"),
    ("per_algo: {restem: {algo: dpo+}}", "per_algo.restem in preset p.yaml may not set algo"),
    ("per_algo: {restem: 3}", "per_algo in preset p.yaml must map algorithm names to mappings"),
    ("per_algo: {restem: {epochz: 3}}", "unknown config key\\(s\\) epochz"),
])
def test_bad_per_algo_sections_are_clear_errors(tmp_path, text, message):
    from engine.rl.config import load_config

    path = tmp_path / "p.yaml"
    path.write_text("algo: restem\n" + text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_all_prompts_per_iteration_is_the_whole_train_split(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, algo="restem", prompts_per_iteration="all",
                                       eval_splits=["test", "validation"], validation_items=8))
    assert trainer.prompts_per_iteration == len(trainer.train_items) == 64 - 8
    items = trainer._items_for(1)
    assert sorted(it.id for it in items) == sorted(it.id for it in trainer.train_items)  # each once, shuffled
    assert [it.id for it in items] != [it.id for it in trainer.train_items]
    with pytest.raises(ConfigError, match="a batch of 128 episodes \\(64 prompts \\(all train items\\) x 2 samples\\) "
                                          "does not divide into minibatches of 48"):
        make_trainer(fast_config(tmp_path / "v", algo="vineppo", prompts_per_iteration="all", minibatch_size=48))


@pytest.mark.parametrize("overrides, message", [
    ({"algo": "restem", "restem_early_stop": "last"}, "restem_early_stop must be one of off, first-drop, best"),
    ({"algo": "restem", "restem_early_stop": "best", "eval_splits": ["test"]}, "add validation to eval_splits"),
    ({"prompts_per_iteration": "some"}, 'prompts_per_iteration must be an integer >= 1 or "all", got \'some\''),
    ({"prompts_per_iteration": 0}, "prompts_per_iteration must be an integer >= 1"),
])
def test_bad_restem_and_prompt_count_configs(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fast_config(tmp_path, **overrides)
