"""`python -m engine.evaluate` end to end on the built-in tiny model, and its bad input."""
from __future__ import annotations

import json

import pytest

from engine.evaluate import main
from engine.model import create_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-eval")
    create_tiny_checkpoint(folder, seed=0)
    return folder


def test_evaluation_report_is_consistent(model_dir, tmp_path):
    out = tmp_path / "report.json"
    report = main(["--model", str(model_dir), "--task", "arithmetic", "--n", "3", "--limit", "4",
                   "--max-new-tokens", "12", "--temperature", "1.0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == report["metrics"] and saved["items"] == 4 and len(saved["results"]) == 4
    rows = saved["results"]
    assert all(len(r["samples"]) == 3 for r in rows)
    pass1 = sum(sum(s["reward"] for s in r["samples"]) / 3 for r in rows) / 4
    assert saved["metrics"]["pass@1"] == pytest.approx(pass1)
    assert saved["metrics"]["pass@3"] == sum(any(s["reward"] == 1 for s in r["samples"]) for r in rows) / 4
    assert saved["metrics"]["maj@3"] == sum(r["majority_correct"] for r in rows) / 4
    assert all(s["reward"] == 0 for r in rows for s in r["samples"] if s["finish_reason"] == "length")


def test_report_goes_next_to_the_model_by_default(model_dir):
    main(["--model", str(model_dir), "--task", "arithmetic", "--n", "1", "--limit", "2", "--max-new-tokens", "4"])
    assert (model_dir / "eval-arithmetic-test.json").exists()


def test_task_args_choose_the_distribution(model_dir, tmp_path):
    report = main(["--model", str(model_dir), "--task", "arithmetic", "--task-args", "{steps: 1, max_operand: 3, n_test: 8}",
                   "--n", "1", "--limit", "5", "--max-new-tokens", "4", "--out", str(tmp_path / "r.json")])
    assert report["task_args"] == {"steps": 1, "max_operand": 3, "n_test": 8}
    for row in report["results"]:  # one operation on 0..3, not the task's default 2-4 on 0..50
        a, b = row["question"].replace("-", "+").split("+")
        assert 0 <= int(a) <= 3 and 0 <= int(b) <= 3


@pytest.mark.parametrize("text, message", [("[1, 2]", "--task-args must be a YAML mapping"),
                                           ("{steps: [2, 3", "--task-args is not valid YAML")])
def test_task_args_must_be_a_mapping(model_dir, capsys, text, message):
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--task", "arithmetic", "--task-args", text])
    assert message in capsys.readouterr().err


def test_task_args_and_data_may_not_disagree(model_dir):
    with pytest.raises(ValueError, match="--data 'b.jsonl' and --task-args data 'a.jsonl' disagree"):
        main(["--model", str(model_dir), "--task", "gsm8k", "--task-args", "{data: a.jsonl}", "--data", "b.jsonl"])


@pytest.mark.parametrize("args,error,match", [
    (["--task", "chess"], ValueError, "unknown task 'chess'"),
    (["--task", "arithmetic", "--n", "0"], ValueError, "--n must be >= 1"),
    (["--task", "arithmetic", "--limit", "0"], ValueError, "--limit must be >= 1"),
    (["--task", "gsm8k", "--data", "/nonexistent/gsm.jsonl"], Exception, "gsm.jsonl"),
])
def test_bad_input(model_dir, args, error, match):
    with pytest.raises(error, match=match):
        main(["--model", str(model_dir), *args])


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--model", str(tmp_path / "nope"), "--task", "arithmetic"])


def test_each_item_gets_its_own_seed(model_dir, tmp_path, monkeypatch):
    from engine import Engine

    seen = []
    real = Engine.generate

    def spy(self, prompts, params, progress=False):
        seen.append(params)
        return real(self, prompts, params, progress)

    monkeypatch.setattr(Engine, "generate", spy)
    main(["--model", str(model_dir), "--task", "arithmetic", "--n", "2", "--limit", "5", "--max-new-tokens", "4",
          "--temperature", "1.0", "--out", str(tmp_path / "r.json")])
    (params,) = seen
    assert len(params) == 5 and len({p.seed for p in params}) == 5  # a shared seed would correlate the items


@pytest.mark.parametrize("task, top_p, max_new", [("gsm8k", 0.9, 1024), ("math", 0.9, 1024), ("arithmetic", 1.0, 512)])
def test_sampling_defaults_follow_the_papers_protocol(model_dir, tmp_path, monkeypatch, task, top_p, max_new):
    from engine import Engine
    from engine.runtime.params import Completion

    seen = []

    def generate(self, prompts, params, progress=False):
        seen.extend(params)
        return [[Completion(token_ids=[1], finish_reason="stop", text="#### 0") for _ in range(p.n)] for p in params]

    monkeypatch.setattr(Engine, "generate", generate)
    report = main(["--model", str(model_dir), "--task", task, "--data", "sample", "--limit", "2",
                   "--out", str(tmp_path / "r.json")] if task != "arithmetic" else
                  ["--model", str(model_dir), "--task", task, "--limit", "2", "--out", str(tmp_path / "r.json")])
    assert (report["n"], report["temperature"], report["top_p"], report["max_new_tokens"]) == (16, 0.35, top_p, max_new)
    assert all(p.top_p == top_p and p.max_new_tokens == max_new and p.n == 16 for p in seen) and len(seen) == 2


def test_run_dir_scores_every_checkpoint(model_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    for name in ("checkpoints/iter_000002", "checkpoints/iter_000004", "final"):
        shutil.copytree(model_dir, run / name, ignore=shutil.ignore_patterns("eval-*"))
    (run / "config.yaml").write_text("task: arithmetic\ntask_args: {steps: 1, max_operand: 3, n_test: 8}\n")
    table = main(["--run-dir", str(run), "--n", "2", "--limit", "3", "--max-new-tokens", "6"])
    assert [r["checkpoint"] for r in table["rows"]] == ["iter_000002", "iter_000004", "final"]
    assert all(r["items"] == 3 and set(r) >= {"pass@1", "maj@2", "pass@2"} for r in table["rows"])
    saved = json.loads((run / "eval-arithmetic-test-checkpoints.json").read_text())
    assert saved["rows"] == table["rows"] and saved["task_args"]["max_operand"] == 3
    printed = capsys.readouterr().out
    assert "iter_000004" in printed and "final" in printed and "maj@2" in printed
    with pytest.raises(SystemExit):
        main(["--run-dir", str(tmp_path / "nope")])
    assert "is not a training run directory (no config.yaml)" in capsys.readouterr().err
