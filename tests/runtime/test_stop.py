"""Incremental stop-string matching equals decoding the whole text, for several kinds of tokenizer."""
from __future__ import annotations

import os
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


def _first_stop_exact(tokenizer, prompt: list[int], generated: list[int], stop: tuple[str, ...]) -> int | None:
    """The reference: the first number of generated tokens after which the prompt + generation,
    decoded together, holds a stop string that ends past the prompt's own text."""
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    for i in range(1, len(generated) + 1):
        text = tokenizer.decode(prompt + generated[:i], skip_special_tokens=True)
        boundary = len(os.path.commonprefix([head, text]))
        if any(text.find(s, max(0, boundary - len(s) + 1)) >= 0 for s in stop):
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
        exact = _first_stop_exact(tokenizer, prompt, generated, stop)
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
        assert _first_stop_incremental(matcher, [5], generated, stop) == _first_stop_exact(tok, [5], generated, stop)


def test_a_tokenizer_that_cleans_up_spaces_takes_the_exact_path():
    tok = char_tokenizer()
    tok.clean_up_tokenization_spaces = True  # " ." -> "." across tokens: no context-free pieces
    assert set(token_pieces(tok)) == {None}
    generated = tok.encode("x = 1 . Then y !", add_special_tokens=False)
    for stop in (("1.",), ("y!",), (" .",)):
        assert _first_stop_incremental(StopMatcher(tok), [5], generated, stop) == \
            _first_stop_exact(tok, [5], generated, stop)


def _split_inside(tokenizer, ids: list[int], text: str, s: str) -> list[int]:
    """Token counts k whose prefix ids[:k] decodes to text ending strictly inside an occurrence of s."""
    spans = [(i, i + len(s)) for i in range(len(text)) if text.startswith(s, i)]
    ks = []
    for k in range(1, len(ids)):
        end = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        if any(i < end < j for i, j in spans):
            ks.append(k)
    return ks


def test_random_splits_of_a_text_between_prompt_and_generation_match_the_reference(tokenizer):
    """A text's tokens split between prompt and generation, as VinePPO's states split a response:
    stop strings straddle the boundary, or lie inside the prompt."""
    matcher = StopMatcher(tokenizer)
    rng = random.Random(1)
    stops = [("\n\n\nProblem:",), ("42",), ("Problem: again",), ("#### 42", "é"), ("\n\n",), ("12+30",)]
    straddled = inside = 0
    for trial in range(80):
        stop = stops[trial % len(stops)]
        text = rng.choice(CORPUS[:5]) + rng.choice(CORPUS[:5])
        ids = tokenizer.encode(text, add_special_tokens=False)
        ks = [k for s in stop for k in _split_inside(tokenizer, ids, text, s)] if trial % 2 else []
        k = rng.choice(ks) if ks else rng.randrange(1, len(ids))
        prompt, generated = ids[:k], ids[k:]
        exact = _first_stop_exact(tokenizer, prompt, generated, stop)
        assert _first_stop_incremental(matcher, prompt, generated, stop) == exact, (stop, prompt, generated)
        gen_text = tokenizer.decode(generated, skip_special_tokens=True)
        straddled += exact is not None and not any(s in gen_text for s in stop)
        inside += exact is None and any(s in tokenizer.decode(prompt) for s in stop)
    assert straddled >= 3 and inside >= 3  # both kinds occurred


def test_a_stop_string_straddling_the_boundary_stops_and_cuts_to_nothing(tokenizer):
    matcher = StopMatcher(tokenizer)
    stop = ("\n\n\nProblem:",)
    text = "Solution:\nStep 1: 12+30=42\n\n\nProblem: again"
    ids = tokenizer.encode(text, add_special_tokens=False)
    ks = _split_inside(tokenizer, ids, text, stop[0])
    assert ks  # the stop string spans several tokens
    for k in ks:
        prompt, generated = ids[:k], ids[k:]
        n = _first_stop_incremental(matcher, prompt, generated, stop)
        assert n is not None and n == _first_stop_exact(tokenizer, prompt, generated, stop)
        assert stop[0] not in tokenizer.decode(generated[:n])  # only the prompt's tail completes it
        seq = Sequence(0, 0, 0, prompt + generated[:n], len(prompt), SamplingParams(stop=stop))
        assert matcher.cut(seq, tokenizer.decode(generated[:n], skip_special_tokens=True)) == ""


def test_a_stop_string_inside_the_prompt_never_stops(tokenizer):
    matcher = StopMatcher(tokenizer)
    prompt = tokenizer.encode("The answer is 42.\n\n\nProblem: what is 6*7?", add_special_tokens=False)
    generated = tokenizer.encode(" Solution: 12+30=42", add_special_tokens=False)
    assert _first_stop_incremental(matcher, prompt, generated, ("\n\n\nProblem:", "6*7")) is None
    # a stop string that occurs in the prompt still stops when it occurs again in the generation
    n = _first_stop_incremental(matcher, prompt, generated, ("42",))
    assert n is not None and n == _first_stop_exact(tokenizer, prompt, generated, ("42",))
    seq = Sequence(0, 0, 0, prompt + generated[:n], len(prompt), SamplingParams(stop=("42",)))
    text = tokenizer.decode(generated[:n], skip_special_tokens=True)
    assert matcher.cut(seq, text) == text[:text.find("42")] and matcher.cut(seq, text).endswith("12+30=")


def test_special_tokens_at_the_end_of_the_prompt_do_not_hide_a_stop_string(tokenizer):
    """Special tokens decode to nothing: after 19 of them the exact path's window of
    keep + 1 + 8 tokens held no character of the prompt, and a stop string that starts in the
    prompt's text before them was missed."""
    matcher = StopMatcher(tokenizer)
    stop = ("\n\n\nProblem:",)
    text = "Solution:\nStep 1: 12+30=42\n\n\nProblem: again"
    ids = tokenizer.encode(text, add_special_tokens=False)
    special = tokenizer.convert_tokens_to_ids("</s>") if "</s>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    assert special in tokenizer.all_special_ids
    for k in _split_inside(tokenizer, ids, text, stop[0]):
        prompt, generated = ids[:k] + [special] * 19, ids[k:]
        exact = _first_stop_exact(tokenizer, prompt, generated, stop)
        assert exact is not None  # the reference sees the stop string across the specials
        assert _first_stop_incremental(matcher, prompt, generated, stop) == exact, k


def test_cut_at_stop_with_a_context():
    from engine.runtime.params import cut_at_stop

    assert cut_at_stop("\nProblem: y", ["\n\n\nProblem:"], context="a\n\n") == ""
    assert cut_at_stop("\nProblem: y", ["\n\n\nProblem:"]) == "\nProblem: y"
    assert cut_at_stop("x\nProblem: y", ["\n\n\nProblem:"], context="a\n\n") == "x\nProblem: y"
    assert cut_at_stop("ab stop cd", ["stop"], context="stop ") == "ab "  # the prompt's match does not count
    assert cut_at_stop("ab", ["stop"], context="stop") == "ab"
    assert cut_at_stop("op here", ["stop"], context="xst") == ""  # starts in the context
    assert cut_at_stop("a stop", ["stop", "a s"]) == ""  # the earliest start wins
