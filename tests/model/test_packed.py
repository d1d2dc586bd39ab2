"""Packed (padding-free) and padded batches give the same per-token results."""
from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.model.attention import cu_seqlens_from_positions

LENGTHS = [7, 1, 12, 4]


@pytest.fixture(params=["llama", "qwen3", "mistral-window"])
def model(request, save_hf):
    family = request.param
    if family == "mistral-window":
        _, folder = save_hf("mistral", sliding_window=3)
    else:
        _, folder = save_hf(family)
    return load_model(folder)[0]


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g) for n in LENGTHS]


@torch.no_grad()
def test_packed_equals_each_sequence_alone(model):
    seqs = _sequences()
    alone = [model(s[None])[0] for s in seqs]
    packed_ids = torch.cat(seqs)[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    by_cu = model(packed_ids, cu_seqlens=cu)[0]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    by_positions = model(packed_ids, position_ids=positions)[0]
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(by_cu[s:e], alone[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(by_positions[s:e], alone[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_equals_packed(model, side):
    seqs = _sequences(seed=3)
    t = max(LENGTHS)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl], mask[i, sl] = s, 1
    padded = model(ids, attention_mask=mask)
    assert torch.isfinite(padded).all()  # padding rows are finite too
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    packed = model(torch.cat(seqs)[None], cu_seqlens=cu)[0]
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        torch.testing.assert_close(padded[i, sl], packed[cu[i]:cu[i + 1]], atol=1e-5, rtol=0)


def test_packed_gradients_equal_padded_gradients(save_hf):
    _, folder = save_hf("qwen2")
    model = load_model(folder)[0].train()
    seqs = _sequences(seed=5)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    packed = model(torch.cat(seqs)[None], cu_seqlens=cu)[0]
    packed.square().mean().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    t = max(LENGTHS)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = model(ids, attention_mask=mask)
    padded[mask.bool()].square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_packed[n], atol=1e-5, rtol=1e-4, msg=n)


def test_gradient_checkpointing_gives_the_same_gradients(save_hf):
    _, folder = save_hf("llama")
    model = load_model(folder)[0].train()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = enabled
        model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_cu_seqlens_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert cu_seqlens_from_positions(pos).tolist() == [0, 3, 5, 9]
    assert cu_seqlens_from_positions(torch.tensor([0, 0, 0])).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("cu", [[0, 5], [1, 24], [0, 10, 10, 24], [0, 30]])
def test_bad_cu_seqlens_are_refused(model, cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 24, dtype=torch.long), cu_seqlens=torch.tensor(cu))


def test_bad_shapes_are_refused(model):
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="packed sequences"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4]))


def test_restarting_positions_in_a_multi_row_batch_are_refused(model):
    """transformers silently runs such rows as one sequence each; we refuse rather than guess."""
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"position_ids restart inside a row of a \[B > 1, T\] batch"):
        model(torch.zeros(2, 5, dtype=torch.long), position_ids=positions)
    # a left-padded batch with explicit positions is fine: padding holds repeated zeros
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    model(torch.ones(2, 5, dtype=torch.long), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def test_token_ids_outside_the_vocabulary_are_refused(model):
    with pytest.raises(ValueError, match=r"token id 96 is outside the vocabulary \[0, 96\)"):
        model(torch.tensor([[1, 96]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
