"""One matmul for several Linear layers of one input, with Hugging Face names kept.

Attention's q/k/v projections and the MLP's gate/up projections read the same input. A
module that mixes in `FusedLinears` and lists such groups (`fused_groups = (("q_proj",
"k_proj", "v_proj"),)`) keeps its ordinary `nn.Linear` children, so `named_parameters()`,
`state_dict()`, checkpoints and optimizers see exactly the HF names and tensors, but

    invariant: the weights of a group's Linears are adjacent row blocks of ONE contiguous
    [sum(out), in] storage (their biases likewise, of one [sum(out)] storage), in group order,

so `fused_linear(x, group)` computes all outputs with one F.linear over that storage. The
Linears' parameters are ordinary leaf nn.Parameters that happen to be views of it: an
optimizer step, `load_state_dict` or `init_weights` writing into q_proj.weight in place
writes into the fused storage, and the next fused matmul sees it. Gradients go to the
HF-named parameters through `_FusedLinearFn` (one matmul for the weight gradient too).

What would split the storage, and how it is restored (values kept, Parameter objects kept,
so optimizers and the Engine still hold the right tensors):
- `model.to(...)`, `.half()`, `.cuda()`, `to_empty(...)`: nn.Module._apply converts each
  parameter on its own; `FusedLinears._apply` re-fuses afterwards.
- `load_state_dict(..., assign=True)` installs the state dict's tensors; a load post-hook
  re-fuses (checkpoint.load_model pre-fuses the loaded tensors, so that costs no copy).
- anything else (deepcopy, pickling, `p.data = t`): every fused forward checks the
  parameters' data pointers against the ones recorded at fusion (a few integer compares)
  and re-fuses when they differ. Re-fusing allocates new storage, so `data_ptr()`s change
  (the CUDA-graph runner compares them and recaptures).

A state dict's tensors are views of the fused storage, one per HF name; safetensors writes
non-overlapping views of one storage as separate tensors (only their own bytes), so
checkpoints are unchanged.

`unfuse_linears(model)` turns fusion off for good (each parameter gets its own storage and
`fused_linear` runs one matmul per Linear): for wrappers that replace each parameter on its own,
such as FSDP2's `fully_shard`, which would break the shared storage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import MutableMapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class _Fused:
    """A group's fused storage and where its parameters lived when it was built."""
    weight: torch.Tensor  # [sum(out), in]; the group's weights are its row blocks
    bias: torch.Tensor | None  # [sum(out)] or None when the Linears have no bias
    ptrs: tuple[int, ...]  # data_ptr() of every weight, then every bias, at fusion


def _params(linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """The group's weights, then its biases (when they have some)."""
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("a fused group's Linears must all have a bias or all have none")
    return weights + ([b for b in biases] if biases[0] is not None else [])


def _concat_into_new_storage(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """cat along dim 0 into one fresh contiguous tensor (works on the meta device too)."""
    first = tensors[0]
    out = torch.empty((sum(t.shape[0] for t in tensors), *first.shape[1:]), dtype=first.dtype, device=first.device)
    if first.device.type != "meta":
        torch.cat([t.detach() for t in tensors], dim=0, out=out)
    return out


def _adjacent_base(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The [sum(rows), ...] tensor of which `tensors` are consecutive row blocks, or None.

    Contiguous blocks, one storage, each starting where the previous one ends (what
    `prefuse_state_dict` or an earlier fusion leaves). Never true on the meta device.
    """
    first = tensors[0]
    if first.device.type == "meta":
        return None
    base, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t.dtype != first.dtype or t.shape[1:] != first.shape[1:] or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != base or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), (*first.stride(),) if first.dim() else (),
                                     first.storage_offset())


def _fuse_tensors(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One storage for `params`: adopted if they already are its adjacent row blocks, else a
    new one they are copied into and re-pointed at (`p.data = view`: same Parameter objects)."""
    base = _adjacent_base(params)
    if base is None:
        base = _concat_into_new_storage(params)
        for p, view in zip(params, base.split([q.shape[0] for q in params])):
            p.data = view
    return base


def fuse(linears: Sequence[nn.Linear]) -> _Fused:
    """Give the group's weights one storage (and its biases another); returns the record."""
    weights = [m.weight for m in linears]
    kinds = {(w.dtype, w.device, w.shape[1]) for w in weights}
    if len(kinds) != 1:
        raise ValueError(f"a fused group's weights must share dtype, device and in_features; got {sorted(map(str, kinds))}")
    params = _params(linears)
    n = len(linears)
    fused_w = _fuse_tensors(params[:n])
    fused_b = _fuse_tensors(params[n:]) if len(params) > n else None
    return _Fused(fused_w, fused_b, tuple(p.data_ptr() for p in params))


def _intact(fused: _Fused | None, params: Sequence[torch.Tensor]) -> bool:
    """True if every parameter is still the row block of `fused` it was made.

    The record keeps the fused storage alive, so no other tensor can start at a recorded
    address: equal pointers mean the same views (meta tensors all have pointer 0, and a
    meta group has nothing to compute, so it passes).
    """
    return fused is not None and len(params) == len(fused.ptrs) and all(
        p.data_ptr() == ptr for p, ptr in zip(params, fused.ptrs))


class _FusedLinearFn(torch.autograd.Function):
    """y = x @ W^T + b over the fused storage, with gradients to the HF-named parameters.

    forward(x, weight, bias, n, *params): weight/bias are the fused storage (not tracked);
    params are the group's n weights then biases, passed only so autograd routes their
    gradients (they alias weight/bias). Backward makes one matmul for the whole weight
    gradient and hands each parameter its row block.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.rows = [p.shape[0] for p in params[:n]]
        ctx.has_bias = bias is not None
        # The storage is not an autograd input, so an in-place update of a parameter between
        # this forward and the backward would go unnoticed: check its version counter there.
        ctx.params_versions = [p._version for p in params]
        ctx.param_refs = params
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        for p, v in zip(ctx.param_refs, ctx.params_versions):
            if p._version != v:
                raise RuntimeError(
                    "a parameter of a fused linear group was modified in place between the forward and the "
                    f"backward (version {v} -> {p._version}); run the optimizer step after backward()")
        needs = ctx.needs_input_grad
        grad_x = grad @ weight if needs[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        n = len(ctx.rows)
        grads: list[torch.Tensor | None] = [None] * len(ctx.param_refs)
        if any(needs[4: 4 + n]):
            grads[:n] = (g2.t() @ x.reshape(-1, x.shape[-1])).split(ctx.rows)
        if ctx.has_bias and any(needs[4 + n:]):
            grads[n:] = g2.sum(0).split(ctx.rows)
        return (grad_x, None, None, None, *grads)


class FusedLinears(nn.Module):
    """Mixin for a module whose `fused_groups` name child Linears that share an input.

    Call `self.fuse_linears()` at the end of `__init__` (after the children exist) and
    `self.fused_linear(x, i)` in `forward`; see the module docstring for the invariant.
    """

    fused_groups: tuple[tuple[str, ...], ...] = ()

    def fuse_linears(self) -> None:
        """(Re-)build the fused storage of every group whose parameters do not share one."""
        if getattr(self, "_unfused", False):
            return
        if not hasattr(self, "_fused"):
            self._fused: list[_Fused | None] = [None] * len(self.fused_groups)
            self.register_load_state_dict_post_hook(_fuse_after_load)
        for i, names in enumerate(self.fused_groups):
            linears = [getattr(self, name) for name in names]
            if not _intact(self._fused[i], _params(linears)):
                self._fused[i] = fuse(linears)

    def fused_linear(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """[..., in] -> [..., sum(out)]: every Linear of group `group` in one matmul, outputs in order."""
        linears = [getattr(self, name) for name in self.fused_groups[group]]
        if getattr(self, "_unfused", False):
            return torch.cat([F.linear(x, m.weight, m.bias) for m in linears], dim=-1)
        params = _params(linears)
        fused = self._fused[group]
        if not _intact(fused, params):
            self.fuse_linears()
            fused = self._fused[group]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _FusedLinearFn.apply(x, fused.weight, fused.bias, len(linears), *params)
        return F.linear(x, fused.weight, fused.bias)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module._apply converts each parameter separately (new storage per tensor):
        # gather them into one storage per group again, values and Parameter objects kept.
        if recurse:
            self._fused = [None] * len(self.fused_groups)  # let the old storage go once converted
        super()._apply(fn, recurse)
        if recurse:
            self.fuse_linears()
        return self


def unfuse_linears(model: nn.Module) -> None:
    """Turn fusion off in every FusedLinears module of `model`: each parameter gets its own
    storage (same Parameter objects, values kept) and is used by its own matmul from now on."""
    for module in model.modules():
        if isinstance(module, FusedLinears):
            module._unfused = True
            module._fused = [None] * len(module.fused_groups)
            for names in module.fused_groups:
                for p in _params([getattr(module, n) for n in names]):
                    p.data = p.data.clone()


def _fuse_after_load(module: FusedLinears, incompatible_keys) -> None:
    """load_state_dict post-hook: `assign=True` installs separate tensors; fuse them (a module-level
    function, not a lambda, so the module still pickles)."""
    module.fuse_linears()


def fused_parameter_names(model: nn.Module) -> list[list[str]]:
    """Fully qualified parameter names of every fused group of `model`, weights then biases."""
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, FusedLinears):
            for names in module.fused_groups:
                linears = [getattr(module, n) for n in names]
                dot = f"{prefix}." if prefix else ""
                attrs = ("weight", "bias") if linears[0].bias is not None else ("weight",)
                for attr in attrs:
                    out.append([f"{dot}{n}.{attr}" for n in names])
    return out


def prefuse_state_dict(model: nn.Module, state: MutableMapping[str, torch.Tensor]) -> None:
    """Replace each fused group's tensors in `state` by row blocks of one new tensor, in place.

    `load_state_dict(state, assign=True)` then installs views that already share storage, so
    no second copy is made; each group's separate tensors are dropped from `state` as it is
    built, keeping peak memory near one copy of the weights. Groups whose tensors are absent,
    or differ in dtype or device, are left as they are (the load post-hook fuses them).
    """
    for names in fused_parameter_names(model):
        tensors = [state.get(n) for n in names]
        if any(t is None for t in tensors) or len({(t.dtype, t.device, t.shape[1:]) for t in tensors}) != 1:
            continue
        fused = _concat_into_new_storage(tensors)
        del tensors
        for name, view in zip(names, fused.split([state[n].shape[0] for n in names])):
            state[name] = view
