"""Per-token log-probs (and entropy) of a bias-free LM head without materialising logits.

    z        = hidden @ weight.T / temperature          # [N, V], never stored whole
    logp[n]  = z[n, targets[n]] - logsumexp(z[n])       # 0 where targets[n] == -100
    H[n]     = -sum_v p[n, v] log p[n, v]                # p = softmax(z[n]); 0 where ignored

Gradients: d logp / dz_v = 1[v = target] - p_v and dH / dz_v = p_v (E_p[z] - z_v), times
1 / temperature for the step back to hidden @ weight.T.

Triton forward (`_fwd_kernel`): a grid of (row block x vocabulary range) programs. Each streams
its vocabulary range in [BLOCK_N, BLOCK_V] logit tiles (fp32 accumulation of the input dtype's
products) and keeps, per row, an online log-sum-exp: running max m, s = sum exp(z - m), the
target logit and, for entropy, t = sum exp(z - m) (z - m). A few vocabulary ranges per row
block keep the GPU busy when N is small; torch merges them (O(N) work). Saved for the backward:
lse [N] and, with entropy, E_p[z] [N] - nothing vocabulary-sized.

Triton backward (`_dlogits_kernel` + two torch matmuls): the vocabulary is cut into chunks of
`bwd_chunk_v` columns, sized so that one [N, chunk] tile is ~256 MB. Per chunk, the kernel
recomputes the logits tile by tile (fp32 accumulation) and writes dlogits in the input dtype;
then grad_weight[chunk] = dlogits.T @ hidden and grad_hidden += dlogits @ weight[chunk] run as
cuBLAS matmuls. Why this split rather than a fully fused backward: the two gradient GEMMs are
2/3 of the backward FLOPs and cuBLAS runs them at tensor-core speed; chunking over the
vocabulary (not the tokens) makes each row of grad_weight the result of one matmul over all N
tokens, so there are no atomics, no [V, d] fp32 buffer (2.5 GB at 152k x 4096) and no
repeated rounding of grad_weight in bf16; grad_hidden accumulates in an fp32 [N, d] buffer.

Log-probs are <= 0 by construction, not by clamping. The target logit is read from the same
tile values that feed the running max, so z_t <= m exactly. exp(0) is pinned to exactly 1,
so the tile holding the final max contributes 1 to s and every later update only adds
non-negative terms: s >= 1, log(s) >= 0, and logp = (z_t - m) - log(s) is a sum of two
non-positive floats. Entropy = log(s) - t / s with t <= 0 is >= 0 the same way. (A separate
dot product for the target logit, as some kernels use, can round 1 ulp above the max and
yield logp > 0.)

The plain-torch twin `fused_logprobs_reference` (same signature) is what CPU training runs:
chunked over tokens, fp32 math, a custom autograd.Function that recomputes each chunk's logits
in the backward. `fused_logprobs` dispatches to Triton for CUDA tensors, or for any tensors when
TRITON_INTERPRET=1 was set before this module was imported (Triton reads it when a kernel is
defined), and to the reference otherwise.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

IGNORE_INDEX = -100
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fixed when the kernels below are defined: interpreter kernels run on CPU tensors.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"
_REF_CHUNK_ELEMS = 1 << 22  # reference path: logits elements per token chunk (16 MB in fp32)
_BWD_CHUNK_BYTES = 1 << 28  # Triton backward: bytes of one [N, chunk] dlogits tile


# --------------------------------------------------------------------------- validation


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Raise ValueError naming the offending value and its limit; never clamp."""
    if hidden.dim() != 2 or hidden.shape[1] == 0:
        raise ValueError(f"hidden must be [N, d] with d >= 1; got shape {tuple(hidden.shape)}")
    n, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, d={d}] with V >= 1; got shape {tuple(weight.shape)}")
    if targets.shape != (n,):
        raise ValueError(f"targets must be [N={n}]; got shape {tuple(targets.shape)}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight and targets must share a device; got {hidden.device}, {weight.device}, {targets.device}"
        )
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share a dtype among float32/bfloat16/float16; got {hidden.dtype}, {weight.dtype}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    vocab = weight.shape[0]
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    if n and bool(bad.any()):  # one host sync per call
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets must be in [0, V={vocab}) or {IGNORE_INDEX} (ignored); got {int(targets[i])} at index {i}"
        )


def _ignored_rows_zero(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _exp_pinned(x: torch.Tensor) -> torch.Tensor:
    """exp(x) with exp(0) == 1 exactly (the invariant s >= 1 rests on it)."""
    return torch.where(x == 0, torch.ones((), dtype=x.dtype, device=x.device), torch.exp(x))


# --------------------------------------------------------------------------- reference twin


class _ReferenceFn(torch.autograd.Function):
    """Token-chunked fp32 torch: one [chunk, V] logits block alive at a time, recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_rows):
        w = weight.float()
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        safe_t = torch.where(valid, targets, 0).long()
        logp, lse, ent, ez = (torch.zeros(n, device=hidden.device) for _ in range(4))
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            zc = (hidden[lo:hi].float() @ w.T).div_(temperature)
            m = zc.amax(1, keepdim=True)
            zc -= m  # <= 0, exactly 0 at the max
            e = _exp_pinned(zc)
            s = e.sum(1)  # >= 1
            log_s = torch.log(s)  # >= 0
            logp[lo:hi] = zc.gather(1, safe_t[lo:hi, None])[:, 0] - log_s
            lse[lo:hi] = m[:, 0] + log_s
            if with_entropy:
                t = (e * zc).sum(1)  # <= 0
                ent[lo:hi] = log_s - t / s
                ez[lo:hi] = m[:, 0] + t / s  # E_p[z]
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse, ez)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        logp = _ignored_rows_zero(logp, valid)
        return (logp, _ignored_rows_zero(ent, valid)) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, safe_t, valid, lse, ez = ctx.saved_tensors
        g_lp = _ignored_rows_zero(g_lp.float(), valid) if g_lp is not None else torch.zeros_like(lse)
        g_ent = _ignored_rows_zero(g_ent.float(), valid) if g_ent is not None else None
        w = weight.float()
        grad_h = torch.zeros(hidden.shape, device=hidden.device)
        grad_w = torch.zeros(w.shape, device=w.device)
        for lo in range(0, hidden.shape[0], ctx.chunk_rows):
            hi = min(lo + ctx.chunk_rows, hidden.shape[0])
            h = hidden[lo:hi].float()
            z = (h @ w.T).div_(ctx.temperature)
            p = torch.exp(z - lse[lo:hi, None])
            if g_ent is not None:  # z becomes the entropy part: g_ent * p * (E_p[z] - z)
                z.sub_(ez[lo:hi, None]).mul_(p).mul_(-g_ent[lo:hi, None])
            dz = p.mul_(-g_lp[lo:hi, None])  # the log-prob part: g_lp * (onehot - p)
            dz.scatter_add_(1, safe_t[lo:hi, None], g_lp[lo:hi, None])
            if g_ent is not None:
                dz += z
            dz /= ctx.temperature
            grad_h[lo:hi] = dz @ w
            grad_w += dz.T @ h
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None


def _reference_logprobs(hidden, weight, targets, temperature, with_entropy, chunk_rows):
    return _ReferenceFn.apply(hidden, weight, targets, float(temperature), with_entropy, chunk_rows)


def fused_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `fused_logprobs`: same arguments, results and errors."""
    _check_inputs(hidden, weight, targets, temperature)
    chunk_rows = max(1, _REF_CHUNK_ELEMS // weight.shape[0])
    return _reference_logprobs(hidden, weight, targets, temperature, with_entropy, chunk_rows)


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """[BLOCK_N, BLOCK_V] tile of hidden @ weight.T, accumulated in fp32."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(h_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(w_cols + ds[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16/fp16 dot is wrong; fp32 there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:  # fp32 inputs: no TF32 rounding
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, t_ptr, part_ptr, N, V, D, stride_h, stride_w, temperature,
                    cols_per_split, n_splits,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr, WITH_ENTROPY: tl.constexpr):
        """Per (row block, vocabulary range): running max m, s, target logit, t -> part[4, splits, N]."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        v_lo = pid_s * cols_per_split
        v_hi = tl.minimum(v_lo + cols_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_hi  # cols[0] is always valid, so every tile max is finite
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE) / temperature
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            zc = z - m_new[:, None]  # <= 0; -inf on padding columns
            e = tl.where(zc == 0.0, 1.0, tl.exp(zc))  # exp(0) pinned to 1
            alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))  # 0 on the first tile
            if WITH_ENTROPY:
                # Re-centre t from m to m_new: sum e'(z - m_new) = alpha * (t + (m - m_new) * s).
                # (Both selects keep -inf out of the products: m is -inf until s > 0.)
                shift = tl.where(s > 0.0, m - m_new, 0.0) * s
                t = alpha * (t + shift) + tl.sum(e * tl.where(col_ok[None, :], zc, 0.0), axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new
            # Same float as the one fed to the max, so z_t <= m holds exactly.
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        out = part_ptr + pid_s * N + rows
        plane = n_splits * N
        tl.store(out, m, mask=row_ok)
        tl.store(out + plane, s, mask=row_ok)
        tl.store(out + 2 * plane, zt, mask=row_ok)
        tl.store(out + 3 * plane, t, mask=row_ok)

    @triton.jit
    def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, dz_ptr,
                        N, D, stride_h, stride_w, stride_dz, temperature, v_lo, v_hi,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr, WITH_ENTROPY: tl.constexpr):
        """dlogits[:, v_lo:v_hi] (w.r.t. hidden @ weight.T) from recomputed logits."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE) / temperature
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)  # zero on ignored rows
        z = tl.where(col_ok[None, :], z, lse[:, None])  # padding columns: finite, never stored
        p = tl.exp(z - lse[:, None])
        dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
        if WITH_ENTROPY:
            ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
            ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
            dz += ge[:, None] * p * (ez[:, None] - z)
        dz = dz / temperature
        out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + (cols - v_lo)[None, :]
        tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- Triton launchers


@dataclass(frozen=True)
class _Config:
    block_n: int
    block_v: int
    block_d: int
    splits: int  # vocabulary ranges per row block in the forward
    bwd_chunk_v: int  # vocabulary columns per backward chunk, a multiple of block_v
    num_warps: int = 4
    num_stages: int = 2


def _default_config(n: int, vocab: int, dtype: torch.dtype, device: torch.device) -> _Config:
    """Tiles per target (compute capability, dtype), or small ones for the interpreter.

    Not autotuned on a GPU yet. Chosen so that ptxas (Triton 3.9) reports no register spills
    in either kernel, with or without entropy, on sm_80 and sm_90 (`python -m
    bench.compile_report`); registers per thread below are from those reports (forward
    without / with entropy). The former tiles for every target, [128 rows, 128 vocab] x 64 of
    d per stage, 8 warps, 3 stages, spilled in the forward at 255 registers: 36 / 296 B on
    sm_80, 28 / 8 B on sm_90.
    """
    if device.type == "cuda" and not _INTERPRETED:
        props = torch.cuda.get_device_properties(device)
        if dtype == torch.float32:
            # IEEE fp32 dots (no tensor cores; a correctness path): [128, 128] x 64 spilled
            # kilobytes on sm_80 (11 KB in the forward, 10 KB in dlogits) and 216 / 416 B on
            # sm_90; [64, 64] x 32 takes 254 (sm_80) / 128 (sm_90) registers, no spills.
            bn, bv, bd, warps, stages = 64, 64, 32, 8, 2
        elif props.major >= 9:
            # H100-class: the same [128, 128] logit tile with 32 of d per stage, 4 stages
            # (97 -> 65 KB of shared memory): 250 / 183 registers, no spills.
            bn, bv, bd, warps, stages = 128, 128, 32, 8, 4
        else:
            # A100-class: a [128, 128] tile spilled with entropy at 64 and at 32 of d per stage
            # (296 / 248 B; 2 stages: 276 B) and fit only at 16 (255 registers, a barrier every
            # 16 of d). [128, 64] x 64 keeps 128 rows per program and the 64-deep stages:
            # 192 / 198 registers, no spills; a fourth stage makes up for the halved tile's
            # shorter compute per stage (72 KB of shared memory).
            bn, bv, bd, warps, stages = 128, 64, 64, 8, 4
        target_programs = 2 * props.multi_processor_count
    else:
        bn, bv, bd, warps, stages, target_programs = 16, 32, 32, 4, 2, 1
    row_blocks = triton.cdiv(n, bn)
    splits = max(1, min(triton.cdiv(target_programs, row_blocks), triton.cdiv(vocab, bv)))
    elem = torch.empty((), dtype=dtype).element_size()
    chunk = max(bv, (_BWD_CHUNK_BYTES // (max(n, 1) * elem)) // bv * bv)
    chunk = min(chunk, triton.cdiv(vocab, bv) * bv)
    return _Config(bn, bv, bd, splits, chunk, warps, stages)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dot_flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=_INTERPRETED and dtype != torch.float32, IEEE=dtype == torch.float32)


class _TritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, cfg):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        (n, d), vocab = hidden.shape, weight.shape[0]
        cols_per_split = triton.cdiv(triton.cdiv(vocab, cfg.splits), cfg.block_v) * cfg.block_v
        splits = triton.cdiv(vocab, cols_per_split)  # every range non-empty
        part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
        with _on(hidden.device):
            _fwd_kernel[(triton.cdiv(n, cfg.block_n), splits)](
                hidden, weight, targets, part, n, vocab, d, hidden.stride(0), weight.stride(0), temperature,
                cols_per_split, splits, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                WITH_ENTROPY=with_entropy, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **_dot_flags(hidden.dtype),
            )
        m_p, s_p, zt_p, t_p = part.unbind(0)  # each [splits, N]
        m = m_p.amax(0)
        w = _exp_pinned(m_p - m)  # 1 for the range holding the max
        s = (s_p * w).sum(0)  # >= that range's s >= 1
        log_s = torch.log(s)  # >= 0
        logp = (zt_p.sum(0) - m) - log_s  # zt_p is exactly 0 outside the target's range
        valid = targets != IGNORE_INDEX
        ent = ez = None
        if with_entropy:
            t = (w * (t_p + torch.where(s_p > 0, (m_p - m) * s_p, 0.0))).sum(0)  # <= 0
            ent = _ignored_rows_zero(log_s - t / s, valid)
            ez = m + t / s  # E_p[z]
        ctx.save_for_backward(hidden, weight, targets, valid, m + log_s, ez)
        ctx.temperature, ctx.cfg = temperature, cfg
        ctx.set_materialize_grads(False)
        logp = _ignored_rows_zero(logp, valid)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, valid, lse, ez = ctx.saved_tensors
        cfg = ctx.cfg
        (n, d), vocab = hidden.shape, weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        g_lp = _ignored_rows_zero(g_lp.float(), valid) if g_lp is not None else torch.zeros_like(lse)
        with_entropy = g_ent is not None
        g_ent = _ignored_rows_zero(g_ent.float(), valid).contiguous() if with_entropy else g_lp
        ez = ez if with_entropy else lse  # unused placeholder pointers when no entropy grad
        grad_h = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        chunk = cfg.bwd_chunk_v
        dz_buf = torch.empty(n, min(chunk, vocab), dtype=hidden.dtype, device=hidden.device)
        for v_lo in range(0, vocab, chunk):
            v_hi = min(v_lo + chunk, vocab)
            dz = dz_buf[:, : v_hi - v_lo]
            with _on(hidden.device):
                _dlogits_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(v_hi - v_lo, cfg.block_v))](
                    hidden, weight, targets, lse, ez, g_lp, g_ent, dz, n, d, hidden.stride(0),
                    weight.stride(0), dz.stride(0), ctx.temperature, v_lo, v_hi, BLOCK_N=cfg.block_n,
                    BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, WITH_ENTROPY=with_entropy,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_dot_flags(hidden.dtype),
                )
            if need_w:  # every row of grad_weight: one matmul over all N tokens
                torch.mm(dz.t(), hidden, out=grad_w[v_lo:v_hi])
            if need_h:
                if grad_h.dtype == dz.dtype:
                    grad_h.addmm_(dz, weight[v_lo:v_hi])
                else:
                    grad_h += dz @ weight[v_lo:v_hi]
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        return grad_h, grad_w, None, None, None, None


def _triton_logprobs(hidden, weight, targets, temperature, with_entropy, cfg: _Config):
    return _TritonFn.apply(hidden, weight, targets, float(temperature), with_entropy, cfg)


# --------------------------------------------------------------------------- public op


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / temperature)[n, targets[n]] without the [N, V] logits.

    hidden [N, d] and weight [V, d] (bias-free LM head, tied embeddings fine) share a dtype
    and device; targets [N] are token ids, -100 marks a token to ignore (log-prob 0, entropy
    0, no gradient). Returns fp32 log-probs [N] (always <= 0), and fp32 entropy [N] when
    `with_entropy`. Differentiable w.r.t. hidden and weight. Bad shapes, devices, dtypes,
    out-of-range targets or temperature <= 0 raise ValueError.
    """
    _check_inputs(hidden, weight, targets, temperature)
    if triton is not None and (hidden.is_cuda or _INTERPRETED) and hidden.shape[0] > 0:
        cfg = _default_config(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
        return _triton_logprobs(hidden, weight, targets, temperature, with_entropy, cfg)
    chunk_rows = max(1, _REF_CHUNK_ELEMS // weight.shape[0])
    return _reference_logprobs(hidden, weight, targets, temperature, with_entropy, chunk_rows)
