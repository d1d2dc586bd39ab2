"""The VinePPO generation workload, end to end: trajectories, then MC rollouts from their states.

    python -m bench.branching                      # built-in tiny model, CPU-sized
    python -m bench.branching --config path/to/config.json --prompts 64 --response-len 1024

P prompts x 8 responses of fixed length (ignore_eos); every `state_every` tokens of each
response is a state, and K rollouts run from each state to the response's full length, as
VinePPO's MC value estimation does. The model has random weights built from an HF config.
Timed in the same run: this engine; this engine with prefix_cache=False; transformers'
`generate` (batched, num_return_sequences). Prints a table, writes bench/results/branching.json.
--attention-backend and --cuda-graphs pick the engine's attention kernels and decode graphs
(the resolved choices are recorded next to each engine result).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import Engine, SamplingParams, load_model
from engine.model import ModelConfig, Transformer, tiny_config
from engine.runtime.batch import DEFAULT_SHARED_PREFIX_MIN_TOKENS

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def build_model(config: str | None, device: str, dtype: torch.dtype, seed: int) -> tuple[Transformer, Path]:
    """A random-weight model from an HF config.json (or the built-in tiny one), saved for transformers."""
    cfg = tiny_config() if config is None else ModelConfig.from_hf_dict(json.loads(Path(config).read_text()))
    folder = Path(tempfile.mkdtemp(prefix="bench-branching-"))
    Transformer(cfg).init_weights(seed).save_pretrained(folder)
    model, _ = load_model(folder, dtype=dtype, device=device)
    return model, folder


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    cuts = list(range(0, args.response_len, args.state_every))
    return prompts, cuts


def run_engine(model, prompts, cuts, args, prefix_cache: bool) -> dict:
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    shared = None if args.shared_prefix_min_tokens == 0 else args.shared_prefix_min_tokens
    engine = Engine(model, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                    max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens,
                    prefix_cache=prefix_cache, attention_backend=args.attention_backend, cuda_graphs=graphs,
                    shared_prefix_min_tokens=shared)
    sync = torch.cuda.synchronize if model.lm_head_weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    responses = engine.generate(prompts, SamplingParams(n=args.responses, temperature=1.0, seed=args.seed,
                                                        max_new_tokens=args.response_len,
                                                        ignore_eos=True).per_prompt(len(prompts)))
    sync()
    t1 = time.perf_counter()
    states, params = [], []
    for prompt, group in zip(prompts, responses):
        for c in group:
            for j in cuts:
                states.append(prompt + c.token_ids[:j])
                params.append(SamplingParams(n=args.k, temperature=1.0, seed=len(states),
                                             max_new_tokens=args.response_len - j, ignore_eos=True))
    engine.stats.reset()
    engine.attention_stats.reset()
    engine.step_times.reset()
    rollouts = engine.generate(states, params, progress=True)
    sync()
    t2 = time.perf_counter()
    generated = sum(len(c.token_ids) for g in rollouts for c in g)
    return {"trajectory_s": t1 - t0, "mc_s": t2 - t1, "mc_generated_tokens": generated,
            "mc_tokens_per_s": generated / (t2 - t1), "mc_prefill_tokens": engine.stats.prefill_tokens,
            "mc_cached_tokens": engine.stats.cached_tokens, "mc_forward_steps": engine.stats.forward_steps,
            "preemptions": engine.stats.preemptions, "states": len(states),
            "attention_backend": engine.attention_backend, "cuda_graphs": engine.cuda_graphs,
            "mc_attention": engine.attention_stats.as_dict(),
            "mc_step_ms": {k: 1e3 * v / max(engine.step_times.steps, 1)
                           for k, v in engine.step_times.as_dict().items() if k != "steps"}}


@torch.no_grad()
def run_transformers(folder: Path, prompts, cuts, args, device: str, dtype: torch.dtype) -> dict:
    """transformers' generate on the same weights: states of equal length batched together."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    sync()
    t0 = time.perf_counter()
    ids = torch.tensor(prompts, device=device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=args.responses,
                      max_new_tokens=args.response_len, min_new_tokens=args.response_len, **kw)
    sync()
    t1 = time.perf_counter()
    generated = prefill = 0
    for j in tqdm(cuts, desc="transformers MC"):
        states = out[:, : args.prompt_len + j]  # every response cut at j: one equal-length batch
        n_new = args.response_len - j
        for chunk in states.split(max(1, args.max_num_seqs // args.k)):
            hf.generate(chunk, attention_mask=torch.ones_like(chunk), num_return_sequences=args.k,
                        max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            generated += chunk.shape[0] * args.k * n_new
            prefill += chunk.numel() * args.k  # each returned sequence prefills its own copy
    sync()
    t2 = time.perf_counter()
    return {"trajectory_s": t1 - t0, "mc_s": t2 - t1, "mc_generated_tokens": generated,
            "mc_tokens_per_s": generated / (t2 - t1), "mc_prefill_tokens": prefill, "mc_cached_tokens": 0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="HF config.json (default: the built-in tiny model)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--state-every", type=int, default=16)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--attention-backend", choices=("auto", "torch", "triton"), default="auto",
                    help="engine attention kernels (auto: triton on CUDA, torch elsewhere)")
    ap.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                    help="CUDA graphs for decode steps (auto: on for CUDA + triton; on a CPU 'on' runs the padded "
                         "static path eagerly)")
    ap.add_argument("--shared-prefix-min-tokens", type=int, default=DEFAULT_SHARED_PREFIX_MIN_TOKENS,
                    help="smallest shared prefix that forms a sibling group for the shared-prefix kernel (0: off)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="bench/results/branching.json")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    model, folder = build_model(args.config, device, dtype, args.seed)
    prompts, cuts = workload(args, model.config.vocab_size)
    results = {"engine": run_engine(model, prompts, cuts, args, prefix_cache=True),
               "engine_no_prefix_cache": run_engine(model, prompts, cuts, args, prefix_cache=False)}
    if not args.skip_transformers:
        results["transformers"] = run_transformers(folder, prompts, cuts, args, device, dtype)
    base = results.get("transformers", results["engine_no_prefix_cache"])
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nVinePPO workload on {device_name}: {args.prompts} prompts x {args.responses} responses of "
          f"{args.response_len} tokens, states every {args.state_every}, K={args.k}, model {model.num_parameters / 1e6:.1f}M params")
    eng = results["engine"]
    print(f"engine attention: {eng['attention_backend']}, cuda graphs: {'on' if eng['cuda_graphs'] else 'off'}, "
          f"MC steps {eng['mc_forward_steps']} ({eng['mc_attention']['graph_steps']} from graphs, "
          f"{eng['mc_attention']['shared_prefix_steps']} reading shared prefixes once; KV read "
          f"{eng['mc_attention']['read_over_ideal'] or float('nan'):.2f}x every page once)")
    print("engine MC ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in eng["mc_step_ms"].items()))
    print(f"{'method':<24}{'traj s':>9}{'MC s':>9}{'MC tok/s':>11}{'MC prefill':>12}{'cached':>10}{'MC speedup':>12}")
    for name, r in results.items():
        print(f"{name:<24}{r['trajectory_s']:>9.2f}{r['mc_s']:>9.2f}{r['mc_tokens_per_s']:>11.0f}"
              f"{r['mc_prefill_tokens']:>12}{r['mc_cached_tokens']:>10}{base['mc_s'] / r['mc_s']:>11.2f}x")
    report = {"device": device_name, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
              "params": model.num_parameters, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
