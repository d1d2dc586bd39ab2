"""What an external review of the trainer found (issue 30): overflow, the ratio guard's order,
unseeded data parallelism, the sampler/trainer log-prob gap, truncated IS and dual clip."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.rl.algorithms import LossOut
from engine.rl.algorithms.policy_gradient import tis_weights
from engine.rl.config import ConfigError
from engine.rl.distributed import Dist
from engine.rl.rollout import Episode
from engine.rl.trainer import Trainer
from engine.tasks import Item
from test_trainer import fast_config, inflate_training_logprobs, make_trainer  # the helpers of the same folder


def test_a_log_ratio_of_95_is_skipped_by_the_guard_not_a_divergence(tmp_path, monkeypatch):
    """exp(95) overflows: before the clamp such a micro-batch stopped the run (TrainingDiverged)
    although VinePPO's guard exists to skip it."""
    trainer = make_trainer(fast_config(tmp_path, iterations=1, kl_coef=0.1))
    inflate_training_logprobs(trainer, monkeypatch, nats=95.0)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    row = trainer.train_iteration()
    assert row["skipped_micro_batches"] == 2.0  # every micro-batch of every minibatch step
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_the_ratio_guard_comes_before_the_finiteness_check(tmp_path, monkeypatch):
    """A micro-batch the guard skips is dropped even when its loss is not finite."""
    trainer = make_trainer(fast_config(tmp_path, iterations=1))
    real = trainer.algorithm.loss

    def infinite_and_skipped(micro, batch, ctx):
        out = real(micro, batch, ctx)
        return LossOut(out.loss * math.inf, {"skipped_micro_batches": 1.0}, skipped=True)

    monkeypatch.setattr(trainer.algorithm, "loss", infinite_and_skipped)
    row = trainer.train_iteration()
    assert row["skipped_micro_batches"] == 2.0 and math.isfinite(row["grad_norm"])


def test_unseeded_sampling_under_data_parallelism_is_an_error_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="seeded_sampling: false under data parallelism \\(world size 2\\)"):
        Trainer(fast_config(tmp_path, seeded_sampling=False), progress=False, dist=Dist(world_size=2))
    assert not (tmp_path / "run").exists()


def test_the_sampler_and_trainer_logprob_gap_is_logged_and_tiny_on_cpu_fp32(tmp_path):
    trainer = make_trainer(fast_config(tmp_path, iterations=2))
    trainer.run()
    rows = [json.loads(x) for x in trainer.metrics_path.read_text().splitlines()][1:]
    for r in rows:
        # the same weights in fp32: only the order of the sums differs between the paged and the packed path
        assert 0.0 <= r["logprob_mismatch_mean_abs"] <= r["logprob_mismatch_max_abs"] < 1e-4, r
        assert abs(r["logprob_mismatch_kl"]) < 1e-8, r


def _episode(old: list[float], sampler: list[float]) -> Episode:
    return Episode(group=0, item=Item(id="0", question="q", answer="1"), prompt_ids=[1], response_ids=[2] * len(old),
                   text="", finish_reason="stop", reward=1.0, old_logprobs=torch.tensor(old),
                   sampler_logprobs=torch.tensor(sampler))


def test_tis_weights_are_truncated_ratios_and_one_for_an_undrawn_token():
    ep = _episode([-1.0, -1.0, -2.0, -1.0], [-1.0, -3.0, -1.0, math.nan])
    w = tis_weights(ep, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-1.0), 1.0]))  # e^2 capped at 2


def test_tis_cap_and_dual_clip_reach_the_loss(tmp_path, monkeypatch):
    import engine.rl.algorithms.policy_gradient as pg
    from engine.rl.loss import ppo_loss

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return ppo_loss(*args, **kwargs)

    monkeypatch.setattr(pg, "ppo_loss", spy)
    trainer = make_trainer(fast_config(tmp_path, iterations=1, tis_cap=2.0, dual_clip=3.0))
    row = trainer.train_iteration()
    assert seen and all(k["dual_clip"] == 3.0 and k["token_weights"] is not None for k in seen)
    assert all(((w == 0) | (w <= 2.0)).all() for w in (k["token_weights"] for k in seen))  # (0: padding)
    assert math.isfinite(row["loss"])


@pytest.mark.parametrize("key, value", [("dual_clip", 1.0), ("tis_cap", 0.5), ("dual_clip", True)])
def test_bad_dual_clip_and_tis_cap_are_config_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"{key} must be a number > 1 or null, got {value!r}"):
        fast_config(tmp_path, **{key: value})


def test_sampler_logprobs_line_up_with_the_kept_tokens(tmp_path):
    """A response cut at a stop string ends with an EOS the sampler did not draw: NaN there."""
    trainer = make_trainer(fast_config(tmp_path, iterations=1))
    trainer.iteration = 1
    for ep in trainer._sample_episodes():
        assert ep.sampler_logprobs is not None and len(ep.sampler_logprobs) == ep.num_tokens
        drawn = ep.sampler_logprobs[~torch.isnan(ep.sampler_logprobs)]
        assert (drawn <= 0).all() and len(drawn) >= ep.num_tokens - 1


class _FakeCuda:
    """torch.cuda's generator calls, recorded (no GPU here)."""

    def __init__(self):
        self.restored: list[tuple[int, torch.device]] = []

    def set_rng_state(self, state, device):
        self.restored.append((int(state[0]), device))


@pytest.mark.parametrize("saved_key", ["cuda_by_rank", "cuda"])
def test_resume_restores_each_ranks_own_cuda_state_on_its_current_device(monkeypatch, saved_key):
    """Written on a node with 4 GPUs, resumed on one with 2: rank r restores its own state (or,
    from a checkpoint of the old format, device r's) on its own device, with no IndexError."""
    from engine.rl import checkpointing

    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    base = checkpointing.rng_state()
    saved = {**base, saved_key: [torch.tensor([10 + r], dtype=torch.uint8) for r in range(4)]}
    for rank in range(2):
        checkpointing.set_rng_state(saved, rank=rank, device=torch.device("cuda", rank))
    assert fake.restored == [(10, torch.device("cuda", 0)), (11, torch.device("cuda", 1))]
    # a rank the checkpoint did not have keeps its seeded state; a CPU run never touches CUDA
    checkpointing.set_rng_state({**base, saved_key: saved[saved_key][:1]}, rank=1, device=torch.device("cuda", 1))
    checkpointing.set_rng_state(saved, rank=0, device=torch.device("cpu"))
    assert len(fake.restored) == 2


def test_each_rank_saves_its_own_devices_cuda_state(monkeypatch):
    from engine.rl import checkpointing

    class Trainer_:
        device = torch.device("cuda", 1)
        dist = Dist()

    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: seen.append(device) or torch.tensor([7]))
    assert [int(t[0]) for t in checkpointing.cuda_states(Trainer_())] == [7] and seen == [torch.device("cuda", 1)]
    Trainer_.device = torch.device("cpu")
    assert checkpointing.cuda_states(Trainer_()) is None


def test_ppo_resume_restores_the_critic(tmp_path):
    """The critic is saved under critic/ and loaded back in place (ValueModel.from_folder): a resumed
    run's metrics (its advantages come from the critic) and weights equal the uninterrupted run's."""
    from test_trainer import assert_resume_reproduces

    assert_resume_reproduces(tmp_path, algo="ppo")


@pytest.mark.parametrize("value", [0, -5, True, 1.5])
def test_checkpoint_timeout_must_be_whole_seconds(tmp_path, value):
    with pytest.raises(ConfigError, match=f"checkpoint_timeout_s must be an integer >= 1 \\(seconds\\), got {value!r}"):
        fast_config(tmp_path, checkpoint_timeout_s=value)
