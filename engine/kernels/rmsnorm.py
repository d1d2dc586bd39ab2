"""RMSNorm, alone or fused with the residual add before it (one kernel per add + norm).

    rms_norm(x, weight, eps)                 = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
    fused_add_rms_norm(x, residual, w, eps)  = (rms_norm(r, w, eps), r)   with r = x + residual

x32 is x in fp32. These are the Hugging Face (Llama / Qwen2 / Qwen3 / Mistral) semantics,
rounding included: the residual sum is rounded to the model dtype first (as `residual +
hidden` in the model dtype does) and that rounded sum is what gets normalised; the
normalised row is rounded to x's dtype before the weight multiplies it, and the output has
the dtype torch's promotion gives `weight * x` (x's dtype when the weight shares it).

x and residual: [..., N], any float dtype, unit stride in the last dim (else copied); the
leading dims are flattened into rows. weight: [N]. A pre-norm decoder layer runs two of these
(after attention and after the MLP); fused, each is one read of x and residual and one write
of the output and the new residual, instead of an add plus ~8 elementwise/reduction kernels.

Triton (`_rms_norm_kernel`): one program per BLOCK_M rows, the whole row of N (padded to a
power of two, BLOCK_N <= 16384) held in registers; sum of squares and the scaling in fp32.
Rows wider than that fall back to the reference with a one-time warning.

`rms_norm_reference` / `fused_add_rms_norm_reference` are the plain-torch twins (same
signature; the same torch ops as `engine.model.transformer.RMSNorm`). `rms_norm` and
`fused_add_rms_norm` dispatch to Triton for CUDA tensors, or for any tensors when
TRITON_INTERPRET=1 was set before this module was imported, and to the reference otherwise.
Neither Triton path has a backward: callers that need gradients use the references.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from engine.kernels.decode_attention import _INTERPRETED, _on, _use_triton

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_N = 16384  # whole rows in registers: 32 fp32 values per thread at 16 warps
_WARNED_WIDTHS: set[int] = set()  # row widths already warned about (warn once per width)


# --------------------------------------------------------------------------- validation


def _check_inputs(x, residual, weight, eps) -> None:
    """Raise ValueError naming the offending value and the expectation."""
    names = (("x", x), ("weight", weight)) + ((("residual", residual),) if residual is not None else ())
    for name, t in names:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32/bfloat16/float16; got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., N] with N >= 1; got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [N={n}] (x's last dim); got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}; got {weight.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}; got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}; got {residual.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")


# --------------------------------------------------------------------------- reference twins


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The HF RMSNorm, op for op (engine.model.transformer.RMSNorm.forward)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch twin of `rms_norm`: same arguments, result and errors (differentiable)."""
    _check_inputs(x, None, weight, eps)
    return _rms_norm_torch(x, weight, eps)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `fused_add_rms_norm`: same arguments, results and errors (differentiable)."""
    _check_inputs(x, residual, weight, eps)
    new_residual = x + residual  # in x's dtype, as the model's residual stream
    return _rms_norm_torch(new_residual, weight, eps), new_residual


# --------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _cast(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
        """x (fp32) -> dtype, rounding to nearest even. SOFT_BF16 (the interpreter only, whose
        fp32 -> bf16 cast truncates) rounds on the bits instead; GPUs use the native cast."""
        if SOFT_BF16 and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, M, N, eps,
                         s_xm, s_rm, s_om, s_rom,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SOFT_BF16: tl.constexpr):
        """Rows [pid * BLOCK_M, +BLOCK_M) of x (+ residual): normalised rows and the new residual."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)  # contiguous along N: vectorised loads and stores
        col_ok = cols < N
        ok = (rows < M)[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + r * s_xm + cols[None, :], mask=ok, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(r_ptr + r * s_rm + cols[None, :], mask=ok, other=0.0)
            # Rounded to the model dtype before the norm reads it, as `residual + hidden` is.
            x = _cast(x.to(tl.float32) + res.to(tl.float32), x_ptr.dtype.element_ty, SOFT_BF16)
            tl.store(r_out_ptr + r * s_rom + cols[None, :], x, mask=ok)
        x32 = x.to(tl.float32)
        mean_sq = tl.sum(x32 * x32, axis=1) / N  # padded columns are 0: they add nothing
        normed = _cast(x32 * tl.math.rsqrt(mean_sq + eps)[:, None], x_ptr.dtype.element_ty, SOFT_BF16)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
        y = w.to(tl.float32)[None, :] * normed.to(tl.float32)  # weight * normed in the output dtype
        tl.store(out_ptr + r * s_om + cols[None, :], _cast(y, out_ptr.dtype.element_ty, SOFT_BF16), mask=ok)


def _tiles(m: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for m rows of width n."""
    block_n = triton.next_power_of_2(n)
    if device.type == "cuda" and not _INTERPRETED:
        # ~2K-element tiles or one row: a wide row gets its own program (decode batches are
        # small: more programs, more SMs); narrow rows are packed. ~16 elements per thread.
        block_m = max(1, min(triton.next_power_of_2(m), 2048 // block_n))
        warps = max(1, min(16, block_m * block_n // 512))
    else:  # the interpreter: as few programs as possible
        block_m = max(1, min(triton.next_power_of_2(m), 16384 // block_n))
        warps = 1
    return block_m, block_n, warps


def _kernel_supports(n: int) -> bool:
    """True if a row of width n fits the kernel's registers; otherwise warn once per width."""
    if triton.next_power_of_2(n) <= _MAX_BLOCK_N:
        return True
    if n not in _WARNED_WIDTHS:
        _WARNED_WIDTHS.add(n)
        warnings.warn(f"rms_norm: rows of {n} elements exceed the Triton kernel's {_MAX_BLOCK_N}; "
                      "using the torch reference", stacklevel=3)
    return False


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride in N (a view when the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 or t2.shape[1] == 1 else t2.contiguous()


def _rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     tiles: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed, new residual or None), both shaped like x. tiles: `_tiles(...)` (default: for x's device)."""
    n = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    block_m, block_n, warps = tiles or _tiles(m, n, x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    r_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if m == 0:
        return out, r_out
    r2 = _rows(residual) if residual is not None else x2  # placeholder pointers when unused
    ro2 = r_out.view(m, n) if r_out is not None else x2
    weight = weight.contiguous()
    with _on(x.device):
        _rms_norm_kernel[(triton.cdiv(m, block_m),)](
            x2, r2, weight, out.view(m, n), ro2, m, n, float(eps),
            x2.stride(0), r2.stride(0), n, ro2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, SOFT_BF16=_INTERPRETED,
            num_warps=warps,
        )
    return out, r_out


# --------------------------------------------------------------------------- public ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm of x [..., N] with weight [N]: fp32 statistics, x's dtype before the weight.

    Bad input raises ValueError. No autograd through the Triton path.
    """
    _check_inputs(x, None, weight, eps)
    if _use_triton(x) and _kernel_supports(x.shape[-1]):
        return _rms_norm_triton(x, None, weight, eps)[0]
    return _rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(r, weight, eps), r) with r = x + residual in x's dtype, in one pass.

    x, residual [..., N] of one dtype and shape; weight [N]. Returns new tensors (the inputs
    are not written). Bad input raises ValueError. No autograd through the Triton path.
    """
    _check_inputs(x, residual, weight, eps)
    if _use_triton(x) and _kernel_supports(x.shape[-1]):
        return _rms_norm_triton(x, residual, weight, eps)
    new_residual = x + residual
    return _rms_norm_torch(new_residual, weight, eps), new_residual
