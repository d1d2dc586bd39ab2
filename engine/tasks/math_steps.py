"""VinePPO's MATH step boundaries, on character offsets (`split_math_steps`).

VinePPO values a response at the end of each reasoning step, so the step boundaries decide
which prefixes get Monte Carlo values. To reproduce the paper, MATH responses must be cut
where the authors' heuristic cuts them. This module re-implements that heuristic from its
rules (a clean implementation, not a port), working on offsets into the original text:

1. Math spans are atoms, found in this priority order (a later kind may contain earlier
   ones; it then becomes one atom): `[asy]..[/asy]`, `$\\begin{tabular}..\\end{tabular}$`,
   `\\begin{tabular}..\\end{tabular}`, `\\(..\\)`, `\\[..\\]`, `$$..$$`, `$..$` (not after a
   backslash, at least one character inside, the closer not escaped and not followed by
   `$`), `\\begin{env}..\\end{env}` (align, equation, ...).
2. Cuts before every newline outside atoms, and after a "." outside atoms that is followed by
   whitespace and a capital, unless the word before the period has one letter, or two
   letters after a space ("x.", "e.g.", "Dr.").
3. A part under 20 characters that does not end in "." absorbs the next part. Here, as in
   the reference, an atom counts as ATOM_WEIGHT characters (the reference measures this on
   text where each atom is a 60-character placeholder).
4. Cuts after every atom ending in ".$", ".$$", ".\\)" or ".\\]" (even with no space after
   it). Then a part under 20 characters (now real length) that does not end like that
   absorbs the next part; the last part joins the previous one instead.
5. Cuts before every newline inside an atom (display environments split by line). Only the
   first copy of an atom within a part of step 4 is cut, as in the reference. Then a part
   under 3 characters, or one that is only an opener (`$`, `$$`, `\\(`, `\\[`,
   `\\begin{..}`, `[asy]`), absorbs the next part (the last joins the previous one).
6. A part over 100 characters is cut near its middle, again and again: first at a text cut
   (after ",", " and ", ":", " to ", outside atoms, the groups tried in that order; within
   a group the position nearest the middle, measured with atoms as ATOM_WEIGHT) if neither
   side is under 40 characters; else at a math cut (after ",$", ",\\)", ",\\]", "=",
   "\\equiv", "+", "\\cancelto", anywhere; nearest the middle) if neither side is under 20.
   Once a math cut is made, pieces that start inside the span it covered (in the reference's
   piece-relative bookkeeping) go straight to math cuts.
7. Project invariant on top: a whitespace-only part joins the previous part (the first one
   joins the next), so no step is whitespace-only unless the whole text is.

On the 500 MATH-500 reference solutions this gives the same steps as the authors' splitter
for every solution measured (README, Tasks). It is what the "math" step style runs;
`engine.rl.steps.split_steps(text, "math-legacy")` is the earlier re-implementation (lengths
measured on the real text, text cuts before the space), kept as an option.
"""
from __future__ import annotations

import re

MIN_PART = 20  # steps 3-4: shorter parts merge
MIN_DISPLAY_PART = 3  # step 5: shorter parts merge
MAX_PART = 100  # step 6: longer parts are cut
MIN_TEXT_SIDE = 40  # step 6: neither side of a text cut may be shorter
MIN_MATH_SIDE = 20  # step 6: neither side of a math cut may be shorter
ATOM_WEIGHT = 60  # steps 3 and 6: an atom's length when the reference measures placeholder text

_SENTINEL = "\ue000"  # stands for one atom in the masked text; a private-use, non-word character

# Step 1, in priority order. They run on the masked text, so an atom found by an earlier
# pattern is one sentinel character to the later ones.
_ATOM_PATTERNS = tuple(re.compile(p, re.DOTALL) for p in (
    r"\[asy\].*?\[/asy\]",
    r"\$\\begin\{tabular\}.*?\\end\{tabular\}\$",
    r"\\begin\{tabular\}.*?\\end\{tabular\}",
    r"\\\(.*?\\\)",
    r"\\\[.*?\\\]",
    r"\$\$.*?\$\$",
    r"(?<!\\)\$.*?[^\\]\$(?!\$)",
    r"\\begin\{([^}]*)\}.*?\\end\{\1\}",
))
_PERIOD = re.compile(r"\.(?=\s+[A-Z])")
_PERIOD_TAILS = (".$", ".$$", ".\\)", ".\\]")  # step 4: an atom ending so ends a step
_OPENER = re.compile(r"\$|\$\$|\\\(|\\\[|\\begin\{[^}]*\}|\[asy\]")
# Step 6 text cuts: (pattern, cut offset in the match); " and " / " to " cut before the final space.
_TEXT_CUTS = ((re.compile(","), 1), (re.compile(r"\sand\s"), 4), (re.compile(":"), 1), (re.compile(r"\sto\s"), 3))
_MATH_CUTS = tuple(re.compile(re.escape(p)) for p in (",$", ",\\)", ",\\]", "=", "\\equiv", "+", "\\cancelto"))


class _Masked:
    """A text with its atoms replaced by one sentinel each, and the map back to the text.

    Invariant: char j of `masked` covers text[lo[j]:hi[j]]; hi[j] == lo[j + 1].
    """

    def __init__(self, text: str):
        self.text = text
        masked, lo, hi = text, list(range(len(text))), list(range(1, len(text) + 1))
        for pattern in _ATOM_PATTERNS:
            pieces, new_lo, new_hi, prev = [], [], [], 0
            for m in pattern.finditer(masked):
                if m.end() == m.start():
                    continue
                pieces.append(masked[prev:m.start()] + _SENTINEL)
                new_lo += lo[prev:m.start()] + [lo[m.start()]]
                new_hi += hi[prev:m.start()] + [hi[m.end() - 1]]
                prev = m.end()
            pieces.append(masked[prev:])
            masked, lo, hi = "".join(pieces), new_lo + lo[prev:], new_hi + hi[prev:]
        self.masked, self.lo, self.hi = masked, lo, hi
        self.atoms = [(lo[j], hi[j]) for j, c in enumerate(masked) if c == _SENTINEL]  # in text offsets

    def to_text(self, j: int) -> int:
        """Text offset of masked position j (a boundary between masked characters)."""
        return self.lo[j] if j < len(self.lo) else len(self.text)

    def weight(self, a: int, b: int) -> int:
        """Length of masked[a:b] with every atom counted as ATOM_WEIGHT characters."""
        return (b - a) + (ATOM_WEIGHT - 1) * self.masked.count(_SENTINEL, a, b)


def _sentence_end(masked: str, p: int) -> bool:
    """Whether the "." at masked[p] ends a sentence: not after a one-letter word, nor after a
    two-letter word that follows whitespace."""
    before = masked[max(0, p - 3):p]
    if len(before) >= 1 and before[-1].isascii() and before[-1].isalpha():
        prev = before[-2] if len(before) >= 2 else ""
        if not (prev.isalnum() or prev == "_"):  # a one-letter word ("x.", "e.g.")
            return False
        if len(before) == 3 and before[0].isspace() and prev.isascii() and prev.isalpha():
            return False  # a two-letter word after a space ("Dr.", "vs.")
    return True


def _merge_forward(bounds: list[int], short, last_joins: bool = True) -> list[int]:
    """Merge parts [bounds[i], bounds[i+1]) for which short(a, b) holds: such a part absorbs
    the next one (and is checked again); a short last part joins the previous one if
    last_joins, else stays as it is.

    bounds starts at 0 and ends at the length; the result keeps both ends.
    """
    out = list(bounds)
    i = 0
    while i < len(out) - 1:
        last = i == len(out) - 2
        if len(out) > 2 and (last_joins or not last) and short(out[i], out[i + 1]):
            out.pop(i if last else i + 1)
        else:
            i += 1
    return out


def _nearest_middle(positions: list[int], size: int) -> int:
    """The position nearest size/2 (the first of equals)."""
    return min(positions, key=lambda p: abs(2 * p - size))


def _text_cut(part: str) -> int | None:
    """Step 6's text cut of a long part (offset into part), or None."""
    m = _Masked(part)
    size = m.weight(0, len(m.masked))
    for pattern, offset in _TEXT_CUTS:
        cuts = [x.start() + offset for x in pattern.finditer(m.masked)]
        if not cuts:
            continue
        # the middle is judged on the weighted lengths, the side limit on real ones
        best = _nearest_middle([m.weight(0, c) for c in cuts], size)
        cut = cuts[[m.weight(0, c) for c in cuts].index(best)]
        at = m.to_text(cut)
        if min(at, len(part) - at) >= MIN_TEXT_SIDE:
            return at
    return None


def _math_cut(part: str) -> int | None:
    """Step 6's math cut of a long part (offset into part), or None."""
    for pattern in _MATH_CUTS:
        cuts = [x.end() for x in pattern.finditer(part)]
        if cuts:
            at = _nearest_middle(cuts, len(part))
            if min(at, len(part) - at) >= MIN_MATH_SIDE:
                return at
    return None


def _break_long(part: str) -> list[int]:
    """Step 6 on one part: inner cut offsets (increasing, excluding 0 and len(part))."""
    bounds = [0, len(part)]
    math_lo, math_hi = -1, 0  # the reference's "already cut in math" range (piece-relative)
    i = 0
    while i < len(bounds) - 1:
        a, b = bounds[i], bounds[i + 1]
        if b - a > MAX_PART:
            cut = None if math_lo <= a < math_hi else _text_cut(part[a:b])
            if cut is None:
                cut = _math_cut(part[a:b])
                if cut is not None:
                    math_lo = cut if math_lo == -1 else min(math_lo, cut)
                    math_hi = max(math_hi, b - a)
            if cut is not None:
                bounds.insert(i + 1, a + cut)
                continue  # the first piece may still be long
        i += 1
    return bounds[1:-1]


def split_math_steps(text: str) -> list[int]:
    """End character offsets (exclusive) of the steps of a MATH solution; strictly increasing,
    the last == len(text); [] for an empty text. Rules in the module docstring."""
    if not text:
        return []
    m = _Masked(text)
    s = m.masked
    # Step 2, in masked offsets.
    cuts = {p + 1 for p in (x.start() for x in _PERIOD.finditer(s)) if _sentence_end(s, p)}
    cuts |= {j for j, c in enumerate(s) if c == "\n"}
    bounds = sorted(cuts | {0, len(s)})
    # Step 3: text parts merge on weighted length, unless they end a sentence.
    bounds = _merge_forward(bounds, lambda a, b: not s[a:b].endswith(".") and m.weight(a, b) < MIN_PART,
                            last_joins=False)  # as stated; step 4 joins a short last part anyway
    # Step 4, now in text offsets.
    parts4 = [m.to_text(j) for j in bounds]
    tails = {e for (st, e) in m.atoms if text[st:e].endswith(_PERIOD_TAILS)}
    bounds = sorted(set(parts4) | tails)

    def short4(a: int, b: int) -> bool:
        return not text[a:b].endswith(_PERIOD_TAILS) and b - a < MIN_PART

    bounds = _merge_forward(bounds, short4)
    # Step 5: newlines inside atoms; only the first copy of an atom in a part is cut.
    newline_cuts = set()
    for a, b in zip(bounds, bounds[1:]):
        seen = set()
        for st, e in m.atoms:
            if a <= st and e <= b:
                if text[st:e] in seen:
                    continue
                seen.add(text[st:e])
                newline_cuts |= {st + k for k, c in enumerate(text[st:e]) if c == "\n"}
    bounds = sorted(set(bounds) | newline_cuts)
    bounds = _merge_forward(bounds, lambda a, b: b - a < MIN_DISPLAY_PART
                            or _OPENER.fullmatch(text[a:b].strip()) is not None)
    # Step 6.
    final = [0]
    for a, b in zip(bounds, bounds[1:]):
        if b - a > MAX_PART:
            final += [a + c for c in _break_long(text[a:b])]
        final.append(b)
    # Step 7.
    final = _merge_forward(sorted(set(final)), lambda a, b: not text[a:b].strip())
    ends = final[1:]
    assert ends and ends[-1] == len(text) and all(x < y for x, y in zip(ends, ends[1:])), ends
    return ends
