"""Shared fixtures: tiny random Hugging Face models of each supported family, saved to disk."""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Triton kernels run on CPU tensors only in interpreter mode, which must be chosen before
# triton is first imported (no test module imports it before this conftest runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small enough for milliseconds on CPU, large enough to exercise GQA (4 query heads per KV
# head), an explicit head_dim different from hidden/heads, and several layers.
BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
)
FAMILIES = {
    "llama": dict(attention_bias=False),
    "llama-bias-untied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16, tie_word_embeddings=False),
    "mistral": dict(sliding_window=None, head_dim=16),
}


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
    model_type = family.split("-")[0]
    fields = {**BASE, **FAMILIES.get(family, {}), **overrides}
    return cls[model_type](**fields)


def make_hf_model(config, seed: int = 0, std: float = 0.15):
    """A transformers causal LM with every parameter random (norm weights near 1).

    Large random weights (std 0.15 instead of HF's 0.02) give logits of order 1, so a
    wrong RoPE, norm or bias shows up far above the 1e-5 parity bound.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(family, **config overrides) -> (hf_model, folder)."""
    counter = iter(range(1000))

    def _save(family: str, seed: int = 0, **overrides):
        model = make_hf_model(hf_config(family, **overrides), seed=seed)
        folder = tmp_path / f"{family}-{next(counter)}"
        model.save_pretrained(folder)
        return model, folder

    return _save


# The analyses' policy (tests/test_analysis.py, tests/test_credit_analysis.py): the built-in tiny
# model, small enough for hundreds of rollouts in a test.
TINY_POLICY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, max_position_embeddings=256)


@pytest.fixture
def tiny_policy_args() -> dict:
    """TINY_POLICY for a test's own variant (test modules cannot import this conftest by name:
    tests/runtime has one too)."""
    return dict(TINY_POLICY)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    from engine.model import create_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-policy")
    create_tiny_checkpoint(folder, seed=0, **TINY_POLICY)
    return folder


@pytest.fixture(scope="session")
def tiny_ppo_checkpoint(tiny_policy_dir, tmp_path_factory):
    """A PPO checkpoint's layout: critic/ = the body in HF format + critic/value_head.safetensors."""
    from safetensors.torch import save_file

    from engine.model import load_model
    from engine.rl.algorithms.ppo import ValueModel

    folder = tmp_path_factory.mktemp("ppo-ckpt")
    body, _ = load_model(tiny_policy_dir)
    critic = ValueModel(body, seed=1)
    body.save_pretrained(str(folder / "critic"))
    save_file({k: v.contiguous() for k, v in critic.head.state_dict().items()},
              str(folder / "critic" / "value_head.safetensors"))
    return folder
