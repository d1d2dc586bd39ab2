"""`python -m engine.train` (the demo until the trainer lands) runs end to end."""
from __future__ import annotations

import json

from engine import load_model
from engine.train import main, make_problems


def test_demo_trains_saves_and_reloads(tmp_path):
    summary = main(["--run-dir", str(tmp_path), "--steps", "3", "--batch-size", "8", "--eval-problems", "5"])
    assert 0.0 <= summary["held_out_accuracy_after"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    model, tok = load_model(tmp_path / "final")
    assert tok is not None and model.config.model_type == "llama"


def test_problems_are_correct_and_seeded():
    problems = make_problems(50, seed=1)
    assert problems == make_problems(50, seed=1)
    for prompt, answer in problems:
        a, b = prompt.rstrip("=").split("+")
        assert int(a) + int(b) == int(answer)
