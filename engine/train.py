"""`python -m engine.train`: RL for reasoning (VinePPO by default) on one set of weights.

    python -m engine.train                                  # default preset: tiny model, arithmetic, CPU
    python -m engine.train --preset smoke                   # the whole loop in under 2 minutes on CPU
    python -m engine.train --preset gsm8k --model path/to/sft-model
    python -m engine.train --algo grpo --iterations 20 --run-dir runs/grpo
    python -m engine.train --run-dir runs/default --resume  # continue where it stopped

Every key of engine.rl.config.TrainConfig is a flag (`--max-new-tokens 512`, `--task-args
'{steps: 3}'`); values use YAML syntax. Writes <run-dir>/config.yaml, metrics.jsonl (one row per
iteration), curves.png, checkpoints/ (HF format + optimizer/scheduler/RNG state), final/ and
summary.json.

Data parallel: `torchrun --nproc-per-node N -m engine.train ...` (same flags). Each rank
samples and trains on its share of the prompts and the ranks sum their gradients (gloo on CPU,
NCCL on CUDA; engine/rl/distributed.py); rank 0 writes the run directory. An error on any rank
ends every rank with a non-zero exit: the failing rank prints it and exits, the others fail in
their next collective (at the latest after --dist-timeout-s seconds) or are stopped by torchrun.

Test-only hooks (environment variables, read here and nowhere else):
    ENGINE_TEST_REWARD=digit    reward 1 for any response with a digit (a random tiny model then
                                earns reward about half the time, so short runs do update)
    ENGINE_TEST_FAIL_RANK=r     the grader of rank r raises (checks that a failing rank ends the job)
    ENGINE_TEST_HANG_ITERATION=n  the grader blocks from training iteration n on (a test kills the
                                job there, as a lost node would, and resumes it)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from engine.rl.config import FIELD_TYPES, ConfigError, load_config, parse_value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a name in engine/presets (default, smoke, gsm8k, math) or a .yaml path")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, f in FIELD_TYPES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar="VALUE",
                        help=f"(default {f.default_factory() if callable(f.default_factory) else f.default!r})")
    return ap


def config_from_args(args: argparse.Namespace):
    overrides = {}
    for name in FIELD_TYPES:
        text = getattr(args, name)
        if text is not None:
            overrides[name] = parse_value(name, text)
    if args.resume:
        run_dir = overrides.get("run_dir") or load_config(args.preset or "default").run_dir
        saved = Path(run_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} does not exist (was the run started with --run-dir {run_dir}?)")
        return load_config(str(saved), overrides)
    return load_config(args.preset or "default", overrides)


def _test_hooks(trainer, rank: int) -> None:
    """The ENGINE_TEST_* hooks of the module docstring (tests only)."""
    if os.environ.get("ENGINE_TEST_REWARD") == "digit":
        trainer.task.reward = lambda response, item, finish_reason="stop": float(any(c.isdigit() for c in response))
    hang = os.environ.get("ENGINE_TEST_HANG_ITERATION")
    if hang is not None:
        graded, launcher = trainer.task.reward, os.getppid()

        def blocking(response, item, finish_reason="stop"):
            while trainer.iteration >= int(hang):
                if os.getppid() != launcher:  # torchrun was killed: go as a lost node's processes go
                    os._exit(137)
                time.sleep(0.2)
            return graded(response, item, finish_reason)
        trainer.task.reward = blocking
    fail = os.environ.get("ENGINE_TEST_FAIL_RANK")
    if fail is not None and int(fail) == rank:
        def broken(response, item, finish_reason="stop"):
            raise RuntimeError(f"injected grader failure on rank {rank} (ENGINE_TEST_FAIL_RANK)")
        trainer.task.reward = broken


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from engine.rl.distributed import init_from_env, run_ranks

    dist = init_from_env(cfg.dist_timeout_s, cfg.device, cfg.checkpoint_timeout_s)
    # under torchrun, an error on any rank ends every rank (engine/rl/distributed.py)
    return run_ranks(dist, lambda: _main(args, cfg, dist))


def _main(args: argparse.Namespace, cfg, dist) -> dict:
    from engine.rl.trainer import Trainer, TrainingDiverged  # heavy imports after the argument checks

    from engine.tasks import TaskDataError

    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet, dist=dist)
    except (ConfigError, TaskDataError, FileNotFoundError) as e:  # bad input found while setting up: no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _test_hooks(trainer, dist.rank)
    try:
        last = trainer.run()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if not dist.is_main:
        return {}
    rows = [json.loads(x) for x in trainer.metrics_path.read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval_accuracy" in r]
    summary = {
        "algo": cfg.algo, "task": cfg.task, "run_dir": str(trainer.run_dir), "iterations_done": trainer.iteration,
        "eval_items": len(next(iter(trainer.eval_sets.values()))),
        "eval_accuracy_start": evals[0]["eval_accuracy"] if evals else None,
        "eval_accuracy_end": evals[-1]["eval_accuracy"] if evals else None,
        "eval_stderr_end": evals[-1].get("eval_stderr") if evals else None,
        "reward_last": last.get("reward_mean"),
        "minutes_this_process": round((time.perf_counter() - t0) / 60, 2),
    }
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
