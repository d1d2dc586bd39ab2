"""decode_attention (Triton, interpreted on CPU) and its torch twin against a dense float64 oracle.

The oracle walks the page table position by position in Python and runs a float64 softmax per
query head: it shares no code with the reference's vectorised gather or with the kernel.
Shapes are tiny (the interpreter runs ~20-30 ms per program instance).
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

da = importlib.import_module("engine.kernels.decode_attention")
decode_attention = da.decode_attention
decode_attention_reference = da.decode_attention_reference


# ------------------------------------------------------------------ helpers


def make_paged(lens, hkv, d, page_size, dtype=torch.float32, hq=None, seed=0, spare_pages=3):
    """Random q and a paged KV pool whose pages are scattered (shuffled page ids).

    k_cache / v_cache are views kv[1, 0] / kv[1, 1] of a [layers=2, 2, slots, Hkv, D] pool,
    as the engine passes them. Unused page-table entries hold 0.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    hq = hq or hkv
    pages_per_row = [math.ceil(n / page_size) for n in lens]
    max_pages = max(pages_per_row + [1])
    num_pages = sum(pages_per_row) + spare_pages
    order = torch.randperm(num_pages, generator=g)
    page_table = torch.zeros(b, max_pages, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_per_row):
        page_table[i, :n] = order[used: used + n].int()
        used += n
    kv = (torch.randn(2, 2, num_pages * page_size, hkv, d, generator=g)).to(dtype)
    q = (torch.randn(b, hq, d, generator=g) * 2.0).to(dtype)
    return q, kv[1, 0], kv[1, 1], page_table, torch.tensor(lens, dtype=torch.int32)


def oracle(q, k_cache, v_cache, page_table, lo, hi, page_size, scale):
    """float64 (out [B, Hq, D], lse [B, Hq]) over positions [lo[b], hi[b]), one position at a time."""
    b, hq, d = q.shape
    group = hq // k_cache.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float64)
    for i in range(b):
        slots = [int(page_table[i, p // page_size]) * page_size + p % page_size for p in range(int(lo[i]), int(hi[i]))]
        if not slots:
            continue
        for h in range(hq):
            k = k_cache[slots, h // group].double()
            v = v_cache[slots, h // group].double()
            s = (k @ q[i, h].double()) * scale
            lse[i, h] = torch.logsumexp(s, 0)
            out[i, h] = torch.softmax(s, 0) @ v
    return out, lse


def key_range(lens, starts=None, window=None):
    lo = [0] * len(lens) if starts is None else list(starts)
    hi = list(lens)
    if window is not None:
        lo = [max(a, h - window) for a, h in zip(lo, hi)]
    return lo, hi


def check_close(out, lse, ref_out, ref_lse, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-5)


# Each case: dtype, page size, (Hq, Hkv), kv_lens, num_splits, kv_starts, window.
CASES = {
    "fp32-page16-mha-1split": (torch.float32, 16, (2, 2), [1, 37, 20], 1, None, None),
    "fp32-page1-gqa4-3splits": (torch.float32, 1, (4, 1), [5, 33, 1], 3, None, None),
    "fp16-page16-gqa7-2splits": (torch.float16, 16, (14, 2), [40, 1, 17], 2, None, None),
    "fp16-page1-gqa4-many-empty-splits": (torch.float16, 1, (8, 2), [3, 18], 4, None, None),
    "fp32-page3-gqa7-default-splits": (torch.float32, 3, (7, 1), [22, 7], None, None, None),
    "fp32-starts-and-empty-range": (torch.float32, 4, (4, 1), [12, 25, 20, 9], 2, [0, 10, 30, 9], None),
    "fp16-window": (torch.float16, 16, (4, 1), [40, 5, 23], 2, None, 8),
    "fp32-window-and-starts": (torch.float32, 2, (4, 2), [30, 14], 3, [20, 2], 9),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_and_reference_match_dense_oracle(case):
    dtype, page_size, (hq, hkv), lens, splits, starts, window = CASES[case]
    q, k, v, pt, kv_lens = make_paged(lens, hkv, 32, page_size, dtype, hq=hq)
    scale = 1 / math.sqrt(32)
    kv_starts = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    lo, hi = key_range(lens, starts, window)
    want_out, want_lse = oracle(q, k, v, pt, lo, hi, page_size, scale)
    kw = dict(kv_starts=kv_starts, window=window, num_splits=splits, return_lse=True)
    for fn in (decode_attention, decode_attention_reference):
        out, lse = fn(q, k, v, pt, kv_lens, page_size, scale, **kw)
        assert out.dtype == dtype and out.shape == q.shape
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
        check_close(out, lse, want_out, want_lse, dtype)
    empty = [i for i in range(len(lens)) if lo[i] >= hi[i]]
    if empty:  # an empty key range: out exactly 0, lse -inf
        assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()


def test_public_function_takes_the_triton_path_here(monkeypatch):
    """Under TRITON_INTERPRET=1 the public op runs the kernels on CPU tensors."""
    assert da._INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"
    calls = []
    real = da._decode_triton
    monkeypatch.setattr(da, "_decode_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, pt, lens = make_paged([3, 9], 1, 16, 4, hq=2)
    out = decode_attention(q, k, v, pt, lens, 4, 0.25)
    assert calls == [1]
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, pt, lens, 4, 0.25), atol=1e-5, rtol=1e-5)


def test_without_return_lse_returns_the_output_only():
    q, k, v, pt, lens = make_paged([6, 2], 1, 16, 4, hq=2)
    out = decode_attention(q, k, v, pt, lens, 4, 0.5)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_split_count_does_not_change_the_result():
    """1, 2 and 5 splits over the same ranges agree to fp32 rounding (stage 2 is exact math)."""
    q, k, v, pt, lens = make_paged([50, 17], 1, 16, 16, hq=4)
    outs = [decode_attention(q, k, v, pt, lens, 16, 0.3, num_splits=s, return_lse=True) for s in (1, 2, 5)]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, outs[0][1], atol=1e-6, rtol=1e-6)


def test_head_dim_not_a_power_of_two_is_masked():
    q, k, v, pt, lens = make_paged([13, 4], 1, 24, 4, hq=4)
    lo, hi = key_range([13, 4])
    want_out, want_lse = oracle(q, k, v, pt, lo, hi, 4, 0.2)
    out, lse = decode_attention(q, k, v, pt, lens, 4, 0.2, num_splits=2, return_lse=True)
    check_close(out, lse, want_out, want_lse, torch.float32)


def test_rows_outside_the_attended_positions_are_never_read():
    """Poisoning every cache row outside the attended positions (spare pages, the unused
    tail of last pages, whatever unused table entries point at) with NaN changes nothing."""
    lens = [9, 30]
    q, k, v, pt, kv_lens = make_paged(lens, 2, 16, 8, hq=4, spare_pages=2)
    want = decode_attention_reference(q, k, v, pt, kv_lens, 8, 0.3)
    keep = torch.zeros(k.shape[0], dtype=torch.bool)
    for i, n in enumerate(lens):
        for p in range(n):
            keep[int(pt[i, p // 8]) * 8 + p % 8] = True
    k2, v2 = k.clone(), v.clone()
    k2[~keep] = float("nan")
    v2[~keep] = float("nan")
    out = decode_attention(q, k2, v2, pt, kv_lens, 8, 0.3, num_splits=2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    q, k, v, pt, lens = make_paged([4], 1, 16, 4, hq=2)
    out, lse = decode_attention(q[:0], k, v, pt[:0], lens[:0], 4, 0.5, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)


def test_unsupported_head_dim_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(da, "_WARNED_HEAD_DIMS", set())
    q, k, v, pt, lens = make_paged([5, 11], 1, 8, 4, hq=2)  # D = 8 < 16: tl.dot cannot take it
    want = decode_attention_reference(q, k, v, pt, lens, 4, 0.4, return_lse=True)
    with pytest.warns(UserWarning, match=r"head_dim=8 .*torch reference"):
        out = decode_attention(q, k, v, pt, lens, 4, 0.4, return_lse=True)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        again = decode_attention(q, k, v, pt, lens, 4, 0.4)
    assert torch.equal(again, want[0])


# ------------------------------------------------------------------ bad input


def _args():
    q, k, v, pt, lens = make_paged([5, 9], 2, 16, 4, hq=4)
    return dict(q=q, k_cache=k, v_cache=v, page_table=pt, kv_lens=lens, page_size=4, scale=0.25)


def _with(**changes):
    return lambda a: {**a, **{k: (f(a) if callable(f) else f) for k, f in changes.items()}}


BAD = {
    "q-2d": (_with(q=lambda a: a["q"][0]), r"q must be \[B, Hq, D\]; got shape \(4, 16\)"),
    "q-int": (_with(q=lambda a: a["q"].int()), r"q must be float32/bfloat16/float16; got torch.int32"),
    "cache-dtype": (_with(k_cache=lambda a: a["k_cache"].half()), r"k_cache must have q's dtype torch.float32; got torch.float16"),
    "cache-D": (_with(v_cache=lambda a: a["v_cache"][..., :8]), r"v_cache must be \[num_slots, Hkv, D=16\]; got shape \(\d+, 2, 8\)"),
    "cache-shapes": (_with(v_cache=lambda a: a["v_cache"][:-1]), r"v_cache must have k_cache's shape"),
    "cache-last-dim": (_with(k_cache=lambda a: a["k_cache"].repeat(1, 1, 2)[:, :, ::2]),
                       r"k_cache must be contiguous in its last dim"),
    "gqa": (_with(q=lambda a: a["q"][:, :3]), r"num_q_heads must be a multiple of num_kv_heads >= 1; got Hq=3, Hkv=2"),
    "pt-int64": (_with(page_table=lambda a: a["page_table"].long()), r"page_table must be int32; got torch.int64"),
    "pt-rows": (_with(page_table=lambda a: a["page_table"][:1]), r"page_table must be \[B=2, max_pages\]; got shape \(1, 3\)"),
    "lens-int64": (_with(kv_lens=lambda a: a["kv_lens"].long()), r"kv_lens must be int32; got torch.int64"),
    "lens-shape": (_with(kv_lens=lambda a: a["kv_lens"][:1]), r"kv_lens must be \[B=2\]; got shape \(1,\)"),
    "device": (_with(k_cache=lambda a: a["k_cache"].to("meta"), v_cache=lambda a: a["v_cache"].to("meta")),
               r"k_cache must be on q's device cpu; got meta"),
    "page-size": (_with(page_size=0), r"page_size must be an int >= 1; got 0"),
    "page-size-float": (_with(page_size=4.0), r"page_size must be an int >= 1; got 4.0"),
    "scale": (_with(scale=float("nan")), r"scale must be a finite number > 0; got nan"),
    "lens-capacity": (_with(kv_lens=torch.tensor([5, 13], dtype=torch.int32)),
                      r"kv_lens must be in \[0, max_pages \* page_size = 12\]; got 13 at row 1"),
    "lens-negative": (_with(kv_lens=torch.tensor([-1, 9], dtype=torch.int32)), r"kv_lens must be in .*got -1 at row 0"),
    "page-outside-cache": (_with(page_table=lambda a: a["page_table"].index_fill(1, torch.tensor([1]), 10_000)),
                           r"page_table\[0, 1\] = 10000 points outside the cache"),
}
BAD_KW = {
    "starts-shape": (dict(kv_starts=torch.zeros(3, dtype=torch.int32)), r"kv_starts must be \[B=2\]; got shape \(3,\)"),
    "starts-dtype": (dict(kv_starts=torch.zeros(2, dtype=torch.int64)), r"kv_starts must be int32; got torch.int64"),
    "starts-negative": (dict(kv_starts=torch.tensor([0, -2], dtype=torch.int32)), r"kv_starts must be >= 0; got -2 at row 1"),
    "window": (dict(window=0), r"window must be None or an int >= 1; got 0"),
    "splits": (dict(num_splits=0), r"num_splits must be None or an int >= 1; got 0"),
}


@pytest.mark.parametrize("fn", [decode_attention, decode_attention_reference], ids=["public", "reference"])
def test_bad_input_raises_value_error_naming_the_value(fn):
    base = _args()
    for name, (change, message) in BAD.items():
        with pytest.raises(ValueError, match=message):
            fn(**change(base))
    for name, (kw, message) in BAD_KW.items():
        with pytest.raises(ValueError, match=message):
            fn(**base, **kw)


def test_a_transposed_but_unit_stride_cache_is_accepted():
    a = _args()
    want = decode_attention_reference(**a)
    k = torch.empty(a["k_cache"].shape[1], a["k_cache"].shape[0], 16).transpose(0, 1)  # slots not outermost
    k.copy_(a["k_cache"])
    torch.testing.assert_close(decode_attention(**{**a, "k_cache": k}), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ compiles for real GPUs

COMPILE_SCRIPT = r"""
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
da = importlib.import_module("engine.kernels.decode_attention")
sp = importlib.import_module("engine.kernels.shared_prefix_attention")
ms = importlib.import_module("engine.kernels.merge_states")
assert not da._INTERPRETED
PAGED = dict(HEAD_DIM=128, GROUP=4, PAGE_SIZE=16, BLOCK_N=64, BLOCK_D=128, UPCAST=False)
JOBS = [  # kernel, constexprs, pointer dtypes (default i32), compute capability, stages
    (da._decode_split_kernel, dict(PAGED, HAS_STARTS=True, HAS_WINDOW=True, BLOCK_H=16, IEEE=False),
     dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", o_ptr="bf16", lse_ptr="fp32"), 90, 3),
    (sp._prefix_kernel, dict(PAGED, BLOCK_M=64, IEEE=False),
     dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", o_ptr="fp32", lse_ptr="fp32"), 90, 3),
    (ms._merge_splits_kernel, dict(BLOCK_R=16, BLOCK_S=8, BLOCK_D=128),
     dict(part_ptr="fp32", lse_part_ptr="fp32", out_ptr="bf16", lse_out_ptr="fp32"), 90, 1),
    (ms._merge_two_kernel, dict(BLOCK_R=16, BLOCK_D=128),
     dict(o1_ptr="bf16", lse1_ptr="fp32", o2_ptr="bf16", lse2_ptr="fp32", out_ptr="bf16", lse_out_ptr="fp32"), 90, 1),
]
for fn, consts, types, cc, stages in JOBS:
    names = [n for n in fn.arg_names if n not in consts]
    sig = {n: ("*" + types.get(n, "i32") if n.endswith("_ptr") else "fp32" if n == "qk_scale" else "i32") for n in names}
    # What the JIT infers for 16-aligned pointers and strides such as Hkv * D.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n.startswith("stride")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=4, num_stages=stages))
    print(fn.__name__, cc, len(k.asm["cubin"]), "async", k.asm["ttgir"].count("async_copy_global_to_local"))
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code that the compiler rejects: compile the paged-attention and
    merge kernels (bf16) to Hopper cubin (no GPU needed) and check that the paged K/V loads of the decode and
    prefix kernels are asynchronous copies (software-pipelined, which needs loads vectorised
    along D)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.split("\n") if " async " in line]
    assert len(lines) == 4, done.stdout
    for line in lines:
        if line.startswith(("_decode_split_kernel", "_prefix_kernel")):
            assert int(line.split("async ")[1]) >= 2, line  # the K and V tiles


# ------------------------------------------------------------------ GPU at real shapes


def _gpu_case(b, hq, hkv, d, max_len, page_size, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (b,), device="cuda", generator=g, dtype=torch.int32)
    lens[0] = max_len
    lens[1] = 1
    pages = (lens.long() + page_size - 1) // page_size
    max_pages = int(pages.max())
    num_pages = int(pages.sum()) + 7
    perm = torch.randperm(num_pages, device="cuda", generator=g).int()
    pt = torch.zeros(b, max_pages, dtype=torch.int32, device="cuda")
    cursor = 0
    for i, n in enumerate(pages.tolist()):
        pt[i, :n] = perm[cursor: cursor + n]
        cursor += n
    kv = torch.randn(2, num_pages * page_size, hkv, d, device="cuda", generator=g).to(dtype)
    q = (torch.randn(b, hq, d, device="cuda", generator=g) * 2).to(dtype)
    return q, kv[0], kv[1], pt, lens


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 8])
def test_gpu_bf16_real_shapes_match_reference(splits):
    q, k, v, pt, lens = _gpu_case(64, 32, 8, 128, 2048, 16, torch.bfloat16)
    scale = 128 ** -0.5
    out, lse = decode_attention(q, k, v, pt, lens, 16, scale, num_splits=splits, return_lse=True, validate=True)
    ref, ref_lse = decode_attention_reference(q, k, v, pt, lens, 16, scale, return_lse=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_bf16_window_starts_page1_gqa7():
    q, k, v, pt, lens = _gpu_case(48, 28, 4, 64, 1000, 1, torch.bfloat16, seed=1)
    starts = (lens // 3).int()
    starts[2] = lens[2]  # an empty range
    out, lse = decode_attention(q, k, v, pt, lens, 1, 0.125, kv_starts=starts, window=300, return_lse=True)
    ref, ref_lse = decode_attention_reference(q, k, v, pt, lens, 1, 0.125, kv_starts=starts, window=300, return_lse=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)
    assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()


@pytest.mark.gpu
def test_gpu_fp32_is_exact_to_fp32_rounding():
    q, k, v, pt, lens = _gpu_case(16, 8, 2, 128, 700, 16, torch.float32, seed=2)
    out, lse = decode_attention(q, k, v, pt, lens, 16, 0.09, num_splits=3, return_lse=True)
    ref, ref_lse = decode_attention_reference(q, k, v, pt, lens, 16, 0.09, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_capturable_in_a_cuda_graph():
    """No host sync on the default path: the call records into a CUDA graph and replays."""
    q, k, v, pt, lens = _gpu_case(32, 32, 8, 128, 512, 16, torch.bfloat16, seed=3)
    want = decode_attention(q, k, v, pt, lens, 16, 0.088)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, pt, lens, 16, 0.088)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=0, rtol=0)
