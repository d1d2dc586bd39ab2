"""Write the K/V of a step's new tokens into the paged KV pool.

    k_cache[slot_mapping[n]] = k[n].to(k_cache.dtype)      # and the same for v
    k, v            [N, Hkv, D]   any float dtype, any strides
    k_cache/v_cache [S, Hkv, D]   one layer's half of the pool, e.g. the view pool.kv[layer, 0]
    slot_mapping    [N]           int32 or int64, distinct slots in [0, S)

The runtime calls this once per layer before the attention kernels read the cache (extend
and decode attention both expect the current tokens' K/V to be in the pool already).

Triton (`_store_kv_kernel`): a grid of (token block x KV head) programs; each copies a
[BLOCK_N, head_dim] tile of k and the same tile of v into the cache rows named by the slots,
casting to the cache dtype on the store. Every stride is a kernel argument, so the views of the
[layers, 2, slots, Hkv, D] pool need no copy. Pure data movement: memory-bound, one read and
one write per element.

Values (slot range, distinct slots) are checked on the host where that is free: for CPU tensors
and on the torch path always, for CUDA tensors on the Triton path only with `validate=True` (a
check there needs a device sync, which would stall the launch queue every layer and break
CUDA-graph capture). Unchecked out-of-range slots are skipped by the kernel's mask, never
written out of bounds.

`store_kv` dispatches to Triton for CUDA tensors, or for any tensors when TRITON_INTERPRET=1 was
set before this module was imported, and to `store_kv_reference` (index assignment) otherwise.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: without it every call takes the reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Fixed when the kernel below is defined: interpreter kernels run on CPU tensors.
_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- validation


def _check_inputs(k, v, k_cache, v_cache, slot_mapping, validate: bool) -> None:
    """Raise ValueError naming the offending value and the expectation; slot values only if `validate`."""
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if k.dim() != 3:
        raise ValueError(f"k must be [N, num_kv_heads, head_dim]; got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    n, h, d = k.shape
    if k_cache.dim() != 3 or tuple(k_cache.shape[1:]) != (h, d):
        raise ValueError(
            f"k_cache must be [num_slots, num_kv_heads={h}, head_dim={d}]; got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}")
    if slot_mapping.shape != (n,):
        raise ValueError(f"slot_mapping must be [N={n}]; got shape {tuple(slot_mapping.shape)}")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(
            "k, v, k_cache, v_cache and slot_mapping must share a device; got "
            f"{k.device}, {v.device}, {k_cache.device}, {v_cache.device}, {slot_mapping.device}"
        )
    if k.dtype not in _FLOAT_DTYPES or v.dtype != k.dtype:
        raise ValueError(f"k and v must share a dtype among float32/bfloat16/float16; got {k.dtype}, {v.dtype}")
    if k_cache.dtype not in _FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must share a dtype among float32/bfloat16/float16; got {k_cache.dtype}, {v_cache.dtype}"
        )
    if slot_mapping.dtype not in _INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be int32 or int64; got {slot_mapping.dtype}")
    if validate:
        _check_slot_values(slot_mapping, k_cache.shape[0])


def _check_slot_values(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Slots in [0, num_slots) and distinct (host reads: a device sync on CUDA)."""
    n = slot_mapping.shape[0]
    if n:
        bad = (slot_mapping < 0) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"slot_mapping must hold slots in [0, num_slots={num_slots}); got {int(slot_mapping[i])} at index {i}"
            )
        if torch.unique(slot_mapping).numel() != n:
            raise ValueError("slot_mapping must hold distinct slots (two tokens written to one slot)")


# --------------------------------------------------------------------------- reference twin


def store_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = False,
) -> None:
    """Plain-torch twin of `store_kv`: same arguments, effect and errors.

    It checks the slot values whatever `validate` says (torch indexing would raise otherwise).
    """
    _check_inputs(k, v, k_cache, v_cache, slot_mapping, validate=True)
    _store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def _store_kv_torch(k, v, k_cache, v_cache, slot_mapping) -> None:
    idx = slot_mapping.long()
    k_cache[idx] = k.to(k_cache.dtype)  # index assignment writes through views of the pool
    v_cache[idx] = v.to(v_cache.dtype)


# --------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, N, num_slots,
                         s_kn, s_kh, s_kd, s_vn, s_vh, s_vd,
                         s_kcs, s_kch, s_kcd, s_vcs, s_vch, s_vcd,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Copy the [BLOCK_N tokens, head_dim] tile of one head of k and v into their slots."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        head = tl.program_id(1).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)  # contiguous along head_dim: vectorised loads and stores
        row_ok = rows < N
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        # Validated slots are always in range; the range test only keeps unvalidated ones in bounds.
        ok = (row_ok & (slot >= 0) & (slot < num_slots))[:, None] & (dims < HEAD_DIM)[None, :]
        r = rows.to(tl.int64)[:, None]
        k = tl.load(k_ptr + r * s_kn + head * s_kh + dims[None, :] * s_kd, mask=ok)
        v = tl.load(v_ptr + r * s_vn + head * s_vh + dims[None, :] * s_vd, mask=ok)
        dst_k = kc_ptr + slot[:, None] * s_kcs + head * s_kch + dims[None, :] * s_kcd
        dst_v = vc_ptr + slot[:, None] * s_vcs + head * s_vch + dims[None, :] * s_vcd
        tl.store(dst_k, k.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(dst_v, v.to(vc_ptr.dtype.element_ty), mask=ok)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _store_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    n, h, d = k.shape
    block_d = triton.next_power_of_2(d)
    if k.is_cuda and not _INTERPRETED:
        block_n = max(1, 4096 // block_d)  # ~4K elements per tile: 32 per thread at 4 warps
        warps = 4
    else:  # the interpreter: as few programs as possible
        block_n = min(triton.next_power_of_2(n), 64)
        warps = 1
    with _on(k.device):
        _store_kv_kernel[(triton.cdiv(n, block_n), h)](
            k, v, k_cache, v_cache, slot_mapping, n, k_cache.shape[0],
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
            HEAD_DIM=d, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
        )


# --------------------------------------------------------------------------- public op


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = False,
) -> None:
    """Write k/v [N, Hkv, D] into rows `slot_mapping` of k_cache/v_cache [S, Hkv, D], in place.

    Casts to the cache dtype. The caches may be strided views (pool.kv[layer, 0]); only their
    rows named by slot_mapping change. Shapes, dtypes and devices are always checked; slot
    values (in [0, S), distinct) for CPU tensors, on the torch path, and when `validate` is
    True (a device sync on CUDA). Bad input raises ValueError.
    """
    _check_inputs(k, v, k_cache, v_cache, slot_mapping, validate=False)
    use_triton = triton is not None and (k.is_cuda or _INTERPRETED)
    if validate or not k.is_cuda or not use_triton:  # free on the CPU; the torch path needs them valid
        _check_slot_values(slot_mapping, k_cache.shape[0])
    if k.shape[0] == 0:
        return
    if use_triton:
        _store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        _store_kv_torch(k, v, k_cache, v_cache, slot_mapping)
