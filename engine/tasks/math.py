"""MATH (Hendrycks et al. 2021): competition problems whose solutions end in `\\boxed{answer}`."""
from __future__ import annotations

from engine.tasks.base import VINEPPO_TEMPLATE, DatasetTask, Item, TaskDataError
from engine.tasks.grading import last_boxed, math_correct


class MathTask(DatasetTask):
    """Gold = the last `\\boxed{}` of the reference solution; responses graded by `math_correct`.

    Hub defaults: train from DigitalLearningGmbH/MATH-lighteval (the 7.5k MATH train set),
    test from HuggingFaceH4/MATH-500; both have `problem` and `solution` fields.
    """

    name = "math"
    step_style = "math"
    default_template = VINEPPO_TEMPLATE
    hub = {"train": ("DigitalLearningGmbH/MATH-lighteval", "default"), "test": ("HuggingFaceH4/MATH-500", None)}
    samples = {"test": "math500_test.jsonl"}

    def __init__(self, data=None, *, question_field: str | None = None, answer_field: str | None = None, **kw):
        if data is None:  # the hub datasets name their fields problem/solution
            question_field, answer_field = question_field or "problem", answer_field or "solution"
        super().__init__(data, question_field=question_field, answer_field=answer_field, **kw)

    def parse_answer(self, text: str, where: str) -> tuple[str, str | None]:
        """A solution with a box gives (box content, solution); a one-line text is the gold alone."""
        found, boxed = last_boxed(text)
        if found:
            if boxed is None or not boxed.strip():
                raise TaskDataError(f"{where}: the last \\boxed{{}} is malformed or empty: {text[-80:]!r}")
            return boxed.strip(), text
        if "\n" in text.strip() or len(text) > 200:
            raise TaskDataError(f"{where}: the answer has no \\boxed{{}} and is not a one-line final answer")
        return text.strip(), None

    def is_correct(self, response: str, item: Item) -> bool:
        return math_correct(response, item.answer)
