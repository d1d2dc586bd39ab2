"""Model configuration: the subset of a Hugging Face `config.json` our Transformer uses.

`ModelConfig.from_hf_dict` reads the Llama, Qwen2, Qwen3 and Mistral families, in both the
transformers 4.x layout (`rope_theta` + `rope_scaling`) and the 5.x one (`rope_parameters`).
Keys we do not use are kept in `extra` and written back by `to_hf_dict`, so a checkpoint
saved by us carries its token ids, generation settings and so on unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu",)


class ConfigError(ValueError):
    """A config.json we cannot run faithfully (unknown family, rope type, activation...)."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Biases: Qwen2 has q/k/v biases; Llama's `attention_bias` also covers o_proj.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over head_dim on q and k before RoPE.
    qk_norm: bool = False
    # RoPE: "rope_type" + "rope_theta" + the type's own parameters (HF 5.x layout).
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # One entry per layer: the attention window in tokens, or None for full attention.
    sliding_windows: list[int | None] = field(default_factory=list)
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # generation_config.json when the checkpoint has one (EOS lists live there); not config.json.
    generation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_hidden_layers
        self.validate()

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}")
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ConfigError(
                f"{len(self.sliding_windows)} per-layer attention windows for {self.num_hidden_layers} layers"
            )

    # ---------------------------------------------------------------- HF mapping
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed HF config.json; raises ConfigError naming what is unsupported."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {act!r}; supported: {list(SUPPORTED_ACTIVATIONS)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"config.json has no {key!r}")
        n_layers = d["num_hidden_layers"]
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "mistral":
            qkv_bias = o_bias = False
        else:  # llama, qwen3: one flag for all four projections
            qkv_bias = o_bias = attention_bias
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            rope_parameters=_rope_parameters(d),
            sliding_windows=_sliding_windows(d, model_type, n_layers),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra=d,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' AutoModelForCausalLM loads into the same model."""
        d = {k: v for k, v in self.extra.items() if k not in ("rope_scaling", "rope_theta", "dtype", "torch_dtype")}
        d.update(
            model_type=self.model_type,
            architectures=[SUPPORTED_MODEL_TYPES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            rope_parameters=dict(self.rope_parameters),
            # Old transformers read these two instead of rope_parameters.
            rope_theta=self.rope_parameters["rope_theta"],
        )
        if self.rope_parameters["rope_type"] != "default":
            d["rope_scaling"] = dict(self.rope_parameters)
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        windows = {w for w in self.sliding_windows if w is not None}
        if len(windows) > 1:
            raise ConfigError(f"HF configs hold one sliding_window, this model has {sorted(windows)}")
        window = windows.pop() if windows else None
        if self.model_type == "mistral":
            d["sliding_window"] = window
        elif self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = window is not None
            d["sliding_window"] = window
            d["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in self.sliding_windows]
            d["max_window_layers"] = next(
                (i for i, w in enumerate(self.sliding_windows) if w is not None), self.num_hidden_layers
            )
        elif window is not None:
            raise ConfigError("llama configs have no sliding window")
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in the HF 5.x form, from either the 5.x or the 4.x config layout."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    params = dict(params)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type RoPE parameters are not supported")
    rope_type = params.pop("type", None)
    params["rope_type"] = params.get("rope_type") or rope_type or "default"
    theta = params.get("rope_theta", d.get("rope_theta"))
    params["rope_theta"] = float(theta if theta is not None else 10000.0)
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ConfigError(f"partial_rotary_factor {partial} is not supported")
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault(
            "original_max_position_embeddings",
            d.get("original_max_position_embeddings", d.get("max_position_embeddings")),
        )
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
    for key in required.get(params["rope_type"], ()):
        if key not in params:
            raise ConfigError(f"rope type {params['rope_type']!r} needs {key!r} in its parameters")
    return params


def _sliding_windows(d: dict[str, Any], model_type: str, n_layers: int) -> list[int | None]:
    """Per-layer attention window, following each family's transformers semantics.

    A missing `sliding_window` key means transformers' default of 4096 for these families.
    """
    window = d.get("sliding_window", 4096)
    if model_type == "mistral":
        return [window] * n_layers
    if model_type in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False) or window is None:
            return [None] * n_layers
        layer_types = d.get("layer_types") or [
            "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention" for i in range(n_layers)
        ]
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [None] * n_layers


def dtype_from_str(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]
