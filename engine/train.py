"""`python -m engine.train`: the project's main job.

Until the VinePPO trainer lands (issue: "VinePPO end to end"), this runs a short, honest
demo of what exists: it creates the built-in tiny model and character tokenizer as a
Hugging Face checkpoint, fine-tunes it with packed (padding-free) sequences on generated
two-number additions, saves it, reloads it through `load_model`, and reports greedy
exact-match accuracy on held-out problems before and after.
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

from engine.model import create_tiny_checkpoint, load_model


def make_problems(n: int, seed: int, max_operand: int = 99) -> list[tuple[str, str]]:
    """(prompt, answer) pairs like ("23+58=", "81")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


@torch.no_grad()
def greedy_accuracy(model, tok, problems: list[tuple[str, str]], max_new_tokens: int = 5) -> float:
    """Exact-match accuracy of greedy completions (full recompute, left-padded batch)."""
    prompts = [tok.encode(p) for p, _ in problems]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    done = torch.zeros(len(prompts), dtype=torch.bool)
    generated = []
    for _ in range(max_new_tokens):
        nxt = model(ids, attention_mask=mask)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tok.eos_token_id), nxt)
        generated.append(nxt)
        done |= nxt == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    texts = tok.batch_decode(torch.stack(generated, 1), skip_special_tokens=True)
    return sum(t == ans for t, (_, ans) in zip(texts, problems)) / len(problems)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-problems", type=int, default=300)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    run = Path(args.run_dir)
    init_dir, final_dir = run / "init", run / "final"
    create_tiny_checkpoint(init_dir, seed=args.seed)
    model, tok = load_model(init_dir)
    held_out = make_problems(args.eval_problems, seed=10_000 + args.seed)
    held_out_prompts = {p for p, _ in held_out}
    acc_before = greedy_accuracy(model, tok, held_out)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / args.steps))
    rng = random.Random(args.seed)
    model.train()
    t0 = time.time()
    log = (run / "metrics.jsonl").open("w")
    bar = tqdm(range(args.steps), desc="fine-tune (demo)")
    for step in bar:
        batch = [pa for pa in make_problems(args.batch_size, seed=rng.randrange(2**31)) if pa[0] not in held_out_prompts]
        seqs, targets = [], []
        for prompt, answer in batch:
            p, a = tok.encode(prompt), tok.encode(answer) + [tok.eos_token_id]
            seqs.append(torch.tensor(p + a[:-1]))
            targets.append(torch.tensor([-100] * (len(p) - 1) + a))  # loss on the answer only
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        logits = model(torch.cat(seqs)[None], cu_seqlens=cu)[0]
        loss = F.cross_entropy(logits.float(), torch.cat(targets), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")
    log.close()
    model.eval()
    model.save_pretrained(final_dir, tokenizer=tok)
    reloaded, tok = load_model(final_dir)
    acc_after = greedy_accuracy(reloaded, tok, held_out)
    summary = {"held_out_accuracy_before": acc_before, "held_out_accuracy_after": acc_after,
               "train_seconds": round(time.time() - t0, 1), "checkpoint": str(final_dir)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
