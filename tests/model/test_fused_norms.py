"""The inference path's fused residual-add + RMSNorm (`Backbone.forward(..., fused_norms=True)`).

It carries the residual stream beside the normed activations and fuses each add into the
norm after it (the next layer's input norm, or the final norm). On the CPU it runs the
kernels' torch twins, which are the model's RMSNorm op for op: the result must equal the
unfused path bit for bit. With the Triton kernel (interpreted here) it must agree to
rounding, with one kernel per add + norm.
"""
from __future__ import annotations

import pytest
import torch

import engine.model.transformer as tr
from engine.model import Transformer, tiny_config
from engine.model.attention import PaddedAttention

CONFIGS = {
    "llama": dict(),
    "qwen3-like": dict(qk_norm=True, qkv_bias=False, tie_word_embeddings=False),
    "qwen2-like": dict(qkv_bias=True),
}


def make_model(family: str, seed: int = 0) -> Transformer:
    fields = dict(vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12)
    return Transformer(tiny_config(**{**fields, **CONFIGS[family]})).init_weights(seed, std=0.3).eval()


def backbone(model: Transformer, ids: torch.Tensor, fused_norms: bool | None) -> torch.Tensor:
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t)
    ctx = PaddedAttention(None, model.config.sliding_windows, t)
    return model.model(ids, pos, ctx, fused_norms=fused_norms)


def ids_for(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def norm_calls(monkeypatch):
    """Counts of the norm ops the model calls: {"add": fused add+norm calls, "norm": plain norms}."""
    calls = {"add": 0, "norm": 0}
    for name, key in (("fused_add_rms_norm", "add"), ("fused_add_rms_norm_reference", "add"),
                      ("rms_norm", "norm"), ("rms_norm_reference", "norm")):
        real = getattr(tr, name)

        def counted(*args, _real=real, _key=key):
            calls[_key] += 1
            return _real(*args)
        monkeypatch.setattr(tr, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fused_norms_on_cpu_equal_the_unfused_path_bitwise(family, dtype, norm_calls):
    model = make_model(family).to(dtype)
    ids = ids_for(1)
    with torch.no_grad():
        fused = backbone(model, ids, True)
        assert norm_calls == {"add": 2 * 3, "norm": 1}  # two adds per layer; the first input norm alone
        plain = backbone(model, ids, False)
    assert norm_calls == {"add": 6, "norm": 1}  # the unfused path calls neither
    assert torch.equal(fused, plain)
    assert torch.equal(plain, model.hidden_states(ids))


def test_the_triton_kernel_in_the_model(monkeypatch, norm_calls):
    """The public (Triton) ops, as on CUDA: interpreted here; one call per add + norm."""
    import engine.kernels.rmsnorm as rn

    if not rn._INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU machines)")
    monkeypatch.setattr(tr, "_norm_kernel", lambda x: True)
    launches = []
    real = rn._rms_norm_triton
    monkeypatch.setattr(rn, "_rms_norm_triton", lambda *a: launches.append(a[1] is not None) or real(*a))
    model = make_model("qwen2-like", seed=2)
    ids = ids_for(2)
    with torch.no_grad():
        fused = backbone(model, ids, True)
        plain = backbone(model, ids, False)
    assert launches == [False] + [True] * 6  # the first input norm, then one kernel per add + norm
    assert norm_calls == {"add": 6, "norm": 1}
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_the_default_follows_autograd_and_hidden_states_never_fuses(norm_calls):
    model = make_model("llama", seed=3)
    ids = ids_for(3, (1, 5))
    with torch.no_grad():
        backbone(model, ids, None)  # the engine's call: no autograd -> fused
    assert norm_calls["add"] == 6
    with torch.no_grad():
        model.hidden_states(ids)  # PPO's old log-probs: the same arithmetic as the update's
    assert norm_calls["add"] == 6
    out = backbone(model, ids, None)  # autograd on -> unfused, and it trains
    out.sum().backward()
    assert norm_calls["add"] == 6
    assert model.model.layers[0].input_layernorm.weight.grad is not None


def test_fused_norms_refuse_autograd():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="fused_norms=True has no backward"):
        backbone(model, ids_for(4), True)


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cuda_fused_path_matches_the_unfused_one(family):
    """On CUDA: .to("cuda") keeps q/k/v and gate/up fused, and the Triton add + norm agrees to rounding."""
    model = make_model(family, seed=5).to("cuda", torch.bfloat16)
    attn = model.model.layers[0].self_attn
    assert attn._fused[0].weight.data_ptr() == attn.q_proj.weight.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    ids = ids_for(5, (4, 33)).cuda()
    with torch.no_grad():
        fused = backbone(model, ids, True)
        plain = backbone(model, ids, False)
    torch.testing.assert_close(fused.float(), plain.float(), atol=6e-2, rtol=3e-2)
