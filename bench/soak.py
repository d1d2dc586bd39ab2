"""Seeded sampling under preemption: a tight KV pool against a roomy one, many random rounds.

    python -m bench.soak                    # 830 rounds (about 5 minutes on 2 cores)
    python -m bench.soak --rounds 100 --out bench/results/soak.json
    python -m bench.soak --overlap          # both engines with overlap, and a serial twin of the tight one

Each round sends 1-4 prompts that share random roots or continue earlier outputs (as MC states
do), n 1-5, 1-23 new tokens, greedy 30% of the time and otherwise T 0.9 with top-p 1.0 or 0.9,
every request seeded, on the tiny model with pages of 4 tokens. One Engine has a 160-token pool
(max_num_seqs 16: it preempts and recomputes), the other 32k tokens (it never does). The same
seeded request must give the same tokens on both whenever both compute the same logits.

What it reports, against the roomy engine: the samples and tokens compared, the samples that
diverge and where, and on the tokens both drew alike the log-prob differences (exact equality,
and the largest gap). A recomputed KV (after preemption, or a prompt prefilled in other chunks)
comes from GEMMs of other shapes, so its logits can differ in the last bits; a seeded draw whose
uniform lands within that distance of a boundary of the cumulative distribution picks the
neighbouring token. The rate of such flips is the figure this bench measures.

With --overlap both engines run each step's forward on a worker thread, and a third engine, the
tight one's serial twin, gets the same requests: overlap must match it bit for bit (tokens,
log-probs, finish reasons, cached tokens), preemptions and all (`overlap_mismatches`).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine import Engine, SamplingParams, load_model
from engine.model import create_tiny_checkpoint


def random_round(rng: random.Random, vocab: int, history: list[list[int]]) -> tuple[list, list]:
    """1-4 prompts (shared roots, or cuts of earlier outputs) and their seeded params."""
    roots = [[rng.randrange(4, vocab) for _ in range(rng.randint(2, 10))] for _ in range(rng.randint(1, 2))]
    prompts, params = [], []
    for _ in range(rng.randint(1, 4)):
        if history and rng.random() < 0.4:  # an MC state: an earlier prompt + output, cut somewhere
            earlier = rng.choice(history)
            prompt = earlier[: rng.randint(max(1, len(earlier) // 2), len(earlier))]
        else:
            prompt = rng.choice(roots) + [rng.randrange(4, vocab) for _ in range(rng.randint(0, 6))]
        greedy = rng.random() < 0.3
        prompts.append(prompt)
        params.append(SamplingParams(n=rng.randint(1, 5), temperature=0.0 if greedy else 0.9,
                                     top_p=1.0 if greedy else rng.choice([1.0, 0.9]),
                                     max_new_tokens=rng.randint(1, 23), seed=rng.randrange(1 << 31),
                                     ignore_eos=True, logprobs=True))
    return prompts, params


def _outputs(groups) -> list:
    return [[(c.token_ids, c.logprobs, c.finish_reason, c.cached_tokens) for c in g] for g in groups]


def soak(rounds: int, seed: int = 0, progress: bool = True, overlap: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as d:
        create_tiny_checkpoint(d, seed=5)
        model, tok = load_model(d)
    vocab = model.config.vocab_size
    tight = Engine(model, tok, page_size=4, kv_cache_tokens=160, max_num_seqs=16, overlap=overlap)
    roomy = Engine(model, tok, page_size=4, kv_cache_tokens=32768, overlap=overlap)
    twin = Engine(model, tok, page_size=4, kv_cache_tokens=160, max_num_seqs=16, overlap=False) if overlap else None
    rng = random.Random(seed)
    history: list[list[int]] = []
    out = dict(rounds=rounds, samples=0, sampled_samples=0, tokens=0, sampled_tokens=0, diverged=[],
               logprob_equal=0, logprob_compared=0, logprob_max_abs_diff=0.0, tight_preemptions=0, overlap=overlap,
               overlap_mismatches=0)
    t0 = time.perf_counter()
    for r in tqdm(range(rounds), desc="soak", disable=not progress, mininterval=2.0):
        prompts, params = random_round(rng, vocab, history)
        a = roomy.generate(prompts, params)
        b = tight.generate(prompts, params)
        if twin is not None:
            out["overlap_mismatches"] += sum(x != y for x, y in zip(_outputs(b), _outputs(twin.generate(prompts, params))))
        for prompt, sp, ga, gb in zip(prompts, params, a, b):
            for i, (ca, cb) in enumerate(zip(ga, gb)):
                out["samples"] += 1
                out["tokens"] += len(ca.token_ids)
                if not sp.greedy:
                    out["sampled_samples"] += 1
                    out["sampled_tokens"] += len(ca.token_ids)
                same = next((k for k, (x, y) in enumerate(zip(ca.token_ids, cb.token_ids)) if x != y), None)
                upto = len(ca.token_ids) if same is None else same
                diff = np.abs(np.array(ca.logprobs[:upto]) - np.array(cb.logprobs[:upto]))
                out["logprob_compared"] += int(diff.size)
                out["logprob_equal"] += int((diff == 0).sum())
                out["logprob_max_abs_diff"] = max(out["logprob_max_abs_diff"], float(diff.max()) if diff.size else 0.0)
                if same is not None:
                    out["diverged"].append(dict(round=r, sample=i, position=same, greedy=sp.greedy,
                                                temperature=sp.temperature, top_p=sp.top_p,
                                                roomy=ca.token_ids[same], tight=cb.token_ids[same],
                                                logprob_gap_before=float(diff.max()) if diff.size else 0.0))
                history.append(list(prompt) + list(ca.token_ids))
        history = history[-64:]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["tight_preemptions"] = tight.stats.preemptions  # (cumulative over the Engine's life)
    out["overlap_wasted_rows"] = tight.stats.overlap_wasted_rows
    out["flip_rate_per_sampled_token"] = len([x for x in out["diverged"] if not x["greedy"]]) / max(1, out["sampled_tokens"])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=830)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlap", action="store_true", help="overlap on, checked against a serial twin")
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args(argv)
    res = soak(args.rounds, args.seed, overlap=args.overlap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"rounds {res['rounds']}: {res['samples']} samples ({res['sampled_samples']} sampled), "
          f"{res['tokens']} tokens ({res['sampled_tokens']} sampled); diverged samples: {len(res['diverged'])}; "
          f"log-probs bit-equal on {res['logprob_equal']} of {res['logprob_compared']} tokens drawn alike, "
          f"largest gap {res['logprob_max_abs_diff']:.2e}; {res['seconds']} s -> {args.out}")
    if args.overlap:
        print(f"overlap: {res['overlap_mismatches']} requests differ from the serial twin "
              f"({res['overlap_wasted_rows']} wasted look-ahead rows on the tight engine)")
    for d in res["diverged"]:
        print("  ", d)
    return res


if __name__ == "__main__":
    main()
