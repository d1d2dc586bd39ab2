"""fused_logprobs (Triton, interpreted on CPU) and its torch twin against float64 autograd.

The oracle materialises hidden @ weight.T / T in float64 and differentiates log_softmax;
every case checks log-probs, entropy and the gradients of hidden and weight.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import kernels

# The module, not the function of the same name that `engine.kernels` exports.
fl = importlib.import_module("engine.kernels.fused_logprobs")

# Tiny tiles so that the interpreter runs a handful of programs yet every code path is hit:
# two vocabulary ranges in the forward, three backward chunks, a ragged last d block.
SMALL = fl._Config(block_n=16, block_v=32, block_d=16, splits=2, bwd_chunk_v=32)


def triton_device() -> str:
    """CPU under the interpreter, else the GPU (the compiled kernels at the same tiny shapes)."""
    if fl._INTERPRETED:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail("Triton on CPU tensors needs TRITON_INTERPRET=1 set before `engine.kernels` is imported")
    return "cuda"


def run_triton(h, w, t, temperature=1.0, with_entropy=False):
    dev = triton_device()  # .to() is differentiable: gradients land on the CPU leaves
    out = fl._triton_logprobs(h.to(dev), w.to(dev), t.to(dev), temperature, with_entropy, SMALL)
    return tuple(x.cpu() for x in out) if with_entropy else out.cpu()


def run_reference(h, w, t, temperature=1.0, with_entropy=False):
    return fl._reference_logprobs(h, w, t, temperature, with_entropy, chunk_rows=5)  # several chunks


BACKENDS = {"triton": run_triton, "reference": run_reference, "public": kernels.fused_logprobs}


def oracle(h, w, t, temperature):
    """float64 materialised log-probs and entropy, 0 on ignored targets."""
    z = (h.double() @ w.double().T) / temperature
    lp = torch.log_softmax(z, dim=-1)
    valid = t != -100
    logp = lp.gather(1, t.clamp_min(0)[:, None])[:, 0] * valid
    entropy = -(lp.exp() * lp).sum(-1) * valid
    return logp, entropy


def make(n, d, v, scale=1.0, seed=0, dtype=torch.float32, n_ignored=0, all_negative=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * scale / math.sqrt(d)
    w = torch.randn(v, d, generator=g)
    if all_negative:  # every logit < 0: a running max started at 0 would be wrong
        h, w = h.abs() + 0.1, -(w.abs() + 0.1)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:n_ignored]] = -100
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), t


def check_against_oracle(fn, h, w, t, temperature, tol, grad_rtol=1e-4, which="both"):
    logp, ent = fn(h, w, t, temperature, True)
    ref_logp, ref_ent = oracle(h, w, t, temperature)
    assert logp.dtype == ent.dtype == torch.float32
    assert logp.shape == ent.shape == t.shape
    torch.testing.assert_close(logp.double(), ref_logp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(t.shape[0], generator=g), torch.randn(t.shape[0], generator=g)
    # Weighted sums with random upstream gradients exercise the general backward.
    # An output left out of the loss reaches the backward as a None gradient.
    terms = {"logp": [(logp, ref_logp, g_lp)], "entropy": [(ent, ref_ent, g_ent)]}
    terms["both"] = terms["logp"] + terms["entropy"]
    loss = sum((x * g).sum() for x, _, g in terms[which])
    ref_loss = sum((r * g.double()).sum() for _, r, g in terms[which])
    gh, gw = torch.autograd.grad(loss, (h, w))
    rgh, rgw = torch.autograd.grad(ref_loss, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    for got, want in ((gh, rgh), (gw, rgw)):
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        assert err < grad_rtol, f"relative gradient error {err:.2e} > {grad_rtol:.0e}"
    return logp, ent, gh, gw


CASES = {
    # name: (make kwargs, temperature, value tolerance)
    "temperature-0.6": (dict(n=13, d=24, v=80, scale=3.0), 0.6, dict(atol=2e-5, rtol=1e-5)),
    "temperature-1.7": (dict(n=16, d=24, v=80, scale=3.0, seed=3), 1.7, dict(atol=2e-5, rtol=1e-5)),
    # Logits in about [-800, -140]: exp underflows to 0 unless the running max starts at -inf.
    "all-negative": (dict(n=9, d=16, v=80, scale=120.0, all_negative=True), 1.0, dict(atol=2e-5, rtol=1e-5)),
    "large-magnitude": (dict(n=12, d=24, v=80, scale=3e3, seed=2), 1.0, dict(atol=2e-2, rtol=2e-5)),
    "vocab-33": (dict(n=7, d=16, v=33, scale=2.0), 0.9, dict(atol=2e-5, rtol=1e-5)),
    "n-1": (dict(n=1, d=24, v=80, scale=2.0), 0.6, dict(atol=2e-5, rtol=1e-5)),
    "ignored": (dict(n=11, d=16, v=80, scale=2.0, n_ignored=4), 1.0, dict(atol=2e-5, rtol=1e-5)),
}


def test_triton_path_runs_here():
    """The Triton tests below run the interpreter on CPU; they need TRITON_INTERPRET=1 at import."""
    assert fl.triton is not None, "triton is not installed"
    assert fl._INTERPRETED or torch.cuda.is_available(), "set TRITON_INTERPRET=1 before importing engine.kernels"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_float64_autograd(backend, case):
    kwargs, temperature, tol = CASES[case]
    h, w, t = make(**kwargs)
    grad_rtol = 2e-3 if case == "large-magnitude" else 1e-4  # fp32 logits of ~1e3 keep ~1e-4 of p
    logp, ent, gh, _ = check_against_oracle(BACKENDS[backend], h, w, t, temperature, tol, grad_rtol)
    assert (logp <= 0).all() and (ent >= 0).all()
    ignored = t == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (gh[ignored] == 0).all()  # ignored rows get no gradient


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_of_one_output_alone(backend, which):
    """Backward with only one output used (the other's gradient arrives as None)."""
    h, w, t = make(n=10, d=16, v=80, scale=3.0, n_ignored=2)
    check_against_oracle(BACKENDS[backend], h, w, t, 0.6, dict(atol=2e-5, rtol=1e-5), which=which)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bf16_inputs_accumulate_in_fp32(backend):
    """bf16 hidden/weight: log-probs as accurate as fp32 math on the bf16 values (bf16 logits
    would be off by ~1e-2); gradients come back in bf16."""
    h, w, t = make(n=16, d=32, v=80, scale=3.0, dtype=torch.bfloat16, n_ignored=2)
    check_against_oracle(BACKENDS[backend], h, w, t, 0.6, dict(atol=5e-5, rtol=2e-5), grad_rtol=1e-2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_without_entropy_returns_logprobs_only(backend):
    h, w, t = make(n=8, d=16, v=40, scale=2.0, n_ignored=1)
    logp = BACKENDS[backend](h, w, t, 0.6)
    assert isinstance(logp, torch.Tensor) and logp.shape == (8,)
    ref, _ = oracle(h, w, t, 0.6)
    torch.testing.assert_close(logp.double(), ref, atol=2e-5, rtol=1e-5)
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    rgh, rgw = torch.autograd.grad(ref.sum(), (h, w))
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_tied_embeddings_gradient_sums_both_uses(backend):
    """The LM head is the input embedding: its gradient adds the head's and the lookup's."""
    h0, w, t = make(n=12, d=16, v=48, scale=2.0)
    ids = torch.randint(0, 48, (12,), generator=torch.Generator().manual_seed(5))
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(6)) / 4
    hidden = torch.tanh(w[ids] @ mix)
    logp = BACKENDS[backend](hidden, w, t, 0.6)
    (gw,) = torch.autograd.grad(logp.sum(), w)
    w64 = w.detach().double().requires_grad_()
    ref, _ = oracle(torch.tanh(w64[ids] @ mix.double()), w64, t, 0.6)
    (rgw,) = torch.autograd.grad(ref.sum(), w64)
    torch.testing.assert_close(gw.double(), rgw, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_saves_nothing_vocabulary_sized(backend):
    """The backward recomputes logits: no [N, V] tensor is kept for it."""
    h, w, t = make(n=20, d=8, v=80, scale=2.0)  # N * V = 1600 exceeds every input's size
    if backend == "triton":
        dev = triton_device()
        logp, _ = fl._triton_logprobs(h.to(dev), w.to(dev), t.to(dev), 1.0, True, SMALL)
    else:
        logp, _ = run_reference(h, w, t, 1.0, True)
    saved = logp.grad_fn.saved_tensors
    assert saved and all(x.numel() < 20 * 80 for x in saved)


# ------------------------------------------------------------------ log-probs <= 0 always


def adversarial(seed, scale, peak):
    """Random logits plus rows whose target dominates by `peak` (logp within rounding of 0)."""
    h, w, t = make(n=16, d=16, v=48, scale=scale, seed=seed)
    with torch.no_grad():
        h[:8] = w[t[:8]] * peak  # target logit ~ peak * |w_t|^2, far above the rest
    return h.detach(), w.detach(), t


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("scale,peak,temperature", [(1.0, 5.0, 1.0), (30.0, 40.0, 0.6), (1e3, 1e3, 0.3)])
def test_logprobs_never_positive_triton_and_reference(backend, scale, peak, temperature):
    h, w, t = adversarial(0, scale, peak)
    logp, ent = BACKENDS[backend](h, w, t, temperature, True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all(), logp.max().item()
    assert (ent >= 0).all(), ent.min().item()
    assert (logp[:8] > -1e-3).all()  # the dominating rows really sit at the rounding edge


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    log_scale=st.floats(-2, 4),
    peak=st.floats(0, 100),
    temperature=st.floats(0.05, 5.0),
)
def test_reference_logprobs_never_positive_property(seed, log_scale, peak, temperature):
    h, w, t = adversarial(seed, 10.0**log_scale, peak)
    logp, ent = run_reference(h, w, t, temperature, True)
    assert (logp <= 0).all() and (ent >= 0).all()


# ------------------------------------------------------------------ bad input


def _inputs(n=4, d=8, v=10):
    return torch.randn(n, d), torch.randn(v, d), torch.randint(0, v, (n,))


BAD = {
    "hidden-3d": (lambda h, w, t: (h[None], w, t, 1.0), r"hidden must be \[N, d\].*\(1, 4, 8\)"),
    "weight-d": (lambda h, w, t: (h, w[:, :5], t, 1.0), r"weight must be \[V, d=8\].*\(10, 5\)"),
    "targets-len": (lambda h, w, t: (h, w, t[:3], 1.0), r"targets must be \[N=4\].*\(3,\)"),
    "dtype-mix": (lambda h, w, t: (h.bfloat16(), w, t, 1.0), r"share a dtype.*bfloat16.*float32"),
    "float-targets": (lambda h, w, t: (h, w, t.float(), 1.0), r"targets must be an integer.*float32"),
    "device": (lambda h, w, t: (h, w.to("meta"), t, 1.0), r"share a device.*meta"),
    "target-V": (lambda h, w, t: (h, w, torch.tensor([0, 10, 1, 2]), 1.0), r"\[0, V=10\).*got 10 at index 1"),
    "target-neg": (lambda h, w, t: (h, w, torch.tensor([0, 1, -1, 2]), 1.0), r"\[0, V=10\).*got -1 at index 2"),
    "target--101": (lambda h, w, t: (h, w, torch.tensor([-101, 1, 2, 2]), 1.0), r"got -101 at index 0"),
    "temp-0": (lambda h, w, t: (h, w, t, 0.0), r"temperature must be a finite number > 0; got 0.0"),
    "temp-neg": (lambda h, w, t: (h, w, t, -0.6), r"temperature .*> 0; got -0.6"),
    "temp-nan": (lambda h, w, t: (h, w, t, float("nan")), r"temperature .*; got nan"),
    "temp-inf": (lambda h, w, t: (h, w, t, float("inf")), r"temperature .*; got inf"),
}


@pytest.mark.parametrize("fn", [kernels.fused_logprobs, kernels.fused_logprobs_reference])
@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_value_error_naming_the_value(fn, case):
    build, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        fn(*build(*_inputs()))


# ------------------------------------------------------------------ compiles for real GPUs

COMPILE_SCRIPT = r"""
import importlib, re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
fl = importlib.import_module("engine.kernels.fused_logprobs")
assert not fl._INTERPRETED
for cc, dt, ieee, stages in ((90, "bf16", False, 3), (80, "fp32", True, 2)):
    for fn, ptr_types in ((fl._fwd_kernel, [dt, dt, "i64", "fp32"]),
                          (fl._dlogits_kernel, [dt, dt, "i64", "fp32", "fp32", "fp32", "fp32", dt])):
        consts = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, UPCAST=False, IEEE=ieee, WITH_ENTROPY=True)
        names = [n for n in fn.arg_names if n not in consts]
        sig = {n: ("*" + ptr_types.pop(0) if n.endswith("_ptr") else "fp32" if n == "temperature" else "i32") for n in names}
        # What the JIT infers at run time for 16-aligned pointers and sizes such as d = 2048.
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n not in ("N", "V", "temperature")}
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=8, num_stages=stages))
        buffers = re.findall(r"memdesc<(\d)x128x64", k.asm["ttgir"])
        print(fn.__name__, cc, dt, len(k.asm["cubin"]), "stages", max(map(int, buffers)), "shared", k.metadata.shared)
"""


def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """The interpreter accepts code that the compiler rejects: compile both kernels to cubin
    (no GPU needed) and check the bf16 loads are software-pipelined on Hopper."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert sum("stages" in line for line in lines) == 4, done.stdout
    for line in lines:
        if " 90 bf16 " in line:
            assert "stages 3" in line, line  # triple-buffered shared-memory loads


# ------------------------------------------------------------------ GPU at real shapes


def _relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n,d,v", [(torch.bfloat16, 4096, 2048, 151936), (torch.float32, 1024, 1024, 32000)])
def test_gpu_real_shapes_match_fp32_autograd(dtype, n, d, v):
    torch.manual_seed(0)
    h = (torch.randn(n, d, device="cuda") * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda") / math.sqrt(d)).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    logp, ent = kernels.fused_logprobs(h, w, t, 0.6, True)
    g_lp, g_ent = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    gh, gw = torch.autograd.grad((logp * g_lp + ent * g_ent).sum(), (h, w))
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    z = (h32 @ w32.T) / 0.6
    lp = torch.log_softmax(z, -1)
    valid = t != -100
    ref_logp = lp.gather(1, t.clamp_min(0)[:, None])[:, 0] * valid
    ref_ent = -(lp.exp() * lp).sum(-1) * valid
    rgh, rgw = torch.autograd.grad((ref_logp * g_lp + ref_ent * g_ent).sum(), (h32, w32))
    torch.testing.assert_close(logp, ref_logp, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(ent, ref_ent, atol=2e-3, rtol=1e-4)
    assert (logp <= 0).all() and (ent >= 0).all()
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert _relative_error(gh, rgh) < bound and _relative_error(gw, rgw) < bound


@pytest.mark.gpu
def test_gpu_extra_memory_is_small():
    """N=16k, V=152k, d=2048 bf16: materialised logits alone would be 5 GB (bf16) + 10 GB (fp32)."""
    n, d, v = 16384, 2048, 151936
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") / math.sqrt(d)).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernels.fused_logprobs(h, w, t, 0.6).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = h.numel() * 2 + w.numel() * 2
    assert extra - grads < 1.5 * 2**30, f"{(extra - grads) / 2**30:.2f} GiB beyond the gradients"
