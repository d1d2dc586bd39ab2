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

    python -m bench.branching --model /tmp/smol-hf  # a real checkpoint (CPU): bench/results/branching-model.json

--model DIR runs the MC phase on a checkpoint folder with a chat-template tokenizer: chat-templated
arithmetic questions, responses sampled by the engine (T=0.6, ignore_eos, so every rollout's length
is fixed and every method generates the same tokens), states every `state_every` tokens, K rollouts
each. The same states go to the engine and to transformers' `generate` batched three ways (one call
per state; the states of one cut together; everything left-padded in chunks of --max-num-seqs rows),
the best of which is the baseline. It also says where the engine's CPU time goes: the per-step phases,
the torch reference attention's share of the forward (timed over the whole phase), and the ops of a
few profiled steps (a repeat of the phase, cut short).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from tqdm import tqdm

from engine import Engine, SamplingParams, load_model
from engine.model import ModelConfig, Transformer, tiny_config
from engine.runtime import engine as engine_module
from engine.runtime.batch import DEFAULT_SHARED_PREFIX_MIN_TOKENS
from engine.runtime.paged_attention import TorchPagedAttention

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
    responses = engine.generate(prompts, SamplingParams(n=args.responses, temperature=args.temperature, seed=args.seed,
                                                        max_new_tokens=args.response_len,
                                                        ignore_eos=True).per_prompt(len(prompts)))
    sync()
    t1 = time.perf_counter()
    states, params = [], []
    for prompt, group in zip(prompts, responses):
        for c in group:
            for j in cuts:
                states.append(prompt + c.token_ids[:j])
                params.append(SamplingParams(n=args.k, temperature=args.temperature, seed=len(states),
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
    kw = dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
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


# ---------------------------------------------------------------- --model: a real checkpoint on the CPU

QUESTIONS = (  # short arithmetic word problems: real chat prompts of ~60 tokens with SmolLM2's template
    "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many apples are left?",
    "A train travels 60 km per hour for 2.5 hours. How far does it go?",
    "Sara buys 4 notebooks at $3 each and a pen for $2. How much does she spend?",
    "A class has 28 students. 3/4 of them like math. How many students like math?",
    "Ben reads 15 pages a day. How many days does he need for a 240-page book?",
    "A shop sells 7 cakes an hour for 9 hours. How many cakes does it sell?",
    "Mia had 50 dollars. She spent 18 on lunch and 12 on a book. How much is left?",
    "A garden is 8 m long and 6 m wide. What is its area?",
)


@dataclass
class MCStates:
    """The MC phase's input: every state (prompt + a response's first j tokens) and its rollout length."""

    states: list[list[int]]  # token ids of each state
    new_tokens: list[int]    # tokens each of its K rollouts generates: response_len - j
    cuts: list[int]          # j of each state (the states of one cut share their rollout length)


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat-templated questions (add_generation_prompt=True), cycling through QUESTIONS."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SystemExit("--model needs a tokenizer with a chat template")
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False))
            for i in range(n)]


def mc_states(prompts: list[list[int]], responses: list[list[list[int]]], cuts: list[int],
              response_len: int) -> MCStates:
    """States every `state_every` tokens of each response (VinePPO's MC value estimation)."""
    states, new_tokens, at = [], [], []
    for prompt, group in zip(prompts, responses):
        for response in group:
            for j in cuts:
                states.append(prompt + response[:j])
                new_tokens.append(response_len - j)
                at.append(j)
    return MCStates(states, new_tokens, at)


ATTENTION_RANGE = "paged_attention"  # the profiler's name for the time inside the engine's attention calls


@dataclass
class AttentionTime:
    """Seconds spent in, and calls to, the torch reference attention inside one `timed_attention` block."""

    seconds: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def timed_attention() -> Iterator[AttentionTime]:
    """Every TorchPagedAttention the engine builds inside the block is timed per call (CPU: synchronous) into
    the yielded AttentionTime, and marked for the profiler."""
    timer = AttentionTime()

    class TimedAttention(TorchPagedAttention):
        def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            with torch.profiler.record_function(ATTENTION_RANGE):
                out = super().__call__(layer, q, k, v)
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1
            return out

    with mock.patch.object(engine_module, "TorchPagedAttention", TimedAttention):
        yield timer


def model_engine(model, tokenizer, args) -> Engine:
    """The engine as the trainer builds it on a CPU (torch attention; overlap off, so a step's forward is timed
    on this thread)."""
    return Engine(model, tokenizer, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                  max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens,
                  attention_backend=args.attention_backend, overlap=False)


def sample_responses(engine: Engine, prompts: list[list[int]], args) -> tuple[list[list[list[int]]], float]:
    """The trajectories: `responses` samples of `response_len` tokens per prompt (ignore_eos), and their seconds."""
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(n=args.responses, temperature=args.temperature, seed=args.seed,
                                                  max_new_tokens=args.response_len,
                                                  ignore_eos=True).per_prompt(len(prompts)))
    return [[c.token_ids for c in group] for group in out], time.perf_counter() - t0


def mc_params(mc: MCStates, args) -> list[SamplingParams]:
    """K seeded rollouts per state, each to the response's full length (ignore_eos: a fixed token count)."""
    return [SamplingParams(n=args.k, temperature=args.temperature, seed=args.seed + 1 + i, max_new_tokens=n,
                           ignore_eos=True) for i, n in enumerate(mc.new_tokens)]


def run_engine_mc(engine: Engine, mc: MCStates, args) -> dict:
    """The engine's MC phase, timed, with the torch attention's own seconds (the share of the forward it takes)."""
    for counter in (engine.stats, engine.attention_stats, engine.step_times):
        counter.reset()
    with timed_attention() as attn:
        t0 = time.perf_counter()
        rollouts = engine.generate(mc.states, mc_params(mc, args), progress="engine MC")
        seconds = time.perf_counter() - t0
    generated = sum(len(c.token_ids) for g in rollouts for c in g)
    steps = engine.step_times.as_dict()
    timed = attn.calls > 0  # the torch backend ran (the Triton one is not timed here)
    return {"mc_s": seconds, "mc_generated_tokens": generated, "mc_tokens_per_s": generated / seconds,
            "mc_prefill_tokens": engine.stats.prefill_tokens, "mc_cached_tokens": engine.stats.cached_tokens,
            "mc_sampled_tokens": generated,
            "mc_forward_tokens": engine.stats.prefill_tokens + engine.stats.decode_tokens,
            "mc_forward_steps": engine.stats.forward_steps, "preemptions": engine.stats.preemptions,
            "attention_backend": engine.attention_backend, "mc_attention": engine.attention_stats.as_dict(),
            "mc_step_s": {k: v for k, v in steps.items() if k != "steps"},
            "mc_step_ms": {k: 1e3 * v / max(engine.step_times.steps, 1) for k, v in steps.items() if k != "steps"},
            "attention_s": attn.seconds if timed else None,
            "attention_share_of_mc": attn.seconds / seconds if timed else None,
            "attention_share_of_forward": attn.seconds / steps["forward"] if timed and steps["forward"] else None}


class _StopProfiling(Exception):
    """Ends the profiled repeat of the MC phase once its steps are recorded."""


def profile_engine_mc(engine: Engine, mc: MCStates, args) -> dict | None:
    """torch.profiler over `profile_steps` whole MC steps after `profile_skip` (a repeat of the MC phase, cut
    short): self CPU time per op, inside the attention range and outside it (the matmuls, norms, sampling)."""
    if args.profile_steps == 0:
        return None
    launch, count = engine._launch, 0
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    started = 0.0

    def counted(*a, **kw):
        nonlocal count, started
        count += 1
        if count == args.profile_skip + 1:
            prof.start()
            started = time.perf_counter()
        if count == args.profile_skip + args.profile_steps + 1:
            raise _StopProfiling
        return launch(*a, **kw)

    wall = None
    with timed_attention(), mock.patch.object(engine, "_launch", counted):
        try:
            engine.generate(mc.states, mc_params(mc, args))
        except _StopProfiling:
            pass
        if started:
            wall = time.perf_counter() - started
            prof.stop()
    if wall is None:
        return None
    return op_breakdown(prof.events(), wall, min(count, args.profile_skip + args.profile_steps) - args.profile_skip)


def op_breakdown(events, wall_s: float, steps: int) -> dict:
    """Self CPU seconds per op, split by whether the op ran inside the attention range."""
    inside: dict[str, float] = {}
    outside: dict[str, float] = {}
    for e in events:
        if e.name == ATTENTION_RANGE:
            continue
        parent, within = e.cpu_parent, False
        while parent is not None and not within:
            within, parent = parent.name == ATTENTION_RANGE, parent.cpu_parent
        table = inside if within else outside
        table[e.name] = table.get(e.name, 0.0) + e.self_cpu_time_total / 1e6
    total = sum(inside.values()) + sum(outside.values())

    def top(table: dict[str, float], n: int = 8) -> dict[str, float]:
        return dict(sorted(table.items(), key=lambda kv: -kv[1])[:n])

    matmul = sum(v for k, v in outside.items() if k in MATMUL_OPS)
    return {"steps": steps, "wall_s": wall_s, "op_self_s": total, "attention_s": sum(inside.values()),
            "attention_share": sum(inside.values()) / total if total else None,
            "matmul_outside_attention_s": matmul, "matmul_share": matmul / total if total else None,
            "attention_top_ops_s": top(inside), "other_top_ops_s": top(outside)}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


@torch.no_grad()
def run_hf_mc(hf, mc: MCStates, args, batching: str, pad_id: int) -> dict:
    """transformers' `generate` over the same states, K samples each, batched one of three ways.

    per_state: one call per state (num_return_sequences=K). per_cut: the states cut at the same j
    (equal rollout lengths) left-padded into one batch. padded: every state left-padded into one batch,
    longest rollouts first, chunked only by --max-num-seqs rows; a chunk runs its longest rollout's
    length, so its shorter rows sample tokens nobody needs (in mc_sampled_tokens, not in
    mc_generated_tokens). mc_forward_tokens counts the positions the model ran: padded prompts once
    per returned sequence, then one per sampled token but the last.
    """
    order = list(range(len(mc.states)))
    if batching == "per_state":
        batches = [[i] for i in order]
    elif batching == "per_cut":
        by_cut: dict[int, list[int]] = {}
        for i in order:
            by_cut.setdefault(mc.cuts[i], []).append(i)
        batches = [chunk for group in by_cut.values() for chunk in _chunks(group, args)]
    else:
        batches = _chunks(sorted(order, key=lambda i: -mc.new_tokens[i]), args)
    kw = dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0, pad_token_id=pad_id,
              eos_token_id=None, num_return_sequences=args.k)
    generated = sampled = prefill = 0
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc=f"transformers MC ({batching})", leave=False):
        ids, mask = _left_padded([mc.states[i] for i in batch], pad_id)
        n = max(mc.new_tokens[i] for i in batch)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
        made = out.shape[1] - ids.shape[1]
        generated += args.k * sum(min(mc.new_tokens[i], made) for i in batch)
        sampled += out.shape[0] * made
        prefill += ids.numel() * args.k  # each returned sequence prefills its own (padded) copy
    seconds = time.perf_counter() - t0
    rows = args.k * len(mc.states)  # a row's last sampled token is never fed back
    return {"batching": batching, "calls": len(batches), "mc_s": seconds, "mc_generated_tokens": generated,
            "mc_tokens_per_s": generated / seconds, "mc_prefill_tokens": prefill, "mc_cached_tokens": 0,
            "mc_sampled_tokens": sampled, "mc_forward_tokens": prefill + sampled - rows}


def _chunks(states: list[int], args) -> list[list[int]]:
    per = max(1, args.max_num_seqs // args.k)
    return [states[i:i + per] for i in range(0, len(states), per)]


def _left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


HF_BATCHINGS = ("per_state", "per_cut", "padded")


def run_model(args) -> dict:
    """--model: the MC workload on a real checkpoint (CPU, fp32 unless --dtype), engine against three HF batchings."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device="cpu")
    if tokenizer is None:
        raise SystemExit(f"--model {args.model}: no tokenizer in the folder")
    prompts = chat_prompts(tokenizer, args.prompts)
    cuts = list(range(0, args.response_len, args.state_every))
    engine = model_engine(model, tokenizer, args)
    responses, trajectory_s = sample_responses(engine, prompts, args)
    mc = mc_states(prompts, responses, cuts, args.response_len)
    results = {"engine": {"trajectory_s": trajectory_s, **run_engine_mc(engine, mc, args)}}
    profile = profile_engine_mc(engine, mc, args)
    del engine
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=pad_id)  # warm-up
    for batching in HF_BATCHINGS:
        results[f"transformers_{batching}"] = run_hf_mc(hf, mc, args, batching, pad_id)
    best = min(HF_BATCHINGS, key=lambda b: results[f"transformers_{b}"]["mc_s"])
    eng = results["engine"]
    summary = {"best_hf": f"transformers_{best}",
               "engine_speedup_over_best_hf": results[f"transformers_{best}"]["mc_s"] / eng["mc_s"],
               "states": len(mc.states), "rollouts": len(mc.states) * args.k,
               "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
               "mean_state_tokens": sum(map(len, mc.states)) / len(mc.states),
               "threads": torch.get_num_threads()}
    report = {"device": "cpu", "date": time.strftime("%Y-%m-%d"), "model": str(args.model), "args": vars(args),
              "params": model.num_parameters, "summary": summary, "results": results, "engine_profile": profile,
              "example": tokenizer.decode(prompts[0] + responses[0][0])}
    print_model_report(report)
    return report


def print_model_report(report: dict) -> None:
    """The table: each method's MC seconds, tokens/s, generated / sampled / prefill / cached / forward tokens and
    the engine's speedup over it; above it, where the engine's time goes."""
    a, s, r = report["args"], report["summary"], report["results"]
    eng = r["engine"]
    print(f"\nMC workload on {Path(a['model']).name} ({report['params'] / 1e6:.1f}M params, {s['threads']} threads): "
          f"{a['prompts']} chat prompts (mean {s['mean_prompt_tokens']:.0f} tokens) x {a['responses']} responses of "
          f"{a['response_len']} tokens (T={a['temperature']}, ignore_eos), states every {a['state_every']}: "
          f"{s['states']} states x K={a['k']}")
    print("engine MC ms per step: " + ", ".join(f"{k} {v:.1f}" for k, v in eng["mc_step_ms"].items()))
    if eng["attention_s"] is not None:
        print(f"engine torch attention: {eng['attention_s']:.2f} s = {100 * eng['attention_share_of_mc']:.0f}% of the "
              f"MC phase, {100 * eng['attention_share_of_forward']:.0f}% of the forward (its decode rows read "
              f"{eng['mc_attention']['read_over_ideal'] or float('nan'):.2f}x the KV of every page once)")
    prof = report["engine_profile"]
    if prof:
        print(f"profiled {prof['steps']} MC steps: attention {100 * prof['attention_share']:.0f}% of op time "
              f"({', '.join(f'{k} {v:.2f}s' for k, v in list(prof['attention_top_ops_s'].items())[:4])}); matmuls "
              f"outside it {100 * prof['matmul_share']:.0f}%")
    print(f"{'method':<26}{'MC s':>8}{'tok/s':>8}{'generated':>11}{'sampled':>9}{'prefill':>9}{'cached':>9}"
          f"{'forward':>9}{'engine x':>10}")
    for name, x in r.items():
        print(f"{name:<26}{x['mc_s']:>8.1f}{x['mc_tokens_per_s']:>8.0f}{x['mc_generated_tokens']:>11}"
              f"{x['mc_sampled_tokens']:>9}{x['mc_prefill_tokens']:>9}{x['mc_cached_tokens']:>9}"
              f"{x['mc_forward_tokens']:>9}{x['mc_s'] / eng['mc_s']:>9.2f}x")
    print("generated: rollout tokens the workload needs; sampled: drawn (a padded chunk runs its longest rollout); "
          "forward: positions the model ran (prefill + tokens fed back)")
    print(f"engine tok/s / best HF tok/s ({s['best_hf']}): {s['engine_speedup_over_best_hf']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="HF config.json (default: the built-in tiny model)")
    ap.add_argument("--model", default=None,
                    help="a checkpoint folder with a chat-template tokenizer: real prompts and responses, the engine "
                         "against three batchings of transformers' generate (CPU)")
    ap.add_argument("--prompts", type=int, default=None, help="default: 2 (random weights), 6 (--model)")
    ap.add_argument("--responses", type=int, default=None, help="per prompt; default: 8 (random weights), 1 (--model)")
    ap.add_argument("--prompt-len", type=int, default=48, help="random prompts' length (not with --model)")
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--state-every", type=int, default=16)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--temperature", type=float, default=None, help="default: 1.0 (random weights), 0.6 (--model)")
    ap.add_argument("--profile-steps", type=int, default=6,
                    help="--model: MC steps profiled with torch.profiler (a repeat of the MC phase; 0: none)")
    ap.add_argument("--profile-skip", type=int, default=8, help="--model: MC steps run before the profiled ones")
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
    ap.add_argument("--out", default=None,
                    help="default: bench/results/branching.json (random weights), branching-model.json (--model)")
    args = ap.parse_args(argv)
    mode = MODEL_DEFAULTS if args.model else RANDOM_DEFAULTS
    for name, value in mode.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model:
        report = run_model(args)
        write_report(report, args.out)
        return report
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
    write_report(report, args.out)
    return report


RANDOM_DEFAULTS = {"prompts": 2, "responses": 8, "temperature": 1.0,
                   "out": "bench/results/branching.json"}
# --model: 6 prompts x 1 response of 64 tokens, states every 16, K=9: 24 states, 216 rollouts, 8,640 MC tokens
# (about 5 minutes on 2 cores, most of it transformers' per-state calls)
MODEL_DEFAULTS = {"prompts": 6, "responses": 1, "temperature": 0.6,
                  "out": "bench/results/branching-model.json"}


def write_report(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
