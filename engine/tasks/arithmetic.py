"""Built-in multi-step arithmetic: generated problems, no download, sized for a tiny model.

A problem chains `steps` operations on operands drawn from [min_operand, max_operand] and is
evaluated left to right; the question is a Python-valid expression, parenthesised where
precedence would otherwise reorder it:

    prompt    "Compute (12+7)*3-5.\\n"      (with ops="+-*"; the default is "+-")
    solution  "12+7=19\\n19*3=57\\n57-5=52\\n#### 52"

One operation per solution line and a final `#### answer` line, so "newline" step splitting
gives one value-estimation state per operation. Everything is short printable ASCII, within
the character tokenizer of the built-in tiny model. Generation is deterministic given the
seed; the test split is drawn first and no test question appears in train.
"""
from __future__ import annotations

import random

from engine.tasks.base import Item, Task
from engine.tasks.grading import gsm8k_correct

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_problem(rng: random.Random, steps: int, min_operand: int, max_operand: int, ops: str,
                 allow_negative: bool) -> tuple[str, int, str] | None:
    """(expression, answer, solution) for one problem, or None if a negative value appears
    while allow_negative is False (the caller draws again)."""
    value = rng.randint(min_operand, max_operand)
    expr, additive, lines = str(value), False, []
    for _ in range(steps):
        op, operand = rng.choice(ops), rng.randint(min_operand, max_operand)
        if op == "*" and additive:  # keep left-to-right order: (a+b)*c
            expr, additive = f"({expr})", False
        expr += f"{op}{operand}"
        additive = additive or op in "+-"
        result = _APPLY[op](value, operand)
        lines.append(f"{value}{op}{operand}={result}")
        value = result
        if value < 0 and not allow_negative:
            return None
    lines.append(f"#### {value}")
    return expr, value, "\n".join(lines)


class ArithmeticTask(Task):
    """Generated arithmetic with difficulty knobs.

    steps: operations per problem, an int or an inclusive (min, max) range.
    min_operand/max_operand: operand range. ops: allowed operations among "+-*".
    allow_negative: whether intermediate values may go below zero.
    n_train/n_test: split sizes (distinct questions).
    answer_only_frac: the fraction of train items whose reference solution is the final line
    alone ("#### 52"), as in SFT sets where some annotators skipped the work. Grading looks
    at the final answer only, so this changes what SFT imitates, not what is rewarded; a
    model that learned both styles can learn from reward that working line by line pays.
    chat: prompts as a user turn of the model's chat template (Task.prompt).

    The defaults (2-4 steps of + and - on 0..50) leave room on both sides: the built-in tiny
    model after 1500 SFT steps of 16 solutions (about 6 minutes on 2 CPU cores) solved 62% of
    200 test problems greedily, 76% / 65% / 39% at 2 / 3 / 4 steps (one run, one seed). With
    ops="+-*", max_operand=9, steps=(2, 3) the same recipe reached 40% (56% / 21%).
    """

    name = "arithmetic"
    step_style = "newline"
    default_template = "Compute {question}.\n"

    def __init__(self, data: None = None, *, template: str | None = None, seed: int = 0,
                 steps: int | tuple[int, int] = (2, 4), min_operand: int = 0, max_operand: int = 50,
                 ops: str = "+-", allow_negative: bool = False, n_train: int = 10000, n_test: int = 500,
                 answer_only_frac: float = 0.0, chat: bool = False):
        if data is not None:
            raise ValueError(f"{self.name}: the task is generated and takes no data; use its knobs instead")
        super().__init__(template, chat)
        lo, hi = (steps, steps) if isinstance(steps, int) else steps
        if not 1 <= lo <= hi:
            raise ValueError(f"{self.name}: steps must be >= 1 (an int or a (min, max) range), got {steps}")
        if not 0 <= min_operand <= max_operand:
            raise ValueError(f"{self.name}: need 0 <= min_operand <= max_operand, got {min_operand}, {max_operand}")
        if not ops or set(ops) - set(_APPLY):
            raise ValueError(f"{self.name}: ops must be a non-empty subset of '+-*', got {ops!r}")
        if n_train < 1 or n_test < 1:
            raise ValueError(f"{self.name}: n_train and n_test must be >= 1, got {n_train}, {n_test}")
        if isinstance(answer_only_frac, bool) or not isinstance(answer_only_frac, (int, float)) \
                or not 0.0 <= answer_only_frac <= 1.0:
            raise ValueError(f"{self.name}: answer_only_frac must be a number in [0, 1], got {answer_only_frac!r}")
        self.seed, self.steps, self.ops = seed, (lo, hi), ops
        self.answer_only_frac = answer_only_frac
        self.operands, self.allow_negative = (min_operand, max_operand), allow_negative
        self.sizes = {"train": n_train, "test": n_test}

    def _generate(self, split: str, n: int, exclude: set[str]) -> list[Item]:
        rng = random.Random(f"{self.name}-{self.seed}-{split}")  # str seeds are stable across runs
        # A second generator picks the answer-only solutions, so the problems do not depend on the fraction.
        style_rng = random.Random(f"{self.name}-{self.seed}-{split}-answer-only")
        answer_only_frac = self.answer_only_frac if split == "train" else 0.0
        items: list[Item] = []
        seen = set(exclude)
        for _ in range(100 * n + 1000):  # bounded: a too-small problem space is an error
            problem = self._make_problem(rng)
            if problem is None or problem[0] in seen:
                continue
            expr, answer, solution = problem
            seen.add(expr)
            if style_rng.random() < answer_only_frac:
                solution = f"#### {answer}"
            items.append(Item(id=f"{self.name}-{split}-{len(items)}", question=expr, answer=str(answer),
                              solution=solution))
            if len(items) == n:
                return items
        raise ValueError(
            f"{self.name}: found only {len(items)} distinct {split} problems of {n} with steps={self.steps}, "
            f"operands={self.operands}, ops={self.ops!r}; widen the knobs or ask for fewer")

    def _make_problem(self, rng: random.Random) -> tuple[str, int, str] | None:
        """(question, answer, solution) drawn from rng, or None to draw again."""
        return make_problem(rng, rng.randint(*self.steps), *self.operands, self.ops, self.allow_negative)

    def _load(self, split: str) -> list[Item]:
        test = self._items.get("test") or self._generate("test", self.sizes["test"], set())
        self._items["test"] = test
        if split == "test":
            return test
        return self._generate("train", self.sizes["train"], {item.question for item in test})

    def is_correct(self, response: str, item: Item) -> bool:
        return gsm8k_correct(response, item.answer)
