"""PPO loss against hand-worked examples: each clip case, each aggregation, KL and entropy terms."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl import aggregate, kl_penalty, ppo_loss

LOG = math.log


def one_row(*xs: float) -> torch.Tensor:
    return torch.tensor([list(xs)], dtype=torch.float64)


# ------------------------------------------------------------------ clip cases, one token each
# (ratio, advantage) -> (per-token loss, d loss / d logprob, which clip is active)
CLIP_CASES = {
    "inside": ((1.1, 1.0), (-1.1, -1.1, None)),
    "high-clipped": ((1.5, 2.0), (-2.4, 0.0, "high")),  # max(-3.0, -2 * 1.2)
    "high-negative-adv": ((1.5, -1.0), (1.5, 1.5, None)),  # max(1.5, 1.2): not clipped
    "low-clipped": ((0.5, -1.0), (0.8, 0.0, "low")),  # max(0.5, 0.8)
    "low-positive-adv": ((0.5, 1.0), (-0.5, -0.5, None)),  # max(-0.5, -0.8): not clipped
    "dual-clipped": ((4.0, -1.0), (3.0, 0.0, "dual")),  # min(max(4.0, 1.2), 3.0)
    "below-dual": ((2.5, -1.0), (2.5, 2.5, None)),  # min(max(2.5, 1.2), 3.0)
}


@pytest.mark.parametrize("case", CLIP_CASES)
def test_each_clip_case_by_hand(case):
    (ratio, adv), (want_loss, want_grad, clip) = CLIP_CASES[case]
    logp = one_row(LOG(ratio)).requires_grad_()
    loss, stats = ppo_loss(logp, one_row(0.0), one_row(adv), one_row(1.0), dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert grad.item() == pytest.approx(want_grad, abs=1e-12)  # -A * ratio, or 0 when clipped
    fractions = {"low": stats.clip_frac_low, "high": stats.clip_frac_high, "dual": stats.clip_frac_dual}
    for name, value in fractions.items():
        assert value.item() == (1.0 if name == clip else 0.0), name
    assert stats.clip_frac.item() == (0.0 if clip is None else 1.0)


def test_without_dual_clip_negative_advantage_is_unbounded():
    loss, stats = ppo_loss(one_row(LOG(4.0)), one_row(0.0), one_row(-1.0), one_row(1.0))
    assert loss.item() == pytest.approx(4.0)
    assert stats.clip_frac.item() == 0.0


def test_asymmetric_clip_low_and_high():
    """clip_low=0.2, clip_high=0.28 (DAPO's clip-higher): 1.25 passes, 1.3 is capped at 1.28."""
    logp = one_row(LOG(1.25), LOG(1.3), LOG(0.75)).requires_grad_()
    adv = one_row(1.0, 1.0, -1.0)
    loss, stats = ppo_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(logp), clip_low=0.2, clip_high=0.28)
    # tokens: -1.25 (inside), -1.28 (high), max(0.75, 0.8) = 0.8 (low)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, one_row(-1.25 / 3, 0.0, 0.0))
    assert stats.clip_frac_high.item() == pytest.approx(1 / 3)
    assert stats.clip_frac_low.item() == pytest.approx(1 / 3)


# ------------------------------------------------------------------ aggregation modes

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # the third sequence is empty
# mode -> (value, d value / d token for the six masked tokens in row-major order)
NORM = 8.0  # the constant of seq-mean-token-sum-norm (the other modes ignore it)
AGGREGATIONS = {
    "token-mean": (10 / 4, [1 / 4] * 4),
    "seq-mean-token-sum": ((6 + 4) / 2, [1 / 2] * 4),
    "seq-mean-token-mean": ((2 + 4) / 2, [1 / 6, 1 / 6, 1 / 6, 1 / 2]),
    "seq-mean-token-sum-norm": ((6 / NORM + 4 / NORM) / 2, [1 / (2 * NORM)] * 4),
}


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregation_by_hand(mode):
    want, want_weights = AGGREGATIONS[mode]
    values = VALUES.clone().requires_grad_()
    out = aggregate(values, MASK, mode, norm_length=NORM)
    (grad,) = torch.autograd.grad(out, values)
    assert out.item() == pytest.approx(want)
    assert grad[MASK].tolist() == pytest.approx(want_weights)
    assert (grad[~MASK] == 0).all()


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_ppo_loss_uses_the_aggregation(mode):
    """At ratio 1 nothing is clipped and the per-token loss is -A, so the loss is agg(-A)."""
    want, want_weights = AGGREGATIONS[mode]
    logp = torch.full_like(VALUES, -0.7).requires_grad_()
    loss, _ = ppo_loss(logp, logp.detach(), -VALUES, MASK, aggregation=mode, norm_length=NORM)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(want)
    # d loss / d logp = -A * ratio * weight = value * weight
    want_grad = [v * w for v, w in zip(VALUES[MASK].tolist(), want_weights)]
    assert grad[MASK].tolist() == pytest.approx(want_grad)


def test_norm_aggregation_needs_its_constant():
    for bad in (None, 0.0, float("inf")):
        with pytest.raises(ValueError, match="needs a finite norm_length > 0"):
            aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_length=bad)
    with pytest.raises(ValueError, match="needs a finite norm_length > 0"):
        ppo_loss(VALUES, VALUES, VALUES, MASK, aggregation="seq-mean-token-sum-norm")


def test_empty_batch_gives_zero():
    assert aggregate(VALUES, torch.zeros_like(MASK), "token-mean").item() == 0.0
    assert aggregate(VALUES, torch.zeros_like(MASK), "seq-mean-token-sum").item() == 0.0


# ------------------------------------------------------------------ KL estimators and terms


def test_kl_estimators_by_hand():
    logp, ref = one_row(LOG(0.5), LOG(0.5)), one_row(LOG(0.25), LOG(0.5))  # d = ref - logp = -log 2, 0
    d = -LOG(2.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), one_row(-d, 0.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), one_row(d * d / 2, 0.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), one_row(0.5 - d - 1, 0.0))


def test_k3_is_clamped_to_ten_like_vineppo():
    logp = one_row(-25.0, -1.0).requires_grad_()
    ref = one_row(-1.0, -1.0)  # d = 24: e^24 - 25 is far above 10
    kl = kl_penalty(logp, ref, "k3")
    assert kl.tolist() == [[10.0, 0.0]]
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert grad.tolist() == [[0.0, 0.0]]  # clamped tokens give no gradient


def test_k3_gradient_and_reference_is_constant():
    logp = one_row(LOG(0.5)).requires_grad_()
    ref = one_row(LOG(0.25)).requires_grad_()
    (g_logp, g_ref) = torch.autograd.grad(kl_penalty(logp, ref, "k3").sum(), (logp, ref), allow_unused=True)
    assert g_logp.item() == pytest.approx(1 - 0.5)  # d/dlogp (e^d - d - 1) = 1 - e^d
    assert g_ref is None


def test_kl_as_reward_penalty():
    logp, ref = one_row(LOG(0.5)), one_row(LOG(0.25))
    rewards = one_row(1.0) - 0.1 * kl_penalty(logp, ref, "k1")
    assert rewards.item() == pytest.approx(1 - 0.1 * LOG(2.0))


def test_vineppo_loss_by_hand():
    """Token-mean policy loss + 1e-4 * mean over sequences of per-sequence summed k3 KL."""
    logp = torch.tensor([[LOG(1.1), LOG(0.5)], [LOG(1.5), 0.0]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0], [2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    ref = logp + torch.tensor([[-LOG(2.0), LOG(2.0)], [0.0, 0.0]], dtype=torch.float64)
    loss, stats = ppo_loss(
        logp, old, adv, mask, ref_logprobs=ref, kl_coef=1e-4, kl_aggregation="seq-mean-token-sum"
    )
    pg = (-1.1 + 0.8 - 2.4) / 3  # inside, low-clipped, high-clipped
    k3 = [0.5 + LOG(2.0) - 1, 2.0 - LOG(2.0) - 1]  # d = -log 2 and +log 2 in sequence 0
    kl = (k3[0] + k3[1] + 0.0) / 2
    assert stats.pg_loss.item() == pytest.approx(pg)
    assert stats.kl_loss.item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(pg + 1e-4 * kl)
    assert stats.kl_ref.item() == pytest.approx(sum(k3) / 3)
    torch.testing.assert_close(stats.seq_kl_ref, torch.tensor([sum(k3) / 2, 0.0], dtype=torch.float64))


def test_entropy_bonus_by_hand():
    logp = one_row(-1.0, -2.0)
    ent = one_row(1.0, 2.0).requires_grad_()
    loss, stats = ppo_loss(logp, logp, one_row(0.0, 0.0), one_row(1.0, 1.0), entropy=ent, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * 1.5)
    (grad,) = torch.autograd.grad(loss, ent)
    assert grad[0].tolist() == pytest.approx([-0.005, -0.005])
    assert stats.entropy.item() == pytest.approx(1.5)
    assert stats.seq_entropy.tolist() == pytest.approx([1.5])


# ------------------------------------------------------------------ statistics


def test_statistics_by_hand():
    ratios = [[1.1, 1.5, 0.5], [4.0, 0.9, 7.0]]
    logp = torch.tensor(ratios, dtype=torch.float64).log()
    adv = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # ratio 7.0 is masked out
    _, stats = ppo_loss(logp, torch.zeros_like(logp), adv, mask, dual_clip=3.0)
    kept = [1.1, 1.5, 0.5, 4.0, 0.9]
    assert stats.ratio_mean.item() == pytest.approx(sum(kept) / 5)
    assert stats.ratio_max.item() == pytest.approx(4.0)
    assert stats.clip_frac_high.item() == pytest.approx(1 / 5)  # 1.5 with A > 0
    assert stats.clip_frac_low.item() == pytest.approx(1 / 5)  # 0.5 with A < 0
    assert stats.clip_frac_dual.item() == pytest.approx(1 / 5)  # 4.0 with A < 0
    assert stats.clip_frac.item() == pytest.approx(3 / 5)
    approx = [r - 1 - LOG(r) for r in kept]
    assert stats.approx_kl.item() == pytest.approx(sum(approx) / 5)
    assert stats.seq_ratio_mean.tolist() == pytest.approx([(1.1 + 1.5 + 0.5) / 3, (4.0 + 0.9) / 2])
    assert stats.seq_clip_frac.tolist() == pytest.approx([2 / 3, 1 / 2])
    assert stats.seq_approx_kl.tolist() == pytest.approx([sum(approx[:3]) / 3, sum(approx[3:]) / 2])
    assert stats.kl_ref is None and stats.entropy is None
    scalars = stats.scalars()
    assert scalars["clip_frac"] == pytest.approx(0.6) and "seq_ratio_mean" not in scalars


def test_gradient_flows_only_through_logprobs():
    logp = one_row(LOG(1.1)).requires_grad_()
    old, adv = one_row(0.0).requires_grad_(), one_row(1.0).requires_grad_()
    loss, _ = ppo_loss(logp, old, adv, one_row(1.0))
    g_logp, g_old, g_adv = torch.autograd.grad(loss, (logp, old, adv), allow_unused=True)
    assert g_logp.item() == pytest.approx(-1.1)
    assert g_old is None and g_adv is None


# ------------------------------------------------------------------ bad input


def _args(**over):
    x = torch.zeros(2, 3)
    base = dict(logprobs=x, old_logprobs=x, advantages=x, mask=torch.ones(2, 3, dtype=torch.bool))
    base.update(over)
    return base


BAD = {
    "logprobs-1d": (dict(logprobs=torch.zeros(3)), {}, r"logprobs must be \[B, T\].*\(3,\)"),
    "adv-shape": (dict(advantages=torch.zeros(2, 4)), {}, r"advantages must have shape \(2, 3\).*\(2, 4\)"),
    "mask-shape": (dict(mask=torch.ones(3, 3)), {}, r"mask must have shape \(2, 3\).*\(3, 3\)"),
    "ref-shape": ({}, dict(ref_logprobs=torch.zeros(2, 2)), r"ref_logprobs must have shape.*\(2, 2\)"),
    "entropy-shape": ({}, dict(entropy=torch.zeros(1, 3)), r"entropy must have shape.*\(1, 3\)"),
    "device": (dict(old_logprobs=torch.zeros(2, 3, device="meta")), {}, r"old_logprobs must be on cpu.*meta"),
    "aggregation": ({}, dict(aggregation="sum"), r"aggregation must be one of.*'sum'"),
    "kl-aggregation": ({}, dict(kl_aggregation="mean"), r"aggregation must be one of.*'mean'"),
    "estimator": ({}, dict(kl_estimator="k4"), r"kl estimator must be one of.*'k4'"),
    "clip-low": ({}, dict(clip_low=-0.1), r"clip_low must be in \[0, 1\]; got -0.1"),
    "clip-high": ({}, dict(clip_high=-0.2), r"clip_high must be finite and >= 0; got -0.2"),
    "dual-1": ({}, dict(dual_clip=1.0), r"dual_clip must be finite and > 1.*got 1.0"),
    "dual-0.5": ({}, dict(dual_clip=0.5), r"dual_clip .*got 0.5"),
    "kl-coef": ({}, dict(kl_coef=-1.0), r"kl_coef must be finite and >= 0; got -1.0"),
    "kl-no-ref": ({}, dict(kl_coef=0.1), r"kl_coef=0.1 needs ref_logprobs"),
    "entropy-missing": ({}, dict(entropy_coef=0.01), r"entropy_coef=0.01 needs entropy"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_value_error_naming_the_value(case):
    tensors, options, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        ppo_loss(**_args(**tensors), **options)


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match=r"'k5'"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "k5")
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        kl_penalty(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"'median'"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "median")


MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("kl_mode", MODES)
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_counts_sum_to_the_minibatch_loss(mode, kl_mode):
    # Gradient accumulation: the trainer passes the minibatch's token and sequence counts so the
    # micro-batch losses add up to the loss of the whole minibatch, for policy and KL terms alike.
    g = torch.Generator().manual_seed(0)
    b, t = 6, 5
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64)
    old = lp + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = lp + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    ent = torch.rand(b, t, generator=g, dtype=torch.float64)
    kw = dict(ref_logprobs=ref, kl_coef=0.3, aggregation=mode, kl_aggregation=kl_mode, norm_length=7.0,
              entropy=ent, entropy_coef=0.05)
    whole, _ = ppo_loss(lp, old, adv, mask, **kw)
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, _ = ppo_loss(lp[rows], old[rows], adv[rows], mask[rows],
                           **{**kw, "ref_logprobs": ref[rows], "entropy": ent[rows]},
                           num_tokens=int(mask.sum()), num_seqs=b)
        parts = parts + part
    torch.testing.assert_close(parts, whole)


# ------------------------------------------------------------------ overflow (log-ratio of 95 nats)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_huge_log_ratio_gives_finite_loss_and_gradients(dtype):
    """exp(95) overflows fp32 and bf16: the clipped branch's value was right, but its backward
    multiplied zero by an infinite derivative (NaN), which stopped healthy runs."""
    old = torch.zeros(1, 4, dtype=dtype)
    logp = torch.tensor([[95.0, 95.0, -95.0, 0.1]], dtype=dtype).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=dtype)
    ref = torch.zeros(1, 4, dtype=dtype)
    loss, stats = ppo_loss(logp, old, adv, torch.ones(1, 4), ref_logprobs=ref, kl_coef=0.1, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # clipped (high; dual) and k3 at its clamp: no gradient
    assert stats.ratio_mean > 10  # the ratio guard still sees a far off-policy micro-batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k3_at_a_log_ratio_of_95_is_ten_with_a_zero_gradient(dtype):
    logp = torch.tensor([[-95.0, -1.0]], dtype=dtype).requires_grad_()
    ref = torch.tensor([[0.0, -1.0]], dtype=dtype)  # d = 95: exp(d) overflows
    kl = kl_penalty(logp, ref, "k3")
    assert kl.float().tolist() == [[10.0, 0.0]]
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert grad.float().tolist() == [[0.0, 0.0]]


def test_the_clamp_leaves_finite_values_unchanged():
    """Within +-20 nats the loss is the formula's exactly; the k3 clamp to 10 covers what lies beyond."""
    logp = torch.tensor([[19.0, -19.0, 2.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, -0.5]], dtype=torch.float64)
    loss, _ = ppo_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(logp))
    ratio = logp.exp()
    want = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_token_weights_scale_each_tokens_policy_gradient():
    logp = one_row(LOG(1.1), LOG(1.1)).requires_grad_()
    loss, _ = ppo_loss(logp, one_row(0.0, 0.0), one_row(1.0, 1.0), one_row(1.0, 1.0),
                       token_weights=one_row(0.5, 2.0))
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(-(0.5 * 1.1 + 2.0 * 1.1) / 2)
    assert grad[0].tolist() == pytest.approx([-0.5 * 1.1 / 2, -2.0 * 1.1 / 2])
