"""Reasoning tasks: items, prompts, 0/1 rewards and step styles for VinePPO.

    task = load_task("gsm8k")                        # hub dataset (openai/gsm8k)
    task = load_task("gsm8k", data="sample")         # 32 shipped rows per split
    task = load_task("math", data={"test": "math500.jsonl"}, question_field="problem")
    task = load_task("arithmetic", steps=3, max_operand=50, seed=1)   # generated, no download
    task = load_task("word-arithmetic", chat=True)   # stories; prompts in the model's chat template
    task.use_tokenizer(tokenizer)                     # (chat: the tokenizer renders the prompts)
    item = task.items("test")[0]
    task.prompt(item), task.reward(response, item, finish_reason)
"""
from __future__ import annotations

import argparse

import yaml

from engine.tasks.arithmetic import ArithmeticTask
from engine.tasks.base import (
    STEP_STYLES, VINEPPO_TEMPLATE, ChatTemplateError, DatasetTask, Item, Task, TaskDataError, load_dataset_rows)
from engine.tasks.grading import GraderPool, gsm8k_correct, math_correct
from engine.tasks.gsm8k import GSM8KTask
from engine.tasks.math import MathTask
from engine.tasks.word_arithmetic import WordArithmeticTask

TASKS: dict[str, type[Task]] = {"gsm8k": GSM8KTask, "math": MathTask, "arithmetic": ArithmeticTask,
                                "word-arithmetic": WordArithmeticTask}


def load_task(name: str, **kwargs) -> Task:
    """The task registered as `name`, built with its keyword options.

    Every task takes template= and chat=; data tasks take data=, question_field=,
    answer_field=, config=; arithmetic and word-arithmetic take seed=, steps=, min_operand=,
    max_operand=, ops=, allow_negative=, n_train=, n_test=, answer_only_frac=.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


def parse_task_args(text: str) -> dict:
    """The `--task-args` of the command lines: a YAML mapping of load_task options."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"--task-args is not valid YAML: {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--task-args must be a YAML mapping like '{{steps: 3}}', got {text!r}")
    return value


__all__ = [
    "STEP_STYLES", "TASKS", "VINEPPO_TEMPLATE", "ArithmeticTask", "ChatTemplateError", "DatasetTask", "GSM8KTask", "GraderPool",
    "Item", "MathTask", "Task", "TaskDataError", "WordArithmeticTask", "gsm8k_correct", "load_dataset_rows", "load_task",
    "math_correct", "parse_task_args",
]
