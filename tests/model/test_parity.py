"""Our Transformer against transformers' implementation of each supported family."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from engine import load_model
from engine.model.config import ModelConfig

ATOL_FP32 = 1e-5


def _ids(b: int = 2, t: int = 19, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _assert_logits_match(ours, hf, ids, atol=ATOL_FP32):
    expected = hf(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_fp32(save_hf, family):
    hf, folder = save_hf(family)
    model, tokenizer = load_model(folder)
    assert tokenizer is None  # no tokenizer files in the folder
    assert set(model.state_dict()) <= set(hf.state_dict())
    _assert_logits_match(model, hf, _ids())


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_transformers(save_hf, rope):
    hf, folder = save_hf("llama", rope_parameters=rope)
    model, _ = load_model(folder)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    # positions well past original_max_position_embeddings, where the scaling matters
    _assert_logits_match(model, hf, _ids(b=1, t=150))


def test_transformers_4_config_layout_loads_the_same(save_hf):
    """Old configs carry rope_theta + rope_scaling{"type": ...} instead of rope_parameters."""
    hf, folder = save_hf("llama", rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0})
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (folder / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(folder)
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    _assert_logits_match(model, hf, _ids(b=1, t=40))


@pytest.mark.parametrize("family,overrides", [
    ("mistral", dict(sliding_window=5)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
])
def test_sliding_window_matches_transformers(save_hf, family, overrides):
    hf, folder = save_hf(family, **overrides)
    model, _ = load_model(folder)
    assert any(w is not None for w in model.config.sliding_windows)
    if family == "qwen2":
        assert model.config.sliding_windows == [None, 4, 4]
    _assert_logits_match(model, hf, _ids(t=23))


def test_bf16_error_is_no_worse_than_transformers_bf16(save_hf):
    hf, folder = save_hf("qwen3")
    ids = _ids()
    with torch.no_grad():
        reference = hf(ids).logits
        hf_err = (hf.to(torch.bfloat16)(ids).logits.float() - reference).abs().max()
        model, _ = load_model(folder, dtype=torch.bfloat16)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        our_err = (model(ids).float() - reference).abs().max()
    assert our_err <= 2 * hf_err + 1e-2, (our_err, hf_err)


@pytest.mark.parametrize("family", ["llama-bias-untied", "qwen2", "qwen3", "mistral"])
def test_save_pretrained_round_trip_in_transformers(save_hf, tmp_path, family):
    hf, folder = save_hf(family)
    model, _ = load_model(folder)
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
    again, _ = load_model(out)
    assert again.config.to_hf_dict() == model.config.to_hf_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_sharded_save_and_load(save_hf, tmp_path):
    hf, folder = save_hf("llama-bias-untied")
    model, _ = load_model(folder)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    ours, _ = load_model(out)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
        torch.testing.assert_close(ours(ids), model(ids), atol=0, rtol=0)


def test_hidden_states_times_lm_head_are_the_logits(save_hf):
    _, folder = save_hf("llama-bias-untied")
    model, _ = load_model(folder)
    ids = _ids()
    with torch.no_grad():
        h = model.hidden_states(ids)
        assert h.shape == (2, 19, model.config.hidden_size)
        torch.testing.assert_close(h @ model.lm_head_weight.T, model(ids), atol=1e-6, rtol=0)


def test_tied_embeddings_share_one_parameter(save_hf):
    _, folder = save_hf("qwen2")
    model, _ = load_model(folder)
    assert model.config.tie_word_embeddings
    assert model.lm_head_weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()


def test_config_round_trips_through_hf_dict(save_hf):
    _, folder = save_hf("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    cfg = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()).to_hf_dict() == cfg.to_hf_dict()
