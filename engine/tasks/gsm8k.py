"""GSM8K (Cobbe et al. 2021): grade-school word problems with a numeric `#### answer`."""
from __future__ import annotations

import re

from engine.tasks.base import VINEPPO_TEMPLATE, DatasetTask, Item, TaskDataError
from engine.tasks.grading import GSM8K_GRADING, extract_gsm8k_answer, gsm8k_correct, strict_gsm8k_answer

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(text: str) -> str:
    """Drop GSM8K's `<<48/2=24>>` annotations, as VinePPO does for its reference solutions."""
    return _CALCULATOR.sub("", text)


class GSM8KTask(DatasetTask):
    """Gold = the number after `####`; responses graded by `gsm8k_correct`; one step per line.

    grading: "strict" (the VinePPO reference: the text after the last `####` must equal the
    gold exactly, after stripping, dropping commas and lowercasing) or "lenient" (the default:
    numeric comparison of the last `####` number, else of the last number).
    """

    name = "gsm8k"
    step_style = "newline"
    default_template = VINEPPO_TEMPLATE
    hub = {"train": ("openai/gsm8k", "main"), "test": ("openai/gsm8k", "main")}
    samples = {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"}

    def __init__(self, data=None, *, grading: str = "lenient", **kw):
        if grading not in GSM8K_GRADING:
            raise ValueError(f"gsm8k: unknown grading {grading!r}; allowed: {', '.join(GSM8K_GRADING)}")
        super().__init__(data, **kw)
        self.grading = grading

    def parse_answer(self, text: str, where: str) -> tuple[str, str | None]:
        """A reference solution ending in `#### 72` gives ("72", cleaned solution); a bare
        number is the gold alone."""
        solution = strip_calculator_annotations(text).strip()
        if "####" in solution:
            gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
            if extract_gsm8k_answer(gold) is None:
                raise TaskDataError(f"{where}: no number after '####' in {text[-80:]!r}")
            return gold, solution
        if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", solution):
            return solution.replace(",", ""), None
        raise TaskDataError(f"{where}: the answer has no '#### <number>' line and is not a number: {text[-80:]!r}")

    def is_correct(self, response: str, item: Item) -> bool:
        return gsm8k_correct(response, item.answer, strict=self.grading == "strict")

    def final_answer(self, response: str) -> str | None:
        """Strict: the reference's answer string (None without `####`); lenient: the number."""
        return strict_gsm8k_answer(response) if self.grading == "strict" else super().final_answer(response)
