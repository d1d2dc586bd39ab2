"""`python -m engine.train` (the SFT demo until the trainer lands) runs end to end."""
from __future__ import annotations

import json

from engine import load_model
from engine.tasks import load_task
from engine.train import main, sft_batch


def test_demo_trains_saves_and_reloads(tmp_path):
    summary = main(["--run-dir", str(tmp_path), "--steps", "3", "--batch-size", "8", "--eval-items", "4"])
    assert 0.0 <= summary["held_out_accuracy_after"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    model, tok = load_model(tmp_path / "final")
    assert tok is not None and model.config.model_type == "llama"


def test_sft_batch_puts_the_loss_on_the_solution_and_eos_only(tmp_path):
    from engine.model import char_tokenizer

    tok = char_tokenizer()
    task = load_task("arithmetic")
    items = task.items("train")[:3]
    ids, cu, targets = sft_batch(tok, task, items)
    assert ids.shape == (1, int(cu[-1])) and targets.shape == (int(cu[-1]),)
    for i, it in enumerate(items):
        seq_targets = targets[cu[i]:cu[i + 1]]
        answer = seq_targets[seq_targets != -100].tolist()
        assert answer == tok.encode(it.solution) + [tok.eos_token_id]
        # each target is the next input token: the model learns to continue the prompt
        n_prompt = len(tok.encode(task.prompt(it)))
        assert ids[0, cu[i] + n_prompt:cu[i + 1]].tolist() == answer[:-1]
