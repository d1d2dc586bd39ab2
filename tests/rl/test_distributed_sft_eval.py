"""Data-parallel SFT and evaluation (torchrun, gloo on CPU, 2 ranks): `python -m engine.sft`
(--parallel ddp and fsdp), the trainer's SFT stage and `python -m engine.evaluate` (--model and
--run-dir) give what one process gives; and in process, with two ranks as threads, sft's
loss normalisation: the ranks' summed gradient is the whole batch's.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from engine.rl.distributed import Dist, run_ranks
from torchrun_helpers import launch_command, launch_env, read_weights

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16}"
# 40 train problems with one-token answers ("#### 7"): a tiny model learns some in 80 steps.
TASK = "{steps: 1, max_operand: 5, n_train: 40, n_test: 16, answer_only_frac: 1.0}"
# An odd batch (ranks get 4 and 3 sequences, of different token counts) and a clip below the
# gradient norm (so clipping acts on every step: the global norm must be right).
SFT_FLAGS = ["--task", "arithmetic", "--task-args", TASK, "--tiny-model-args", TINY, "--steps", "6",
             "--batch-size", "7", "--lr", "3e-3", "--grad-clip", "0.5", "--seed", "3"]


def _launch(module: str, args: list[str], nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m module` (nproc 1) or torchrun with `nproc` ranks; the CompletedProcess."""
    out = subprocess.run(launch_command(module, nproc) + args, cwd=ROOT, env=launch_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _assert_same_weights(a: Path, b: Path, init: Path) -> None:
    wa, wb, w0 = read_weights(a), read_weights(b), read_weights(init)
    assert wa.keys() == wb.keys() == w0.keys()
    assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 1e-3  # it trained
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-one") / "out"
    _launch("engine.sft", SFT_FLAGS + ["--out", str(out)], nproc=1)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_sft_trains_the_one_process_weights(tmp_path, one_process_sft, parallel):
    two = tmp_path / "two"
    run = _launch("engine.sft", SFT_FLAGS + ["--out", str(two), "--parallel", parallel])
    summary = json.loads(run.stdout[run.stdout.index("{"):])  # rank 0 alone prints it
    assert summary["world_size"] == 2 and summary["checkpoint"] == str(two)
    _assert_same_weights(one_process_sft, two, one_process_sft / "init")
    one_log = json.loads((one_process_sft / "sft_log.json").read_text())
    two_log = json.loads((two / "sft_log.json").read_text())
    assert len(two_log["loss"]) == 6
    assert two_log["loss"] == pytest.approx(one_log["loss"], rel=1e-5)
    # The global gradient norm (FSDP: over the DTensor shards), above the clip on every step.
    assert two_log["grad_norm"] == pytest.approx(one_log["grad_norm"], rel=1e-4)
    assert min(one_log["grad_norm"]) > 0.5


TRAIN_FLAGS = [
    "--preset", "smoke", "--iterations", "1", "--prompts-per-iteration", "2", "--samples-per-prompt", "2",
    "--max-new-tokens", "6", "--k", "2", "--epochs", "1", "--minibatch-size", "2", "--micro-batch-size", "1",
    "--eval-every", "1", "--eval-items", "2", "--eval-samples", "1", "--save-every", "1",
    "--tiny-model-args", TINY, "--task-args", TASK, "--tensorboard", "false", "--kv-cache-tokens", "2048",
    "--quiet", "--dist-timeout-s", "60",
    "--sft-steps", "5", "--sft-batch-size", "7", "--sft-lr", "3e-3",
]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train-one") / "run"
    _launch("engine.train", TRAIN_FLAGS + ["--run-dir", str(run)], nproc=1)
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_trainer_sft_stage_on_two_ranks_writes_the_one_process_checkpoint(tmp_path, one_process_run, parallel):
    # Every rank runs the SFT stage (its share of each batch); rank 0 writes sft/ and sft_done.json.
    _launch("engine.train", TRAIN_FLAGS + ["--run-dir", str(tmp_path / "two"), "--parallel", parallel])
    one, two = one_process_run, tmp_path / "two"
    _assert_same_weights(one / "sft", two / "sft", one / "init")
    done_one = json.loads((one / "sft" / "sft_done.json").read_text())
    done_two = json.loads((two / "sft" / "sft_done.json").read_text())
    assert (done_one["world_size"], done_two["world_size"], done_two["steps"]) == (1, 2, 5)  # (not rank 0 alone)
    assert (done_two["first_loss"], done_two["last_loss"]) == pytest.approx(
        (done_one["first_loss"], done_one["last_loss"]), rel=1e-5)
    # the RL run then started from it: same iteration-0 evaluation
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2 and rows[0]["eval_accuracy"] == rows_one[0]["eval_accuracy"]


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny model with some right answers (pass@1 > 0), trained in this process."""
    from engine.sft import main

    out = tmp_path_factory.mktemp("eval-model") / "m"
    main(["--task", "arithmetic", "--task-args", TASK, "--tiny-model-args", TINY, "--steps", "80",
          "--batch-size", "16", "--lr", "1e-2", "--out", str(out)])
    return out


def _comparable(report: dict) -> dict:
    """A report without what depends on the world size (timing, engine counters) or the path."""
    return {k: v for k, v in report.items() if k not in ("generation_seconds", "engine_stats", "model")}


def test_two_rank_evaluation_reports_what_one_process_reports(tmp_path, trained_model):
    # 7 items (ranks: 4 and 3), 3 samples each at temperature 1; --samples, as torchrun needs.
    args = ["--task", "arithmetic", "--task-args", TASK, "--samples", "3", "--limit", "7", "--max-new-tokens", "8",
            "--temperature", "1.0", "--seed", "1"]
    _launch("engine.evaluate", ["--model", str(trained_model), *args, "--out", str(tmp_path / "one.json")], nproc=1)
    run = _launch("engine.evaluate", ["--model", str(trained_model), *args, "--out", str(tmp_path / "two.json")])
    assert run.stdout.count("pass@1") == 1  # rank 0 alone prints
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert _comparable(two) == _comparable(one)
    assert [r["id"] for r in two["results"]] == [r["id"] for r in one["results"]] and len(two["results"]) == 7
    # some right and some wrong answers (a mix up of items, samples or seeds would show)
    assert 0 < one["metrics"]["pass@1"] < 1 and 0 < one["metrics"]["maj@3"] < 1
    assert two["generated_tokens"] == one["generated_tokens"]
    assert sum(two["engine_stats"].values()) > 0


def test_two_rank_run_dir_evaluation_scores_every_checkpoint_as_one_process(tmp_path, trained_model):
    runs = {}
    for name in ("one", "two"):
        run = tmp_path / name
        shutil.copytree(trained_model / "init", run / "checkpoints" / "iter_000001")
        shutil.copytree(trained_model, run / "final", ignore=shutil.ignore_patterns("init", "eval-*"))
        (run / "config.yaml").write_text(f"task: arithmetic\ntask_args: {TASK}\n")
        runs[name] = run
    args = ["--samples", "2", "--limit", "5", "--max-new-tokens", "8", "--temperature", "1.0"]
    _launch("engine.evaluate", ["--run-dir", str(runs["one"]), *args], nproc=1)
    _launch("engine.evaluate", ["--run-dir", str(runs["two"]), *args])
    table = {n: json.loads((r / "eval-arithmetic-test-checkpoints.json").read_text()) for n, r in runs.items()}
    assert [r["checkpoint"] for r in table["two"]["rows"]] == ["iter_000001", "final"]
    assert table["two"]["rows"] == table["one"]["rows"]
    assert table["two"]["rows"][1]["pass@1"] > 0
    for ckpt in ("iter_000001", "final"):
        a, b = (json.loads((r / "eval" / f"{ckpt}-arithmetic-test.json").read_text()) for r in runs.values())
        assert _comparable(b) == _comparable(a)


# ---------------------------------------------------------------- in process

class ThreadDist(Dist):
    """Ranks as threads of this process: the collectives sft uses (sums, barrier) through shared
    slots and a threading.Barrier (a rank that fails breaks it instead of hanging the others)."""

    def __init__(self, rank: int, world_size: int, shared: dict):
        super().__init__(rank=rank, world_size=world_size, backend="threads")
        self.shared = shared

    def _sum(self, value):
        barrier, slots = self.shared["barrier"], self.shared["slots"]
        slots[self.rank] = value
        barrier.wait()
        total = slots[0]
        for v in slots[1:]:
            total = total + v
        barrier.wait()  # every rank has read the slots before they are reused
        return total

    def all_reduce_sum(self, x):
        if isinstance(x, torch.Tensor):
            x.copy_(self._sum(x.clone()))
            return x
        return self._sum(torch.tensor([float(v) for v in x], dtype=torch.float64)).tolist()

    def barrier(self) -> None:
        self.shared["barrier"].wait()


def _sft_model(tmp_path):
    from engine.model import create_tiny_checkpoint, load_model

    create_tiny_checkpoint(tmp_path / "m", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return load_model(tmp_path / "m")


def test_ranks_summed_gradients_are_the_whole_batch_gradient(tmp_path):
    """sft on 2 thread-ranks (shares of 3 and 2 sequences, of different token counts) steps
    like one process on the whole batch: each rank's loss is over the GLOBAL token count (a
    per-rank mean would weight the two shares' tokens differently), the gradients are summed."""
    from engine.sft import sft
    from engine.tasks import load_task

    model, tok = _sft_model(tmp_path)
    task = load_task("arithmetic", steps=[1, 2], max_operand=20, n_train=40, n_test=4)
    kwargs = dict(steps=3, batch_size=5, lr=1e-2, grad_clip=100.0, progress=False, seed=1)
    models = [copy.deepcopy(model) for _ in range(3)]
    norms: list[list[float]] = [[], [], []]
    one = sft(models[0], tok, task, grad_norms=norms[0], **kwargs)
    shared = {"barrier": threading.Barrier(2, timeout=60), "slots": [None, None]}
    results: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            results[r] = sft(models[1 + r], tok, task, dist=ThreadDist(r, 2, shared), grad_norms=norms[1 + r], **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[r] = e
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(isinstance(v, BaseException) for v in results.values()), results
    assert results[0] == results[1] == pytest.approx(one, rel=1e-6)
    assert norms[1] == norms[2] == pytest.approx(norms[0], rel=1e-5)
    for a, b, c in zip(models[0].parameters(), models[1].parameters(), models[2].parameters()):
        assert torch.equal(b, c)  # the ranks stay identical
        assert (a - b).abs().max().item() <= 1e-4  # (float summation order, through Adam)
    assert max((a - m).abs().max().item() for a, m in zip(models[0].parameters(), model.parameters())) > 1e-3


def test_one_process_sft_is_the_plain_mean_loss_loop(tmp_path):
    """One process is bit for bit the loop before data parallelism (cross_entropy's mean loss)."""
    import random

    import torch.nn.functional as F

    from engine.rl.optim import AdamW, warmup_linear_decay
    from engine.sft import sft, sft_batch
    from engine.tasks import load_task

    model, tok = _sft_model(tmp_path)
    task = load_task("arithmetic", steps=1, max_operand=9, n_train=30, n_test=4)
    ref = copy.deepcopy(model)
    losses = sft(model, tok, task, steps=4, batch_size=6, lr=3e-3, grad_clip=0.5, progress=False, seed=2)

    items = task.items("train")
    opt = AdamW(ref.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(4, 0.05))
    rng = random.Random("sft-2")
    ref.train()
    expected = []
    for _ in range(4):
        ids, cu, targets = sft_batch(tok, task, rng.sample(items, 6))
        loss = F.cross_entropy(ref(ids, cu_seqlens=cu)[0].float(), targets, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        sched.step()
        expected.append(loss.item())
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_a_batch_smaller_than_the_world_is_an_error(tmp_path):
    from engine.sft import sft
    from engine.tasks import load_task

    model, tok = _sft_model(tmp_path)
    with pytest.raises(ValueError, match="a batch of 3 sequences .* cannot give each of the 4 ranks one"):
        sft(model, tok, load_task("arithmetic", steps=1, max_operand=9, n_train=30, n_test=4), steps=1,
            batch_size=3, progress=False, dist=Dist(rank=0, world_size=4))


def test_run_ranks_in_one_process_is_the_call():
    assert run_ranks(Dist(), lambda: 7) == 7
    with pytest.raises(KeyError):  # one process: the exception propagates (no os._exit)
        run_ranks(Dist(), lambda: {}["x"])
