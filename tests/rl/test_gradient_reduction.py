"""Gradients are summed over ranks in fp32, also when the model is bf16 (3 gloo ranks on CPU).

Why 3 ranks and these values: with e = 2^-8, the ranks hold (1, e, e), (e, 1, e), (e, e, 1). The
exact sum of each element, 1 + 2^-7, is a bf16 number. A bf16 reduction rounds after each
addition: whichever order the collective adds in, at least two of the three elements meet
1 + e first, a tie that rounds to 1, and end at 1 instead of 1 + 2^-7. In fp32 every partial
sum is exact, so all three come back as 1 + 2^-7: no tolerance is needed.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from engine.rl.distributed import Dist

pytestmark = pytest.mark.distributed
E = 2.0 ** -8
WORLD = 3


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dist = Dist(rank=rank, world_size=WORLD, backend="gloo")
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
        p.grad = torch.full((3,), E, dtype=torch.bfloat16)
        p.grad[rank] = 1.0
        dist.all_reduce_grads([p])
        result = {"ddp": p.grad.clone()}

        from engine.model import create_tiny_checkpoint, load_model
        from engine.rl.fsdp import shard_policy

        folder = os.path.join(out_dir, "tiny")
        if rank == 0:
            create_tiny_checkpoint(folder, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        tdist.barrier()
        model, _ = load_model(folder, dtype=torch.bfloat16)
        modules = shard_policy(model)
        result["fsdp_reduce_dtypes"] = sorted({str(m._get_fsdp_state()._mp_policy.reduce_dtype) for m in modules})
        result["param_dtypes"] = sorted({str(q.dtype) for q in model.parameters()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_gradients_are_summed_in_fp32_over_three_bf16_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        want = torch.full((3,), 1.0 + 2 * E, dtype=torch.bfloat16)  # exactly representable
        assert torch.equal(result["ddp"], want), (rank, result["ddp"].tolist())
        assert result["fsdp_reduce_dtypes"] == ["torch.float32"]   # FSDP2 reduce-scatters in fp32
        assert result["param_dtypes"] == ["torch.bfloat16"]        # while the weights stay bf16
