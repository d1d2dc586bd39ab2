"""Causal attention of new tokens (prefill or a prefill chunk) over the paged KV cache.

    q            [Nq, Hq, D]   new tokens of B sequences, back to back: sequence b owns rows
                               cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1 (int32 [B+1])
    k/v_cache    [S, Hkv, D]   one layer of the pool; the new tokens' K/V is ALREADY stored
                               (store_kv runs first)
    page_table   [B, P] int32  position p of sequence b lives in slot
                               page_table[b, p // page_size] * page_size + p % page_size
    kv_lens      [B] int32     sequence b holds kv_lens[b] positions after this step; its new
                               tokens are the last q_len_b of them: kv_lens[b] - q_len_b .. kv_lens[b] - 1

The query at position p attends the keys at positions j <= p (and j > p - window when a sliding
window is set): the cached prefix and the earlier new tokens. Query head h reads KV head
h // (Hq // Hkv) (GQA). Math in fp32 (scores, softmax with natural-log scale `scale`, the
weighted sum); the output has q's dtype.

Triton (`_extend_kernel`): a 1D grid of (query head, query block, sequence), heads fastest so
the Hq / Hkv programs that read one KV head run together and share its tiles through L2; query
blocks past a sequence's q_len exit at once, and the later (costlier) blocks of a sequence
start first. A program holds BLOCK_M queries of one head and streams the key tiles of
[first key its window reaches, its last query's position], gathering slots through the page
table, with an online softmax in base 2 (the scale is folded with log2(e)). Key tiles split
into three ranges: those below the causal diagonal and inside every row's window run without
a mask; the window edge before them and the diagonal after them run masked. Tiles past the
diagonal or wholly outside the window are never loaded. Inputs of 16-bit dtypes feed tl.dot as
they are (fp32 accumulation); fp32 inputs use IEEE fp32 products; under the interpreter,
whose 16-bit tl.dot is wrong, tiles are upcast to fp32 first.

Head dims the kernel takes: 16, 32, 64, 128, 256 (a power of two, >= tl.dot's minimum K of
16). Others run the reference, with a warning the first time.

Checks: shapes, dtypes and devices always; the metadata values (cu_seqlens_q consistent with
q, 0 <= q_len <= kv_len, pages in range, max_seqlen_q large enough) for CPU tensors, on the
torch path, and when `validate` is True (on CUDA a check costs a device sync per layer; the
engine can validate a step's metadata once instead). Unvalidated bad metadata gives a wrong
result but no out-of-bounds access: the kernel clamps page indices and masks slots outside
the pool.

`extend_attention` dispatches to Triton for CUDA tensors, or for any tensors when
TRITON_INTERPRET=1 was set before this module was imported, and to `extend_attention_reference`
(per-sequence dense fp32 torch) otherwise.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fixed when the kernels below are defined: interpreter kernels run on CPU tensors.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_WARNED_HEAD_DIMS: set[int] = set()  # head dims already warned about (warn once per dim)
_LOG2E = 1.4426950408889634
_REF_SCORE_ELEMS = 1 << 24  # reference: score elements per query chunk (64 MB in fp32)


# --------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_inputs(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale,
                  window, max_seqlen_q, validate: bool) -> None:
    """Raise ValueError naming the offending value and the expectation; metadata values only if `validate`."""
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("page_table", page_table),
             ("cu_seqlens_q", cu_seqlens_q), ("kv_lens", kv_lens))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if q.dim() != 3 or q.shape[2] == 0 or q.shape[1] == 0:
        raise ValueError(f"q must be [Nq, num_q_heads, head_dim] with heads, head_dim >= 1; got shape {tuple(q.shape)}")
    nq, hq, d = q.shape
    if k_cache.dim() != 3 or k_cache.shape[2] != d or k_cache.shape[1] == 0:
        raise ValueError(
            f"k_cache must be [num_slots, num_kv_heads, head_dim={d}] with num_kv_heads >= 1; "
            f"got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}")
    hkv = k_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"num_q_heads={hq} must be a multiple of num_kv_heads={hkv}")
    if kv_lens.dim() != 1:
        raise ValueError(f"kv_lens must be [B]; got shape {tuple(kv_lens.shape)}")
    b = kv_lens.shape[0]
    if cu_seqlens_q.shape != (b + 1,):
        raise ValueError(f"cu_seqlens_q must be [B+1={b + 1}] (B from kv_lens); got shape {tuple(cu_seqlens_q.shape)}")
    if page_table.dim() != 2 or page_table.shape[0] != b or page_table.shape[1] == 0:
        raise ValueError(f"page_table must be [B={b}, max_pages >= 1]; got shape {tuple(page_table.shape)}")
    devices = [t.device for _, t in named]
    if len(set(devices)) != 1:
        raise ValueError(
            "q, k_cache, v_cache, page_table, cu_seqlens_q and kv_lens must share a device; got "
            + ", ".join(f"{name}={t.device}" for name, t in named)
        )
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16; got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"k_cache and v_cache must have q's dtype {q.dtype} (store_kv casts on write); "
            f"got {k_cache.dtype}, {v_cache.dtype}"
        )
    for name, t in (("page_table", page_table), ("cu_seqlens_q", cu_seqlens_q), ("kv_lens", kv_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32; got {t.dtype}")
    if not _is_int(page_size) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1; got {page_size!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"window must be None or an int >= 1; got {window!r}")
    if max_seqlen_q is not None and (not _is_int(max_seqlen_q) or max_seqlen_q < 0):
        raise ValueError(f"max_seqlen_q must be None or an int >= 0; got {max_seqlen_q!r}")
    if validate:
        _check_values(nq, k_cache.shape[0], page_table, cu_seqlens_q, kv_lens, page_size, max_seqlen_q)


def _check_values(nq, num_slots, page_table, cu_seqlens_q, kv_lens, page_size, max_seqlen_q) -> None:
    """The metadata values (host reads: a device sync on CUDA)."""
    cu = cu_seqlens_q.long().cpu()
    kv = kv_lens.long().cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q[0] must be 0; got {int(cu[0])}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens < 0).any()):
        i = int((q_lens < 0).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens_q must be non-decreasing; cu_seqlens_q[{i + 1}]={int(cu[i + 1])} < {int(cu[i])}")
    if int(cu[-1]) != nq:
        raise ValueError(f"cu_seqlens_q[-1]={int(cu[-1])} must equal the number of q rows {nq}")
    short = q_lens > kv
    if bool(short.any()):
        i = int(short.nonzero()[0, 0])
        raise ValueError(
            f"sequence {i}: q_len={int(q_lens[i])} new tokens exceed kv_lens[{i}]={int(kv[i])} "
            "(kv_lens counts the cached prefix plus the new tokens)"
        )
    max_pages = page_table.shape[1]
    too_long = kv > max_pages * page_size
    if bool(too_long.any()):
        i = int(too_long.nonzero()[0, 0])
        raise ValueError(
            f"kv_lens[{i}]={int(kv[i])} exceeds page_table's capacity max_pages * page_size = {max_pages * page_size}"
        )
    # Every slot a sequence reads: page p of sequence b covers positions p*page_size .. up to kv_len - 1.
    pages = page_table.long().cpu()
    first = torch.arange(max_pages) * page_size
    used = first[None, :] < kv[:, None]
    last_off = (kv[:, None] - first[None, :]).clamp(max=page_size) - 1
    bad = used & ((pages < 0) | (pages * page_size + last_off >= num_slots))
    if bool(bad.any()):
        b, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"page_table[{b}, {p}]={int(pages[b, p])} names slots outside the cache's {num_slots} slots "
            f"(page_size={page_size}, kv_lens[{b}]={int(kv[b])})"
        )
    if max_seqlen_q is not None and len(q_lens) and max_seqlen_q < int(q_lens.max()):
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is below the longest q_len {int(q_lens.max())}")


# --------------------------------------------------------------------------- reference twin


def extend_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    *,
    window: int | None = None,
    max_seqlen_q: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Plain-torch twin of `extend_attention`: same arguments, result and errors.

    It checks the metadata values whatever `validate` says (it reads them on the host anyway).
    """
    _check_inputs(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale, window,
                  max_seqlen_q, validate=True)
    return _extend_torch(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale, window)


def _extend_torch(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale, window):
    """Per sequence: gather its keys through the page table, dense masked softmax in fp32."""
    nq, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cu, kv = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b, kv_len in enumerate(kv):
        start, q_len = cu[b], cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        pos_k = torch.arange(kv_len, device=q.device)
        slots = page_table[b, pos_k // page_size].long() * page_size + pos_k % page_size
        keys, values = k_cache[slots].float(), v_cache[slots].float()  # [kv_len, Hkv, D]
        qb = q[start:start + q_len].float().view(q_len, hkv, group, d)
        chunk = max(1, _REF_SCORE_ELEMS // (hq * kv_len))
        for r0 in range(0, q_len, chunk):
            r1 = min(q_len, r0 + chunk)
            first, last = kv_len - q_len + r0, kv_len - q_len + r1 - 1  # positions of the chunk's rows
            pos_q = torch.arange(first, last + 1, device=q.device)
            # Keys any row of this chunk may see: [k_lo, k_hi).
            k_lo = max(0, first - window + 1) if window is not None else 0
            k_hi = last + 1
            pk = pos_k[k_lo:k_hi]
            scores = torch.einsum("qhgd,khd->hgqk", qb[r0:r1], keys[k_lo:k_hi]) * scale
            allowed = pk[None, :] <= pos_q[:, None]
            if window is not None:
                allowed &= pk[None, :] > pos_q[:, None] - window
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # each row sees itself
            o = torch.einsum("hgqk,khd->qhgd", probs, values[k_lo:k_hi])
            out[start + r0:start + r1] = o.reshape(r1 - r0, hq, d).to(q.dtype)
    return out


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _attend_range(acc, m_i, l_i, q, k_base, v_base, pt_row, s_ptp, lo, hi, pos, key_end, window,
                      page_size, max_pages, num_slots, s_ks, s_kd, s_vs, s_vd, qk_scale, offs_d,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """Fold the key tiles starting at lo, lo + BLOCK_N, .. < hi into (acc, m_i, l_i).

        m_i is the running row max of the base-2 scores, l_i the running sum of exp2(s - m_i),
        acc the running sum of exp2(s - m_i) * v. Unmasked (MASKED=False) tiles must hold only
        keys < key_end that every row may see.
        """
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)  # key positions, >= 0
            page_idx = tl.minimum(offs_n // page_size, max_pages - 1)  # clamp: a no-op on validated input
            if MASKED:
                key_ok = offs_n < key_end
                page = tl.load(pt_row + page_idx * s_ptp, mask=key_ok, other=0)
            else:
                page = tl.load(pt_row + page_idx * s_ptp)
            slot = page.to(tl.int64) * page_size + offs_n % page_size
            kv_ok = (slot >= 0) & (slot < num_slots)  # always true on validated input
            if MASKED:
                kv_ok = kv_ok & key_ok
            k = tl.load(k_base + offs_d[:, None] * s_kd + slot[None, :] * s_ks, mask=kv_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * qk_scale  # [BLOCK_M, BLOCK_N] scores in base 2
            if MASKED:
                allowed = key_ok[None, :] & (offs_n[None, :] <= pos[:, None])
                if USE_WINDOW:
                    allowed = allowed & (offs_n[None, :] > pos[:, None] - window)
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            alpha = tl.exp2(m_i - m_use)  # 0 while m_i is -inf
            p = tl.exp2(s - m_use[:, None])  # 0 on masked keys
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slot[:, None] * s_vs + offs_d[None, :] * s_vd, mask=kv_ok[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _extend_kernel(q_ptr, kc_ptr, vc_ptr, o_ptr, pt_ptr, cu_ptr, kvlen_ptr,
                       s_qn, s_qh, s_qd, s_ks, s_kh, s_kd, s_vs, s_vh, s_vd, s_on, s_oh, s_od, s_ptb, s_ptp,
                       Nq, num_slots, max_pages, page_size, qk_scale, window, num_m_blocks, num_heads, group,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """One (query head, block of BLOCK_M new tokens, sequence) -> out rows of that head."""
        pid = tl.program_id(0)
        head = pid % num_heads  # fastest: the heads of one KV group run side by side
        rest = pid // num_heads
        mblk = num_m_blocks - 1 - rest % num_m_blocks  # a sequence's last (costliest) block first
        seq = rest // num_m_blocks
        q_start = tl.load(cu_ptr + seq)
        q_len = tl.load(cu_ptr + seq + 1) - q_start
        m0 = mblk * BLOCK_M
        if m0 >= q_len:
            return
        kv_len = tl.load(kvlen_ptr + seq)
        # New tokens sit at positions prefix .. kv_len - 1 (the max only guards unvalidated input).
        prefix = tl.maximum(kv_len - q_len, 0)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = (q_start + offs_m).to(tl.int64)
        row_ok = (offs_m < q_len) & (rows >= 0) & (rows < Nq)  # the row bounds only guard unvalidated input
        pos = prefix + offs_m
        first_pos = prefix + m0
        last_pos = prefix + tl.minimum(m0 + BLOCK_M, q_len) - 1  # last valid row's position
        q = tl.load(q_ptr + rows[:, None] * s_qn + head * s_qh + offs_d[None, :] * s_qd,
                    mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        kv_head = (head // group).to(tl.int64)
        k_base = kc_ptr + kv_head * s_kh
        v_base = vc_ptr + kv_head * s_vh
        pt_row = pt_ptr + seq.to(tl.int64) * s_ptb

        # Key tiles start on multiples of BLOCK_N; keys >= end are never needed.
        end = last_pos + 1
        if USE_WINDOW:
            lo = tl.maximum(first_pos - window + 1, 0)
            full_lo = tl.maximum(last_pos - window + 1, 0)  # every row's window reaches keys >= this
            full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
        else:
            lo = 0
            full_lo = 0
        lo = lo // BLOCK_N * BLOCK_N
        full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N  # tiles below it are causal for every row
        # lo <= full_lo <= full_hi <= end: [lo, full_lo) window edge (masked), [full_lo, full_hi)
        # unmasked, [full_hi, end) the diagonal (masked). A window narrower than the block
        # leaves the middle range empty.
        full_lo = tl.minimum(tl.maximum(full_lo, lo), full_hi)

        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, pt_row, s_ptp, lo, full_lo, pos, end,
                                      window, page_size, max_pages, num_slots, s_ks, s_kd, s_vs, s_vd,
                                      qk_scale, offs_d, BLOCK_N, True, USE_WINDOW, UPCAST, IEEE)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, pt_row, s_ptp, full_lo, full_hi, pos, end,
                                      window, page_size, max_pages, num_slots, s_ks, s_kd, s_vs, s_vd,
                                      qk_scale, offs_d, BLOCK_N, False, USE_WINDOW, UPCAST, IEEE)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, pt_row, s_ptp, full_hi, end, pos, end,
                                      window, page_size, max_pages, num_slots, s_ks, s_kd, s_vs, s_vd,
                                      qk_scale, offs_d, BLOCK_N, True, USE_WINDOW, UPCAST, IEEE)
        # Every valid row saw at least its own key, so l_i > 0 there; the guard keeps other rows finite.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + rows[:, None] * s_on + head * s_oh + offs_d[None, :] * s_od,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- Triton launcher


@dataclass(frozen=True)
class _Config:
    block_m: int  # queries per program (>= 16 for tl.dot)
    block_n: int  # keys per tile (>= 16 for tl.dot)
    num_warps: int = 4
    num_stages: int = 2


def _capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of `device` (engine/kernels/aot.py answers it for its target)."""
    return torch.cuda.get_device_capability(device)


def _default_config(max_q: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> _Config:
    """Tiles per target (compute capability, head_dim, dtype), or small ones for the interpreter.

    Not autotuned on a GPU yet. Chosen so that ptxas (Triton 3.9) reports no register spills
    on sm_80 and sm_90 (`python -m bench.compile_report`, tests/kernels/test_aot_compile.py);
    registers per thread below are those reports, at 16-bit inputs, without / with a sliding
    window. fp32 inputs (IEEE products, no tensor cores) are a correctness path, not a fast one.
    """
    if device.type != "cuda" or _INTERPRETED:
        return _Config(16, 16, 1, 1)
    if dtype == torch.float32:
        # IEEE fp32 dots (no tensor cores). BLOCK_M=64 spilled at 255 registers: at head_dim
        # 128 120-232 B on sm_80 and 1.7-2.5 KB on sm_90 (and the 16-row short-chunk tile
        # with 4 warps 916 B), 12 B on sm_90 at d64 with a window. BLOCK_M=16 with 8 warps at
        # d128 (every chunk length) takes 64-76 registers, BLOCK_M=32 at d64 64-69 (sm_80) /
        # 150-174 (sm_90), no spills.
        cfg = _Config(16, 32, 8, 2) if head_dim >= 128 else _Config(32, 32, 8, 2)
    elif head_dim > 128:
        cfg = _Config(64, 32, 8, 2)
    elif _capability(device)[0] >= 9:  # H100-class (tuned there): no spills, 88-252 registers
        cfg = _Config(128, 64, 8, 3) if head_dim == 128 else _Config(128, 64, 4, 3)
    elif head_dim == 128:
        # A100-class: (128, 64, 8 warps, 3 stages) spilled 48 / 88 B at 255 registers; 2 stages
        # still spilled with a window (104 B). Halving the key tile keeps the 128-query block
        # (each K/V tile read once per 128 queries) and tensor-core shapes (P @ V has K=32):
        # 198 / 202 registers, no spills.
        cfg = _Config(128, 32, 8, 3)
    else:
        # A100-class d64: 4 warps spilled 36 / 44 B at 255 registers; 8 warps over the same
        # tiles take 180 / 181, no spills.
        cfg = _Config(128, 64, 8, 3)
    # Short chunks: no point in query blocks mostly past q_len.
    block_m = max(16, min(cfg.block_m, triton.next_power_of_2(max(max_q, 1))))
    warps = cfg.num_warps if block_m == cfg.block_m else 4
    return _Config(block_m, cfg.block_n, warps, cfg.num_stages)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _extend_triton(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale, window,
                   max_seqlen_q, cfg: _Config | None = None) -> torch.Tensor:
    nq, hq, d = q.shape
    hkv = k_cache.shape[1]
    b = kv_lens.shape[0]
    out = torch.empty((nq, hq, d), dtype=q.dtype, device=q.device)
    if max_seqlen_q is None:  # a host read of cu_seqlens_q (a sync on CUDA)
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if b else 0
    if nq == 0 or max_seqlen_q == 0:
        return out
    if cfg is None:
        cfg = _default_config(max_seqlen_q, d, q.dtype, q.device)
    num_m_blocks = triton.cdiv(max_seqlen_q, cfg.block_m)
    grid = (hq * num_m_blocks * b,)
    with _on(q.device):
        _extend_kernel[grid](
            q, k_cache, v_cache, out, page_table, cu_seqlens_q, kv_lens,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *page_table.stride(),
            nq, k_cache.shape[0], page_table.shape[1], page_size, scale * _LOG2E, window or 0,
            num_m_blocks, hq, hq // hkv,
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_WINDOW=window is not None,
            UPCAST=_INTERPRETED and q.dtype != torch.float32, IEEE=q.dtype == torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


# --------------------------------------------------------------------------- public op


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    *,
    window: int | None = None,
    max_seqlen_q: int | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Causal paged attention of the new tokens q [Nq, Hq, D] of B packed sequences -> [Nq, Hq, D].

    Sequence b's rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1 are its positions
    kv_lens[b] - q_len .. kv_lens[b] - 1; their K/V must already be in k_cache/v_cache. Each
    query attends every cached position <= its own (and > its own - window when set), read
    through page_table. `max_seqlen_q` (>= the longest q_len) spares a host read of
    cu_seqlens_q. Shapes, dtypes and devices are always checked; metadata values for CPU
    tensors, on the torch path, and when `validate` is True (a device sync on CUDA). Bad input
    raises ValueError.
    """
    _check_inputs(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale, window,
                  max_seqlen_q, validate=False)
    d = q.shape[2]
    use_triton = triton is not None and (q.is_cuda or _INTERPRETED) and d in SUPPORTED_HEAD_DIMS
    if validate or not q.is_cuda or not use_triton:  # the torch path reads the metadata on the host anyway
        _check_values(q.shape[0], k_cache.shape[0], page_table, cu_seqlens_q, kv_lens, page_size, max_seqlen_q)
    if triton is not None and (q.is_cuda or _INTERPRETED):
        if use_triton:
            return _extend_triton(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale,
                                  window, max_seqlen_q)
        if d not in _WARNED_HEAD_DIMS:
            _WARNED_HEAD_DIMS.add(d)
            warnings.warn(
                f"extend_attention: head_dim={d} is not one the Triton kernel takes {SUPPORTED_HEAD_DIMS}; "
                "running the torch reference (slower)",
                stacklevel=2,
            )
    return _extend_torch(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, page_size, scale, window)
