"""extend_attention (Triton, interpreted on CPU) and its torch twin against a float64 oracle.

Each batch is ragged and mixes the three shapes a prefill step holds: a fresh prompt (no cached
prefix) longer than one 16-row query block, a chunk over a cached prefix that ends mid-page,
and a single new token over a longer prefix. K/V live in one layer's views of a
[layers, 2, slots, Hkv, D] pool whose every other slot holds random values too, on pages handed
out in random order, so reading a wrong slot or a position outside a row's range shows up.
The oracle gathers each sequence's keys position by position through the page table and runs
softmax attention per query row and head in float64.
"""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch

ea = importlib.import_module("engine.kernels.extend_attention")

# (new tokens, cached prefix) per sequence.
BATCH = ((20, 0), (6, 30), (1, 40))


def triton_device() -> str:
    """CPU under the interpreter, else the GPU (the compiled kernel at the same tiny shapes)."""
    if ea._INTERPRETED:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail("Triton on CPU tensors needs TRITON_INTERPRET=1 set before `engine.kernels` is imported")
    return "cuda"


def make_case(dtype, page_size, hq, hkv, d, batch=BATCH, device="cpu", seed=0, spare_pages=3):
    """Keyword arguments of extend_attention (less scale/window) for `batch`, plus the q_lens."""
    g = torch.Generator().manual_seed(seed)
    q_lens = [ql for ql, _ in batch]
    kv_lens = [ql + pre for ql, pre in batch]
    pages = [math.ceil(n / page_size) for n in kv_lens]
    num_pages = sum(pages) + spare_pages
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros(len(batch), max(max(pages), 1) + 1, dtype=torch.int32)  # unused entries stay 0
    for b, n in enumerate(pages):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    pool = torch.randn(2, 2, num_pages * page_size, hkv, d, generator=g).to(dtype)
    # q as the model produces it: a strided view of one fused q|k|v projection.
    qkv = torch.randn(sum(q_lens), (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : hq * d].view(len(qkv), hq, d)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    args = dict(q=q, k_cache=pool[1, 0], v_cache=pool[1, 1], page_table=table, cu_seqlens_q=cu,
                kv_lens=torch.tensor(kv_lens, dtype=torch.int32), page_size=page_size)
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    if device != "cpu":  # keep q a strided view on the device too
        qkv_dev = qkv.to(device)
        moved["q"] = qkv_dev[:, : hq * d].view(len(qkv), hq, d)
        pool_dev = pool.to(device)
        moved["k_cache"], moved["v_cache"] = pool_dev[1, 0], pool_dev[1, 1]
    return moved, q_lens


def oracle(q, k_cache, v_cache, page_table, q_lens, kv_lens, page_size, scale, window):
    """float64 [Nq, Hq, D]: per row and head, softmax over positions max(0, p - window + 1) .. p."""
    q, k_cache, v_cache, page_table = (t.cpu() for t in (q, k_cache, v_cache, page_table))
    nq, hq, d = q.shape
    group = hq // k_cache.shape[1]
    out = torch.zeros(nq, hq, d, dtype=torch.float64)
    row = 0
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        slots = [int(page_table[b, p // page_size]) * page_size + p % page_size for p in range(kv_len)]
        keys = torch.stack([k_cache[s] for s in slots]).double() if slots else None
        vals = torch.stack([v_cache[s] for s in slots]).double() if slots else None
        for i in range(q_len):
            p = kv_len - q_len + i
            lo = max(0, p - window + 1) if window is not None else 0
            for h in range(hq):
                s = keys[lo:p + 1, h // group] @ q[row + i, h].double() * scale
                out[row + i, h] = torch.softmax(s, 0) @ vals[lo:p + 1, h // group]
        row += q_len
    return out


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}

# (dtype, page_size, Hq, Hkv, head_dim, window): GQA 1, 4 and 7; fp32 and fp16 each with
# pages of 1 and 16; no window, a narrow one (7: inside one key tile) and a wide one (30: the
# single-token row drops its first 11 keys and has masked, unmasked and diagonal tiles).
CASES = [
    (torch.float32, 16, 2, 2, 16, None),
    (torch.float16, 1, 4, 1, 16, 7),
    (torch.float32, 1, 7, 1, 16, 30),
    (torch.float16, 16, 7, 1, 16, None),
    (torch.float32, 16, 8, 2, 16, 7),
    (torch.float16, 16, 4, 2, 32, 30),
]


@pytest.mark.parametrize("dtype, page_size, hq, hkv, d, window", CASES,
                         ids=[f"{str(c[0])[6:]}-page{c[1]}-{c[2]}x{c[3]}-d{c[4]}-w{c[5]}" for c in CASES])
def test_triton_and_reference_match_oracle(dtype, page_size, hq, hkv, d, window):
    dev = triton_device()
    args, q_lens = make_case(dtype, page_size, hq, hkv, d, device=dev, seed=hq + page_size)
    scale = 2.0 / math.sqrt(d)  # peaky softmax: a wrong mask moves the result by O(1)
    want = oracle(**{k: args[k] for k in ("q", "k_cache", "v_cache", "page_table", "page_size")},
                  q_lens=q_lens, kv_lens=args["kv_lens"].tolist(), scale=scale, window=window)
    got = ea.extend_attention(**args, scale=scale, window=window).cpu()
    ref = ea.extend_attention_reference(**{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                           for k, v in args.items()}, scale=scale, window=window)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape == args["q"].shape
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    torch.testing.assert_close(ref.double(), want, **TOL[dtype])
    torch.testing.assert_close(got, ref, **TOL[dtype])


def test_tiles_wider_than_query_blocks_and_an_empty_sequence():
    """BLOCK_N = 2 * BLOCK_M, a sequence with no new tokens, max_seqlen_q given by the caller."""
    dev = triton_device()
    batch = ((20, 0), (0, 5), (6, 30), (1, 40))
    args, q_lens = make_case(torch.float32, 16, 4, 2, 16, batch=batch, device=dev, seed=3)
    for window in (None, 30):
        want = oracle(**{k: args[k] for k in ("q", "k_cache", "v_cache", "page_table", "page_size")},
                      q_lens=q_lens, kv_lens=args["kv_lens"].tolist(), scale=0.5, window=window)
        got = ea._extend_triton(**args, scale=0.5, window=window, max_seqlen_q=20,
                                cfg=ea._Config(block_m=16, block_n=32))
        torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


def test_every_alignment_of_diagonal_and_window_edge():
    """Chunks of 3 tokens starting at every position 0..35: each residue modulo the 16-key
    tile for the diagonal (first row) and for the window edges (first and last rows, past the
    window's width), where an off-by-one in the split between masked and unmasked tiles
    would show. The window of 21 > 16 + 2 leaves room for unmasked tiles inside it."""
    window = 21
    dev = triton_device()
    batch = tuple((3, p) for p in range(36))
    args, q_lens = make_case(torch.float32, 4, 1, 1, 16, batch=batch, device=dev, seed=7)
    want = oracle(**{k: args[k] for k in ("q", "k_cache", "v_cache", "page_table", "page_size")},
                  q_lens=q_lens, kv_lens=args["kv_lens"].tolist(), scale=0.5, window=window)
    got = ea.extend_attention(**args, scale=0.5, window=window, max_seqlen_q=3)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[torch.float32])


def test_no_rows_gives_an_empty_result():
    dev = triton_device()
    args, _ = make_case(torch.float32, 4, 2, 1, 16, batch=((0, 3), (0, 0)), device=dev)
    out = ea.extend_attention(**args, scale=0.5)
    assert out.shape == (0, 2, 16)


def test_unvalidated_bad_page_stays_in_bounds():
    """validate=False on CUDA skips the host checks: a page past the pool must not be read,
    and the other sequences' rows stay right."""
    args, q_lens = make_case(torch.float32, 4, 2, 1, 16, batch=((3, 2), (2, 6)), device=triton_device(), seed=5)
    want = oracle(**{k: args[k] for k in ("q", "k_cache", "v_cache", "page_table", "page_size")},
                  q_lens=q_lens, kv_lens=args["kv_lens"].tolist(), scale=0.5, window=None)
    args["page_table"][0, 0] = 1000  # far outside the pool
    got = ea._extend_triton(**args, scale=0.5, window=None, max_seqlen_q=None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[3:].cpu().double(), want[3:], **TOL[torch.float32])


def test_unsupported_head_dim_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(ea, "_WARNED_HEAD_DIMS", set())
    args, _ = make_case(torch.float32, 16, 4, 2, 24, batch=((5, 0), (3, 10)), device=triton_device())
    ref = ea.extend_attention_reference(**args, scale=0.3, window=4)
    with pytest.warns(UserWarning, match="head_dim=24"):
        out = ea.extend_attention(**args, scale=0.3, window=4)
    assert torch.equal(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        again = ea.extend_attention(**args, scale=0.3, window=4)
    assert torch.equal(again, ref)


def test_cpu_tensors_without_the_interpreter_run_the_reference(monkeypatch):
    """The dispatch: CPU tensors take the torch path unless TRITON_INTERPRET=1 was set at import."""
    monkeypatch.setattr(ea, "_INTERPRETED", False)
    args, _ = make_case(torch.float16, 16, 4, 2, 16, batch=((5, 0), (3, 10)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head_dim warning: the kernel was never a candidate
        out = ea.extend_attention(**args, scale=0.3, window=6)
    assert torch.equal(out, ea.extend_attention_reference(**args, scale=0.3, window=6))


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    def set_(name, fn):
        return lambda a: {**a, name: fn(a)}

    def cu(values):
        return set_("cu_seqlens_q", lambda a: torch.tensor(values, dtype=torch.int32))

    return [
        # shapes
        ("q 2d", set_("q", lambda a: a["q"][:, 0]), "q must be \\[Nq, num_q_heads, head_dim\\]"),
        ("k_cache head_dim", set_("k_cache", lambda a: a["k_cache"][..., :8]), "k_cache must be \\[num_slots"),
        ("v_cache shape", set_("v_cache", lambda a: a["v_cache"][:8]), "v_cache must have k_cache's shape"),
        ("heads", set_("q", lambda a: torch.zeros(8, 3, 16)), "num_q_heads=3 must be a multiple of num_kv_heads=2"),
        ("kv_lens 2d", set_("kv_lens", lambda a: a["kv_lens"][None]), "kv_lens must be \\[B\\]"),
        ("cu length", cu([0, 5]), "cu_seqlens_q must be \\[B\\+1=3\\]"),
        ("page_table rows", set_("page_table", lambda a: a["page_table"][:1]), "page_table must be \\[B=2"),
        # dtypes
        ("q int", set_("q", lambda a: a["q"].long()), "q must be float32, bfloat16 or float16"),
        ("cache dtype", set_("k_cache", lambda a: a["k_cache"].half()), "must have q's dtype torch.float32"),
        ("page_table int64", set_("page_table", lambda a: a["page_table"].long()), "page_table must be int32"),
        ("cu int64", set_("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long()), "cu_seqlens_q must be int32"),
        ("kv_lens int64", set_("kv_lens", lambda a: a["kv_lens"].long()), "kv_lens must be int32"),
        # devices
        ("device", set_("kv_lens", lambda a: a["kv_lens"].to("meta")), "must share a device"),
        # scalars
        ("page_size 0", set_("page_size", lambda a: 0), "page_size must be an int >= 1"),
        ("page_size float", set_("page_size", lambda a: 4.0), "page_size must be an int >= 1"),
        ("scale nan", set_("scale", lambda a: float("nan")), "scale must be a finite number > 0"),
        ("scale 0", set_("scale", lambda a: 0.0), "scale must be a finite number > 0"),
        ("window 0", set_("window", lambda a: 0), "window must be None or an int >= 1"),
        ("max_seqlen_q -1", set_("max_seqlen_q", lambda a: -1), "max_seqlen_q must be None or an int >= 0"),
        # metadata values
        ("cu rows", cu([0, 5, 7]), "cu_seqlens_q\\[-1\\]=7 must equal the number of q rows 8"),
        ("cu start", cu([1, 5, 8]), "cu_seqlens_q\\[0\\] must be 0"),
        ("cu order", cu([0, 9, 8]), "cu_seqlens_q must be non-decreasing"),
        ("q_len > kv_len", set_("kv_lens", lambda a: torch.tensor([4, 9], dtype=torch.int32)),
         "sequence 0: q_len=5 new tokens exceed kv_lens\\[0\\]=4"),
        ("table capacity", set_("kv_lens", lambda a: torch.tensor([5, 17], dtype=torch.int32)),
         "kv_lens\\[1\\]=17 exceeds page_table's capacity"),
        ("page range", set_("page_table", lambda a: torch.tensor([[0, 1, 0, 0], [2, 9, 0, 0]], dtype=torch.int32)),
         "page_table\\[1, 1\\]=9 names slots outside the cache"),
        ("max_seqlen_q small", set_("max_seqlen_q", lambda a: 4), "max_seqlen_q=4 is below the longest q_len 5"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("fn", [ea.extend_attention, ea.extend_attention_reference], ids=["public", "reference"])
@pytest.mark.parametrize("mutate, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(fn, mutate, match):
    # Valid: B=2, q_lens (5, 3), kv_lens (5, 9), pages of 4 (12 slots, table of 4 columns), 4 q heads / 2 kv heads.
    args, _ = make_case(torch.float32, 4, 4, 2, 16, batch=((5, 0), (3, 6)), spare_pages=0)
    assert args["k_cache"].shape[0] == 20 and args["page_table"].shape == (2, 4)
    with pytest.raises(ValueError, match=match):
        fn(**mutate({**args, "scale": 0.5}))


# --------------------------------------------------------------------------- GPU, real shapes


def _real_batch(dtype, d, hq, hkv, page_size, chunks, seed=0):
    args, q_lens = make_case(dtype, page_size, hq, hkv, d, batch=chunks, device="cuda", seed=seed)
    return args, q_lens


# bf16 outputs round to 8 bits (|out| up to ~3 on short rows); fp32 runs IEEE products.
GPU_TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=4e-3, rtol=4e-3),
           torch.float32: dict(atol=1e-4, rtol=1e-4)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 1024])
def test_gpu_real_shapes_match_reference(dtype, window):
    """4 sequences, chunks of 512 over cached prefixes up to 1500 (one fresh), Hq=32, Hkv=8, D=128, page 16."""
    chunks = ((512, 0), (512, 700), (512, 1500), (300, 1013))
    args, _ = _real_batch(dtype, 128, 32, 8, 16, chunks)
    scale = 1 / math.sqrt(128)
    got = ea.extend_attention(**args, scale=scale, window=window, validate=True)
    ref = ea.extend_attention_reference(**args, scale=scale, window=window)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, ref, **GPU_TOL[dtype])
    # Without max_seqlen_q (host read) and with it: the same kernel, the same result.
    again = ea.extend_attention(**args, scale=scale, window=window, max_seqlen_q=512)
    assert torch.equal(again, got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, d, hq, hkv, page_size", [
    (torch.float16, 64, 28, 4, 1),     # GQA 7, token-granular pages
    (torch.bfloat16, 256, 8, 4, 16),   # the largest head_dim, smaller tiles
    (torch.bfloat16, 128, 8, 8, 16),   # no GQA
])
@pytest.mark.parametrize("window", [None, 100])
def test_gpu_head_dims_and_ragged_batches(dtype, d, hq, hkv, page_size, window):
    chunks = ((1, 300), (37, 0), (200, 129), (1, 0), (129, 31))
    args, _ = _real_batch(dtype, d, hq, hkv, page_size, chunks, seed=d)
    scale = 1 / math.sqrt(d)
    got = ea.extend_attention(**args, scale=scale, window=window, validate=True)
    ref = ea.extend_attention_reference(**args, scale=scale, window=window)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, ref, **GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_single_token_chunks_use_small_query_blocks():
    """Every q_len 1 (max_seqlen_q 1): the launcher shrinks BLOCK_M to 16."""
    chunks = tuple((1, n) for n in (0, 5, 17, 500, 1999))
    args, _ = _real_batch(torch.bfloat16, 128, 32, 8, 16, chunks)
    assert ea._default_config(1, 128, torch.bfloat16, torch.device("cuda")).block_m == 16
    got = ea.extend_attention(**args, scale=0.1, max_seqlen_q=1, validate=True)
    ref = ea.extend_attention_reference(**args, scale=0.1)
    torch.testing.assert_close(got, ref, **GPU_TOL[torch.bfloat16])
