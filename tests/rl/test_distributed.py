"""Data-parallel training (torchrun, gloo on CPU; --parallel ddp and fsdp): the same weights and
rewards as one process,
a failing rank ends the job, a bad world size is an error before any work; and the pieces
(the single-process Dist, shards, seeded MC values) in process.

The torchrun runs use the FAST settings of test_trainer.py as flags and the ENGINE_TEST_REWARD
hook (reward 1 for any digit), so the random tiny model earns rewards and really updates.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.rl.distributed import Dist, init_from_env
from torchrun_helpers import launch_command, launch_env, read_weights

pytestmark = pytest.mark.distributed

FLAGS = [
    "--preset", "smoke", "--iterations", "2", "--prompts-per-iteration", "4", "--samples-per-prompt", "2",
    "--max-new-tokens", "12", "--k", "2", "--epochs", "2", "--minibatch-size", "4", "--micro-batch-size", "2",
    "--lr", "1e-3", "--warmup-ratio", "0", "--eval-every", "1", "--save-every", "1",
    "--tiny-model-args", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
                         "num_key_value_heads: 1, head_dim: 16}",
    "--task-args", "{steps: 1, max_operand: 9, n_test: 16, n_train: 64}",
    "--sft-steps", "0", "--eval-items", "4", "--tensorboard", "false", "--kv-cache-tokens", "4096", "--quiet",
    "--dist-timeout-s", "30",
    "--seeded-sampling", "true",  # (auto = on under torchrun only): one process samples what the ranks sample
]
REWARD_KEYS = ("reward_mean", "train_accuracy", "response_length", "truncated_frac", "unfinished_frac",
               "adv_mean", "adv_std", "adv_zero_frac", "eval_accuracy", "mc_states_requested", "mc_rollouts",
               "value_mean", "dpo_pairs")
ROOT = Path(__file__).resolve().parents[2]


def _launch(run_dir: Path, *extra: str, nproc: int = 2, env: dict | None = None, timeout: float = 240):
    """`python -m engine.train` (nproc 1) or torchrun with `nproc` ranks; the CompletedProcess."""
    return subprocess.run(launch_command("engine.train", nproc) + FLAGS + ["--run-dir", str(run_dir), *extra],
                          cwd=ROOT, env=launch_env(ENGINE_TEST_REWARD="digit", **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_weights(run_dir / "final")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of each algorithm (shared by the tests that compare against it)."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(algo: str, *extra: str) -> Path:
        key = (algo, *extra)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(f"one-{algo}") / "run"
            out = _launch(run_dir, "--algo", algo, *extra, nproc=1)
            assert out.returncode == 0, out.stderr[-3000:]
            runs[key] = run_dir
        return runs[key]
    return get


def _assert_same_run(one: Path, two: Path, world: int = 2, loose: tuple[str, ...] = ()) -> None:
    """Final weights within 1e-4 (fp32) and the same reward metrics, iteration by iteration
    (`loose` ones within 1e-5 relative: PPO's advantages come from a critic that trained)."""
    from safetensors.torch import load_file

    a, b = _weights(one), _weights(two)
    init = {}
    for f in sorted((one / "init").glob("*.safetensors")):
        init.update(load_file(str(f)))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # it trained
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    ra, rb = _rows(one), _rows(two)
    assert [r["iteration"] for r in rb] == [r["iteration"] for r in ra] == [0, 1, 2]
    assert {r["world_size"] for r in ra} == {1} and rb[-1]["world_size"] == world
    for x, y in zip(ra, rb):
        assert set(x) == set(y), set(x) ^ set(y)
        for key in REWARD_KEYS:
            assert (key in x) == (key in y), key
            if key in x:
                rel = 1e-5 if key in loose else 1e-9
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-9), (x["iteration"], key)
    assert rb[1]["reward_mean"] > 0  # the runs had rewards to learn from


# Minibatches of 2 episodes (micro-batches of 1): some hold only one rank's episodes.
SMALL = ("--minibatch-size", "2", "--micro-batch-size", "1")


@pytest.mark.parametrize("algo, extra", [("vineppo", ()), ("grpo", SMALL)])
def test_two_ranks_train_the_same_weights_as_one_process(tmp_path, algo, extra, one_process):
    two = _launch(tmp_path / "two", "--algo", algo, *extra)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    _assert_same_run(one_process(algo, *extra), tmp_path / "two")
    # rank 0 alone wrote the run directory, as one process does
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text() == "iter_000002"
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["iterations_done"] == 2


def test_fsdp_trains_and_resumes_on_another_world_size_to_the_same_weights_as_one_process(tmp_path, one_process):
    # --parallel fsdp: parameters, gradients and optimizer state sharded with FSDP2 (fully_shard).
    # A rank without an episode in a minibatch joins the gradient sync with a zero-weighted
    # backward. Stopped after iteration 1 on 2 ranks and resumed on 3: the checkpoint's training
    # state is one torch.distributed.checkpoint folder, which each of the 3 ranks reads its rows of.
    fsdp = ("--algo", "grpo", "--parallel", "fsdp", *SMALL, "--prompts-per-iteration", "6")
    first = _launch(tmp_path / "two", *fsdp, "--stop-after", "1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    sharded = tmp_path / "two" / "checkpoints" / "iter_000001" / "sharded"
    assert (sharded / ".metadata").is_file() and len(list(sharded.glob("*.distcp"))) == 2  # one file per rank
    resumed = _launch(tmp_path / "two", *fsdp, "--resume", "--stop-after", "null", nproc=3)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    _assert_same_run(one_process("grpo", *SMALL, "--prompts-per-iteration", "6"), tmp_path / "two", world=3)
    # ... but not in one process, which does not shard (its optimizer state would be per fused
    # matrix): a clear error
    out = _launch(tmp_path / "two", *fsdp, "--resume", nproc=1, timeout=120)
    assert out.returncode != 0
    assert "it was written with parallel fsdp on 3 ranks, and this run is not sharded" in out.stderr


CAPO = ("--algo", "capo", "--judge", "model", "--capo-votes", "2", "--capo-judge-max-new-tokens", "8")
JUDGE_KEYS = ("judge_critiques", "judge_generated_tokens", "judge_prompt_tokens", "judge_abstain_frac",
              "judge_flagged_step_frac", "judge_flagged_response_frac", "steps_per_response")


def test_capo_with_a_model_judge_under_fsdp_matches_one_process(tmp_path, one_process):
    # Each rank judges its own responses with its own judge Engine (the frozen starting model);
    # every response's votes are seeded by (seed, iteration, its global index), so the critiques,
    # and with them the token rewards and advantages, do not depend on the world size.
    two = _launch(tmp_path / "two", *CAPO, "--parallel", "fsdp")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = one_process(*CAPO[1:])
    _assert_same_run(one, tmp_path / "two")
    for x, y in zip(_rows(one)[1:], _rows(tmp_path / "two")[1:]):
        for key in JUDGE_KEYS:
            assert y[key] == pytest.approx(x[key], rel=1e-12), (x["iteration"], key)
    assert _rows(one)[1]["judge_generated_tokens"] > 0


OFFLINE = {"restem": ("--algo", "restem", *SMALL), "dpo+": ("--algo", "dpo+", *SMALL)}


@pytest.mark.parametrize("algo", ["restem", "dpo+"])
def test_restem_and_dpo_under_fsdp_match_one_process(tmp_path, algo, one_process):
    # Micro-batches of one unit dealt to the ranks in turn: an odd-sized last minibatch leaves
    # rank 1 without one, which then joins FSDP's gradient sync with a zero backward. RestEM
    # starts each iteration from the base model, copied into the shards.
    two = _launch(tmp_path / "two", *OFFLINE[algo], "--parallel", "fsdp")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = one_process(*OFFLINE[algo][1:])
    _assert_same_run(one, tmp_path / "two")
    key = "restem_kept" if algo == "restem" else "dpo_pairs"
    assert [r[key] for r in _rows(tmp_path / "two")[1:]] == [r[key] for r in _rows(one)[1:]]


def test_restem_epoch_pick_under_fsdp_restores_the_picked_shards(tmp_path):
    # The random model's validation accuracy is 0 after every epoch, so the pick is epoch 0 (ties
    # go to the earliest): after training 2 epochs, each rank copies its kept epoch-0 shards back,
    # and the model is the base model again, exactly.
    from safetensors.torch import load_file

    two = _launch(tmp_path / "two", *OFFLINE["restem"], "--parallel", "fsdp", "--restem-early-stop", "best",
                  "--eval-splits", "[test, validation]", "--validation-items", "4")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    rows = _rows(tmp_path / "two")[1:]
    assert all(r["restem_chosen_epoch"] == 0 and r["restem_epochs_trained"] == 2 and r["optimizer_steps"] > 0
               for r in rows)
    final, init = _weights(tmp_path / "two"), load_file(str(tmp_path / "two" / "init" / "model.safetensors"))
    assert final.keys() == init.keys() and all(torch.equal(final[k], init[k]) for k in final)


def test_ppo_under_fsdp_stops_and_resumes_to_the_weights_of_one_process(tmp_path, one_process):
    # The critic is sharded like the policy; its parameters and AdamW state are saved in their
    # own torch.distributed.checkpoint folder and its whole weights (critic/) by rank 0.
    from safetensors.torch import load_file

    ppo = ("--algo", "ppo", "--parallel", "fsdp", *SMALL)
    first = _launch(tmp_path / "two", *ppo, "--stop-after", "1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    resumed = _launch(tmp_path / "two", *ppo, "--resume", "--stop-after", "null")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    one = one_process("ppo", *SMALL)
    # (the critic's values differ from one process's by float summation order, ~1e-7)
    _assert_same_run(one, tmp_path / "two", loose=("adv_mean", "adv_std"))
    for x, y in zip(_rows(one)[1:], _rows(tmp_path / "two")[1:]):
        assert y["value_loss"] == pytest.approx(x["value_loss"], rel=1e-4, abs=1e-7)
    critic = "checkpoints/iter_000002/critic"
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(one / critic / name)), load_file(str(tmp_path / "two" / critic / name))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_ppo_under_fsdp_in_bfloat16(tmp_path):
    # The GPU default dtype: a bf16 critic body under an fp32 value head (its own FSDP group,
    # since a group holds one dtype). It trains, and its checkpoint holds both.
    out = _launch(tmp_path / "run", "--algo", "ppo", "--parallel", "fsdp", *SMALL, "--dtype", "bfloat16",
                  "--stop-after", "1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = _rows(tmp_path / "run")[1]
    assert row["value_loss"] > 0 and row["critic_grad_norm"] > 0
    critic = tmp_path / "run" / "checkpoints" / "iter_000001" / "critic"
    assert (critic / "value_head.safetensors").is_file() and (critic / "model.safetensors").is_file()


def test_resume_under_torchrun_with_another_world_size(tmp_path, one_process):
    # Every rank holds the same state, so every rank resumes from the one checkpoint, whichever
    # world size wrote it: here one process runs iteration 1, two ranks run iteration 2.
    first = _launch(tmp_path / "two", "--stop-after", "1", nproc=1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["iteration"] for r in _rows(tmp_path / "two")] == [0, 1]
    resumed = _launch(tmp_path / "two", "--resume", "--stop-after", "null")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    _assert_same_run(one_process("vineppo"), tmp_path / "two")


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_runs_metrics(tmp_path, one_process):
    # The graders block in iteration 2 (after iteration 1's checkpoint); the whole job is then
    # killed with SIGKILL, as a lost node would end it. --resume continues from iteration 1's
    # checkpoint and ends where the uninterrupted run ends.
    import signal
    import time

    run_dir = tmp_path / "two"
    cmd = launch_command("engine.train", 2) + FLAGS + ["--run-dir", str(run_dir)]
    env = launch_env(ENGINE_TEST_REWARD="digit", ENGINE_TEST_HANG_ITERATION="2")
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 180
        while not (latest.exists() and latest.read_text() == "iter_000001"):
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of iteration 1 within 180 s"
            time.sleep(0.2)
        time.sleep(1.0)  # (both ranks are in iteration 2 now, blocked in their graders)
        assert job.poll() is None
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # (the ranks, in sessions of their own, exit when they see it gone)
        job.wait(timeout=60)
    assert [r["iteration"] for r in _rows(run_dir)] == [0, 1]
    resumed = _launch(run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    _assert_same_run(one_process("vineppo"), run_dir)


def test_a_failing_rank_ends_every_rank(tmp_path):
    # Rank 1's grader raises (in the iteration-0 evaluation): rank 1 exits, rank 0 fails in its
    # next collective (within --dist-timeout-s 30) or is stopped by torchrun; no hang (timeout).
    out = _launch(tmp_path / "run", env={"ENGINE_TEST_FAIL_RANK": "1"}, timeout=120)
    assert out.returncode != 0
    assert "error (rank 1 of 2): injected grader failure on rank 1" in out.stderr


def test_a_world_size_that_does_not_divide_the_prompts_is_an_error_before_any_work(tmp_path):
    out = _launch(tmp_path / "run", "--prompts-per-iteration", "3", "--minibatch-size", "6", timeout=120)
    assert out.returncode != 0
    assert "prompts_per_iteration 3 is not divisible by the world size 2" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was written


# ---------------------------------------------------------------- in process

def test_single_process_dist_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init_from_env(5)
    assert d == Dist() and d.is_main and not d.distributed and d.world_size == 1
    t = torch.tensor([1.0, 2.0])
    assert d.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert d.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert d.all_reduce_max([3, 1]) == [3.0, 1.0]
    assert d.all_gather_object({"a": 1}) == [{"a": 1}]
    assert d.broadcast_object("x") == "x"
    d.barrier()
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    d.all_reduce_grads([p])
    assert p.grad.tolist() == [3.0, 3.0]
    assert d.device(torch.device("cpu")) == torch.device("cpu")
    assert d.shard(7) == (0, 7)


def test_shards_cover_the_items_in_order():
    for world in (1, 2, 3, 4):
        for count in (0, 1, 5, 8):
            bounds = [Dist(rank=r, world_size=world).shard(count) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_data_parallel_config_errors(tmp_path):
    from engine.rl.config import ConfigError, load_config

    assert load_config("smoke", {"parallel": "fsdp"}).parallel == "fsdp"  # (what it supports: checked by the trainer)
    with pytest.raises(ConfigError, match="parallel must be ddp or fsdp"):
        load_config("smoke", {"parallel": "zero"})
    with pytest.raises(ConfigError, match="dist_timeout_s must be an integer >= 1"):
        load_config("smoke", {"dist_timeout_s": 0})


def test_seeded_mc_values_do_not_depend_on_the_other_states(tmp_path):
    """What lets ranks estimate their own episodes' values: with a seed, a state's rollouts are
    the same alone or batched with other episodes' states."""
    from engine.model import create_tiny_checkpoint, load_model
    from engine.rl.rollout import mc_values, sample_episodes
    from engine.rl.steps import step_token_ends
    from engine.runtime import Engine, SamplingParams
    from engine.tasks import ArithmeticTask

    class DigitTask(ArithmeticTask):
        def reward(self, response, item, finish_reason="stop"):
            return float(any(c.isdigit() for c in response))

    create_tiny_checkpoint(tmp_path / "m", seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model, tok = load_model(tmp_path / "m")
    task = DigitTask(steps=1, max_operand=5, n_test=4, n_train=8)
    items = task.items("train")[:4]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=7)

    def values(subset: list[int]) -> list[list[float]]:
        engine = Engine(model, tok, page_size=4, kv_cache_tokens=4096)
        eps = sample_episodes(engine, task, [items[i] for i in subset],
                              [replace(params, seed=100 + i) for i in subset])
        for ep in eps:
            ep.step_ends = step_token_ends(ep.response_ids, tok, chunk_tokens=3)
        mc_values(engine, task, eps, k=3, params=SamplingParams(temperature=1.0, max_new_tokens=8), seed=11)
        return [ep.state_values for ep in eps]

    together = values([0, 1, 2, 3])
    apart = values([0, 1]) + values([2, 3])
    assert together == apart
    assert any(0 < v < 1 for vs in together for v in vs)  # not all trivially equal


def test_seeded_sampling_is_on_under_torchrun_only_unless_asked(tmp_path):
    """auto: one process samples from torch's generator (as before data parallelism), ranks seed."""
    from engine.rl.config import ConfigError, load_config
    from engine.rl.trainer import Trainer

    def trainer(dist, **kw):
        cfg = load_config("smoke", {"run_dir": str(tmp_path / f"r{len(kw)}{dist.world_size}"), "sft_steps": 0,
                                    "tensorboard": False, "kv_cache_tokens": 4096, **kw})
        return Trainer(cfg, progress=False, dist=dist)

    assert trainer(Dist()).seeded is False
    assert trainer(Dist(), seeded_sampling=True).seeded is True
    with pytest.raises(ConfigError, match="seeded_sampling must be auto, true or false, got 'yes'"):
        load_config("smoke", {"seeded_sampling": "yes"})
