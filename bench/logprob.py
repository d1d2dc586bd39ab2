"""Per-token log-probs of an LM head, forward + backward: fused vs materialised vs Liger.

    python -m bench.logprob            # GPU: N in {4k, 16k, 32k}, d in {1k, 2k, 4k}, V in {32k, 152k}, bf16
    python -m bench.logprob --quick    # small sizes (automatic without CUDA: the torch reference twin)

Every method runs loss = -sum(log p(target)) and its backward on the same inputs in the same
process. Time is the median of the timed repeats; peak extra memory is the peak during one
forward + backward minus what was allocated before it (inputs), so it includes the gradients
of hidden and weight for every method. On CPU, memory is the process's resident-set
high-water mark (reset through /proc/self/clear_refs), an approximation. Liger-Kernel's fused
linear cross-entropy (a scalar loss, the gradients computed in its forward) runs when it is
importable and on CUDA. Temperature is 1 for all methods (it does not change the cost).
Results: a table on stdout and JSON in bench/results/logprob.json.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from engine.kernels import fused_logprobs, fused_logprobs_reference

FULL = dict(n=[4096, 16384, 32768], d=[1024, 2048, 4096], v=[32000, 151936])
QUICK = dict(n=[512, 2048], d=[128], v=[8192, 32768])
TARGET_SIZE = (16384, 2048, 151936)  # the targets: memory <= 1/10 of torch, time <= Liger
OUT = Path(__file__).resolve().parent / "results" / "logprob.json"


def materialised(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The baseline: full [N, V] logits in fp32, then log_softmax and gather."""
    logits = (h @ w.T).float()
    return -torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).sum()


def liger_loss() -> tuple[Callable | None, str]:
    """Liger's fused linear cross-entropy as loss(h, w, t), or None and the reason."""
    if not torch.cuda.is_available():
        return None, "skipped: needs CUDA"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None, "skipped: liger-kernel not importable"
    module = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return (lambda h, w, t: module(w, h, t)), ""


def methods(device: torch.device) -> dict[str, tuple[Callable | None, str]]:
    if device.type == "cuda":
        fused = (lambda h, w, t: -fused_logprobs(h, w, t).sum()), ""
    else:  # what CPU training runs (the interpreter would be far too slow at these sizes)
        fused = (lambda h, w, t: -fused_logprobs_reference(h, w, t).sum()), "torch reference twin (CPU)"
    return {"torch": ((lambda h, w, t: materialised(h, w, t)), ""), "fused": fused, "liger": liger_loss()}


# ------------------------------------------------------------------ measurement


class Memory:
    """Peak bytes allocated during a call, beyond what was allocated before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and os.access("/proc/self/clear_refs", os.W_OK)

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.cpu_ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status_kb("VmRSS:")

    def peak_extra(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status_kb("VmHWM:") - self.base if self.cpu_ok else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, repeats: int) -> tuple[float, int | None]:
    """(median seconds, peak extra bytes) of loss + backward; the first call is a warm-up."""
    device = h.device
    mem = Memory(device)
    times, peak = [], None
    for i in range(repeats + 1):
        h.grad = w.grad = None
        if i == 1:
            mem.start()
        sync(device)
        t0 = time.perf_counter()
        fn(h, w, t).backward()
        sync(device)
        if i == 1:
            peak = mem.peak_extra()
        if i > 0:
            times.append(time.perf_counter() - t0)
    h.grad = w.grad = None
    return statistics.median(times), peak


def run(sizes: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    table = methods(device)
    grid = list(itertools.product(sizes["n"], sizes["d"], sizes["v"]))
    rows = []
    bar = tqdm(total=len(grid) * len(table), desc="logprob bench", unit="run")
    for n, d, v in grid:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(n, d, device=device, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(v, d, device=device, generator=g) / d**0.5).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=device, generator=g)
        for name, (fn, note) in table.items():
            bar.set_postfix_str(f"N={n} d={d} V={v} {name}")
            row = dict(method=name, n=n, d=d, v=v, time_ms=None, peak_extra_mb=None, status=note or "ok")
            if fn is not None:
                try:
                    seconds, peak = measure(fn, h, w, t, repeats)
                    row.update(time_ms=seconds * 1e3, peak_extra_mb=None if peak is None else peak / 2**20)
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                    h.grad = w.grad = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            bar.update()
        del h, w, t
    bar.close()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """time and memory of each method relative to the materialised torch baseline."""
    base = {(r["n"], r["d"], r["v"]): r for r in rows if r["method"] == "torch"}
    for r in rows:
        b = base[(r["n"], r["d"], r["v"])]
        for key, ratio in (("time_ms", "time_vs_torch"), ("peak_extra_mb", "mem_vs_torch")):
            ok = r[key] is not None and b[key]
            r[ratio] = r[key] / b[key] if ok else None


def check_targets(rows: list[dict]) -> dict:
    """The issue's targets at N=16k, d=2048, V=152k (full mode only)."""
    n, d, v = TARGET_SIZE
    at = {r["method"]: r for r in rows if (r["n"], r["d"], r["v"]) == (n, d, v)}
    if "fused" not in at:
        return {"size": list(TARGET_SIZE), "memory": "n/a (size not run)", "time": "n/a (size not run)"}
    fused, torch_row, liger = at["fused"], at["torch"], at.get("liger", {})
    memory = "n/a"
    if fused.get("peak_extra_mb") and torch_row.get("peak_extra_mb"):
        ratio = fused["peak_extra_mb"] / torch_row["peak_extra_mb"]
        memory = f"{'PASS' if ratio <= 0.1 else 'FAIL'}: fused/torch peak extra = {ratio:.3f} (target <= 0.1)"
    elif torch_row.get("status") == "OOM" and fused.get("peak_extra_mb"):
        memory = "PASS: torch ran out of memory, fused did not"
    time_ = f"n/a (liger {liger.get('status', 'not run')})"
    if fused.get("time_ms") and liger.get("time_ms"):
        ratio = fused["time_ms"] / liger["time_ms"]
        time_ = f"{'PASS' if ratio <= 1.0 else 'FAIL'}: fused/liger time = {ratio:.2f} (target <= 1)"
    return {"size": list(TARGET_SIZE), "memory": memory, "time": time_}


def fmt(x: float | None, width: int, digits: int) -> str:
    return "-".rjust(width) if x is None else f"{x:{width}.{digits}f}"


def print_table(rows: list[dict]) -> None:
    head = f"{'N':>6} {'d':>5} {'V':>7}  {'method':<6} {'time ms':>9} {'peak MB':>9} {'t/torch':>7} {'m/torch':>7}  status"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['n']:>6} {r['d']:>5} {r['v']:>7}  {r['method']:<6} {fmt(r['time_ms'], 9, 1)} "
            f"{fmt(r['peak_extra_mb'], 9, 1)} {fmt(r['time_vs_torch'], 7, 2)} {fmt(r['mem_vs_torch'], 7, 3)}  {r['status']}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (automatic without CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output path")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmuls are slow and unrepresentative
    repeats = args.repeats or (1 if quick else 5)
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    rows = run(QUICK if quick else FULL, device, dtype, repeats)
    result = dict(
        mode="quick" if quick else "full",
        device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
        repeats=repeats,
        rows=rows,
        targets=check_targets(rows) if not quick else "not checked in quick mode",
    )
    print(f"\n{result['mode']} mode on {result['device']} ({result['dtype']}), median of {repeats} repeats")
    print_table(rows)
    print(f"targets: {json.dumps(result['targets'], indent=1)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
