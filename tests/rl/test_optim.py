"""The trainer's AdamW: textbook on fp32, no lost small steps on bf16; the LR schedule."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.optim import AdamW, warmup_linear_decay


def _run(param: torch.Tensor, opt_cls, steps: int, lr: float, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(param.clone())
    opt = opt_cls([p], lr=lr, **kw)
    g = torch.linspace(-1, 1, p.numel()).reshape(p.shape)
    for _ in range(steps):
        p.grad = g.to(p.dtype)
        opt.step()
    return p.detach()


def test_fp32_matches_torch_adamw():
    x = torch.randn(64)
    ours = _run(x, AdamW, 20, 1e-2, weight_decay=0.1)
    ref = _run(x, torch.optim.AdamW, 20, 1e-2, weight_decay=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # same math, other rounding order


def test_bf16_keeps_updates_far_below_an_ulp():
    # lr 1e-6 on weights ~1: each Adam step (~1e-6) is far below half a bf16 ulp (~4e-3), so a
    # plain bf16 update rounds every step away; the compensated one must track fp32.
    x = torch.full((64,), 1.0)
    steps = 300
    exact = _run(x.double(), AdamW, steps, 1e-6).float()            # float64 reference
    plain = _run(x.bfloat16(), torch.optim.AdamW, steps, 1e-6, weight_decay=0.0)
    ours = _run(x.bfloat16(), AdamW, steps, 1e-6)
    moved = (exact - x).abs()
    assert moved.max() > 1e-4                                        # the updates add up to something
    assert torch.equal(plain.float(), x)                              # plain bf16 AdamW loses all of it
    # Compensated: parameter within one bf16 ulp of the fp32 trajectory (the rest sits in the buffer).
    assert ((ours.float() - exact).abs() <= 2 ** -7).all()
    opt_state = _state_after(x.bfloat16(), steps)
    total = ours.float() + opt_state["compensation"].float()
    torch.testing.assert_close(total, exact, rtol=0, atol=1e-6)  # vs a total movement of ~3e-4


def _state_after(x: torch.Tensor, steps: int) -> dict:
    p = torch.nn.Parameter(x.clone())
    opt = AdamW([p], lr=1e-6)
    g = torch.linspace(-1, 1, p.numel())
    for _ in range(steps):
        p.grad = g.to(p.dtype)
        opt.step()
    return opt.state[p]


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(100, 0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == 0.0
    g = warmup_linear_decay(10, 0.0)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)


def test_log_warmup_is_deepspeeds_then_linear_decay():
    f = warmup_linear_decay(100, 0.1, "log")  # 10 warmup steps
    assert f(0) == 0.0  # log(1): the reference's first step runs at lr 0
    assert f(4) == pytest.approx(math.log(5) / math.log(10))
    assert f(9) == pytest.approx(1.0)
    assert f(10) == 1.0 and f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert warmup_linear_decay(100, 0.005, "log")(0) == 1.0  # one warmup step: nothing to ramp
    with pytest.raises(ValueError, match=r"warmup_type must be one of \('linear', 'log'\), got 'cosine'"):
        warmup_linear_decay(100, 0.1, "cosine")
