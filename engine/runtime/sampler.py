"""Next-token sampling: temperature, top-k, top-p, per-request generators."""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from engine.runtime.params import SamplingParams


def sample(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    generators: Seq[torch.Generator | None],
) -> tuple[list[int], list[float]]:
    """Sample one token per row of logits [B, V] (any float dtype; math in fp32).

    Row b follows params[b]; a row with a generator draws only from it, and every step of
    the filtering is row-wise, so a seeded row's token does not depend on the other rows.
    Returns the tokens and their log-probabilities under softmax(logits / temperature)
    (temperature 1 for greedy rows), before the top-k / top-p cut.
    """
    logits = logits.float()
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    scaled = logits / temps[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.any()):
        tokens[greedy] = logits[greedy].argmax(-1)
    sampled_rows = [b for b, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filtered_probs(logprobs[rows], [params[b] for b in sampled_rows])
        free = [r for r, b in enumerate(sampled_rows) if generators[b] is None]
        if free:
            tokens[rows[free]] = torch.multinomial(probs[free], 1).squeeze(1)
        for r, b in enumerate(sampled_rows):
            if generators[b] is not None:
                tokens[b] = torch.multinomial(probs[r], 1, generator=generators[b])[0]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens.tolist(), chosen.tolist()


def _filtered_probs(logprobs: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """Probabilities after each row's top-k and top-p cut (rows renormalised)."""
    top_k = torch.tensor([p.top_k for p in params], device=logprobs.device)
    top_p = torch.tensor([p.top_p for p in params], device=logprobs.device)
    if bool((top_k == 0).all()) and bool((top_p == 1).all()):
        return logprobs.exp()
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    rank = torch.arange(logprobs.shape[-1], device=logprobs.device)[None, :]
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
    probs_sorted = sorted_lp.exp()
    # Keep a token if the mass strictly before it is below top_p: the smallest prefix whose
    # mass reaches top_p survives, and the most likely token always does.
    mass_before = probs_sorted.cumsum(-1) - probs_sorted
    keep &= mass_before < top_p[:, None]
    probs_sorted = torch.where(keep, probs_sorted, 0.0)
    probs = torch.zeros_like(probs_sorted).scatter_(1, order, probs_sorted)
    return probs / probs.sum(-1, keepdim=True)
