"""One step's metadata, built incrementally on the host and sent to the device in one copy.

Every backend (the torch reference and the Triton kernels) and the sampler read the same
`StepBatch`. It is built from persistent host arrays, not from Python lists:

- `RowTable` gives every running sequence a row for as long as it runs. The row holds the
  sequence's page table (`pages[row, :n]`) and its sampling parameters. The scheduler
  writes a row when a sequence is admitted or forked and appends page ids as it grows, so a
  step never rebuilds page tables from lists: it gathers the rows it needs.
- `build_metadata` turns the step's rows, starts and ends into the kernels' metadata with
  a few numpy ops (a decode-only step, the common case, has no per-row work at all), then
  `Staging.send` moves every array of the step (metadata, token ids, sampling parameters)
  to the device in one host-to-device copy from a pinned buffer.

Invariant (CUDA): a pinned staging buffer is rewritten only after the copy that last read
it has completed (an event per buffer; two buffers alternate, so the wait is normally
already over: a step that samples has synchronised on its tokens, and a prefill-only step
that does not sample has at least the previous step's copy behind it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from engine.runtime.sequence import Sequence

# Shared prefixes (triton backend): the smallest shared range, in tokens, worth reading once for its rows.
DEFAULT_SHARED_PREFIX_MIN_TOKENS = 16
# Levels of nested sharing the cascade kernel reads once (deeper sharing is read per row). It
# sizes the CUDA graphs' static workspace, so it stays small: an episode's prompt plus 7 states.
MAX_CASCADE_LEVELS = 8


class RowTable:
    """Host arrays indexed by a running sequence's row: its page table and sampling parameters.

    Invariant: while a sequence is RUNNING it owns row `seq.row`, and
    `pages[seq.row, :len(seq.page_table)] == seq.page_table`; a row is owned by at most one
    sequence; entries past a table's length are stale and never read.
    """

    def __init__(self, max_rows: int, max_pages: int):
        self.max_pages = max_pages
        width = min(max_pages, 64)  # grows by doubling up to max_pages
        self.pages = np.zeros((max_rows, width), dtype=np.int32)
        self.temperature = np.ones(max_rows, dtype=np.float32)  # 1.0 on greedy rows
        self.greedy = np.zeros(max_rows, dtype=bool)
        self.top_p = np.ones(max_rows, dtype=np.float32)
        self.top_k = np.zeros(max_rows, dtype=np.int64)
        self.seed = np.zeros(max_rows, dtype=np.uint64)
        self.logprobs = np.zeros(max_rows, dtype=bool)
        # where the row's pending token (its last, a PLACEHOLDER) is in the sampled ids of the
        # step in flight; -1: none (engine.py fills the next step's input ids from it on the device)
        self.pending = np.full(max_rows, -1, dtype=np.int64)
        self._free = list(range(max_rows - 1, -1, -1))  # row 0 handed out first

    @property
    def width(self) -> int:
        return self.pages.shape[1]

    def attach(self, seq: "Sequence") -> None:
        """Give seq a row and write its page table and sampling parameters into it."""
        if seq.row >= 0:
            raise RuntimeError(f"sequence {seq.seq_id} already owns row {seq.row}")
        if not self._free:
            raise RuntimeError(f"no free row: {self.pages.shape[0]} sequences are already running")
        row = seq.row = self._free.pop()
        p = seq.params
        self.greedy[row] = p.greedy
        self.temperature[row] = 1.0 if p.greedy else p.temperature
        self.top_p[row], self.top_k[row] = p.top_p, p.top_k
        self.seed[row] = seq.seed
        self.logprobs[row] = p.logprobs
        self.pending[row] = -1
        self.write_pages(seq, 0)

    def detach(self, seq: "Sequence") -> None:
        if seq.row >= 0:
            self.pending[seq.row] = -1
            self._free.append(seq.row)
            seq.row = -1

    def write_pages(self, seq: "Sequence", start: int) -> None:
        """Copy seq.page_table[start:] into its row (after an append, or all of it from 0)."""
        table = seq.page_table
        if len(table) > self.width:
            self._grow(len(table))
        if len(table) > start:
            self.pages[seq.row, start:len(table)] = table[start:]

    def _grow(self, need: int) -> None:
        if need > self.max_pages:
            raise RuntimeError(f"page table of {need} pages exceeds the row width limit {self.max_pages}")
        width = self.width
        while width < need:
            width *= 2
        grown = np.zeros((self.pages.shape[0], min(width, self.max_pages)), dtype=np.int32)
        grown[:, :self.width] = self.pages
        self.pages = grown


@dataclass
class StepBatch:
    """Per-step attention metadata (host arrays from `build_metadata`, device tensors after `Staging.send`).

    The step's new tokens form one flat list: entry i contributes positions start_i .. end_i - 1.
    Decode rows are entries with one new token, extend rows those with more, each in batch order.
    """

    slot_mapping: torch.Tensor            # int64 [N] pool slot of each new token
    positions: torch.Tensor               # int64 [N] absolute position of each new token
    num_tokens: int
    # decode rows (None when the step has none)
    decode_token_index: torch.Tensor | None = None  # int64 [Bd] flat token of each decode row
    decode_tables: torch.Tensor | None = None       # int32 [Bd, M]
    decode_kv_lens: torch.Tensor | None = None      # int32 [Bd]
    cascade_segments: torch.Tensor | None = None    # int32 [S, 5], None: no shared prefix this step
    suffix_starts: torch.Tensor | None = None       # int32 [Bd] where each row's own positions start
    # extend rows (None when the step has none)
    extend_token_index: torch.Tensor | None = None  # int64 [Ne] flat tokens of the extend rows, in order
    extend_tables: torch.Tensor | None = None       # int32 [Be, M]
    extend_kv_lens: torch.Tensor | None = None      # int32 [Be]
    cu_seqlens_q: torch.Tensor | None = None        # int32 [Be + 1]
    max_seqlen_q: int = 0
    max_decode_kv_len: int = 0
    max_extend_kv_len: int = 0
    cascade_levels: int = 0   # levels of nested sharing (engine.kernels.shared_prefix_attention)
    num_segments: int = 0     # shared ranges, each read once for its rows
    grouped_rows: int = 0     # decode rows that share at least one range

    @property
    def num_decode(self) -> int:
        return 0 if self.decode_kv_lens is None else self.decode_kv_lens.shape[0]

    @property
    def num_extend_tokens(self) -> int:
        return 0 if self.extend_token_index is None else self.extend_token_index.shape[0]

    def tensors(self) -> dict[str, torch.Tensor | np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), (torch.Tensor, np.ndarray))}

    @classmethod
    def from_entries(cls, entries, page_size: int, *,
                     shared_prefix_min_tokens: int | None = DEFAULT_SHARED_PREFIX_MIN_TOKENS) -> "StepBatch":
        """Host metadata from (page_table, start, end) entries: for tests and one-off use."""
        width = max(1, max(len(t) for t, _, _ in entries))
        tables = np.zeros((len(entries), width), dtype=np.int32)
        for i, (table, _, _) in enumerate(entries):
            tables[i, :len(table)] = table
        starts = np.array([s for _, s, _ in entries], dtype=np.int64)
        ends = np.array([e for _, _, e in entries], dtype=np.int64)
        return build_metadata(tables, starts, ends, page_size, shared_prefix_min_tokens).as_torch()

    def as_torch(self) -> "StepBatch":
        """The same metadata with numpy arrays wrapped as CPU tensors (no copy)."""
        return replace(self, **{k: torch.from_numpy(v) for k, v in self.tensors().items() if isinstance(v, np.ndarray)})


def build_metadata(tables: np.ndarray, starts: np.ndarray, ends: np.ndarray, page_size: int,
                   shared_prefix_min_tokens: int | None) -> StepBatch:
    """StepBatch (numpy arrays) of entries whose page tables are the rows of `tables` [B, W].

    starts/ends int64 [B]: entry i computes positions [starts_i, ends_i).
    """
    P = page_size
    b = len(starts)
    q_lens = ends - starts
    if bool((q_lens == 1).all()):  # decode only: token i is row i
        positions = starts
        slots = tables[np.arange(b), starts // P].astype(np.int64) * P + starts % P
        batch = StepBatch(slots, positions, b)
        _set_decode(batch, np.arange(b, dtype=np.int64), tables, ends, P, shared_prefix_min_tokens)
        return batch
    offsets = np.cumsum(q_lens) - q_lens
    n = int(q_lens.sum())
    entry = np.repeat(np.arange(b), q_lens)
    positions = np.arange(n, dtype=np.int64) - offsets[entry] + starts[entry]
    slots = tables[entry, positions // P].astype(np.int64) * P + positions % P
    batch = StepBatch(slots, positions, n)
    decode = np.flatnonzero(q_lens == 1)
    if decode.size:
        _set_decode(batch, offsets[decode], tables[decode], ends[decode], P, shared_prefix_min_tokens)
    extend = np.flatnonzero(q_lens > 1)
    if extend.size:
        batch.extend_token_index = np.flatnonzero(q_lens[entry] > 1).astype(np.int64)
        batch.extend_tables = np.ascontiguousarray(tables[extend])
        batch.extend_kv_lens = ends[extend].astype(np.int32)
        cu = np.zeros(extend.size + 1, dtype=np.int32)
        cu[1:] = np.cumsum(q_lens[extend])
        batch.cu_seqlens_q = cu
        batch.max_seqlen_q = int(q_lens[extend].max())
        batch.max_extend_kv_len = int(ends[extend].max())
    return batch


def _set_decode(batch: StepBatch, token_index: np.ndarray, tables: np.ndarray, ends: np.ndarray, page_size: int,
                min_tokens: int | None) -> None:
    batch.decode_token_index = token_index
    batch.decode_tables = np.ascontiguousarray(tables)
    batch.decode_kv_lens = ends.astype(np.int32)
    batch.max_decode_kv_len = int(ends.max())
    if min_tokens is not None:
        layout = cascade_layout(batch.decode_tables, batch.decode_kv_lens, page_size, min_tokens)
        if layout is not None:
            batch.cascade_segments, batch.suffix_starts, batch.cascade_levels = layout
            batch.num_segments = len(batch.cascade_segments)
            batch.grouped_rows = int((batch.suffix_starts > 0).sum())


def cascade_layout(tables, kv_lens, page_size: int, min_prefix_tokens: int, max_levels: int = MAX_CASCADE_LEVELS):
    """The shared-prefix tree of a decode batch, as cascade segments (engine.kernels.shared_prefix_attention).

    tables [B, M] page ids (entries past a row's ceil(kv_len / page_size) pages are ignored),
    kv_lens [B] context lengths including the current token; numpy arrays or CPU tensors.
    Returns (segments int32 [S, 5], suffix_starts int32 [B], num_levels) of the same kind, or
    None when no two adjacent rows share `min_prefix_tokens` (rounded up to whole pages).

    Sharing is read from the page ids themselves: equal page ids hold equal K/V, whoever forked
    them. With lcp_i the number of leading pages rows i-1 and i have in common, the maximal
    row ranges whose adjacent lcps are all >= l (the lcp intervals) form a tree; an interval
    with lcp l whose parent has lcp l' becomes a segment over positions [l' * P, l * P), at the
    level of its depth. So an episode's prompt shared by all its MC states is one segment, each
    state's further prefix shared by its K rollouts a deeper one, and every distinct shared page
    is read once (within the adjacency order the scheduler keeps: forks follow their leader).
    Adjacent lcps below `min_prefix_tokens` count as 0; trees deeper than `max_levels` keep
    their first `max_levels` levels (deeper rows read the rest in their own suffix).

    Invariant (checked; a broken step raises): the page that receives a row's current token
    is never shared, since the scheduler shares only full pages of computed tokens and copies a
    partial page. So every row's suffix holds at least its current position.
    """
    if max_levels < 1:
        raise ValueError(f"max_levels must be >= 1, got {max_levels}")
    as_torch = isinstance(tables, torch.Tensor)
    if as_torch:
        tables, kv_lens = tables.numpy(), kv_lens.numpy()
    b = tables.shape[0]
    if b < 2:
        return None
    kv_lens = kv_lens.astype(np.int64)
    used = (kv_lens + page_size - 1) // page_size  # pages each row actually reads
    j = np.arange(tables.shape[1])
    both = np.minimum(used[1:], used[:-1])
    same = (tables[1:] == tables[:-1]) & (j[None, :] < both[:, None])
    lcp = np.cumprod(same, axis=1).sum(axis=1)  # [B - 1]: pages rows i and i + 1 share
    # A shared page that holds a row's current position (checked on the raw lcps, before the
    # threshold and the level cap hide any of them).
    broken = lcp * page_size >= np.minimum(kv_lens[1:], kv_lens[:-1])
    if broken.any():
        i = int(np.flatnonzero(broken)[0])
        row = i if kv_lens[i] <= kv_lens[i + 1] else i + 1
        raise RuntimeError(
            f"decode row {row} (kv_len {int(kv_lens[row])}) shares its current token's page with its siblings "
            f"(shared prefix {int(lcp[i]) * page_size} tokens): each sibling must write its own page"
        )
    lcp[lcp < max(1, -(-min_prefix_tokens // page_size))] = 0
    if not lcp.any():
        return None
    seg, suffix, num_levels = _lcp_tree(lcp.astype(np.int64).tobytes(), page_size, max_levels)
    seg, suffix = seg.copy(), suffix.copy()  # the memo's arrays stay untouched
    if as_torch:
        return torch.from_numpy(seg), torch.from_numpy(suffix), num_levels
    return seg, suffix, num_levels


@functools.lru_cache(maxsize=64)
def _lcp_tree(lcp_bytes: bytes, page_size: int, max_levels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(segments int32 [S, 5], suffix_starts int32 [B], levels) of the adjacent-row lcps (pages).

    A pure function of the lcps, memoised: from one decode step to the next the rows and what
    they share usually stay the same (only their own suffixes grow), so this pass runs once
    per change of the batch's sharing, not once per step.
    """
    lcp = np.frombuffer(lcp_bytes, dtype=np.int64)
    b = lcp.size + 1
    # lcp intervals by one stack pass over the rows (Abouelhoda et al.'s bottom-up traversal):
    # `open_` holds (lcp, first row) of the intervals still open, lcps strictly increasing.
    intervals = []  # (first, end, lcp, parent lcp), children before their parents
    open_ = [(0, 0)]
    for i in np.flatnonzero(np.diff(lcp, prepend=0, append=0)).tolist():  # rows where the lcp changes
        l = int(lcp[i]) if i < b - 1 else 0
        first = i
        while l < open_[-1][0]:
            top_lcp, first = open_.pop()
            intervals.append((first, i + 1, top_lcp, max(l, open_[-1][0])))
        if l > open_[-1][0]:
            open_.append((l, first))
    # Depths top-down: parents come after their children, so walk the list backwards.
    suffix = np.zeros(b, dtype=np.int32)
    depth_at = np.full(b, -1, dtype=np.int64)  # depth of the deepest segment placed on each row so far
    segments = []
    for first, end, l, parent_l in reversed(intervals):
        level = int(depth_at[first]) + 1  # its parent, if any, was placed already and covers `first`
        if level >= max_levels:
            continue
        depth_at[first:end] = level
        suffix[first:end] = l * page_size
        segments.append((first, end, parent_l * page_size, l * page_size, level))
    seg = np.array(segments, dtype=np.int32).reshape(-1, 5)
    return seg, suffix, int(seg[:, 4].max()) + 1


def kv_tokens_read(batch: StepBatch) -> int:
    """KV positions the decode rows of `batch` read per kv head and layer: shared segments once, suffixes per row."""
    if batch.num_decode == 0:
        return 0
    lens = np.asarray(batch.decode_kv_lens, dtype=np.int64)
    if batch.cascade_segments is None:
        return int(lens.sum())
    seg = np.asarray(batch.cascade_segments, dtype=np.int64)
    own = lens - np.asarray(batch.suffix_starts, dtype=np.int64)
    return int((seg[:, 3] - seg[:, 2]).sum() + own.sum())


def kv_tokens_ideal(batch: StepBatch, page_size: int) -> int:
    """The least KV positions the decode rows of `batch` could read: every distinct page once.

    Full pages count page_size positions once however many rows read them; a row's partial
    last page counts its filled part. (The engine never shares a page that is still being
    filled: the page of a row's current token is its own, `cascade_layout` checks it.)
    """
    if batch.num_decode == 0:
        return 0
    lens = np.asarray(batch.decode_kv_lens, dtype=np.int64)
    tables = np.asarray(batch.decode_tables)
    full = tables[np.arange(tables.shape[1])[None, :] < (lens // page_size)[:, None]]
    distinct = 0
    if full.size:  # a bitmap over page ids: cheaper than sorting them
        seen = np.zeros(int(full.max()) + 1, dtype=bool)
        seen[full] = True
        distinct = int(np.count_nonzero(seen))
    return distinct * page_size + int((lens % page_size).sum())


class Staging:
    """Moves a step's host arrays to the device in one copy (two alternating pinned buffers on CUDA).

    On a CPU device the arrays are wrapped as tensors without a copy.
    """

    ALIGN = 8

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[object | None] = [None, None]  # torch.cuda.Event of the copy that last read each buffer
        self._next = 0

    def send(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return {k: torch.from_numpy(a) for k, a in arrays.items()}
        layout, total = [], 0
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            layout.append((name, a, total))
            total += -(-a.nbytes // self.ALIGN) * self.ALIGN
        i = self._next
        self._next = 1 - i
        if self._events[i] is not None:
            self._events[i].synchronize()  # the copy that last read this buffer is done
        buf = self._buffers[i]
        if buf is None or buf.numel() < total:
            buf = self._buffers[i] = torch.empty(max(total, 1 << 16), dtype=torch.uint8,
                                                 pin_memory=self.device.type == "cuda")
        host = buf.numpy()
        for _, a, off in layout:
            host[off:off + a.nbytes] = a.view(np.uint8).reshape(-1)
        dev = buf[:total].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # (the copy's stream: the Engine's device, not
            #                                                       the current one, e.g. cuda:1 in one process)
            self._events[i] = event
        out = {}
        for name, a, off in layout:
            dtype = torch.from_numpy(a[:0]).dtype
            out[name] = dev[off:off + a.nbytes].view(dtype).view(a.shape)
        return out
