"""Tasks: loading from shipped samples and local files, prompts, rewards, clear errors on bad
input, and the arithmetic generator (correct by construction, deterministic, disjoint splits)."""
from __future__ import annotations

import json
import re
import string

import pytest

from engine.tasks import (
    TASKS, VINEPPO_TEMPLATE, ArithmeticTask, Item, TaskDataError, load_dataset_rows, load_task)
from engine.tasks.base import SAMPLE_DIR
from engine.tasks.gsm8k import strip_calculator_annotations


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ registry

def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'; known tasks: arithmetic, gsm8k, math, word-arithmetic"):
        load_task("gsm9k")
    assert set(TASKS) == {"arithmetic", "gsm8k", "math", "word-arithmetic"}


def test_step_styles_and_default_templates():
    assert load_task("gsm8k", data="sample").step_style == "newline"
    assert load_task("math", data="sample").step_style == "math"
    assert load_task("arithmetic").step_style == "newline"
    assert VINEPPO_TEMPLATE == "[MATH_TASK] Problem:\n{question}\n\nSolution:"


# ------------------------------------------------------------------------ shipped samples

def test_shipped_samples_have_licenses():
    names = {p.name for p in SAMPLE_DIR.iterdir()}
    assert {"gsm8k_train.jsonl", "gsm8k_test.jsonl", "math500_test.jsonl", "LICENSE-gsm8k", "LICENSE-math500"} <= names
    assert "MIT License" in (SAMPLE_DIR / "LICENSE-gsm8k").read_text()
    assert "Hendrycks" in (SAMPLE_DIR / "LICENSE-math500").read_text()


def test_gsm8k_from_samples():
    task = load_task("gsm8k", data="sample")
    train, test = task.items("train"), task.items("test")
    assert len(train) == len(test) == 32
    first = train[0]
    assert first.answer == "72" and first.id == "gsm8k-train-0"
    assert "<<" not in first.solution and first.solution.endswith("#### 72")
    assert task.prompt(first) == f"[MATH_TASK] Problem:\n{first.question}\n\nSolution:"
    for item in train + test:  # every reference solution earns its own reward
        assert task.reward(" " + item.solution, item) == 1.0
        assert task.reward(" " + item.solution, item, finish_reason="length") == 0.0
    assert task.reward("#### 73", first) == 0.0


def test_gsm8k_grading_modes():
    item = Item(id="x", question="q", answer="18")
    strict, lenient = load_task("gsm8k", data="sample", grading="strict"), load_task("gsm8k", data="sample")
    assert lenient.grading == "lenient"
    for response in ("So she has 18 apples.", "#### 18.0", "#### $18", "#### 18 apples"):
        assert strict.reward(response, item) == 0.0
        assert lenient.reward(response, item) == 1.0
    assert strict.reward("6 * 3 = 18\n#### 18", item) == 1.0
    for item in strict.items("test"):  # every reference solution passes the strict rule too
        assert strict.reward(" " + item.solution, item) == 1.0


def test_gsm8k_unknown_grading_names_the_allowed_modes():
    with pytest.raises(ValueError, match="unknown grading 'exact'; allowed: strict, lenient"):
        load_task("gsm8k", data="sample", grading="exact")


def test_gsm8k_preset_grades_strictly():
    import yaml

    preset = yaml.safe_load((SAMPLE_DIR.parents[1] / "presets" / "gsm8k.yaml").read_text())
    assert preset["task"] == "gsm8k" and preset["task_args"] == {"grading": "strict"}
    assert load_task(preset["task"], data="sample", **preset["task_args"]).grading == "strict"


def test_math_from_samples():
    task = load_task("math", data="sample")
    items = task.items("test")
    assert len(items) == 32
    assert items[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert items[2].answer == "\\frac{14}{3}"
    for item in items:
        assert task.reward(" " + item.solution, item) == 1.0
        assert task.reward(" " + item.solution, item, finish_reason="length") == 0.0
    assert task.reward("So the answer is $\\boxed{\\dfrac{14}{3}}$.", items[2]) == 1.0
    assert task.reward("So the answer is $\\boxed{\\dfrac{13}{3}}$.", items[2]) == 0.0
    with pytest.raises(TaskDataError, match="no data for the train split"):
        task.items("train")  # only a test sample is shipped


def test_calculator_annotations_stripped():
    assert strip_calculator_annotations("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def test_template_override_and_validation():
    task = load_task("gsm8k", data="sample", template="Q: {question}\nA:")
    item = task.items("test")[0]
    assert task.prompt(item) == f"Q: {item.question}\nA:"
    braces = load_task("math", data="sample", template="\\boxed{} {question}")  # braces are literal
    assert braces.prompt(Item("i", "x^{2}", "1")) == "\\boxed{} x^{2}"
    with pytest.raises(ValueError, match="must contain '{question}'"):
        load_task("gsm8k", data="sample", template="no placeholder")


# ---------------------------------------------------------------------------- local files

def test_local_jsonl_with_renamed_fields(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"problem": "What is 2+2?", "solution": "2+2 = <<2+2=4>>4\n#### 4", "extra": 1},
        {"problem": "What is 1,000+1?", "solution": "#### 1,001"},
    ])
    task = load_task("gsm8k", data=path, question_field="problem", answer_field="solution")
    items = task.items("train")
    assert [i.answer for i in items] == ["4", "1001"]
    assert items[0].solution == "2+2 = 4\n#### 4"
    same = [(i.question, i.answer) for i in task.items("test")]
    assert same == [(i.question, i.answer) for i in items]  # one file serves every split


def test_local_json_and_parquet_per_split(tmp_path):
    import datasets

    rows = [{"q": "Find $x$.", "a": "We get $\\boxed{\\frac{1}{2}}$."}, {"q": "Name it.", "a": "\\text{Evelyn}"}]
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps(rows))
    parquet_path = tmp_path / "test.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet_path))
    task = load_task("math", data={"train": json_path, "test": str(parquet_path)}, question_field="q", answer_field="a")
    for split in ("train", "test"):
        items = task.items(split)
        assert [i.answer for i in items] == ["\\frac{1}{2}", "\\text{Evelyn}"]
        assert items[1].solution is None  # a bare final answer has no reference solution
        assert task.reward("$\\boxed{0.5}$", items[0]) == 1.0


def test_load_dataset_rows_returns_only_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": 1, "b": "x", "c": None}])
    assert load_dataset_rows(path, "train", ["a", "b"]) == [{"a": 1, "b": "x"}]


# ----------------------------------------------------------------------------- bad input

def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_task("gsm8k", data=missing)


def test_missing_field_names_field_and_file(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q?", "solution": "#### 1"}])
    task = load_task("gsm8k", data=path)
    with pytest.raises(TaskDataError, match=r"rows\.jsonl has no field 'answer' \(its fields: question, solution\)"):
        task.items("train")


def test_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskDataError, match="empty.jsonl is empty"):
        load_task("gsm8k", data=empty).items("train")
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    with pytest.raises(TaskDataError, match="empty.json"):
        load_task("math", data=empty_list).items("test")


def test_bad_rows_are_named(tmp_path):
    no_gold = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"},
                                                  {"question": "q", "answer": "a story"}])
    with pytest.raises(TaskDataError, match=r"row 1 of .*g\.jsonl.*no '#### <number>'"):
        load_task("gsm8k", data=no_gold).items("train")
    no_box = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "line one\nline two"}])
    with pytest.raises(TaskDataError, match=r"row 0 of .*m\.jsonl.*no \\boxed"):
        load_task("math", data=no_box).items("test")
    no_question = write_jsonl(tmp_path / "n.jsonl", [{"question": None, "answer": "#### 1"}])
    with pytest.raises(TaskDataError, match="field 'question' is empty"):
        load_task("gsm8k", data=no_question).items("test")


def test_unsupported_file_type_and_unknown_split(tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(TaskDataError, match="unsupported data file type '.csv'"):
        load_task("gsm8k", data=csv)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_task("gsm8k", data="sample").items("dev")


def test_unreachable_hub_is_a_clear_error():
    # tests run with HF_HUB_OFFLINE=1 (tests/conftest.py), so the hub is never contacted.
    with pytest.raises(TaskDataError, match="could not load hub dataset 'openai/gsm8k'.*local"):
        load_task("gsm8k").items("test")


# ------------------------------------------------------------------------------ arithmetic

_LINE = re.compile(r"(-?\d+)([+\-*])(\d+)=(-?\d+)")


def check_problem(item: Item, task: ArithmeticTask) -> None:
    """The item is right by construction: Python agrees with every line and the answer."""
    assert re.fullmatch(r"[\d+\-*()]+", item.question)
    assert eval(item.question) == int(item.answer)  # safe: digits, operators, parentheses only
    *lines, final = item.solution.split("\n")
    assert final == f"#### {item.answer}"
    assert task.steps[0] <= len(lines) <= task.steps[1]
    value = None
    for line in lines:
        a, op, b, result = _LINE.fullmatch(line).groups()
        assert value is None or int(a) == value  # each step continues from the last result
        assert op in task.ops and task.operands[0] <= int(b) <= task.operands[1]
        assert eval(f"{a}{op}{b}") == int(result)
        value = int(result)
        assert task.allow_negative or value >= 0
    assert value == int(item.answer)
    assert set(task.prompt(item) + item.solution) <= set(string.printable)


@pytest.mark.parametrize("knobs", [
    {},
    {"steps": 4, "max_operand": 5, "ops": "*+"},
    {"steps": (1, 5), "min_operand": 10, "max_operand": 99, "ops": "-", "allow_negative": True},
])
def test_arithmetic_correct_by_construction(knobs):
    task = load_task("arithmetic", n_train=2000, n_test=200, **knobs)
    train, test = task.items("train"), task.items("test")
    assert len(train) == 2000 and len(test) == 200
    for item in train + test:
        check_problem(item, task)
        assert task.reward(item.solution, item) == 1.0
        assert task.reward(item.solution, item, finish_reason="length") == 0.0
        assert task.reward(f"#### {int(item.answer) + 1}", item) == 0.0
    assert not {i.question for i in train} & {i.question for i in test}  # held out
    assert len({i.question for i in train}) == len(train)


def test_arithmetic_is_deterministic_given_seed():
    a, b = load_task("arithmetic", n_train=50, n_test=20), load_task("arithmetic", n_train=50, n_test=20)
    assert a.items("train") == b.items("train") and a.items("test") == b.items("test")
    c = load_task("arithmetic", seed=1, n_train=50, n_test=20)
    assert c.items("test") != a.items("test")
    assert a.prompt(a.items("test")[0]) == f"Compute {a.items('test')[0].question}.\n"


def test_arithmetic_answer_only_solutions_are_train_only():
    plain = load_task("arithmetic", n_train=1000, n_test=100)
    mixed = load_task("arithmetic", n_train=1000, n_test=100, answer_only_frac=0.5)
    # Same problems (the style has its own generator); only train solutions change, and the
    # answer-only ones are the final line of the worked solution.
    assert [i.question for i in mixed.items("train")] == [i.question for i in plain.items("train")]
    assert mixed.items("test") == plain.items("test")
    bare = 0
    for worked, item in zip(plain.items("train"), mixed.items("train")):
        if item.solution != worked.solution:
            assert item.solution == worked.solution.splitlines()[-1] == f"#### {item.answer}"
            bare += 1
        assert mixed.reward(item.solution, item) == 1.0
    assert 400 < bare < 600
    assert all(i.solution.startswith("####") for i in
               load_task("arithmetic", n_train=50, n_test=10, answer_only_frac=1.0).items("train"))
    for bad in (-0.1, 1.5, "1e-1", True):
        with pytest.raises(ValueError, match=rf"answer_only_frac must be a number in \[0, 1\], got {bad!r}"):
            ArithmeticTask(answer_only_frac=bad)


def test_arithmetic_precedence_is_left_to_right():
    task = load_task("arithmetic", steps=2, ops="+*", n_train=300, n_test=50)
    mixed = [i for i in task.items("train") if i.question.startswith("(")]
    assert mixed, "expected some (a+b)*c problems"
    for item in mixed:
        check_problem(item, task)


def test_arithmetic_bad_knobs():
    with pytest.raises(ValueError, match="takes no data"):
        load_task("arithmetic", data="x.jsonl")
    with pytest.raises(ValueError, match="ops must be"):
        ArithmeticTask(ops="/")
    with pytest.raises(ValueError, match="steps must be"):
        ArithmeticTask(steps=0)
    with pytest.raises(ValueError, match="found only .* distinct"):
        ArithmeticTask(steps=1, max_operand=1, ops="+", n_train=100, n_test=2).items("train")
    with pytest.raises(TypeError):
        load_task("arithmetic", question_field="q")


# ------------------------------------------------------------------- MATH train split file

def _math_rows():
    return [
        {"problem": "What is $1+1$?", "solution": "We add: $1+1=\\boxed{2}$.", "answer": "2", "level": "Level 1",
         "type": "Algebra", "unique_id": "train/algebra/1.json"},
        {"problem": "What is $2+3$?", "solution": "So $2+3=\\boxed{5}$."},  # only the required fields
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{2}{4}}$.", "answer": "\\frac{1}{2}",
         "subject": "Prealgebra"},  # PRM800K names it subject: extra fields are ignored
    ]


def test_math_train_file_gives_the_train_split(tmp_path):
    path = write_jsonl(tmp_path / "math_12k.jsonl", _math_rows())
    task = load_task("math", data="sample", train_file=str(path))
    train = task.items("train")
    assert [i.answer for i in train] == ["2", "5", "\\frac{1}{2}"]  # `answer` wins over the box
    assert [i.id for i in train] == ["train/algebra/1.json", "math-train-1", "math-train-2"]
    assert train[0].question == "What is $1+1$?" and train[1].solution == "So $2+3=\\boxed{5}$."
    assert task.reward("so \\boxed{2}", train[0]) == 1.0
    assert len(task.items("test")) == 32  # the test split is untouched


def test_math_default_train_is_the_lighteval_hub_set():
    assert load_task("math").sources["train"] == ("DigitalLearningGmbH/MATH-lighteval", "default")


@pytest.mark.parametrize("field", ["problem", "solution"])
def test_math_train_file_missing_field_names_file_and_field(tmp_path, field):
    rows = _math_rows()
    del rows[1][field]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    task = load_task("math", data="sample", train_file=path)
    with pytest.raises(TaskDataError, match=re.escape(f"{path} line 2: missing field {field!r}")):
        task.items("train")


def test_math_train_file_bad_inputs(tmp_path):
    lazy = load_task("math", data="sample", train_file=tmp_path / "nope.jsonl")
    assert lazy.items("test")  # the test split does not need the train file (engine.evaluate)
    with pytest.raises(FileNotFoundError, match="train_file not found: .*nope.jsonl"):
        lazy.items("train")
    parquet = tmp_path / "x.parquet"
    parquet.write_text("")
    with pytest.raises(TaskDataError, match="must be a .jsonl file"):
        load_task("math", data="sample", train_file=parquet)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "p", "solution": "\\\\boxed{1}"}\n{not json\n')
    with pytest.raises(TaskDataError, match="broken.jsonl line 2: not valid JSON"):
        load_task("math", data="sample", train_file=broken).items("train")
    empty = write_jsonl(tmp_path / "empty_solution.jsonl", [{"problem": "p", "solution": " "}])
    with pytest.raises(TaskDataError, match="line 1: field 'solution' is empty"):
        load_task("math", data="sample", train_file=empty).items("train")


def test_final_answers_follow_each_tasks_grading():
    from engine.tasks import load_task

    strict = load_task("gsm8k", data="sample", grading="strict")
    lenient = load_task("gsm8k", data="sample", grading="lenient")
    assert strict.final_answer("x\n#### 1,800 Apples") == "1800 apples"
    assert strict.final_answer("So she has 18 apples.") is None  # unfinished under the reference rule
    assert lenient.final_answer("So she has 18 apples.") == "18"
    assert lenient.final_answer("no number here") is None
    math = load_task("math", data="sample")
    assert math.final_answer("so $x = \\boxed{\\frac{1}{2}}$.") == math.final_answer("The answer is \\boxed{\\frac12}")
    assert math.final_answer("I give up") is None


def test_math_train_file_answer_field_spares_parsing_the_solution(tmp_path):
    # A multi-line solution without a box is fine when the row gives its answer.
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "1+1?", "solution": "We add.\nSo two.", "answer": "2"}])
    (item,) = load_task("math", data="sample", train_file=path).items("train")
    assert (item.answer, item.solution) == ("2", "We add.\nSo two.")
