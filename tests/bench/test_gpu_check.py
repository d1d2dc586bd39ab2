"""make gpu-check: refuses at once without CUDA, and every step it would run exists."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu_check


def test_every_step_names_an_existing_module_and_config(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name, cmd, limit in gpu_check.steps(Path("/tmp/out")):
        assert name in printed and 0 < limit <= 150
        module = cmd[cmd.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module
        if "--config" in cmd:
            config = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
            assert config["num_hidden_layers"] > 0
    assert sum(limit for *_, limit in gpu_check.steps(Path("/tmp/out"))) <= 9 * 60  # the suite's budget


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_at_once(capsys):
    assert gpu_check.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    make = subprocess.run(["make", "gpu-check", "GPU_PYTHON=python3"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert make.returncode != 0 and "needs a CUDA device" in make.stderr


def test_unknown_steps_are_errors():
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "nope"])
