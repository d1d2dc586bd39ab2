"""Merge partial attention results computed over disjoint key sets.

A partial attention over a key set K_i is the pair (o_i, lse_i): the softmax-weighted mean of
the values o_i = sum_{k in K_i} e^{s_k - lse_i} v_k and the natural-log normaliser
lse_i = log sum_{k in K_i} e^{s_k}. For disjoint K_1, K_2 the attention over their union is

    lse = logaddexp(lse_1, lse_2)
    o   = o_1 e^{lse_1 - lse} + o_2 e^{lse_2 - lse}

An empty key set has lse = -inf (and o = 0): merging it returns the other side exactly;
merging two empty sets gives o = 0, lse = -inf. All math is fp32; o comes back in o1's dtype.

Two Triton kernels live here:
- `_merge_two_kernel` behind the public `merge_states(o1, lse1, o2, lse2)`: cascade /
  shared-prefix attention merges a prefix state with a suffix state (FlashInfer cascade,
  Hydragen).
- `_merge_splits_kernel` behind `merge_partials(o_part, lse_part, out, lse_out)`: the stage-2
  reduction of split-K decode (engine.kernels.decode_attention, engine.kernels.shared_prefix_attention),
  where every (row, head) has S fp32 partials in a workspace.

`merge_states_reference` is the plain-torch twin with the same signature. `merge_states`
dispatches to Triton for CUDA tensors, or for any tensors when TRITON_INTERPRET=1 was set
before this module was imported, and to the reference otherwise.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fixed when the kernels below are defined: interpreter kernels run on CPU tensors.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRETED)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- validation


def _check_states(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> None:
    """Raise ValueError naming the offending value and the expectation."""
    for name, o in (("o1", o1), ("o2", o2)):
        if o.dim() != 3:
            raise ValueError(f"{name} must be [N, H, D]; got shape {tuple(o.shape)}")
        if o.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32/bfloat16/float16; got {o.dtype}")
    if o2.shape != o1.shape:
        raise ValueError(f"o2 must have o1's shape {tuple(o1.shape)}; got {tuple(o2.shape)}")
    if o2.dtype != o1.dtype:
        raise ValueError(f"o1 and o2 must share a dtype; got {o1.dtype}, {o2.dtype}")
    n, h, _ = o1.shape
    for name, lse in (("lse1", lse1), ("lse2", lse2)):
        if lse.shape != (n, h):
            raise ValueError(f"{name} must be [N={n}, H={h}]; got shape {tuple(lse.shape)}")
        if lse.dtype != torch.float32:
            raise ValueError(f"{name} must be float32; got {lse.dtype}")
    devices = {t.device for t in (o1, lse1, o2, lse2)}
    if len(devices) != 1:
        raise ValueError(
            f"o1, lse1, o2 and lse2 must share a device; got {o1.device}, {lse1.device}, {o2.device}, {lse2.device}"
        )


# --------------------------------------------------------------------------- reference twin


def merge_states_reference(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `merge_states`: same arguments, results and errors."""
    _check_states(o1, lse1, o2, lse2)
    lse = torch.logaddexp(lse1, lse2)
    lse = torch.where(lse1 == float("-inf"), lse2, torch.where(lse2 == float("-inf"), lse1, lse))
    empty = lse == float("-inf")  # both sides empty
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    w1 = torch.exp(lse1 - lse_safe)[..., None]  # 0 where lse1 = -inf
    w2 = torch.exp(lse2 - lse_safe)[..., None]
    # Selects, not products, for an empty side: its o may hold anything, and the other side
    # must come back bit for bit.
    o = torch.where(
        (lse1 == float("-inf"))[..., None], o2.float(),
        torch.where((lse2 == float("-inf"))[..., None], o1.float(), o1.float() * w1 + o2.float() * w2),
    )
    o = torch.where(empty[..., None], torch.zeros_like(o), o)
    return o.to(o1.dtype), lse


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _merge_two_kernel(o1_ptr, lse1_ptr, o2_ptr, lse2_ptr, out_ptr, lse_out_ptr, R, D,
                          stride_o1, stride_o2, stride_out,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [pid * BLOCK_R, +BLOCK_R) of the flattened (N * H) states; D in BLOCK_D chunks."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        l1 = tl.load(lse1_ptr + rows, mask=row_ok, other=float("-inf"))
        l2 = tl.load(lse2_ptr + rows, mask=row_ok, other=float("-inf"))
        m = tl.maximum(l1, l2)
        none = m == float("-inf")  # both sides empty
        m_safe = tl.where(none, 0.0, m)
        e1 = tl.exp(l1 - m_safe)  # 0 on an empty side
        e2 = tl.exp(l2 - m_safe)
        tot = e1 + e2  # >= 1 unless both are empty
        tot_safe = tl.where(none, 1.0, tot)
        w1 = e1 / tot_safe
        w2 = e2 / tot_safe
        lse = tl.where(none, float("-inf"), m_safe + tl.log(tot_safe))
        # One side empty: the other side exactly (no rounding through exp / log).
        lse = tl.where(l1 == float("-inf"), l2, tl.where(l2 == float("-inf"), l1, lse))
        tl.store(lse_out_ptr + rows, lse, mask=row_ok)
        only2 = (l1 == float("-inf"))[:, None]
        only1 = (l2 == float("-inf"))[:, None]
        r64 = rows.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (ds < D)[None, :]
            o1 = tl.load(o1_ptr + r64[:, None] * stride_o1 + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            o2 = tl.load(o2_ptr + r64[:, None] * stride_o2 + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            o = tl.where(only2, o2, tl.where(only1, o1, o1 * w1[:, None] + o2 * w2[:, None]))
            o = tl.where(none[:, None], 0.0, o)
            tl.store(out_ptr + r64[:, None] * stride_out + ds[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_splits_kernel(part_ptr, lse_part_ptr, out_ptr, lse_out_ptr, R, S, D,
                             stride_pr, stride_ps, stride_lr, stride_or,
                             BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """Stage 2 of split-K attention: out[r] = sum_s e^{lse[r,s] - lse[r]} part[r,s], fp32.

        Rows [pid * BLOCK_R, +BLOCK_R); BLOCK_D covers D (one chunk). A split with lse = -inf
        (an empty key range) gets weight 0 and its partial is never read: the workspace holds
        garbage there.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        r64 = rows.to(tl.int64)
        ss = tl.arange(0, BLOCK_S)
        lse_all = tl.load(lse_part_ptr + r64[:, None] * stride_lr + ss[None, :],
                          mask=row_ok[:, None] & (ss < S)[None, :], other=float("-inf"))
        m = tl.max(lse_all, axis=1)
        none = m == float("-inf")  # every split empty
        m_safe = tl.where(none, 0.0, m)
        ds = tl.arange(0, BLOCK_D)
        d_ok = ds < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        tot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in range(0, S):
            lse_s = tl.load(lse_part_ptr + r64 * stride_lr + s, mask=row_ok, other=float("-inf"))
            live = lse_s > float("-inf")
            w = tl.where(live, tl.exp(lse_s - m_safe), 0.0)  # 1 for the split holding the max
            tot += w
            o_s = tl.load(part_ptr + r64[:, None] * stride_pr + s * stride_ps + ds[None, :],
                          mask=(row_ok & live)[:, None] & d_ok[None, :], other=0.0)
            acc += w[:, None] * o_s
        tot_safe = tl.where(none, 1.0, tot)
        o = tl.where(none[:, None], 0.0, acc / tot_safe[:, None])
        lse = tl.where(none, float("-inf"), m_safe + tl.log(tot_safe))
        tl.store(lse_out_ptr + rows, lse, mask=row_ok)
        tl.store(out_ptr + r64[:, None] * stride_or + ds[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- Triton launchers


_BLOCK_R = 16  # rows per merge program: [16, D] fp32 tiles, 4 warps
def _merge_two_triton(o1, lse1, o2, lse2):
    n, h, d = o1.shape
    out = torch.empty_like(o1, memory_format=torch.contiguous_format)
    lse = torch.empty(n, h, dtype=torch.float32, device=o1.device)
    r = n * h
    if r == 0:
        return out, lse
    # [N*H, D] row views; a copy only where the layout cannot be flattened that way.
    f1, f2 = o1.reshape(r, d), o2.reshape(r, d)
    f1 = f1 if f1.stride(1) == 1 else f1.contiguous()
    f2 = f2 if f2.stride(1) == 1 else f2.contiguous()
    block_r = _BLOCK_R
    block_d = min(triton.next_power_of_2(d), 128)
    with _on(o1.device):
        _merge_two_kernel[(triton.cdiv(r, block_r),)](
            f1, lse1.reshape(r).contiguous(), f2, lse2.reshape(r).contiguous(), out, lse, r, d,
            f1.stride(0), f2.stride(0), d, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out, lse


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, lse_out: torch.Tensor) -> None:
    """Stage-2 merge of S fp32 partials per row, written into `out` and `lse_out` (Triton only).

    o_part [R..., S, D] fp32 and lse_part [R..., S] fp32, each contiguous (any leading row
    dims, flattened); out [R..., D] contiguous in any float dtype; lse_out [R...] fp32
    contiguous. Internal launcher for the split-K attention kernels: shapes are the caller's
    responsibility.
    """
    s, d = o_part.shape[-2], o_part.shape[-1]
    r = lse_out.numel()
    if r == 0:
        return
    block_r = _BLOCK_R
    with _on(out.device):
        _merge_splits_kernel[(triton.cdiv(r, block_r),)](
            o_part, lse_part, out, lse_out, r, s, d, s * d, d, s, d,
            BLOCK_R=block_r, BLOCK_S=triton.next_power_of_2(s), BLOCK_D=triton.next_power_of_2(d),
        )


# --------------------------------------------------------------------------- public op


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over their union.

    o1, o2 [N, H, D] share a float dtype; lse1, lse2 [N, H] are fp32 natural-log normalisers
    (-inf for an empty key set). Returns (o [N, H, D] in o1's dtype, lse [N, H] fp32) with
    lse = logaddexp(lse1, lse2) and o = o1 e^{lse1-lse} + o2 e^{lse2-lse} in fp32; an empty
    side returns the other side exactly, two empty sides give o = 0, lse = -inf.
    """
    _check_states(o1, lse1, o2, lse2)
    if _use_triton(o1):
        return _merge_two_triton(o1, lse1, o2, lse2)
    return merge_states_reference(o1, lse1, o2, lse2)
