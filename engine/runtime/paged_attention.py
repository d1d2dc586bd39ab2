"""The KV pool and the torch reference attention over it (the engine's inference path).

Layout: `kv[layer, 0 | 1, slot, kv_head, head_dim]`, where slot = page * page_size + offset.
One forward step runs a flat list of new tokens (decode tokens and prefill chunks of many
sequences); `PagedBatch` holds the per-step metadata that every layer reuses, and
`TorchPagedAttention` is the attention context the model calls per layer: it writes the new
K/V into the pool, then attends each sequence's queries to its paged KV. Decode rows
(one query) and extend rows (several) are attended in two separate batched calls so a
long prefill chunk does not pad hundreds of decode rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch
import torch.nn.functional as F


# Sibling groups (triton backend): the smallest shared prefix, in tokens, worth reading once per group.
DEFAULT_SHARED_PREFIX_MIN_TOKENS = 16


@dataclass
class AttentionStats:
    """What the attention backend did, counted per forward step (since the Engine was built or `reset`)."""

    shared_prefix_steps: int = 0   # steps whose decode rows ran through the shared-prefix kernel
    shared_prefix_groups: int = 0  # sibling groups (>= 2 rows sharing a prefix) in those steps
    shared_prefix_rows: int = 0    # decode rows inside those groups
    graph_steps: int = 0           # decode steps run by the static-buffer runner (CUDA graph replay or its eager twin)
    graph_padded_rows: int = 0     # padding rows those steps added to reach a captured batch size

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, 0)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class KVPool:
    """K and V of every token slot, for every layer, in one tensor."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.zeros(num_layers, 2, num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_slots(self) -> int:
        return self.kv.shape[2]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """KV of slots `src` into slots `dst`, in every layer (the partial-page fork)."""
        self.kv[:, :, dst] = self.kv[:, :, src]


@dataclass
class _Rows:
    """Sequences attended together: queries padded to max_q, KV to max_kv."""

    token_index: torch.Tensor  # [B, max_q] index into the step's flat token list (padding: 0)
    q_valid: torch.Tensor      # [B, max_q]
    q_pos: torch.Tensor        # [B, max_q] absolute position of each query
    kv_slots: torch.Tensor     # [B, max_kv] pool slot of each context position (padding: 0)
    kv_len: torch.Tensor       # [B]

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, max_q, max_kv] bool: causal, within the context, within the window."""
        j = torch.arange(self.kv_slots.shape[1], device=self.kv_slots.device)
        pos = self.q_pos[:, :, None]
        allowed = (j <= pos) & (j < self.kv_len[:, None, None])
        if window is not None:
            allowed &= j > pos - window
        allowed[:, :, 0] |= ~self.q_valid  # padded query rows see slot 0 only: finite, ignored
        return allowed[:, None]


@dataclass
class PagedBatch:
    """Per-step metadata: where each new token's KV goes and what each sequence attends to."""

    slot_mapping: torch.Tensor   # [N] pool slot of each new token
    positions: torch.Tensor      # [N] absolute position of each new token
    rows: list[_Rows]            # decode rows, extend rows (each present only if non-empty)

    @classmethod
    def build(cls, entries: Seq[tuple[Seq[int], int, int]], page_size: int, device: torch.device | str) -> "PagedBatch":
        """entries: (page_table, start, end) per sequence; tokens [start, end) are computed now."""
        starts = torch.tensor([s for _, s, _ in entries])
        ends = torch.tensor([e for _, _, e in entries])
        max_pages = max(len(t) for t, _, _ in entries)
        tables = torch.zeros(len(entries), max_pages, dtype=torch.long)
        for i, (table, _, _) in enumerate(entries):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        q_lens = ends - starts
        offsets = torch.cumsum(q_lens, 0) - q_lens
        # Flat token list: sequence i contributes positions start_i .. end_i - 1.
        seq_of_token = torch.repeat_interleave(torch.arange(len(entries)), q_lens)
        positions = torch.arange(int(q_lens.sum())) - offsets[seq_of_token] + starts[seq_of_token]
        slot_mapping = tables[seq_of_token, positions // page_size] * page_size + positions % page_size
        rows = []
        for picked in (q_lens == 1, q_lens > 1):  # decode rows, then extend rows
            idx = torch.nonzero(picked).flatten()
            if idx.numel() == 0:
                continue
            max_q, max_kv = int(q_lens[idx].max()), int(ends[idx].max())
            i = torch.arange(max_q)
            q_valid = i[None, :] < q_lens[idx, None]
            token_index = torch.where(q_valid, offsets[idx, None] + i[None, :], 0)
            q_pos = starts[idx, None] + i[None, :]
            p = torch.arange(max_kv)
            kv_slots = tables[idx][:, (p // page_size).clamp(max=max_pages - 1)] * page_size + p % page_size
            kv_slots = torch.where(p[None, :] < ends[idx, None], kv_slots, 0)
            rows.append(_Rows(*(t.to(device) for t in (token_index, q_valid, q_pos, kv_slots, ends[idx]))))
        return cls(slot_mapping.to(device), positions.to(device), rows)


class TorchPagedAttention:
    """Reference attention context over the paged pool: `ctx(layer, q, k, v)`.

    q [1, N, Hq, D], k/v [1, N, Hkv, D] for the step's N new tokens; returns [1, N, Hq, D].
    Writes k/v into the pool first, so a token attends to itself and its whole context.
    """

    def __init__(self, pool: KVPool, batch: PagedBatch, windows: Seq[int | None]):
        self.pool, self.batch, self.windows = pool, batch, windows
        self._masks: dict[tuple[int, int | None], torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.pool.kv[layer, 0], self.pool.kv[layer, 1]
        kc[self.batch.slot_mapping] = k[0].to(kc.dtype)
        vc[self.batch.slot_mapping] = v[0].to(vc.dtype)
        out = torch.empty_like(q[0])
        window = self.windows[layer]
        for r, rows in enumerate(self.batch.rows):
            key = (r, window)
            if key not in self._masks:
                self._masks[key] = rows.mask(window)
            qs = q[0][rows.token_index]  # [B, max_q, Hq, D]
            ks, vs = kc[rows.kv_slots].to(q.dtype), vc[rows.kv_slots].to(q.dtype)
            o = F.scaled_dot_product_attention(
                qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                attn_mask=self._masks[key], enable_gqa=qs.shape[2] != ks.shape[2],
            ).transpose(1, 2)
            out[rows.token_index[rows.q_valid]] = o[rows.q_valid]
        return out[None]
