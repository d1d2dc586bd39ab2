"""`python -m engine.evaluate`: score a checkpoint on a task with the Engine.

    python -m engine.evaluate --model runs/demo/final --task arithmetic --n 16 --temperature 0.35
    python -m engine.evaluate --model DIR --task gsm8k --data test.jsonl --limit 200

For every item, n samples; reports pass@1 (mean reward over the n samples, averaged over
items), majority-vote accuracy (the most frequent final answer among finished samples is
graded) and pass@n (any sample correct). Writes a JSON report with per-item results next to
the model (eval-<task>-<split>.json) or to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from engine import Engine, SamplingParams, load_model
from engine.tasks import Task, load_task, parse_task_args
from engine.tasks.grading import extract_gsm8k_answer, extract_math_answer, normalize_answer

# VinePPO stops its MATH/GSM8K samples where the model starts a new few-shot problem.
STOP_STRINGS = {"gsm8k": ("\n\n\nProblem:",), "math": ("\n\n\nProblem:",), "arithmetic": ()}


def final_answer(task: Task, response: str) -> str | None:
    """The response's final answer in a canonical form, for majority voting."""
    if task.name == "math":
        answer = extract_math_answer(response)
        return None if answer is None else normalize_answer(answer)
    number = extract_gsm8k_answer(response)
    return None if number is None else str(number)


def evaluate(model_dir: str, task_name: str, *, data: str | None = None, split: str = "test", n: int = 16,
             temperature: float = 0.35, top_p: float = 1.0, max_new_tokens: int = 512, limit: int | None = None,
             seed: int = 0, out: str | None = None, device: str | None = None, dtype: str | None = None,
             kv_cache_tokens: int | None = None, task_args: dict | None = None) -> dict:
    """Run the evaluation and write the report; returns it.

    task_args: keyword options of the task (e.g. the arithmetic knobs a training run used,
    found in its config.yaml), so a checkpoint is scored on the distribution it trained on.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    task = load_task(task_name, **merge_task_args(task_args, data))
    items = task.items(split)[:limit]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; evaluation needs one to read the answers")
    engine = Engine(model, tokenizer, kv_cache_tokens=kv_cache_tokens)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            stop=STOP_STRINGS.get(task_name, ()), seed=seed)
    t0 = time.perf_counter()
    # One seed per item: a shared seeded params would give every item's i-th sample the same random numbers.
    outputs = engine.generate([task.prompt(item) for item in items], params.per_prompt(len(items)), progress=True)
    gen_seconds = time.perf_counter() - t0
    records, pass1, maj, passn = [], 0.0, 0, 0
    for item, samples in tqdm(list(zip(items, outputs)), desc="grade"):
        rewards = [task.reward(c.text, item, c.finish_reason) for c in samples]
        answers = [final_answer(task, c.text) if c.finish_reason == "stop" else None for c in samples]
        votes = Counter(a for a in answers if a is not None)
        majority = votes.most_common(1)[0][0] if votes else None
        maj_correct = majority is not None and rewards[answers.index(majority)] == 1.0
        pass1 += sum(rewards) / n
        maj += maj_correct
        passn += any(r == 1.0 for r in rewards)
        records.append({
            "id": item.id, "question": item.question, "gold": item.answer, "majority_answer": majority,
            "majority_correct": maj_correct,
            "samples": [{"text": c.text, "finish_reason": c.finish_reason, "reward": r, "answer": a}
                        for c, r, a in zip(samples, rewards, answers)],
        })
    k = len(items)
    metrics = {"pass@1": pass1 / k, f"maj@{n}": maj / k, f"pass@{n}": passn / k}
    report = {
        "model": str(model_dir), "task": task_name, "task_args": task_args or {}, "split": split, "data": data,
        "items": k, "n": n,
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
        "metrics": metrics, "generation_seconds": round(gen_seconds, 2),
        "generated_tokens": sum(len(c.token_ids) for g in outputs for c in g),
        "engine_stats": engine.stats.as_dict(), "results": records,
    }
    path = Path(out) if out else Path(model_dir) / f"eval-{task_name}-{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    report["path"] = str(path)
    return report


def merge_task_args(task_args: dict | None, data: str | None) -> dict:
    """load_task options from --task-args and --data (which may not both name the data)."""
    options = dict(task_args or {})
    if data is not None:
        if "data" in options and options["data"] != data:
            raise ValueError(f"--data {data!r} and --task-args data {options['data']!r} disagree; give one")
        options["data"] = data
    return options


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (Hugging Face layout)")
    ap.add_argument("--task", required=True, help="gsm8k | math | arithmetic")
    ap.add_argument("--data", default=None, help="local json/jsonl/parquet file, 'sample', or a hub dataset name")
    ap.add_argument("--task-args", default=None, type=parse_task_args,
                    help="task options as a YAML mapping, e.g. '{steps: [2, 3], max_operand: 10}' (a training "
                         "run's are in its config.yaml)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.35)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    report = evaluate(args.model, args.task, data=args.data, split=args.split, n=args.n,
                      temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, seed=args.seed, out=args.out, device=args.device, dtype=args.dtype,
                      kv_cache_tokens=args.kv_cache_tokens, task_args=args.task_args)
    m = report["metrics"]
    print(f"{report['task']} ({report['split']}, {report['items']} items, n={report['n']}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + f"  -> {report['path']}")
    return report


if __name__ == "__main__":
    main()
