"""MATH (Hendrycks et al. 2021): competition problems whose solutions end in `\\boxed{answer}`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.tasks.base import VINEPPO_TEMPLATE, DatasetTask, Item, TaskDataError
from engine.tasks.grading import extract_math_answer, last_boxed, math_correct, normalize_answer

# The documented fields of a MATH training file (`train_file=`), one JSON object per line.
TRAIN_FILE_FIELDS = ("problem", "solution")  # required
TRAIN_FILE_OPTIONAL = ("answer", "level", "type", "unique_id")  # used when present; others ignored


class MathTask(DatasetTask):
    """Gold = the last `\\boxed{}` of the reference solution; responses graded by `math_correct`.

    Hub defaults: train from DigitalLearningGmbH/MATH-lighteval (the 7.5k MATH train set),
    test from HuggingFaceH4/MATH-500; both have `problem` and `solution` fields.

    train_file: a local .jsonl that replaces the train split, for the paper's ~12k split
    (PRM800K's: the 7.5k MATH train problems plus the 4.5k MATH test problems outside
    MATH-500). Each line needs `problem` and `solution`; `answer` (the gold, else the last
    box of the solution), `level`, `type` and `unique_id` are optional. Read at load time
    from that path only: nothing is downloaded.
    """

    name = "math"
    step_style = "math"
    default_template = VINEPPO_TEMPLATE
    hub = {"train": ("DigitalLearningGmbH/MATH-lighteval", "default"), "test": ("HuggingFaceH4/MATH-500", None)}
    samples = {"test": "math500_test.jsonl"}

    def __init__(self, data=None, *, question_field: str | None = None, answer_field: str | None = None,
                 train_file: str | os.PathLike | None = None, **kw):
        if data is None:  # the hub datasets name their fields problem/solution
            question_field, answer_field = question_field or "problem", answer_field or "solution"
        super().__init__(data, question_field=question_field, answer_field=answer_field, **kw)
        self.train_file = None
        if train_file is not None:
            path = Path(train_file).expanduser()
            if path.suffix != ".jsonl":
                raise TaskDataError(f"math: train_file must be a .jsonl file (one JSON object per line), got {path}")
            self.train_file = path  # read (and checked) only when the train split is asked for

    def _load(self, split: str) -> list[Item]:
        if split == "train" and self.train_file is not None:
            if not self.train_file.is_file():
                raise FileNotFoundError(
                    f"math: train_file not found: {self.train_file} (the README's Tasks section says how to make "
                    "the ~12k split; without train_file the task trains on the 7.5k MATH-lighteval set)")
            return self._load_train_file(self.train_file)
        return super()._load(split)

    def _load_train_file(self, path: Path) -> list[Item]:
        """Items of a train_file; every line must have the TRAIN_FILE_FIELDS as non-empty text."""
        items = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskDataError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                for field in TRAIN_FILE_FIELDS:
                    if field not in row:
                        raise TaskDataError(
                            f"{where}: missing field {field!r} (a MATH train_file needs "
                            f"{', '.join(TRAIN_FILE_FIELDS)}; optional {', '.join(TRAIN_FILE_OPTIONAL)})")
                    if not isinstance(row[field], str) or not row[field].strip():
                        raise TaskDataError(f"{where}: field {field!r} is empty or not text: {row[field]!r}")
                answer = row.get("answer")
                if answer is not None and str(answer).strip():  # PRM800K's own gold wins over the box
                    gold, solution = str(answer).strip(), row["solution"]
                else:
                    gold, solution = self.parse_answer(row["solution"], where)
                ident = row.get("unique_id") or f"{self.name}-train-{len(items)}"
                items.append(Item(id=str(ident), question=row["problem"], answer=gold, solution=solution))
        return items

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

    def final_answer(self, response: str) -> str | None:
        """The extracted answer (boxed / "the answer is" / last number), normalised; None if none."""
        answer = extract_math_answer(response)
        return None if answer is None else normalize_answer(answer)
