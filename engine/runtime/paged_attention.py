"""The KV pool and the torch reference attention over it (the engine's inference path).

Layout: `kv[layer, 0 | 1, slot, kv_head, head_dim]`, where slot = page * page_size + offset.
One forward step runs a flat list of new tokens (decode tokens and prefill chunks of many
sequences); `StepBatch` (engine/runtime/batch.py) holds the per-step metadata every layer reuses, and
`TorchPagedAttention` is the attention context the model calls per layer: it writes the new
K/V into the pool, then attends each sequence's queries to its paged KV. Decode rows
(one query) and extend rows (several) are attended in two separate batched calls so a
long prefill chunk does not pad hundreds of decode rows; `torch_rows` derives this
backend's padded views from the common metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch
import torch.nn.functional as F

from engine.runtime.batch import StepBatch, kv_tokens_ideal, kv_tokens_read



@dataclass
class AttentionStats:
    """What the attention backend did, counted per forward step (since the Engine was built or `reset`).

    KV reads are counted in positions per kv head and layer of full-attention layers (layers
    with a sliding window read their window per row). `kv_tokens_ideal` is what a step would
    read if every distinct page were read once (its filled part): the bound that sharing can reach.
    """

    decode_steps: int = 0          # steps with decode rows
    decode_only_steps: int = 0     # steps with decode rows only (the ones a CUDA graph can serve)
    kv_tokens_read: int = 0        # positions the decode rows read (shared ranges once, the rest per row)
    kv_tokens_ideal: int = 0       # every distinct page once
    kv_tokens_flat: int = 0        # every row its whole context (no sharing)
    shared_prefix_steps: int = 0   # steps whose decode rows read shared prefixes once (the cascade kernel)
    shared_prefix_segments: int = 0  # shared ranges in those steps (each read once for its rows)
    shared_prefix_rows: int = 0    # decode rows that share at least one range, in those steps
    graph_steps: int = 0           # decode steps run by the static-buffer runner (CUDA graph replay or its eager twin)
    graph_shared_steps: int = 0    # graph steps with shared prefixes (the cascade variant)
    graph_padded_rows: int = 0     # padding rows those steps added to reach a captured batch size

    def record(self, batch: StepBatch, page_size: int) -> None:
        """Count one step's decode rows (host metadata; the cascade counts when the batch has one)."""
        if batch.num_decode == 0:
            return
        self.decode_steps += 1
        self.decode_only_steps += batch.num_extend_tokens == 0
        self.kv_tokens_read += kv_tokens_read(batch)
        self.kv_tokens_ideal += kv_tokens_ideal(batch, page_size)
        self.kv_tokens_flat += int(batch.decode_kv_lens.sum())
        if batch.cascade_segments is not None:
            self.shared_prefix_steps += 1
            self.shared_prefix_segments += batch.num_segments
            self.shared_prefix_rows += batch.grouped_rows

    @property
    def read_over_ideal(self) -> float | None:
        """KV positions read / the ideal (1.0 is the bound; None before any decode step)."""
        return self.kv_tokens_read / self.kv_tokens_ideal if self.kv_tokens_ideal else None

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, 0)

    def as_dict(self) -> dict[str, float | None]:
        return {**{f: getattr(self, f) for f in self.__dataclass_fields__}, "read_over_ideal": self.read_over_ideal}


class KVPool:
    """K and V of every token slot, for every layer, in one tensor."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.shape = (num_layers, 2, num_slots, num_kv_heads, head_dim)
        self.kv = torch.zeros(self.shape, dtype=dtype, device=device)

    @property
    def allocated(self) -> bool:
        return self.kv.numel() > 0

    def release(self) -> None:
        """Give the pool's memory back (its contents are lost); `allocate` brings it back."""
        self.kv = self.kv.new_empty(0)

    def allocate(self) -> None:
        """The pool's memory again, zeroed (padding rows read slot 0: it must be finite)."""
        if not self.allocated:
            self.kv = torch.zeros(self.shape, dtype=self.kv.dtype, device=self.kv.device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_slots(self) -> int:
        return self.shape[2]

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


def torch_rows(batch: StepBatch, page_size: int) -> list[_Rows]:
    """The reference backend's padded rows (decode rows, then extend rows), derived on the device
    from the step's common metadata (`engine.runtime.batch.StepBatch`)."""
    rows = []
    if batch.num_decode:
        kv_lens = batch.decode_kv_lens.long()
        token_index = batch.decode_token_index[:, None]
        q_valid = torch.ones_like(token_index, dtype=torch.bool)
        rows.append(_padded_rows(token_index, q_valid, (kv_lens - 1)[:, None], batch.decode_tables, kv_lens,
                                 batch.max_decode_kv_len, page_size))
    if batch.num_extend_tokens:
        kv_lens = batch.extend_kv_lens.long()
        cu = batch.cu_seqlens_q.long()
        q_lens = cu[1:] - cu[:-1]
        i = torch.arange(batch.max_seqlen_q, device=cu.device)[None, :]
        q_valid = i < q_lens[:, None]
        flat = torch.where(q_valid, cu[:-1, None] + i, 0)
        token_index = torch.where(q_valid, batch.extend_token_index[flat], 0)
        q_pos = (kv_lens - q_lens)[:, None] + i
        rows.append(_padded_rows(token_index, q_valid, q_pos, batch.extend_tables, kv_lens,
                                 batch.max_extend_kv_len, page_size))
    return rows


def _padded_rows(token_index, q_valid, q_pos, tables, kv_lens, max_kv: int, page_size: int) -> _Rows:
    p = torch.arange(max_kv, device=kv_lens.device)
    pages = tables[:, (p // page_size).clamp(max=tables.shape[1] - 1)].long()
    kv_slots = torch.where(p[None, :] < kv_lens[:, None], pages * page_size + p % page_size, 0)
    return _Rows(token_index, q_valid, q_pos, kv_slots, kv_lens)


class TorchPagedAttention:
    """Reference attention context over the paged pool: `ctx(layer, q, k, v)`.

    q [1, N, Hq, D], k/v [1, N, Hkv, D] for the step's N new tokens; returns [1, N, Hq, D].
    Writes k/v into the pool first, so a token attends to itself and its whole context.
    """

    def __init__(self, pool: KVPool, batch: StepBatch, windows: Seq[int | None], page_size: int):
        self.pool, self.batch, self.windows, self.page_size = pool, batch, windows, page_size
        self._rows: list[_Rows] | None = None  # derived at the first layer (device work, not the host's)
        self._masks: dict[tuple[int, int | None], torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.pool.kv[layer, 0], self.pool.kv[layer, 1]
        kc[self.batch.slot_mapping] = k[0].to(kc.dtype)
        vc[self.batch.slot_mapping] = v[0].to(vc.dtype)
        out = torch.empty_like(q[0])
        window = self.windows[layer]
        if self._rows is None:
            self._rows = torch_rows(self.batch, self.page_size)
        for r, rows in enumerate(self._rows):
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
