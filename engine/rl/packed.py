"""Episodes packed back to back for one training forward (no padding), and micro-batch chunks."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from engine.rl.rollout import Episode

T = TypeVar("T")


@dataclass
class Packed:
    """Episodes packed back to back for one training forward (no padding)."""

    ids: torch.Tensor      # [1, T] prompt + response tokens of every episode
    cu: torch.Tensor       # [S + 1] sequence starts
    rows: torch.Tensor     # [N] positions whose hidden state predicts a response token
    targets: torch.Tensor  # [N] the response tokens
    lengths: list[int]     # response length per episode

    @classmethod
    def build(cls, episodes: Sequence[Episode], device: torch.device) -> "Packed":
        ids, rows, targets, lengths, cu, start = [], [], [], [], [0], 0
        for ep in episodes:
            p, r = len(ep.prompt_ids), len(ep.response_ids)
            ids += ep.prompt_ids + ep.response_ids
            rows.append(torch.arange(start + p - 1, start + p + r - 1))
            targets += ep.response_ids
            lengths.append(r)
            start += p + r
            cu.append(start)
        t = lambda x: torch.as_tensor(x, dtype=torch.long).to(device)  # noqa: E731
        return cls(t(ids)[None], t(cu), torch.cat(rows).to(device), t(targets), lengths)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """[N] per-token values -> [S, max_len], zero-padded on the right."""
        return nn.utils.rnn.pad_sequence(list(flat.split(self.lengths)), batch_first=True)

    def mask(self) -> torch.Tensor:
        return self.pad(torch.ones(len(self.targets), dtype=torch.bool, device=self.targets.device))


def chunks(xs: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive slices of `size` (the last one may be shorter)."""
    for i in range(0, len(xs), size):
        yield list(xs[i: i + size])
