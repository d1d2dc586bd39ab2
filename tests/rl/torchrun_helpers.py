"""What the torchrun tests share: the command line of a 1-process or N-rank launch, its
environment, and reading a checkpoint's weights."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch


def launch_command(module: str, nproc: int) -> list[str]:
    """`python -m module` (nproc 1) or torchrun with `nproc` local ranks on a free port."""
    if nproc == 1:
        return [sys.executable, "-m", module]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", module]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment with one thread per process and no WORLD_SIZE of an enclosing launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder` (an HF checkpoint), by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no weights in {folder}"
    return out
