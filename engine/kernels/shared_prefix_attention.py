"""Decode attention over a tree of shared prefixes (a cascade, Hydragen-style, any depth).

Decode rows forked from one cached prefix hold identical K/V for it (the same pages). A plain
paged decode kernel reads such a prefix once per row; here each shared range is read once for
all the rows that share it. The sharing is described by *segments*, one per shared range:

    segments int32 [S, 5]: (first_row, end_row, kv_start, kv_end, level)

Segment s says: rows [first_row, end_row) all hold the same K/V at positions [kv_start, kv_end),
read through the page table of `first_row`. Each row's segments tile its shared part in order:
a row covered by d segments has them at levels 0 .. d-1, level 0 starts at position 0, level
l + 1 starts where level l ends, and the last one ends at `suffix_starts[row]` (0 for a row with
no segment). The row's own positions [suffix_starts[row], kv_lens[row]) are read per row. Nested
sharing (an episode's prompt shared by all its MC states, each state's prefix shared by its K
rollouts, a chain of states each extending the previous one) is a tree of segments, and every
distinct page of the tree is read once per step. Rows of one segment are contiguous, so the
builder orders rows so that siblings are adjacent (engine/runtime/batch.py: `cascade_layout`).

    prefix pass   one program per (segment, kv head, split) stacks the queries of the segment's
                  rows x the query heads of that kv head into [BLOCK_M, D] tiles, so every K/V
                  tile of the shared range feeds a tensor-core matmul for all of them
                  (`_prefix_kernel`); it writes the partial to slot level * P + split;
    suffix pass   decode attention over each row's own positions (engine.kernels.decode_attention's
                  stage-1 kernel with kv_starts = suffix_starts), slots L * P .. L * P + S - 1;
    merge         one stage-2 LSE merge over all slots (engine.kernels.merge_states.merge_partials),
                  rounded once to q's dtype. Slots of levels a row does not have keep lse = -inf
                  (weight 0; their partials are never read).

Row tiles: a segment with more than BLOCK_M stacked rows (rows x GROUP heads) is processed as
several row tiles inside its program, one after the other, each streaming the program's chunk;
the repeated reads of a chunk come from L2.

CUDA graphs: the grid depends only on S (a static bound: padding segments have
first_row == end_row and do nothing), the number of levels and the split counts, never on the
tensors' values, so a captured graph replays any layout that fits those bounds.

`cascade_decode_attention_reference` is the plain-torch twin (same signature). The sibling-group
form `shared_prefix_decode_attention(..., group_offsets, prefix_lens)` (one level: consecutive
groups, each sharing [0, prefix_len)) is kept for callers and tests, with its own twin. Both
public functions dispatch like the other kernels (Triton on CUDA or under TRITON_INTERPRET=1,
else the reference; head_dim outside [16, 256] falls back to the reference with a warning).
No sliding window: windowed layers use decode_attention.
"""
from __future__ import annotations

import torch

from engine.kernels.decode_attention import (
    _attend_reference,
    _check_index_vector,
    _check_paged_inputs,
    _check_paged_values,
    _Config,
    _default_config,
    _default_splits,
    _block_d,
    _dot_flags,
    _INTERPRETED,
    _is_int,
    _kernel_supports,
    _launch_decode_stage1,
    _on,
    _prepare,
    _use_triton,
    triton,
)
from engine.kernels.merge_states import merge_partials, merge_states_reference

if triton is not None:
    import triton.language as tl

    from engine.kernels.decode_attention import _attend_range, _finish_state

SEGMENT_FIELDS = ("first_row", "end_row", "kv_start", "kv_end", "level")


# --------------------------------------------------------------------------- validation


def _check_cascade_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments, suffix_starts,
                          num_levels) -> None:
    """Shapes, dtypes and devices (no device sync)."""
    _check_paged_inputs(q, k_cache, v_cache, page_table, page_size, scale)
    _check_index_vector("kv_lens", kv_lens, q.shape[0], q.device)
    _check_index_vector("suffix_starts", suffix_starts, q.shape[0], q.device)
    if segments.dim() != 2 or segments.shape[1] != len(SEGMENT_FIELDS):
        raise ValueError(f"segments must be [S, 5] {SEGMENT_FIELDS}; got shape {tuple(segments.shape)}")
    if segments.dtype != torch.int32:
        raise ValueError(f"segments must be int32; got {segments.dtype}")
    if segments.device != q.device:
        raise ValueError(f"segments must be on q's device {q.device}; got {segments.device}")
    if not _is_int(num_levels) or num_levels < 0:
        raise ValueError(f"num_levels must be an int >= 0; got {num_levels!r}")


def _level_ranges(segments: torch.Tensor, b: int, num_levels: int):
    """Per level l: (has [B] bool, table_row [B], lo [B], hi [B]) of each row's level-l segment.

    Raises if a row has two segments at one level. Empty segments (first_row == end_row) cover nothing.
    """
    seg = segments.long()
    rows = torch.arange(b, device=segments.device)
    if seg.shape[0] == 0:  # no shared range: every level empty
        zero = torch.zeros_like(rows)
        return [(torch.zeros(b, dtype=torch.bool, device=rows.device), rows, zero, zero)] * num_levels
    cover = (seg[None, :, 0] <= rows[:, None]) & (rows[:, None] < seg[None, :, 1])  # [B, S]
    out = []
    for level in range(num_levels):
        at = cover & (seg[None, :, 4] == level)
        count = at.sum(1)
        if bool((count > 1).any()):
            r = int((count > 1).nonzero()[0, 0])
            raise ValueError(f"row {r} is covered by {int(count[r])} segments at level {level}; at most one")
        idx = at.long().argmax(1)  # the covering segment (0 where none; masked by `has`)
        has = count == 1
        zero = torch.zeros_like(rows)
        out.append((has, torch.where(has, seg[idx, 0], rows), torch.where(has, seg[idx, 2], zero),
                    torch.where(has, seg[idx, 3], zero)))
    return out


def _check_cascade_values(page_table, kv_lens, page_size, num_slots, segments, suffix_starts, num_levels) -> None:
    """Host check of the segment layout and index values (one device sync on CUDA)."""
    b = kv_lens.shape[0]
    seg = segments.long()
    first, end, lo, hi, level = seg.unbind(1)
    checks = (
        ((first < 0) | (first > end) | (end > b), "rows [{0}, {1}) must satisfy 0 <= first_row <= end_row <= B=" + str(b)),
        ((lo < 0) | (lo > hi), "positions [{2}, {3}) must satisfy 0 <= kv_start <= kv_end"),
        ((first < end) & ((level < 0) | (level >= num_levels)), "level {4} must be in [0, num_levels=" + str(num_levels) + ")"),
    )
    for bad, message in checks:
        if bool(bad.any()):
            s = int(bad.nonzero()[0, 0])
            raise ValueError(f"segments[{s}] " + message.format(*(int(x) for x in seg[s])))
    suffix = suffix_starts.long()
    lens = kv_lens.long()
    bad = (suffix < 0) | (suffix > lens)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"suffix_starts[{r}] = {int(suffix[r])} must be in [0, kv_lens[{r}] = {int(lens[r])}]")
    levels = _level_ranges(segments, b, num_levels)
    end = torch.zeros_like(suffix)  # where the row's shared part reached so far
    present = torch.ones(b, dtype=torch.bool, device=suffix.device)
    for level, (has, table_row, lo, hi) in enumerate(levels):
        gap = has & (~present | (lo != end))
        if bool(gap.any()):
            r = int(gap.nonzero()[0, 0])
            raise ValueError(
                f"row {r}: its level-{level} segment starts at {int(lo[r])}, but its shared ranges must tile "
                f"[0, suffix_start) in level order (the previous level ends at {int(end[r])}"
                + ("" if bool(present[r]) else ", and a lower level is missing") + ")"
            )
        end = torch.where(has, hi, end)
        present = present & has
        # The level's range is read through the segment's first row's page table.
        _check_paged_values(page_table[table_row], page_size, num_slots, kv_lens, lo, hi)
    bad = end != suffix
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"row {r}: its segments end at {int(end[r])} but suffix_starts[{r}] = {int(suffix[r])}; "
                         "the shared ranges must reach the suffix")
    _check_paged_values(page_table, page_size, num_slots, kv_lens, suffix, lens)


def _check_group_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens):
    """Shapes, dtypes and devices of the sibling-group form (no device sync)."""
    _check_paged_inputs(q, k_cache, v_cache, page_table, page_size, scale)
    _check_index_vector("kv_lens", kv_lens, q.shape[0], q.device)
    if group_offsets.dim() != 1 or group_offsets.shape[0] < 1:
        raise ValueError(f"group_offsets must be [G+1] with G >= 0; got shape {tuple(group_offsets.shape)}")
    num_groups = group_offsets.shape[0] - 1
    _check_index_vector("group_offsets", group_offsets, num_groups + 1, q.device, n_name="G+1")
    _check_index_vector("prefix_lens", prefix_lens, num_groups, q.device, n_name="G")


def _row_groups(group_offsets: torch.Tensor, b: int) -> torch.Tensor:
    """int64 [B]: the group of each row (clamped to a valid group id even for bad offsets)."""
    rows = torch.arange(b, device=group_offsets.device, dtype=torch.int32)
    g = torch.searchsorted(group_offsets[1:].contiguous(), rows, right=True)
    return g.clamp_max(max(group_offsets.shape[0] - 2, 0))


def _check_group_values(page_table, kv_lens, page_size, num_slots, group_offsets, prefix_lens) -> None:
    """Host check of the group layout and index values (one device sync on CUDA)."""
    b = kv_lens.shape[0]
    offs = group_offsets.long().cpu()
    if offs[0] != 0 or offs[-1] != b:
        raise ValueError(
            f"group_offsets must start at 0 and end at B={b} (the groups cover every row); got {offs.tolist()}"
        )
    if bool((offs[1:] <= offs[:-1]).any()):
        raise ValueError(f"group_offsets must be strictly increasing (every group has >= 1 row); got {offs.tolist()}")
    if b == 0:
        return
    row_group = _row_groups(group_offsets, b)
    plen_row = prefix_lens.long()[row_group]
    bad = (plen_row < 0) | (plen_row > kv_lens.long())
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        g = int(row_group[r])
        raise ValueError(
            f"prefix_lens[{g}] must be in [0, kv_lens of each of its rows]; got {int(prefix_lens[g])} "
            f"with kv_lens[{r}] = {int(kv_lens[r])}"
        )
    # Suffix reads: each row's own table over [prefix, kv_len). Prefix reads: the first row's table.
    _check_paged_values(page_table, page_size, num_slots, kv_lens, plen_row, kv_lens.long())
    is_first = torch.arange(b, device=kv_lens.device) == group_offsets.long()[row_group]
    _check_paged_values(page_table, page_size, num_slots, kv_lens, torch.zeros_like(plen_row),
                        torch.where(is_first, plen_row, 0))


def groups_as_cascade(group_offsets: torch.Tensor, prefix_lens: torch.Tensor, num_rows: int):
    """(segments [G, 5], suffix_starts [B]) of consecutive sibling groups: one level, on their device, no sync."""
    g = prefix_lens.shape[0]
    zeros = torch.zeros(g, dtype=torch.int32, device=prefix_lens.device)
    segments = torch.stack([group_offsets[:-1], group_offsets[1:], zeros, prefix_lens, zeros], dim=1)
    suffix = prefix_lens[_row_groups(group_offsets, num_rows)] if g > 0 else \
        torch.zeros(num_rows, dtype=torch.int32, device=prefix_lens.device)
    return segments.contiguous(), suffix.contiguous()


# --------------------------------------------------------------------------- reference twins


def cascade_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    segments: torch.Tensor,
    suffix_starts: torch.Tensor,
    num_levels: int,
    *,
    validate: bool = False,
    prefix_splits: int | None = None,
    suffix_splits: int | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `cascade_decode_attention`: same arguments, results and errors.

    Always checks the layout and index values (the split counts only shape the kernels' work). Each level's range is attended through its
    segment's first-row page table, the suffix through each row's own, merged in fp32.
    """
    _check_cascade_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments, suffix_starts,
                          num_levels)
    _check_cascade_values(page_table, kv_lens, page_size, k_cache.shape[0], segments, suffix_starts, num_levels)
    o, lse = _attend_reference(q, k_cache, v_cache, page_table, suffix_starts.long(), kv_lens.long(), page_size, scale)
    for _, table_row, lo, hi in _level_ranges(segments, q.shape[0], num_levels):
        o_l, lse_l = _attend_reference(q, k_cache, v_cache, page_table[table_row], lo, hi, page_size, scale)
        o, lse = merge_states_reference(o, lse, o_l, lse_l)  # fp32 in, fp32 out
    return o.to(q.dtype)


def shared_prefix_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    group_offsets: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Plain-torch twin of `shared_prefix_decode_attention`: same arguments, results and errors.

    Always checks index values. Prefix attention reads each group's first-row page table,
    suffix attention each row's own, and the two are merged in fp32 by merge_states_reference.
    """
    _check_group_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens)
    _check_group_values(page_table, kv_lens, page_size, k_cache.shape[0], group_offsets, prefix_lens)
    b = q.shape[0]
    row_group = _row_groups(group_offsets, b)
    plen = prefix_lens.long()[row_group]
    first_rows = group_offsets.long()[row_group]
    o_p, lse_p = _attend_reference(q, k_cache, v_cache, page_table[first_rows], torch.zeros_like(plen), plen,
                                   page_size, scale)
    o_s, lse_s = _attend_reference(q, k_cache, v_cache, page_table, plen, kv_lens.long(), page_size, scale)
    out, _ = merge_states_reference(o_p, lse_p, o_s, lse_s)  # fp32 in, fp32 out
    return out.to(q.dtype)


# --------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _prefix_kernel(
        q_ptr, k_ptr, v_ptr, pt_ptr, seg_ptr, o_ptr, lse_ptr,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        num_rows, num_levels, max_pos, max_slot, qk_scale,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (segment s, kv head, split): every row x query head of that kv head over one
        chunk of the segment's [kv_start, kv_end); writes (o, lse) to slot level * splits + split.
        An empty chunk writes nothing: the launcher fills every prefix slot's lse with -inf first.

        Stacked row j of the segment is row r0 + j // GROUP, query head kvh * GROUP + j % GROUP.
        Every value read from the segment is clamped into range: memory safety on unvalidated input.
        """
        s = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        seg = seg_ptr + s * 5
        r0 = tl.minimum(tl.maximum(tl.load(seg), 0), num_rows)
        r1 = tl.minimum(tl.maximum(tl.load(seg + 1), r0), num_rows)
        lo = tl.minimum(tl.maximum(tl.load(seg + 2), 0), max_pos)
        hi = tl.minimum(tl.maximum(tl.load(seg + 3), lo), max_pos)
        level = tl.minimum(tl.maximum(tl.load(seg + 4), 0), num_levels - 1)
        split_len = tl.cdiv(tl.cdiv(hi - lo, n_splits), BLOCK_N) * BLOCK_N
        s_lo = lo + split * split_len
        s_hi = tl.minimum(s_lo + split_len, hi)
        if (r1 <= r0) | (s_hi <= s_lo):  # a padding segment or an empty chunk: its slot stays lse = -inf
            return
        slot = level * n_splits + split
        pt_row = pt_ptr + r0.to(tl.int64) * stride_pt  # the shared pages: the segment's first row
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh

        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        n_stacked = (r1 - r0) * GROUP
        for m0 in range(0, n_stacked, BLOCK_M):
            j = m0 + tl.arange(0, BLOCK_M)
            j_ok = j < n_stacked  # rows past the segment are padding: zero queries, never stored
            row = (r0 + j // GROUP).to(tl.int64)
            head = kvh * GROUP + j % GROUP
            q = tl.load(q_ptr + row[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, k_base, v_base, pt_row, s_lo, s_hi, stride_ks, stride_vs,
                offs_d, d_ok, max_slot, qk_scale, PAGE_SIZE, BLOCK_N, BLOCK_D == HEAD_DIM, UPCAST, IEEE,
            )
            o, lse = _finish_state(acc, m_i, l_i)
            o_rows = o_ptr + row[:, None] * stride_ob + head[:, None] * stride_oh + slot * stride_os + offs_d[None, :]
            tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=j_ok[:, None] & d_ok[None, :])
            tl.store(lse_ptr + row * stride_lb + head * stride_lh + slot * stride_ls, lse, mask=j_ok)


# --------------------------------------------------------------------------- Triton launcher


def _prefix_config(device: torch.device, dtype: torch.dtype | None, head_dim: int) -> _Config:
    """The prefix pass's tiles: the decode config, with 8 warps at head_dim > 64 on the GPU.

    A [64, 128] fp32 accumulator plus the bf16 query tile and a [64, 64] score tile do not fit
    4 warps' registers on sm_80 (ptxas spills; bench.compile_report); 8 warps halve the share.
    """
    cfg = _default_config(device, dtype, head_dim)
    if device.type == "cuda" and not _INTERPRETED:
        if head_dim > 64 and cfg.num_warps < 8:
            cfg = _Config(block_n=cfg.block_n, block_m=cfg.block_m, num_warps=8, num_stages=cfg.num_stages)
    return cfg


def _cascade_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments, suffix_starts,
                    num_levels: int, prefix_splits: int | None, suffix_splits: int | None,
                    cfg: _Config, prefix_cfg: _Config | None = None) -> torch.Tensor:
    """Prefix pass (every segment) + suffix pass into one workspace, one stage-2 merge; out in q's dtype.

    Allocation and grids depend only on shapes and the host ints, so this is CUDA-graph safe.
    """
    q, page_table, kv_lens, suffix_starts = _prepare(q, page_table, kv_lens, suffix_starts)
    segments = segments.contiguous()
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    num_segments = segments.shape[0]
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    cap = page_table.shape[1] * page_size
    levels = num_levels if num_segments > 0 else 0
    if prefix_splits is None:  # bounded so that the workspace keeps <= 64 prefix slots however deep the tree
        prefix_splits = max(1, min(_default_splits(max(num_segments, 1) * hkv, cap, q.device), 64 // max(levels, 1)))
    if suffix_splits is None:
        suffix_splits = _default_splits(b * hkv, cap, q.device)
    base = levels * prefix_splits
    o_part = torch.empty(b, hq, base + suffix_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, hq, base + suffix_splits, dtype=torch.float32, device=q.device)
    if levels > 0:
        lse_part[:, :, :base] = float("-inf")  # levels a row does not have stay empty
        pcfg = prefix_cfg or cfg
        with _on(q.device):
            _prefix_kernel[(num_segments, hkv, prefix_splits)](
                q, k_cache, v_cache, page_table, segments, o_part, lse_part,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                page_table.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
                lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
                b, levels, cap, k_cache.shape[0] - 1, float(scale) * 1.4426950408889634,  # log2(e)
                HEAD_DIM=d, GROUP=hq // hkv, PAGE_SIZE=page_size,
                BLOCK_M=pcfg.block_m, BLOCK_N=pcfg.block_n, BLOCK_D=_block_d(d),
                num_warps=pcfg.num_warps, num_stages=pcfg.num_stages, **_dot_flags(q.dtype),
            )
    _launch_decode_stage1(q, k_cache, v_cache, page_table, kv_lens, suffix_starts, None, page_size, scale,
                          o_part, lse_part, base, suffix_splits, cfg)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    merge_partials(o_part, lse_part, out, lse)
    return out


def _shared_prefix_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens,
                          prefix_splits: int | None, suffix_splits: int | None, cfg: _Config) -> torch.Tensor:
    """The sibling-group form through the cascade kernels (one level)."""
    segments, suffix = groups_as_cascade(group_offsets.contiguous(), prefix_lens.contiguous(), q.shape[0])
    return _cascade_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments, suffix, 1,
                           prefix_splits, suffix_splits, cfg, _prefix_config(q.device, q.dtype, q.shape[2]))


# --------------------------------------------------------------------------- public ops


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    segments: torch.Tensor,
    suffix_starts: torch.Tensor,
    num_levels: int,
    *,
    validate: bool = False,
    prefix_splits: int | None = None,
    suffix_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention where segments of rows share the K/V of nested prefixes (module docstring).

    Arguments as engine.kernels.decode_attention (q [B, Hq, D], caches [num_slots, Hkv, D], int32
    page_table [B, max_pages] and kv_lens [B]) plus int32 segments [S, 5] (first_row, end_row,
    kv_start, kv_end, level), int32 suffix_starts [B] and num_levels (a host int > every level).
    Returns out [B, Hq, D] in q's dtype, equal to decode_attention up to rounding when the
    segments' rows really share those pages. Shapes, dtypes and devices are always checked; the
    layout and index values when the tensors are on the CPU or `validate=True` (one device sync).
    `prefix_splits` (per level) and `suffix_splits` fix the split-K counts (None: a heuristic on
    shapes); a CUDA graph passes fixed ones.
    """
    _check_cascade_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments, suffix_starts,
                          num_levels)
    for name, n in (("prefix_splits", prefix_splits), ("suffix_splits", suffix_splits)):
        if n is not None and (not _is_int(n) or n < 1):
            raise ValueError(f"{name} must be None or an int >= 1; got {n!r}")
    if _use_triton(q) and k_cache.shape[0] > 0 and _kernel_supports("cascade_decode_attention", q.shape[2]):
        if validate or not q.is_cuda:
            _check_cascade_values(page_table, kv_lens, page_size, k_cache.shape[0], segments, suffix_starts,
                                  num_levels)
        d = q.shape[2]
        return _cascade_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments, suffix_starts,
                               num_levels, prefix_splits, suffix_splits, _default_config(q.device, q.dtype, d),
                               _prefix_config(q.device, q.dtype, d))
    return cascade_decode_attention_reference(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, segments,
                                              suffix_starts, num_levels, validate=validate)


def shared_prefix_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    group_offsets: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Decode attention where the rows of each sibling group share the K/V of a prefix (one level).

    Arguments as engine.kernels.decode_attention plus int32 group_offsets [G+1] (group g owns rows
    [group_offsets[g], group_offsets[g+1]); groups cover all rows, each >= 1 row) and int32
    prefix_lens [G] (0 <= prefix_lens[g] <= kv_lens of each member; the prefix K/V is read
    through the page table of the group's first row). Returns out [B, Hq, D] in q's dtype, equal
    to decode_attention up to rounding. Shapes, dtypes and devices are always checked; the group
    layout and index values when the tensors are on the CPU or `validate=True` (one device sync).
    """
    _check_group_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens)
    if (
        _use_triton(q)
        and k_cache.shape[0] > 0
        and _kernel_supports("shared_prefix_decode_attention", q.shape[2])
    ):
        if validate or not q.is_cuda:
            _check_group_values(page_table, kv_lens, page_size, k_cache.shape[0], group_offsets, prefix_lens)
        return _shared_prefix_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets,
                                     prefix_lens, None, None, _default_config(q.device, q.dtype, q.shape[2]))
    return shared_prefix_decode_attention_reference(
        q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens, validate=validate,
    )
