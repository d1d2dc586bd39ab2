"""The Triton attention backend over the paged KV pool: per-step metadata and the layer context.

`TritonBatch.build` turns the scheduler's (page_table, start, end) entries into the kernels'
metadata once per step, on the host, and `to(device)` moves it in one copy per dtype; every
layer then reuses it. `TritonPagedAttention` is the attention context the model calls per
layer (`ctx(layer, q, k, v)`, as `TorchPagedAttention`): `store_kv` writes the step's new K/V
into the pool, then

- decode rows (one new token) go through `shared_prefix_decode_attention` when the step has
  sibling groups (below) and the layer has no sliding window, else through `decode_attention`
  (with the layer's window);
- extend rows (a prefill chunk, several new tokens) go through `extend_attention`.

Sibling groups. The scheduler runs a fork's siblings next to each other, and siblings (and
any sequences that hit the same cached prefix) hold the same page ids for their shared full
pages. `sibling_groups` compares each decode row's page table with the previous row's; the
common leading pages are the prefix the two rows share. Rule: row i starts a new group when
it shares fewer than `min_pages = ceil(min_prefix_tokens / page_size)` pages with row i-1,
or fewer than row i-1 shared with row i-2 (a drop in sharing marks the start of another
fork's siblings, which usually share a longer prefix among themselves). A group's prefix
is the minimum of its non-first rows' common pages, times page_size. Groups of one row get
prefix 0; when no group has two rows the step runs plain `decode_attention`.

Invariant: the page that receives a row's current token is never a shared page (each
sibling writes its own token: the scheduler shares only full pages of computed tokens and
copies a partial page). So a group's prefix ends at or before every member's current
position; `sibling_groups` checks this on the host and raises if it is broken.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import Sequence as Seq

import torch

from engine.runtime.paged_attention import DEFAULT_SHARED_PREFIX_MIN_TOKENS, KVPool
from kernels.decode_attention import decode_attention
from kernels.extend_attention import extend_attention
from kernels.shared_prefix_attention import shared_prefix_decode_attention
from kernels.store_kv import store_kv


def sibling_groups(tables: torch.Tensor, kv_lens: torch.Tensor, page_size: int,
                   min_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Group consecutive decode rows that share leading pages (see the module docstring).

    tables [B, M] page ids (entries past a row's ceil(kv_len / page_size) pages are ignored),
    kv_lens [B] context lengths including the current token; CPU tensors. Returns
    (group_offsets int32 [G + 1], prefix_lens int32 [G]), or None when no group has >= 2 rows.
    """
    b = tables.shape[0]
    if b < 2:
        return None
    kv_lens = kv_lens.to(torch.int64)
    used = (kv_lens + page_size - 1) // page_size  # pages each row actually reads
    j = torch.arange(tables.shape[1])
    both = torch.minimum(used[1:], used[:-1])
    same = (tables[1:] == tables[:-1]) & (j[None, :] < both[:, None])
    common = torch.cat([torch.zeros(1, dtype=torch.int64), same.to(torch.int64).cumprod(1).sum(1)])
    min_pages = max(1, -(-min_prefix_tokens // page_size))
    prev = torch.cat([torch.zeros(1, dtype=torch.int64), common[:-1]])
    starts = (common < min_pages) | (common < prev)  # row 0 always starts: common[0] = 0
    group = torch.cumsum(starts.to(torch.int64), 0) - 1
    g = int(group[-1]) + 1
    sizes = torch.bincount(group, minlength=g)
    if int(sizes.max()) < 2:
        return None
    # A group's first row does not count: its `common` is with the previous group.
    joined = torch.where(starts, torch.full_like(common, torch.iinfo(torch.int64).max), common)
    prefix_pages = torch.full((g,), torch.iinfo(torch.int64).max).scatter_reduce(0, group, joined, "amin")
    prefix_lens = torch.where(sizes >= 2, prefix_pages * page_size, 0)
    if bool((prefix_lens[group] >= kv_lens).any()):
        row = int(torch.nonzero(prefix_lens[group] >= kv_lens)[0])
        raise RuntimeError(
            f"decode row {row} (kv_len {int(kv_lens[row])}) shares its current token's page with its siblings "
            f"(shared prefix {int(prefix_lens[group[row]])} tokens): each sibling must write its own page"
        )
    offsets = torch.zeros(g + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(sizes, 0)
    return offsets, prefix_lens.to(torch.int32)


@dataclass
class TritonBatch:
    """Per-step metadata of the Triton backend (CPU from `build`, on the pool's device after `to`).

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
    group_offsets: torch.Tensor | None = None       # int32 [G + 1], None: no sibling group this step
    prefix_lens: torch.Tensor | None = None         # int32 [G]
    # extend rows (None when the step has none)
    extend_token_index: torch.Tensor | None = None  # int64 [Ne] flat tokens of the extend rows, in order
    extend_tables: torch.Tensor | None = None       # int32 [Be, M]
    extend_kv_lens: torch.Tensor | None = None      # int32 [Be]
    cu_seqlens_q: torch.Tensor | None = None        # int32 [Be + 1]
    max_seqlen_q: int = 0
    max_decode_kv_len: int = 0

    @property
    def num_decode(self) -> int:
        return 0 if self.decode_kv_lens is None else self.decode_kv_lens.shape[0]

    @property
    def num_extend_tokens(self) -> int:
        return 0 if self.extend_token_index is None else self.extend_token_index.shape[0]

    @property
    def num_groups(self) -> int:
        """Sibling groups of >= 2 rows (the ones whose prefix is read once for the group)."""
        if self.group_offsets is None:
            return 0
        return int(((self.group_offsets[1:] - self.group_offsets[:-1]) >= 2).sum())

    @property
    def grouped_rows(self) -> int:
        if self.group_offsets is None:
            return 0
        sizes = self.group_offsets[1:] - self.group_offsets[:-1]
        return int(sizes[sizes >= 2].sum())

    @classmethod
    def build(cls, entries: Seq[tuple[Seq[int], int, int]], page_size: int, *,
              shared_prefix_min_tokens: int | None = DEFAULT_SHARED_PREFIX_MIN_TOKENS) -> "TritonBatch":
        """entries: (page_table, start, end) per sequence; tokens [start, end) are computed now.

        shared_prefix_min_tokens: the smallest shared prefix worth a sibling group; None: no groups.
        """
        n = len(entries)
        starts = torch.tensor([s for _, s, _ in entries], dtype=torch.int64)
        ends = torch.tensor([e for _, _, e in entries], dtype=torch.int64)
        table_lens = torch.tensor([len(t) for t, _, _ in entries], dtype=torch.int64)
        width = max(1, int(table_lens.max()))
        tables = torch.zeros(n, width, dtype=torch.int32)  # padding 0: an in-range page id, never read
        tables[torch.arange(width)[None, :] < table_lens[:, None]] = torch.tensor(
            list(itertools.chain.from_iterable(t for t, _, _ in entries)), dtype=torch.int32)
        q_lens = ends - starts
        offsets = torch.cumsum(q_lens, 0) - q_lens
        seq_of_token = torch.repeat_interleave(torch.arange(n), q_lens)
        num_tokens = int(q_lens.sum())
        positions = torch.arange(num_tokens) - offsets[seq_of_token] + starts[seq_of_token]
        slot_mapping = tables[seq_of_token, positions // page_size].to(torch.int64) * page_size + positions % page_size
        batch = cls(slot_mapping, positions, num_tokens)
        decode = torch.nonzero(q_lens == 1).flatten()
        if decode.numel():
            batch.decode_token_index = offsets[decode]
            batch.decode_tables = tables[decode]
            batch.decode_kv_lens = ends[decode].to(torch.int32)
            batch.max_decode_kv_len = int(ends[decode].max())
            if shared_prefix_min_tokens is not None:
                groups = sibling_groups(batch.decode_tables, batch.decode_kv_lens, page_size, shared_prefix_min_tokens)
                if groups is not None:
                    batch.group_offsets, batch.prefix_lens = groups
        extend = torch.nonzero(q_lens > 1).flatten()
        if extend.numel():
            batch.extend_token_index = torch.nonzero(q_lens[seq_of_token] > 1).flatten()
            batch.extend_tables = tables[extend]
            batch.extend_kv_lens = ends[extend].to(torch.int32)
            cu = torch.zeros(extend.numel() + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(q_lens[extend], 0)
            batch.cu_seqlens_q = cu
            batch.max_seqlen_q = int(q_lens[extend].max())
        return batch

    def to(self, device: torch.device | str) -> "TritonBatch":
        """The same metadata on `device`, moved with one host-to-device copy per dtype."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        moved: dict[str, torch.Tensor] = {}
        for dtype in (torch.int64, torch.int32):
            group = [name for name in names if getattr(self, name).dtype == dtype]
            if not group:
                continue
            flat = torch.cat([getattr(self, name).reshape(-1) for name in group]).to(device, non_blocking=True)
            for name, part in zip(group, flat.split([getattr(self, name).numel() for name in group])):
                moved[name] = part.view(getattr(self, name).shape)
        return replace(self, **moved)


class TritonPagedAttention:
    """Attention context over the paged pool that runs the Triton kernels: `ctx(layer, q, k, v)`.

    q [1, N, Hq, D], k/v [1, N, Hkv, D] for the step's N new tokens (already RoPE'd); returns
    [1, N, Hq, D]. Writes k/v into the pool first, so a token attends to itself and its context.
    """

    def __init__(self, pool: KVPool, batch: TritonBatch, windows: Seq[int | None], page_size: int, scale: float):
        self.pool, self.batch, self.windows = pool, batch, windows
        self.page_size, self.scale = page_size, scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        kc, vc = self.pool.kv[layer, 0], self.pool.kv[layer, 1]
        store_kv(k[0], v[0], kc, vc, b.slot_mapping)
        window = self.windows[layer]
        q = q[0]
        if b.num_extend_tokens == 0:  # decode only: row i is token i
            return self._decode(q, kc, vc, window)[None]
        if b.num_decode == 0:  # extend only: the extend rows cover the flat token list in order
            return self._extend(q, kc, vc, window)[None]
        out = torch.empty_like(q)
        out[b.decode_token_index] = self._decode(q[b.decode_token_index], kc, vc, window)
        out[b.extend_token_index] = self._extend(q[b.extend_token_index], kc, vc, window)
        return out[None]

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, window: int | None) -> torch.Tensor:
        b = self.batch
        if b.group_offsets is not None and window is None:
            return shared_prefix_decode_attention(q, kc, vc, b.decode_tables, b.decode_kv_lens, self.page_size,
                                                  self.scale, b.group_offsets, b.prefix_lens)
        return decode_attention(q, kc, vc, b.decode_tables, b.decode_kv_lens, self.page_size, self.scale,
                                window=window)

    def _extend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, window: int | None) -> torch.Tensor:
        b = self.batch
        return extend_attention(q, kc, vc, b.extend_tables, b.cu_seqlens_q, b.extend_kv_lens, self.page_size,
                                self.scale, window=window, max_seqlen_q=b.max_seqlen_q)


class StaticDecodeAttention:
    """Decode-only attention context over fixed buffers, for CUDA-graph capture and replay.

    Every tensor it reads (slot_mapping [B], page_tables [B, M], kv_lens [B]) is a static
    buffer that the caller refills before each replay; kernel grids and `num_splits` depend
    only on B, M and the model, never on the values, so a captured graph stays valid.
    """

    def __init__(self, pool: KVPool, slot_mapping: torch.Tensor, page_tables: torch.Tensor, kv_lens: torch.Tensor,
                 windows: Seq[int | None], page_size: int, scale: float, num_splits: int):
        self.pool, self.slot_mapping, self.page_tables, self.kv_lens = pool, slot_mapping, page_tables, kv_lens
        self.windows, self.page_size, self.scale, self.num_splits = windows, page_size, scale, num_splits

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.pool.kv[layer, 0], self.pool.kv[layer, 1]
        store_kv(k[0], v[0], kc, vc, self.slot_mapping)
        out = decode_attention(q[0], kc, vc, self.page_tables, self.kv_lens, self.page_size, self.scale,
                               window=self.windows[layer], num_splits=self.num_splits)
        return out[None]
