"""Per-iteration statistics of the sampled tokens' log-probs, reduced over every rank."""
from __future__ import annotations

import torch

from engine.rl.distributed import Dist
from engine.rl.rollout import Episode


def logprob_metrics(episodes: list[Episode], dist: Dist, with_ref: bool) -> dict[str, float]:
    """The policy's entropy on the sampled tokens and (with a reference) k3 KL to it, before the update."""
    gathered = dist.all_gather_object(
        {"entropy": torch.cat([e.entropy for e in episodes]),
         "old": torch.cat([e.old_logprobs for e in episodes]) if with_ref else None,
         "ref": torch.cat([e.ref_logprobs for e in episodes]) if with_ref else None})
    out = {"entropy": float(torch.cat([g["entropy"] for g in gathered]).mean())}
    if with_ref:
        d = torch.cat([g["ref"] for g in gathered]) - torch.cat([g["old"] for g in gathered])
        out["kl_ref"] = float((torch.exp(d) - d - 1).mean())
    return out


def mismatch_metrics(episodes: list[Episode], dist: Dist) -> dict[str, float]:
    """The gap between the sampler's log-probs and the trainer's old ones on the same tokens
    (training/inference mismatch), over every drawn response token of every rank:
    logprob_mismatch_mean_abs / _max_abs (|trainer - sampler| in nats) and logprob_mismatch_kl,
    k3 of the trainer against the sampler (an estimate of KL(sampler || trainer) from the
    sampler's own draws). Near 0 when both run the same weights in the same precision."""
    pairs = [(e.old_logprobs, e.sampler_logprobs) for e in episodes if e.sampler_logprobs is not None]
    old = torch.cat([o for o, _ in pairs]) if pairs else torch.zeros(0)
    sampler = torch.cat([s for _, s in pairs]) if pairs else torch.zeros(0)
    drawn = ~torch.isnan(sampler)
    d = (old[drawn] - sampler[drawn]).double()  # log(trainer / sampler) per drawn token
    n, abs_sum, k3_sum = dist.all_reduce_sum([d.numel(), float(d.abs().sum()), float((d.exp() - 1 - d).sum())])
    (abs_max,) = dist.all_reduce_max([float(d.abs().max()) if d.numel() else 0.0])
    if not n:
        return {}
    return {"logprob_mismatch_mean_abs": abs_sum / n, "logprob_mismatch_max_abs": abs_max,
            "logprob_mismatch_kl": k3_sum / n}
