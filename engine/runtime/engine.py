"""`Engine`: the branching sampler over the live parameters of a `Transformer`.

    engine = Engine(model, tokenizer)
    outs = engine.generate(["12+7="], SamplingParams(n=8, temperature=0.6, max_new_tokens=64))

The engine holds a reference to the model, not a copy: the trainer's optimizer updates the
very parameters it samples with. KV lives in a paged pool; every prompt is matched against
a radix tree of cached prefixes and only its unmatched suffix is computed; the n samples of
a prompt share its KV (one prefill, then a fork); finished sequences stay cached, so
continuing a prompt + partial completion costs at most one page of prefill.

Attention backends: "triton" (the kernels in engine/kernels/: paged decode with split-K, the cascade
that reads shared prefixes once, paged extend; the default on CUDA) and "torch" (the SDPA reference,
the default elsewhere). On CUDA with Triton, decode-only steps replay CUDA graphs
(engine/runtime/cuda_graphs.py).

The step loop plans one step ahead: step N+1 is scheduled and prepared before step N's tokens
reach the host, so with `overlap` the forward and sampling of step N run on a worker thread
(on CUDA, its own stream) while the host postprocesses step N-1 and plans step N+1. A
sequence sampled by the step in flight holds a PLACEHOLDER as its last token; the worker
fills the next step's input ids from the sampled ids on the device. Without overlap the same
plans run inline, so overlap on and off give the same results bit for bit.
"""
from __future__ import annotations

import importlib.util
import numbers
import os
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Sequence as Seq

import numpy as np
import torch
import torch.nn.functional as F

from engine.cache import PageAllocator, RadixTree
from engine.model.transformer import Transformer
from engine.progress import progress_bar
from engine.runtime.batch import DEFAULT_SHARED_PREFIX_MIN_TOKENS, RowTable, Staging, StepBatch, build_metadata
from engine.runtime.paged_attention import AttentionStats, KVPool, TorchPagedAttention
from engine.runtime.params import Completion, EngineStats, SamplingParams, StepTimes, mix_seed
from engine.runtime.sampler import SamplingBatch, counter_uniforms, host_flags, sample
from engine.runtime.scheduler import Scheduled, Scheduler
from engine.runtime.sequence import PLACEHOLDER, Sequence, Status
from engine.runtime.stop import StopMatcher

ATTENTION_BACKENDS = ("auto", "torch", "triton")
CPU_DEFAULT_KV_TOKENS = 1 << 16
CPU_MAX_KV_BYTES = 1 << 30
# With overlap, the interpreter's thread switch interval while generate() runs (Python's default
# is 5 ms): the worker thread, back from the device with its tokens, must not wait for the host
# thread's Python to give up the GIL for longer than a fraction of a step.
OVERLAP_SWITCH_INTERVAL_S = 1e-4  # ENGINE_OVERLAP_SWITCH_S overrides (seconds, > 0)
_warned: set[str] = set()
_mm_out_dtype = True  # torch.mm(..., out_dtype=) works here (cleared on the first failure)


class Engine:
    """Generates from a `Transformer` with a paged, prefix-shared KV cache.

    kv_cache_tokens sizes the KV pool in tokens; without it the pool takes
    kv_memory_fraction of the free GPU memory, or on CPU min(65,536 tokens, 1 GiB).

    attention_backend: "auto" (triton on CUDA when triton imports, torch elsewhere), "torch"
    or "triton"; the ENGINE_ATTENTION_BACKEND environment variable overrides it. "triton" on
    a CPU runs the kernels in Triton's interpreter when TRITON_INTERPRET=1 was set before
    triton was imported, and their torch references otherwise (with a warning).
    cuda_graphs: replay CUDA graphs for decode-only steps; None = on for CUDA + triton, off
    elsewhere; ENGINE_CUDA_GRAPHS=0 / 1 overrides. Needs the triton backend. On a CPU, True
    runs the same static-buffer, padded path eagerly (what the CPU tests check). Graphs
    reserve a page or two of the pool as scratch space for padding rows.
    shared_prefix_min_tokens: decode rows next to each other in the batch that share at
    least this many leading KV tokens (whole pages) have that range read once for all of
    them by the triton backend (nested: an episode's prompt, then each state's prefix;
    engine/runtime/batch.py `cascade_layout`); None turns the sharing off.
    overlap: run each step's forward and sampling on a worker thread while the host plans the
    next step and postprocesses the previous one; None = on for CUDA (whose kernels run
    asynchronously), off elsewhere; ENGINE_OVERLAP=0 / 1 overrides. The results are the same
    either way (both run the same plans); a sequence that ends by EOS or a stop costs one
    wasted row (`stats.overlap_wasted_rows`), on and off alike. The forward runs on the worker
    thread: the caller's thread-local torch state (autocast, a default device, inference mode)
    does not reach it; the Engine computes in the model's own dtype either way.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        *,
        page_size: int = 16,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 8192,
        kv_cache_tokens: int | None = None,
        kv_memory_fraction: float = 0.9,
        attention_backend: str = "auto",
        prefix_cache: bool = True,
        cuda_graphs: bool | None = None,
        shared_prefix_min_tokens: int | None = DEFAULT_SHARED_PREFIX_MIN_TOKENS,
        overlap: bool | None = None,
    ):
        for name, value in (("page_size", page_size), ("max_num_seqs", max_num_seqs),
                            ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        backend = os.environ.get("ENGINE_ATTENTION_BACKEND", attention_backend)
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        min_tokens = shared_prefix_min_tokens
        if min_tokens is not None and (not isinstance(min_tokens, int) or min_tokens < 1):
            raise ValueError(f"shared_prefix_min_tokens must be None or an integer >= 1, got {min_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.config = cfg = model.config
        weight = model.lm_head_weight
        self.device, self.dtype = weight.device, weight.dtype
        self.page_size = page_size
        self.attention_backend = _resolve_backend(backend, self.device)
        self.cuda_graphs = _resolve_cuda_graphs(cuda_graphs, self.attention_backend, self.device)
        self.overlap = _resolve_overlap(overlap, self.device)
        # The worker's stream (CUDA + overlap): the host thread issues no device work while a step runs.
        self._worker_stream = torch.cuda.Stream(self.device) if self.overlap and self.device.type == "cuda" else None
        self.shared_prefix_min_tokens = shared_prefix_min_tokens
        self._scale = cfg.head_dim ** -0.5  # SDPA's default, as in TorchPagedAttention
        # A window as long as the context never binds: such layers count as full attention
        # (so the triton backend may serve them with the shared-prefix kernel).
        self._kernel_windows = [None if w is not None and w >= cfg.max_position_embeddings else w
                                for w in cfg.sliding_windows]
        # Sibling groups serve only the triton backend's layers without a window.
        groups_useful = self.attention_backend == "triton" and any(w is None for w in self._kernel_windows)
        self._group_min_tokens = shared_prefix_min_tokens if groups_useful else None
        reserved = 0
        if self.cuda_graphs:  # the graphs' scratch pages: one slot for every padding row a step can add
            from engine.runtime.cuda_graphs import scratch_pages_needed

            reserved = scratch_pages_needed(max_num_seqs, page_size)
        bytes_per_token = KVPool.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype)
        if kv_cache_tokens is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_tokens = int(free * kv_memory_fraction) // bytes_per_token
            else:
                kv_cache_tokens = min(CPU_DEFAULT_KV_TOKENS, CPU_MAX_KV_BYTES // bytes_per_token)
        num_pages = kv_cache_tokens // page_size
        if num_pages < 2 + reserved:
            raise ValueError(
                f"KV pool of {kv_cache_tokens} tokens holds {num_pages} page(s) of {page_size}; at least "
                f"{2 + reserved} are needed" + (f" ({reserved} for the CUDA graphs' padding rows)" if reserved else "")
            )
        self.pool = KVPool(cfg.num_hidden_layers, num_pages * page_size, cfg.num_key_value_heads, cfg.head_dim,
                           self.dtype, self.device)
        self.allocator = PageAllocator(num_pages, page_size)
        # The scratch pages: allocated now and never released, so no sequence or tree node owns them.
        self.scratch_pages = self.allocator.allocate(reserved) if reserved else []
        self._reserved_pages = reserved
        self.tree = RadixTree(self.allocator)
        self.stats = EngineStats()
        self.step_times = StepTimes()
        max_table = min(self.allocator.pages_for_tokens(cfg.max_position_embeddings), num_pages)
        self.rows = RowTable(max_num_seqs, max_table)
        self.staging = Staging(self.device)
        self.scheduler = Scheduler(self.allocator, self.tree, self.rows, self.stats, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=max_batch_tokens, prefix_cache=prefix_cache)
        self.stop_matcher = StopMatcher(tokenizer) if tokenizer is not None else None
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._weights_version = self._weights_fingerprint()
        self._next_seq_id = 0
        self.attention_stats = AttentionStats()
        self._graphs = None
        if self.cuda_graphs:
            from engine.runtime.cuda_graphs import DecodeGraphRunner

            self._graphs = DecodeGraphRunner(model, self.pool, page_size=page_size, windows=self._kernel_windows,
                                             scale=self._scale, max_batch=max_num_seqs, scratch_pages=self.scratch_pages,
                                             capture=self.device.type == "cuda")

    # ------------------------------------------------------------------ public API
    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the pool can give to sequences (the graphs' scratch pages excluded)."""
        return self.usable_pages * self.page_size

    @property
    def usable_pages(self) -> int:
        return self.allocator.num_pages - self._reserved_pages

    def invalidate_cache(self) -> None:
        """Forget all cached KV. Call it after every weight update.

        generate() also compares a fingerprint of the parameters (autograd version counters
        plus one element of each tensor) with the one taken when the cache was filled, as a
        safety net; updates that bypass both (for example writing through `.data` into
        elements it does not sample) are only caught by this call.
        """
        self.tree.reset()
        self._weights_version = self._weights_fingerprint()

    def release_kv_memory(self) -> None:
        """Free the KV pool's memory until the next generate() (which allocates it again, empty):
        a trainer calls it before its update, whose activations and gradients then get that memory.
        The prefix cache is forgotten; CUDA graphs recapture on their next use (the pool moved)."""
        self.tree.reset()
        self.pool.release()

    @torch.no_grad()
    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        progress: bool | str = False,
    ) -> list[list[Completion]]:
        """Sample params.n completions for each prompt; one list per prompt, in order.

        prompts: token-id lists, or strings when the engine has a tokenizer.
        params: one SamplingParams for all prompts, or one per prompt.
        """
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (wrap a single prompt in a list)")
        params_list = [params or SamplingParams()] * len(prompts) if not isinstance(params, (list, tuple)) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        token_prompts = [self._validate(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        version, firsts = self._weights_fingerprint()
        if version != self._weights_version[0] or not torch.equal(firsts, self._weights_version[1]):
            self.invalidate_cache()  # weights were updated in place since the cache was filled
        if not self.pool.allocated:  # (released for a training update)
            self.pool.allocate()
        if self._graphs is not None:
            self._graphs.ensure_valid()
        groups = [self._make_group(i, ids, sp) for i, (ids, sp) in enumerate(zip(token_prompts, params_list))]
        for leader in groups:
            self.scheduler.add(leader[0])
        bar = progress_bar(total=sum(len(g) for g in groups), desc=progress if isinstance(progress, str) else "generate",
                   disable=not progress, leave=False)
        switch = sys.getswitchinterval()
        worker = None
        if self.overlap:
            short = _switch_interval()
            worker = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        if self._worker_stream is not None:  # the worker reads what the caller's stream wrote (weights, a fresh pool)
            self._worker_stream.wait_stream(torch.cuda.current_stream(self.device))
        in_flight: _Step | None = None
        try:
            if worker is not None:
                sys.setswitchinterval(min(switch, short))
            while self.scheduler.has_work:
                t0 = time.perf_counter()
                sched = self.scheduler.schedule(can_preempt=in_flight is None)
                t_schedule = time.perf_counter() - t0
                if sched.need_sync or not sched.seqs:
                    if in_flight is None:
                        raise RuntimeError("scheduler made no progress (KV pool or limits too small for any sequence)")
                    bar.update(self._complete(in_flight))  # drain, then plan again with its tokens known
                    in_flight = None
                    continue
                step = self._launch(sched, in_flight, worker, t_schedule)
                if in_flight is not None:
                    bar.update(self._complete(in_flight))  # while the worker runs `step`
                self._mark_pending(step)
                in_flight = step
            if in_flight is not None:  # only rows of sequences that finished before it: all wasted
                self._complete(in_flight)
                in_flight = None
        finally:
            bar.close()
            try:
                if worker is not None:
                    sys.setswitchinterval(switch)
                    worker.shutdown(wait=True)  # an interrupted generate: the step in flight ends before its pages go
                if self._worker_stream is not None:
                    torch.cuda.current_stream(self.device).wait_stream(self._worker_stream)
            finally:
                self.scheduler.abort_all()  # no-op after a clean finish; frees everything if interrupted
        return [[self._completion(s) for s in group] for group in groups]

    # ------------------------------------------------------------------ one step
    # schedule -> prepare -> [forward -> sample: on the worker with overlap] -> postprocess.
    # The loop in generate() launches step N+1 before it postprocesses step N.

    @torch.no_grad()
    def _step(self) -> int:
        """One whole step, nothing in flight before or after it; returns how many sequences finished."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.seqs:
            raise RuntimeError("scheduler made no progress (KV pool or limits too small for any sequence)")
        step = self._launch(sched, None, None, time.perf_counter() - t0)
        self._mark_pending(step)
        return self._complete(step)

    def _launch(self, sched: Scheduled, prev: "_Step | None", worker: ThreadPoolExecutor | None,
                t_schedule: float) -> "_Step":
        """Prepare the step's tensors on the host, then run its forward and sampling (on the worker with overlap).

        prev: the step in flight, whose sampled ids fill this step's placeholders on the device.
        """
        t0 = time.perf_counter()
        host, arrays, flags = self._prepare(sched)
        t_prepare = time.perf_counter() - t0
        step = _Step(sched.samplers, t_schedule, t_prepare)
        if worker is None:
            step.out = self._execute(sched, host, arrays, flags, prev)
        else:
            step.future = worker.submit(self._execute, sched, host, arrays, flags, prev)
        self.stats.forward_steps += 1
        self.attention_stats.record(host, self.page_size)  # host counting while the device runs the step
        self.scheduler.after_forward(sched)  # its prefills become matchable (any reader is a later step)
        return step

    def _mark_pending(self, step: "_Step") -> None:
        """Each sequence the step samples for holds a PLACEHOLDER until its token arrives."""
        pending = self.rows.pending
        for i, seq in enumerate(step.samplers):
            if seq.status is Status.RUNNING:  # (not one the previous step finished)
                seq.tokens.append(PLACEHOLDER)
                pending[seq.row] = i

    def _complete(self, step: "_Step") -> int:
        """Wait for the step's tokens and postprocess them; returns how many sequences finished."""
        t0 = time.perf_counter()
        out = step.result()
        t1 = time.perf_counter()
        finished = self._postprocess(step.samplers, out.tokens, out.logprobs)
        t2 = time.perf_counter()
        self.step_times.add(step.t_schedule, step.t_prepare, out.t_forward, out.t_sample, t2 - t1, wait=t1 - t0,
                            done=t2)
        return finished

    def _execute(self, sched: Scheduled, host: StepBatch, arrays: dict[str, np.ndarray], flags: dict | None,
                 prev: "_Step | None") -> "_StepOut":
        """The device's part of a step: send the tensors, fill the placeholders, forward, sample.

        Runs on the worker thread with overlap (on CUDA in the worker's stream), inline without.
        Touches no host state that the host thread changes meanwhile.
        """
        if self._worker_stream is None:
            return self._run_step(sched, host, arrays, flags, prev)
        with torch.cuda.device(self.device), torch.cuda.stream(self._worker_stream):
            return self._run_step(sched, host, arrays, flags, prev)

    @torch.no_grad()
    def _run_step(self, sched: Scheduled, host: StepBatch, arrays: dict[str, np.ndarray], flags: dict | None,
                  prev: "_Step | None") -> "_StepOut":
        t0 = time.perf_counter()
        dev = self.staging.send(arrays)
        if "fill_dst" in dev:  # the inputs sampled by the previous step, from its ids on the device
            dev["input_ids"][dev["fill_dst"]] = prev.result().ids[dev["fill_src"]]
        hidden = self._forward(sched, host, dev)
        t1 = time.perf_counter()
        tokens, logprobs, ids = [], None, None
        if sched.samplers:
            sampling = SamplingBatch(dev["temperature"], dev["top_p"], dev["top_k"], dev["uniform"], dev.get("greedy"),
                                     **flags)
            hidden = hidden if sched.decode_only else hidden[dev["sample_index"]]  # the sampling rows only
            box: list[torch.Tensor] = []
            tokens, logprobs = sample(lm_head_logits(hidden, self.model.lm_head_weight), sampling, ids_out=box)
            ids = box[0]
        return _StepOut(ids, tokens, logprobs, t1 - t0, time.perf_counter() - t1)

    def _prepare(self, sched: Scheduled) -> tuple[StepBatch, dict[str, np.ndarray], dict | None]:
        """The step's host arrays from the persistent row table: metadata, token ids, sampling parameters.

        Everything goes to the device in one copy (`Staging.send`, on the worker). A placeholder
        input (the last token of a sequence the step in flight samples for) is listed in
        fill_dst / fill_src: its position in input_ids, its index in that step's sampled ids.
        """
        P = self.page_size
        seqs, rows = sched.seqs, self.rows
        row_ids = np.fromiter((s.row for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.array(sched.starts, dtype=np.int64)
        ends = np.array(sched.ends, dtype=np.int64)
        width = (int(ends.max()) + P - 1) // P
        tables = rows.pages[row_ids, :width]
        host = build_metadata(tables, starts, ends, P, self._group_min_tokens)
        arrays = host.tensors()
        if sched.decode_only:
            ids = np.fromiter((s.tokens[-1] for s in seqs), dtype=np.int64, count=len(seqs))
            src = rows.pending[row_ids]
            fill_dst = np.flatnonzero(src >= 0)
            fill_src = src[fill_dst]
            table_rows, positions = row_ids, ends  # the samplers' rows in the row table, their draw positions
        else:
            tokens: list[int] = []
            dst, fill = [], []
            for s, a, b in zip(seqs, sched.starts, sched.ends):
                tokens += s.tokens[a:b]
                if b == len(s.tokens) and rows.pending[s.row] >= 0:
                    dst.append(len(tokens) - 1)
                    fill.append(rows.pending[s.row])
            ids = np.array(tokens, dtype=np.int64)
            fill_dst, fill_src = np.array(dst, dtype=np.int64), np.array(fill, dtype=np.int64)
            samplers = sched.samplers
            table_rows = np.fromiter((s.row for s in samplers), dtype=np.int64, count=len(samplers))
            positions = np.fromiter((len(s.tokens) for s in samplers), dtype=np.int64, count=len(samplers))
            arrays["sample_index"] = np.array(sched.sample_rows, dtype=np.int64)
        if int(np.count_nonzero(ids == PLACEHOLDER)) != fill_dst.size:
            raise RuntimeError("a placeholder input token has no sampled id to take (scheduler invariant broken)")
        arrays["input_ids"] = ids
        if fill_dst.size:
            arrays["fill_dst"], arrays["fill_src"] = fill_dst, fill_src
        for name, copies in (("copy_before", sched.copies_before), ("copy_after", sched.copies_after)):
            if copies:
                arrays[name + "_src"], arrays[name + "_dst"] = _copy_indices(copies)
        flags = None
        if len(table_rows):
            greedy = rows.greedy[table_rows]
            top_p, top_k = rows.top_p[table_rows], rows.top_k[table_rows]
            arrays["temperature"] = rows.temperature[table_rows]
            arrays["top_p"], arrays["top_k"] = top_p, top_k
            arrays["uniform"] = counter_uniforms(rows.seed[table_rows], positions)
            if greedy.any():
                arrays["greedy"] = greedy
            flags = host_flags(greedy, top_p, top_k, self.config.vocab_size)
            flags["want_logprobs"] = bool(rows.logprobs[table_rows].any())
        return host, arrays, flags

    def _forward(self, sched: Scheduled, host: StepBatch, dev: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states [N, d] of the step's new tokens; runs the step's deferred KV copies around the forward."""
        if "copy_before_src" in dev:
            self.pool.copy_slots(dev["copy_before_src"], dev["copy_before_dst"])
        meta = StepBatch(**{k: dev.get(k, v) for k, v in vars(host).items()})
        ids = dev["input_ids"]
        if self.attention_backend == "triton":
            hidden = self._triton_forward(host, meta, ids)
        else:
            ctx = TorchPagedAttention(self.pool, meta, self.config.sliding_windows, self.page_size)
            hidden = self.model.model(ids[None], meta.positions[None], ctx)[0]
        if "copy_after_src" in dev:
            self.pool.copy_slots(dev["copy_after_src"], dev["copy_after_dst"])
        return hidden

    def _triton_forward(self, host: StepBatch, meta: StepBatch, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, d] through the Triton kernels (or a replayed graph)."""
        from engine.runtime.triton_attention import TritonPagedAttention

        st = self.attention_stats
        if self._graphs is not None and self._graphs.fits(host):
            st.graph_steps += 1
            st.graph_shared_steps += host.cascade_segments is not None
            st.graph_padded_rows += self._graphs.padded_size(host.num_decode) - host.num_decode
            return self._graphs.run(ids, meta)
        ctx = TritonPagedAttention(self.pool, meta, self._kernel_windows, self.page_size, self._scale)
        return self.model.model(ids[None], meta.positions[None], ctx)[0]

    def _postprocess(self, samplers: list[Sequence], tokens: list[int], logprobs: list[float] | None) -> int:
        """Put each sampled token in place of its placeholder; finish sequences that hit EOS, a stop
        token or string, or a length limit. A row of a sequence that already finished is dropped."""
        eos, limit, stops = self.eos_token_ids, self.config.max_position_embeddings, self.stop_matcher
        pending = self.rows.pending
        finished = 0
        for seq, token, lp in zip(samplers, tokens, logprobs if logprobs is not None else repeat(None)):
            if seq.status is not Status.RUNNING:
                continue  # finished by the previous step's token: this row was wasted (counted in finish)
            seq.tokens[-1] = token  # (its PLACEHOLDER)
            pending[seq.row] = -1
            p = seq.params
            if p.logprobs:
                seq.logprobs.append(lp)
            if (token in eos and not p.ignore_eos) or token in p.stop_token_ids:
                reason = "stop"
            elif p.stop and stops.update(seq, token):
                reason = "stop"
            elif len(seq.tokens) - seq.prompt_len >= p.max_new_tokens or len(seq.tokens) >= limit:
                reason = "length"
            else:
                continue
            self.scheduler.finish(seq, reason)
            finished += 1
        if finished:
            self.scheduler.drop_finished()
        return finished

    # ------------------------------------------------------------------ helpers
    def _validate(self, index: int, prompt, params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params for prompt {index} must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: pass one to Engine(model, tokenizer)")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, torch.Tensor):
            if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dim() != 1:
                raise ValueError(f"prompt {index} must be a 1-d integer tensor of token ids, got {prompt.dtype} "
                                 f"of shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        else:
            ids = list(prompt)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
            if bad is not None:  # (int(1.5) would silently sample from another prompt)
                raise ValueError(f"prompt {index} has token id {bad!r}: token ids must be integers")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        vocab = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {index} has token id {bad}, outside the vocabulary [0, {vocab})")
        limit = self.config.max_position_embeddings
        if len(ids) >= limit:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; the model's context is {limit}, which leaves no room "
                f"to generate (prompts are never truncated)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.scheduler.max_num_seqs}")
        longest = min(len(ids) + params.max_new_tokens, limit)
        pages = self.allocator.pages_for_tokens(longest) + 1  # + one page for a partial-page copy
        if pages > self.usable_pages:
            raise ValueError(
                f"the KV pool ({self.kv_cache_tokens} tokens, {self.usable_pages} pages of {self.page_size}) "
                f"cannot hold one sequence of prompt {index}: {longest} tokens need {pages} pages"
            )
        return ids

    def _make_group(self, request: int, ids: list[int], params: SamplingParams) -> list[Sequence]:
        if params.seed is not None:
            seeds = [mix_seed(params.seed, i) for i in range(params.n)]
        else:  # unseeded: drawn from torch's global generator, so torch.manual_seed reproduces them
            seeds = torch.randint(0, 1 << 62, (params.n,)).tolist()
        max_len = min(len(ids) + params.max_new_tokens, self.config.max_position_embeddings)
        seqs = []
        for i in range(params.n):
            seqs.append(Sequence(self._next_seq_id, request, i, list(ids), len(ids), params, seeds[i],
                                 max_len=max_len))
            self._next_seq_id += 1
        seqs[0].siblings = seqs[1:]
        return seqs

    def _completion(self, seq: Sequence) -> Completion:
        assert seq.status is Status.FINISHED
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            if seq.finish_reason == "stop" and seq.params.stop:
                text = self.stop_matcher.cut(seq, text)  # the stop string may start in the prompt
        return Completion(
            token_ids=seq.generated, finish_reason=seq.finish_reason, text=text,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None, cached_tokens=seq.cached_tokens,
        )

    def _weights_fingerprint(self) -> tuple[int, torch.Tensor]:
        """(sum of in-place version counters, first element of every parameter).

        Optimizers that step in place bump the version counters; fused optimizers and
        `.data` writes do not, but they change the elements, which the second part sees.
        """
        params = list(self.model.parameters())
        firsts = torch.cat([_first_element(p) for p in params]).cpu()
        return sum(p._version for p in params), firsts


@dataclass
class _StepOut:
    """What the device's part of a step returns."""

    ids: torch.Tensor | None         # sampled ids on the device (the next step's placeholders read them)
    tokens: list[int]
    logprobs: list[float] | None
    t_forward: float
    t_sample: float


@dataclass
class _Step:
    """A launched step: its samplers, and its result (inline) or the worker's future (overlap)."""

    samplers: list[Sequence]
    t_schedule: float
    t_prepare: float
    out: _StepOut | None = None
    future: Future | None = None

    def result(self) -> _StepOut:
        if self.out is None:
            self.out = self.future.result()  # re-raises what the worker raised
        return self.out


def _first_element(p: torch.Tensor) -> torch.Tensor:
    """[1] float: the first element of `p`; of its local shard when `p` is a DTensor (an FSDP
    parameter at rest; the trainer gathers it before generating), 0 for an empty shard."""
    t = p.detach()
    if hasattr(t, "to_local"):
        t = t.to_local()
    t = t.reshape(-1)[:1].float()
    return t if t.numel() else t.new_zeros(1)


LM_HEAD_CHUNK = 16384  # vocabulary rows per fp32 chunk in lm_head_logits' fallback


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [N, V] = hidden [N, d] @ weight [V, d].T with fp32 accumulation, as the loss computes them.

    The trainer's log-probs (engine/kernels/fused_logprobs.py) accumulate the input dtype's products
    in fp32 and never round the logits to bf16; sampling from bf16-rounded logits would draw
    from a different distribution than the one trained (and return different log-probs).
    On CUDA with a half-precision weight, one GEMM with fp32 output (no fp32 copy of the
    weight); elsewhere both operands in fp32 (a no-op cast for an fp32 model).
    """
    global _mm_out_dtype
    if weight.dtype == torch.float32:
        return F.linear(hidden.float(), weight)
    if weight.is_cuda and _mm_out_dtype:
        try:
            return torch.mm(hidden.to(weight.dtype), weight.T, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise  # a real failure, not a missing feature
        except (TypeError, RuntimeError, NotImplementedError):  # torch < 2.8, or a dtype it lacks
            _mm_out_dtype = False
            _warn_once("torch.mm(out_dtype=float32) is unavailable: the LM head casts its weight to fp32 "
                       "in vocabulary chunks each step")
    # fp32 copies of LM_HEAD_CHUNK vocabulary rows at a time, never of the whole [V, d] weight.
    h32 = hidden.float()
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    for v0 in range(0, weight.shape[0], LM_HEAD_CHUNK):
        out[:, v0:v0 + LM_HEAD_CHUNK] = F.linear(h32, weight[v0:v0 + LM_HEAD_CHUNK].float())
    return out


def _copy_indices(copies: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination slots of (src, dst, count) KV copies."""
    counts = np.array([c for _, _, c in copies], dtype=np.int64)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    src = np.repeat(np.array([s for s, _, _ in copies], dtype=np.int64), counts) + within
    dst = np.repeat(np.array([d for _, d, _ in copies], dtype=np.int64), counts) + within
    return src, dst


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA when triton is installed, else "torch"; warn when "triton" cannot run Triton."""
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton" and device.type != "cuda":
        # The module, not the function the kernels package re-exports under the same name.
        kernel = importlib.import_module("engine.kernels.decode_attention")  # imports triton, as the kernels do

        interpreted = getattr(kernel, "_INTERPRETED", os.environ.get("TRITON_INTERPRET", "0") == "1")
        if not (has_triton and interpreted):
            _warn_once("attention_backend='triton' on a CPU without TRITON_INTERPRET=1 (set before triton is "
                       "imported) runs the kernels' torch references, not Triton")
    elif backend == "triton" and not has_triton:
        _warn_once("attention_backend='triton' without the triton package runs the kernels' torch references")
    return backend


def _resolve_cuda_graphs(requested: bool | None, backend: str, device: torch.device) -> bool:
    env = os.environ.get("ENGINE_CUDA_GRAPHS", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"ENGINE_CUDA_GRAPHS must be 0 or 1, got {env!r}")
    if env:
        requested = env == "1"
    if requested is None:
        return device.type == "cuda" and backend == "triton"
    if requested and backend != "triton":
        raise ValueError(f"cuda_graphs needs attention_backend='triton'; the backend is {backend!r}")
    return bool(requested)


def _switch_interval() -> float:
    env = os.environ.get("ENGINE_OVERLAP_SWITCH_S", "")
    if not env:
        return OVERLAP_SWITCH_INTERVAL_S
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ENGINE_OVERLAP_SWITCH_S must be a number of seconds > 0, got {env!r}")
    return value


def _resolve_overlap(requested: bool | None, device: torch.device) -> bool:
    env = os.environ.get("ENGINE_OVERLAP", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"ENGINE_OVERLAP must be 0 or 1, got {env!r}")
    if env:
        return env == "1"
    return device.type == "cuda" if requested is None else bool(requested)


def _eos_ids(model: Transformer, tokenizer) -> frozenset[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, all together."""
    ids: set[int] = set()
    for eos in (model.config.extra.get("eos_token_id"), model.config.generation.get("eos_token_id")):
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
