"""shared_prefix_decode_attention (Triton, interpreted on CPU) and its torch twin.

Batches are laid out as the engine forks siblings: the members of a group share the pages
of the prefix's full pages, each member has its own copy of a partial last prefix page and its
own pages after that. Every result is checked against a float64 dense oracle that reads each row
through its own page table, against the reference, and against plain decode_attention.
"""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch

da = importlib.import_module("engine.kernels.decode_attention")
sp = importlib.import_module("engine.kernels.shared_prefix_attention")
shared = sp.shared_prefix_decode_attention
shared_reference = sp.shared_prefix_decode_attention_reference


def make_groups(groups, hkv, hq, d, page_size, dtype=torch.float32, seed=0):
    """groups: [(prefix_len, [suffix_len of each member])]. Returns q, k_cache, v_cache,
    page_table, kv_lens, group_offsets, prefix_lens, and the own-page rows of each member's
    partial prefix page (for tests that break the 'identical prefix' promise)."""
    g = torch.Generator().manual_seed(seed)
    rows = [(gi, plen, slen) for gi, (plen, sufs) in enumerate(groups) for slen in sufs]
    lens = [plen + slen for _, plen, slen in rows]
    max_pages = max(math.ceil(n / page_size) for n in lens + [1])
    need = sum(math.ceil(p / page_size) for p, _ in groups) + sum(math.ceil(n / page_size) for n in lens) + 2
    free = torch.randperm(need, generator=g).tolist()
    page_table = torch.zeros(len(rows), max_pages, dtype=torch.int32)
    kv = torch.zeros(2, 2, need * page_size, hkv, d)
    prefix_kv = [torch.randn(2, p, hkv, d, generator=g) for p, _ in groups]
    shared_pages = [[free.pop() for _ in range(p // page_size)] for p, _ in groups]
    partial_copies = []
    for r, (gi, plen, slen) in enumerate(rows):
        pages = list(shared_pages[gi])  # the prefix's full pages: shared with the siblings
        pages += [free.pop() for _ in range(math.ceil(lens[r] / page_size) - len(pages))]  # own pages
        page_table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        data = torch.cat([prefix_kv[gi], torch.randn(2, slen, hkv, d, generator=g)], dim=1)
        slots = [pages[p // page_size] * page_size + p % page_size for p in range(lens[r])]
        kv[1, :, slots] = data  # shared pages are written with identical data by every member
        partial_copies.append(slots[(plen // page_size) * page_size: plen])
    sizes = [len(sufs) for _, sufs in groups]
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int32)
    q = (torch.randn(len(rows), hq, d, generator=g) * 2).to(dtype)
    kv = kv.to(dtype)
    return dict(
        q=q, k_cache=kv[1, 0], v_cache=kv[1, 1], page_table=page_table,
        kv_lens=torch.tensor(lens, dtype=torch.int32), page_size=page_size, scale=1 / math.sqrt(d),
        group_offsets=offsets, prefix_lens=torch.tensor([p for p, _ in groups], dtype=torch.int32),
    ), partial_copies


def oracle(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, **_):
    """float64 attention of each row over [0, kv_len) through its OWN page table."""
    b, hq, d = q.shape
    group = hq // k_cache.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        slots = [int(page_table[i, p // page_size]) * page_size + p % page_size for p in range(int(kv_lens[i]))]
        for h in range(hq):
            k, v = k_cache[slots, h // group].double(), v_cache[slots, h // group].double()
            out[i, h] = torch.softmax((k @ q[i, h].double()) * scale, 0) @ v
    return out


def plain(a):
    return da.decode_attention(*(a[k] for k in ("q", "k_cache", "v_cache", "page_table", "kv_lens", "page_size", "scale")))


# Groups of 1 to 9 siblings in one batch; prefixes ending mid-page, page-aligned, empty (0), and
# equal to a member's length (empty suffix), including a group whose only suffix is empty.
MIXED = [(21, [3, 0, 12, 1, 7, 30, 2, 5, 9]), (0, [14]), (32, [1, 17, 4]), (5, [0])]
CASES = {
    # dtype, page size, (Hq, Hkv), groups, prefix splits, suffix splits
    "fp32-page16-gqa4-mixed-groups-splits": (torch.float32, 16, (4, 1), MIXED, 2, 2),
    "fp16-page1-gqa2-default-splits": (torch.float16, 1, (4, 2), [(7, [3, 0]), (0, [5]), (12, [1, 1, 4, 2])], None, None),
    "fp32-page3-gqa7": (torch.float32, 3, (7, 1), [(8, [2, 6]), (4, [0])], 3, 1),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_oracle_reference_and_plain_decode(case):
    dtype, page_size, (hq, hkv), groups, p_splits, s_splits = CASES[case]
    a, _ = make_groups(groups, hkv, hq, 16, page_size, dtype)
    want = oracle(**a)
    cfg = da._default_config(a["q"].device)
    got = sp._shared_prefix_triton(*a.values(), p_splits, s_splits, cfg)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert got.dtype == dtype and got.shape == a["q"].shape
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(shared_reference(**a).double(), want, **tol)
    torch.testing.assert_close(got, plain(a), **tol)


def test_public_function_runs_one_prefix_program_per_group_and_kv_head(monkeypatch):
    """The prefix is streamed once per (group, kv head, split), not once per member."""
    assert da._INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"
    grids = []
    kernel = sp._prefix_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sp, "_prefix_kernel", Recorder())
    a, _ = make_groups([(9, [1, 2, 3, 4]), (6, [2, 2])], 2, 4, 16, 4)
    out = shared(**a)
    assert len(grids) == 1 and grids[0][:2] == (2, 2)  # G = 2 groups x Hkv = 2, for B = 6 rows
    torch.testing.assert_close(out.double(), oracle(**a), atol=1e-5, rtol=1e-5)


def test_prefix_is_read_through_the_first_rows_page_table():
    """Break the promise on purpose: siblings' copies of the partial prefix page differ from the
    first member's. The result follows the first row's pages (as the reference defines it), so
    it no longer equals plain decode, which reads each row's own copy."""
    a, partial = make_groups([(6, [2, 3, 1])], 1, 4, 16, 4)  # prefix 6 = one full page + 2 positions
    g = torch.Generator().manual_seed(5)
    for slots in partial[1:]:
        a["k_cache"][slots] = torch.randn(len(slots), 1, 16, generator=g) * 3
    got = sp._shared_prefix_triton(*a.values(), 1, 1, da._default_config(a["q"].device))
    torch.testing.assert_close(got, shared_reference(**a), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1:], plain(a)[1:], atol=1e-3)
    torch.testing.assert_close(got[0], plain(a)[0], atol=1e-5, rtol=1e-5)


def test_empty_batch():
    a, _ = make_groups([(3, [1])], 1, 2, 16, 4)
    a.update(q=a["q"][:0], page_table=a["page_table"][:0], kv_lens=a["kv_lens"][:0],
             group_offsets=torch.zeros(1, dtype=torch.int32), prefix_lens=torch.zeros(0, dtype=torch.int32))
    assert shared(**a).shape == (0, 2, 16)


def test_unsupported_head_dim_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(da, "_WARNED_HEAD_DIMS", set())
    a, _ = make_groups([(5, [1, 3])], 1, 2, 8, 4)  # D = 8
    want = shared_reference(**a)
    with pytest.warns(UserWarning, match=r"head_dim=8 .*torch reference"):
        out = shared(**a)
    assert torch.equal(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(shared(**a), want)


# ------------------------------------------------------------------ bad input


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD = {  # on top of make_groups([(5, [1, 3]), (2, [4])], Hkv=2, Hq=4, D=16, page 4): B = 3, G = 2
    "offsets-end": (dict(group_offsets=_i32(0, 2, 2)), r"group_offsets must start at 0 and end at B=3 .*\[0, 2, 2\]"),
    "offsets-start": (dict(group_offsets=_i32(1, 2, 3)), r"group_offsets must start at 0 .*\[1, 2, 3\]"),
    "offsets-empty-group": (dict(group_offsets=_i32(0, 0, 3)), r"strictly increasing.*\[0, 0, 3\]"),
    "offsets-int64": (dict(group_offsets=torch.tensor([0, 2, 3])), r"group_offsets must be int32; got torch.int64"),
    "offsets-2d": (dict(group_offsets=_i32(0, 2, 3)[None]), r"group_offsets must be \[G\+1\]"),
    "prefix-shape": (dict(prefix_lens=_i32(5, 2, 0)), r"prefix_lens must be \[G=2\]; got shape \(3,\)"),
    "prefix-too-long": (dict(prefix_lens=_i32(7, 2)), r"prefix_lens\[0\] must be in \[0, kv_lens of each of its rows\]; "
                                                       r"got 7 with kv_lens\[0\] = 6"),
    "prefix-negative": (dict(prefix_lens=_i32(5, -1)), r"prefix_lens\[1\] must be in .*got -1"),
    "prefix-page-outside-cache": (dict(page_table=lambda a: _set(a["page_table"], (0, 0), 10_000)),  # read as prefix
                                  r"page_table\[0, 0\] = 10000 points outside the cache"),
    "pt-int64": (dict(page_table=lambda a: a["page_table"].long()), r"page_table must be int32; got torch.int64"),
    "gqa": (dict(q=lambda a: a["q"][:, :3]), r"num_q_heads must be a multiple of num_kv_heads >= 1; got Hq=3, Hkv=2"),
    "device": (dict(prefix_lens=lambda a: a["prefix_lens"].to("meta")), r"prefix_lens must be on q's device cpu; got meta"),
    "dtype": (dict(v_cache=lambda a: a["v_cache"].half()), r"v_cache must have q's dtype torch.float32; got torch.float16"),
}


@pytest.mark.parametrize("fn", [shared, shared_reference], ids=["public", "reference"])
def test_bad_input_raises_value_error_naming_the_value(fn):
    base, _ = make_groups([(5, [1, 3]), (2, [4])], 2, 4, 16, 4)
    for name, (changes, message) in BAD.items():
        a = {**base, **{k: (f(base) if callable(f) else f) for k, f in changes.items()}}
        with pytest.raises(ValueError, match=message):
            fn(**a)


# ------------------------------------------------------------------ GPU at real shapes


def _gpu_groups(num_groups, siblings, prefix, max_suffix, hq=32, hkv=8, d=128, page_size=16, seed=0):
    """Sibling groups on the GPU, pages laid out as make_groups does (vectorised)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = num_groups * siblings
    suffix = torch.randint(0, max_suffix + 1, (b,), device="cuda", generator=g)
    prefix_lens = torch.full((num_groups,), prefix, dtype=torch.int32, device="cuda")
    lens = (prefix + suffix).int()
    full = prefix // page_size
    own = (lens.long() + page_size - 1) // page_size - full
    max_pages = full + int(own.max())
    shared_ids = torch.arange(num_groups * full, device="cuda").view(num_groups, full)
    base = num_groups * full
    own_start = base + torch.cumsum(own, 0) - own
    page_table = torch.zeros(b, max_pages, dtype=torch.int32, device="cuda")
    page_table[:, :full] = shared_ids.repeat_interleave(siblings, 0).int()
    cols = torch.arange(max_pages - full, device="cuda")
    page_table[:, full:] = torch.where(cols[None] < own[:, None], own_start[:, None] + cols[None], 0).int()
    num_pages = base + int(own.sum())
    kv = torch.randn(2, num_pages * page_size, hkv, d, device="cuda", generator=g).bfloat16()
    # Identical prefix data in every member's partial page: copy the first member's rows.
    if prefix % page_size:
        first = torch.arange(num_groups, device="cuda") * siblings
        src = page_table[first, full].long() * page_size
        for m in range(1, siblings):
            dst = page_table[first + m, full].long() * page_size
            for p in range(prefix % page_size):
                kv[:, dst + p] = kv[:, src + p]
    offsets = (torch.arange(num_groups + 1, device="cuda") * siblings).int()
    q = torch.randn(b, hq, d, device="cuda", generator=g).bfloat16()
    return dict(q=q, k_cache=kv[0], v_cache=kv[1], page_table=page_table, kv_lens=lens, page_size=page_size,
                scale=d ** -0.5, group_offsets=offsets, prefix_lens=prefix_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("siblings,prefix", [(16, 800), (4, 1300), (9, 300), (1, 517)])
def test_gpu_bf16_real_shapes_match_reference_and_plain_decode(siblings, prefix):
    a = _gpu_groups(256 // siblings, siblings, prefix, 200)
    out = shared(**a, validate=True)
    ref = shared_reference(**a)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), plain(a).float(), atol=2e-2, rtol=2e-2)
