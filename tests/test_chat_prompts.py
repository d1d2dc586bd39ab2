"""Chat prompts (task_args chat: true) through every entry point that pairs a task with a model:
evaluation, SFT and the trainer's early check (the trainer's rollouts: tests/rl/test_trainer.py)."""
from __future__ import annotations

import pytest

from engine.evaluate import evaluate
from engine.evaluate import main as evaluate_main
from engine.model import create_tiny_checkpoint, load_model
from engine.rl.config import ConfigError, load_config
from engine.rl.trainer import Trainer
from engine.sft import sft
from engine.tasks import ChatTemplateError, load_task

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16}
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
TASK_ARGS = {"chat": True, "steps": 1, "n_train": 32, "n_test": 4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(a tiny checkpoint whose tokenizer has a chat template, one without)."""
    root = tmp_path_factory.mktemp("chat")
    create_tiny_checkpoint(root / "plain", **TINY)
    create_tiny_checkpoint(root / "chat", **TINY)
    _, tok = load_model(root / "chat")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(root / "chat"))
    return root / "chat", root / "plain"


def test_evaluate_renders_chat_prompts(checkpoints, tmp_path):
    chat, plain = checkpoints
    report = evaluate(chat, "word-arithmetic", task_args=TASK_ARGS, n=1, temperature=0.0, max_new_tokens=4,
                      out=str(tmp_path / "r.json"))
    assert report["items"] == 4
    with pytest.raises(ChatTemplateError, match="no chat template"):
        evaluate(plain, "word-arithmetic", task_args=TASK_ARGS, n=1, max_new_tokens=4, out=str(tmp_path / "p.json"))
    with pytest.raises(SystemExit):  # the command line: a usage error, not a traceback
        evaluate_main(["--model", str(plain), "--task", "word-arithmetic", "--task-args", "{chat: true}",
                       "--out", str(tmp_path / "c.json")])


def test_sft_trains_on_chat_prompts(checkpoints):
    chat, _ = checkpoints
    model, tok = load_model(chat)
    task = load_task("word-arithmetic", **TASK_ARGS)
    losses = sft(model, tok, task, steps=1, batch_size=4, progress=False)
    assert len(losses) == 1
    assert task.prompt(task.items("train")[0]).startswith("<user>")


def test_trainer_refuses_chat_without_a_template_before_touching_the_run(checkpoints, tmp_path):
    _, plain = checkpoints
    run = tmp_path / "run"
    for model in (str(plain), None):
        cfg = load_config("smoke", {"model": model, "task": "word-arithmetic", "task_args": TASK_ARGS,
                                    "run_dir": str(run), "tiny_model_args": TINY})
        with pytest.raises(ConfigError, match="chat: true needs a tokenizer with a chat template"):
            Trainer(cfg, progress=False)
        assert not run.exists()
