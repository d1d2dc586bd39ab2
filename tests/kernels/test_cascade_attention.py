"""cascade_decode_attention (Triton, interpreted on CPU) and its torch twin: nested shared prefixes.

Batches are laid out as the engine forks: a tree of prefix nodes (an episode's prompt, states
extending it, ...), rows in depth-first order. Rows whose paths share a node share the pages
that node covers completely; a page only partly inside the shared part is each row's own copy
with identical data (the engine copies a partial page on a fork). Every result is checked
against a float64 dense oracle that reads each row through its own page table, against the
reference and against plain decode_attention.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from test_shared_prefix_attention import oracle, plain  # the float64 oracle and plain decode (same folder)

da = importlib.import_module("engine.kernels.decode_attention")
sp = importlib.import_module("engine.kernels.shared_prefix_attention")
batch_module = importlib.import_module("engine.runtime.batch")
cascade = sp.cascade_decode_attention
cascade_reference = sp.cascade_decode_attention_reference


def make_tree(nodes, rows, hkv, hq, d, page_size, dtype=torch.float32, seed=0):
    """nodes: {name: (parent or None, length)}; rows: [(deepest node, own length)] in DFS order.

    Returns the kernel arguments (without segments) and each row's node path (root first).
    """
    g = torch.Generator().manual_seed(seed)
    data = {n: torch.randn(2, length, hkv, d, generator=g) for n, (_, length) in nodes.items()}
    ends = {}

    def end(n):
        if n not in ends:
            parent, length = nodes[n]
            ends[n] = length + (end(parent) if parent else 0)
        return ends[n]

    def path(n):
        return (path(nodes[n][0]) if nodes[n][0] else []) + [n]

    paths = [path(n) for n, _ in rows]
    lens = [end(n) + own for n, own in rows]
    max_pages = max(math.ceil(n / page_size) for n in lens)
    page_ids: dict[object, int] = {}
    page_table = torch.zeros(len(rows), max_pages, dtype=torch.int32)
    kv = torch.zeros(2, (len(rows) * max_pages + 1) * page_size, hkv, d)
    for r, (p, (_, own)) in enumerate(zip(paths, rows)):
        row_data = torch.cat([data[n] for n in p] + [torch.randn(2, own, hkv, d, generator=g)], dim=1)
        for j in range(math.ceil(lens[r] / page_size)):
            # A page is shared by the rows through the shallowest node that covers it completely.
            owner = next((n for n in p if end(n) >= (j + 1) * page_size), None)
            key = (owner, j) if owner is not None else ("own", r, j)
            page = page_ids.setdefault(key, len(page_ids))
            page_table[r, j] = page
            lo, hi = j * page_size, min((j + 1) * page_size, lens[r])
            kv[:, page * page_size: page * page_size + hi - lo] = row_data[:, lo:hi]
    q = (torch.randn(len(rows), hq, d, generator=g) * 2).to(dtype)
    kv = kv.to(dtype)
    args = dict(q=q, k_cache=kv[0], v_cache=kv[1], page_table=page_table,
                kv_lens=torch.tensor(lens, dtype=torch.int32), page_size=page_size, scale=1 / math.sqrt(d))
    return args, paths, ends


def tree_segments(paths, ends):
    """One segment per node shared by >= 2 rows, over the node's own positions, at its depth."""
    segments, suffix = [], []
    for r, p in enumerate(paths):
        shared = [n for n in p if sum(n in q for q in paths) >= 2]
        suffix.append(ends[shared[-1]] if shared else 0)
    for n in {n for p in paths for n in p}:
        members = [r for r, p in enumerate(paths) if n in p]
        if len(members) < 2:
            continue
        p = paths[members[0]]
        depth = sum(1 for m in p[:p.index(n)] if sum(m in q for q in paths) >= 2)
        parent_end = ends[p[p.index(n) - 1]] if p.index(n) > 0 else 0
        segments.append((members[0], members[-1] + 1, parent_end, ends[n], depth))
    levels = 1 + max(s[4] for s in segments)
    return torch.tensor(sorted(segments), dtype=torch.int32), torch.tensor(suffix, dtype=torch.int32), levels


# An episode: prompt P; states S1 (P + 7), S2 (S1 + 9), S3 (S2 + 5), each with rollouts; a second
# episode of the same prompt with one state; a loner. Node ends fall mid-page and on page ends.
EPISODES = ({"P": (None, 11), "S1": ("P", 7), "S2": ("S1", 9), "S3": ("S2", 5), "E2": ("P", 6), "L": (None, 9)},
            [("P", 3), ("P", 1), ("S1", 2), ("S1", 0), ("S1", 5), ("S2", 1), ("S2", 4), ("S3", 2), ("S3", 1),
             ("E2", 3), ("E2", 2), ("L", 4)])
CASES = {
    # dtype, page size, (Hq, Hkv), prefix splits, suffix splits
    "fp32-page4-gqa2-splits": (torch.float32, 4, (4, 2), 2, 2),
    "fp16-page1-gqa4-default-splits": (torch.float16, 1, (4, 1), None, None),
    "fp32-page16-mha": (torch.float32, 16, (2, 2), 1, 1),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_oracle_reference_and_plain_decode(case):
    dtype, page_size, (hq, hkv), p_splits, s_splits = CASES[case]
    a, paths, ends = make_tree(*EPISODES, hkv, hq, 16, page_size, dtype)
    segments, suffix, levels = tree_segments(paths, ends)
    assert levels == 4  # P, S1, S2, S3
    want = oracle(**a)
    got = cascade(**a, segments=segments, suffix_starts=suffix, num_levels=levels, prefix_splits=p_splits,
                  suffix_splits=s_splits)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert got.dtype == dtype and got.shape == a["q"].shape
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(cascade_reference(**a, segments=segments, suffix_starts=suffix,
                                                 num_levels=levels).double(), want, **tol)
    torch.testing.assert_close(got, plain(a), **tol)


def test_the_engines_layout_of_the_same_tables_gives_the_same_attention():
    """cascade_layout reads the tree back from the page ids (whole pages only) and reads each page once."""
    a, paths, ends = make_tree(*EPISODES, 1, 2, 16, 4)
    segments, suffix, levels = batch_module.cascade_layout(a["page_table"], a["kv_lens"], 4, 1)
    assert levels == 4
    got = cascade(**a, segments=segments, suffix_starts=suffix, num_levels=levels)
    torch.testing.assert_close(got.double(), oracle(**a), atol=1e-5, rtol=1e-5)
    b = batch_module.StepBatch(slot_mapping=None, positions=None, num_tokens=0, decode_kv_lens=a["kv_lens"].numpy(),
                               decode_tables=a["page_table"].numpy(), cascade_segments=segments.numpy(),
                               suffix_starts=suffix.numpy(), cascade_levels=levels)
    assert batch_module.kv_tokens_read(b) == batch_module.kv_tokens_ideal(b, 4)


def test_padding_segments_and_spare_levels_change_nothing():
    """A CUDA graph's static layout: empty segments up to B, more levels than used, fixed splits."""
    a, paths, ends = make_tree(*EPISODES, 2, 4, 16, 4)
    segments, suffix, levels = tree_segments(paths, ends)
    padded = torch.zeros(a["q"].shape[0], 5, dtype=torch.int32)
    padded[:len(segments)] = segments
    want = cascade(**a, segments=segments, suffix_starts=suffix, num_levels=levels, prefix_splits=1, suffix_splits=1)
    got = cascade(**a, segments=padded, suffix_starts=suffix, num_levels=8, prefix_splits=1, suffix_splits=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_each_shared_range_is_streamed_by_one_program_per_kv_head(monkeypatch):
    assert da._INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"
    grids = []
    kernel = sp._prefix_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sp, "_prefix_kernel", Recorder())
    a, paths, ends = make_tree(*EPISODES, 2, 4, 16, 4)
    segments, suffix, levels = tree_segments(paths, ends)
    cascade(**a, segments=segments, suffix_starts=suffix, num_levels=levels, prefix_splits=1)
    assert grids == [(len(segments), 2, 1)] and len(segments) == 5  # P, S1, S2, S3, E2 (not the loner)


@pytest.mark.parametrize("fn", [cascade, cascade_reference], ids=["public", "reference"])
@pytest.mark.parametrize("levels", [0, 2])
def test_no_segments_is_plain_decode(fn, levels):
    a, _, _ = make_tree({"A": (None, 5)}, [("A", 3), ("A", 1)], 1, 2, 16, 4)
    got = fn(**a, segments=torch.zeros(0, 5, dtype=torch.int32), suffix_starts=torch.zeros(2, dtype=torch.int32),
             num_levels=levels)
    torch.testing.assert_close(got, plain(a), atol=1e-6, rtol=0)


def test_unvalidated_garbage_segments_stay_inside_memory():
    """The launcher without validation (as on CUDA): every segment field is clamped in the kernel."""
    a, paths, ends = make_tree(NODES, ROWS, 1, 2, 16, 4)
    big = 10 ** 9
    garbage = torch.tensor([[5, 1000, -7, big, 99], [-3, 2, big, -big, -1], [2, 1, 0, 12, 0]], dtype=torch.int32)
    suffix = torch.tensor([big, -5, 3], dtype=torch.int32)
    args = [a[k] for k in ("q", "k_cache", "v_cache", "page_table", "kv_lens", "page_size", "scale")]
    out = sp._cascade_triton(*args, garbage, suffix, 2, 2, 1, da._default_config(a["q"].device))
    assert out.shape == a["q"].shape and bool(torch.isfinite(out).all())


# ------------------------------------------------------------------ bad input

NODES = {"A": (None, 8), "B": ("A", 4)}
ROWS = [("A", 2), ("B", 1), ("B", 3)]  # segments: A over rows 0-2 [0, 8) level 0; B over rows 1-2 [8, 12) level 1


def _i32(*rows):
    return torch.tensor(rows, dtype=torch.int32)


BAD = {
    "segments-shape": (dict(segments=_i32(0, 3, 0, 8)), r"segments must be \[S, 5\]"),
    "segments-int64": (dict(segments=lambda a: a["segments"].long()), r"segments must be int32; got torch.int64"),
    "rows": (dict(segments=_i32([0, 4, 0, 8, 0], [1, 3, 8, 12, 1])), r"segments\[0\] rows \[0, 4\) must satisfy .*B=3"),
    "positions": (dict(segments=_i32([0, 3, 8, 0, 0], [1, 3, 8, 12, 1])), r"segments\[0\] positions \[8, 0\)"),
    "level": (dict(segments=_i32([0, 3, 0, 8, 0], [1, 3, 8, 12, 2])), r"segments\[1\] level 2 must be in \[0, num_levels=2\)"),
    "two-at-one-level": (dict(segments=_i32([0, 3, 0, 8, 0], [1, 3, 8, 12, 0])), r"row 1 is covered by 2 segments at level 0"),
    "gap": (dict(segments=_i32([0, 3, 0, 8, 0], [1, 3, 4, 12, 1])), r"row 1: its level-1 segment starts at 4.*ends at 8"),
    "missing-level": (dict(segments=_i32([0, 1, 0, 8, 0], [1, 3, 0, 12, 1])), r"row 1: its level-1 .*a lower level is missing"),
    "suffix-mismatch": (dict(suffix_starts=_i32(8, 8, 12)), r"row 1: its segments end at 12 but suffix_starts\[1\] = 8"),
    "suffix-past-len": (dict(suffix_starts=_i32(8, 12, 16)), r"suffix_starts\[2\] = 16 must be in \[0, kv_lens\[2\] = 15\]"),
    "levels": (dict(num_levels=-1), r"num_levels must be an int >= 0; got -1"),
    "suffix-device": (dict(suffix_starts=lambda a: a["suffix_starts"].to("meta")), r"suffix_starts must be on q's device"),
    "page-outside": (dict(page_table=lambda a: a["page_table"].index_fill(0, torch.tensor([1]), 10_000)),
                     r"page_table\[1, 2\] = 10000 points outside the cache"),
}


@pytest.mark.parametrize("fn", [cascade, cascade_reference], ids=["public", "reference"])
def test_bad_input_raises_value_error_naming_the_value(fn):
    a, paths, ends = make_tree(NODES, ROWS, 1, 2, 16, 4)
    segments, suffix, levels = tree_segments(paths, ends)
    assert segments.tolist() == [[0, 3, 0, 8, 0], [1, 3, 8, 12, 1]] and suffix.tolist() == [8, 12, 12]
    base = {**a, "segments": segments, "suffix_starts": suffix, "num_levels": levels}
    for name, (changes, message) in BAD.items():
        args = {**base, **{k: (f(base) if callable(f) else f) for k, f in changes.items()}}
        with pytest.raises(ValueError, match=message):
            fn(**args)
    with pytest.raises(ValueError, match=r"prefix_splits must be None or an int >= 1; got 0"):
        cascade(**base, prefix_splits=0)


# ------------------------------------------------------------------ GPU at real shapes


@pytest.mark.gpu
def test_gpu_bf16_episode_tree_matches_reference_and_plain_decode():
    """32 episodes x 4 nested states x K = 2 rollouts at a Llama-1.1B head shape, page 16."""
    nodes, rows = {}, []
    for e in range(32):
        nodes[f"P{e}"] = (None, 300)
        parent = f"P{e}"
        for s in range(4):
            nodes[f"S{e}.{s}"] = (parent, 40 + 16 * s)
            parent = f"S{e}.{s}"
            rows += [(parent, 30), (parent, 70)]
    a, paths, ends = make_tree(nodes, rows, 4, 32, 64, 16, torch.bfloat16)
    a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    segments, suffix, levels = batch_module.cascade_layout(a["page_table"].cpu(), a["kv_lens"].cpu(), 16, 16)
    out = cascade(**a, segments=segments.cuda(), suffix_starts=suffix.cuda(), num_levels=levels, validate=True)
    torch.testing.assert_close(out.float(), plain(a).float(), atol=2e-2, rtol=2e-2)
    ref = cascade_reference(**a, segments=segments.cuda(), suffix_starts=suffix.cuda(), num_levels=levels)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
