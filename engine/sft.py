"""Supervised warm-up on a task's reference solutions (`python -m engine.sft`, or the trainer's first stage).

VinePPO starts from an SFT model; the default preset gives the built-in tiny model its starting
policy this way. Batches are packed (no padding, cu_seqlens), the loss covers the solution
tokens and the EOS only, and the optimizer is the trainer's AdamW with warmup and linear decay.

    python -m engine.sft --task arithmetic --steps 300 --out runs/sft      # the built-in tiny model
    python -m engine.sft --model path/to/hf --task gsm8k --steps 200 --lr 1e-5 --out runs/sft-gsm8k
    torchrun --nproc-per-node 2 -m engine.sft --task arithmetic --steps 300 --out runs/sft   # data parallel
    torchrun --nproc-per-node 2 -m engine.sft ... --parallel fsdp   # weights, gradients, optimizer state sharded

Data parallel (torchrun; engine/rl/distributed.py): every rank draws the same batch, trains on
its contiguous share and the ranks sum their gradients, the loss being divided by the whole
batch's target tokens, so each step is the one-process step (up to float summation order);
rank 0 writes the checkpoint. An error on any rank ends every rank.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.evaluate import merge_task_args
from engine.model import Transformer, create_tiny_checkpoint, load_model
from engine.progress import progress_bar
from engine.rl.distributed import Dist, init_from_env, run_ranks
from engine.rl.optim import AdamW, clip_grad_norm, warmup_linear_decay
from engine.tasks import ChatTemplateError, Item, Task, load_task, parse_task_args


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


def _fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 modules of `model` (sharded by engine.rl.fsdp.shard_policy), root last; [] when plain."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def sft(model: Transformer, tokenizer, task: Task, *, steps: int, batch_size: int = 64, lr: float = 1e-5,
        seed: int = 0, warmup_ratio: float = 0.05, grad_clip: float = 1.0, progress: bool = True,
        items: list[Item] | None = None, dist: Dist | None = None,
        grad_norms: list[float] | None = None) -> list[float]:
    """Fine-tune `model` in place on random batches of train solutions (`items`, default the
    task's train split: a trainer passes its own, without the items it holds out); returns the
    losses (token means over each whole batch).

    dist: data parallel over its ranks (every rank calls this with the same arguments): each
    rank draws the same batch, trains on its share (`dist.shard`) and the gradients are summed
    over the ranks (`dist.all_reduce_grads`, or FSDP's reduce-scatter when `model` was sharded
    with engine.rl.fsdp.shard_policy). One process (dist None or world size 1) is unchanged.
    grad_norms: if given, each step's global gradient norm (before clipping) is appended to it.
    """
    dist = dist if dist is not None else Dist()
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    task.use_tokenizer(tokenizer)
    items = [it for it in (task.items("train") if items is None else items) if it.solution is not None]
    if not items:
        raise ValueError(f"task {task.name}: no train item has a reference solution")
    per_batch = min(batch_size, len(items))
    if per_batch < dist.world_size:
        raise ValueError(f"a batch of {per_batch} sequences (batch_size {batch_size}, {len(items)} train items) "
                         f"cannot give each of the {dist.world_size} ranks one; use batch_size >= {dist.world_size}")
    fsdp = bool(_fsdp_modules(model))  # FSDP sums the gradients itself (reduce-scatter in the backward)
    device = model.lm_head_weight.device
    opt = AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(steps, warmup_ratio))
    rng = random.Random(f"sft-{seed}")  # the same draws on every rank: the same global batches
    was_training = model.training
    model.train()
    losses = []
    bar = progress_bar(range(steps), desc="SFT warm-up", disable=not progress)
    for _ in bar:
        batch = rng.sample(items, per_batch)
        lo, hi = dist.shard(len(batch))
        ids, cu, targets = sft_batch(tokenizer, task, batch[lo:hi], device)
        logits = model(ids, cu_seqlens=cu)[0]
        token_losses = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        # The whole batch's sum and target-token count (one process: this rank's own).
        total, count = dist.all_reduce_sum([token_losses.item(), float((targets != -100).sum())])
        # Divided by the GLOBAL token count: the ranks' gradients sum to the whole batch's mean
        # loss gradient (one process: exactly cross_entropy's mean, bit for bit).
        loss = token_losses / count
        value = loss.item() if not dist.distributed else total / count  # the same on every rank
        if not math.isfinite(value):  # (every rank sees the same value: all ranks raise together)
            raise FloatingPointError(f"SFT loss is {value} at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not fsdp:
            dist.all_reduce_grads(list(model.parameters()))
        norm = clip_grad_norm(list(model.parameters()), grad_clip)
        if grad_norms is not None:
            grad_norms.append(norm)
        opt.step()
        sched.step()
        losses.append(value)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.train(was_training)
    return losses


def full_state_dict(model: Transformer) -> dict[str, torch.Tensor] | None:
    """Under FSDP the whole weights on rank 0's CPU, {} on the other ranks (collective: every
    rank calls it); None for a plain model (save_pretrained then reads the module)."""
    if not _fsdp_modules(model):
        return None
    from engine.rl.fsdp import gather_full_state_dict

    return gather_full_state_dict(model)


def save_checkpoint(model: Transformer, tokenizer, out: str | Path, dist: Dist | None = None) -> None:
    """Save `model` in HF format to `out`: rank 0 writes (FSDP: the weights gathered first; every
    rank must call it). No barrier: a caller that reads `out` on another rank waits for rank 0."""
    dist = dist if dist is not None else Dist()
    state = full_state_dict(model)
    if dist.is_main:
        model.save_pretrained(str(out), tokenizer=tokenizer, state_dict=state)


def _tiny_model_args(text: str) -> dict:
    """--tiny-model-args: a YAML mapping of create_tiny_checkpoint options."""
    try:
        return parse_task_args(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--task-args", "--tiny-model-args")) from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint folder (default: a fresh built-in tiny model)")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--data", default=None, help="task data: 'sample', a local file or a hub name")
    ap.add_argument("--task-args", default=None, type=parse_task_args,
                    help="task options as a YAML mapping, e.g. '{steps: [2, 3], max_operand: 10}'")
    ap.add_argument("--tiny-model-args", default=None, type=_tiny_model_args,
                    help="options of the built-in tiny model (without --model), e.g. '{hidden_size: 32}'")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per step (over all ranks under torchrun)")
    ap.add_argument("--lr", type=float, default=None, help="default 3e-3 for the tiny model, else 1e-5")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                    help="under torchrun: ddp (whole model on every rank) or fsdp (sharded, FSDP2)")
    ap.add_argument("--dist-timeout-s", type=int, default=300, help="under torchrun: collective timeout (seconds)")
    ap.add_argument("--out", required=True,
                    help="where to save the fine-tuned checkpoint (and sft_log.json: each step's loss and grad norm)")
    args = ap.parse_args(argv)
    if args.model is not None and not Path(args.model).is_dir():
        ap.error(f"model directory {args.model} does not exist")
    if args.model is not None and args.tiny_model_args:
        ap.error("--tiny-model-args applies to the built-in tiny model, not to --model")
    dist = init_from_env(args.dist_timeout_s, args.device or "auto")
    # under torchrun, an error on any rank ends every rank (engine/rl/distributed.py)
    return run_ranks(dist, lambda: _main(args, dist))


def _main(args: argparse.Namespace, dist: Dist) -> dict:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    source = args.model
    if source is None:
        source = str(out / "init")
        if dist.is_main:
            create_tiny_checkpoint(source, seed=args.seed, **(args.tiny_model_args or {}))
        dist.barrier()  # the tiny checkpoint is whole before any rank reads it
        if dist.distributed:  # every rank's random streams start alike
            torch.manual_seed(args.seed)
    device = dist.device(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    sharded = args.parallel == "fsdp" and dist.distributed
    model, tok = load_model(source, device="cpu" if sharded else device)  # (sharded: moved group by group)
    if tok is None:
        raise SystemExit(f"{source} has no tokenizer files")
    if sharded:
        from engine.rl.fsdp import shard_policy

        shard_policy(model, device)
    task = load_task(args.task, **merge_task_args(args.task_args, args.data))
    try:
        task.use_tokenizer(tok)
    except ChatTemplateError as e:
        raise SystemExit(f"error: {e}") from None
    lr = args.lr if args.lr is not None else (3e-3 if args.model is None else 1e-5)
    norms: list[float] = []
    losses = sft(model, tok, task, steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
                 grad_clip=args.grad_clip, progress=dist.is_main, dist=dist, grad_norms=norms)
    save_checkpoint(model, tok, out, dist)
    if not dist.is_main:
        return {}
    (out / "sft_log.json").write_text(json.dumps({"loss": losses, "grad_norm": norms}))
    summary = {"checkpoint": str(out), "steps": args.steps, "first_loss": losses[0], "last_loss": losses[-1]}
    if dist.distributed:
        summary["world_size"] = dist.world_size
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
