"""`--parallel fsdp`: the policy's parameters, gradients and optimizer state sharded over the
ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`); a prototype (see the limits below).

    torchrun --nproc-per-node 2 -m engine.train --preset smoke --parallel fsdp

How it meets the trainer:
* fused q/k/v and gate/up matmuls are row-block views of one storage, which fully_shard (one
  DTensor per parameter) would break, so fusion is turned off first (`unfuse_linears`);
* every decoder layer and the root are `fully_shard`ed with reshard_after_forward=False: the
  first forward of a phase all-gathers a group, and it stays whole until the backward that
  syncs gradients (or `reshard`), so a phase does one all-gather per group whatever its number
  of forwards (ranks may run different numbers of micro-batches);
* the Engine reads the parameters outside any FSDP forward, so generation (sampling, MC
  rollouts, evaluation), HF export and the Engine's construction run inside `gathered`:
  all-gather every group, work on plain tensors, reshard;
* gradients: within a minibatch only the last backward of each rank syncs (reduce-scatter
  with divide factor 1: a sum over ranks, as the data-parallel path's all-reduce); a rank with
  no episode in a minibatch runs one zero-weighted backward so that every rank joins it;
* the optimizer (engine.rl.optim.AdamW, elementwise) steps on the local shards (DTensors).

* checkpoints: the HF weights (gathered; rank 0 writes them) plus one `optimizer_rank<r>.pt`
  per rank with its shards of the optimizer state; --resume (same world size) copies each
  rank's slice of the weights into its shards and loads its own optimizer file.

Limits (config errors): vineppo, grpo and rloo only (no PPO critic, RestEM, DPO+, CAPO);
resume only with the world size that wrote the checkpoint. The frozen reference model stays
whole on every rank.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from engine.model.fused_linear import unfuse_linears

FSDP_ALGOS = ("vineppo", "grpo", "rloo")


def shard_policy(model: nn.Module) -> list[FSDPModule]:
    """fully_shard every decoder layer and the root of `model` (in place); the FSDP modules,
    root last."""
    unfuse_linears(model)
    # the mesh on the model's device type (not FSDP's default, CUDA whenever present)
    mesh = init_device_mesh(next(model.parameters()).device.type, (tdist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")  # the trainer's forward
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_gradient_divide_factor(1.0)  # gradients summed over ranks, not averaged
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return modules


@contextmanager
def gathered(modules: list[FSDPModule]):
    """Every group all-gathered (plain, whole parameters on the modules) for the block; then
    sharded again. Every rank must enter it (it is collective)."""
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def set_sync(modules: list[FSDPModule], last: bool) -> None:
    """Before a backward: sync (reduce-scatter) and reshard only on a minibatch's last one."""
    for m in modules:
        m.set_requires_gradient_sync(last, recurse=False)
        m.set_reshard_after_backward(last, recurse=False)


def local_shard(full: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's rows of `full` for the dim-0-sharded `param` (torch.chunk's split, as FSDP2's)."""
    mesh = param.device_mesh
    chunks = list(full.chunk(mesh.size(), dim=0))
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else full[:0]
    if part.shape != param.to_local().shape:
        raise RuntimeError(f"shard of shape {tuple(param.to_local().shape)} does not match rows "
                           f"{tuple(part.shape)} of a {tuple(full.shape)} tensor")
    return part


@torch.no_grad()
def load_full_weights(model: nn.Module, source: nn.Module) -> None:
    """Copy the whole (unsharded) parameters of `source` into `model`'s shards, in place."""
    for p, q in zip(model.parameters(), source.parameters(), strict=True):
        if isinstance(p, DTensor):
            p.to_local().copy_(local_shard(q.to(p.device), p))
        else:
            p.copy_(q)


def local_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with each DTensor replaced by this rank's local shard (plain tensors,
    which torch.load(weights_only=True) reads back)."""
    sd = opt.state_dict()
    sd["state"] = {k: {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in v.items()}
                   for k, v in sd["state"].items()}
    return sd


def load_local_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """The inverse of local_optimizer_state: load, then wrap each shard as its parameter's DTensor."""
    opt.load_state_dict(sd)
    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = opt.state[p]
            for name, t in list(state.items()):
                if torch.is_tensor(t) and not isinstance(t, DTensor) and t.shape == p.to_local().shape and t.dim():
                    state[name] = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                                     shape=p.shape, stride=p.stride())
