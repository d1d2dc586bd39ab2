"""The built-in tiny model and its character-level tokenizer.

Used by the CPU default run (the arithmetic task) and by tests. Both are ordinary
checkpoint pieces: `create_tiny_checkpoint(dir)` writes config.json, model.safetensors and
a `tokenizer.json` that transformers' AutoTokenizer loads, so `load_model(dir)` treats the
tiny model exactly like any Hugging Face model.
"""
from __future__ import annotations

import os
import string

from engine.model.config import ModelConfig
from engine.model.transformer import Transformer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every printable ASCII character plus newline: enough for arithmetic and GSM8K-style text.
CHARACTERS = "\n" + "".join(c for c in string.printable if c not in "\t\r\x0b\x0c\n")


def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: one token per character, ids 0-3 special.

    decode(encode(text)) == text for any text over CHARACTERS; other characters map to <unk>.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(vocab_size: int = 128, **overrides) -> ModelConfig:
    """~0.9M-parameter Llama-family config (GQA, tied embeddings) that trains in minutes on CPU."""
    fields = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        extra={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def create_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, **overrides) -> None:
    """Write a freshly initialised tiny model and the char tokenizer to `path`."""
    tokenizer = char_tokenizer()
    cfg = tiny_config(**overrides)
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    Transformer(cfg).init_weights(seed).save_pretrained(str(path), tokenizer=tokenizer)
