"""PPO policy loss on per-token advantages, with KL-to-reference and entropy terms.

All per-token inputs are [B, T] with a mask [B, T] (True/1 = a response token that counts;
masked-out positions may hold any finite value).
Advantages are per token, which is what VinePPO (step values broadcast to tokens) and CAPO
(token rewards) need; a per-sequence advantage is simply broadcast by the caller.

    ratio   = exp(clamp(logprobs - old_logprobs, -20, 20))
    pg      = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    pg      = min(pg, -A * dual_clip)            where A < 0, when dual_clip is set
    loss    = agg(pg) + kl_coef * agg_kl(kl(logprobs, ref_logprobs)) - entropy_coef * agg(entropy)

VinePPO's settings: clip 0.2/0.2, token-mean policy loss, k3 KL as a loss term summed per
sequence and averaged over sequences (`kl_aggregation="seq-mean-token-sum"`), kl_coef 1e-4,
no entropy bonus; log-probs computed from logits divided by the sampling temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]
K3_MAX = 10.0  # VinePPO clamps the k3 estimate to [0, 10] per token
# Log-ratios (and k3's d) are clamped to this before exp, as verl does: exp(95) overflows fp32 and
# bf16 (max ~88.7 nats), and where the forward picks the clip the backward would still multiply
# a zero by that infinite derivative (NaN). Where |x| <= 20 nothing changes; beyond, the clipped
# branch, the k3 clamp to 10 and the ratio guard decide the value as before.
LOG_RATIO_MAX = 20.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    With d = ref_logprobs - logprobs:
      k1 = -d                      unbiased, any sign, high variance;
      k2 = d^2 / 2                 biased, >= 0, low variance;
      k3 = clamp(e^d - d - 1, 0, 10)   unbiased before the clamp, >= 0 (VinePPO's estimator).
    Use it as a loss term (gradient flows through `logprobs`) or as a reward penalty
    (`rewards - beta * kl_penalty(...).detach()`). `ref_logprobs` is treated as a constant.
    """
    if estimator not in get_args(KLEstimator):
        raise ValueError(f"kl estimator must be one of {get_args(KLEstimator)}; got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have one shape; got {tuple(logprobs.shape)} and {tuple(ref_logprobs.shape)}"
        )
    d = ref_logprobs.detach() - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    d = d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)  # (the value is the clamp's 10 there either way; no 0 * inf)
    return (torch.exp(d) - d - 1.0).clamp(0.0, K3_MAX)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation, *, num_tokens: float | None = None,
              num_seqs: float | None = None, norm_length: float | None = None) -> torch.Tensor:
    """Reduce [B, T] per-token values to a scalar over the masked tokens.

    token-mean:              sum of all masked values / number of masked tokens;
    seq-mean-token-sum:      per sequence the sum over its tokens, then the mean over sequences;
    seq-mean-token-mean:     per sequence the mean over its tokens, then the mean over sequences;
    seq-mean-token-sum-norm: per sequence the sum over its tokens divided by the constant
                             `norm_length` (Dr.GRPO: the generation budget, so a token weighs
                             the same in a short and a long response), then the mean over sequences.
    Sequences with no masked token count in neither mean; an all-empty batch gives 0.
    num_tokens / num_seqs replace the counts of this batch in the final division: with the
    counts of a whole minibatch, the micro-batch losses of gradient accumulation sum to the
    minibatch's loss exactly.
    """
    if mode not in get_args(Aggregation):
        raise ValueError(f"aggregation must be one of {get_args(Aggregation)}; got {mode!r}")
    if mode == "seq-mean-token-sum-norm" and not (norm_length is not None and 0 < norm_length < math.inf):
        raise ValueError(f"aggregation {mode!r} needs a finite norm_length > 0 (e.g. max_new_tokens); got {norm_length}")
    keep = mask.bool()
    values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token-mean":
        return values.sum() / (keep.sum().clamp_min(1) if num_tokens is None else num_tokens)
    per_seq_tokens = keep.sum(-1)
    per_seq = values.sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / per_seq_tokens.clamp_min(1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / norm_length
    n_seqs = (per_seq_tokens > 0).sum().clamp_min(1) if num_seqs is None else num_seqs
    return per_seq.sum() / n_seqs


def _seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] masked mean per sequence (0 for a sequence without tokens)."""
    keep = mask.bool()
    return torch.where(keep, values, 0.0).sum(-1) / keep.sum(-1).clamp_min(1)


@dataclass
class PPOStats:
    """Detached statistics for logging: 0-d tensors over masked tokens, [B] per sequence.

    `pg_loss`, `kl_loss` and `entropy_loss` are the aggregated terms before their
    coefficients (`kl_loss` is 0 without ref_logprobs, `entropy_loss` 0 without entropy).

    `approx_kl` is KL(old || new) estimated with k3 on the sampled tokens (ratio - 1 - log ratio,
    >= 0); `kl_ref` and `entropy` are None when their inputs were not given. Clip fractions
    count tokens whose gradient the clip removed: low (A < 0, ratio < 1 - clip_low), high
    (A > 0, ratio > 1 + clip_high), dual (A < 0, ratio > dual_clip).
    """

    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl_loss: torch.Tensor
    entropy_loss: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    clip_frac: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    clip_frac_dual: torch.Tensor
    approx_kl: torch.Tensor
    kl_ref: torch.Tensor | None
    entropy: torch.Tensor | None
    seq_ratio_mean: torch.Tensor
    seq_clip_frac: torch.Tensor
    seq_approx_kl: torch.Tensor
    seq_kl_ref: torch.Tensor | None
    seq_entropy: torch.Tensor | None

    def scalars(self) -> dict[str, float]:
        """The token-level statistics as Python floats (one host sync)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and v.dim() == 0:
                out[f.name] = float(v)
        return out


def _check(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have shape {tuple(ref.shape)} like logprobs; got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like logprobs; got {x.device}")


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    kl_aggregation: Aggregation | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: Aggregation = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_length: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PPOStats]:
    """Clipped-surrogate PPO loss (scalar, to minimise) and its logging statistics.

    logprobs [B, T] carry the gradient; old_logprobs, advantages and ref_logprobs are
    constants (detached here). `entropy` [B, T] (e.g. from `engine.kernels.fused_logprobs(...,
    with_entropy=True)`) is needed when entropy_coef != 0 and is reported when given.
    `kl_aggregation` defaults to `aggregation`; VinePPO uses "seq-mean-token-sum" for KL.
    num_tokens / num_seqs: the token and sequence counts of the whole minibatch when this call
    sees one micro-batch of it (see `aggregate`); they affect the loss terms, not the statistics.
    norm_length: the constant of the "seq-mean-token-sum-norm" aggregation (Dr.GRPO).
    token_weights [B, T]: constants multiplying each token's policy-gradient term (truncated
    importance sampling against the sampler's log-probs, `tis_cap`); None = 1.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T]; got shape {tuple(logprobs.shape)}")
    for name, x in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        _check(name, x, logprobs)
    for name, x in (("ref_logprobs", ref_logprobs), ("entropy", entropy), ("token_weights", token_weights)):
        if x is not None:
            _check(name, x, logprobs)
    kl_aggregation = aggregation if kl_aggregation is None else kl_aggregation
    for mode in (aggregation, kl_aggregation):
        if mode not in get_args(Aggregation):
            raise ValueError(f"aggregation must be one of {get_args(Aggregation)}; got {mode!r}")
    if kl_estimator not in get_args(KLEstimator):
        raise ValueError(f"kl estimator must be one of {get_args(KLEstimator)}; got {kl_estimator!r}")
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1]; got {clip_low}")
    if not 0.0 <= clip_high < math.inf:
        raise ValueError(f"clip_high must be finite and >= 0; got {clip_high}")
    if dual_clip is not None and not 1.0 < dual_clip < math.inf:
        raise ValueError(f"dual_clip must be finite and > 1 (or None); got {dual_clip}")
    if not 0.0 <= kl_coef < math.inf:
        raise ValueError(f"kl_coef must be finite and >= 0; got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if not math.isfinite(entropy_coef):
        raise ValueError(f"entropy_coef must be finite; got {entropy_coef}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")

    keep = mask.bool()
    adv = advantages.detach().to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    clipped_low = (adv < 0) & (ratio < 1.0 - clip_low)
    clipped_high = (adv > 0) & (ratio > 1.0 + clip_high)
    clipped_dual = torch.zeros_like(clipped_low)
    if dual_clip is not None:
        # For A < 0 the loss above grows without bound in the ratio; cap it at -A * dual_clip.
        clipped_dual = (adv < 0) & (ratio > dual_clip)
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if token_weights is not None:
        pg = pg * token_weights.detach().to(pg.dtype)
    norm = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    pg_loss = aggregate(pg, keep, aggregation, **norm)
    loss = pg_loss

    zero = logprobs.new_zeros(())
    kl_loss, kl_tok = zero, None
    if ref_logprobs is not None:
        kl_tok = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        kl_loss = aggregate(kl_tok, keep, kl_aggregation, **norm)
        if kl_coef > 0:
            loss = loss + kl_coef * kl_loss
    entropy_loss = zero
    if entropy is not None:
        entropy_loss = aggregate(entropy, keep, aggregation, **norm)
        if entropy_coef != 0:
            loss = loss - entropy_coef * entropy_loss

    with torch.no_grad():
        dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16 inputs: fp32 statistics

        def tok_mean(x: torch.Tensor) -> torch.Tensor:
            return aggregate(x.to(dtype), keep, "token-mean")

        ratio, log_ratio = ratio.to(dtype), log_ratio.to(dtype)
        any_clip = clipped_low | clipped_high | clipped_dual
        approx = ratio - 1.0 - log_ratio  # k3 estimate of KL(old || new), >= 0
        ratio_max = torch.where(keep, ratio, 0.0).amax()  # ratio > 0, so 0 only when no token
        stats = PPOStats(
            loss=loss.detach(),
            pg_loss=pg_loss.detach(),
            kl_loss=kl_loss.detach(),
            entropy_loss=entropy_loss.detach(),
            ratio_mean=tok_mean(ratio),
            ratio_max=ratio_max,
            clip_frac=tok_mean(any_clip),
            clip_frac_low=tok_mean(clipped_low),
            clip_frac_high=tok_mean(clipped_high),
            clip_frac_dual=tok_mean(clipped_dual),
            approx_kl=tok_mean(approx),
            kl_ref=tok_mean(kl_tok) if kl_tok is not None else None,
            entropy=tok_mean(entropy) if entropy is not None else None,
            seq_ratio_mean=_seq_mean(ratio, keep),
            seq_clip_frac=_seq_mean(any_clip.to(dtype), keep),
            seq_approx_kl=_seq_mean(approx, keep),
            seq_kl_ref=_seq_mean(kl_tok.to(dtype), keep) if kl_tok is not None else None,
            seq_entropy=_seq_mean(entropy.to(dtype), keep) if entropy is not None else None,
        )
    return loss, stats
