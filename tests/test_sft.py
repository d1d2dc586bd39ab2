"""The SFT warm-up: packed batches with the loss on the solution only; the loss goes down."""
from __future__ import annotations

import json

from engine.model import char_tokenizer, create_tiny_checkpoint, load_model
from engine.sft import main, sft, sft_batch
from engine.tasks import load_task


def test_sft_batch_puts_the_loss_on_the_solution_and_eos_only():
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


def test_sft_lowers_the_loss(tmp_path):
    create_tiny_checkpoint(tmp_path / "m", seed=0)
    model, tok = load_model(tmp_path / "m")
    losses = sft(model, tok, load_task("arithmetic"), steps=40, batch_size=8, lr=3e-3, progress=False)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_sft_command_saves_a_loadable_checkpoint(tmp_path, capsys):
    summary = main(["--task", "arithmetic", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out) == summary
    model, tok = load_model(tmp_path / "out")
    assert tok is not None and model.config.model_type == "llama"


def test_sft_command_passes_task_args(tmp_path, monkeypatch):
    import engine.sft as sft_module

    seen = {}

    def spy(model, tok, task, **kwargs):
        seen["task"] = task
        return sft(model, tok, task, **kwargs)

    monkeypatch.setattr(sft_module, "sft", spy)
    main(["--task", "arithmetic", "--task-args", "{steps: 1, max_operand: 3, n_train: 20, n_test: 4, answer_only_frac: 1.0}",
          "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "out")])
    train = seen["task"].items("train")
    assert len(train) == 20 and all(it.solution == f"#### {it.answer}" for it in train)
