"""Decode attention over the paged KV cache: one query per sequence, split-K, GQA-packed.

Sequence b's query q[b] (at position kv_lens[b] - 1, its own K/V already in the cache) attends
the cached keys at positions [lo_b, hi_b) with

    hi_b = kv_lens[b],   lo_b = max(kv_starts[b], kv_lens[b] - window)   (each term optional)

Position p of sequence b lives in cache row  page_table[b, p // page_size] * page_size + p % page_size
of k_cache / v_cache [num_slots, Hkv, D]. Query head h reads KV head h // (Hq // Hkv). Math in
fp32 with the natural-log LSE; an empty range gives out = 0 and lse = -inf.

Triton, stage 1 (`_decode_split_kernel`), grid (B, Hkv, num_splits): the GROUP = Hq / Hkv query
heads that share a KV head are packed into one [BLOCK_H >= 16, D] tile (padded rows are zero and
never stored), so each K/V tile is loaded once per KV head rather than once per query head and
the scores are a tensor-core `tl.dot`. A program takes its chunk of the key range, streams it in
BLOCK_N-position tiles gathered through the page table (online softmax in the log2 domain), and
writes a normalised fp32 partial and its LSE to a workspace. Stage 2 (`merge_partials`, shared
with engine.kernels.merge_states) reduces the splits per (b, head) and casts to q's dtype. With one
split, stage 1 writes the final output directly and stage 2 is skipped.

Split-K: every sequence's range is cut into num_splits chunks, each a multiple of BLOCK_N
positions, so short sequences leave trailing splits empty (they only write lse = -inf). The
default count is a host-side heuristic that needs no device sync (CUDA-graph safe): enough
programs for ~4 per SM given B * Hkv, bounded by the longest range the page table can describe.

`decode_attention_reference` is the plain-torch twin (same signature; it gathers the paged K/V
densely in row chunks). `decode_attention` dispatches to Triton for CUDA tensors, or for any
tensors when TRITON_INTERPRET=1 was set before this module was imported, and to the reference
otherwise; a head_dim the kernel does not support (outside [16, 256]) falls back to the
reference with a one-time warning.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch

from engine.kernels.merge_states import merge_partials

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fixed when the kernels below are defined: interpreter kernels run on CPU tensors.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256  # tl.dot needs K >= 16; > 256 would spill registers
_WARNED_HEAD_DIMS: set[tuple[str, int]] = set()  # (op, head_dim) pairs already warned about
_REF_CHUNK_BYTES = 1 << 28  # reference: bytes of gathered fp32 K+V per row chunk
_MIN_SPLIT_POSITIONS = 256  # heuristic: no split shorter than this (q load + partial write amortised)


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRETED)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kernel_supports(op: str, head_dim: int) -> bool:
    """True if the Triton kernels take this head_dim; otherwise warn once per (op, head_dim)."""
    if _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM:
        return True
    if (op, head_dim) not in _WARNED_HEAD_DIMS:
        _WARNED_HEAD_DIMS.add((op, head_dim))
        warnings.warn(
            f"{op}: head_dim={head_dim} is outside the Triton kernel's range "
            f"[{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]; using the torch reference",
            stacklevel=3,
        )
    return False


# --------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_paged_inputs(q, k_cache, v_cache, page_table, page_size, scale) -> None:
    """Shapes, dtypes and devices shared by the paged attention ops (no device sync)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D]; got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float32/bfloat16/float16; got {q.dtype}")
    b, hq, d = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or c.shape[2] != d:
            raise ValueError(f"{name} must be [num_slots, Hkv, D={d}]; got shape {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}; got {c.dtype}")
        if c.shape[2] > 1 and c.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim; got strides {c.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}")
    hkv = k_cache.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"num_q_heads must be a multiple of num_kv_heads >= 1; got Hq={hq}, Hkv={hkv}")
    if page_table.dim() != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B={b}, max_pages]; got shape {tuple(page_table.shape)}")
    if page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32; got {page_table.dtype}")
    if not _is_int(page_size) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1; got {page_size!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("page_table", page_table)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")


def _check_index_vector(name: str, t: torch.Tensor, n: int, device: torch.device, n_name: str = "B") -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be [{n_name}={n}]; got shape {tuple(t.shape)}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {t.device}")


def _check_decode_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, kv_starts, window, num_splits):
    _check_paged_inputs(q, k_cache, v_cache, page_table, page_size, scale)
    _check_index_vector("kv_lens", kv_lens, q.shape[0], q.device)
    if kv_starts is not None:
        _check_index_vector("kv_starts", kv_starts, q.shape[0], q.device)
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"window must be None or an int >= 1; got {window!r}")
    if num_splits is not None and (not _is_int(num_splits) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1; got {num_splits!r}")


def _key_range(kv_lens: torch.Tensor, kv_starts: torch.Tensor | None, window: int | None):
    """(lo, hi) int64 [B]: the attended positions [lo, hi); empty where lo >= hi."""
    hi = kv_lens.long()
    lo = torch.zeros_like(hi) if kv_starts is None else kv_starts.long()
    if window is not None:
        lo = torch.maximum(lo, hi - window)
    return lo, hi


def _check_paged_values(page_table, page_size, num_slots, kv_lens, lo, hi, lens_name="kv_lens") -> None:
    """Host check of index values (one device sync on CUDA): lengths fit the page table and
    every cache row the range [lo, hi) touches is inside the cache."""
    cap = page_table.shape[1] * page_size
    bad = (kv_lens < 0) | (kv_lens > cap)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{lens_name} must be in [0, max_pages * page_size = {cap}]; got {int(kv_lens[i])} at row {i}"
        )
    if bool((lo < 0).any()):
        i = int((lo < 0).nonzero()[0, 0])
        raise ValueError(f"kv_starts must be >= 0; got {int(lo[i])} at row {i}")
    if page_table.numel() == 0:
        return
    # Page j of row b is used if it overlaps [lo_b, hi_b); its last used slot must exist.
    first = torch.arange(page_table.shape[1], device=page_table.device) * page_size
    used = (first[None, :] < hi[:, None]) & (first[None, :] + page_size > lo[:, None])
    last_pos = torch.minimum(first[None, :] + page_size, hi[:, None]) - 1
    last_slot = page_table.long() * page_size + (last_pos - first[None, :])
    bad = used & ((page_table < 0) | (last_slot >= num_slots))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"page_table[{b}, {j}] = {int(page_table[b, j])} points outside the cache "
            f"(num_slots={num_slots}, page_size={page_size})"
        )


# --------------------------------------------------------------------------- reference twin


def _attend_reference(q, k_cache, v_cache, page_table, lo, hi, page_size, scale):
    """fp32 (o [B, Hq, D], lse [B, Hq]) of each query over its paged positions [lo_b, hi_b).

    Gathers K/V densely for a chunk of rows at a time (positions outside the range read row 0
    and are masked to -inf). Values must already be checked.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    nonempty = hi > lo
    if b == 0 or not bool(nonempty.any()):
        return out, lse
    length = int(torch.where(nonempty, hi, 0).max())
    rows = max(1, _REF_CHUNK_BYTES // max(1, length * hkv * d * 8))
    pos = torch.arange(length, device=q.device)
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        valid = (pos[None, :] >= lo[r0:r1, None]) & (pos[None, :] < hi[r0:r1, None])
        pages = page_table[r0:r1, (pos // page_size).clamp_max(page_table.shape[1] - 1)].long()
        slots = torch.where(valid, pages * page_size + pos % page_size, 0)
        k = k_cache[slots].float()  # [r, L, Hkv, D]
        v = v_cache[slots].float()
        qf = q[r0:r1].float().view(r1 - r0, hkv, group, d)
        s = torch.einsum("rkgd,rlkd->rkgl", qf, k) * scale
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)  # -inf on empty rows
        p = torch.exp(s - torch.where(torch.isinf(lse_c), 0.0, lse_c)[..., None])  # 0 on empty rows
        out[r0:r1] = torch.einsum("rkgl,rlkd->rkgd", p, v).reshape(r1 - r0, hq, d)
        lse[r0:r1] = lse_c.reshape(r1 - r0, hq)
    return out, lse


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    *,
    kv_starts: torch.Tensor | None = None,
    window: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    validate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `decode_attention`: same arguments, results and errors.

    Always checks index values (num_splits and validate only change the Triton path).
    """
    _check_decode_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, kv_starts, window, num_splits)
    lo, hi = _key_range(kv_lens, kv_starts, window)
    _check_paged_values(page_table, page_size, k_cache.shape[0], kv_lens, lo, hi)
    out, lse = _attend_reference(q, k_cache, v_cache, page_table, lo, hi, page_size, scale)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _attend_range(acc, m_i, l_i, q, k_base, v_base, pt_row, lo, hi, stride_ks, stride_vs,
                      offs_d, d_ok, max_slot, qk_scale,
                      PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax of the query rows `q` [M, BLOCK_D] over paged positions [lo, hi).

        acc [M, BLOCK_D] (unnormalised fp32 output), m_i [M] (running max of the log2-domain
        scores) and l_i [M] (running sum of exp2(score - m_i)) carry the state. Every tile
        starts below hi, so it holds a valid position and the running max is finite after the
        first tile; masked positions score -inf and contribute exp2(-inf) = 0.
        """
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < hi
            page = tl.load(pt_row + pos // PAGE_SIZE, mask=pos_ok, other=0)
            slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
            slot = tl.minimum(tl.maximum(slot, 0), max_slot)  # memory safety on unvalidated tables
            if EVEN_D:  # a mask constant along D keeps the loads vectorised (and pipelined)
                kv_mask = pos_ok[:, None]
            else:
                kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:  # the interpreter's low-precision dot is wrong; fp32 there
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:  # fp32 inputs: no TF32 rounding
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(pos_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _finish_state(acc, m_i, l_i):
        """Normalised output and natural-log LSE; an empty range (l = 0) gives 0 and -inf."""
        live = l_i > 0.0
        l_safe = tl.where(live, l_i, 1.0)
        o = acc / l_safe[:, None]  # acc is 0 where nothing was attended
        lse = tl.where(live, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        return o, lse

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, pt_ptr, lens_ptr, starts_ptr, o_ptr, lse_ptr,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
        max_pos, max_slot, window, split_base, qk_scale,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
        HAS_STARTS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (b, kv head, split): the GROUP query heads of that KV head over one chunk of
        [lo_b, hi_b); writes (o, lse) to split slot split_base + split of the output buffers."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        hi = tl.minimum(tl.load(lens_ptr + b), max_pos)  # max_pos: positions the page table holds
        lo = hi * 0
        if HAS_STARTS:
            lo = tl.maximum(tl.load(starts_ptr + b), 0)
        if HAS_WINDOW:
            lo = tl.maximum(lo, hi - window)
        # Chunks of a multiple of BLOCK_N positions: trailing splits of short ranges are empty.
        n = tl.maximum(hi - lo, 0)
        split_len = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
        s_lo = lo + split * split_len
        s_hi = tl.minimum(s_lo + split_len, hi)

        heads = tl.arange(0, BLOCK_H)  # rows GROUP.. are padding: zero queries, never stored
        h_ok = heads < GROUP
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_head = kvh * GROUP + heads
        q = tl.load(q_ptr + b * stride_qb + q_head[:, None] * stride_qh + offs_d[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, pt_ptr + b * stride_pt,
            s_lo, s_hi, stride_ks, stride_vs, offs_d, d_ok, max_slot, qk_scale,
            PAGE_SIZE, BLOCK_N, BLOCK_D == HEAD_DIM, UPCAST, IEEE,
        )
        o, lse = _finish_state(acc, m_i, l_i)
        slot = split_base + split
        o_rows = o_ptr + b * stride_ob + q_head[:, None] * stride_oh + slot * stride_os + offs_d[None, :]
        tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + q_head * stride_lh + slot * stride_ls, lse, mask=h_ok)


# --------------------------------------------------------------------------- Triton launchers


@dataclass(frozen=True)
class _Config:
    block_n: int  # key positions per tile
    block_m: int  # stacked query rows per tile in the shared-prefix kernel
    num_warps: int = 4
    num_stages: int = 2


def _default_config(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> _Config:
    """Tiles for the GPU (H100-class) or small ones for the interpreter.

    fp32 inputs (the IEEE correctness path) hold twice the registers per K/V element: the
    bf16 tiles spill 150-190 B on sm_80 at head_dim 128 (bench.compile_report); 32-key tiles,
    with 8 warps at head_dim > 64 (4 spill ~1 KB on sm_90) and 4 below (8 spill a few bytes
    in the shared-prefix kernel), compile without spills on sm_80 and sm_90.
    """
    if device.type == "cuda" and not _INTERPRETED:
        if dtype == torch.float32:
            warps = 8 if head_dim is None or head_dim > 64 else 4
            return _Config(block_n=32, block_m=32, num_warps=warps, num_stages=3)
        return _Config(block_n=64, block_m=64, num_warps=4, num_stages=3)
    return _Config(block_n=16, block_m=16, num_warps=4, num_stages=1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that keep every SM busy with a few resident CTAs (1 in the interpreter)."""
    if device.type != "cuda" or _INTERPRETED:
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _default_splits(programs: int, max_len: int, device: torch.device) -> int:
    """Splits per range so that programs * splits fills the GPU, each split >= 256 positions.

    Uses only shapes (max_len is the page table's capacity), never device values.
    """
    want = triton.cdiv(_target_programs(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(max_len, _MIN_SPLIT_POSITIONS), 64))


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=_INTERPRETED and dtype != torch.float32, IEEE=dtype == torch.float32)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _launch_decode_stage1(q, k_cache, v_cache, page_table, kv_lens, kv_starts, window, page_size, scale,
                          o_buf, lse_buf, split_base: int, num_splits: int, cfg: _Config) -> None:
    """Stage 1 into o_buf [B, Hq, S_total, D] / lse_buf [B, Hq, S_total] (split slots
    split_base .. split_base + num_splits - 1), or into the final [B, Hq, D] / [B, Hq] when
    those are 3-D / 2-D (then num_splits must be 1)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    if o_buf.dim() == 3:
        o_strides = (o_buf.stride(0), o_buf.stride(1), 0)
        l_strides = (lse_buf.stride(0), lse_buf.stride(1), 0)
    else:
        o_strides = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2))
        l_strides = (lse_buf.stride(0), lse_buf.stride(1), lse_buf.stride(2))
    starts = kv_starts if kv_starts is not None else kv_lens  # placeholder pointer when unused
    with _on(q.device):
        _decode_split_kernel[(b, hkv, num_splits)](
            q, k_cache, v_cache, page_table, kv_lens, starts, o_buf, lse_buf,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            page_table.stride(0), *o_strides, *l_strides,
            page_table.shape[1] * page_size, k_cache.shape[0] - 1, window or 0, split_base,
            float(scale) * 1.4426950408889634,  # log2(e): scores live in the log2 domain
            HEAD_DIM=d, GROUP=group, PAGE_SIZE=page_size,
            HAS_STARTS=kv_starts is not None, HAS_WINDOW=window is not None,
            BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_dot_flags(q.dtype),
        )


def _prepare(q, page_table, kv_lens, kv_starts):
    """Unit stride in the last dim where the kernels assume it (copies only if needed)."""
    q = q if q.stride(2) == 1 else q.contiguous()
    page_table = page_table if page_table.stride(1) == 1 else page_table.contiguous()
    kv_lens = kv_lens.contiguous()
    kv_starts = kv_starts.contiguous() if kv_starts is not None else None
    return q, page_table, kv_lens, kv_starts


def _decode_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, kv_starts, window,
                   num_splits: int | None, cfg: _Config):
    """(out [B, Hq, D] in q's dtype, lse [B, Hq] fp32) from the Triton kernels."""
    q, page_table, kv_lens, kv_starts = _prepare(q, page_table, kv_lens, kv_starts)
    b, hq, d = q.shape
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    if b == 0:
        return out, lse
    if num_splits is None:
        num_splits = _default_splits(b * k_cache.shape[1], page_table.shape[1] * page_size, q.device)
    if num_splits == 1:  # stage 1 writes the final result; no workspace, no stage 2
        _launch_decode_stage1(q, k_cache, v_cache, page_table, kv_lens, kv_starts, window, page_size, scale,
                              out, lse, 0, 1, cfg)
        return out, lse
    o_part = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    _launch_decode_stage1(q, k_cache, v_cache, page_table, kv_lens, kv_starts, window, page_size, scale,
                          o_part, lse_part, 0, num_splits, cfg)
    merge_partials(o_part, lse_part, out, lse)
    return out, lse


# --------------------------------------------------------------------------- public op


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    scale: float,
    *,
    kv_starts: torch.Tensor | None = None,
    window: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    validate: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new query per sequence over its paged K/V.

    q [B, Hq, D]; k_cache, v_cache [num_slots, Hkv, D] (q's dtype, unit stride in D);
    page_table int32 [B, max_pages]; kv_lens, kv_starts int32 [B]. Sequence b attends
    positions [max(kv_starts[b], kv_lens[b] - window), kv_lens[b]) (either bound optional).
    num_splits: split-K chunks per sequence (None: a heuristic that fills the GPU).
    Returns out [B, Hq, D] in q's dtype, and lse [B, Hq] fp32 (natural log) if return_lse;
    an empty range gives out 0, lse -inf. Shapes, dtypes and devices are always checked;
    index values (lengths vs the page table, page ids vs the cache) are checked when the
    tensors are on the CPU or `validate=True` (one device sync), otherwise the kernel clamps
    indices so that bad values cannot read outside the tensors.
    """
    _check_decode_inputs(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, kv_starts, window, num_splits)
    if (
        _use_triton(q)
        and k_cache.shape[0] > 0
        and _kernel_supports("decode_attention", q.shape[2])
    ):
        if validate or not q.is_cuda:
            lo, hi = _key_range(kv_lens, kv_starts, window)
            _check_paged_values(page_table, page_size, k_cache.shape[0], kv_lens, lo, hi)
        out, lse = _decode_triton(q, k_cache, v_cache, page_table, kv_lens, page_size, scale, kv_starts, window,
                                  num_splits, _default_config(q.device, q.dtype, q.shape[2]))
        return (out, lse) if return_lse else out
    return decode_attention_reference(
        q, k_cache, v_cache, page_table, kv_lens, page_size, scale,
        kv_starts=kv_starts, window=window, num_splits=num_splits, return_lse=return_lse, validate=validate,
    )
