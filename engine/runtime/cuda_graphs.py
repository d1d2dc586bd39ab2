"""CUDA graphs for decode-only steps: static buffers, captured batch sizes, padding.

A decode step of a small model is mostly kernel-launch overhead: dozens of launches per
layer, each a few microseconds of CPU time. `DecodeGraphRunner` captures the backbone
forward (`model.model`: embedding, every layer with `StaticDecodeAttention`, final norm)
once per batch size in `graph_batch_sizes` (up to the Engine's max_num_seqs) and replays it.
A step of B rows pads to the next captured size; its inputs (token ids, positions, KV slots,
page tables, context lengths, and the shared-prefix cascade) are copied into the static
buffers the graphs read; the hidden states come back in a static output (the LM head and
sampling run eagerly on the B live rows).

Two variants per size, each captured the first time a step needs it:
- plain: every row through `decode_attention`;
- cascade: steps with shared prefixes (RL: n samples of a prompt, K rollouts of a state,
  nested states of an episode) through `cascade_decode_attention`. Its segments buffer has
  a static shape [size, 5] (a decode batch of B rows has at most B - 1 shared ranges; unused
  entries are empty segments that do nothing) and `MAX_CASCADE_LEVELS` levels (the layout
  builder never makes more), one prefix split per level, so every such step fits.

Invariants that keep a graph valid:
- Padding rows never touch a live page, and never write each other's slot. The Engine
  reserves `scratch_pages_needed` pages for the runner's lifetime (one reference never
  released, so no sequence or tree node gets them). Padding row j writes its K/V at scratch
  position j (page j // page_size, offset j % page_size) and reads only its scratch page up
  to that offset (slots other padding rows wrote: finite garbage, in rows nobody reads).
  (Capture itself runs all-padding batches larger than the scratch space; those warm-up and
  capture forwards write scratch slots several times over, which is harmless: nothing reads
  them as data.)
- The captured kernels read the weights and the KV pool through their storage addresses.
  The trainer updates parameters in place (same storage), so graphs stay valid across
  optimizer steps; the pool tensor is allocated once. If a parameter's storage changes
  anyway (`model.to(...)`, a new tensor assigned), `ensure_valid` drops the graphs and they
  are captured again on the next decode step. Nothing captured copies a parameter.
- Kernel grids and split counts depend only on the captured batch size, the static table
  width and the model, never on buffer contents. The cascade variant runs
  `prefix_splits[size]` (at most 4, untuned until a GPU is lent) splits per shared range.
- All graphs share one memory pool, so a replay may overwrite the output of another graph:
  `run`'s result is valid until the next `run` (the Engine consumes it before that).

Steps that do not fit (a prefill chunk in the batch, more rows than the largest size) run
eagerly. `capture=False` runs exactly the same static-buffer, padded path without capturing:
that is how the CPU tests check it (and the only mode on a CPU).
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.runtime.batch import MAX_CASCADE_LEVELS, StepBatch
from engine.runtime.paged_attention import KVPool
from engine.runtime.triton_attention import StaticDecodeAttention


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to max_batch (always included)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def max_padding(max_batch: int) -> int:
    """The most padding rows any step adds: the largest gap between captured sizes, minus one."""
    sizes = [0] + graph_batch_sizes(max_batch)
    return max(b - a for a, b in zip(sizes, sizes[1:])) - 1


def scratch_pages_needed(max_batch: int, page_size: int) -> int:
    """Pages the Engine reserves so that every padding row of a step has its own slot (at least 1)."""
    return max(1, -(-max_padding(max_batch) // page_size))


def static_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Split-K count for the decode kernel from static shapes only, fixed per captured size.

    The same rule as decode_attention's default (about 4 (row, kv head, split) programs per SM,
    at least 256 positions per split of the longest context, at most 64), but computed once
    here so a captured graph never depends on how the kernel's heuristic evolves; 1 on a CPU
    (the interpreter pays per program).
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // (batch * kv_heads))
    return max(1, min(want, -(-max_len // 256), 64))


class DecodeGraphRunner:
    """Decode-only forwards through static buffers padded to captured sizes (see the module docstring)."""

    def __init__(self, model, pool: KVPool, *, page_size: int, windows: Seq[int | None], scale: float,
                 max_batch: int, scratch_pages: Seq[int], capture: bool):
        cfg = model.config
        self.model, self.pool, self.page_size, self.windows, self.scale = model, pool, page_size, windows, scale
        self.capture = capture
        self.sizes = graph_batch_sizes(max_batch)
        # Fixed table width: the longest sequence the model (and the pool) can hold.
        self.max_pages = min(-(-cfg.max_position_embeddings // page_size), pool.num_slots // page_size)
        if len(scratch_pages) < scratch_pages_needed(max_batch, page_size):
            raise ValueError(f"{len(scratch_pages)} scratch page(s) given; padding needs "
                             f"{scratch_pages_needed(max_batch, page_size)}")
        self.scratch_pages = list(scratch_pages)
        self.device = dev = pool.kv.device
        rows = self.sizes[-1]
        self.inputs = torch.zeros(3, rows, dtype=torch.int64, device=dev)  # token ids, positions, KV slots
        self.page_tables = torch.full((rows, self.max_pages), self.scratch_pages[0], dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.segments = torch.zeros(rows, 5, dtype=torch.int32, device=dev)  # the cascade; zeros: empty segments
        self.suffix_starts = torch.zeros(rows, dtype=torch.int32, device=dev)
        # Padding row j (any step, any size): its scratch page, its slot, its position = context length - 1.
        j = torch.arange(rows, device=dev) % (len(self.scratch_pages) * page_size)
        pages = torch.tensor(self.scratch_pages, dtype=torch.int64, device=dev)[j // page_size]
        self.pad_slots = pages * page_size + j % page_size
        self.pad_positions = j % page_size
        self.pad_pages = pages.to(torch.int32)
        self.num_splits = {s: static_num_splits(s, cfg.num_key_value_heads, self.max_pages * page_size, dev)
                           for s in self.sizes}
        # Splits per shared range in the cascade variant: a long prompt shared by few rows needs
        # several programs per kv head; 4 keeps the workspace at MAX_CASCADE_LEVELS * 4 slots.
        self.prefix_splits = {s: min(4, n) for s, n in self.num_splits.items()}
        self.graphs: dict[tuple[bool, int], torch.cuda.CUDAGraph] = {}  # (cascade, size) -> graph
        self.outputs: dict[tuple[bool, int], torch.Tensor] = {}
        self._pool_handle = None
        self._captured_storage: list[int] | None = None

    def fits(self, batch: StepBatch) -> bool:
        """Can this step run here? Decode rows only, within the static shapes."""
        return (batch.num_extend_tokens == 0 and 0 < batch.num_decode <= self.sizes[-1]
                and batch.decode_tables.shape[1] <= self.max_pages
                and batch.max_decode_kv_len <= self.max_pages * self.page_size
                and batch.cascade_levels <= MAX_CASCADE_LEVELS)

    def padded_size(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    @torch.no_grad()
    def run(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Hidden states [B, d] of a decode-only step (token ids and metadata already on the device).

        The result lives in the graphs' shared pool: valid until the next `run`.
        """
        rows = batch.num_decode
        size = self.padded_size(rows)
        cascade = batch.cascade_segments is not None
        if self.capture and (cascade, size) not in self.graphs:
            self._capture_all(cascade)  # before loading: capture fills the buffers with padding
        self._load(token_ids, batch, size)
        if not self.capture:
            return self._forward(size, cascade)[:rows]
        self.graphs[cascade, size].replay()
        return self.outputs[cascade, size][:rows]

    def ensure_valid(self) -> None:
        """Drop the graphs if a parameter or the pool moved to new storage (they recapture on use)."""
        if self.graphs and self._storage() != self._captured_storage:
            self.graphs.clear()
            self.outputs.clear()

    # ------------------------------------------------------------------ internals
    def _load(self, token_ids: torch.Tensor, batch: StepBatch, size: int) -> None:
        """Copy the live rows into the static buffers (device to device: no sync); rows [B, size) become padding."""
        rows, pad = batch.num_decode, size - batch.num_decode
        self.inputs[0, :rows].copy_(token_ids)
        self.inputs[1, :rows].copy_(batch.positions)
        self.inputs[2, :rows].copy_(batch.slot_mapping)
        self.kv_lens[:rows].copy_(batch.decode_kv_lens)
        width = batch.decode_tables.shape[1]
        # Live rows: their pages, then stale in-range ids past their length (never read).
        self.page_tables[:rows, :width].copy_(batch.decode_tables)
        if pad:
            self._pad(rows, size)
        if batch.cascade_segments is not None:
            n = batch.cascade_segments.shape[0]
            self.segments[:n].copy_(batch.cascade_segments)
            self.segments[n:size].zero_()  # empty segments: their programs read nothing
            self.suffix_starts[:rows].copy_(batch.suffix_starts)
            self.suffix_starts[rows:size].zero_()

    def _pad(self, rows: int, size: int) -> None:
        """Rows [rows, size): padding row j writes scratch slot j and reads its scratch page up to it."""
        pad = size - rows
        self.inputs[0, rows:size].zero_()
        self.inputs[1, rows:size].copy_(self.pad_positions[:pad])
        self.inputs[2, rows:size].copy_(self.pad_slots[:pad])
        self.kv_lens[rows:size].copy_(self.pad_positions[:pad] + 1)
        self.page_tables[rows:size, 0].copy_(self.pad_pages[:pad])

    def _forward(self, size: int, cascade: bool) -> torch.Tensor:
        shared = None
        if cascade:
            shared = (self.segments[:size], self.suffix_starts[:size], MAX_CASCADE_LEVELS, self.prefix_splits[size])
        ctx = StaticDecodeAttention(self.pool, self.inputs[2, :size], self.page_tables[:size], self.kv_lens[:size],
                                    self.windows, self.page_size, self.scale, self.num_splits[size], shared)
        return self.model.model(self.inputs[0, :size][None], self.inputs[1, :size][None], ctx)[0]

    def _storage(self) -> list[int]:
        return [p.data_ptr() for p in self.model.parameters()] + [self.pool.kv.data_ptr()]

    def _capture_all(self, cascade: bool) -> None:
        """Capture every size of one variant, largest first, into one memory pool (graphs replay one at a time)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        self._pad(0, self.sizes[-1])  # capture runs all-padding rows: only the scratch pages
        self.segments.zero_()
        self.suffix_starts.zero_()
        if self._pool_handle is None:
            self._pool_handle = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
                self._forward(size, cascade)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool_handle):
                self.outputs[cascade, size] = self._forward(size, cascade)
            self.graphs[cascade, size] = graph
        torch.cuda.synchronize(dev)
        self._captured_storage = self._storage()
