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
    """Probabilities after each row's top-k cut, then top-p cut (as transformers and vLLM order them).

    Rows without a cut get exp(logprobs) untouched, whatever the other rows ask for.
    """
    probs = logprobs.exp()
    cut = [r for r, p in enumerate(params) if p.top_k or p.top_p < 1]
    if not cut:
        return probs
    rows = torch.tensor(cut, device=logprobs.device)
    top_k = torch.tensor([params[r].top_k or logprobs.shape[-1] for r in cut], device=logprobs.device)
    top_p = torch.tensor([params[r].top_p for r in cut], device=logprobs.device)
    sorted_p, order = probs[rows].sort(dim=-1, descending=True)
    rank = torch.arange(logprobs.shape[-1], device=logprobs.device)[None, :]
    sorted_p = torch.where(rank < top_k[:, None], sorted_p, 0.0)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    # Keep a token if the mass strictly before it is below top_p: the smallest prefix whose
    # mass reaches top_p survives, and the most likely token always does.
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p[:, None], sorted_p, 0.0)
    probs[rows] = torch.zeros_like(sorted_p).scatter_(1, order, sorted_p / sorted_p.sum(-1, keepdim=True))
    return probs
