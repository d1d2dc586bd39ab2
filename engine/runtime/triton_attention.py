"""The Triton attention backend over the paged KV pool: the layer context.

`TritonPagedAttention` is the attention context the model calls per layer (`ctx(layer, q,
k, v)`, as `TorchPagedAttention`). It reads the step's common metadata (`StepBatch`, built
once per step by engine/runtime/batch.py and already on the device): `store_kv` writes the
step's new K/V into the pool, then

- decode rows (one new token) go through `cascade_decode_attention` when the step has shared
  prefixes (`batch.cascade_segments`, `batch.suffix_starts`: each shared range is read once for
  all its rows) and the layer has no sliding window, else through `decode_attention` (with the
  layer's window);
- extend rows (a prefill chunk, several new tokens) go through `extend_attention`.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.runtime.batch import StepBatch
from engine.runtime.paged_attention import KVPool
from engine.kernels.decode_attention import decode_attention
from engine.kernels.extend_attention import extend_attention
from engine.kernels.shared_prefix_attention import cascade_decode_attention
from engine.kernels.store_kv import store_kv


class TritonPagedAttention:
    """Attention context over the paged pool that runs the Triton kernels: `ctx(layer, q, k, v)`.

    q [1, N, Hq, D], k/v [1, N, Hkv, D] for the step's N new tokens (already RoPE'd); returns
    [1, N, Hq, D]. Writes k/v into the pool first, so a token attends to itself and its context.
    """

    def __init__(self, pool: KVPool, batch: StepBatch, windows: Seq[int | None], page_size: int, scale: float):
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
        if b.cascade_segments is not None and window is None:
            return cascade_decode_attention(q, kc, vc, b.decode_tables, b.decode_kv_lens, self.page_size, self.scale,
                                            b.cascade_segments, b.suffix_starts, b.cascade_levels)
        return decode_attention(q, kc, vc, b.decode_tables, b.decode_kv_lens, self.page_size, self.scale,
                                window=window)

    def _extend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, window: int | None) -> torch.Tensor:
        b = self.batch
        return extend_attention(q, kc, vc, b.extend_tables, b.cu_seqlens_q, b.extend_kv_lens, self.page_size,
                                self.scale, window=window, max_seqlen_q=b.max_seqlen_q)


class StaticDecodeAttention:
    """Decode-only attention context over fixed buffers, for CUDA-graph capture and replay.

    Every tensor it reads (slot_mapping [B], page_tables [B, M], kv_lens [B], and with `shared`
    = (segments [B, 5], suffix_starts [B], levels, prefix splits) the cascade's) is a static buffer that the caller
    refills before each replay; kernel grids and split counts depend only on B, M, the level
    count and the model, never on the values, so a captured graph stays valid. Layers with a
    sliding window always take the plain decode kernel.
    """

    def __init__(self, pool: KVPool, slot_mapping: torch.Tensor, page_tables: torch.Tensor, kv_lens: torch.Tensor,
                 windows: Seq[int | None], page_size: int, scale: float, num_splits: int,
                 shared: tuple[torch.Tensor, torch.Tensor, int, int] | None = None):
        self.pool, self.slot_mapping, self.page_tables, self.kv_lens = pool, slot_mapping, page_tables, kv_lens
        self.windows, self.page_size, self.scale, self.num_splits = windows, page_size, scale, num_splits
        self.shared = shared

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.pool.kv[layer, 0], self.pool.kv[layer, 1]
        store_kv(k[0], v[0], kc, vc, self.slot_mapping)
        window = self.windows[layer]
        if self.shared is not None and window is None:
            segments, suffix_starts, levels, prefix_splits = self.shared
            out = cascade_decode_attention(q[0], kc, vc, self.page_tables, self.kv_lens, self.page_size, self.scale,
                                           segments, suffix_starts, levels, prefix_splits=prefix_splits,
                                           suffix_splits=self.num_splits)
        else:
            out = decode_attention(q[0], kc, vc, self.page_tables, self.kv_lens, self.page_size, self.scale,
                                   window=window, num_splits=self.num_splits)
        return out[None]
