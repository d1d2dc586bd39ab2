"""Reasoning steps of a sampled response, in characters and in tokens (VinePPO §1).

VinePPO estimates a Monte Carlo value at the end of every reasoning step and gives each step's
advantage to every token whose first character lies in that step. This module provides the
three pieces of that mapping:

    split_steps(text, style)          -> step end offsets in characters
    token_char_starts(tokenizer, ids) -> where each token's text starts in the decoded text
    step_token_ends(ids, tokenizer, style | chunk_tokens=N) -> step end indices in tokens

Conventions shared by all of them: "ends" are exclusive, strictly increasing and the last one
is the length (of the text / of the token list), so step i is `[ends[i-1], ends[i])` with
`ends[-1] = 0`; an empty input has no steps (`[]`).

Step styles ("newline" for GSM8K and the arithmetic task, "math" for MATH; see
engine.tasks.base.STEP_STYLES):

"math" is engine.tasks.math_steps.split_math_steps, which gives the VinePPO authors' splitter's
steps on all 500 MATH-500 solutions (README, Tasks). "math-legacy" is this module's earlier
re-implementation, described below (the same steps on 228 of those 500), kept as an option.

"newline" (one step per line, after VinePPO's GSM8K splitter)
  * A line ends after its "\\n": the newline belongs to the step it ends. A final line without
    "\\n" is the last step.
  * Blank (empty or whitespace-only) lines never form a step: leading blank lines join the first
    step, any later blank line joins the step before it ("a\\n\\nb" -> "a\\n\\n", "b").
  * The first line that starts with "####" (after optional spaces) is the answer line: it and
    everything after it join the step before it, or form the only step if there is none.
  * A text with no non-blank line is a single step.

"math-legacy" (VinePPO's MATH heuristic as this module first re-implemented it)
  1. Math spans are found first and protected: `$$..$$`, `\\[..\\]`, `\\(..\\)`, `$..$`,
     `\\begin{env}..\\end{env}` and `[asy]..[/asy]`; "\\x" escapes (e.g. "\\$") are not
     delimiters; an inline span (`$`, `\\(`) may not run over a blank line, an unclosed opener
     is plain text. The others are "display" spans.
  2. Candidate cuts: after every "\\n" outside inline math (this includes the newlines inside
     display math); after a sentence-ending "." outside math that is followed by spaces/tabs
     and a capital letter, unless the word before the period has one or two letters ("e.g.",
     "Dr.", "x."); after a math span whose content ends in "." (e.g. "$x=5.$") when a space
     or tab follows it. Period cuts go right after the period, so the following space starts
     the next step, as BPE/SentencePiece tokenizers attach a space to the next word.
  3. Whitespace-only parts join the part before them (the first one joins the next).
  4. Parts under MIN_PART (20) characters join the next part; a short last part joins the
     previous one.
  5. Parts over MAX_PART (100) characters are split again near their midpoint, recursively:
     first at a text cut (", " / " and " / ": " / " to ", tried in this order, outside math,
     cut before the final space) if neither side is shorter than 40 characters, else at a math
     cut (after "=" / "+" / "\\equiv", anywhere) if neither side is shorter than 20.
  All lengths are measured in the original text (the official code measured some of them on
  the placeholder text), and every offset refers to the original text.

Tokens: a token's start is the offset, in `decode(ids, skip_special_tokens=True)`, of the first
character that any of its bytes contributes to; a token contributing nothing (a skipped special
token such as EOS) gets the offset of the next character produced after it (the text length if
none). So the first bytes of a multi-byte character and the token that completes it both start
at that character. Brute force (quadratic; what the tests check): start[i] = the length of the
longest prefix of the text that some decode(ids[:j]), j <= i, agrees with; a prefix decode that
stops inside a character shows U+FFFD there, which the text does not have. If the text itself
ends inside a character (a response cut by max_tokens), the U+FFFD the decoder prints for it is
the last text token's; a genuinely invalid byte's U+FFFD may go to a later token.
"""
from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Sequence
from typing import Literal, get_args

from engine.tasks.math_steps import split_math_steps

StepStyle = Literal["newline", "math", "math-legacy"]
STEP_STYLES: tuple[str, ...] = get_args(StepStyle)

MIN_PART = 20  # "math": shorter parts are merged
MAX_PART = 100  # "math": longer parts are split again
MIN_TEXT_SIDE = 40  # "math": neither side of a text cut of a long part may be shorter
MIN_MATH_SIDE = 20  # "math": ... nor of a math cut
# Cut groups for long parts: (pattern, offset of the cut inside the match), in order of preference.
TEXT_CUTS = tuple((re.compile(re.escape(p)), len(p) - 1) for p in (", ", " and ", ": ", " to "))
MATH_CUTS = tuple((re.compile(re.escape(p)), len(p)) for p in ("=", "+", "\\equiv"))
MAX_PENDING = 8  # incremental decode: tokens waited for before accepting an unfinished character

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_SENTENCE_END = re.compile(r"\.(?=[ \t]+[A-Z])")
_BEGIN_ENV = re.compile(r"\\begin\{([^{}]*)\}")
_REPLACEMENT = "\ufffd"  # what decoders print for an unfinished or invalid UTF-8 sequence


# ---------------------------------------------------------------------------- characters

def split_steps(text: str, style: StepStyle) -> list[int]:
    """End character offsets (exclusive) of the steps of `text`; strictly increasing, the last
    == len(text). Empty text -> [].

    The rules of each style are in the module docstring. No step is empty, and no step is
    whitespace-only unless the whole text is (then it is one step).
    """
    if style not in STEP_STYLES:
        raise ValueError(f"step style must be one of {STEP_STYLES}; got {style!r}")
    if not text:
        return []
    if style == "newline":
        ends = _newline_steps(text)
    elif style == "math":
        ends = split_math_steps(text)
    else:
        ends = _math_steps(text)
    assert ends[-1] == len(text) and all(a < b for a, b in zip(ends, ends[1:])), ends
    return ends


def _newline_steps(text: str) -> list[int]:
    ends: list[int] = []  # end of each step so far; a step starts where the previous ended
    pos = 0
    while pos < len(text):
        nl = text.find("\n", pos)
        end = len(text) if nl < 0 else nl + 1  # the line, with its newline
        line = text[pos:end]
        if line.lstrip(" \t").startswith("####"):  # the answer line and all after it
            if ends:
                ends[-1] = len(text)
            else:
                ends.append(len(text))
            break
        if line.strip():
            ends.append(end)  # leading blank lines are already inside (the step starts at 0)
        elif ends:
            ends[-1] = end  # a later blank line joins the step before it
        pos = end
    if not ends:  # only blank lines
        return [len(text)]
    ends[-1] = len(text)  # trailing blank lines joined the last step
    return ends


def _math_spans(text: str) -> list[tuple[int, int, bool, int]]:
    """(start, end, is_display, closer length) of the math spans of `text`, left to right,
    not overlapping."""
    spans = []
    n, i = len(text), 0
    while i < n:
        c = text[i]
        if c not in "\\$[":
            i += 1
            continue
        close, display, open_len = None, True, 1
        if c == "\\":
            nxt = text[i + 1:i + 2]
            if nxt == "[":
                close, open_len = "\\]", 2
            elif nxt == "(":
                close, open_len, display = "\\)", 2, False
            elif (m := _BEGIN_ENV.match(text, i)) is not None:
                close, open_len = f"\\end{{{m.group(1)}}}", m.end() - i
            else:
                i += 2  # an escaped character or a command: never a delimiter
                continue
        elif text.startswith("$$", i):
            close, open_len = "$$", 2
        elif c == "$":
            close, display = "$", False
        elif text.startswith("[asy]", i):
            close, open_len = "[/asy]", 5
        else:
            i += 1
            continue
        limit = n
        if not display:  # inline math does not run over a paragraph break
            blank = _BLANK_LINE.search(text, i)
            limit = blank.start() if blank else n
        end = _find_close(text, i + open_len, limit, close)
        if end is None or (close == "$" and end == i + 2):  # unclosed, or "$$" handled above
            i += open_len
            continue
        spans.append((i, end, display, len(close)))
        i = end
    return spans


def _find_close(text: str, j: int, limit: int, close: str) -> int | None:
    """End offset of the first unescaped `close` in text[j:limit], or None."""
    while j < limit:
        if text.startswith(close, j):
            end = j + len(close)
            return end if end <= limit else None
        j += 2 if text[j] == "\\" else 1
    return None


def _math_steps(text: str) -> list[int]:
    spans = _math_spans(text)
    starts = [span[0] for span in spans]

    def span_at(pos: int) -> tuple[int, int, bool, int] | None:
        k = bisect.bisect_right(starts, pos) - 1
        return spans[k] if k >= 0 and pos < spans[k][1] else None

    def outside(a: int, b: int) -> bool:  # text[a:b] overlaps no math span
        k = bisect.bisect_right(starts, b - 1) - 1
        return k < 0 or spans[k][1] <= a

    cuts = set()
    for m in re.finditer("\n", text):
        span = span_at(m.start())
        if span is None or span[2]:  # outside math, or inside display math
            cuts.add(m.end())
    for m in _SENTENCE_END.finditer(text):
        p = m.start()
        if span_at(p) is None and not _short_word_before(text, p):
            cuts.add(p + 1)
    for s, e, _, closer in spans:  # a math span ending a sentence, e.g. "$x = 5.$ Then"
        if text[s:e - closer].rstrip().endswith(".") and text[e:e + 1] in (" ", "\t"):
            cuts.add(e)
    cuts.discard(0)
    ends = sorted(c for c in cuts if c < len(text)) + [len(text)]
    ends = _merge_blank_parts(text, ends)
    ends = _merge_short_parts(ends)
    out: list[int] = []
    start = 0
    for end in ends:
        out += _split_long(text, start, end, outside)
        start = end
    return out


def _short_word_before(text: str, p: int) -> bool:
    """Whether the letters right before text[p] form a word of one or two letters."""
    k = p
    while k > 0 and text[k - 1].isalpha() and p - k < 3:
        k -= 1
    return 0 < p - k <= 2 and (k == 0 or not text[k - 1].isalpha())


def _merge_blank_parts(text: str, ends: list[int]) -> list[int]:
    """Whitespace-only parts join the part before them (the first joins the next)."""
    out: list[int] = []
    start, seen_text = 0, False  # seen_text: some part so far has non-whitespace
    for end in ends:
        blank = not text[start:end].strip()
        if out and (blank or not seen_text):  # joins the previous part / absorbs leading blanks
            out[-1] = end
        else:
            out.append(end)
        seen_text = seen_text or not blank
        start = end
    return out


def _merge_short_parts(ends: list[int]) -> list[int]:
    """Parts under MIN_PART characters join the next part; a short last part joins the previous."""
    out: list[int] = []
    start = 0
    for end in ends:
        if end - start >= MIN_PART or end == ends[-1]:
            out.append(end)
            start = end
    if len(out) > 1 and out[-1] - out[-2] < MIN_PART:
        del out[-2]
    return out


def _split_long(text: str, start: int, end: int, outside) -> list[int]:
    """Ends of text[start:end] after recursive near-midpoint splits of parts over MAX_PART."""
    if end - start <= MAX_PART:
        return [end]
    cut = _best_cut(text, start, end, TEXT_CUTS, MIN_TEXT_SIDE, outside)
    if cut is None:
        cut = _best_cut(text, start, end, MATH_CUTS, MIN_MATH_SIDE, None)
    if cut is None:
        return [end]
    return _split_long(text, start, cut, outside) + _split_long(text, cut, end, outside)


def _best_cut(text, start, end, groups, min_side, outside) -> int | None:
    """The cut of the first group whose cut nearest the midpoint leaves both sides >= min_side
    characters with some non-whitespace; None if no group has one."""
    for pattern, offset in groups:
        best = None
        for m in pattern.finditer(text, start, end):
            if outside is not None and not outside(m.start(), m.end()):
                continue  # text cuts never go inside math
            cut = m.start() + offset
            if best is None or abs(2 * cut - start - end) < abs(2 * best - start - end):
                best = cut
        # the cut nearest the midpoint has the longest shorter side: if it fails, all fail
        if (best is not None and min(best - start, end - best) >= min_side
                and text[start:best].strip() and text[best:end].strip()):
            return best
    return None


# ---------------------------------------------------------------------------- tokens

def token_char_starts(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """For each token, the character offset in `tokenizer.decode(token_ids,
    skip_special_tokens=True)` where its text starts (non-decreasing, each in [0, len(text)]).

    Rule (module docstring): the offset of the first character any of the token's bytes
    contributes to; a token contributing nothing (EOS and other skipped special tokens) gets the
    offset of the next character produced after it, or len(text) at the end. The first bytes of
    a multi-byte character and the token completing it both start at that character.

    Cost is linear in the number of tokens: if the single-token decodes concatenate to the full
    decode (char-level, byte-level BPE on ASCII) they are the token texts; otherwise each token's
    text is the difference between decoding a short window of previous tokens with and without
    it, as streaming detokenizers do. `tokenizer` needs `decode(ids, skip_special_tokens=...)`
    (a transformers tokenizer, a `tokenizers.Tokenizer`, ...); its `tokenizers` backend, if any,
    is called directly, and `all_special_ids` / `clean_up_tokenization_spaces` are honoured.
    """
    return _starts_and_text(tokenizer, _as_ids(token_ids))[0]


def _as_ids(token_ids) -> list[int]:
    if hasattr(token_ids, "tolist"):  # a tensor or an array
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def _raw_decoder(tokenizer):
    """(decode, decode_each): decode(ids, skip_special_tokens=True) of a token list, and of each
    token alone, without transformers' clean-up of spaces (" ." -> "."), which is not
    prefix-stable (_align maps onto the cleaned text afterwards). A `tokenizers` backend is
    called directly when there is one: the same text at a fraction of the per-call overhead."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "decode_batch"):  # a tokenizers.Tokenizer: never cleans up spaces
        return (lambda ids: backend.decode(ids, skip_special_tokens=True),
                lambda ids: backend.decode_batch([[t] for t in ids], skip_special_tokens=True))
    kwargs = {"skip_special_tokens": True}
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        kwargs["clean_up_tokenization_spaces"] = False

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, **kwargs)

    return decode, lambda ids: [decode([t]) for t in ids]


def _starts_and_text(tokenizer, ids: list[int]) -> tuple[list[int], str]:
    """(token_char_starts, the decoded text) of a token list."""
    if not ids:
        return [], ""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    decode, decode_each = _raw_decoder(tokenizer)
    raw = decode(ids)  # the text the pieces add up to; == full unless spaces were cleaned up
    pieces = decode_each(ids)
    if "".join(pieces) != raw:
        # single-token decodes do not add up (partial UTF-8, SentencePiece's dropped leading
        # space, ...): decode incrementally. Tokens that are skipped specials are left out of
        # the windows, as decode(skip_special_tokens=True) leaves them out of the full text.
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        pieces = _incremental_pieces(decode, ids, [t in special and not p for t, p in zip(ids, pieces)])
    starts, pos = [], 0
    for piece in pieces:
        starts.append(pos)
        pos += len(piece)
    joined = "".join(pieces)
    if joined != full:  # cleaned-up spaces, or a decoder that is not prefix-stable: re-align
        starts = _align(joined, full, starts)
    return starts, full


def _incremental_pieces(decode, ids: list[int], skipped: list[bool]) -> list[str]:
    """Each token's text from windowed decodes (the scheme of vLLM/TGI streaming detokenizers).

    Invariants: `window[prefix:read]` is the context, ending where a decode last ended on a
    complete character; `done` characters of decode(window[prefix:...]) are emitted. A new
    token emits the characters its decode adds beyond `done`, except trailing U+FFFD (an
    unfinished character, emitted by the token that completes it). The context moves up at
    every complete-character boundary, or after MAX_PENDING tokens without one (a genuinely
    invalid byte), so each decode covers a bounded number of tokens: the pass is linear.
    """
    pieces = [""] * len(ids)
    window: list[int] = []  # the non-skipped token ids seen so far
    prefix = read = done = last = 0
    pending = ""  # replacement characters of an unfinished character, not emitted yet
    for i, (t, skip) in enumerate(zip(ids, skipped)):
        if skip:
            continue
        window.append(t)
        k, last = len(window), i
        text = decode(window[prefix:k])
        complete = text.rstrip(_REPLACEMENT)
        pending = text[len(complete):]
        if len(complete) > done:
            pieces[i] = text[done:len(complete)]
            done = len(complete)
        if not pending or k - read >= MAX_PENDING:
            pieces[i] += pending  # forced (a genuinely invalid byte): emitted by this token
            pending = ""
            prefix, read = read, k  # the last emitted tokens become the context
            done = len(decode(window[prefix:read]))
    if pending:  # the text ends inside a character: its last token emits what decode shows
        pieces[last] += pending
    return pieces


def _align(joined: str, full: str, starts: list[int]) -> list[int]:
    """Map offsets in `joined` to offsets in `full` through their character alignment
    (equal runs map one to one; a changed run maps to the start of its counterpart)."""
    where = [0] * (len(joined) + 1)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, joined, full, autojunk=False).get_opcodes():
        for i in range(i1, i2):
            where[i] = j1 + (i - i1) if tag == "equal" else j1
    where[len(joined)] = len(full)
    out, low = [], 0
    for s in starts:
        low = max(low, where[s])  # keep the starts non-decreasing
        out.append(low)
    return out


# ---------------------------------------------------------------------------- steps in tokens

def step_token_ends(token_ids: Sequence[int], tokenizer, style: StepStyle | None = None, *,
                    chunk_tokens: int | None = None) -> list[int]:
    """Token index where each step ends (exclusive): strictly increasing, last == len(token_ids).

    With `style`: the steps of split_steps(decode(token_ids, skip_special_tokens=True), style);
    a token belongs to the step containing its first character (token_char_starts); tokens
    with no text after them (a final EOS, ...) belong to the step of the token before them, the
    last step; a step in which no token starts (its text lies inside a token begun in an
    earlier step) is merged into the step before it, so there may be fewer token steps than
    character steps. A token list whose text is empty (only special tokens) is one step.
    With chunk_tokens=N instead (nano-aha-moment's option): fixed N-token chunks, the last one
    possibly shorter; the tokenizer is not used.
    Exactly one of style / chunk_tokens must be given (ValueError otherwise; also chunk_tokens < 1).
    No tokens -> [].
    """
    if (style is None) == (chunk_tokens is None):
        raise ValueError("give exactly one of style= and chunk_tokens=")
    ids = _as_ids(token_ids)
    if chunk_tokens is not None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1; got {chunk_tokens!r}")
        return list(range(chunk_tokens, len(ids), chunk_tokens)) + ([len(ids)] if ids else [])
    if style not in STEP_STYLES:
        raise ValueError(f"step style must be one of {STEP_STYLES}; got {style!r}")
    if not ids:
        return []
    return _token_ends(*_starts_and_text(tokenizer, ids), style)


def _token_ends(starts: list[int], text: str, style: StepStyle) -> list[int]:
    """step_token_ends from the tokens' character starts and the decoded text."""
    char_ends = split_steps(text, style)
    ends: list[int] = []
    current = bisect.bisect_right(char_ends, starts[0])  # the step holding character starts[0]
    for i, s in enumerate(starts):
        if s >= len(text):  # no text after it (EOS, ...): the step of the token before it
            break
        step = bisect.bisect_right(char_ends, s)
        # starts are non-decreasing, so steps are too: a token opening a later step closes the
        # current token step; steps no token opens are skipped (merged into the one before)
        if step != current:
            ends.append(i)
            current = step
    ends.append(len(starts))
    return ends


def step_spans(token_ids: Sequence[int], tokenizer, style: StepStyle) -> tuple[list[str], list[int]]:
    """(the text of each token step, step_token_ends): the steps a judge reads and the token
    ranges their verdicts apply to, one text per token step (CAPO).

    The texts are cut from decode(token_ids, skip_special_tokens=True) where each token step
    begins, so they join to that text and a step merged by step_token_ends is one text here too.
    """
    if style not in STEP_STYLES:
        raise ValueError(f"step style must be one of {STEP_STYLES}; got {style!r}")
    ids = _as_ids(token_ids)
    if not ids:
        return [], []
    starts, text = _starts_and_text(tokenizer, ids)
    ends = _token_ends(starts, text, style)
    cuts = [0, *(starts[e] for e in ends[:-1]), len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])], ends

