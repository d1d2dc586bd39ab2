"""Arithmetic word problems: short stories of adding and taking away, for a small chat model.

    question  "Mia has 7 marbles. She finds 5 more. Then she gives 3 to a friend.
               How many marbles does Mia have now?"
    answer    "9"
    solution  "7 + 5 = 12\\n12 - 3 = 9\\n#### 9"

Generated like `arithmetic` (seeded, no download, no test question in train), graded on the
final number of the response: the number after the last `####`, else its last number, so a
chat model that answers in prose ("... so Mia has 9 marbles.") is graded as it writes. Sized
for SmolLM2-135M-Instruct (engine/presets/smollm-arith.yaml): with one operation on 1..9 it
answers 19% of 200 test stories right at temperature 0.6, a third of its answers rambling
into the token limit (measured 2026-12-06, max_new_tokens 96). Such small ranges make few
distinct sums (126 for one operation on 1..9): test stories are held out, their sums are not.
"""
from __future__ import annotations

import random

from engine.tasks.arithmetic import ArithmeticTask

# (name, subject pronoun, object pronoun)
PEOPLE = (("Tom", "He", "him"), ("Anna", "She", "her"), ("Ben", "He", "him"), ("Mia", "She", "her"),
          ("Sam", "He", "him"), ("Lily", "She", "her"), ("Omar", "He", "him"), ("Zoe", "She", "her"))
THINGS = ("apples", "books", "coins", "marbles", "pens", "stickers", "cards", "shells")
# Sentences that add or take away `n`; `{s}`/`{o}` are the pronouns.
GAINS = ("{s} buys {n} more.", "{s} finds {n} more.", "A friend gives {o} {n} more.")
LOSSES = ("{s} gives {n} to a friend.", "{s} loses {n}.", "{s} sells {n}.")


class WordArithmeticTask(ArithmeticTask):
    """`arithmetic`'s knobs (steps, operand range, ops among "+-", negatives, split sizes) as stories.

    Each operation is one sentence; the solution works one operation per line, as arithmetic's.
    """

    name = "word-arithmetic"
    default_template = "{question}"

    def __init__(self, data: None = None, *, steps: int | tuple[int, int] = (1, 2), min_operand: int = 1,
                 max_operand: int = 9, ops: str = "+-", n_train: int = 5000, n_test: int = 500, **kwargs):
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"{self.name}: ops must be a non-empty subset of '+-', got {ops!r}")
        super().__init__(data, steps=steps, min_operand=min_operand, max_operand=max_operand, ops=ops,
                         n_train=n_train, n_test=n_test, **kwargs)

    def _make_problem(self, rng: random.Random) -> tuple[str, int, str] | None:
        name, s, o = rng.choice(PEOPLE)
        things = rng.choice(THINGS)
        value = rng.randint(*self.operands)
        sentences, lines = [f"{name} has {value} {things}."], []
        for i in range(rng.randint(*self.steps)):
            op, n = rng.choice(self.ops), rng.randint(*self.operands)
            result = value + n if op == "+" else value - n
            if result < 0 and not self.allow_negative:
                return None
            sentence = rng.choice(GAINS if op == "+" else LOSSES).format(s=s, o=o, n=n)
            sentences.append(("Then " + sentence[0].lower() + sentence[1:]) if i else sentence)
            lines.append(f"{value} {op} {n} = {result}")
            value = result
        sentences.append(f"How many {things} does {name} have now?")
        lines.append(f"#### {value}")
        return " ".join(sentences), value, "\n".join(lines)
