"""Incremental stop-string matching: no tokenizer call per row per step.

What is matched: the text of the prompt's tail followed by the generated text, decoded
together (so a generated token keeps the leading-space marker it has in context), and a
match counts only if it ends in generated text. A stop string may thus start in the prompt
(VinePPO's states end after a newline, and a rollout may begin with the rest of
"\n\n\nProblem:"), but one lying entirely inside the prompt never stops. Where the decoded
prompt tail is not a prefix of the decoded tail + generation (a character completed across
the boundary), the generated text starts where the two first differ.

The text grows by one token's text per step. A stop string that appears in it for the first
time must end in the new token's text, so it is found in the last `longest - 1` characters
of the previous text followed by that token's text (matches ending in those characters do
not count: they were there before, or belong to the prompt). Each sequence keeps that short
tail (`Sequence.stop_tail`), and the text of every token id (its "piece") is computed once
per tokenizer, so a step costs a list lookup and a substring test per row.

A token's piece is decode([anchor, token]) minus decode([anchor]) for a plain anchor token,
with the Engine's `skip_special_tokens=True`, so markers such as SentencePiece's leading
space come out as they do inside a text. Some tokens have no text of their own: a
byte-level token that ends inside a UTF-8 character decodes to U+FFFD, and a decoder may
rewrite across tokens. Such tokens are "irregular": for them the row decodes its last few
tokens with the tokenizer (reaching back into the prompt while the generation is short), as
the exact reference does, and the tail restarts from that text. So does a sequence's first
generated token, which also brings in the prompt's tail text.

`Completion.text` stays the generation decoded on its own (where a first token's
leading-space marker is dropped), cut before the stop string: `StopMatcher.cut` finds the
match in the in-context text and cuts the same number of characters off the end.
"""
from __future__ import annotations

from os.path import commonprefix

from engine.runtime.params import cut_at_stop, find_stop
from engine.runtime.sequence import Sequence

REPLACEMENT = "\ufffd"
EXACT_WINDOW = 8  # extra tokens decoded on the exact path beyond the longest stop string


class StopMatcher:
    """Finds stop strings in a prompt's tail + generated text, one token at a time, for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: list[str | None] | None = None
        self._keep: dict[tuple[str, ...], int] = {}  # stop strings -> characters of tail to keep
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()))  # ids that decode to nothing

    @property
    def pieces(self) -> list[str | None]:
        """Text each token id appends to a text (None: irregular, decode in context instead)."""
        if self._pieces is None:
            self._pieces = token_pieces(self.tokenizer)
        return self._pieces

    def keep(self, stop: tuple[str, ...]) -> int:
        """Characters of text before a new token that a match ending in it can reach back over."""
        keep = self._keep.get(stop)
        if keep is None:
            keep = self._keep[stop] = max(len(s) for s in stop) - 1
        return keep

    def update(self, seq: Sequence, token: int) -> bool:
        """Account for `token`, just appended to seq.tokens; True if a stop string now ends in generated text."""
        stop = seq.params.stop
        keep = self._keep.get(stop)
        if keep is None:
            keep = self.keep(stop)
        pieces = self._pieces if self._pieces is not None else self.pieces
        piece = pieces[token] if token < len(pieces) else ""
        if piece is None or len(seq.tokens) - seq.prompt_len == 1:
            # Exact path: the last tokens decoded together, the prompt's tail included while
            # the generation is short; matches must end past the prompt's own text.
            text, boundary = self._decode_tail(seq, keep)
            seq.stop_tail = text[-keep:] if keep else ""
            return find_stop(text, stop, boundary) >= 0
        # Fast path (every row, every step): find_stop inlined. A match ending in the tail was
        # seen before (or is the prompt's), so only matches reaching into `piece` count.
        tail = seq.stop_tail
        text = tail + piece
        seq.stop_tail = text[-keep:] if keep else ""
        boundary = len(tail)
        for s in stop:
            if text.find(s, max(0, boundary - len(s) + 1)) >= 0:
                return True
        return False

    def cut(self, seq: Sequence, text: str) -> str:
        """`text`, the generation decoded on its own, cut before the stop string that stopped `seq`.

        The match is found as `update` finds it, in the prompt's tail + generation decoded
        together; that in-context generated text and `text` differ at most at their start
        (a leading-space marker, a character completed across the boundary), so the cut
        removes the same number of characters from the end. A stop string that starts in the
        prompt leaves "". Without a counted match, `text` is returned whole.
        """
        stop = seq.params.stop
        start = max(0, seq.prompt_len - self.keep(stop) - EXACT_WINDOW)
        full = self.tokenizer.decode(seq.tokens[start:], skip_special_tokens=True)
        head = self.tokenizer.decode(seq.tokens[start:seq.prompt_len], skip_special_tokens=True)
        b = len(commonprefix([head, full]))
        generated = full[b:]
        kept = cut_at_stop(generated, stop, context=full[:b])
        return text[:max(0, len(text) - (len(generated) - len(kept)))]

    def _decode_tail(self, seq: Sequence, keep: int) -> tuple[str, int]:
        """(the last tokens decoded together, length of its prompt-only prefix): at least keep + 1 +
        EXACT_WINDOW tokens, and more while the text before the newest token is shorter than `keep`
        characters (special tokens decode to nothing: a prompt may end with several), so a stop
        string that starts further back is seen."""
        step = keep + 1 + EXACT_WINDOW
        start = max(0, len(seq.tokens) - step)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        # Every other token decodes to at least one character, so without a special token in the
        # window it already reaches `keep` characters back: no extra decode on the common path.
        while (start > 0 and not self._special.isdisjoint(seq.tokens[start:-1])
               and len(decode(seq.tokens[start:-1])) < keep):
            step *= 2
            start = max(0, len(seq.tokens) - step)
        text = decode(seq.tokens[start:])
        if start >= seq.prompt_len:
            return text, 0  # all generated (a match lying in older text would have stopped earlier)
        head = decode(seq.tokens[start:seq.prompt_len])
        return text, len(commonprefix([head, text]))


def token_pieces(tokenizer) -> list[str | None]:
    """The text of every token id in context (see the module docstring); None for irregular ids.

    A tokenizer that cleans up spaces across tokens (" 's" -> "'s", WordPiece style) has no
    context-free pieces: every token is irregular there, and every row takes the exact path.
    """
    size = len(tokenizer)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return [None] * size
    anchor = _anchor(tokenizer)
    head = tokenizer.decode([anchor], skip_special_tokens=True)
    texts = tokenizer.batch_decode([[anchor, t] for t in range(size)], skip_special_tokens=True)
    pieces: list[str | None] = []
    for text in texts:
        piece = text[len(head):] if text.startswith(head) else None
        pieces.append(None if piece is None or REPLACEMENT in piece else piece)
    return pieces


def _anchor(tokenizer) -> int:
    """A token that decodes to plain text on its own (the letter 'a' where the vocabulary has it)."""
    ids = tokenizer.encode("a", add_special_tokens=False)
    if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True).strip():
        return ids[0]
    special = set(tokenizer.all_special_ids)
    for t in range(len(tokenizer)):
        if t not in special:
            text = tokenizer.decode([t], skip_special_tokens=True)
            if text.strip() and REPLACEMENT not in text:
                return t
    raise ValueError("the tokenizer has no token with plain text to anchor stop-string matching")
