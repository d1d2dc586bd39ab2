"""Hugging Face checkpoints in and out: config.json + safetensors, nothing else.

Loading never unpickles and never runs code from the checkpoint folder: weights come only
from safetensors files, the config is parsed as JSON, and the tokenizer is loaded with
`trust_remote_code=False` from local files. Every problem is reported with the file and
the tensor it concerns.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.model.config import ConfigError, ModelConfig, dtype_from_str
from engine.model.fused_linear import prefuse_state_dict
from engine.model.transformer import Transformer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors some checkpoints carry that the model recomputes (old Llama exports store RoPE buffers).
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, pickled, or does not match its config."""


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attn_impl: str = "auto",
) -> tuple[Transformer, Any]:
    """Load (model, tokenizer) from a Hugging Face model folder.

    dtype: None keeps the checkpoint's `torch_dtype` (float32 when the config names none).
    The tokenizer comes from transformers' AutoTokenizer when the folder has tokenizer
    files, else it is None.
    """
    folder = Path(path)
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_message(folder))
        raise CheckpointError(f"{folder} is a file; load_model expects a model folder with {CONFIG_NAME}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    cfg = _read_config(folder)
    target_dtype = _resolve_dtype(dtype, cfg)
    files = _weight_files(folder)
    with torch.device("meta"):
        model = Transformer(cfg, attn_impl=attn_impl)
    # Each tensor is cast and moved as it is read, so peak host memory stays near one copy;
    # tensors the model recomputes or ties are dropped unread.
    skip = lambda name: bool(IGNORED_TENSORS.match(name)) or (  # noqa: E731
        name == "lm_head.weight" and cfg.tie_word_embeddings)
    tensors = _read_tensors(files, folder, skip)
    tensors = {name: (t.to(device=device, dtype=target_dtype), path) for name, (t, path) in tensors.items()}
    state = _match_state_dict(model, tensors, folder)
    del tensors
    # q/k/v and gate/up become row blocks of one tensor per layer here (each group's separate
    # tensors freed as it is built), so the assigned parameters already share the storage
    # the fused matmuls need and the model's load hook has nothing to copy.
    prefuse_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope()
    model.config.torch_dtype = str(target_dtype).removeprefix("torch.")
    model.config.generation = _read_json(folder / GENERATION_CONFIG_NAME) if (folder / GENERATION_CONFIG_NAME).exists() else {}
    model.eval()
    return model, load_tokenizer(folder)


def load_tokenizer(folder: str | os.PathLike):
    """AutoTokenizer from local files when the folder has any tokenizer file, else None."""
    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - re-raised with the folder named
        raise CheckpointError(f"could not load the tokenizer in {folder}: {err}") from err


def save_model(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB", tokenizer=None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors (or shards + index) that transformers loads unchanged.

    state_dict: the tensors to write instead of model.state_dict() (e.g. an FSDP model's, gathered)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = {name: t.detach().contiguous().cpu()
             for name, t in (model.state_dict() if state_dict is None else state_dict).items()}
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    cfg = model.config.to_hf_dict()
    if len(dtypes) == 1:
        cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in [folder / WEIGHTS_NAME, folder / INDEX_NAME, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if model.config.generation:
        (folder / GENERATION_CONFIG_NAME).write_text(json.dumps(model.config.generation, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


# ------------------------------------------------------------------ helpers
def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return raw


def _read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    raw = _read_json(path)
    try:
        return ModelConfig.from_hf_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return dtype_from_str(cfg.torch_dtype) or torch.float32
    return dtype_from_str(dtype)


def _pickle_message(path: Path) -> str:
    return (f"{path} is a pickle checkpoint; only safetensors weights are loaded (pickle can run "
            "arbitrary code). Convert it once with transformers, e.g. "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)")


def _weight_files(folder: Path) -> dict[str, list[str] | None]:
    """Map safetensors file -> the tensor names the index assigns to it (None: all in the file)."""
    index_path = folder / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {err!r}") from err
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(fname, []).append(tensor)
        for fname in files:
            if not (folder / fname).exists():
                raise CheckpointError(f"{index_path} names shard {fname}, which is missing from {folder}")
        return files
    if (folder / WEIGHTS_NAME).exists():
        return {WEIGHTS_NAME: None}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_message(folder / pickles[0]))
    raise CheckpointError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _read_tensors(
    files: dict[str, list[str] | None], folder: Path, skip: Callable[[str], bool]
) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors by name (but those `skip` names), each with the file it came from."""
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for fname, names in files.items():
        path = folder / fname
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for name in names if names is not None else sorted(keys):
                    if name not in keys:
                        raise CheckpointError(f"tensor {name!r} is listed for {path} but not stored in it")
                    if not skip(name):
                        out[name] = (f.get_tensor(name), path)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"corrupt or unreadable safetensors file {path}: {err}") from err
    return out


def _match_state_dict(model: Transformer, tensors: dict[str, tuple[torch.Tensor, Path]], folder: Path) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    where = next(iter(tensors.values()))[1] if tensors else folder
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(
            f"checkpoint {folder} is missing {len(missing)} tensor(s) the config needs, first {missing[0]!r} "
            f"(looked in {', '.join(sorted({str(p.name) for _, p in tensors.values()})) or where})"
        )
    state = {}
    for name, (tensor, path) in tensors.items():
        if name not in expected:
            raise CheckpointError(
                f"{path} holds tensor {name!r}, which a {model.config.model_type} model with this config does not have"
            )
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config needs {want}")
        state[name] = tensor
    return state


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)
