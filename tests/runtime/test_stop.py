"""Incremental stop-string matching equals decoding the whole text, for several kinds of tokenizer."""
from __future__ import annotations

import random

import pytest

from engine.model.tiny import char_tokenizer
from engine.runtime.params import SamplingParams
from engine.runtime.sequence import Sequence
from engine.runtime.stop import StopMatcher, token_pieces

CORPUS = [
    "The answer is 42.\n\nProblem: what is 6*7?", "Café naïve résumé — 中文 数学 😀 emoji",
    "Solution:\nStep 1: 12+30=42\n#### 42", "ünïcödé ∑ ∫ √ π ≈ 3.14159", "\n\n\nProblem: again",
] * 20


def _trained(kind: str):
    """A small BPE tokenizer of the given kind, trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>", byte_fallback=kind == "metaspace"))
    if kind == "bytelevel":  # GPT-2 / Llama-3 / Qwen style: every byte is a token, multi-byte characters split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece / Llama-2 style: a leading-space marker and byte fallback
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # Llama-2's tokenizer.json decoder
        alphabet = []
    specials = ["<s>", "</s>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] * (kind == "metaspace")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["char", "bytelevel", "metaspace"])
def tokenizer(request):
    return char_tokenizer() if request.param == "char" else _trained(request.param)


def _first_stop_exact(tokenizer, generated: list[int], stop: tuple[str, ...]) -> int | None:
    """The reference: the first number of tokens whose decoded text contains a stop string."""
    for i in range(1, len(generated) + 1):
        text = tokenizer.decode(generated[:i], skip_special_tokens=True)
        if any(s in text for s in stop):
            return i
    return None


def _first_stop_incremental(matcher: StopMatcher, prompt: list[int], generated: list[int], stop) -> int | None:
    seq = Sequence(0, 0, 0, list(prompt), len(prompt), SamplingParams(stop=stop))
    for i, token in enumerate(generated, 1):
        seq.tokens.append(token)
        if matcher.update(seq, token):
            return i
    return None


def test_incremental_matching_finds_the_first_stop_of_the_decoded_text(tokenizer):
    matcher = StopMatcher(tokenizer)
    rng = random.Random(0)
    texts = CORPUS[:5]
    stops = [("\n\n\nProblem:",), ("42",), ("é",), ("中文", "#### "), ("\n\n",), ("😀",), ("Step 1: 12",)]
    found = 0
    for trial in range(60):
        stop = stops[trial % len(stops)]
        # Real text (the stop strings occur in it) and random tokens (broken UTF-8, special tokens).
        if trial % 3:
            generated = tokenizer.encode(rng.choice(texts) + rng.choice(texts), add_special_tokens=False)
        else:
            generated = [rng.randrange(len(tokenizer)) for _ in range(40)]
        prompt = tokenizer.encode("Problem: x", add_special_tokens=False)
        exact = _first_stop_exact(tokenizer, generated, stop)
        assert _first_stop_incremental(matcher, prompt, generated, stop) == exact, (stop, generated)
        found += exact is not None
    assert found >= 10  # the check is not vacuous


def test_pieces_concatenate_to_the_decoded_text_for_regular_tokens(tokenizer):
    pieces = token_pieces(tokenizer)
    ids = tokenizer.encode(" ".join(CORPUS[:5]), add_special_tokens=False)
    if all(pieces[t] is not None for t in ids):  # (the first token is decoded alone, as a text starts)
        text = tokenizer.decode(ids[:1], skip_special_tokens=True) + "".join(pieces[t] for t in ids[1:])
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert pieces[tokenizer.eos_token_id] == ""  # special tokens add no text, as decode(skip_special_tokens=True)


def test_byte_level_tokens_inside_a_character_are_irregular():
    tok = _trained("bytelevel")
    pieces = token_pieces(tok)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and any(pieces[t] is None for t in ids)  # the emoji's bytes are split into tokens
    assert all(p is not None for p in (pieces[t] for t in tok.encode("Solution", add_special_tokens=False)))


def test_a_metaspace_token_keeps_its_leading_space():
    tok = _trained("metaspace")
    pieces = token_pieces(tok)
    ids = tok.encode("is 42 again", add_special_tokens=False)
    # Alone, the first token loses its leading space; inside a text, every later token keeps it.
    assert tok.decode(ids[:1]) + "".join(pieces[t] for t in ids[1:]) == tok.decode(ids) == "is 42 again"
    assert any(pieces[t].startswith(" ") for t in ids[1:])


def test_a_stop_string_at_the_very_start_follows_the_decoded_text():
    # The decoded generation starts without the first token's leading space, so " 42" cannot
    # match at the very start, while "42" can.
    tok = _trained("metaspace")
    matcher = StopMatcher(tok)
    generated = tok.encode(" 42 is 42", add_special_tokens=False)
    for stop in ((" 42",), ("42",)):
        assert _first_stop_incremental(matcher, [5], generated, stop) == _first_stop_exact(tok, generated, stop)


def test_a_tokenizer_that_cleans_up_spaces_takes_the_exact_path():
    tok = char_tokenizer()
    tok.clean_up_tokenization_spaces = True  # " ." -> "." across tokens: no context-free pieces
    assert set(token_pieces(tok)) == {None}
    generated = tok.encode("x = 1 . Then y !", add_special_tokens=False)
    for stop in (("1.",), ("y!",), (" .",)):
        assert _first_stop_incremental(StopMatcher(tok), [5], generated, stop) == \
            _first_stop_exact(tok, generated, stop)
