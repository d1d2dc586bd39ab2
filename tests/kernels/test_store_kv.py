"""store_kv (Triton, interpreted on CPU) and its torch twin: writes into views of a KV pool.

The pool is a [layers, 2, slots, Hkv, D] tensor as the runtime allocates it; each test writes
into one layer's K and V views and checks the named rows against the input (cast to the pool
dtype) and every other element of the pool against its value before the call.
"""
from __future__ import annotations

import importlib

import pytest
import torch

sk = importlib.import_module("engine.kernels.store_kv")


def triton_device() -> str:
    """CPU under the interpreter, else the GPU (the compiled kernel at the same tiny shapes)."""
    if sk._INTERPRETED:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail("Triton on CPU tensors needs TRITON_INTERPRET=1 set before `engine.kernels` is imported")
    return "cuda"


def make_pool(dtype, device, layers=3, slots=40, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, slots, heads, dim, generator=g).to(dtype).to(device)


def expected_pool(pool, layer, k, v, slots):
    """The pool after the write, built element-wise by Python indexing (independent of both paths)."""
    out = pool.clone()
    for n, s in enumerate(slots.tolist()):
        out[layer, 0, s] = k[n].to(pool.dtype)
        out[layer, 1, s] = v[n].to(pool.dtype)
    return out


PUBLIC_AND_REFERENCE = {"public": lambda *a: sk.store_kv(*a), "reference": lambda *a: sk.store_kv_reference(*a)}


@pytest.mark.parametrize("path", sorted(PUBLIC_AND_REFERENCE))
@pytest.mark.parametrize(
    "index_dtype, in_dtype, cache_dtype",
    [
        (torch.int64, torch.float32, torch.float32),
        (torch.int32, torch.float32, torch.float16),  # cast on write
        (torch.int32, torch.float16, torch.float32),  # cast on write, the other way
        (torch.int64, torch.bfloat16, torch.bfloat16),
        (torch.int32, torch.bfloat16, torch.float32),
        # No fp32 -> bf16 here: the interpreter truncates that cast where torch and the GPU
        # round to nearest even; the GPU test below covers it.
    ],
)
def test_writes_named_rows_of_a_pool_view_only(path, index_dtype, in_dtype, cache_dtype):
    dev = triton_device()
    pool = make_pool(cache_dtype, dev)
    before = pool.clone()
    g = torch.Generator().manual_seed(1)
    n = 7
    slots = torch.randperm(pool.shape[2], generator=g)[:n].to(index_dtype).to(dev)
    # k, v as strided views of one fused projection output, as the model produces them.
    kv = torch.randn(n, 2, 2, 8, generator=g).to(in_dtype).to(dev)
    k, v = kv[:, 0], kv[:, 1]
    layer = 1
    PUBLIC_AND_REFERENCE[path](k, v, pool[layer, 0], pool[layer, 1], slots)
    want = expected_pool(before, layer, k, v, slots)
    assert torch.equal(pool, want)  # named rows hold the cast input; the rest is untouched
    assert not torch.equal(pool[layer], before[layer])  # the write did happen


@pytest.mark.parametrize("dim", [8, 12])  # 12: the kernel pads head_dim to a power of two and masks
def test_triton_matches_reference_bitwise(dim):
    dev = triton_device()
    pool_t, pool_r = make_pool(torch.float16, dev, dim=dim), make_pool(torch.float16, dev, dim=dim)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(9, 2, dim, generator=g).to(dev)
    v = torch.randn(9, 2, dim, generator=g).to(dev)
    slots = torch.randperm(40, generator=g)[:9].to(torch.int32).to(dev)
    sk._store_kv_triton(k, v, pool_t[2, 0], pool_t[2, 1], slots)
    sk.store_kv_reference(k, v, pool_r[2, 0], pool_r[2, 1], slots)
    assert torch.equal(pool_t, pool_r)


def test_empty_write_is_a_no_op():
    dev = triton_device()
    pool = make_pool(torch.float32, dev)
    before = pool.clone()
    empty = torch.empty(0, 2, 8, device=dev)
    sk.store_kv(empty, empty, pool[0, 0], pool[0, 1], torch.empty(0, dtype=torch.int64, device=dev))
    assert torch.equal(pool, before)


def test_unvalidated_out_of_range_slot_is_skipped_not_written():
    """The kernel's guard for validate=False on CUDA: a bad slot writes nothing, the others land."""
    dev = triton_device()
    pool = make_pool(torch.float32, dev)
    before = pool.clone()
    k = torch.randn(3, 2, 8).to(dev)
    slots = torch.tensor([4, 40, 9], device=dev)  # 40 == num_slots: out of range
    sk._store_kv_triton(k, 2 * k, pool[1, 0], pool[1, 1], slots)
    want = expected_pool(before, 1, k[[0, 2]], 2 * k[[0, 2]], torch.tensor([4, 9]))
    assert torch.equal(pool, want)


def test_cpu_tensors_without_the_interpreter_take_the_torch_path(monkeypatch):
    monkeypatch.setattr(sk, "_INTERPRETED", False)
    monkeypatch.setattr(sk, "_store_kv_triton", None)  # calling it would raise TypeError
    pool = make_pool(torch.float16, "cpu")
    before = pool.clone()
    k = torch.randn(4, 2, 8)
    slots = torch.tensor([0, 39, 3, 17], dtype=torch.int32)
    sk.store_kv(k, -k, pool[2, 0], pool[2, 1], slots)
    assert torch.equal(pool, expected_pool(before, 2, k, -k, slots))


# --------------------------------------------------------------------------- bad input


def _valid():
    pool = make_pool(torch.float32, "cpu")
    k = torch.randn(3, 2, 8)
    return dict(k=k, v=k.clone(), k_cache=pool[0, 0], v_cache=pool[0, 1], slot_mapping=torch.tensor([1, 5, 7]))


BAD = [
    ("k", lambda a: a["k"][0], "k must be \\[N, num_kv_heads, head_dim\\]"),
    ("v", lambda a: a["v"][:2], "v must have k's shape"),
    ("k_cache", lambda a: a["k_cache"][:, :1], "k_cache must be \\[num_slots, num_kv_heads=2, head_dim=8\\]"),
    ("v_cache", lambda a: a["v_cache"][:20], "v_cache must have k_cache's shape"),
    ("slot_mapping", lambda a: a["slot_mapping"][:2], "slot_mapping must be \\[N=3\\]"),
    ("slot_mapping", lambda a: a["slot_mapping"].float(), "slot_mapping must be int32 or int64"),
    ("v", lambda a: a["v"].half(), "k and v must share a dtype"),
    ("k", lambda a: a["k"].long(), "k and v must share a dtype"),
    ("v_cache", lambda a: a["v_cache"].half(), "k_cache and v_cache must share a dtype"),
    ("slot_mapping", lambda a: a["slot_mapping"].to("meta"), "must share a device"),
    ("slot_mapping", lambda a: torch.tensor([1, 40, 7]), "slots in \\[0, num_slots=40\\); got 40 at index 1"),
    ("slot_mapping", lambda a: torch.tensor([1, -1, 7]), "got -1 at index 1"),
    ("slot_mapping", lambda a: torch.tensor([5, 1, 5]), "distinct slots"),
    ("k", lambda a: [1.0], "k must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [sk.store_kv, sk.store_kv_reference], ids=["public", "reference"])
@pytest.mark.parametrize("name, mutate, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_value_error_and_writes_nothing(fn, name, mutate, match):
    args = _valid()
    pool_before = args["k_cache"].clone(), args["v_cache"].clone()
    args[name] = mutate(args)
    caches = args["k_cache"], args["v_cache"]
    with pytest.raises(ValueError, match=match):
        fn(**args)
    if name not in ("k_cache", "v_cache"):
        assert torch.equal(caches[0], pool_before[0]) and torch.equal(caches[1], pool_before[1])


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_shape_matches_reference(in_dtype):
    """A 2048-token prefill chunk of a 8-KV-head, head_dim-128 model into a bf16 pool."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(4, 2, 8192, 8, 128, generator=g).to(torch.bfloat16).cuda()
    want = pool.clone()
    qkv = torch.randn(2048, 48, 128, generator=g).to(in_dtype).cuda()  # q | k | v heads of one projection
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    slots = torch.randperm(8192, generator=g)[:2048].int().cuda()
    sk.store_kv(k, v, pool[3, 0], pool[3, 1], slots, validate=True)
    sk.store_kv_reference(k, v, want[3, 0], want[3, 1], slots)
    torch.cuda.synchronize()
    assert torch.equal(pool, want)
