"""Step splitting and the step -> token mapping of VinePPO, against hand-worked examples,
hypothesis properties and a brute-force prefix-decode oracle, on three local tokenizers."""
from __future__ import annotations

import json
import os
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.rl.steps import (
    MAX_PENDING, STEP_STYLES, _math_spans, split_steps, step_token_ends, token_char_starts,
)
from engine.tasks.base import STEP_STYLES as TASK_STEP_STYLES

FAST = settings(max_examples=60, deadline=None, derandomize=True)
TOKEN_CASES = settings(max_examples=25, deadline=None, derandomize=True)


def pieces(text: str, ends: list[int]) -> list[str]:
    return [text[a:b] for a, b in zip([0] + ends, ends)]


def check(text: str, style: str, want: list[str]) -> None:
    """split_steps gives exactly the steps `want` (i.e. the offsets of their cumulative lengths)."""
    assert "".join(want) == text  # the expectation itself is a partition of the text
    ends = split_steps(text, style)
    assert pieces(text, ends) == want
    assert ends == list(accumulate(map(len, want)))


def test_styles_match_the_tasks():
    assert set(TASK_STEP_STYLES) <= set(STEP_STYLES) and STEP_STYLES == ("newline", "math", "math-legacy")


def test_math_is_the_reference_splitter_and_legacy_stays_available():
    from engine.tasks.math_steps import split_math_steps

    text = ("The two equations are\n\\[\nx + y + z = 10 + w,\\\\\nx - y = 2 \\text{ and more}.\n\\]\n"
            "Adding them gives $2x = 12.$ Hence x is equal to six here.")
    assert split_steps(text, "math") == split_math_steps(text)
    assert split_steps(text, "math-legacy") != split_steps(text, "math")  # the two really differ here


# ------------------------------------------------------------------ "newline" (GSM8K, arithmetic)

def test_newline_arithmetic_solution_exact_offsets():
    text = "12+7=19\n19*3=57\n57-5=52\n#### 52"
    assert split_steps(text, "newline") == [8, 16, 31]  # the answer line joins the last operation


def test_newline_gsm8k_response():
    text = ("Natalia sold 48/2 = 24 clips in May.\n"
            "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
            "#### 72")
    check(text, "newline", ["Natalia sold 48/2 = 24 clips in May.\n",
                            "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"])


def test_newline_blank_lines_leading_middle_trailing():
    text = "\n \nFirst step.\n\n  \nSecond step.\nThird step, no newline"
    check(text, "newline", ["\n \nFirst step.\n\n  \n", "Second step.\n", "Third step, no newline"])
    check("a\nb\n\n", "newline", ["a\n", "b\n\n"])
    check("a\n\n\n#### 5", "newline", ["a\n\n\n#### 5"])


def test_newline_answer_line_takes_the_rest():
    check("a\nb\n  #### 7\nextra\nmore", "newline", ["a\n", "b\n  #### 7\nextra\nmore"])
    check("#### 7\nextra", "newline", ["#### 7\nextra"])  # no step before it: the only step
    check("x is #### 7\ny", "newline", ["x is #### 7\n", "y"])  # "####" inside a line is text


def test_newline_degenerate_texts():
    assert split_steps("", "newline") == []
    assert split_steps(" \n\n ", "newline") == [4]
    check("one line", "newline", ["one line"])


# ------------------------------------------------------------------ "math" (MATH heuristic)

def test_math_sentences_split_before_capitals():
    text = ("First we note that x is positive. Then we square both sides of it. "
            "so this is not a new sentence. e.g. Also here. Dr. Smith knows the answer here.")
    check(text, "math", [
        "First we note that x is positive.",
        " Then we square both sides of it. so this is not a new sentence. e.g. Also here.",
        " Dr. Smith knows the answer here.",  # "e.g." / "Dr." are not sentence ends
    ])


def test_math_newlines_and_short_parts():
    # "Step 1:\n" and "So\n" are under 20 characters: they join the next part; the short
    # last part joins the one before it; the blank line joins the part before it.
    text = "Step 1:\nWe add the two numbers together.\n\nSo\nthe total is equal to 12.\nDone."
    check(text, "math-legacy", ["Step 1:\nWe add the two numbers together.\n\n",
                         "So\nthe total is equal to 12.\nDone."])


def test_math_spans_protect_periods_and_inline_newlines():
    text = ("We know that $a = 1. B = 2$ holds for the values. Next we see $x +\ny$ is "
            "positive and also fine. Then \\(3. X\\) is odd.")
    check(text, "math-legacy", [
        "We know that $a = 1. B = 2$ holds for the values.",  # no cut inside $...$
        " Next we see $x +\ny$ is positive and also fine.",  # no cut at a newline in inline math
        " Then \\(3. X\\) is odd.",
    ])


def test_math_display_math_newlines_and_tail_period():
    text = ("The two equations are\n\\[\nx + y + z = 10 + w,\\\\\nx - y = 2 \\text{ and more}.\n\\]\n"
            "Adding them gives $2x = 12.$ Hence x is equal to six here.")
    check(text, "math-legacy", [
        "The two equations are\n",
        "\\[\nx + y + z = 10 + w,\\\\\n",  # "\\[\n" alone is short: joins the next display line
        "x - y = 2 \\text{ and more}.\n",
        "\\]\nAdding them gives $2x = 12.$",  # cut after a math span ending in "."
        " Hence x is equal to six here.",
    ])


def test_math_escaped_dollars_and_unclosed_spans():
    text = "It costs \\$5. Then it costs \\$7 more than before. And $ this is unclosed. Okay then."
    check(text, "math", ["It costs \\$5. Then it costs \\$7 more than before.",
                         " And $ this is unclosed. Okay then."])
    assert _math_spans("a \\$ b $c$ d $$e$$ \\[f\\] \\(g\\) \\begin{align}h\\end{align}") == [
        (7, 10, False, 1), (13, 18, True, 2), (19, 24, True, 2), (25, 30, False, 2), (31, 56, True, 11)]


def test_math_long_part_split_near_the_midpoint():
    # 136 characters, no sentence cut: the ", " nearest the middle (76 / 60) is chosen, not the
    # first one (5 / 131); the cut goes between the comma and the space.
    left = "First, since the sum of all the angles in any triangle is always 180 degrees,"
    right = " we find that the third angle is 180 - 50 - 60 = 70 degrees"
    check(left + right, "math", [left, right])
    # the only ", " would leave 5 characters on one side: " and " is next, cut before its space
    check("Well, we multiply the first equation by three and then we subtract the second equation from it to get y",
          "math", ["Well, we multiply the first equation by three and",
                   " then we subtract the second equation from it to get y"])


def test_math_long_part_falls_back_to_math_cuts():
    # the only ", " leaves a side under 40 characters: split after the "=" nearest the middle
    text = "So, $a^2 + b^2 + c^2 + d^2 = (a + b)^2 + (c + d)^2 - 2ab - 2cd = 100 - 2(ab + cd) = 64 - 2 \\cdot 7 + 1$"
    assert len(text) > 100
    ends = split_steps(text, "math")
    assert pieces(text, ends) == ["So, $a^2 + b^2 + c^2 + d^2 = (a + b)^2 + (c + d)^2 - 2ab - 2cd =",
                                  " 100 - 2(ab + cd) = 64 - 2 \\cdot 7 + 1$"]
    # no admissible cut: the long part stays whole
    blob = "x" * 150
    assert split_steps(blob, "math") == [150]


def test_math_long_part_recursive_split():
    clause = "the quantity on the left side is positive"  # 41 characters
    text = ", ".join([clause] * 6) + "."
    steps = pieces(text, split_steps(text, "math"))
    assert all(len(s) <= 100 for s in steps) and len(steps) >= 3
    assert all(s.endswith(",") for s in steps[:-1])  # cuts only after commas, before the space


def test_bad_style():
    with pytest.raises(ValueError):
        split_steps("a", "sentences")


# ------------------------------------------------------------------ properties over random text

ALPHABET = st.sampled_from(list("aZ. \n\t$\\[]()#,=+é三:") + ["\\[", "\\]", "$$", "####", "\\begin{a}", "\\end{a}",
                                                               " and ", " to ", ". The", "\n\n", "x" * 30])
TEXTS = st.lists(ALPHABET, max_size=60).map("".join)


@FAST
@given(TEXTS, st.sampled_from(STEP_STYLES))
def test_split_invariants(text, style):
    ends = split_steps(text, style)
    if not text:
        assert ends == []
        return
    assert all(a < b for a, b in zip([0] + ends, ends)) and ends[-1] == len(text)
    steps = pieces(text, ends)
    assert "".join(steps) == text
    if text.strip():  # no whitespace-only step
        assert all(s.strip() for s in steps)
    else:
        assert len(steps) == 1
    if style == "newline":
        assert all(text[e - 1] == "\n" for e in ends[:-1])  # cuts only after newlines
    else:
        assert len(steps) == 1 or all(len(s) >= 20 for s in steps)
        inline = [(s, e) for s, e, display, _ in _math_spans(text) if not display]
        inside = [c for c in ends for s, e in inline if s < c < e]
        assert all(text[:c].endswith(("=", "+", "\\equiv")) for c in inside)  # only math cuts


# ------------------------------------------------------------------ tokenizers

CORPUS = [
    "The café serves crème brûlée. Then x = 5 plus 4, and ∑ of 三 is 四.",
    "Let x = 5.\nThen 2x = 10.\n#### 10",
    "naïve über façade, so $a^2 + b^2 = c^2$ holds; 数学 is math.",
] * 3
TEXT = "The café ∑ 三 costs 5.\nThen x = 2, so naïve über 数学.\n\n#### 7"


@pytest.fixture(scope="module")
def char_tok():
    from engine.model.tiny import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """GPT-2-style byte-level BPE; a small vocabulary leaves CJK characters split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def sp_tok():
    """Llama-2-style SentencePiece BPE: "▁" word prefixes (Metaspace), <0xXX> byte fallback for
    characters outside the vocabulary, the leading space of a decode stripped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = metaspace
    ascii_corpus = [line.encode("ascii", "ignore").decode() for line in CORPUS]  # no é, 三, ...
    tok.train_from_iterator(ascii_corpus, trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", bos_token="<s>",
                                   clean_up_tokenization_spaces=False)


TOKENIZERS = ["char_tok", "bpe_tok", "sp_tok"]


def encode(tok, text: str, eos: bool = True) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    return ids + [tok.eos_token_id] if eos else ids


def oracle_starts(tok, ids: list[int]) -> list[int]:
    """Brute force (quadratic): start[i] = the longest prefix of the full text that the decode of
    some ids[:j], j <= i, agrees with. (A prefix decode ending inside a character shows U+FFFD
    there, which the full text does not have unless it ends inside a character; byte fallback
    may even garble the complete characters of the same byte run, hence the running maximum.)"""
    full = tok.decode(ids, skip_special_tokens=True)
    starts, best = [], 0
    for i in range(len(ids)):
        prefix = tok.decode(ids[:i], skip_special_tokens=True)
        best = max(best, len(os.path.commonprefix([prefix, full])))
        starts.append(best)
    return starts


def test_tokenizers_exercise_the_slow_cases(char_tok, bpe_tok, sp_tok):
    """The fixtures really have partial characters and a dropped leading space."""
    for tok in (bpe_tok, sp_tok):
        ids = encode(tok, TEXT, eos=False)
        assert tok.decode(ids) == TEXT
        assert any(tok.decode([i]) == "\ufffd" for i in ids)  # a token holding part of a character
    word = sp_tok.convert_tokens_to_ids("▁Then")
    assert sp_tok.decode([word]) == "Then"  # single-token decode drops the leading space


@pytest.mark.parametrize("name", TOKENIZERS)
def test_token_char_starts_match_the_oracle(name, request):
    tok = request.getfixturevalue(name)
    text = TEXT if name != "char_tok" else TEXT.encode("ascii", "ignore").decode()
    ids = encode(tok, text)
    starts = token_char_starts(tok, ids)
    assert starts == oracle_starts(tok, ids)
    assert starts[-1] == len(text)  # the EOS starts at the end of the text
    assert starts[0] == 0 and all(a <= b for a, b in zip(starts, starts[1:]))
    with_eos = list(ids)
    for i in range(len(ids) - 1, 0, -4):  # special tokens in the middle, before "▁word" tokens too
        with_eos.insert(i, tok.eos_token_id)
    assert token_char_starts(tok, with_eos) == oracle_starts(tok, with_eos)
    assert token_char_starts(tok.backend_tokenizer, ids) == starts  # a bare tokenizers.Tokenizer


def test_token_char_starts_by_hand(bpe_tok, char_tok):
    assert token_char_starts(char_tok, encode(char_tok, "ab\nc")) == [0, 1, 2, 3, 4]
    ids = encode(bpe_tok, "a 三", eos=True)
    assert bpe_tok.convert_ids_to_tokens(ids) == ["a", "Ġ", "ä", "¸ī", "</s>"]  # 三 = E4 | B8 89
    assert token_char_starts(bpe_tok, ids) == [0, 1, 2, 2, 3]  # both bytes tokens start at 三
    cut = encode(bpe_tok, "a 三 b 三", eos=False)[:-1]  # max_tokens stopped inside the last "三"
    text = bpe_tok.decode(cut, skip_special_tokens=True)
    assert text == "a 三 b \ufffd" and token_char_starts(bpe_tok, cut)[-1] == len(text) - 1
    assert token_char_starts(char_tok, []) == []
    assert token_char_starts(char_tok, [char_tok.eos_token_id] * 3) == [0, 0, 0]


@pytest.mark.parametrize("name", TOKENIZERS)
@TOKEN_CASES
@given(data=st.data())
def test_token_char_starts_random_texts(name, request, data):
    tok = request.getfixturevalue(name)
    chars = " \n.,=$abcXYZ" + ("" if name == "char_tok" else "é∑三数ü")
    text = data.draw(st.text(alphabet=chars, max_size=40))
    ids = encode(tok, text, eos=False)
    ids = ids[:len(ids) - data.draw(st.integers(0, 2))]  # cut by max_tokens, maybe inside a character
    if data.draw(st.booleans()):
        ids.append(tok.eos_token_id)
    if data.draw(st.booleans()) and ids:  # a special token in the middle too
        ids.insert(data.draw(st.integers(0, len(ids))), tok.eos_token_id)
    starts = token_char_starts(tok, ids)
    full = tok.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in full:
        assert starts == oracle_starts(tok, ids)
    else:  # cut inside a character: the oracle cannot tell a partial character from a real U+FFFD
        assert all(0 <= a <= b <= len(full) for a, b in zip(starts, starts[1:] + [len(full)]))


class CountingTokenizer:
    """Forwards decode calls and counts the token ids they cover."""

    def __init__(self, tok):
        self.tok, self.tokens_decoded, self.calls = tok, 0, 0
        self.all_special_ids = tok.all_special_ids

    def decode(self, ids, skip_special_tokens=False):
        self.tokens_decoded += len(ids)
        self.calls += 1
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", ["bpe_tok", "sp_tok"])
def test_token_char_starts_cost_is_linear(name, request):
    tok = request.getfixturevalue(name)
    ids = encode(tok, (TEXT + " ") * 30)  # ~1000 tokens on the slow (incremental) path
    counting = CountingTokenizer(tok)
    starts = token_char_starts(counting, ids)  # through tokenizer.decode, not the backend
    assert starts == token_char_starts(tok, ids)
    n = len(ids)
    assert n > 500
    assert counting.calls <= 3 * n + 2  # 2 full decodes, n single-token ones, <= 2 windows a token
    assert counting.tokens_decoded <= (3 + 2 * MAX_PENDING) * n  # bounded windows, no prefixes
    assert starts[:150] == oracle_starts(tok, ids[:150])  # spot-check against the oracle
    assert starts[-1] == len(tok.decode(ids, skip_special_tokens=True))


def test_token_char_starts_realigns_an_unstable_decoder(char_tok):
    """clean_up_tokenization_spaces makes decode(prefix) no prefix of the full decode; offsets
    are mapped onto the cleaned text (a removed space starts where its counterpart is)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=char_tok.backend_tokenizer, eos_token="</s>",
                                  clean_up_tokenization_spaces=True)
    ids = encode(tok, "a . b , c ?")
    assert tok.decode(ids, skip_special_tokens=True) == "a. b, c?"
    #                                  a  _  .  _  b  _  ,  _  c  _  ?  </s>
    assert token_char_starts(tok, ids) == [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8]


# ------------------------------------------------------------------ steps in tokens

def assert_tokens_in_their_steps(tok, ids, style, ends):
    """Token steps partition the tokens; the tokens with text of a token step all start in one
    character step, later token steps in later character steps; text-less tokens at the end
    (EOS) are in the last token step."""
    text = tok.decode(ids, skip_special_tokens=True)
    char_ends = split_steps(text, style)
    starts = token_char_starts(tok, ids)
    assert all(a < b for a, b in zip([0] + ends, ends)) and ends[-1] == len(ids)
    if not text:  # only text-less tokens: one step
        assert ends == [len(ids)]
        return
    previous = -1
    for lo, hi in zip([0] + ends, ends):
        steps = {sum(s >= e for e in char_ends) for s in starts[lo:hi] if s < len(text)}
        assert len(steps) == 1  # every token step has text tokens, all in one character step
        (step,) = steps
        assert step > previous
        previous = step
    trailing = [i for i, s in enumerate(starts) if s == len(text)]
    assert all(i >= ([0] + ends)[-2] for i in trailing)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("style", STEP_STYLES)
def test_step_token_ends_each_token_in_its_step(name, style, request):
    tok = request.getfixturevalue(name)
    text = ("First we compute the total cost of it. Then we add 5.\n\n"
            "Second: the café costs $3.$ So ∑ 三 = 7, and x = 2.\n#### 7")
    if name == "char_tok":
        text = text.encode("ascii", "ignore").decode()
    ids = encode(tok, text)
    ends = step_token_ends(ids, tok, style)
    assert_tokens_in_their_steps(tok, ids, style, ends)
    assert ends[-1] == len(ids) and ends[-2] < len(ids) - 1  # the EOS is in the last step with text
    assert len(ends) == len(split_steps(tok.decode(ids, skip_special_tokens=True), style)) or name == "sp_tok"


def test_step_token_ends_by_hand(char_tok):
    ids = encode(char_tok, "12+7=19\n19*3=57\n#### 57")
    assert step_token_ends(ids, char_tok, "newline") == [8, 24]  # 8 chars, then the rest + EOS
    assert step_token_ends(ids[:-1], char_tok, "newline") == [8, 23]
    assert step_token_ends([], char_tok, "newline") == []
    assert step_token_ends([char_tok.eos_token_id] * 2, char_tok, "math") == [2]  # no text: one step


def test_step_token_ends_merges_a_step_no_token_starts_in(sp_tok):
    """A SentencePiece token "▁5.\\nThen" spans a newline: the step that starts inside it has no
    token of its own and joins the step before it."""
    ids = encode(sp_tok, "a\nb c 5.\nThen")
    assert sp_tok.convert_ids_to_tokens(ids) == ["▁", "a", "\n", "b", "▁c", "▁5.\nThen", "</s>"]
    assert split_steps("a\nb c 5.\nThen", "newline") == [2, 9, 13]  # "a\n" "b c 5.\n" "Then"
    assert token_char_starts(sp_tok, ids) == [0, 0, 1, 2, 3, 5, 13]
    ends = step_token_ends(ids, sp_tok, "newline")
    assert ends == [3, 7]  # "Then" has no token of its own; the EOS follows the token before it
    assert_tokens_in_their_steps(sp_tok, ids, "newline", ends)


class ListTokenizer:
    """Tokens are fixed strings; id 9 is a special EOS. Enough to build exact straddle cases."""

    vocab = {0: "ab", 1: "\ncd\ne", 2: "f", 3: "\n", 9: "</s>"}
    all_special_ids = [9]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids))


def test_step_token_ends_with_straddling_tokens():
    tok = ListTokenizer()
    # text "ab\ncd\nef": steps "ab\n" "cd\n" "ef"; token "\ncd\ne" starts in step 0 and swallows
    # step 1, so the token steps are [ab, \ncd\ne] and [f, </s>]
    assert token_char_starts(tok, [0, 1, 2, 9]) == [0, 2, 7, 8]
    assert step_token_ends([0, 1, 2, 9], tok, "newline") == [2, 4]
    assert step_token_ends([9, 0, 3, 2, 9, 9], tok, "newline") == [3, 6]  # leading EOS: first step


def test_chunk_tokens(char_tok):
    assert step_token_ends(list(range(10)), None, chunk_tokens=4) == [4, 8, 10]
    assert step_token_ends(list(range(8)), None, chunk_tokens=4) == [4, 8]
    assert step_token_ends(list(range(3)), None, chunk_tokens=100) == [3]
    assert step_token_ends([], None, chunk_tokens=2) == []
    assert step_token_ends(list(range(5)), char_tok, chunk_tokens=1) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("kwargs", [
    dict(), dict(style="newline", chunk_tokens=4), dict(chunk_tokens=0), dict(chunk_tokens=-3),
    dict(chunk_tokens=2.5), dict(chunk_tokens=True), dict(style="lines"),
])
def test_step_token_ends_bad_arguments(kwargs, char_tok):
    with pytest.raises(ValueError):
        step_token_ends([5, 6, 7], char_tok, **kwargs)


def test_step_token_ends_accepts_tensors(char_tok):
    import torch

    ids = encode(char_tok, "a line\nanother")
    assert step_token_ends(ids, char_tok, "newline") == [7, 15]
    assert step_token_ends(torch.tensor(ids), char_tok, "newline") == [7, 15]
