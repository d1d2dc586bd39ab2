"""Fewer kernels per decoder layer: fused residual add + RMSNorm, fused q/k/v and gate/up.

    python -m bench.norm            # CUDA when available, else the CPU (the kernels' torch twins)
    python -m bench.norm --quick    # fewer sizes and repeats

Two figures, both from this process:

1. Time of one residual add + RMSNorm, bf16, at the presets' hidden sizes (2048: Llama-1.1B,
   1536: Qwen2.5-1.5B) and decode-sized row counts: `engine.kernels.fused_add_rms_norm` (one Triton
   kernel on CUDA) against what the model ran before (`x + residual`, then the RMSNorm
   module's torch ops), as a ratio, with the fused kernel's share of the HBM bound (it
   reads x and residual and writes the output and the new residual: 4 * rows * hidden * 2 B).
   On the CPU both sides are torch ops (the twin is the same arithmetic), so the ratio only
   shows the host overhead of the public op's checks.
2. Launches per decoder layer in the eager decode path (one new token per row), before (the
   previous layer code: separate q/k/v and gate/up matmuls, add then RMSNorm) and after
   (`DecoderLayer.forward_fused`). Counted as the aten compute ops a layer dispatches (views,
   reshapes and allocations excluded: they launch nothing) plus one per fused norm kernel;
   on CUDA each such op is one kernel launch. Attention is left out: a stub stands in for
   the backend, which is the same before and after (store_kv + decode attention: two
   launches with the Triton backend). With CUDA the profiler's kernel count is reported too.

Results: a table on stdout and JSON in bench/results/norm.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import engine.model.transformer as tr
from engine.model import Transformer, tiny_config
from engine.model.rope import apply_rope
from engine.kernels.rmsnorm import fused_add_rms_norm

OUT = Path(__file__).resolve().parent / "results" / "norm.json"
HIDDEN = (2048, 1536)
ROWS = (1, 64, 504)  # one sequence, a decode batch, an RL step (K=9 rollouts x ~56 states)
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
# Families at the presets' structure (bias or not), shrunk: op counts do not depend on sizes.
FAMILIES = {"llama (Llama-1.1B)": dict(), "qwen2 (Qwen2.5-1.5B)": dict(model_type="qwen2", qkv_bias=True)}
METADATA_OPS = {"_unsafe_view", "empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense"}


# --------------------------------------------------------------------------- timing


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def median_us(fn: Callable[[], object], reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    return median_us


def time_add_norm(device: torch.device, hidden: tuple[int, ...], rows: tuple[int, ...], reps: int) -> list[dict]:
    median_us = _timer(device)
    bound = next((v for k, v in HBM_BYTES_PER_S.items() if device.type == "cuda"
                  and k in torch.cuda.get_device_name(device)), None)
    out = []
    g = torch.Generator().manual_seed(0)
    for n in hidden:
        norm = tr.RMSNorm(n, 1e-6).to(device=device, dtype=torch.bfloat16)
        for m in rows:
            x = torch.randn(m, n, generator=g).to(device=device, dtype=torch.bfloat16)
            r = torch.randn(m, n, generator=g).to(device=device, dtype=torch.bfloat16)

            def unfused():
                s = x + r
                return norm(s), s

            with torch.no_grad():
                t_unfused = median_us(unfused, reps)
                t_fused = median_us(lambda: fused_add_rms_norm(x, r, norm.weight, norm.eps), reps)
            row = dict(hidden=n, rows=m, unfused_us=round(t_unfused, 2), fused_us=round(t_fused, 2),
                       speedup=round(t_unfused / t_fused, 2))
            if bound is not None:
                row["fused_hbm_fraction"] = round(4 * m * n * 2 / (t_fused * 1e-6) / bound, 3)
            out.append(row)
    return out


# --------------------------------------------------------------------------- launch counts


class _OpCounter(TorchDispatchMode):
    """Counts the aten compute ops dispatched while active (views and allocations excluded)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in METADATA_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def one_launch(self, label: str):
        """Count a call as one launch whatever it runs inside (a Triton kernel, or its twin on CPU)."""
        self.ops[label] += 1
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def old_layer(layer: tr.DecoderLayer, x: torch.Tensor, cos, sin, ctx) -> torch.Tensor:
    """The decoder layer as it was before the fusions (separate projections, add then norm)."""
    a, m = layer.self_attn, layer.mlp
    h = layer.input_layernorm(x)
    b, t, _ = h.shape
    q = a.q_proj(h).view(b, t, -1, a.head_dim)
    k = a.k_proj(h).view(b, t, -1, a.head_dim)
    v = a.v_proj(h).view(b, t, -1, a.head_dim)
    if a.qk_norm:
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    x = x + a.o_proj(ctx(a.layer, q, k, v).reshape(b, t, -1))
    h = layer.post_attention_layernorm(x)
    return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


def count_launches(device: torch.device, rows: int = 32) -> dict[str, dict]:
    out = {}
    for family, overrides in FAMILIES.items():
        cfg = tiny_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, **overrides)
        model = Transformer(cfg).init_weights(0).to(device=device, dtype=torch.bfloat16).eval()
        layer, next_norm = model.model.layers[0], model.model.layers[1].input_layernorm
        x = torch.randn(1, rows, cfg.hidden_size, device=device).to(torch.bfloat16)
        cos, sin = tr.rope_cos_sin(model.model.inv_freq, model.model.rope_scale,
                                   torch.arange(rows, device=device)[None], x.dtype)
        counter = _OpCounter()

        def ctx(layer_idx, q, k, v):  # the attention backend: the same before and after, left out
            with counter.one_launch("attention (not counted)"):
                return torch.zeros_like(q)

        def add_norm(x, residual, norm, _real=tr._add_rms_norm):
            with counter.one_launch("fused_add_rms_norm"):
                return _real(x, residual, norm)

        h = layer.input_layernorm(x)
        with torch.no_grad(), _patched(tr, "_add_rms_norm", add_norm):
            runs = {"before": lambda: old_layer(layer, x, cos, sin, ctx),
                    "after": lambda: layer.forward_fused(h, x, cos, sin, ctx, next_norm)}
            result = {}
            for when, run in runs.items():
                counter.ops.clear()
                with counter:
                    run()
                ops = {k: v for k, v in counter.ops.items() if k != "attention (not counted)"}
                result[when] = dict(launches=sum(ops.values()), ops=dict(sorted(ops.items())))
                if device.type == "cuda":
                    result[when]["cuda_kernels_profiled"] = _profiled_kernels(run)
        out[family] = result
    return out


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _profiled_kernels(run: Callable[[], object]) -> int:
    """CUDA kernels one call launches, from torch.profiler (the attention stub's zeros included)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.lower().startswith(("memcpy", "memset")))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one hidden size, two row counts, few repeats")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per case (default 200 on CUDA, 20 on CPU)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or (10 if args.quick else 200 if device.type == "cuda" else 20)
    hidden, rows = ((HIDDEN[0],), ROWS[:2]) if args.quick else (HIDDEN, ROWS)
    timing = time_add_norm(device, hidden, rows, reps)
    launches = count_launches(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = dict(device=name, torch=torch.__version__, add_norm=timing, launches_per_layer=launches)

    print(f"residual add + RMSNorm, bf16, on {name} ({'Triton kernel' if device.type == 'cuda' else 'torch twin'})")
    print(f"{'hidden':>7} {'rows':>5} {'unfused us':>11} {'fused us':>9} {'speedup':>8}" +
          (f" {'HBM frac':>9}" if timing and "fused_hbm_fraction" in timing[0] else ""))
    for r in timing:
        print(f"{r['hidden']:>7} {r['rows']:>5} {r['unfused_us']:>11.1f} {r['fused_us']:>9.1f} {r['speedup']:>8.2f}" +
              (f" {r['fused_hbm_fraction']:>9.3f}" if "fused_hbm_fraction" in r else ""))
    print("\nlaunches per decoder layer, eager decode (attention excluded: same before and after)")
    for family, res in launches.items():
        line = f"  {family:<22} before {res['before']['launches']:>3}  after {res['after']['launches']:>3}"
        if "cuda_kernels_profiled" in res["after"]:
            line += (f"   (profiled CUDA kernels incl. the stub's zeros: {res['before']['cuda_kernels_profiled']}"
                     f" -> {res['after']['cuda_kernels_profiled']})")
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
