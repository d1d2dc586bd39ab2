"""Attention over dense sequences: the training path of the model.

The Transformer never calls an attention function directly. Each forward builds one
*attention context* that holds the per-call metadata (padding, sequence boundaries) and is
called per layer as `ctx(layer, q, k, v)` with q [B, T, Hq, D], k/v [B, T, Hkv, D], returning
[B, T, Hq, D]. The paged-KV inference path of the engine plugs in a context of its own with
the same signature, so the model code is shared by training and sampling.

Invariants of every context here: causal (token t sees tokens <= t of its own sequence);
a layer with a sliding window w lets t see only the w most recent tokens (t - j < w, the
transformers convention); queries never see another sequence's or a padding token.
"""
from __future__ import annotations

import functools
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@functools.lru_cache(maxsize=1)
def flash_attn_varlen():
    """flash-attn's varlen kernel, or None when the package is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """SDPA on [B, T, H, D] layout with grouped KV heads."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=causal and mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _band_mask(t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[t, t] bool: True where query i may attend key j (causal, optionally windowed)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


class PaddedAttention:
    """Causal attention over a batch [B, T], optionally with a key padding mask.

    `valid` [B, T] marks real tokens (True) and padding (False); left and right padding
    both work. A padding query attends to itself only, so its (ignored) output is finite.
    """

    def __init__(self, valid: torch.Tensor | None, windows: Sequence[int | None], seq_len: int):
        self.valid = valid
        self.windows = windows
        self.seq_len = seq_len
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def _mask(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        if window is not None and window >= self.seq_len:
            window = None  # the window covers the whole sequence: plain causal
        if window not in self._masks:
            if self.valid is None and window is None:
                self._masks[window] = None  # SDPA's own is_causal path
            else:
                mask = _band_mask(self.seq_len, window, device)[None, None]
                if self.valid is not None:
                    eye = torch.eye(self.seq_len, dtype=torch.bool, device=device)
                    mask = mask & self.valid[:, None, None, :] | eye
                self._masks[window] = mask
        return self._masks[window]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _sdpa(q, k, v, self._mask(self.windows[layer], q.device), causal=True)


class VarlenAttention:
    """Causal attention over sequences packed along T of a [1, T] batch (no padding).

    `cu_seqlens` [S + 1] holds the boundaries: sequence s is tokens cu[s]:cu[s+1].
    Backend "flash" runs flash-attn's varlen kernel (CUDA, fp16/bf16); "sdpa" runs one
    SDPA call per sequence, which never builds a [T, T] mask.
    """

    def __init__(self, cu_seqlens: torch.Tensor, windows: Sequence[int | None], backend: str = "sdpa"):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.bounds = cu_seqlens.tolist()
        self.max_seqlen = max(e - s for s, e in zip(self.bounds[:-1], self.bounds[1:]))
        self.windows = windows
        if backend == "flash" and flash_attn_varlen() is None:
            raise RuntimeError("attention backend 'flash' asked for, but flash-attn is not installed")
        self.backend = backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        window = self.windows[layer]
        if self.backend == "flash":
            cu = self.cu_seqlens.to(q.device)
            out = flash_attn_varlen()(
                q[0], k[0], v[0], cu, cu, self.max_seqlen, self.max_seqlen, causal=True,
                window_size=(window - 1, 0) if window is not None else (-1, -1),
            )
            return out[None]
        out = torch.empty_like(q)
        for s, e in zip(self.bounds[:-1], self.bounds[1:]):
            n = e - s
            mask = None if window is None or window >= n else _band_mask(n, window, q.device)
            out[:, s:e] = _sdpa(q[:, s:e], k[:, s:e], v[:, s:e], mask, causal=True)
        return out


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence boundaries of a packed [1, T] (or [T]) position tensor.

    A sequence starts at t = 0 and wherever the position does not continue the previous
    one (position[t] != position[t-1] + 1), e.g. [0 1 2 0 1 0 1 2 3] -> [0 3 5 9].
    """
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = torch.nonzero(starts).reshape(-1)
    return torch.cat([idx, idx.new_tensor([pos.numel()])]).to(torch.int32)
