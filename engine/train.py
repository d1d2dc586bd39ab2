"""`python -m engine.train`: the project's main job.

Until the VinePPO trainer lands (issue "VinePPO end to end"), this runs the SFT warm-up the
default preset will start from, on what exists: it creates the built-in tiny model and
character tokenizer as a Hugging Face checkpoint, fine-tunes it with packed (padding-free)
batches on reference solutions of the built-in arithmetic task, saves it, reloads it with
`load_model`, and reports held-out accuracy (greedy, graded by the task) before and after,
sampling through the Engine.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import Engine, SamplingParams
from engine.model import create_tiny_checkpoint, load_model
from engine.tasks import Task, load_task


@torch.no_grad()
def accuracy(model, tok, task: Task, items, max_new_tokens: int = 64) -> float:
    """Greedy accuracy on items, sampled through the Engine and graded by the task."""
    engine = Engine(model, tok, page_size=16, kv_cache_tokens=1 << 15)
    outs = engine.generate([task.prompt(it) for it in items], SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    return sum(task.reward(o[0].text, it, o[0].finish_reason) for it, o in zip(items, outs)) / len(items)


def sft_batch(tok, task: Task, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed input ids [1, T], cu_seqlens, and targets with the loss on the solution only."""
    seqs, targets = [], []
    for it in items:
        p, s = tok.encode(task.prompt(it)), tok.encode(it.solution) + [tok.eos_token_id]
        seqs.append(torch.tensor(p + s[:-1]))
        targets.append(torch.tensor([-100] * (len(p) - 1) + s))
    cu = torch.tensor([0] + [len(x) for x in seqs]).cumsum(0)
    return torch.cat(seqs)[None], cu, torch.cat(targets)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-items", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    run = Path(args.run_dir)
    init_dir, final_dir = run / "init", run / "final"
    task = load_task("arithmetic", seed=args.seed)
    train_items, held_out = task.items("train"), task.items("test")[: args.eval_items]
    create_tiny_checkpoint(init_dir, seed=args.seed)
    model, tok = load_model(init_dir)
    acc_before = accuracy(model, tok, task, held_out)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / args.steps))
    rng = random.Random(args.seed)
    model.train()
    t0 = time.time()
    log = (run / "metrics.jsonl").open("w")
    bar = tqdm(range(args.steps), desc="SFT warm-up (demo)")
    for step in bar:
        ids, cu, targets = sft_batch(tok, task, rng.sample(train_items, args.batch_size))
        logits = model(ids, cu_seqlens=cu)[0]
        loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")
    log.close()
    train_seconds = time.time() - t0
    model.eval()
    model.save_pretrained(final_dir, tokenizer=tok)
    reloaded, tok = load_model(final_dir)
    acc_after = accuracy(reloaded, tok, task, held_out)
    summary = {"task": "arithmetic", "held_out_items": len(held_out), "held_out_accuracy_before": acc_before,
               "held_out_accuracy_after": acc_after, "train_seconds": round(train_seconds, 1),
               "checkpoint": str(final_dir)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
