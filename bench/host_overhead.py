"""Host time of one Engine step, with the model body stubbed out (or, on a GPU, the real model).

    python -m bench.host_overhead                           # CPU: stubbed body, every workload
    python -m bench.host_overhead --rows 256 --new-tokens 32
    python -m bench.host_overhead --real-model --config path/to/config.json   # GPU: host vs device
    python -m bench.host_overhead --overlap                 # CPU: overlap off/on under a simulated device time
    python -m bench.host_overhead --real-model --overlap --config path/to/config.json  # GPU: overlap off/on

Why: a VinePPO step is wide (56 MC states x K=9 = 504 rows decoding together) and a 1.1B
forward for it takes a few ms on an H100. Everything the engine does around the forward
(schedule, metadata, sampling, stop checks) adds to that, because host and device do not
overlap. With the body stubbed to return zeros of the right shape, the only work left is
the engine's own: what this bench times.

Workloads (T 0.6, top-p 0.9, ignore_eos, `--new-tokens` tokens each):
- plain: `--rows` prompts of 16 random tokens, one sample each (a wide decode batch);
- mc: the MC phase shape: `--episodes` trajectories are generated first, then
  `--states` states (prompt + a prefix of a trajectory, spread over the episodes) with
  n=`--k` rollouts each; only the MC call is timed;
- mc+stop: the same with VinePPO's stop string;
- mc+stop+seed: the same with one seed per state.

Reported per workload: host ms per step (wall time of the timed generate call over its
forward steps), us per sampled row, and the split between schedule, prepare (metadata),
forward, sample and postprocess (finish and stop checks) from `engine.step_times`. The
best of `--repeats` runs is kept. With `--real-model` (CUDA, random weights of `--config`)
every workload runs twice, with the real body and then stubbed: the first gives the step's
wall time (device + host, which do not overlap), the second its host share, and their
difference the device time per step.

--overlap (issue 27): the Engine's overlap off and on. On a CPU the stubbed body sleeps D ms per
forward (a sleep releases the GIL, as a device does) for D = 0, D = the host time measured at
D = 0, and D = 3 x host; overlap hides the host's time behind D, so the bound per step is
max(host, D) instead of host + D. Targets: overlap <= 0.65 x serial at D = host, <= 1.15 x D at
D = 3 x host, and <= 1.10 x serial at D = 0 (the worker thread's cost). They are checked on the
steady pace, ms per step from the end of the first step to the end of the last
(`engine.step_times.steady_step_s()`), because a generate call's set-up, first step (admission
and prefill) and teardown are not steps that overlap can hide; the same ratio over the whole
call is printed beside it. D is the sleep's measured length (it overshoots by ~0.1 ms). With
--real-model (CUDA) each workload runs with the real body, overlap off and on, and stubbed (the
host's share). --free-sampler replaces sampling by an argmax: what the steps would take if the
sampler cost nothing (on a CPU it runs on the worker, between one step's forward and the next).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from engine import Engine, SamplingParams
from bench.branching import build_model
from engine.model import Transformer
from engine.model.tiny import char_tokenizer

STOP = ("\n\n\nProblem:",)  # VinePPO's stop string for GSM8K / MATH
TARGET_MS = 4.0             # issue 12: host ms per step at 504-512 rows on the 2-core CPU
PHASES = ("schedule", "prepare", "forward", "sample", "postprocess", "wait")
# (label, D as a multiple of the measured host ms per step, the bound checked, its limit)
OVERLAP_POINTS = (("D=0", 0.0, "overlap/serial", 1.10), ("D=host", 1.0, "overlap/serial", 0.65),
                  ("D=3xhost", 3.0, "overlap/D", 1.15))


def stub_body(model: Transformer, device_ms: float = 0.0) -> None:
    """Replace the backbone's forward by zeros of the right shape (the LM head stays real);
    device_ms > 0 sleeps that long inside it, a simulated device that releases the GIL.

    model.stub_slept holds the sleeps' running totals ({"seconds", "calls"}): a sleep overshoots
    its request (by about 0.1 ms here), and the simulated device's time is what it really slept."""
    body = model.model
    hidden = model.config.hidden_size
    weight = model.lm_head_weight
    slept = {"seconds": 0.0, "calls": 0}

    def zeros(input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        if device_ms > 0:
            t0 = time.perf_counter()
            time.sleep(device_ms / 1e3)
            slept["seconds"] += time.perf_counter() - t0
            slept["calls"] += 1
        return torch.zeros(1, input_ids.shape[1], hidden, dtype=weight.dtype, device=weight.device)

    body.forward = zeros
    model.stub_slept = slept  # (run_once reads each run's own share)


def pace(run: dict) -> float:
    """A run's ms per step: its steady pace, or the whole call's when it was too short to have one."""
    steady = run.get("steady_ms_per_step")
    return steady if steady is not None else run["host_ms_per_step"]


def free_sampling() -> None:
    """What-if for --free-sampler: the Engine's sampling becomes an argmax (no temperature, cut or
    draw), so a run shows what the step would be if sampling cost nothing."""
    import engine.runtime.engine as engine_module

    def argmax_sample(logits, batch, *, candidates=256, ids_out=None, backend="auto"):
        token = logits.argmax(-1)
        if ids_out is not None:
            ids_out.append(token)
        tokens = token.tolist()
        return tokens, ([0.0] * len(tokens) if batch.want_logprobs else None)

    engine_module.sample = argmax_sample


def build(args) -> tuple[Transformer, object]:
    """The model (random weights of --config, or the built-in tiny one) and the char tokenizer.

    The char tokenizer serves the stop strings for any vocabulary (other ids decode to nothing).
    """
    device = "cuda" if args.real_model else args.device  # --real-model stubs the body later, for the host share
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = build_model(args.config, device, dtype, seed=0)
    if not args.real_model:
        stub_body(model)
    return model, char_tokenizer()


def make_engine(model, tok, args, overlap: bool = False) -> Engine:
    rows = max(args.rows, args.states * args.k)
    return Engine(model, tok, page_size=args.page_size, max_num_seqs=rows, max_batch_tokens=args.max_batch_tokens,
                  kv_cache_tokens=args.kv_cache_tokens, attention_backend=args.attention_backend, overlap=overlap)


def sync(model) -> None:
    if model.lm_head_weight.is_cuda:
        torch.cuda.synchronize()


def workload_requests(name: str, engine: Engine, args, rng: torch.Generator):
    """(prompts, params) of the timed call; runs the untimed set-up (trajectories) itself."""
    vocab = min(engine.config.vocab_size, len(engine.tokenizer)) if engine.tokenizer else engine.config.vocab_size
    base = dict(temperature=0.6, top_p=0.9, max_new_tokens=args.new_tokens, ignore_eos=True)
    if name == "plain":
        prompts = [torch.randint(4, vocab, (16,), generator=rng).tolist() for _ in range(args.rows)]
        return prompts, SamplingParams(**base)
    episodes = [torch.randint(4, vocab, (args.prompt_len,), generator=rng).tolist() for _ in range(args.episodes)]
    responses = engine.generate(episodes, SamplingParams(**base, seed=1).per_prompt(len(episodes)))
    per_episode = -(-args.states // args.episodes)
    cuts = [round(i * args.new_tokens / per_episode) for i in range(per_episode)]
    states = [episodes[e] + responses[e][0].token_ids[:c] for e in range(args.episodes) for c in cuts][:args.states]
    extra = {}
    if "stop" in name:
        extra["stop"] = STOP
    params = SamplingParams(n=args.k, **base, **extra)
    if "seed" in name:
        return states, [SamplingParams(n=args.k, **base, **extra, seed=i) for i in range(len(states))]
    return states, params


def run_once(name: str, model, tok, args, overlap: bool = False) -> dict:
    engine = make_engine(model, tok, args, overlap)
    rng = torch.Generator().manual_seed(args.seed)
    prompts, params = workload_requests(name, engine, args, rng)
    engine.stats.reset()
    times = getattr(engine, "step_times", None)
    if times is not None:
        times.reset()
    slept = getattr(model, "stub_slept", None)
    slept_before = dict(slept) if slept is not None else None
    sync(model)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(model)
    wall = time.perf_counter() - t0
    steps = engine.stats.forward_steps
    rows = sum(len(c.token_ids) for group in outs for c in group)
    steady = times.steady_step_s() if times is not None else None
    row = {"workload": name, "wall_s": wall, "steps": steps, "sampled_rows": rows,
           "rows_per_step": rows / steps, "host_ms_per_step": 1e3 * wall / steps,
           "steady_ms_per_step": None if steady is None else 1e3 * steady,
           "us_per_row": 1e6 * wall / rows, "prefill_tokens": engine.stats.prefill_tokens,
           "cached_tokens": engine.stats.cached_tokens, "evicted_tokens": engine.stats.evicted_tokens,
           "preemptions": engine.stats.preemptions, "overlap": overlap,
           "overlap_wasted_rows": engine.stats.overlap_wasted_rows}
    if times is not None:
        row["phases_ms_per_step"] = {k: 1e3 * v / max(times.steps, 1) for k, v in times.as_dict().items()
                                     if k != "steps"}
    if slept is not None and slept["calls"] > slept_before["calls"]:  # this run's simulated device ms per forward
        row["device_slept_ms"] = 1e3 * (slept["seconds"] - slept_before["seconds"]) / (slept["calls"] - slept_before["calls"])
    return row


def device_bound_ms(rows: int, context: int) -> float:
    """DESIGN.md's bound for a 1.1B Llama (bf16, 22 layers, 4 KV heads of 64) decode step on an H100."""
    params, layers, kv_heads, head_dim = 1.1e9, 22, 4, 64
    kv_bytes = 2 * layers * kv_heads * head_dim * 2 * rows * context
    return 1e3 * max((params * 2 + kv_bytes) / 3.35e12, 2 * params * rows / 989e12)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=None, help="default: plain,mc,mc+stop,mc+stop+seed "
                    "(with --overlap: plain,mc,mc+stop+seed)")
    ap.add_argument("--rows", type=int, default=512, help="rows of the plain workload")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--states", type=int, default=56)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--attention-backend", choices=("auto", "torch", "triton"), default="auto")
    ap.add_argument("--device", default="cpu", help="device of the stubbed run (cpu or cuda)")
    ap.add_argument("--real-model", action="store_true", help="CUDA: keep the model body (host vs device time)")
    ap.add_argument("--config", default=None, help="HF config.json of the model (default: the built-in tiny model)")
    ap.add_argument("--overlap", action="store_true", help="overlap off vs on (CPU: under a simulated device time)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; with --overlap on a CPU: 1, so the worker "
                    "thread, which stands for the device, and the host thread get a core each)")
    ap.add_argument("--free-sampler", action="store_true",
                    help="what-if: sampling replaced by an argmax (the step if sampling cost nothing)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/host_overhead.json")
    args = ap.parse_args(argv)
    for name in ("rows", "new_tokens", "episodes", "states", "k", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.states < args.episodes:
        ap.error(f"--states ({args.states}) must be >= --episodes ({args.episodes})")
    if args.real_model and not torch.cuda.is_available():
        ap.error("--real-model needs a CUDA device")
    names = (args.workloads or ("plain,mc,mc+stop+seed" if args.overlap else "plain,mc,mc+stop,mc+stop+seed")).split(",")
    bad = [n for n in names if n not in ("plain", "mc", "mc+stop", "mc+stop+seed")]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from plain, mc, mc+stop, mc+stop+seed")
    if args.threads is None and args.overlap and not args.real_model:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.free_sampler:
        free_sampling()
    model, tok = build(args)

    def best(name: str, overlap: bool = False, by=lambda r: r["host_ms_per_step"]) -> dict:
        """The fastest of --repeats runs, by the whole call's ms per step unless told otherwise."""
        return min((run_once(name, model, tok, args, overlap) for _ in range(args.repeats)), key=by)

    if args.overlap:
        return overlap_report(args, names, model, best)

    real = {name: best(name) for name in names} if args.real_model else {}
    if args.real_model:
        stub_body(model)  # then the same workloads with the body stubbed: the host's share of a step
    results = []
    for name in names:
        row = best(name)
        if name in real:
            row["real_ms_per_step"] = real[name]["host_ms_per_step"]
            row["device_ms_per_step"] = row["real_ms_per_step"] - row["host_ms_per_step"]
            row["real_phases_ms_per_step"] = real[name].get("phases_ms_per_step")
        results.append(row)
    device = torch.cuda.get_device_name() if model.lm_head_weight.is_cuda else "cpu"
    mode = "real model" if args.real_model else "model body stubbed (zeros)"
    print(f"\nEngine host overhead on {device}, {mode}, vocab {model.config.vocab_size}, best of {args.repeats}; "
          f"target {TARGET_MS} ms/step; a 1.1B forward at 504 rows x 160 tokens is >= "
          f"{device_bound_ms(504, 160):.2f} ms on an H100 (DESIGN.md bound)")
    head = f"{'workload':<14}{'steps':>7}{'rows/step':>10}{'ms/step':>9}{'us/row':>8}{'vs target':>10}"
    has_phases = all("phases_ms_per_step" in r for r in results)
    if has_phases:
        head += "".join(f"{p:>13}" for p in PHASES)
    print(head)
    for r in results:
        line = (f"{r['workload']:<14}{r['steps']:>7}{r['rows_per_step']:>10.1f}{r['host_ms_per_step']:>9.2f}"
                f"{r['us_per_row']:>8.2f}{r['host_ms_per_step'] / TARGET_MS:>9.2f}x")
        if has_phases:
            line += "".join(f"{r['phases_ms_per_step'].get(p, 0.0):>13.2f}" for p in PHASES)
        if "real_ms_per_step" in r:
            line += f"   real model {r['real_ms_per_step']:.2f} ms/step = device ~{r['device_ms_per_step']:.2f} + host"
        print(line)
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "mode": mode, "args": vars(args),
              "target_ms_per_step": TARGET_MS, "device_bound_ms_1b1_504rows": device_bound_ms(504, 160),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def overlap_report(args, names: list[str], model, best) -> dict:
    """Overlap off vs on: a simulated device time on a CPU, the real body on CUDA (see the module doc)."""
    rows = []
    for name in names:
        if args.real_model:
            real_serial, real_overlap = best(name, False), best(name, True)
            stub_body(model)
            stub = best(name, False)
            build_real(model)
            # The host's bookkeeping: the stubbed step less what its worker part spent (the LM head,
            # the sampler's kernels and the wait for its tokens are device time).
            host = stub["host_ms_per_step"] - stub["phases_ms_per_step"]["forward"] \
                - stub["phases_ms_per_step"]["sample"]
            serial, overlapped = real_serial["host_ms_per_step"], real_overlap["host_ms_per_step"]
            device = max(serial - host, 0.0)
            rows.append(dict(workload=name, point="real", host_ms=host, device_ms=device, serial_ms=serial,
                             overlap_ms=overlapped, bound_ms=max(host, device), ratio=overlapped / serial,
                             vs_cpu_bound=overlapped / max(host, device),
                             wasted_rows=real_overlap["overlap_wasted_rows"], steps=real_overlap["steps"]))
            continue
        # CPU: the steady pace (ms per step after the first: `StepTimes.steady_step_s`) is what the targets
        # check; the whole call's ms per step (its set-up, first step and teardown included) is shown beside it.
        stub_body(model)
        base = best(name, False, pace)
        host = pace(base)
        # The worker's own compute (the LM head, the sampler, the step's tensors): device time on a
        # GPU, but CPU time here, so a step cannot beat max(host - worker, D + worker).
        worker = base["phases_ms_per_step"]["forward"] + base["phases_ms_per_step"]["sample"]
        for point, times, check, limit in OVERLAP_POINTS:
            d = times * host
            stub_body(model, d)
            serial = best(name, False, pace)
            overlapped = best(name, True, pace)
            d_slept = overlapped.get("device_slept_ms", 0.0)  # the simulated device's ms per step, in that very run
            s, o = pace(serial), pace(overlapped)
            s_call, o_call = serial["host_ms_per_step"], overlapped["host_ms_per_step"]
            value = o / s if check == "overlap/serial" else o / d_slept
            call_value = o_call / s_call if check == "overlap/serial" else o_call / d_slept
            rows.append(dict(workload=name, point=point, host_ms=host, host_call_ms=base["host_ms_per_step"],
                             worker_ms=worker, device_ms=d, device_slept_ms=d_slept, serial_ms=s, overlap_ms=o,
                             serial_call_ms=s_call, overlap_call_ms=o_call, bound_ms=max(host, d_slept),
                             cpu_bound_ms=max(host - worker, d_slept + worker), ratio=o / s, check=check,
                             value=value, call_value=call_value, limit=limit, met=value <= limit,
                             wasted_rows=overlapped["overlap_wasted_rows"], steps=overlapped["steps"]))
        stub_body(model)
    device = torch.cuda.get_device_name() if model.lm_head_weight.is_cuda else "cpu"
    mode = "real model" if args.real_model else "model body stubbed, a sleep of D ms per forward"
    if args.free_sampler:
        mode += "; what-if: sampling replaced by an argmax"
    print(f"\nEngine overlap on {device}, {mode}, best of {args.repeats}, torch threads {torch.get_num_threads()}; "
          f"ms per step")
    if args.real_model:
        print(f"{'workload':<14}{'host':>7}{'device':>8}{'serial':>8}{'overlap':>8}{'bound':>7}{'ov/serial':>10}"
              f"{'ov/bound':>9}{'wasted':>7}")
        for r in rows:
            print(f"{r['workload']:<14}{r['host_ms']:>7.2f}{r['device_ms']:>8.2f}{r['serial_ms']:>8.2f}"
                  f"{r['overlap_ms']:>8.2f}{r['bound_ms']:>7.2f}{r['ratio']:>10.2f}{r['vs_cpu_bound']:>9.2f}"
                  f"{r['wasted_rows']:>7}")
    else:
        print("Steady pace (after the first step). host: the serial step at D = 0; worker: what the worker thread "
              "computes per step at D = 0 (LM head, sampler, the step's tensors: device time on a GPU, CPU time "
              "here), so the CPU bound is max(host - worker, D + worker); D slept: the sleep's real length. "
              "whole call: the same check on ms per step of the whole generate call (set-up, first step and "
              "teardown included)")
        print(f"{'workload':<14}{'point':>9}{'host':>6}{'worker':>7}{'D':>6}{'D slept':>8}{'serial':>7}"
              f"{'overlap':>8}{'cpu bound':>10}{'check':>22}{'target':>9}{'met':>5}{'whole call':>11}{'wasted':>7}")
        for r in rows:
            print(f"{r['workload']:<14}{r['point']:>9}{r['host_ms']:>6.2f}{r['worker_ms']:>7.2f}{r['device_ms']:>6.2f}"
                  f"{r['device_slept_ms']:>8.2f}{r['serial_ms']:>7.2f}{r['overlap_ms']:>8.2f}{r['cpu_bound_ms']:>10.2f}"
                  f"{r['check'] + ' ' + format(r['value'], '.2f'):>22}{'<= ' + format(r['limit'], '.2f'):>9}"
                  f"{'yes' if r['met'] else 'NO':>5}{r['call_value']:>11.2f}{r['wasted_rows']:>7}")
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "mode": mode, "args": vars(args),
              "targets": {p: {"check": c, "limit": l} for p, _, c, l in OVERLAP_POINTS}, "overlap": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def build_real(model: Transformer) -> None:
    """Give a stubbed model its real backbone forward back (stub_body set an instance attribute)."""
    model.model.__dict__.pop("forward", None)


if __name__ == "__main__":
    main()
