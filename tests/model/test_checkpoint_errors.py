"""Every way a checkpoint can be bad gets an error naming the file and the tensor."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import CheckpointError, ConfigError, load_model


@pytest.fixture
def folder(save_hf):
    return save_hf("llama-bias-untied")[1]


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_model_type_names_it_and_the_supported_list(folder):
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt2'; supported: \['llama', 'mistral', 'qwen2', 'qwen3'\]"):
        load_model(folder)


@pytest.mark.parametrize("changes,match", [
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0}}, "needs 'low_freq_factor'"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)"),
])
def test_unsupported_config_values_are_named(folder, changes, match):
    _edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=match):
        load_model(folder)


def test_partial_rotary_factor_at_top_level_is_refused(folder):
    _edit_config(folder, partial_rotary_factor=0.5)
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5 is not supported"):
        load_model(folder)


def test_missing_sliding_window_key_means_the_transformers_default(save_hf):
    _, folder = save_hf("mistral", sliding_window=None)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("sliding_window")
    (folder / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(folder)
    assert model.config.sliding_windows == [4096] * 3


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)


def test_config_that_is_not_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(folder)


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_model(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(folder, damage):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable safetensors file .*model\.safetensors"):
        load_model(folder)


def test_wrongly_shaped_tensor_names_file_and_tensor(folder):
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_weights(folder, lambda t: t.__setitem__(name, torch.zeros(7, 64)))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \(7, 64\), the config needs \(16, 64\)"):
        load_model(folder)


def test_missing_tensor_is_named(folder):
    name = "model.layers.2.mlp.up_proj.bias"
    _edit_weights(folder, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\) the config needs, first '{name}'.*model\.safetensors"):
        load_model(folder)


def test_unexpected_tensor_is_named(folder):
    _edit_weights(folder, lambda t: t.__setitem__("model.layers.0.mlp.experts.0.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"holds tensor 'model\.layers\.0\.mlp\.experts\.0\.weight'"):
        load_model(folder)


def test_recomputed_rope_buffers_in_old_checkpoints_are_ignored(folder):
    _edit_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    load_model(folder)


def test_sharded_checkpoint_with_a_missing_shard(folder, tmp_path):
    model, _ = load_model(folder)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size=20_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard {victim.name}, which is missing"):
        load_model(out)


def test_index_listing_a_tensor_its_shard_lacks(folder, tmp_path):
    model, _ = load_model(folder)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size=20_000)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is listed for .*model-\d+-of-\d+\.safetensors but not stored in it"):
        load_model(out)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused(folder, name):
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / name)
    with pytest.raises(CheckpointError, match=rf"{name} is a pickle checkpoint; only safetensors"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        load_model(folder / name)


def test_no_code_from_the_checkpoint_ever_runs(folder, tmp_path):
    """auto_map entries point transformers at Python files in the folder; we never import them."""
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(payload)
    _edit_config(folder, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
    ))
    try:
        load_model(folder)
    except CheckpointError as err:
        assert "tokenizer" in str(err)
    assert not marker.exists()
