"""The PPO-clip update that VinePPO, PPO, GRPO, RLOO, CAPO and REINFORCE++ share: they differ
only in their credit step (how each token's advantage is estimated)."""
from __future__ import annotations

import torch

from engine.rl import advantages as adv_lib
from engine.rl.algorithms.base import Algorithm, LossOut, Minibatch, TrainerContext
from engine.rl.loss import ppo_loss
from engine.rl.packed import Packed
from engine.rl.rollout import Episode

GLOBALLY_NORMALISED = ("loss", "pg_loss", "kl_loss", "entropy_loss")  # already divided by the minibatch's counts


class PolicyGradient(Algorithm):
    """Clipped policy gradient on per-token advantages, with optional KL to the reference and
    an entropy bonus; VinePPO's ratio guard (`skip_ratio_above`) drops far off-policy micro-batches."""

    def begin_minibatch(self, batch: Minibatch, ctx: TrainerContext) -> None:
        batch.advantages = (whiten(batch.units, ctx) if self.cfg.whiten
                            else {id(e): e.advantages for e in batch.units})

    def loss(self, micro: list[Episode], batch: Minibatch, ctx: TrainerContext) -> LossOut:
        cfg = self.cfg
        packed = Packed.build(micro, ctx.device)
        mask = packed.mask()
        pad = lambda xs: packed.pad(torch.cat(xs).to(ctx.device))  # noqa: E731
        need_entropy = cfg.entropy_coef != 0
        weights = loss_weights(micro, cfg.tis_cap)
        weights = pad(weights) if weights is not None else None
        out = ctx.token_logprobs(ctx.policy, packed, with_entropy=need_entropy)
        lp, ent = out if need_entropy else (out, None)
        loss, st = ppo_loss(
            packed.pad(lp), pad([e.old_logprobs for e in micro]), pad([batch.advantages[id(e)] for e in micro]), mask,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, token_weights=weights,
            ref_logprobs=pad([e.ref_logprobs for e in micro]) if ctx.ref is not None else None,
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, kl_aggregation=cfg.kl_aggregation,
            entropy=packed.pad(ent) if ent is not None else None, entropy_coef=cfg.entropy_coef,
            aggregation=cfg.loss_aggregation, num_tokens=batch.num_tokens, num_seqs=batch.num_units,
            norm_length=cfg.max_new_tokens)  # the constant of "seq-mean-token-sum-norm" (Dr.GRPO)
        if cfg.skip_ratio_above is not None and float(st.ratio_mean) > cfg.skip_ratio_above:
            # VinePPO's guard: far off-policy, its policy gradient would be noise.
            return LossOut(loss, {"skipped_micro_batches": 1.0}, skipped=True)
        share = mask.sum().item() / batch.num_tokens
        stats: dict[str, float] = {}
        for k, v in st.scalars().items():
            if k == "ratio_max" or k in GLOBALLY_NORMALISED:  # (a max; already divided by the minibatch's counts)
                stats[k] = v
            else:  # token means of this micro-batch -> token mean of the minibatch
                stats[k] = v * share
        return LossOut(loss, stats)


def loss_weights(micro: list[Episode], tis_cap: float | None) -> list[torch.Tensor] | None:
    """Each episode's policy-gradient token weights: truncated importance weights (`tis_cap`)
    times the episode's own `token_weights` (SPO-tree's 1 / multiplicity); None when neither applies."""
    if tis_cap is None and all(e.token_weights is None for e in micro):
        return None
    out = []
    for e in micro:
        w = tis_weights(e, tis_cap) if tis_cap is not None else None
        if e.token_weights is not None:
            w = e.token_weights if w is None else w * e.token_weights
        out.append(w if w is not None else torch.ones(e.num_tokens))
    return out


def tis_weights(ep: Episode, cap: float) -> torch.Tensor:
    """Truncated importance weights min(exp(old - sampler), cap) per response token (Yao et al.
    2025): the update is on-policy for the trainer's numerics, the samples came from the
    sampler's. A token the sampler did not draw (the EOS that replaces a stop string) weighs 1."""
    w = torch.exp(ep.old_logprobs - ep.sampler_logprobs).clamp(max=cap)
    return torch.where(torch.isnan(ep.sampler_logprobs), torch.ones_like(w), w)


def whiten(minibatch: list[Episode], ctx: TrainerContext) -> dict[int, torch.Tensor]:
    """Advantages whitened over every token of the (global) minibatch, as adv_lib.whiten:
    (x - mean) / sqrt(unbiased var + 1e-8), the mean and variance summed over ranks (float64).
    A collective under data parallelism: every rank calls it, with or without episodes."""
    flat = torch.cat([e.advantages for e in minibatch]) if minibatch else torch.zeros(0)
    if not ctx.dist.distributed:  # one process: the minibatch is all here
        white = adv_lib.whiten(flat, torch.ones_like(flat, dtype=torch.bool))
        return {id(e): a for e, a in zip(minibatch, white.split([e.num_tokens for e in minibatch]))}
    x = flat.double()
    n, total = ctx.dist.all_reduce_sum([x.numel(), float(x.sum())])
    if n == 0:
        return {id(e): torch.zeros_like(e.advantages) for e in minibatch}
    mean = total / n
    (squares,) = ctx.dist.all_reduce_sum([float((x - mean).square().sum())])
    var = squares / (n - 1) if n > 1 else 0.0
    white = ((x - mean) * (var + 1e-8) ** -0.5).to(flat.dtype)
    return {id(e): a for e, a in zip(minibatch, white.split([e.num_tokens for e in minibatch]))}


def groups_of(episodes: list[Episode]) -> dict[int, list[Episode]]:
    """A prompt's samples (episode.group), in order (a prompt's samples are all on one rank)."""
    groups: dict[int, list[Episode]] = {}
    for ep in episodes:
        groups.setdefault(ep.group, []).append(ep)
    return groups
