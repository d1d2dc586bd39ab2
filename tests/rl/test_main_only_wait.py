"""Work that rank 0 alone does (a checkpoint, the HF export) is waited for with its own, longer
timeout: the collectives' timeout (dist_timeout_s) would end the other ranks first."""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from engine.rl.distributed import init_from_env

pytestmark = pytest.mark.distributed


def _worker(rank: int, port: int, out_dir: str, wait: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist = init_from_env(timeout_s=2, device="cpu", main_only_timeout_s=60)
    outcome = "ok"
    try:
        if rank == 0:
            time.sleep(5)  # rank 0 writes a checkpoint: longer than the collectives' 2 s timeout
        if wait == "main-only":
            dist.wait_for_main()
        else:
            dist.barrier()
    except Exception as e:  # noqa: BLE001 - the outcome is what the test reads
        outcome = type(e).__name__
    torch.save(outcome, os.path.join(out_dir, f"{wait}-rank{rank}.pt"))
    tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wait, rank1_outcome", [("main-only", "ok"), ("plain", "timed out")])
def test_the_other_ranks_wait_for_rank_0_with_the_main_only_timeout(tmp_path, wait, rank1_outcome):
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path), wait), nprocs=2, join=False)
    ctx.join(timeout=120)
    outcome = torch.load(tmp_path / f"{wait}-rank1.pt", weights_only=True)
    if rank1_outcome == "ok":
        assert outcome == "ok"
    else:  # the control: a plain barrier gives up after the collectives' timeout
        assert outcome != "ok"
