"""Ahead-of-time compilation of the Triton kernels for CUDA targets, on a machine without a GPU.

Triton's compiler and its bundled ptxas run on any Linux CPU: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` returns an H100 cubin (80: A100). This module compiles every
launched kernel of `engine.kernels` with the tiles its launcher picks on CUDA, at the shapes of real
models, and reads what each costs: registers, spilled bytes, shared memory.

How a launch is reproduced (no hand-written signatures):

1. A *scenario* is one public op at one model shape on one target (`Scenario`, e.g. decode
   attention, bf16, head_dim 128, 4 query heads per KV head, page size 16, sm_90). Its driver
   calls the op's own Triton launcher (`_decode_triton`, `_extend_triton`, ...) with meta
   tensors laid out as the runtime lays them out and with the launcher's own CUDA tile config
   (`_default_config(..., device=cuda)`), while the kernel objects are replaced by recorders:
   every `kernel[grid](*args, **kwargs)` the launcher makes is captured, not run.
2. Each captured launch goes through the JIT's own argument binder for the target, exactly as
   a launch on a GPU would: pointers as 16-byte aligned, integers specialised (== 1 becomes a
   constant, multiples of 16 get the divisibility hint), constexprs and num_warps/num_stages
   from the keyword arguments. That yields `ASTSource(fn, signature, constexprs, attrs)`.
3. Identical compiles (same kernel, specialisation, options, target) are done once, in
   parallel worker processes; each cubin is read with the bundled `cuobjdump`:
   `--dump-resource-usage` for registers, stack frame and static shared memory, and the SASS
   for spills (bytes of STL/LDL local stores/loads, which equal ptxas' "spill stores/loads").
   When the compile was not a Triton cache hit, ptxas' own `-v` report is captured too and
   must agree (registers and spill bytes). Shared memory is the dynamic size Triton launches
   with (`metadata.shared`) plus the cubin's static size, against the per-block opt-in maximum
   of the target (the CUDA driver allows dynamic <= opt-in - static).

The kernels read TRITON_INTERPRET when they are defined, and interpreted kernels cannot be
compiled; the compiles therefore run in a child process without it: `run_scenarios` (used by
tests/kernels/test_aot_compile.py and bench/compile_report.py) starts `python -m engine.kernels.aot`,
which prints one JSON result per scenario as it finishes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch


@dataclass(frozen=True)
class Arch:
    """A CUDA target: compute capability and the per-block shared memory opt-in maximum."""
    capability: int
    max_shared: int  # bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin
    gpu: str
    sm_count: int  # for the launchers' split heuristics (runtime values, not code)


ARCHS: dict[str, Arch] = {
    "sm80": Arch(80, 163 * 1024, "A100", 108),
    "sm90": Arch(90, 227 * 1024, "H100", 132),
}
HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)  # query heads per KV head (1: MHA)
PAGE_SIZES = (16, 32)
DTYPES = ("bfloat16", "float32")
NUM_KV_HEADS = 8
HIDDEN_SIZES = (1536, 2048)  # the presets' models: Qwen2.5-1.5B, Llama-1.1B
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Op -> (model axes that change its code, what it runs). Axes an op lacks are runtime
# arguments of its kernels (e.g. the GQA group and page size of extend attention), so the
# code does not depend on them. Variants of one kernel are separate ops so that each
# scenario's label says what it compiles.
OPS: dict[str, tuple[tuple[str, ...], str]] = {
    "decode": (("head_dim", "group", "page_size"), "one split: stage 1 writes the output in q's dtype, no merge"),
    "decode_split": (("head_dim", "group", "page_size"), "64 splits into the fp32 workspace, then the split merge"),
    "decode_window": (("head_dim", "group", "page_size"), "sliding window (4096), 64 splits, then the split merge"),
    "shared_prefix": (("head_dim", "group", "page_size"),
                      "prefix + suffix (kv_starts) splits, 64 each, then the merge"),
    "extend": (("head_dim",), "prefill chunk of 2048 tokens (the launcher's full BLOCK_M)"),
    "extend_window": (("head_dim",), "the same with a sliding window (4096)"),
    "extend_short": (("head_dim",), "prefill chunk of 16 tokens (the launcher shrinks BLOCK_M)"),
    "store_kv": (("head_dim",), "new tokens' K/V into the pool"),
    "rmsnorm": (("hidden",), "RMSNorm of 504 rows (the first input norm of a wide RL decode step)"),
    "rmsnorm_add": (("hidden",), "residual add + RMSNorm of 504 rows (twice per decoder layer)"),
    "merge_states": (("head_dim",), "public two-state merge"),
    "logprobs": ((), "fused LM-head log-probs, forward + backward (N 16384, d 2048, V 151936)"),
    "logprobs_entropy": ((), "the same with entropy"),
}


@dataclass(frozen=True)
class Scenario:
    """One op at one model shape, dtype and target: the unit a test or table row names."""
    op: str
    arch: str
    dtype: str = "bfloat16"
    head_dim: int | None = None
    group: int | None = None
    page_size: int | None = None
    hidden: int | None = None

    @property
    def label(self) -> str:
        """Readable id, e.g. 'sm90-decode-bf16-d128-g4-p16'."""
        parts = [self.arch, self.op, DTYPE_SHORT[self.dtype]]
        for prefix, value in (("d", self.head_dim), ("g", self.group), ("p", self.page_size), ("h", self.hidden)):
            if value is not None:
                parts.append(f"{prefix}{value}")
        return "-".join(parts)

    @classmethod
    def from_label(cls, label: str) -> Scenario:
        """Inverse of `label`."""
        arch, op, dtype, *rest = label.split("-")
        dtypes = {v: k for k, v in DTYPE_SHORT.items()}
        axes = {"d": "head_dim", "g": "group", "p": "page_size", "h": "hidden"}
        return cls(op, arch, dtypes[dtype], **{axes[r[0]]: int(r[1:]) for r in rest})


def full_matrix(archs: Iterable[str] = tuple(ARCHS), dtypes: Iterable[str] = DTYPES,
                ops: Iterable[str] = tuple(OPS)) -> list[Scenario]:
    """Every op x target x dtype x the model axes that change the op's code."""
    values = {"head_dim": HEAD_DIMS, "group": GROUPS, "page_size": PAGE_SIZES, "hidden": HIDDEN_SIZES}
    out = []
    for arch, dtype, op in itertools.product(archs, dtypes, ops):
        axes = OPS[op][0]
        for combo in itertools.product(*(values[a] for a in axes)):
            out.append(Scenario(op, arch, dtype, **dict(zip(axes, combo))))
    return out


# --------------------------------------------------------------------------- capturing launches


@dataclass
class Launch:
    """One `kernel[grid](*args, **kwargs)` call, tensors replaced by their dtype."""
    module: str
    name: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JIT kernel object: records launches instead of running them."""

    def __init__(self, module: str, name: str, sink: list[Launch]):
        self.module, self.name, self.sink = module, name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.jit import MockTensor  # dtype only; data_ptr 0 = 16-byte aligned

            args = tuple(MockTensor(a.dtype) if isinstance(a, (torch.Tensor, _CudaLike)) else a for a in args)
            self.sink.append(Launch(self.module, self.name, args, dict(kwargs)))
        return launch


class _CudaLike:
    """A meta tensor that says it is on CUDA (for launchers that pick tiles from `t.is_cuda`)."""

    def __init__(self, t: torch.Tensor):
        self._t = t
        self.is_cuda = True
        self.device = torch.device("cuda")

    def __getattr__(self, name):
        return getattr(self._t, name)


# The folder that holds the `engine` package: the child's working directory and first sys.path
# entry, so it imports this very tree with or without an installed copy (make gpu-check installs none).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

KERNELS = {  # module -> its Triton kernels (every one some launcher starts)
    "engine.kernels.decode_attention": ("_decode_split_kernel",),
    "engine.kernels.shared_prefix_attention": ("_prefix_kernel",),
    "engine.kernels.merge_states": ("_merge_two_kernel", "_merge_splits_kernel"),
    "engine.kernels.extend_attention": ("_extend_kernel",),
    "engine.kernels.store_kv": ("_store_kv_kernel",),
    "engine.kernels.rmsnorm": ("_rms_norm_kernel",),
    "engine.kernels.fused_logprobs": ("_fwd_kernel", "_dlogits_kernel"),
}
CUDA = torch.device("cuda")


@contextlib.contextmanager
def _recording(arch: Arch) -> Iterator[list[Launch]]:
    """Kernels replaced by recorders; CUDA device queries answered for `arch` without a GPU."""
    sink: list[Launch] = []
    # The launchers pick tiles by compute capability (major) and size splits by SM count.
    props = types.SimpleNamespace(multi_processor_count=arch.sm_count, major=arch.capability // 10,
                                  minor=arch.capability % 10)
    with contextlib.ExitStack() as stack:
        for module_name, names in KERNELS.items():
            module = importlib.import_module(module_name)
            if getattr(module, "_INTERPRETED", False):
                raise RuntimeError("kernels were imported with TRITON_INTERPRET=1: interpreted kernels do not compile")
            for name in names:
                stack.enter_context(mock.patch.object(module, name, _Recorder(module_name, name, sink)))
            if hasattr(module, "_on"):
                stack.enter_context(mock.patch.object(module, "_on", lambda device: contextlib.nullcontext()))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_capability",
                                              lambda *a, **k: (props.major, props.minor)))
        yield sink


def _paged(s: Scenario, batch: int = 32, max_pages: int = 256, num_pages: int = 4096):
    """Meta q [B, Hq, D], one layer's K/V views of a [layers, 2, slots, Hkv, D] pool, page table, lengths."""
    dtype = getattr(torch, s.dtype)
    hq, d = s.group * NUM_KV_HEADS, s.head_dim
    q = torch.empty(batch, hq, d, dtype=dtype, device="meta")
    pool = torch.empty(2, 2, num_pages * s.page_size, NUM_KV_HEADS, d, dtype=dtype, device="meta")
    table = torch.empty(batch, max_pages, dtype=torch.int32, device="meta")
    lens = torch.empty(batch, dtype=torch.int32, device="meta")
    return q, pool[1, 0], pool[1, 1], table, lens


def _drive(s: Scenario) -> None:
    """Run the launcher(s) of scenario `s` (inside `_recording`)."""
    # importlib: `engine.kernels` exports functions named like their modules.
    da, ea, fl, ms, sp, sk = (importlib.import_module(f"engine.kernels.{m}") for m in (
        "decode_attention", "extend_attention", "fused_logprobs", "merge_states", "shared_prefix_attention",
        "store_kv"))

    dtype = getattr(torch, s.dtype)
    scale = (s.head_dim or 1) ** -0.5
    if s.op in ("decode", "decode_split", "decode_window"):
        q, kc, vc, table, lens = _paged(s)
        splits = 1 if s.op == "decode" else 64  # 64: the heuristic's maximum (largest BLOCK_S)
        window = 4096 if s.op == "decode_window" else None
        da._decode_triton(q, kc, vc, table, lens, s.page_size, scale, None, window, splits,
                          da._default_config(CUDA, dtype, s.head_dim))
    elif s.op == "shared_prefix":
        q, kc, vc, table, lens = _paged(s)
        segments = torch.empty(31, 5, dtype=torch.int32, device="meta")  # at most B - 1 shared ranges
        suffix = torch.empty(q.shape[0], dtype=torch.int32, device="meta")
        sp._cascade_triton(q, kc, vc, table, lens, s.page_size, scale, segments, suffix, 8, 64, 64,  # 8 levels
                           sp._default_config(CUDA, dtype, s.head_dim),
                           sp._prefix_config(CUDA, dtype, s.head_dim))
    elif s.op in ("extend", "extend_window", "extend_short"):
        group, page_size, batch = 4, 16, 4  # runtime arguments of the kernel: any value compiles the same
        max_q = 16 if s.op == "extend_short" else 2048
        q, kc, vc, table, lens = _paged(dataclasses.replace(s, group=group, page_size=page_size), batch)
        q = torch.empty(batch * max_q, group * NUM_KV_HEADS, s.head_dim, dtype=dtype, device="meta")
        cu = torch.empty(batch + 1, dtype=torch.int32, device="meta")
        window = 4096 if s.op == "extend_window" else None
        ea._extend_triton(q, kc, vc, table, cu, lens, page_size, scale, window, max_q,
                          ea._default_config(max_q, s.head_dim, dtype, CUDA))
    elif s.op == "store_kv":
        n = 2048
        k = torch.empty(n, NUM_KV_HEADS, s.head_dim, dtype=dtype, device="meta")
        _, kc, vc, _, _ = _paged(dataclasses.replace(s, group=1, page_size=16))
        slots = torch.empty(n, dtype=torch.int64, device="meta")
        sk._store_kv_triton(_CudaLike(k), _CudaLike(k), _CudaLike(kc), _CudaLike(vc), _CudaLike(slots))
    elif s.op in ("rmsnorm", "rmsnorm_add"):
        rn = importlib.import_module("engine.kernels.rmsnorm")
        rows = 504  # an RL decode step: K=9 rollouts of ~56 states
        x = torch.empty(rows, s.hidden, dtype=dtype, device="meta")
        weight = torch.empty(s.hidden, dtype=dtype, device="meta")
        residual = x if s.op == "rmsnorm_add" else None
        rn._rms_norm_triton(x, residual, weight, 1e-6, rn._tiles(rows, s.hidden, CUDA))
    elif s.op == "merge_states":
        o = torch.empty(32, 32, s.head_dim, dtype=dtype, device="meta")
        lse = torch.empty(32, 32, dtype=torch.float32, device="meta")
        ms._merge_two_triton(o, lse, o, lse)
    elif s.op in ("logprobs", "logprobs_entropy"):
        n, d, vocab = 16384, 2048, 151936
        entropy = s.op == "logprobs_entropy"
        hidden = torch.empty(n, d, dtype=dtype, device="meta")
        weight = torch.empty(vocab, d, dtype=dtype, device="meta")
        targets = torch.empty(n, dtype=torch.int64, device="meta")
        ctx = types.SimpleNamespace(needs_input_grad=(True, True, False, False, False, False),
                                    set_materialize_grads=lambda _: None)
        ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
        cfg = fl._default_config(n, vocab, dtype, CUDA)
        fl._TritonFn.forward(ctx, hidden, weight, targets, 0.6, entropy, cfg)
        grad = torch.empty(n, dtype=torch.float32, device="meta")
        fl._TritonFn.backward(ctx, grad, grad if entropy else None)
    else:
        raise ValueError(f"unknown op {s.op!r}; known: {sorted(OPS)}")


def capture(s: Scenario) -> list[Launch]:
    """The kernel launches scenario `s` makes on `s.arch`, in order (nothing is compiled or run)."""
    with _recording(ARCHS[s.arch]) as sink:
        _drive(s)
    if not sink:
        raise RuntimeError(f"{s.label}: the launcher started no kernel")
    return sink


# --------------------------------------------------------------------------- specialise and compile


@dataclass(frozen=True)
class Job:
    """One compile: what `JITFunction.run` would hand to `triton.compile` on the target."""
    module: str
    name: str
    arch: str
    signature: tuple  # ((arg name, type), ...)
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, attr list as JSON), ...)
    options: tuple  # (("num_warps", 4), ...): the options passed at launch

    @property
    def config(self) -> str:
        """Pointer dtypes, constexprs (flags by name when set) and launch options,
        e.g. 'bf16,i32,fp32 HEAD_DIM=128 GROUP=4 BLOCK_N=64 HAS_WINDOW w4 s3'."""
        ptrs = []
        for _, ty in self.signature:
            if ty.startswith("*") and ty[1:] not in ptrs:
                ptrs.append(ty[1:])
        arg_names = [n for n, _ in self.signature]
        consts = []
        for path, value in self.constexprs:
            name = arg_names[path[0]]
            if not name.isupper():  # an integer argument the JIT specialised (== 1), not a tile parameter
                continue
            if isinstance(value, bool):
                consts += [name] if value else []
            else:
                consts.append(f"{name}={value}")
        opts = dict(self.options)
        return f"{','.join(ptrs)} {' '.join(consts)} w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)}"


def _launch_options(kwargs: dict, param_names: list[str]) -> dict:
    return {k: v for k, v in kwargs.items() if k not in param_names}


def specialise(launch: Launch, arch: str) -> Job:
    """Bind a captured launch with the JIT's own binder for `arch` (no GPU driver needed)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch.module), launch.name)
    backend = make_backend(GPUTarget("cuda", ARCHS[arch].capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=knobs.runtime.debug)
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    launch_opts = _launch_options(launch.kwargs, [p.name for p in fn.params])
    return Job(launch.module, launch.name, arch, tuple(signature.items()),
               tuple(sorted(constexprs.items())), tuple(sorted((k, json.dumps(v)) for k, v in attrs.items())),
               tuple(sorted(launch_opts.items())))


def _bin(tool: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


_WIDTH = {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}


def _local_bytes(sass: str, op: str) -> int:
    """Bytes moved by the STL or LDL instructions of a SASS listing (ptxas' spill count)."""
    total = 0
    for mods in re.findall(rf"\b{op}((?:\.[A-Z0-9]+)*)\s", sass):
        widths = [_WIDTH[m] for m in mods.split(".") if m in _WIDTH]
        total += widths[-1] if widths else 4
    return total


def cubin_usage(cubin: bytes) -> dict:
    """Registers, stack frame, static shared / local memory and spill bytes of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
        fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res.split("Function", 1)[1])}
        stores = loads = 0
        if fields["STACK"] or fields["LOCAL"]:  # spills live in the stack frame: none without one
            sass = subprocess.run([_bin("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                                  check=True).stdout
            stores, loads = _local_bytes(sass, "STL"), _local_bytes(sass, "LDL")
    return dict(regs=fields["REG"], stack=fields["STACK"], shared_static=fields["SHARED"], local=fields["LOCAL"],
                spill_stores=stores, spill_loads=loads)


def parse_ptxas_log(log: str) -> dict | None:
    """Registers and spill bytes from ptxas -v output (None if there is none)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spills):
        return None
    return dict(regs=int(regs.group(1)), stack=int(spills.group(1)),
                spill_stores=int(spills.group(2)), spill_loads=int(spills.group(3)))


def compile_job(job: Job) -> dict:
    """Compile one job for its target and measure the cubin; errors are returned, not raised."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.name)
    constexprs = dict(job.constexprs)
    attrs = {k: json.loads(v) for k, v in job.attrs}
    arch = ARCHS[job.arch]
    out = dict(kernel=job.name, arch=job.arch, config=job.config, options=dict(job.options),
               shared_limit=arch.max_shared, error=None)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True  # printed on a fresh compile only (not on a cache hit)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, dict(job.signature), constexprs, attrs),
                                    target=GPUTarget("cuda", arch.capability, 32), options=dict(job.options))
        usage = cubin_usage(kernel.asm["cubin"])
    except Exception as e:  # a compile error is a result (reported per scenario), not a crash
        out.update(error=f"{type(e).__name__}: {e}"[-4000:], seconds=round(time.perf_counter() - start, 2))
        return out
    ptxas = parse_ptxas_log(log.getvalue())
    out.update(usage, shared_dynamic=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
               num_stages=kernel.metadata.num_stages, ptxas=ptxas, seconds=round(time.perf_counter() - start, 2))
    out["shared"] = out["shared_dynamic"] + out["shared_static"]
    if ptxas is not None:  # the two readings of the same cubin must agree
        mismatch = {k: (v, out[k]) for k, v in ptxas.items() if out[k] != v}
        if mismatch:
            out["error"] = f"ptxas -v and cuobjdump disagree (ptxas, cuobjdump): {mismatch}"
    return out


def problems(result: dict) -> list[str]:
    """Why a compiled kernel is not acceptable: a compile error, spills, shared memory over the limit."""
    if result.get("error"):
        return [result["error"]]
    out = []
    if result["spill_stores"] or result["spill_loads"]:
        out.append(f"spills {result['spill_stores']} B stored, {result['spill_loads']} B loaded "
                   f"({result['regs']} registers, stack frame {result['stack']} B)")
    if result["shared"] > result["shared_limit"]:
        out.append(f"shared memory {result['shared']} B > {result['shared_limit']} B ({result['arch']} per-block max)")
    return out


def _init_worker() -> None:
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def compile_scenarios(scenarios: list[Scenario], workers: int | None = None) -> Iterator[dict]:
    """Yield {scenario, label, kernels: [per-kernel result]} per scenario, in completion order.

    Launches are captured and specialised in this process; distinct jobs compile in `workers`
    processes (default: one per CPU).
    """
    jobs: dict[Job, list[str]] = {}  # job -> labels of the scenarios that need it
    per_scenario: dict[str, list[Job]] = {}
    failed: dict[str, str] = {}
    for s in scenarios:
        try:
            own = [specialise(launch, s.arch) for launch in capture(s)]
        except Exception as e:  # a launcher or binder failure fails this scenario only
            failed[s.label] = f"capture: {type(e).__name__}: {e}"
            continue
        per_scenario[s.label] = list(dict.fromkeys(own))
        for job in per_scenario[s.label]:
            jobs.setdefault(job, []).append(s.label)
    for label, err in failed.items():
        yield dict(label=label, kernels=[dict(kernel="(launcher)", error=err)])
    waiting = {label: set(js) for label, js in per_scenario.items()}
    done: dict[Job, dict] = {}
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        futures = {pool.submit(compile_job, job): job for job in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            done[job] = dict(fut.result(), scenarios=jobs[job])
            for label in jobs[job]:
                waiting[label].discard(job)
                if not waiting[label]:
                    yield dict(label=label, kernels=[done[j] for j in per_scenario[label]])


# --------------------------------------------------------------------------- child process


def run_scenarios(scenarios: list[Scenario], workers: int | None = None, cache_dir: str | None = None,
                  on_result: Callable[[dict], None] | None = None, timeout: float = 1800) -> dict[str, dict]:
    """Compile `scenarios` in a child process without TRITON_INTERPRET; {label: result}.

    `on_result` is called as each scenario finishes (progress bars). cache_dir: Triton's cache
    for the child (default: Triton's own, TRITON_CACHE_DIR or ~/.triton/cache).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default, stated (silences its warning)
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    root = str(PACKAGE_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "engine.kernels.aot", "--workers", str(workers or 0), *(s.label for s in scenarios)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                                                                stderr=err, text=True) as child:
        watchdog = threading.Timer(timeout, child.kill)
        watchdog.start()
        try:
            for line in child.stdout:
                if line.startswith("{"):
                    result = json.loads(line)
                    results[result["label"]] = result
                    if on_result is not None:
                        on_result(result)
            code = child.wait()
        finally:
            watchdog.cancel()
        if code != 0 or len(results) != len(scenarios):
            err.seek(0)
            raise RuntimeError(f"`{' '.join(cmd[:4])} ...` exited with {code} after {len(results)} of "
                               f"{len(scenarios)} scenarios (timeout {timeout} s):\n{err.read()[-5000:]}")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Compile scenarios (labels as Scenario.label) for CUDA; JSON lines out.")
    ap.add_argument("labels", nargs="*", help="scenario labels (default: the full matrix)")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (0: one per CPU)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    scenarios = [Scenario.from_label(x) for x in args.labels] if args.labels else full_matrix()
    for result in compile_scenarios(scenarios, args.workers or None):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
