"""The tiny model with its char tokenizer, built once per test module (tests may change its weights)."""
from __future__ import annotations

import pytest

from engine import load_model
from engine.model import create_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    create_tiny_checkpoint(folder, seed=5)
    return load_model(folder)
