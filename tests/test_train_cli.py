"""`python -m engine.train`: presets, overrides and errors on the command line."""
from __future__ import annotations

import json
import re

import pytest

from engine.train import main

SMALL = ["--tiny-model-args", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,"
         " num_key_value_heads: 1, head_dim: 16}", "--sft-steps", "2", "--iterations", "1", "--eval-items", "4",
         "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--minibatch-size", "4", "--micro-batch-size",
         "4", "--max-new-tokens", "8", "--tensorboard", "false", "--quiet"]


def test_smoke_preset_with_overrides_runs_and_writes_its_outputs(tmp_path):
    run = tmp_path / "run"
    summary = main(["--preset", "smoke", "--run-dir", str(run), "--algo", "rloo", *SMALL])
    assert summary["algo"] == "rloo" and summary["iterations_done"] == 1
    assert json.loads((run / "summary.json").read_text()) == summary
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "final/config.json", "sft/sft_done.json",
                 "checkpoints/latest"):
        assert (run / name).exists(), name
    assert "algo: rloo" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--algo", "dpo"], "unknown algo 'dpo'"),
    (["--task", "poetry"], "unknown task 'poetry'"),
    (["--model", "/no/such/dir"], "model directory /no/such/dir does not exist"),
    (["--k", "0"], "k \\(MC rollouts per state\\) must be an integer >= 1"),
    (["--minibatch-size", "7"], "does not divide into minibatches of 7"),
    (["--preset", "gsm8k"], "needs a value for model"),
    (["--task-args", "{steps: [2, 3"], "--task-args '\\{steps: \\[2, 3' is not valid YAML"),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--run-dir", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # nothing was started


def test_unknown_key_in_a_preset_file_is_an_error(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("algo: vineppo\nlearning_rate: 1e-6\n")
    with pytest.raises(SystemExit):
        main(["--preset", str(preset)])
    assert "unknown config key(s) learning_rate" in capsys.readouterr().err


def test_exponent_without_a_dot_is_a_number(tmp_path):
    from engine.rl.config import load_config

    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-6\nsft_lr: 3e-3\n")
    cfg = load_config(str(preset), {"kl_coef": "2e-4"})
    assert (cfg.lr, cfg.sft_lr, cfg.kl_coef) == (1e-6, 3e-3, 2e-4)


@pytest.mark.parametrize("task_args, message", [
    ("{grading: exact, data: sample}", "task_args for gsm8k: .*unknown grading 'exact'"),
])
def test_a_bad_task_option_is_a_clean_error(tmp_path, capsys, task_args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--task", "gsm8k", "--task-args", task_args,
              "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_task_args_merge_into_the_presets(tmp_path):
    from engine.rl.config import load_config

    cfg = load_config("gsm8k", {"model": str(tmp_path), "task_args": {"data": "sample"}})
    assert cfg.task_args == {"grading": "strict", "data": "sample"}  # the preset's strict grading stays
    assert load_config("gsm8k", {"model": str(tmp_path), "task_args": {"grading": None}}).task_args == {}
    assert load_config("smoke", {"task": "gsm8k", "task_args": {"data": "sample"}}).task_args == {"data": "sample"}
