"""merge_states (Triton, interpreted on CPU) and its torch twin: partial attentions over two
disjoint key sets merge into the attention over their union (a float64 dense oracle)."""
from __future__ import annotations

import importlib

import pytest
import torch

ms = importlib.import_module("engine.kernels.merge_states")
merge_states = ms.merge_states
merge_states_reference = ms.merge_states_reference
FNS = {"public": merge_states, "reference": merge_states_reference}


def attention(q, k, v, keep):
    """float64 (o [N, H, D], lse [N, H]) of q [N, H, D] over the keys k, v [N, L, H, D] where keep [N, L]."""
    s = torch.einsum("nhd,nlhd->nhl", q.double(), k.double())
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("nhl,nlhd->nhd", p, v.double()), lse


def split_partials(n, h, d, length, dtype, seed=0):
    """Partials over a random split of each row's keys; some rows have an empty side."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g) * 1.5
    k, v = torch.randn(n, length, h, d, generator=g), torch.randn(n, length, h, d, generator=g)
    side = torch.rand(n, length, generator=g) < 0.5
    side[0] = True  # row 0: every key on side 1, side 2 empty
    side[1] = False  # row 1: side 1 empty
    o1, l1 = attention(q, k, v, side)
    o2, l2 = attention(q, k, v, ~side)
    union = attention(q, k, v, torch.ones_like(side))
    return (o1.to(dtype), l1.float(), o2.to(dtype), l2.float()), union


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype,d", [(torch.float32, 40), (torch.float16, 160)])  # 160: two D chunks
def test_merge_of_random_partials_equals_attention_over_the_union(fn, dtype, d):
    states, (want_o, want_lse) = split_partials(5, 3, d, 12, dtype)
    o, lse = FNS[fn](*states)
    assert o.dtype == dtype and o.shape == states[0].shape
    assert lse.dtype == torch.float32 and lse.shape == states[1].shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(o.double(), want_o, **tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("fn", FNS)
def test_an_empty_side_returns_the_other_exactly_and_is_never_read(fn):
    (o1, l1, o2, l2), _ = split_partials(4, 2, 16, 6, torch.float16, seed=1)
    l1[0] = float("-inf")  # row 0: side 1 empty
    l2[1] = float("-inf")  # row 1: side 2 empty
    l1[2] = l2[2] = float("-inf")  # row 2: both empty
    o1[0] = float("nan")  # an empty side's o may hold anything
    o2[1] = float("nan")
    o1[2] = o2[2] = float("nan")
    o, lse = FNS[fn](o1, l1, o2, l2)
    assert torch.equal(o[0], o2[0]) and torch.equal(lse[0], l2[0])
    assert torch.equal(o[1], o1[1]) and torch.equal(lse[1], l1[1])
    assert (o[2] == 0).all() and (lse[2] == float("-inf")).all()
    assert torch.isfinite(o[3]).all() and torch.isfinite(lse[3]).all()


def test_strided_inputs():
    """Slices of wider tensors (row stride != D) merge like their contiguous copies."""
    (o1, l1, o2, l2), _ = split_partials(3, 2, 32, 8, torch.float32, seed=2)
    wide = torch.zeros(3, 2, 48)
    wide[..., :32] = o1
    o, lse = merge_states(wide[..., :32], l1, o2.transpose(0, 1).contiguous().transpose(0, 1), l2)
    want_o, want_lse = merge_states_reference(o1, l1, o2, l2)
    torch.testing.assert_close(o, want_o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)


def test_public_function_takes_the_triton_path_here(monkeypatch):
    assert ms._INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"
    calls = []
    real = ms._merge_two_triton
    monkeypatch.setattr(ms, "_merge_two_triton", lambda *a: calls.append(1) or real(*a))
    states, _ = split_partials(2, 2, 16, 4, torch.float32)
    merge_states(*states)
    assert calls == [1]


def test_stage2_merge_of_many_splits():
    """merge_partials (the split-K stage 2): S partials per row, empty splits holding NaN."""
    g = torch.Generator().manual_seed(3)
    n, h, d, s_count, length = 3, 2, 24, 5, 20
    q = torch.randn(n, h, d, generator=g)
    k, v = torch.randn(n, length, h, d, generator=g), torch.randn(n, length, h, d, generator=g)
    owner = torch.randint(0, 4, (n, length), generator=g)  # split 4 is always empty
    owner[2] = 1  # row 2: all keys in split 1
    o_part = torch.empty(n, h, s_count, d)
    lse_part = torch.empty(n, h, s_count)
    for s in range(s_count):
        o, lse = attention(q, k, v, owner == s)
        o_part[:, :, s], lse_part[:, :, s] = o.float(), lse.float()
    o_part[torch.isinf(lse_part)] = float("nan")
    out, lse_out = torch.empty(n, h, d, dtype=torch.float16), torch.empty(n, h)
    ms.merge_partials(o_part, lse_part, out, lse_out)
    want_o, want_lse = attention(q, k, v, torch.ones(n, length, dtype=torch.bool))
    torch.testing.assert_close(out.double(), want_o, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse_out.double(), want_lse, atol=1e-5, rtol=1e-6)


def test_stage2_merge_of_only_empty_splits_gives_zero_and_minus_inf():
    o_part = torch.full((2, 1, 3, 16), float("nan"))
    lse_part = torch.full((2, 1, 3), float("-inf"))
    out, lse = torch.empty(2, 1, 16), torch.empty(2, 1)
    ms.merge_partials(o_part, lse_part, out, lse)
    assert (out == 0).all() and (lse == float("-inf")).all()


def _states():
    states, _ = split_partials(2, 3, 8, 4, torch.float32)
    return states


BAD = {
    "o1-2d": (lambda o1, l1, o2, l2: (o1[0], l1, o2, l2), r"o1 must be \[N, H, D\]; got shape \(3, 8\)"),
    "o1-int": (lambda o1, l1, o2, l2: (o1.int(), l1, o2.int(), l2), r"o1 must be float32/bfloat16/float16; got torch.int32"),
    "o2-shape": (lambda o1, l1, o2, l2: (o1, l1, o2[:, :2], l2), r"o2 must have o1's shape \(2, 3, 8\); got \(2, 2, 8\)"),
    "o-dtypes": (lambda o1, l1, o2, l2: (o1, l1, o2.half(), l2), r"o1 and o2 must share a dtype; got torch.float32, torch.float16"),
    "lse-shape": (lambda o1, l1, o2, l2: (o1, l1, o2, l2[:1]), r"lse2 must be \[N=2, H=3\]; got shape \(1, 3\)"),
    "lse-dtype": (lambda o1, l1, o2, l2: (o1, l1.half(), o2, l2), r"lse1 must be float32; got torch.float16"),
    "device": (lambda o1, l1, o2, l2: (o1, l1, o2.to("meta"), l2), r"must share a device; got cpu, cpu, meta, cpu"),
}


@pytest.mark.parametrize("fn", FNS)
def test_bad_input_raises_value_error_naming_the_value(fn):
    for name, (build, message) in BAD.items():
        with pytest.raises(ValueError, match=message):
            FNS[fn](*build(*_states()))


@pytest.mark.gpu
def test_gpu_bf16_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, d = 4096, 32, 128
    o1, o2 = (torch.randn(n, h, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    l1, l2 = (torch.randn(n, h, device="cuda", generator=g) * 4 for _ in range(2))
    l1[::7] = float("-inf")
    l2[::5] = float("-inf")
    o, lse = merge_states(o1, l1, o2, l2)
    want_o, want_lse = merge_states_reference(o1, l1, o2, l2)
    torch.testing.assert_close(o.float(), want_o.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-6)
    assert torch.equal(o[5], o1[5]) and torch.equal(o[7], o2[7])  # one side empty: exact
