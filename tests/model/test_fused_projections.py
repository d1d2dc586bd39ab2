"""Fused q/k/v and gate/up projections: one matmul each, Hugging Face names and tensors kept.

The invariant (engine/model/fused_linear.py): each group's HF-named parameters are adjacent
row blocks of one storage, so checkpoints and optimizers see the usual names while the
forward runs one F.linear over the storage. The "unfused" model below is the same module
with `fused_linear` replaced by separate nn.Linear calls and a cat, i.e. the code before
the fusion, on the very same parameters.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.model import Transformer, load_model, save_model, tiny_config
from engine.model.fused_linear import FusedLinears
from engine.rl.optim import AdamW

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def small_config(**overrides):
    fields = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, qkv_bias=True, o_bias=True, mlp_bias=True,
                  tie_word_embeddings=False)
    return tiny_config(**{**fields, **overrides})


def make_model(seed: int = 0, **overrides) -> Transformer:
    return Transformer(small_config(**overrides)).init_weights(seed, std=0.2)


def token_ids(seed: int, shape=(1, 6)) -> torch.Tensor:
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(seed))


def unfused_linear(self, x, group):
    return torch.cat([getattr(self, name)(x) for name in self.fused_groups[group]], dim=-1)


@pytest.fixture
def unfused(monkeypatch):
    """Context: inside it, every FusedLinears module computes its group Linear by Linear."""
    class _Ctx:
        def __enter__(self):
            monkeypatch.setattr(FusedLinears, "fused_linear", unfused_linear)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return _Ctx()


def hf_names(cfg, bias_qkv: bool, bias_mlp: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}self_attn.{proj}.weight")
            if bias_qkv:
                names.add(f"{p}self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}mlp.{proj}.weight")
            if bias_mlp:
                names.add(f"{p}mlp.{proj}.bias")
    return names


def groups_of(model: Transformer):
    """(module, [Linear, ...]) for every fused group of the model."""
    for layer in model.model.layers:
        for attr, names in GROUPS.items():
            module = getattr(layer, attr)
            yield module, [getattr(module, n) for n in names]


def assert_fused(model: Transformer) -> None:
    """Each group's weights (and biases) are consecutive row blocks of one storage, and that
    storage is what the fused matmul reads."""
    for module, linears in groups_of(model):
        for attr in ("weight", "bias"):
            ps = [getattr(m, attr) for m in linears]
            if ps[0] is None:
                continue
            base = ps[0].untyped_storage().data_ptr()
            offset = ps[0].storage_offset()
            for p in ps:
                assert p.untyped_storage().data_ptr() == base and p.storage_offset() == offset and p.is_contiguous()
                offset += p.numel()
        fused = module._fused[0]
        assert fused.weight.data_ptr() == linears[0].weight.data_ptr()
        assert fused.weight.shape[0] == sum(m.weight.shape[0] for m in linears)


def test_named_parameters_are_the_hf_names_without_extras_or_duplicates():
    for bias in (False, True):
        model = make_model(qkv_bias=bias, o_bias=bias, mlp_bias=bias)
        names = [n for n, _ in model.named_parameters()]
        assert len(names) == len(set(names)) == len(list(model.parameters()))
        assert set(names) == hf_names(model.config, bias, bias)
        assert set(model.state_dict()) == set(names)  # no fused buffers in the state dict either
        assert model.num_parameters == sum(p.numel() for _, p in model.named_parameters())
        assert_fused(model)


def test_fused_output_equals_the_unfused_model(unfused):
    model = make_model()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(ids)
        with unfused:
            plain = model(ids)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)


def test_gradients_equal_the_unfused_model(unfused):
    model = make_model(seed=1).double()  # float64: the two matmul orders agree to ~1e-15
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids).logsumexp(-1).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fused = grads()
    with unfused:
        plain = grads()
    assert set(fused) == set(plain)
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-12, rtol=1e-10, msg=name)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.grad.shape == q.weight.shape and q.bias.grad.shape == q.bias.shape


def test_gradient_checkpointing_and_a_frozen_group(unfused):
    model = make_model(seed=2).double()
    model.gradient_checkpointing = True
    model.train()
    for p in model.model.layers[1].mlp.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    model(ids).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model.model.layers[1].mlp.parameters())
    model.zero_grad(set_to_none=True)
    with unfused:
        model(ids).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=1e-12, rtol=1e-10, msg=n)


def test_an_optimizer_step_on_q_proj_is_seen_by_the_fused_matmul(unfused):
    model = make_model(seed=3)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    before = attn.fused_linear(x, 0).detach()
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = AdamW([attn.q_proj.weight], lr=0.1)
    attn.q_proj.weight.grad = torch.ones_like(attn.q_proj.weight)
    opt.step()
    with torch.no_grad():
        after = attn.fused_linear(x, 0)
    q_rows = attn.q_proj.weight.shape[0]
    assert not torch.allclose(after[..., :q_rows], before[..., :q_rows])  # the step moved q
    assert torch.equal(after[..., q_rows:], before[..., q_rows:])  # and nothing else
    torch.testing.assert_close(after[..., :q_rows], F.linear(x, attn.q_proj.weight, attn.q_proj.bias))
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # updated in place
    torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True).step()  # no grads: a no-op
    assert_fused(model)


def test_torch_adamw_trains_the_fused_model_like_the_unfused_one(unfused):
    """Two identical models, one fused, one unfused: after a few torch AdamW steps they agree."""
    a, b = make_model(seed=4).double(), make_model(seed=4).double()
    ids = torch.randint(0, 40, (1, 8), generator=torch.Generator().manual_seed(4))
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for _ in range(3):
        for model, opt, plain in ((a, opt_a, False), (b, opt_b, True)):
            opt.zero_grad()
            if plain:
                with unfused:
                    model(ids).logsumexp(-1).sum().backward()
            else:
                model(ids).logsumexp(-1).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-10, rtol=1e-10, msg=name)
    assert_fused(a)


def test_in_place_update_between_forward_and_backward_is_an_error():
    model = make_model(seed=5)
    ids = token_ids(5, (1, 4))
    loss = model(ids).sum()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        loss.backward()


def test_save_and_load_round_trip(tmp_path, unfused):
    model = make_model(seed=6)
    save_model(model, tmp_path / "ck")
    loaded, _ = load_model(tmp_path / "ck")
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert_fused(loaded)
    ids = token_ids(6)
    with torch.no_grad():
        got = loaded(ids)
        with unfused:
            want = model(ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    half, _ = load_model(tmp_path / "ck", dtype=torch.bfloat16)  # cast while loading: still fused
    assert half.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert_fused(half)


def test_load_model_fuses_without_copying_the_groups(tmp_path, monkeypatch):
    """load_model pre-fuses the checkpoint's tensors (one concatenation per group of names);
    the model's load hook then adopts the assigned views as they are, copying nothing."""
    import engine.model.fused_linear as fl

    save_model(make_model(seed=7), tmp_path / "ck")
    copies = []
    real = fl._concat_into_new_storage
    monkeypatch.setattr(fl, "_concat_into_new_storage",
                        lambda ts: copies.append(ts[0].device.type) or real(ts))
    model, _ = load_model(tmp_path / "ck")
    real_copies = [d for d in copies if d != "meta"]
    assert len(real_copies) == len(fl.fused_parameter_names(model)) == 2 * 2 * model.config.num_hidden_layers
    assert_fused(model)


def test_to_dtype_keeps_the_groups_fused_and_the_parameter_objects(unfused):
    model = make_model(seed=8)
    ids = token_ids(8, (1, 5))
    params = list(model.parameters())
    model.model.layers[0].self_attn.q_proj.weight.grad = torch.ones(32, 32)
    model.to(torch.bfloat16)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # optimizers keep their references
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.bfloat16
    assert_fused(model)
    with torch.no_grad():
        fused = model(ids)
        with unfused:
            plain = model(ids)
    torch.testing.assert_close(fused.float(), plain.float(), atol=2e-2, rtol=2e-2)
    model.float()
    assert_fused(model)
    model.to_empty(device="cpu")
    assert_fused(model)


def test_load_state_dict_writes_through_to_the_fused_storage(unfused):
    model, other = make_model(seed=9), make_model(seed=10)
    ptrs = [p.data_ptr() for p in model.parameters()]
    model.load_state_dict(other.state_dict())
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # copied in place
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(9))
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], -1)
        torch.testing.assert_close(attn.fused_linear(x, 0), want)
    # assign=True installs the given tensors; the load hook gathers them into one storage again.
    fresh = {k: v.clone() * 0.5 for k, v in other.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    assert_fused(model)
    with torch.no_grad():
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], -1)
        torch.testing.assert_close(attn.fused_linear(x, 0), want)
        torch.testing.assert_close(attn.q_proj.weight, fresh["model.layers.1.self_attn.q_proj.weight"])


def test_a_deep_copy_or_a_replaced_tensor_is_refused_at_the_next_forward(unfused):
    model = make_model(seed=11)
    twin = copy.deepcopy(model)  # deepcopy clones each parameter separately
    ids = token_ids(11, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), model(ids))
    assert_fused(twin)
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(twin(ids), model(ids))  # separate storage from the original
    up = model.model.layers[0].mlp.up_proj
    up.weight.data = torch.zeros_like(up.weight)  # bypasses everything but the pointer check
    with torch.no_grad():
        got = model(ids)
        with unfused:
            want = model(ids)
    torch.testing.assert_close(got, want)
    assert_fused(model)
    assert not up.weight.any()
