"""The MATH step splitter (engine.tasks.math_steps): one hand-made case per rule, plus the
offset invariants. Each case names the rule it pins; the expected steps are the rule applied
by hand."""
from __future__ import annotations

import random

import pytest

from engine.tasks.math_steps import ATOM_WEIGHT, MAX_PART, split_math_steps

SENTENCE = "Then we are done with the whole problem."  # a part long enough never to merge


def steps(text: str) -> list[str]:
    ends = split_math_steps(text)
    return [text[a:b] for a, b in zip([0] + ends, ends)]


# ------------------------------------------------------------------ atoms (rule 1)

@pytest.mark.parametrize("atom", [
    "$x = 1. Then y$",
    "$$x = 1. Then y$$",
    "\\(x = 1. Then y\\)",
    "\\[x = 1. Then y\\]",
    "[asy]draw(A. Then B);[/asy]",
    "\\begin{align*}x &= 1. Then y\\end{align*}",
    "\\begin{tabular}{cc}1. Then & 2\\end{tabular}",
])
def test_math_spans_are_atoms(atom):
    """A sentence end inside a math span is no cut; the one after it is."""
    text = f"We know that {atom} holds for all values. {SENTENCE}"
    assert steps(text) == [f"We know that {atom} holds for all values.", f" {SENTENCE}"]


def test_an_escaped_dollar_opens_no_atom():
    text = "The price of the ticket is \\$5. Then it costs \\$6 more than the first one."
    assert steps(text) == ["The price of the ticket is \\$5.", " Then it costs \\$6 more than the first one."]


# ------------------------------------------------------- newlines and sentences (rule 2)

def test_newline_cuts_before_the_newline():
    text = "First we add all the numbers up\nThen we divide the sum by two"
    assert steps(text) == ["First we add all the numbers up", "\nThen we divide the sum by two"]


def test_sentence_end_needs_a_capital_after_it():
    assert steps("First we add all the numbers. Then we divide by two.") == [
        "First we add all the numbers.", " Then we divide by two."]
    assert len(steps("First we add all the numbers. then we divide by two.")) == 1


@pytest.mark.parametrize("word", ["x", "e.g", "Dr", "vs"])
def test_no_sentence_end_after_one_or_two_letter_words(word):
    text = f"We pick the starting point {word}. Then we move it ten units to the left."
    assert len(steps(text)) == 1
    assert len(steps(text.replace(f"{word}.", "point."))) == 2  # a longer word does end it


# ------------------------------------------------------------- short parts (rules 3-4)

def test_short_parts_merge_with_the_next():
    assert steps("So:\nWe have the answer here in full.") == ["So:\nWe have the answer here in full."]
    assert steps("Yes. That is the right answer to it.") == ["Yes. That is the right answer to it."]


def test_a_short_last_part_joins_the_previous():
    assert steps("We compute the whole sum carefully.\nDone") == ["We compute the whole sum carefully.\nDone"]


# --------------------------------------------- math span ending in "." (rule 4)

@pytest.mark.parametrize("atom", ["$x = 5.$", "$$x = 5.$$", "\\(x = 5.\\)", "\\[x = 5.\\]"])
def test_cut_after_math_ending_in_a_period_even_without_space(atom):
    text = f"We have {atom}Then we get y from the next equation."
    assert steps(text) == [f"We have {atom}", "Then we get y from the next equation."]
    assert len(steps(text.replace("5.", "5"))) == 1  # no period in the span: no cut


# ------------------------------------------------- display environments (rule 5)

def test_display_environments_split_by_line_and_keep_short_lines():
    text = ("\\begin{align*}\nx &= 1 + 2 + 3 + 4 + 5\\\\\ny &= 7\n\\end{align*}\n"
            "So we are done with this problem now.")
    # the bare opener joins the next line; "\ny &= 7" (7 characters) stays a step of its own
    assert steps(text) == ["\\begin{align*}\nx &= 1 + 2 + 3 + 4 + 5\\\\", "\ny &= 7", "\n\\end{align*}",
                           "\nSo we are done with this problem now."]


def test_display_lines_under_three_characters_merge():
    text = "\\begin{align*}\nx &= 1 + 2 + 3 + 4 + 5\\\\\ny\n\\end{align*}\nSo we are done with this problem now."
    assert "\ny" not in steps(text)  # "\ny" is 2 characters: it absorbs the next line
    assert "\ny\n\\end{align*}" in steps(text)
    assert "\nyy" in steps(text.replace("\ny\n", "\nyy\n"))  # 3 characters stay


# ------------------------------------------------------------ long parts (rule 6)

def test_long_part_cut_at_a_text_cut_near_the_middle():
    text = "The first group of numbers is long enough to count here, and the second group is long enough to count too."
    assert len(text) > MAX_PART
    assert steps(text) == ["The first group of numbers is long enough to count here,",
                           " and the second group is long enough to count too."]


@pytest.mark.parametrize("word", ["and", "to"])
def test_word_cuts_go_before_the_final_space(word):
    text = f"The first group of numbers is long enough to count here {word} the second group is long enough right now"
    text = text.replace("enough to count", "enough for counting")  # " to " only where placed
    assert len(text) > MAX_PART
    first, second = steps(text)
    assert first.endswith(f"here {word}") and second.startswith(" the second")


def test_text_cut_needs_40_characters_each_side():
    text = "Short start, then a very long tail of words that goes on without any other break at all in this line now"
    assert len(text) > MAX_PART and len(steps(text)) == 1


def test_long_part_falls_back_to_a_math_cut():
    text = ("Therefore $a_1 + a_2 + a_3 + a_4 + a_5 + a_6 + a_7 + a_8 = b_1 + b_2 + b_3 + b_4 + b_5 + b_6 + b_7 + b_8$"
            " which is what we wanted.")
    assert steps(text) == ["Therefore $a_1 + a_2 + a_3 + a_4 + a_5 + a_6 + a_7 + a_8 =",
                           " b_1 + b_2 + b_3 + b_4 + b_5 + b_6 + b_7 + b_8$ which is what we wanted."]


def test_text_cut_position_counts_atoms_as_placeholders():
    """The middle is judged with each atom counted as ATOM_WEIGHT characters, as the reference does."""
    first = "Note that $x$ holds in this case"
    first += "w" * (49 - len(first)) + ","  # a comma cut at 50
    text = first + " " + "v" * 48 + "," + " " + "u" * 59  # another at 100; 160 characters
    assert ATOM_WEIGHT == 60 and len(text) == 160
    # By real length the cut at 100 is nearer the middle (80) and leaves two parts of at most
    # 100; weighted, the atom adds 57 before both cuts, the middle moves to 108.5 and the cut
    # at 50 is nearer (|50+57-108.5| < |100+57-108.5|), so the 110-character rest is cut again.
    assert split_math_steps(text) == [50, 100, 160]


def test_a_long_part_without_any_cut_stays_whole():
    text = "w" * 150
    assert steps(text) == [text]


# ------------------------------------------------------------------------ invariants

def test_offsets_invariants():
    assert split_math_steps("") == []
    assert steps("  \n ") == ["  \n "]
    rng = random.Random(0)
    pieces = ["$", "$$", "\\(", "\\)", "\\[", "\\]", ". ", " The", "\n", "\n\n", "x", " and ", ", ", ":", "=", "+",
              "\\begin{align*}", "\\end{align*}", "[asy]", "[/asy]", "So", " we", "\\$", "  ", "\\equiv", ",$"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 80)))
        ends = split_math_steps(text)
        assert ends[-1] == len(text) and all(a < b for a, b in zip(ends, ends[1:]))
        if text.strip():
            assert all(part.strip() for part in steps(text)), text
