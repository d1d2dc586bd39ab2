"""The algorithm registry and its contract with the trainer, and REINFORCE++ (the algorithm
added as one file): its credit by hand, both variants end to end, resume."""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from engine.rl import algorithms
from engine.rl.algorithms import REGISTRY, Algorithm
from engine.rl.algorithms.reinforce_pp import ReinforcePP, ReinforcePPBaseline
from engine.rl.config import ConfigError, load_config
from engine.rl.distributed import Dist
from engine.rl.rollout import Episode
from engine.tasks import Item
from test_trainer import assert_resume_reproduces, fast_config, make_trainer, rows_of  # the helpers of the same folder

ALGORITHM_DIR = Path(algorithms.__file__).parent


def _ep(group: int, reward: float, n: int) -> Episode:
    return Episode(group=group, item=Item(id=str(group), question="q", answer="1"), prompt_ids=[1, 2],
                   response_ids=list(range(3, 3 + n)), text="", finish_reason="stop", reward=reward)


class _Ctx:
    """The part of the trainer context a credit step without generation reads: one process."""
    dist = Dist()


# ---------------------------------------------------------------- the registry and the trainer
def test_every_registered_algorithm_is_a_named_algorithm_the_config_accepts(tmp_path):
    assert {"vineppo", "ppo", "grpo", "rloo", "capo", "restem", "dpo+", "reinforce++", "reinforce++-baseline"} \
        <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Algorithm) and cls.name == name
        assert load_config("smoke", {"algo": name, "run_dir": str(tmp_path / "r")}).algo == name


def test_an_unknown_algorithm_names_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown algo 'dpo'; choose one of vineppo, .*reinforce\+\+"):
        load_config("smoke", {"algo": "dpo", "run_dir": str(tmp_path / "r")})


def test_the_trainer_loop_names_no_algorithm():
    """The loop, checkpoints and evaluation are shared: every algorithm lives in engine/rl/algorithms."""
    names = re.compile(r"vineppo|ppo|grpo|rloo|capo|restem|dpo|reinforce", re.IGNORECASE)
    for module in ("trainer.py", "checkpointing.py", "evaluation.py", "packed.py"):
        source = (ALGORITHM_DIR.parent / module).read_text()
        assert not names.findall(source), (module, sorted(set(names.findall(source))))


def test_each_algorithm_lives_in_a_module_of_its_own():
    modules = {inspect.getmodule(cls).__name__.rsplit(".", 1)[-1] for cls in REGISTRY.values()}
    assert {"vineppo", "ppo", "grpo", "rloo", "capo", "restem", "dpo_plus", "reinforce_pp"} <= modules


# ---------------------------------------------------------------- REINFORCE++ by hand
def test_reinforce_pp_whitens_the_rewards_over_every_token_of_the_batch():
    eps = [_ep(0, 1.0, 3), _ep(0, 0.0, 2), _ep(1, 0.0, 4), _ep(1, 0.0, 1)]
    cfg = load_config("smoke", {"algo": "reinforce++"})
    assert ReinforcePP(cfg).credit(eps, _Ctx()) == {}
    tokens = torch.tensor([1.0] * 3 + [0.0] * 7, dtype=torch.float64)   # each response's reward on its tokens
    want = (tokens - tokens.mean()) / torch.sqrt(tokens.var() + 1e-8)  # no per-prompt group: one batch mean
    got = torch.cat([e.advantages for e in eps]).double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(float(got.mean())) < 1e-6
    assert torch.equal(eps[2].advantages, torch.full((4,), float(want[-1])))  # every wrong token alike


def test_reinforce_pp_baseline_subtracts_the_prompt_mean_before_whitening():
    eps = [_ep(0, 1.0, 3), _ep(0, 0.0, 2), _ep(1, 1.0, 2), _ep(1, 1.0, 2)]
    cfg = load_config("smoke", {"algo": "reinforce++-baseline"})
    ReinforcePPBaseline(cfg).credit(eps, _Ctx())
    centred = torch.tensor([0.5] * 3 + [-0.5] * 2 + [0.0] * 4, dtype=torch.float64)
    want = (centred - centred.mean()) / torch.sqrt(centred.var() + 1e-8)
    torch.testing.assert_close(torch.cat([e.advantages for e in eps]).double(), want, rtol=1e-6, atol=1e-6)
    # prompt 1's samples are all right: nothing to learn from them but the batch shift
    assert len(set(torch.cat([eps[2].advantages, eps[3].advantages]).tolist())) == 1


def test_reinforce_pp_baseline_compares_a_prompts_samples(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        load_config("smoke", {"algo": "reinforce++-baseline", "samples_per_prompt": 1, "minibatch_size": 8,
                              "micro_batch_size": 8, "run_dir": str(tmp_path / "r")})


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("algo", ["reinforce++", "reinforce++-baseline"])
def test_two_iterations_of_reinforce_pp(tmp_path, algo):
    trainer = make_trainer(fast_config(tmp_path, algo=algo, kl_coef=0.01))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.run()
    rows = rows_of(trainer)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("reward_mean", "loss", "kl_ref", "clip_frac", "adv_std", "grad_norm", "eval_accuracy"):
            assert key in r and math.isfinite(r[key]), (algo, key)
        if 0.0 < r["reward_mean"] < 1.0:  # both outcomes: the batch's advantages are whitened
            assert abs(r["adv_mean"]) < 1e-5 and r["adv_std"] == pytest.approx(1.0, abs=0.05)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_reinforce_pp_resume_reproduces(tmp_path):
    assert_resume_reproduces(tmp_path, algo="reinforce++")
