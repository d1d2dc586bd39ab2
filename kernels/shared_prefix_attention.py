"""Decode attention for groups of sibling sequences that share a cached prefix (Hydragen-style).

The B rows of a decode batch come in groups: group g owns the contiguous rows
[group_offsets[g], group_offsets[g+1]), and all of its members hold identical K/V for positions
[0, prefix_lens[g]) (forks of one radix-cache node). A plain paged decode kernel reads that
prefix once per member; here it is read once per group:

    prefix pass   each member's query over [0, prefix_lens[g]), read through the page table of
                  the group's first row: one program per (group, kv head, prefix split) stacks
                  the queries of all members x the query heads of that kv head into one
                  [BLOCK_M, D] tile, so every K/V tile feeds a tensor-core matmul for the whole
                  group (`_prefix_kernel`);
    suffix pass   decode attention over each row's own positions [prefix_lens[g], kv_lens[b])
                  (kernels.decode_attention's stage-1 kernel with kv_starts = the prefix length);
    merge         the two partial attentions combined by their LSEs in fp32
                  (o = o_p e^{lse_p - lse} + o_s e^{lse_s - lse}, lse = logaddexp).

Triton path: the prefix splits and the suffix splits write their fp32 partials into one
workspace [B, Hq, P + S, D] (slots 0..P-1 and P..P+S-1), and a single stage-2 merge
(kernels.merge_states.merge_partials) reduces all of them and rounds once to q's dtype: the
prefix/suffix merge of the cascade and the split-K reduction are the same LSE merge, so the
suffix never rounds to bf16 before it meets the prefix.

Row tiles: a group with more than BLOCK_M stacked rows (members x GROUP heads; 64 on the GPU,
i.e. 16 siblings at 4 query heads per kv head) is processed as several row tiles inside the same
program, one after the other, each streaming the program's prefix chunk; the repeated reads of a
chunk come from L2 (a chunk of 256 positions x 128 dims is 128 KB of K + V per kv head).

`shared_prefix_decode_attention_reference` is the plain-torch twin (same signature: prefix
attention through each group's first-row page table, suffix attention, merge_states_reference).
The public function dispatches like the other kernels (Triton on CUDA or under TRITON_INTERPRET=1,
else the reference; head_dim outside [16, 256] falls back to the reference with a warning).
No sliding window: windowed layers use decode_attention.
"""
from __future__ import annotations

import torch

from kernels.decode_attention import (
    _attend_reference,
    _check_index_vector,
    _check_paged_inputs,
    _check_paged_values,
    _Config,
    _default_config,
    _default_splits,
    _block_d,
    _dot_flags,
    _kernel_supports,
    _launch_decode_stage1,
    _on,
    _prepare,
    _use_triton,
    triton,
)
from kernels.merge_states import merge_partials, merge_states_reference

if triton is not None:
    import triton.language as tl

    from kernels.decode_attention import _attend_range, _finish_state


# --------------------------------------------------------------------------- validation


def _check_shared_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens):
    """Shapes, dtypes and devices (no device sync)."""
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


def _check_shared_values(page_table, kv_lens, page_size, num_slots, group_offsets, prefix_lens) -> None:
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


# --------------------------------------------------------------------------- reference twin


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
    _check_shared_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens)
    _check_shared_values(page_table, kv_lens, page_size, k_cache.shape[0], group_offsets, prefix_lens)
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
        q_ptr, k_ptr, v_ptr, pt_ptr, offsets_ptr, prefix_ptr, o_ptr, lse_ptr,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        num_rows, max_pos, max_slot, qk_scale,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (group g, kv head, prefix split): every member x query head of that kv head
        over one chunk of [0, prefix_lens[g]); writes (o, lse) to split slot `split`.

        Stacked row j of the group is member r0 + j // GROUP, query head kvh * GROUP + j % GROUP.
        """
        g = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        r0 = tl.minimum(tl.maximum(tl.load(offsets_ptr + g), 0), num_rows)  # clamped: memory safety
        r1 = tl.minimum(tl.maximum(tl.load(offsets_ptr + g + 1), r0), num_rows)
        plen = tl.minimum(tl.maximum(tl.load(prefix_ptr + g), 0), max_pos)
        split_len = tl.cdiv(tl.cdiv(plen, n_splits), BLOCK_N) * BLOCK_N
        s_lo = split * split_len
        s_hi = tl.minimum(s_lo + split_len, plen)
        pt_row = pt_ptr + r0.to(tl.int64) * stride_pt  # the prefix pages: the group's first row
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh

        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        n_stacked = (r1 - r0) * GROUP
        for m0 in range(0, n_stacked, BLOCK_M):
            j = m0 + tl.arange(0, BLOCK_M)
            j_ok = j < n_stacked  # rows past the group are padding: zero queries, never stored
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
            o_rows = o_ptr + row[:, None] * stride_ob + head[:, None] * stride_oh + split * stride_os + offs_d[None, :]
            tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=j_ok[:, None] & d_ok[None, :])
            tl.store(lse_ptr + row * stride_lb + head * stride_lh + split * stride_ls, lse, mask=j_ok)


# --------------------------------------------------------------------------- Triton launcher


def _shared_prefix_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens,
                          prefix_splits: int | None, suffix_splits: int | None, cfg: _Config) -> torch.Tensor:
    """Prefix pass + suffix pass into one workspace, one stage-2 merge; out in q's dtype."""
    q, page_table, kv_lens, _ = _prepare(q, page_table, kv_lens, None)
    group_offsets, prefix_lens = group_offsets.contiguous(), prefix_lens.contiguous()
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    num_groups = group_offsets.shape[0] - 1
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    cap = page_table.shape[1] * page_size
    if prefix_splits is None:
        prefix_splits = _default_splits(num_groups * hkv, cap, q.device)
    if suffix_splits is None:
        suffix_splits = _default_splits(b * hkv, cap, q.device)
    total = prefix_splits + suffix_splits
    o_part = torch.empty(b, hq, total, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, hq, total, dtype=torch.float32, device=q.device)
    if num_groups > 0:
        with _on(q.device):
            _prefix_kernel[(num_groups, hkv, prefix_splits)](
                q, k_cache, v_cache, page_table, group_offsets, prefix_lens, o_part, lse_part,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                page_table.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
                lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
                b, cap, k_cache.shape[0] - 1, float(scale) * 1.4426950408889634,  # log2(e)
                HEAD_DIM=d, GROUP=hq // hkv, PAGE_SIZE=page_size,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_dot_flags(q.dtype),
            )
    else:  # no groups (only with unvalidated bad input): the prefix slots are empty
        lse_part[:, :, :prefix_splits] = float("-inf")
    # Suffix: each row from its group's prefix length (memory-safe even for bad offsets).
    kv_starts = prefix_lens[_row_groups(group_offsets, b)] if num_groups > 0 else torch.zeros_like(kv_lens)
    _launch_decode_stage1(q, k_cache, v_cache, page_table, kv_lens, kv_starts, None, page_size, scale,
                          o_part, lse_part, prefix_splits, suffix_splits, cfg)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    merge_partials(o_part, lse_part, out, lse)
    return out


# --------------------------------------------------------------------------- public op


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
    """Decode attention where the rows of each sibling group share the K/V of a prefix.

    Arguments as kernels.decode_attention (q [B, Hq, D], caches [num_slots, Hkv, D], int32
    page_table [B, max_pages] and kv_lens [B]) plus int32 group_offsets [G+1] (group g owns
    rows [group_offsets[g], group_offsets[g+1]); groups cover all rows, each >= 1 row) and int32
    prefix_lens [G] (0 <= prefix_lens[g] <= kv_lens of each member; the prefix K/V is read
    through the page table of the group's first row). Returns out [B, Hq, D] in q's dtype, equal
    to decode_attention up to rounding. Shapes, dtypes and devices are always checked; the group
    layout and index values when the tensors are on the CPU or `validate=True` (one device sync).
    """
    _check_shared_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens)
    if (
        _use_triton(q)
        and k_cache.shape[0] > 0
        and _kernel_supports("shared_prefix_decode_attention", q.shape[2])
    ):
        if validate or not q.is_cuda:
            _check_shared_values(page_table, kv_lens, page_size, k_cache.shape[0], group_offsets, prefix_lens)
        return _shared_prefix_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets,
                                     prefix_lens, None, None, _default_config(q.device))
    return shared_prefix_decode_attention_reference(
        q, k_cache, v_cache, page_table, kv_lens, page_size, scale, group_offsets, prefix_lens, validate=validate,
    )
