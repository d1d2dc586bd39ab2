"""CUDA graphs for decode-only steps: static buffers, a few captured batch sizes, padding.

A decode step of a small model is mostly kernel-launch overhead: dozens of launches per
layer, each a few microseconds of CPU time. `DecodeGraphRunner` captures the backbone
forward (`model.model`: embedding, every layer with `StaticDecodeAttention`, final norm)
once per batch size in `graph_batch_sizes` and replays it. A step of B rows pads to the
next captured size; its inputs (token ids, positions, KV slots, page tables, context
lengths) are copied into the static buffers the graphs read; the hidden states come back
in a static output (the LM head and sampling run eagerly on the B live rows).

Invariants that keep a graph valid:
- Padding rows never touch a live page. The Engine reserves one scratch page in the
  allocator for the runner's lifetime (one reference that is never released, so the page
  is never handed to a sequence or the prefix tree). A padding row writes its K/V into slot
  0 of that page, and its page table and context length (1) make it read only that slot.
- The captured kernels read the weights and the KV pool through their storage addresses.
  The trainer updates parameters in place (same storage), so graphs stay valid across
  optimizer steps; the pool tensor is allocated once. If a parameter's storage changes
  anyway (`model.to(...)`, a new tensor assigned), `ensure_valid` drops the graphs and they
  are captured again on the next decode step. Nothing captured copies a parameter.
- Kernel grids and split counts depend only on the captured batch size, the static table
  width and the model, never on buffer contents.

Steps that do not fit (a prefill chunk in the batch, more rows than the largest size, or
decode rows with sibling groups that the shared-prefix kernel should serve) run eagerly:
the group structure changes every step, so graph steps use the plain decode kernel.

`capture=False` runs exactly the same static-buffer, padded path without capturing: that is
how the CPU tests check it (and the only mode on a CPU).
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.runtime.paged_attention import KVPool
from engine.runtime.batch import StepBatch
from engine.runtime.triton_attention import StaticDecodeAttention

MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to max_batch (always included)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


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
                 max_batch: int, scratch_page: int, capture: bool):
        cfg = model.config
        self.model, self.pool, self.page_size, self.windows, self.scale = model, pool, page_size, windows, scale
        self.capture = capture
        self.sizes = graph_batch_sizes(min(max_batch, MAX_GRAPH_BATCH))
        # Fixed table width: the longest sequence the model (and the pool) can hold.
        self.max_pages = min(-(-cfg.max_position_embeddings // page_size), pool.num_slots // page_size)
        self.scratch_page = scratch_page
        self.device = dev = pool.kv.device
        rows = self.sizes[-1]
        self.inputs = torch.zeros(3, rows, dtype=torch.int64, device=dev)  # token ids, positions, KV slots
        self.page_tables = torch.full((rows, self.max_pages), scratch_page, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.num_splits = {s: static_num_splits(s, cfg.num_key_value_heads, self.max_pages * page_size, dev)
                           for s in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._captured_storage: list[int] | None = None

    @property
    def scratch_slot(self) -> int:
        """The one slot padding rows write and read."""
        return self.scratch_page * self.page_size

    def fits(self, batch: StepBatch) -> bool:
        """Can this step run here? Decode rows only, no sibling groups, within the static shapes."""
        return (batch.num_extend_tokens == 0 and 0 < batch.num_decode <= self.sizes[-1]
                and batch.group_offsets is None and batch.decode_tables.shape[1] <= self.max_pages
                and batch.max_decode_kv_len <= self.max_pages * self.page_size)

    def padded_size(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    @torch.no_grad()
    def run(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Hidden states [B, d] of a decode-only step (token ids and metadata already on the device)."""
        rows = batch.num_decode
        size = self.padded_size(rows)
        if self.capture and not self.graphs:
            self._capture_all()  # before loading: capture fills the buffers with padding
        self._load(token_ids, batch, size)
        if not self.capture:
            return self._forward(size)[:rows]
        self.graphs[size].replay()
        return self.outputs[size][:rows]

    def ensure_valid(self) -> None:
        """Drop the graphs if a parameter or the pool moved to new storage (they recapture on use)."""
        if self.graphs and self._storage() != self._captured_storage:
            self.graphs.clear()
            self.outputs.clear()

    # ------------------------------------------------------------------ internals
    def _load(self, token_ids: torch.Tensor, batch: StepBatch, size: int) -> None:
        """Copy the live rows into the static buffers (device to device: no sync); rows [B, size) become padding."""
        rows = batch.num_decode
        self.inputs[0, :rows].copy_(token_ids)
        self.inputs[1, :rows].copy_(batch.positions)
        self.inputs[2, :rows].copy_(batch.slot_mapping)
        self.inputs[:2, rows:size] = 0
        self.inputs[2, rows:size] = self.scratch_slot  # padding writes only the scratch page
        self.kv_lens[:rows].copy_(batch.decode_kv_lens)
        self.kv_lens[rows:size] = 1  # padding reads one slot: the scratch slot
        width = batch.decode_tables.shape[1]
        # Live rows: their pages, then stale in-range ids past their length (never read).
        self.page_tables[:rows, :width].copy_(batch.decode_tables)
        self.page_tables[rows:size].fill_(self.scratch_page)

    def _forward(self, size: int) -> torch.Tensor:
        ctx = StaticDecodeAttention(self.pool, self.inputs[2, :size], self.page_tables[:size], self.kv_lens[:size],
                                    self.windows, self.page_size, self.scale, self.num_splits[size])
        return self.model.model(self.inputs[0, :size][None], self.inputs[1, :size][None], ctx)[0]

    def _storage(self) -> list[int]:
        return [p.data_ptr() for p in self.model.parameters()] + [self.pool.kv.data_ptr()]

    def _capture_all(self) -> None:
        """Capture every size, largest first, into one memory pool (graphs replay one at a time)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        self.page_tables.fill_(self.scratch_page)  # capture runs all-padding rows: only the scratch page
        self.kv_lens.fill_(1)
        self.inputs[:2].zero_()
        self.inputs[2].fill_(self.scratch_slot)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
                self._forward(size)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(dev)
        self._captured_storage = self._storage()
