"""One sampling step of a wide batch on a CPU: the C++ row loop against the torch path.

    python -m bench.sampler                      # 504 rows; vocabularies 128 and 49,152; T 0.6
    python -m bench.sampler --rows 256 --vocab 128,32000 --threads 1

Why: a CPU engine samples every step on the host, and with overlap (issue 27) the sampler lies
on the chain sample(N) -> forward(N+1), so its time adds to every step. The torch path is ~40
tensor operations; on a CPU the default (`engine._C.sample_rows`) keeps torch's three
vectorised passes (logits / T, log_softmax, exp) and does the rest per row in C++, with the
same tokens and log-probs bit for bit (checked here on every case, and in
tests/runtime/test_cpp_sampler.py).

Distributions (the rows' logits; temperature 0.6, seeded draws):
- uniform: all logits 0, what `bench.host_overhead`'s stubbed model gives: top-p 0.9 keeps 90% of
  the vocabulary, the widest nucleus (the sort's worst case, though already in order);
- peaked: N(0, 3^2) logits, a nucleus of a few tokens at top-p 0.9, like a trained model;
- flat: N(0, 1) logits, a nucleus of tens to hundreds of tokens.
Settings: top-p 0.9 (the trainer's MC rollouts), no cut (top-p 1: the default preset), top-k 20.

Reported: ms per call for each path (median of --repeats after warm-up), torch / cpp, and the
bound: one read of the logits at the copy bandwidth this core shows in the same run (clone of
the logits tensor), which any sampler must pay. JSON in bench/results/sampler.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engine.runtime.sampler import SamplingBatch, counter_uniforms, sample

OUT = Path(__file__).resolve().parent / "results" / "sampler.json"
DISTRIBUTIONS = {"uniform": 0.0, "peaked": 3.0, "flat": 1.0}   # name: logits' standard deviation
SETTINGS = {"top-p 0.9": (0.9, 0), "no cut": (1.0, 0), "top-k 20": (1.0, 20)}


def timed(fn, repeats: int) -> float:
    """Median ms of fn() over `repeats` calls, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=504)
    ap.add_argument("--vocab", default="128,49152", help="comma-separated vocabulary sizes")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the C++ loop uses one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    vocabs = [int(v) for v in args.vocab.split(",")]
    if args.rows < 1 or args.repeats < 1 or any(v < 2 for v in vocabs):
        ap.error("--rows and --repeats must be >= 1 and every --vocab >= 2")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    uniform = counter_uniforms(np.arange(args.rows, dtype=np.uint64) + args.seed, np.arange(args.rows))
    results = []
    for vocab in vocabs:
        for dist, scale in DISTRIBUTIONS.items():
            logits = torch.randn(args.rows, vocab, generator=g) * scale
            copy_ms = timed(lambda: logits.clone(), args.repeats)
            for setting, (top_p, top_k) in SETTINGS.items():
                b = SamplingBatch.build([args.temperature] * args.rows, [top_p] * args.rows, [top_k] * args.rows,
                                        uniform, want_logprobs=True, vocab_size=vocab)
                ref, got = sample(logits, b, backend="torch"), sample(logits, b, backend="cpp")
                if ref != got:
                    raise AssertionError(f"cpp and torch disagree at vocab {vocab}, {dist}, {setting}")
                torch_ms = timed(lambda: sample(logits, b, backend="torch"), args.repeats)
                cpp_ms = timed(lambda: sample(logits, b, backend="cpp"), args.repeats)
                results.append(dict(vocab=vocab, distribution=dist, setting=setting, torch_ms=torch_ms,
                                    cpp_ms=cpp_ms, speedup=torch_ms / cpp_ms, bound_ms=copy_ms,
                                    cpp_vs_bound=cpp_ms / copy_ms))
    print(f"\nSampling {args.rows} rows on {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, T {args.temperature}, median of {args.repeats}; bound = one read of the "
          f"logits at this core's copy bandwidth; tokens and log-probs identical in every case")
    print(f"{'vocab':>7} {'logits':>8} {'setting':>10} {'torch ms':>9} {'cpp ms':>8} {'speedup':>8} "
          f"{'bound ms':>9} {'cpp/bound':>10}")
    for r in results:
        print(f"{r['vocab']:>7} {r['distribution']:>8} {r['setting']:>10} {r['torch_ms']:>9.3f} {r['cpp_ms']:>8.3f} "
              f"{r['speedup']:>7.2f}x {r['bound_ms']:>9.3f} {r['cpp_vs_bound']:>9.1f}x")
    report = {"device": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "args": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
