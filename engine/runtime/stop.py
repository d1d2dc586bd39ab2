"""Incremental stop-string matching: no tokenizer call per row per step.

The text a sequence has generated grows by one token's text per step. A stop string that
appears in it for the first time must overlap the new token's text, so it is found in the
last `longest - 1` characters of the previous text followed by that token's text. Each
sequence keeps that short tail (`Sequence.stop_tail`), and the text of every token id (its
"piece") is computed once per tokenizer, so a step costs a list lookup and a substring
test per row.

A token's piece is decode([anchor, token]) minus decode([anchor]) for a plain anchor token,
with the Engine's `skip_special_tokens=True`, so markers such as SentencePiece's leading
space come out as they do inside a text. Some tokens have no text of their own: a
byte-level token that ends inside a UTF-8 character decodes to U+FFFD, and a decoder may
rewrite across tokens. Such tokens are "irregular": for them the row decodes its last few
tokens with the tokenizer, as the exact reference does, and the tail restarts from that text.
So does a sequence's first generated token: the generated text is decoded on its own, where
a first token's leading-space marker is dropped.
"""
from __future__ import annotations

from engine.runtime.sequence import Sequence

REPLACEMENT = "\ufffd"
EXACT_WINDOW = 8  # extra tokens decoded on the exact path beyond the longest stop string


class StopMatcher:
    """Finds stop strings in generated text, one token at a time, for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: list[str | None] | None = None
        self._keep: dict[tuple[str, ...], int] = {}  # stop strings -> characters of tail to keep

    @property
    def pieces(self) -> list[str | None]:
        """Text each token id appends to a text (None: irregular, decode in context instead)."""
        if self._pieces is None:
            self._pieces = token_pieces(self.tokenizer)
        return self._pieces

    def update(self, seq: Sequence, token: int) -> bool:
        """Account for `token`, just appended to seq.tokens; True if a stop string now appears."""
        stop = seq.params.stop
        keep = self._keep.get(stop)
        if keep is None:
            keep = self._keep[stop] = max(len(s) for s in stop) - 1
        pieces = self._pieces if self._pieces is not None else self.pieces
        piece = pieces[token] if token < len(pieces) else ""
        if piece is None or len(seq.tokens) - seq.prompt_len == 1:
            # The first token is decoded alone, as the text starts (a leading-space marker is dropped).
            window = seq.tokens[max(seq.prompt_len, len(seq.tokens) - keep - 1 - EXACT_WINDOW):]
            text = self.tokenizer.decode(window, skip_special_tokens=True)
        else:
            text = seq.stop_tail + piece
        seq.stop_tail = text[-keep:] if keep else ""
        for s in stop:
            if s in text:
                return True
        return False


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
