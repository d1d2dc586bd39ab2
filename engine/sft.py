"""Supervised warm-up on a task's reference solutions (`python -m engine.sft`, or the trainer's first stage).

VinePPO starts from an SFT model; the default preset gives the built-in tiny model its starting
policy this way. Batches are packed (no padding, cu_seqlens), the loss covers the solution
tokens and the EOS only, and the optimizer is the trainer's AdamW with warmup and linear decay.

    python -m engine.sft --task arithmetic --steps 300 --out runs/sft      # the built-in tiny model
    python -m engine.sft --model path/to/hf --task gsm8k --steps 200 --lr 1e-5 --out runs/sft-gsm8k
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.evaluate import merge_task_args
from engine.model import Transformer, create_tiny_checkpoint, load_model
from engine.rl.optim import AdamW, warmup_linear_decay
from engine.tasks import Item, Task, load_task, parse_task_args


def sft_batch(tokenizer, task: Task, items: list[Item], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed input ids [1, T], cu_seqlens [S + 1] and targets [T] (-100 outside the solution)."""
    seqs, targets = [], []
    for it in items:
        if it.solution is None:
            raise ValueError(f"item {it.id} has no reference solution to fine-tune on")
        p = tokenizer.encode(task.prompt(it))
        s = tokenizer.encode(it.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(torch.tensor(p + s[:-1]))
        targets.append(torch.tensor([-100] * (len(p) - 1) + s))
    cu = torch.tensor([0] + [len(x) for x in seqs]).cumsum(0)
    return torch.cat(seqs)[None].to(device), cu.to(device), torch.cat(targets).to(device)


def sft(model: Transformer, tokenizer, task: Task, *, steps: int, batch_size: int = 64, lr: float = 1e-5,
        seed: int = 0, warmup_ratio: float = 0.05, grad_clip: float = 1.0, progress: bool = True,
        items: list[Item] | None = None) -> list[float]:
    """Fine-tune `model` in place on random batches of train solutions (`items`, default the
    task's train split: a trainer passes its own, without the items it holds out); returns the losses."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    items = [it for it in (task.items("train") if items is None else items) if it.solution is not None]
    if not items:
        raise ValueError(f"task {task.name}: no train item has a reference solution")
    device = model.lm_head_weight.device
    opt = AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(steps, warmup_ratio))
    rng = random.Random(f"sft-{seed}")
    was_training = model.training
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="SFT warm-up", disable=not progress)
    for _ in bar:
        ids, cu, targets = sft_batch(tokenizer, task, rng.sample(items, min(batch_size, len(items))), device)
        logits = model(ids, cu_seqlens=cu)[0]
        loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss.item()} at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.train(was_training)
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint folder (default: a fresh built-in tiny model)")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--data", default=None, help="task data: 'sample', a local file or a hub name")
    ap.add_argument("--task-args", default=None, type=parse_task_args,
                    help="task options as a YAML mapping, e.g. '{steps: [2, 3], max_operand: 10}'")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default 3e-3 for the tiny model, else 1e-5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True, help="where to save the fine-tuned checkpoint")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    source = args.model
    if source is None:
        source = str(out / "init")
        create_tiny_checkpoint(source, seed=args.seed)
    elif not Path(source).is_dir():
        raise SystemExit(f"model directory {source} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(source, device=device)
    if tok is None:
        raise SystemExit(f"{source} has no tokenizer files")
    task = load_task(args.task, **merge_task_args(args.task_args, args.data))
    lr = args.lr if args.lr is not None else (3e-3 if args.model is None else 1e-5)
    losses = sft(model, tok, task, steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed)
    model.save_pretrained(str(out), tokenizer=tok)
    summary = {"checkpoint": str(out), "steps": args.steps, "first_loss": losses[0], "last_loss": losses[-1]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
