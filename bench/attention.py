"""Decode attention over the paged KV cache: Triton kernels vs torch, SDPA and FlexAttention.

    python -m bench.attention                  # GPU: the full sweeps below, bf16, Hq=32 Hkv=8 D=128, page 16
    python -m bench.attention --quick          # tiny shapes; on CPU the kernels run in the Triton interpreter
    python -m bench.attention --no-flex --only shared --shared-batch 64 256
    python -m bench.attention --no-flex --only tree

Three sweeps, each method on the same inputs in the same process:
- decode: B in {64, 256, 512} sequences, every one with context L in {512, 1024, 2048, 4096}:
  engine.kernels.decode_attention (Triton split-K) vs decode_attention_reference (torch), SDPA and
  FlexAttention (torch.compile'd flex_attention).
- shared: B = G x K rows, G groups of K in {1, 4, 9, 16} siblings sharing a prefix of
  {300, 800, 1300} tokens, each with its own suffix of 0..max_suffix (200) tokens, laid out as
  the engine forks (siblings share the prefix's full pages, own a copy of a partial last page
  and their own pages after it): engine.kernels.shared_prefix_decode_attention vs plain
  decode_attention (the speedup) vs the torch reference, SDPA and FlexAttention.
- tree: VinePPO's MC batch: E episodes x S nested states (state s = the prompt + s steps of the
  response) x K rollouts, each with its own suffix: engine.kernels.cascade_decode_attention on the
  engine's layout (engine.runtime.batch.cascade_layout: every shared page once) vs the same
  kernel capped at one level (only the prompt shared: what a one-level grouping reads) vs plain
  decode_attention. `read/ideal` is the KV each method reads over every distinct page once.

SDPA and FlexAttention get the K/V gathered into dense [B, Hkv, L, D] tensors outside the timed
region (a ragged batch adds a length mask), so their time is a lower bound for a paged design.
The L2 cache is flushed before every timed call (a model's other layers would evict it too).

Bandwidth: "needed" bytes are the K/V a decode step must read at least (every row's context
once; a shared prefix once per group), plus q and out; GB/s = needed bytes / time and the HBM
roofline is 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200), detected from the device name or set with
--hbm-tbps. Targets (printed, never asserted): decode >= 80% of HBM at B=256, L=2048;
shared-prefix >= 2x plain decode at K=16, prefix 800, suffix <= 200.
Results: a table on stdout and JSON in bench/results/attention-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
DECODE_TARGET = dict(batch=256, context=2048, hbm_fraction=0.8)
SHARED_TARGET = dict(siblings=16, prefix=800, speedup=2.0)
FULL = dict(batch=[64, 256, 512], context=[512, 1024, 2048, 4096], shared_batch=[256], siblings=[1, 4, 9, 16],
            prefix=[300, 800, 1300], max_suffix=200, episodes=[4, 11], states=5, k=9, prompt=304, step=64)
QUICK = dict(batch=[4], context=[40], shared_batch=[8], siblings=[1, 4], prefix=[21], max_suffix=12,
             episodes=[1], states=3, k=2, prompt=32, step=16)
QUICK_MODEL = dict(hq=4, hkv=2, head_dim=32, page_size=16)


# ------------------------------------------------------------------ inputs


def build_batch(num_groups: int, siblings: int, prefix: int, suffix: torch.Tensor, hq: int, hkv: int, d: int,
                page_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """A paged batch of num_groups x siblings rows; row lengths prefix + suffix[row].

    Siblings share the prefix's full pages and own the rest (a partial last prefix page is
    copied into each sibling's own page, as a KV-level fork does). Page ids are shuffled so
    that pages are scattered through the pool. prefix = 0, siblings = 1 is a plain batch.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    b = num_groups * siblings
    lens = (prefix + suffix.to(device)).int()
    full = prefix // page_size
    own = (lens.long() + page_size - 1) // page_size - full  # pages each row owns
    max_pages = full + int(own.max())
    num_pages = num_groups * full + int(own.sum())
    perm = torch.randperm(num_pages, device=device, generator=g)
    table = torch.zeros(b, max_pages, dtype=torch.long, device=device)
    if full:
        shared_ids = torch.arange(num_groups * full, device=device).view(num_groups, full)
        table[:, :full] = shared_ids.repeat_interleave(siblings, 0)
    own_start = num_groups * full + torch.cumsum(own, 0) - own
    cols = torch.arange(max_pages - full, device=device)
    table[:, full:] = torch.where(cols[None] < own[:, None], own_start[:, None] + cols[None], 0)
    page_table = perm[table].int()
    kv = torch.randn(2, num_pages * page_size, hkv, d, device=device, dtype=dtype, generator=g)
    rem = prefix % page_size
    if rem and siblings > 1:  # identical prefix rows in every sibling's copy of the partial page
        first = torch.arange(num_groups, device=device) * siblings
        offs = torch.arange(rem, device=device)
        src = page_table[first, full].long()[:, None] * page_size + offs  # [G, rem]
        for m in range(1, siblings):
            dst = page_table[first + m, full].long()[:, None] * page_size + offs
            kv[:, dst.reshape(-1)] = kv[:, src.reshape(-1)]
    q = torch.randn(b, hq, d, device=device, dtype=dtype, generator=g)
    return dict(q=q, k_cache=kv[0], v_cache=kv[1], page_table=page_table, kv_lens=lens, page_size=page_size,
                scale=1 / math.sqrt(d),
                group_offsets=(torch.arange(num_groups + 1, device=device) * siblings).int(),
                prefix_lens=torch.full((num_groups,), prefix, dtype=torch.int32, device=device))


def dense_kv(a: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """K/V gathered to [B, Hkv, Lmax, D] and a [B, 1, 1, Lmax] length mask (None if not ragged)."""
    lens = a["kv_lens"].long()
    length = int(lens.max())
    pos = torch.arange(length, device=lens.device)
    ps = a["page_size"]
    slots = a["page_table"][:, pos // ps].long() * ps + pos % ps
    valid = pos[None] < lens[:, None]
    slots = torch.where(valid, slots, 0)
    k = a["k_cache"][slots].transpose(1, 2).contiguous()
    v = a["v_cache"][slots].transpose(1, 2).contiguous()
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    return k, v, mask


def build_tree_batch(episodes: int, states: int, k: int, prompt: int, step: int, suffix: torch.Tensor, hq: int,
                     hkv: int, d: int, page_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """E episodes x S nested states x K rollouts, laid out as the engine's prefix cache shares them.

    Row (e, s, r) reads the episode's prompt pages, then the pages of the response's first s
    steps (shared by every state of the episode that extends past them), then its own pages for
    suffix[row] positions. prompt and step are whole pages. Adds the cascade layout of the tree
    (full depth and capped at one level) and the KV positions each reads.
    """
    from engine.runtime.batch import StepBatch, cascade_layout, kv_tokens_ideal, kv_tokens_read

    if prompt % page_size or step % page_size:
        raise ValueError(f"prompt ({prompt}) and step ({step}) must be whole pages of {page_size}")
    tables, lens, next_page = [], [], 0
    for _ in range(episodes):
        chain = list(range(next_page, next_page + (prompt + (states - 1) * step) // page_size))
        next_page += len(chain)
        for s in range(states):
            shared = chain[:(prompt + s * step) // page_size]
            for _ in range(k):
                n = int(suffix[len(tables)])
                own = list(range(next_page, next_page + -(-n // page_size)))
                next_page += len(own)
                tables.append(shared + own)
                lens.append(prompt + s * step + n)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, next_page * page_size, hkv, d, generator=g).to(dtype)
    a = dict(q=torch.randn(len(tables), hq, d, generator=g).to(dtype).to(device), k_cache=kv[0].to(device),
             v_cache=kv[1].to(device), page_table=table.to(device), kv_lens=kv_lens.to(device),
             page_size=page_size, scale=d ** -0.5)
    meta = StepBatch(slot_mapping=None, positions=None, num_tokens=0, decode_tables=table.numpy(),
                     decode_kv_lens=kv_lens.numpy())
    a["ideal_tokens"] = kv_tokens_ideal(meta, page_size)
    a["read_tokens"] = {"plain": int(kv_lens.sum())}
    for name, levels in (("cascade", 16), ("one-level", 1)):
        segments, starts, num_levels = cascade_layout(table, kv_lens, page_size, 16, max_levels=levels)
        a[name] = (segments.to(device), starts.to(device), num_levels)
        meta.cascade_segments, meta.suffix_starts = segments.numpy(), starts.numpy()
        a["read_tokens"][name] = kv_tokens_read(meta)
    return a


# ------------------------------------------------------------------ methods


def paged_args(a: dict) -> tuple:
    return tuple(a[k] for k in ("q", "k_cache", "v_cache", "page_table", "kv_lens", "page_size", "scale"))


def make_flex(a: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable | None, str]:
    """Compiled FlexAttention on the dense K/V with a length mask, or None and the reason."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        lens = a["kv_lens"]
        b, length = k.shape[0], k.shape[2]

        def within(bi, h, q_idx, kv_idx):
            return kv_idx < lens[bi]

        mask = create_block_mask(within, b, None, 1, length, device=str(k.device))
        flex = torch.compile(flex_attention, dynamic=False)
        q4 = a["q"][:, :, None, :]
        fn = lambda: flex(q4, k, v, block_mask=mask, scale=a["scale"], enable_gqa=True)  # noqa: E731
        fn()  # compile now, so that a failure reads "n/a" instead of aborting the sweep
        return fn, ""
    except Exception as e:  # noqa: BLE001 - any failure of an optional baseline is reported, not raised
        return None, f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def methods(a: dict, sweep: str, use_flex: bool) -> dict[str, tuple[Callable | None, str]]:
    from engine.kernels.decode_attention import decode_attention, decode_attention_reference
    from engine.kernels.shared_prefix_attention import (
        shared_prefix_decode_attention,
        shared_prefix_decode_attention_reference,
    )

    args = paged_args(a)
    table: dict[str, tuple[Callable | None, str]] = {}
    if sweep == "tree":
        from engine.kernels.shared_prefix_attention import cascade_decode_attention

        for name in ("cascade", "one-level"):
            table[name] = (lambda layout=a[name]: cascade_decode_attention(*args, *layout)), ""
        table["plain"] = (lambda: decode_attention(*args)), ""
        return table  # SDPA and FlexAttention: see the shared sweep
    group = (a["group_offsets"], a["prefix_lens"])
    if sweep == "shared":
        table["shared"] = (lambda: shared_prefix_decode_attention(*args, *group)), ""
        table["plain"] = (lambda: decode_attention(*args)), ""
        table["torch-ref"] = (lambda: shared_prefix_decode_attention_reference(*args, *group)), ""
    else:
        table["triton"] = (lambda: decode_attention(*args)), ""
        table["torch-ref"] = (lambda: decode_attention_reference(*args)), ""
    k, v, mask = dense_kv(a)
    q4 = a["q"][:, :, None, :]
    try:
        F.scaled_dot_product_attention(q4[:1], k[:1], v[:1], enable_gqa=True)
        table["sdpa"] = (
            lambda: F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=a["scale"], enable_gqa=True)
        ), ""
    except (TypeError, RuntimeError) as e:
        table["sdpa"] = None, f"n/a: {type(e).__name__}"
    if use_flex and a["q"].is_cuda:
        table["flex"] = make_flex(a, k, v)
    else:
        table["flex"] = None, "n/a: needs CUDA" if use_flex else "n/a: --no-flex"
    return table


# ------------------------------------------------------------------ measurement


class Timer:
    """Median time of fn(): CUDA events around each call, L2 flushed before it (CPU: wall clock)."""

    def __init__(self, device: torch.device, repeats: int, flush: bool):
        self.device, self.repeats = device, repeats
        on_gpu = flush and device.type == "cuda"
        self.scratch = torch.empty(256 << 20, dtype=torch.uint8, device=device) if on_gpu else None  # > L2

    def __call__(self, fn: Callable) -> float:
        fn()  # warm-up: compilation, autotuning, allocator
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                if self.scratch is not None:
                    self.scratch.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def needed_bytes(a: dict, sweep: str) -> int:
    """K/V a decode step must read (a shared prefix once per group), plus q and out."""
    q = a["q"]
    elem = q.element_size()
    per_token = 2 * a["k_cache"].shape[1] * a["k_cache"].shape[2] * elem
    tokens = int(a["kv_lens"].long().sum())
    if sweep == "tree":
        tokens = a["ideal_tokens"]
    if sweep == "shared":
        sizes = (a["group_offsets"][1:] - a["group_offsets"][:-1]).long()
        tokens -= int(((sizes - 1) * a["prefix_lens"].long()).sum())
    return tokens * per_token + 2 * q.numel() * elem


def run_config(a: dict, sweep: str, key: dict, timer: Timer, hbm: float | None, use_flex: bool) -> list[dict]:
    rows = []
    need = needed_bytes(a, sweep)
    for name, (fn, note) in methods(a, sweep, use_flex).items():
        row = dict(sweep=sweep, **key, method=name, time_us=None, gbps=None, hbm_pct=None, status=note or "ok")
        if sweep == "tree":
            row["read_over_ideal"] = a["read_tokens"][name] / a["ideal_tokens"]
        if fn is not None:
            try:
                seconds = timer(fn)
                row.update(time_us=seconds * 1e6, gbps=need / seconds / 1e9)
                if hbm:
                    row["hbm_pct"] = 100 * need / seconds / hbm
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
                torch.cuda.empty_cache()
        rows.append(row)
    base = "plain" if sweep in ("shared", "tree") else "torch-ref"
    t_base = next((r["time_us"] for r in rows if r["method"] == base), None)
    for r in rows:
        r[f"speedup_vs_{base}"] = t_base / r["time_us"] if (t_base and r["time_us"]) else None
    return rows


def run(sizes: dict, model: dict, args, device: torch.device, dtype: torch.dtype, hbm: float | None) -> list[dict]:
    timer = Timer(device, args.repeats, flush=not args.no_flush)
    use_flex = not args.no_flex
    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    print_rows([], header=True)
    if args.only in (None, "decode"):
        for b in sizes["batch"]:
            for length in sizes["context"]:
                a = build_batch(b, 1, 0, torch.full((b,), length), model["hq"], model["hkv"], model["head_dim"],
                                model["page_size"], dtype, device)
                new = run_config(a, "decode", dict(batch=b, context=length), timer, hbm, use_flex)
                print_rows(new)
                rows += new
                del a
    if args.only in (None, "shared"):
        for b in sizes["shared_batch"]:
            for k in sizes["siblings"]:
                for prefix in sizes["prefix"]:
                    groups = max(1, b // k)
                    suffix = torch.randint(0, sizes["max_suffix"] + 1, (groups * k,), generator=g)
                    a = build_batch(groups, k, prefix, suffix, model["hq"], model["hkv"], model["head_dim"],
                                    model["page_size"], dtype, device)
                    key = dict(batch=groups * k, siblings=k, prefix=prefix, max_suffix=sizes["max_suffix"])
                    new = run_config(a, "shared", key, timer, hbm, use_flex)
                    print_rows(new)
                    rows += new
                    del a
    if args.only in (None, "tree"):
        for episodes in sizes["episodes"]:
            b = episodes * sizes["states"] * sizes["k"]
            suffix = torch.randint(1, sizes["max_suffix"] + 1, (b,), generator=g)
            a = build_tree_batch(episodes, sizes["states"], sizes["k"], sizes["prompt"], sizes["step"], suffix,
                                 model["hq"], model["hkv"], model["head_dim"], model["page_size"], dtype, device)
            key = dict(batch=b, siblings=sizes["k"], prefix=sizes["prompt"], episodes=episodes,
                       states=sizes["states"], step=sizes["step"], max_suffix=sizes["max_suffix"])
            new = run_config(a, "tree", key, timer, hbm, use_flex)
            print_rows(new)
            rows += new
            del a
    return rows


# ------------------------------------------------------------------ report


def check_targets(rows: list[dict], hbm: float | None) -> dict:
    out = {}
    t = DECODE_TARGET
    hit = [r for r in rows if r["sweep"] == "decode" and r["method"] == "triton"
           and r["batch"] == t["batch"] and r["context"] == t["context"]]
    if not hit or hit[0]["time_us"] is None:
        out["decode"] = f"n/a (B={t['batch']}, L={t['context']} not run)"
    elif not hbm:
        out["decode"] = f"n/a (no HBM roofline for this device; {hit[0]['gbps']:.0f} GB/s)"
    else:
        frac = hit[0]["hbm_pct"] / 100
        verdict = "PASS" if frac >= t["hbm_fraction"] else "FAIL"
        out["decode"] = f"{verdict}: {100 * frac:.1f}% of HBM at B={t['batch']}, L={t['context']} (target >= 80%)"
    t = SHARED_TARGET
    hit = [r for r in rows if r["sweep"] == "shared" and r["method"] == "shared"
           and r["siblings"] == t["siblings"] and r["prefix"] == t["prefix"]]
    if not hit or hit[0]["speedup_vs_plain"] is None:
        out["shared"] = f"n/a (K={t['siblings']}, prefix {t['prefix']} not run)"
    else:
        s = min(r["speedup_vs_plain"] for r in hit)
        verdict = "PASS" if s >= t["speedup"] else "FAIL"
        out["shared"] = (f"{verdict}: shared-prefix {s:.2f}x plain decode at K={t['siblings']}, prefix {t['prefix']}, "
                         f"suffix <= {hit[0]['max_suffix']} (target >= 2x)")
    return out


def fmt(x: float | None, width: int, digits: int) -> str:
    return "-".rjust(width) if x is None else f"{x:{width}.{digits}f}"


def print_rows(rows: list[dict], header: bool = False) -> None:
    if header:
        head = (f"{'sweep':<7} {'B':>4} {'L/K':>5} {'prefix':>6}  {'method':<9} {'time us':>10} {'GB/s':>8} "
                f"{'%HBM':>6} {'speedup':>8}  status")
        print(head)
        print("-" * len(head))
    for r in rows:
        mid = r.get("context", r.get("siblings"))
        speed = r.get("speedup_vs_plain", r.get("speedup_vs_torch-ref"))
        read = f"  read/ideal {r['read_over_ideal']:.2f}" if "read_over_ideal" in r else ""
        print(f"{r['sweep']:<7} {r['batch']:>4} {mid:>5} {r.get('prefix', '-'):>6}  {r['method']:<9} "
              f"{fmt(r['time_us'], 10, 1)} {fmt(r['gbps'], 8, 1)} {fmt(r['hbm_pct'], 6, 1)} {fmt(speed, 8, 2)}  "
              f"{r['status']}{read}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (automatic without CUDA)")
    parser.add_argument("--only", choices=["decode", "shared", "tree"], default=None, help="run one sweep")
    parser.add_argument("--batch", type=int, nargs="+", help="decode sweep: sequences per step")
    parser.add_argument("--context", type=int, nargs="+", help="decode sweep: context length of every sequence")
    parser.add_argument("--shared-batch", type=int, nargs="+", help="shared sweep: rows per step (G x K)")
    parser.add_argument("--siblings", type=int, nargs="+", help="shared sweep: K, rows per group")
    parser.add_argument("--prefix", type=int, nargs="+", help="shared sweep: shared prefix length")
    parser.add_argument("--max-suffix", type=int, help="shared sweep: suffix lengths uniform in [0, this]")
    parser.add_argument("--episodes", type=int, nargs="+", help="tree sweep: episodes per step")
    parser.add_argument("--states", type=int, help="tree sweep: nested states per episode")
    parser.add_argument("--k", type=int, help="tree sweep: rollouts per state")
    parser.add_argument("--hq", type=int, help="query heads (default 32)")
    parser.add_argument("--hkv", type=int, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, help="head dim (default 128)")
    parser.add_argument("--page-size", type=int, help="tokens per page (default 16)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bf16 (fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after one warm-up (median)")
    parser.add_argument("--hbm-tbps", type=float, default=None, help="HBM TB/s (default: from the device name)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles per shape)")
    parser.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed call")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (bench/results/attention-<time>.json)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    if not cuda:  # the kernels run in the Triton interpreter on CPU tensors (set before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if cuda else "cpu")
    sizes = dict(QUICK if quick else FULL)
    for key in ("batch", "context", "shared_batch", "siblings", "prefix", "max_suffix", "episodes", "states", "k"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    model = dict(hq=32, hkv=8, head_dim=128, page_size=16) if not quick else dict(QUICK_MODEL)
    for key in model:
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.repeats = args.repeats or (1 if not cuda else 20)
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    hbm = args.hbm_tbps * 1e12 if args.hbm_tbps else next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)

    print(f"{'quick' if quick else 'full'} mode on {name} ({str(dtype).removeprefix('torch.')}), "
          f"Hq={model['hq']} Hkv={model['hkv']} D={model['head_dim']} page {model['page_size']}, "
          f"median of {args.repeats}, HBM roofline {hbm / 1e12 if hbm else 'n/a'} TB/s")
    rows = run(sizes, model, args, device, dtype, hbm)
    result = dict(
        mode="quick" if quick else "full", device=name, dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__, triton=_triton_version(), model=model, sizes=sizes, repeats=args.repeats,
        hbm_bytes_per_s=hbm, l2_flush=not args.no_flush,
        interpreter=os.environ.get("TRITON_INTERPRET") == "1",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        rows=rows, targets=check_targets(rows, hbm),
    )
    print("\ntargets (never asserted):")
    for key, line in result["targets"].items():
        print(f"  {key}: {line}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"attention-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
