"""rms_norm / fused_add_rms_norm (Triton, interpreted on CPU) against their torch twins.

The twins are the model's RMSNorm op for op (checked here bitwise), and both are checked
against a float64 formula. On the interpreter the bf16 casts round to nearest even by hand
(its own cast truncates), so the residual sum matches exactly in every dtype; the norm's
sum of squares is reduced in a different order, so the normed rows may differ by a few
units in the last place in fp32 and by one in bf16 (whose rounding absorbs most of it).
"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from engine.model.transformer import RMSNorm

rn = importlib.import_module("engine.kernels.rmsnorm")

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ORDER_ULPS = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1}  # sum-of-squares order: kernel vs torch


def triton_device() -> str:
    """CPU under the interpreter, else the GPU (the compiled kernel at the same tiny shapes)."""
    if rn._INTERPRETED:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail("Triton on CPU tensors needs TRITON_INTERPRET=1 set before `engine.kernels` is imported")
    return "cuda"


def make(shape, dtype, device="cpu", seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    r = torch.randn(shape, generator=g).to(dtype).to(device)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).to(device)
    return x, r, w


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float | None = None) -> None:
    """|got - want| <= ulps units in the last place of want's dtype, relative to |want|."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = (ulps or ORDER_ULPS[want.dtype]) * ULP[want.dtype] * want.float().abs().clamp(min=1e-3)
    err = (got.float() - want.float()).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g} (bound {tol.max().item():.3g})"


def float64_formula(x, residual, weight, eps):
    """rms_norm in float64 on the (model-dtype-rounded) residual sum: the spec, rounding aside."""
    r = x + residual if residual is not None else x
    r64 = r.double()
    return weight.double() * r64 * torch.rsqrt(r64.pow(2).mean(-1, keepdim=True) + eps), r


# Non-power-of-2 widths (48, 1536), a width-1 row, several leading dims.
SHAPES = [(3, 5, 48), (6, 1536), (4, 1)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm_matches_reference(shape, dtype):
    dev = triton_device()
    x, r, w = make(shape, dtype, dev)
    x0, r0 = x.clone(), r.clone()
    out, new_r = rn.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_r = rn.fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs not written
    assert torch.equal(new_r, ref_r)  # the add is one rounding either way
    assert_within_ulps(out, ref_out)
    if dtype == torch.bfloat16:  # normalising the unrounded fp32 sum instead changes ~20% of them
        assert (out != ref_out).float().mean().item() <= 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    x, _, w = make(shape, dtype, triton_device(), seed=1)
    assert_within_ulps(rn.rms_norm(x, w, 1e-5), rn.rms_norm_reference(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_references_are_the_model_norm_and_the_formula(dtype):
    x, r, w = make((5, 40), dtype, seed=2)
    norm = RMSNorm(40, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    out, new_r = rn.fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(new_r, r + x)
    assert torch.equal(out, norm(r + x))  # op for op the model's RMSNorm: bitwise
    assert torch.equal(rn.rms_norm_reference(x, w, 1e-6), norm(x))
    want, _ = float64_formula(x, r, w, 1e-6)
    assert_within_ulps(out, want.to(dtype), ulps=2)  # two roundings: the normed row, then the weight


def test_strided_rows_and_a_float32_weight():
    """Row-strided views (a slice of a wider tensor) need no copy; weight * x promotes as in torch."""
    dev = triton_device()
    big, rbig, _ = make((4, 3, 96), torch.bfloat16, dev, seed=3)
    x, r = big[..., 10:58], rbig[..., 20:68]
    w = (1 + 0.2 * torch.randn(48, generator=torch.Generator().manual_seed(4))).to(dev)  # fp32
    out, new_r = rn.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_r = rn.fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert out.dtype == torch.float32 and new_r.dtype == torch.bfloat16
    assert torch.equal(new_r, ref_r)
    assert_within_ulps(out, ref_out, ulps=8)


def test_no_rows():
    dev = triton_device()
    x, r, w = make((0, 3, 16), torch.float32, dev)
    out, new_r = rn.fused_add_rms_norm(x, r, w, 1e-6)
    assert out.shape == new_r.shape == (0, 3, 16)
    assert rn.rms_norm(x, w, 1e-6).shape == (0, 3, 16)


def test_rows_too_wide_for_the_kernel_take_the_reference_with_a_warning():
    dev = triton_device()
    n = 2 * rn._MAX_BLOCK_N + 8
    x, r, w = make((1, n), torch.float32, dev, seed=5)
    rn._WARNED_WIDTHS.discard(n)
    with pytest.warns(UserWarning, match=f"rows of {n} elements"):
        out, new_r = rn.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_r = rn.fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(out, ref_out) and torch.equal(new_r, ref_r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per width
        rn.rms_norm(x, w, 1e-6)


PUBLIC_AND_REFERENCE = {
    "public": (rn.fused_add_rms_norm, rn.rms_norm),
    "reference": (rn.fused_add_rms_norm_reference, rn.rms_norm_reference),
}


@pytest.mark.parametrize("which", sorted(PUBLIC_AND_REFERENCE))
def test_bad_input_names_the_value(which):
    fused, plain = PUBLIC_AND_REFERENCE[which]
    x, r, w = make((2, 3, 8), torch.float32)
    cases = [
        (lambda: fused(x, r[:, :2], w, 1e-6), r"residual must have x's shape \(2, 3, 8\); got \(2, 2, 8\)"),
        (lambda: fused(x, r.bfloat16(), w, 1e-6), "residual must have x's dtype torch.float32; got torch.bfloat16"),
        (lambda: fused(x, r, w[:5], 1e-6), r"weight must be \[N=8\] \(x's last dim\); got shape \(5,\)"),
        (lambda: plain(x, w[None], 1e-6), r"weight must be \[N=8\] \(x's last dim\); got shape \(1, 8\)"),
        (lambda: plain(x.long(), w, 1e-6), "x must be float32/bfloat16/float16; got torch.int64"),
        (lambda: plain(x, w.double(), 1e-6), "weight must be float32/bfloat16/float16; got torch.float64"),
        (lambda: plain(x, w, -1e-6), "eps must be a finite number >= 0; got -1e-06"),
        (lambda: plain(x, w, float("nan")), "eps must be a finite number >= 0; got nan"),
        (lambda: plain(torch.zeros(()), w, 1e-6), r"x must be \[..., N\] with N >= 1; got shape \(\)"),
        (lambda: fused(x, [1.0], w, 1e-6), "residual must be a torch.Tensor; got list"),
        (lambda: fused(x, r, w.to("meta"), 1e-6), "weight must be on x's device cpu; got meta"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2048, 1536])
@pytest.mark.parametrize("rows", [1, 37, 504])
def test_cuda_kernel_at_model_widths(hidden, rows):
    """The compiled kernel at the presets' widths (Llama-1.1B 2048, Qwen2.5-1.5B 1536), bf16."""
    x, r, w = make((rows, hidden), torch.bfloat16, "cuda", seed=rows)
    out, new_r = rn.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_r = rn.fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(new_r, ref_r)
    assert_within_ulps(out, ref_out, ulps=2)  # the GPU's rsqrt is approximate in both
    assert_within_ulps(rn.rms_norm(x, w, 1e-6), rn.rms_norm_reference(x, w, 1e-6), ulps=2)
