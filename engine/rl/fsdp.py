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
* the optimizer (engine.rl.optim.AdamW, elementwise) steps on the local shards (DTensors);
* the Engine's KV pool is released after each generation phase, for the update's memory
  (Trainer.release_kv_for_update), and allocated again by the next generate.

* checkpoints: the HF weights (gathered; rank 0 writes them) for export and evaluation, plus
  the training state as one torch.distributed.checkpoint folder (`sharded/`: every rank's
  parameter and optimizer shards, with their global offsets); --resume reads it on any number
  of ranks (>= 2), each rank just its rows.

Every algorithm runs sharded; PPO's critic is sharded the same way (`shard_value_model`), its
training state saved beside the policy's. Limits: a sharded checkpoint resumes only under
parallel fsdp (its optimizer state is per unfused matrix); the frozen reference model and
CAPO's judge stay whole on every rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from engine.model.fused_linear import unfuse_linears
from engine.rl.optim import LOW_PRECISION

def shard_policy(model: nn.Module, device: torch.device | str | None = None) -> list[FSDPModule]:
    """fully_shard every decoder layer and the root of `model` (in place); the FSDP modules,
    root last. `device`: where the shards live (default: where the model is). Load the model on
    the CPU and pass the training device: each fully_shard call moves one group's whole
    parameters there and keeps this rank's shard, so the device never holds more than one
    layer (or the root's embeddings) whole at a time."""
    return _shard(model, model, unshard_method="hidden_states", device=device)  # (the trainer's forward)


def shard_value_model(critic: nn.Module, device: torch.device | str | None = None) -> list[FSDPModule]:
    """PPO's critic (a transformer `body` and a value `head`) sharded as the policy is, with the
    critic itself as the root: its forward all-gathers the body's root group. The head is fp32
    while the body may be bf16, and an FSDP group holds one dtype: it is a group of its own."""
    return _shard(critic, critic.body, own_groups=[critic.head], device=device)


def _shard(root: nn.Module, transformer: nn.Module, unshard_method: str | None = None,
           own_groups: list[nn.Module] = (), device: torch.device | str | None = None) -> list[FSDPModule]:
    unfuse_linears(transformer)
    # the mesh on the shards' device type (not FSDP's default, CUDA whenever present); FSDP2
    # moves a group's parameters and buffers there when it shards the group
    device = torch.device(device) if device is not None else next(root.parameters()).device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    # Gradients are reduce-scattered in fp32 (a bf16 reduction rounds at every addition); the
    # parameters keep their dtype (no param_dtype cast).
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for module in [*transformer.model.layers, *own_groups]:
        fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    fully_shard(root, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    if unshard_method is not None:
        register_fsdp_forward_method(root, unshard_method)
    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_gradient_divide_factor(1.0)  # gradients summed over ranks, not averaged
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return modules


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded `module`, by name, on rank 0's CPU ({} on the other ranks):
    what rank 0 writes as a Hugging Face checkpoint. Collective: every rank calls it."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


# ---------------------------------------------------------------- sharded checkpoints (DCP)
# A checkpoint's training state is one torch.distributed.checkpoint folder: the policy's
# parameter shards ("model", by name) and the optimizer's state shards ("optimizer", by
# parameter name). DCP records every shard's global offsets, so the folder loads on any number
# of ranks: a run saved on 2 ranks resumes on 4 (or 3) and each rank reads just its rows. Every
# rank writes its own files: across nodes the run directory must be on a shared file system.

def _adamw_keys(p: torch.Tensor) -> set[str]:
    """The state engine.rl.optim.AdamW keeps for parameter `p`."""
    return {"step", "exp_avg", "exp_avg_sq"} | ({"compensation"} if p.dtype in LOW_PRECISION else set())


def _optimizer_templates(model: nn.Module, names: list[str]) -> dict[str, dict]:
    """Empty AdamW state for the parameters in `names`, sharded as the parameters are: what
    dcp.load fills in place (step is a scalar, the same on every rank)."""
    params = dict(model.named_parameters())
    return {name: {key: (torch.zeros((), dtype=torch.float32) if key == "step"
                         else torch.zeros_like(params[name], dtype=torch.float32))
                   for key in sorted(_adamw_keys(params[name]))}
            for name in names}


def save_sharded_state(model: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> dict:
    """Write the parameter and optimizer shards of every rank to `folder` (collective; DCP).
    Returns what the folder does not hold and loading needs (picklable, small): the optimizer's
    hyper-parameters and the names of the parameters that have optimizer state."""
    names = {p: n for n, p in model.named_parameters()}
    optimizer = {names[p]: dict(opt.state[p]) for g in opt.param_groups for p in g["params"] if opt.state[p]}
    params = dict(model.named_parameters())
    for name, state in optimizer.items():
        if set(state) != _adamw_keys(params[name]):
            raise RuntimeError(f"optimizer state of {name} has keys {sorted(state)}, not engine.rl.optim.AdamW's "
                               f"{sorted(_adamw_keys(params[name]))}")
    dcp.save({"model": {n: p.detach() for n, p in model.named_parameters()}, "optimizer": optimizer},
             checkpoint_id=str(folder))
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "optimizer_params": sorted(optimizer)}


@torch.no_grad()
def load_sharded_state(model: nn.Module, opt: torch.optim.Optimizer, folder: Path, meta: dict) -> None:
    """The inverse of save_sharded_state, on this run's sharding (any world size): the shards
    are read into the parameters in place (the Engine keeps reading the same storage) and the
    optimizer's state is replaced."""
    optimizer = _optimizer_templates(model, meta["optimizer_params"])
    dcp.load({"model": {n: p.detach() for n, p in model.named_parameters()}, "optimizer": optimizer},
             checkpoint_id=str(folder))
    if len(meta["param_groups"]) != len(opt.param_groups):
        raise RuntimeError(f"the checkpoint has {len(meta['param_groups'])} optimizer parameter groups, the "
                           f"optimizer {len(opt.param_groups)}")
    for group, saved in zip(opt.param_groups, meta["param_groups"]):
        group.update(saved)
    params = dict(model.named_parameters())
    opt.state.clear()
    for name, state in optimizer.items():
        opt.state[params[name]] = state
