"""`python -m engine.evaluate`: score a checkpoint on a task with the Engine.

    python -m engine.evaluate --model runs/demo/final --task arithmetic --n 16 --temperature 0.35
    python -m engine.evaluate --model DIR --task gsm8k --data test.jsonl --limit 200
    python -m engine.evaluate --run-dir runs/demo --limit 200   # every checkpoint of a run, as a table
    torchrun --nproc-per-node 4 -m engine.evaluate --model DIR --task gsm8k --data test.jsonl   # data parallel

GSM8K and MATH default to the VinePPO paper's protocol: 16 samples at T 0.35, top-p 0.9, up to
1024 new tokens, majority vote over the samples (other tasks: top-p 1.0, 512 tokens).

For every item, n samples; reports pass@1 (mean reward over the n samples, averaged over
items), majority-vote accuracy (the most frequent final answer over all samples is graded; a
sample without one votes for "no answer", which is wrong, as in the reference) and pass@n. Writes a JSON report with per-item results next to
the model (eval-<task>-<split>.json) or to --out.

Sampling is seeded per item: item k (its index in the split, after --limit) samples with the
seed mixed from (--seed, k) (SamplingParams.per_prompt), so its samples depend on neither the
other items nor how they are batched. Under torchrun each rank samples and grades its
contiguous share of the items, rank 0 gathers the per-item results and writes the report: the
same numbers and per-item results as one process (engine_stats and generated_tokens are sums
over the ranks, generation_seconds the slowest rank's). An error on any rank ends every rank.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from engine import Engine, SamplingParams, load_model
from engine.progress import progress_bar
from engine.rl.distributed import Dist, init_from_env, run_ranks
from engine.tasks import ChatTemplateError, Task, load_task, parse_task_args

# VinePPO stops its MATH/GSM8K samples where the model starts a new few-shot problem.
STOP_STRINGS = {"gsm8k": ("\n\n\nProblem:",), "math": ("\n\n\nProblem:",), "arithmetic": ()}
# Sampling defaults per task: the paper's evaluation protocol for its datasets (n and T are 16 and
# 0.35 for every task); 1024 tokens do not truncate MATH solutions the way 512 did.
PROTOCOL = {"gsm8k": dict(top_p=0.9, max_new_tokens=1024), "math": dict(top_p=0.9, max_new_tokens=1024)}
DEFAULT_PROTOCOL = dict(top_p=1.0, max_new_tokens=512)


def majority_vote(task: Task, texts: list[str]) -> tuple[str | None, int | None]:
    """(the most frequent final answer, the index of a sample giving it) over ALL samples, as in
    the reference: a sample without an answer votes for None (cut ones are read too), and a
    None winner is wrong. Ties go to the answer seen first."""
    answers = [task.final_answer(t) for t in texts]
    top = Counter(answers).most_common(1)[0][0] if answers else None
    return top, (answers.index(top) if answers else None)


def majority_correct(task: Task, item, texts: list[str]) -> bool:
    """Whether the majority answer is right (graded on a sample that gives it, whatever its finish)."""
    top, index = majority_vote(task, texts)
    return top is not None and task.is_correct(texts[index], item)


def evaluate(model_dir: str, task_name: str, *, data: str | None = None, split: str = "test", n: int = 16,
             temperature: float = 0.35, top_p: float | None = None, max_new_tokens: int | None = None,
             limit: int | None = None,
             seed: int = 0, out: str | None = None, device: str | None = None, dtype: str | None = None,
             kv_cache_tokens: int | None = None, task_args: dict | None = None, dist: Dist | None = None) -> dict:
    """Run the evaluation and write the report; returns it.

    task_args: keyword options of the task (e.g. the arithmetic knobs a training run used,
    found in its config.yaml), so a checkpoint is scored on the distribution it trained on.
    top_p / max_new_tokens: None takes the task's protocol (`PROTOCOL`).
    dist: data parallel (every rank calls this with the same arguments): each rank samples its
    share of the items; rank 0 writes the report and returns it, the other ranks return {}.
    """
    dist = dist if dist is not None else Dist()
    protocol = PROTOCOL.get(task_name, DEFAULT_PROTOCOL)
    top_p = protocol["top_p"] if top_p is None else top_p
    max_new_tokens = protocol["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if seed is None and dist.distributed:
        raise ValueError(f"evaluation on {dist.world_size} ranks needs a seed: unseeded samples would depend on "
                         f"how the items are split over the ranks")
    task = load_task(task_name, **merge_task_args(task_args, data))
    items = task.items(split)[:limit]
    device = dist.device(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; evaluation needs one to read the answers")
    task.use_tokenizer(tokenizer)
    engine = Engine(model, tokenizer, kv_cache_tokens=kv_cache_tokens)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            stop=STOP_STRINGS.get(task_name, ()), seed=seed)
    # This rank's contiguous share of the items, each with the seed it has in one process.
    lo, hi = dist.shard(len(items))
    t0 = time.perf_counter()
    # One seed per item: a shared seeded params would give every item's i-th sample the same random numbers.
    outputs = engine.generate([task.prompt(item) for item in items[lo:hi]], params.per_prompt(len(items))[lo:hi],
                              progress=dist.is_main) if hi > lo else []
    gen_seconds = time.perf_counter() - t0
    local = [_grade(task, item, samples) for item, samples in
             progress_bar(list(zip(items[lo:hi], outputs)), desc="grade", disable=not dist.is_main)]
    tokens = sum(len(c.token_ids) for g in outputs for c in g)
    stats = engine.stats.as_dict()
    if dist.distributed:  # rank 0 gathers every item's record, in item order (the ranks' shards in rank order)
        parts = dist.all_gather_object((local, gen_seconds, tokens, stats))
        if not dist.is_main:
            return {}
        local = [r for part in parts for r in part[0]]
        gen_seconds = max(part[1] for part in parts)
        tokens = sum(part[2] for part in parts)
        stats = {k: sum(part[3][k] for part in parts) for k in stats}
    records = local
    pass1, maj, passn = 0.0, 0, 0
    for r in records:  # (in item order, as one process sums)
        rewards = [x["reward"] for x in r["samples"]]
        pass1 += sum(rewards) / n
        maj += r["majority_correct"]
        passn += any(x == 1.0 for x in rewards)
    k = len(items)
    metrics = {"pass@1": pass1 / k, f"maj@{n}": maj / k, f"pass@{n}": passn / k}
    report = {
        "model": str(model_dir), "task": task_name, "task_args": task_args or {},
        "grading": getattr(task, "grading", None), "split": split, "data": data,
        "items": k, "n": n,
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
        "metrics": metrics, "generation_seconds": round(gen_seconds, 2),
        "generated_tokens": tokens,
        "engine_stats": stats, "results": records,
    }
    path = Path(out) if out else Path(model_dir) / f"eval-{task_name}-{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    report["path"] = str(path)
    return report


def _grade(task: Task, item, samples) -> dict:
    """One item's record of the report: its samples, their rewards and answers, the majority vote."""
    texts = [c.text for c in samples]
    rewards = [task.reward(c.text, item, c.finish_reason) for c in samples]
    answers = [task.final_answer(t) for t in texts]
    majority, _ = majority_vote(task, texts)
    return {
        "id": item.id, "question": item.question, "gold": item.answer, "majority_answer": majority,
        "majority_correct": majority_correct(task, item, texts),
        "samples": [{"text": c.text, "finish_reason": c.finish_reason, "reward": r, "answer": a}
                    for c, r, a in zip(samples, rewards, answers)],
    }


def merge_task_args(task_args: dict | None, data: str | None) -> dict:
    """load_task options from --task-args and --data (which may not both name the data)."""
    options = dict(task_args or {})
    if data is not None:
        if "data" in options and options["data"] != data:
            raise ValueError(f"--data {data!r} and --task-args data {options['data']!r} disagree; give one")
        options["data"] = data
    return options


def checkpoints_of(run_dir: str | Path) -> list[Path]:
    """A run's model folders in training order: checkpoints/iter_* then final/ (those that exist)."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise FileNotFoundError(f"{root} is not a training run directory (no config.yaml)")
    found = sorted(p for p in (root / "checkpoints").glob("iter_*") if p.is_dir() and not p.name.startswith("."))
    if (root / "final").is_dir():
        found.append(root / "final")
    if not found:
        raise FileNotFoundError(f"{root} has no checkpoints (checkpoints/iter_* or final/) to evaluate")
    return found


def evaluate_run(run_dir: str, *, task_name: str | None = None, task_args: dict | None = None,
                 dist: Dist | None = None, **kwargs) -> dict:
    """Score every checkpoint of a run (its task and task_args from config.yaml unless given);
    writes <run_dir>/eval-<task>-<split>-checkpoints.json and returns it.

    dist: data parallel, as `evaluate` (every rank scores every checkpoint's share of the items);
    rank 0 writes the reports and the table and returns it, the other ranks return {}."""
    dist = dist if dist is not None else Dist()
    import yaml

    paths = checkpoints_of(run_dir)  # raises unless run_dir has config.yaml and a checkpoint
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    if task_name is None and not config.get("task"):
        raise FileNotFoundError(f"{run_dir}/config.yaml names no task: give --task")
    same_task = task_name is None or task_name == config.get("task")
    task_name = task_name or config["task"]
    if task_args is None:  # the run's own task options, when it is the run's task
        task_args = (config.get("task_args") or {}) if same_task else {}
    split = kwargs.get("split", "test")
    rows = []
    for path in paths:
        report = evaluate(str(path), task_name, task_args=task_args, dist=dist,
                          out=str(Path(run_dir) / "eval" / f"{path.name}-{task_name}-{split}.json"), **kwargs)
        if dist.is_main:
            rows.append({"checkpoint": path.name, **report["metrics"], "items": report["items"]})
    if not dist.is_main:
        return {}
    table = {"run_dir": str(run_dir), "task": task_name, "task_args": task_args, "split": split, "rows": rows}
    out = Path(run_dir) / f"eval-{task_name}-{split}-checkpoints.json"
    out.write_text(json.dumps(table, indent=2))
    table["path"] = str(out)
    return table


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder (Hugging Face layout)")
    which.add_argument("--run-dir", help="a training run: score every checkpoint (iter_* and final) as a table")
    ap.add_argument("--task", default=None, help="gsm8k | math | arithmetic (with --run-dir: the run's task)")
    ap.add_argument("--data", default=None, help="local json/jsonl/parquet file, 'sample', or a hub dataset name")
    ap.add_argument("--task-args", default=None, type=parse_task_args,
                    help="task options as a YAML mapping, e.g. '{steps: [2, 3], max_operand: 10}' (a training "
                         "run's are in its config.yaml)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", "--samples", dest="n", type=int, default=16,
                    help="samples per item (under torchrun write --samples: its parser takes --n for its own options)")
    ap.add_argument("--temperature", type=float, default=0.35)
    ap.add_argument("--top-p", type=float, default=None, help="default: 0.9 for gsm8k/math (the paper), else 1.0")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 1024 for gsm8k/math, else 512")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--dist-timeout-s", type=int, default=300, help="under torchrun: collective timeout (seconds)")
    args = ap.parse_args(argv)
    if args.run_dir is not None and args.out is not None:
        ap.error("--out applies to --model; --run-dir writes <run-dir>/eval-<task>-<split>-checkpoints.json")
    if args.run_dir is None and args.task is None:
        ap.error("--task is required with --model")
    dist = init_from_env(args.dist_timeout_s, args.device or "auto")
    # under torchrun, an error on any rank ends every rank (engine/rl/distributed.py)
    return run_ranks(dist, lambda: _main(ap, args, dist))


def _main(ap: argparse.ArgumentParser, args: argparse.Namespace, dist: Dist) -> dict:
    common = dict(data=args.data, split=args.split, n=args.n, temperature=args.temperature, top_p=args.top_p,
                  max_new_tokens=args.max_new_tokens, limit=args.limit, seed=args.seed, device=args.device,
                  dtype=args.dtype, kv_cache_tokens=args.kv_cache_tokens, dist=dist)
    if args.run_dir is not None:
        try:
            table = evaluate_run(args.run_dir, task_name=args.task, task_args=args.task_args, **common)
        except (FileNotFoundError, ChatTemplateError) as e:
            ap.error(str(e))
        if not dist.is_main:
            return {}
        keys = [k for k in table["rows"][0] if k not in ("checkpoint", "items")]
        print(f"{table['task']} ({table['split']}, {table['rows'][0]['items']} items): {args.run_dir}")
        print(f"{'checkpoint':<14}" + "".join(f"{k:>10}" for k in keys))
        for r in table["rows"]:
            print(f"{r['checkpoint']:<14}" + "".join(f"{r[k]:>10.4f}" for k in keys))
        print(f"-> {table['path']}")
        return table
    try:
        report = evaluate(args.model, args.task, out=args.out, task_args=args.task_args, **common)
    except ChatTemplateError as e:
        ap.error(str(e))
    if not dist.is_main:
        return {}
    m = report["metrics"]
    print(f"{report['task']} ({report['split']}, {report['items']} items, n={report['n']}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + f"  -> {report['path']}")
    return report


if __name__ == "__main__":
    main()
