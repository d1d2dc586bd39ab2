"""The built-in tiny model and character tokenizer load like any Hugging Face checkpoint."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import load_model
from engine.model import char_tokenizer, create_tiny_checkpoint
from engine.model.tiny import CHARACTERS, SPECIAL_TOKENS


def test_char_tokenizer_round_trips_every_character():
    tok = char_tokenizer()
    text = "Q: 12 + 7 * (3 - 1) = ?\nA: 7 * 2 = 14\n12 + 14 = 26\n#### 26 " + CHARACTERS
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert min(ids) >= len(SPECIAL_TOKENS)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert tok.encode("é") == [tok.unk_token_id]


def test_tiny_checkpoint_loads_here_and_in_transformers(tmp_path):
    create_tiny_checkpoint(tmp_path, seed=3)
    model, tok = load_model(tmp_path)
    assert tok is not None and tok.eos_token_id == 2 and tok.pad_token_id == 0
    text = "3+4=7\n"
    assert tok.decode(tok.encode(text)) == text
    assert model.config.vocab_size >= len(tok)
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == tok.encode(text)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_seed_decides_the_weights(tmp_path):
    for seed, sub in ((0, "a"), (0, "b"), (1, "c")):
        create_tiny_checkpoint(tmp_path / sub, seed=seed)
    a, b, c = (load_model(tmp_path / s)[0].state_dict() for s in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
