"""The Task interface and dataset loading shared by the data-backed tasks.

A Task hands out `Item`s (question, gold final answer, optional reference solution) per
split, turns an item into a prompt with its template, scores a response 0/1 and names the
step-splitting style the VinePPO value estimator uses for its responses.

Data comes through `datasets`: from a hub name, or from a local .json/.jsonl/.parquet file
with configurable field names, or from the small samples shipped in `engine/tasks/data`.
"""
from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

# The zero-shot prompt of VinePPO (prompt_library/MATH_step_by_step_sft), for GSM8K and MATH.
VINEPPO_TEMPLATE = "[MATH_TASK] Problem:\n{question}\n\nSolution:"
STEP_STYLES = ("newline", "math")  # "newline": one step per line; "math": heuristic splitter
SAMPLE_DIR = Path(__file__).parent / "data"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

Source = Union[str, os.PathLike]


class TaskDataError(ValueError):
    """A data source that cannot be read, lacks a needed field, is empty or has a bad row."""


class ChatTemplateError(ValueError):
    """A task with chat prompts paired with a tokenizer that has no chat template."""


@dataclass(frozen=True)
class Item:
    """One problem. `answer` is the gold final answer; `solution` the reference text (for SFT)."""

    id: str
    question: str
    answer: str
    solution: str | None = None


def chat_prompt(tokenizer: Any, text: str) -> str:
    """`text` as one user turn of the tokenizer's chat template, with the assistant's generation
    prompt, as text for `tokenizer.encode`: a BOS the template writes is left out when encoding
    adds one back, so the ids hold one BOS."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and chat.startswith(bos) and tokenizer.encode("", add_special_tokens=True)[:1] == [tokenizer.bos_token_id]:
        chat = chat[len(bos):]
    return chat


class Task(ABC):
    """A reasoning task: items per split, prompts, 0/1 rewards and a step style."""

    name: ClassVar[str]
    step_style: ClassVar[str]
    default_template: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    def __init__(self, template: str | None = None, chat: bool = False):
        if self.step_style not in STEP_STYLES:  # the value estimator knows only these
            raise TypeError(f"{type(self).__name__}.step_style must be one of {STEP_STYLES}, got {self.step_style!r}")
        template = self.default_template if template is None else template
        if "{question}" not in template:
            raise ValueError(f"{self.name}: the template must contain '{{question}}', got {template!r}")
        if not isinstance(chat, bool):
            raise ValueError(f"{self.name}: chat must be true or false, got {chat!r}")
        self.template = template
        self.chat = chat
        self._chat_tokenizer: Any = None  # (a transformers tokenizer, set by use_tokenizer)
        self._items: dict[str, list[Item]] = {}

    def use_tokenizer(self, tokenizer) -> None:
        """The tokenizer whose chat template renders prompts when `chat` is on (a no-op when off).

        Whoever pairs a task with a model calls this: the trainer, evaluation, SFT, the analyses.
        """
        if not self.chat:
            return
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"{self.name}: chat is on, but the model's tokenizer has no chat template; "
                             "set the task's chat: false or use a chat model")
        self._chat_tokenizer = tokenizer

    def items(self, split: str) -> list[Item]:
        """The items of a split (loaded once, then cached); raises on an unknown or empty split."""
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; splits: {', '.join(self.splits)}")
        if split not in self._items:
            items = self._load(split)
            if not items:
                raise TaskDataError(f"{self.name}: the {split} split is empty")
            self._items[split] = items
        return list(self._items[split])

    def prompt(self, item: Item) -> str:
        """The text the model continues: the template filled in, as a chat user turn when `chat` is on.

        A chat prompt is the tokenizer's template with the assistant's generation prompt, as text;
        a BOS the template writes first is left out, since encoding the text adds it back.
        """
        # replace, not str.format: templates and questions may hold LaTeX braces.
        text = self.template.replace("{question}", item.question)
        if not self.chat:
            return text
        if self._chat_tokenizer is None:
            raise RuntimeError(f"{self.name}: chat is on; call task.use_tokenizer(tokenizer) before task.prompt()")
        return chat_prompt(self._chat_tokenizer, text)

    @abstractmethod
    def is_correct(self, response: str, item: Item) -> bool:
        """Whether the response (the text generated after the prompt) reaches item.answer."""

    def final_answer(self, response: str) -> str | None:
        """The response's final answer in a canonical form, or None when it has none.

        Majority votes group samples by it. A finished response without one counts as
        unfinished, as in the VinePPO reference: reward 0 and its EOS is not trained
        (engine.rl.rollout). Default: the number after the last `####`, else the last number.
        """
        from engine.tasks.grading import extract_gsm8k_answer

        number = extract_gsm8k_answer(response)
        return None if number is None else str(number)

    def reward(self, response: str, item: Item, finish_reason: str = "stop") -> float:
        """1.0 for a correct finished response, else 0.0; a response cut by length scores 0."""
        if finish_reason == "length":
            return 0.0
        return 1.0 if self.is_correct(response, item) else 0.0

    @abstractmethod
    def _load(self, split: str) -> list[Item]:
        """Build the items of a known split."""


# ------------------------------------------------------------------------------- loading

def is_local_source(source: Source) -> bool:
    """A local file: a path object, an existing file, or a name ending in a data-file suffix.

    Anything else (e.g. "openai/gsm8k", or a saved dataset folder) goes to datasets.load_dataset.
    """
    return isinstance(source, os.PathLike) or os.path.isfile(source) or Path(source).suffix in LOCAL_FORMATS


def check_local_file(source: Source) -> Path:
    """The path of a readable local data file, or a clear error naming it."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix not in LOCAL_FORMATS:
        raise TaskDataError(f"{path}: unsupported data file type {path.suffix!r}; use .json, .jsonl or .parquet")
    return path


def load_dataset_rows(source: Source, split: str, fields: list[str], *, config: str | None = None) -> list[dict]:
    """Rows (only `fields`) of a local .json/.jsonl/.parquet file or of a hub dataset split.

    A local file is one split on its own, so `split` only selects the split of a hub dataset.
    Local files are parsed into memory through a throwaway cache (no copy of them is left in
    the Hugging Face cache); hub datasets use the normal cache.
    Raises FileNotFoundError or TaskDataError naming the file and the problem.
    """
    import datasets

    if not is_local_source(source):
        where = f"hub dataset {source!r}" + (f" ({config})" if config else "") + f" split {split!r}"
        try:
            ds = datasets.load_dataset(str(source), config, split=split)
        except Exception as exc:
            raise TaskDataError(
                f"could not load {where}: {type(exc).__name__}: {exc}. Offline? Pass a local "
                ".json/.jsonl/.parquet file as data=") from exc
        return _select(ds, fields, where)
    path = check_local_file(source)
    if path.stat().st_size == 0:
        raise TaskDataError(f"{path} is empty (no rows)")
    with tempfile.TemporaryDirectory(prefix="vine-data-") as cache:
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train",
                                       cache_dir=cache, keep_in_memory=True)
        except Exception as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise TaskDataError(f"could not read {path}: {type(exc).__name__}: {exc}{cause}") from exc
        return _select(ds, fields, str(path))


def _select(ds, fields: list[str], where: str) -> list[dict]:
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise TaskDataError(
            f"{where} has no field {missing[0]!r} (its fields: {', '.join(ds.column_names)}); "
            "name the right ones with question_field= / answer_field=")
    if len(ds) == 0:
        raise TaskDataError(f"{where} has no rows")
    return ds.select_columns(fields).to_list()


class DatasetTask(Task):
    """A task whose items come from a dataset with a question field and an answer field.

    chat: prompts as a user turn of the model's chat template (see Task.prompt).
    data: None (the task's hub datasets), "sample" (the rows shipped in engine/tasks/data),
    a hub name or local file used for every split, or a mapping split -> hub name or file.
    """

    hub: ClassVar[Mapping[str, tuple[str, str | None]]]  # split -> (hub name, config)
    samples: ClassVar[Mapping[str, str]]  # split -> file name in SAMPLE_DIR
    question_field: ClassVar[str] = "question"
    answer_field: ClassVar[str] = "answer"

    def __init__(self, data: Source | Mapping[str, Source] | None = None, *, template: str | None = None,
                 question_field: str | None = None, answer_field: str | None = None,
                 config: str | None = None, chat: bool = False):
        super().__init__(template, chat)
        self.fields = (question_field or self.question_field, answer_field or self.answer_field)
        if data is None:
            self.sources: dict[str, tuple[Source, str | None]] = dict(self.hub)
        elif isinstance(data, str) and data == "sample":
            self.sources = {s: (SAMPLE_DIR / f, None) for s, f in self.samples.items()}
        elif isinstance(data, Mapping):
            self.sources = {s: (src, config) for s, src in data.items()}
        else:
            self.sources = {s: (data, config) for s in self.splits}
        for split, (src, _) in self.sources.items():
            if split not in self.splits:
                raise ValueError(f"{self.name}: unknown split {split!r} in data; splits: {', '.join(self.splits)}")
            if is_local_source(src):
                check_local_file(src)  # fail at construction, not at the first items() call

    def _load(self, split: str) -> list[Item]:
        if split not in self.sources:
            have = ", ".join(self.sources) or "none"
            raise TaskDataError(
                f"{self.name}: no data for the {split} split (have: {have}); pass data={{'{split}': path}}")
        source, config = self.sources[split]
        rows = load_dataset_rows(source, split, list(self.fields), config=config)
        items = []
        for i, row in enumerate(rows):
            question, answer = (row[f] for f in self.fields)
            where = f"row {i} of {source}"
            if not isinstance(question, str) or not question.strip():
                raise TaskDataError(f"{where}: field {self.fields[0]!r} is empty or not text: {question!r}")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(answer, str) or not answer.strip():
                raise TaskDataError(f"{where}: field {self.fields[1]!r} is empty or not text: {answer!r}")
            gold, solution = self.parse_answer(answer, where)
            items.append(Item(id=f"{self.name}-{split}-{i}", question=question, answer=gold, solution=solution))
        return items

    @abstractmethod
    def parse_answer(self, text: str, where: str) -> tuple[str, str | None]:
        """(gold final answer, reference solution or None) from an answer field's text."""

