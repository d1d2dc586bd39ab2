"""`python -m engine.analysis credit`: Credit assignment on one fixed policy (no training): what each algorithm's advantages say
about the same sampled responses, and how noisy the policy gradients they give are.

    python -m engine.analysis credit --model DIR --task arithmetic --task-args '{steps: [4, 6], max_operand: 50}' \\
        --prompts 32 --samples 4 --k 4 --batches 4 --temperature 0.6 --max-new-tokens 128 --out report.json

A Trainer (engine.rl.trainer) is built for the model with these settings (a VinePPO run's config:
seeded sampling, no KL reference, one minibatch per batch) and its own code does the work:
batch b = 1..B holds the prompts of its iteration b, sampled with seeds from (seed, b, prompt); each
estimator's advantages are that algorithm's credit step (VinePPO: MC values
from K rollouts at every step boundary; GRPO; RLOO; PPO's GAE with --critic's critic) and, on
the arithmetic task, CAPO's with the exact rule judge ("capo": an oracle that
penalises every false line, the CAPO runs' judge).
With --tree-branching B1 B2 ... (and --tree-segment-tokens N) each batch is sampled as SPO-tree
samples it instead (the trainer's own tree rollouts: every leaf a response, at most
prompts x B1 x B2 x ... of them) and the estimators are SPO-tree's (V(node) - V(parent) per
segment; its gradient weighs a shared token 1/multiplicity) and, on arithmetic, CAPO's exact
judge on the same leaves.

1. Advantage statistics per estimator (raw advantages, all batches): fraction of response tokens
   with advantage 0, of responses with no nonzero token, std, mean and mean |A| over the tokens of
   correct and of incorrect responses.
2. Localisation (arithmetic only: the exact line checker engine.rl.capo.rule_wrong_steps): over
   responses with reward 0 and at least one false line "a op b = c", the mean advantage of the
   tokens of the first wrong step, of the steps before it and after it; and how often the step
   with the lowest mean advantage is the first wrong one (a tie counts as a miss; tied_frac and
   accuracy_random_tiebreak report ties), next to chance (mean 1 / steps). GRPO and RLOO give all
   tokens of a response one advantage: they are at chance by construction.
3. Gradient noise: per estimator and batch the flattened gradient of the trainer's policy loss
   at ratio 1 (advantages whitened as the trainer whitens them, the trainer's loss aggregation):
   the mean pairwise cosine between batches, noise-to-signal (mean |g_b - g_mean|^2 / |g_mean|^2:
   about B - 1 when the batches' gradients are pure noise; and an unbiased version from the
   off-diagonal dot products), the gradient norm, and the cosine of each estimator's mean
   gradient (and same-batch gradients) to VinePPO's.

Writes the JSON report (default: <model>/credit-<task>.json), a plot next to it (.png) and
prints a table.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.analysis.common import write_report
from engine.analysis.values import Critic, _mean, critic_folder
from engine.rl.plots import pyplot, save_figure

CREDIT_ESTIMATORS = ("vineppo", "grpo", "rloo")   # and "ppo" with a critic, "capo" (the rule judge) on arithmetic
ALL_CREDIT_ESTIMATORS = (*CREDIT_ESTIMATORS, "ppo", "capo", "spo-tree")  # spo-tree: on its own trees (--tree-branching)
TIE_TOLERANCE = 1e-9  # step advantages this close count as equal (a tie for the lowest step)
NOT_ARITHMETIC = ("localisation needs the arithmetic task's exact line checker "
                  "(engine.rl.capo.rule_wrong_steps); task {task} has none, so the section is skipped")


def first_wrong_step(step_texts: Sequence[str]) -> int | None:
    """The 0-based index of the first step with a false line "a op b = c" (None: no such step)."""
    from engine.rl.capo import rule_wrong_steps

    wrong = rule_wrong_steps(step_texts)
    return min(wrong) if wrong else None


def step_mean_advantages(advantages: torch.Tensor, step_ends: Sequence[int]) -> list[float]:
    """The mean token advantage of each step (tokens [step_ends[i-1], step_ends[i]))."""
    return [float(advantages[a:b].double().mean()) for a, b in zip([0, *step_ends[:-1]], step_ends)]


@dataclass
class CreditCase:
    """A response with reward 0 whose step `first_wrong` is its first false line, and one
    estimator's advantages: the mean per step and each step's token count."""

    step_advantages: list[float]
    step_lengths: list[int]
    first_wrong: int


def localisation_metrics(cases: Sequence[CreditCase]) -> dict:
    """Where an estimator puts the blame in wrong responses.

    first_wrong_adv / before_adv / after_adv: the mean advantage of the tokens of the first wrong
    step / of the steps before it (correct so far) / of the steps after it, pooled over the
    responses' tokens (None when there are no such tokens).
    accuracy: the fraction of responses whose lowest-advantage step is the first wrong step and
    no other step ties it (within TIE_TOLERANCE); tied_frac: the fraction where the first wrong
    step shares the lowest advantage with another step (a miss in `accuracy`);
    accuracy_random_tiebreak: the expected accuracy when ties are broken at random (a tie of m
    steps counts 1/m). chance: the mean of 1 / steps, a random step's accuracy; an estimator that
    gives all steps of a response one advantage (GRPO, RLOO) scores exactly chance in
    accuracy_random_tiebreak and 0 in accuracy.
    """
    sums = {"first_wrong": [0.0, 0], "before": [0.0, 0], "after": [0.0, 0]}
    hits = ties = 0
    expected = chance = 0.0
    for c in cases:
        if len(c.step_advantages) != len(c.step_lengths) or not 0 <= c.first_wrong < len(c.step_advantages):
            raise ValueError(f"localisation_metrics: {len(c.step_advantages)} step advantages, "
                             f"{len(c.step_lengths)} step lengths, first wrong step {c.first_wrong}")
        f = c.first_wrong
        for i, (a, n) in enumerate(zip(c.step_advantages, c.step_lengths)):
            key = "before" if i < f else "first_wrong" if i == f else "after"
            sums[key][0] += a * n
            sums[key][1] += n
        low = min(c.step_advantages)
        lowest = [i for i, a in enumerate(c.step_advantages) if a - low <= TIE_TOLERANCE]
        if f in lowest:
            if len(lowest) == 1:
                hits += 1
            else:
                ties += 1
            expected += 1 / len(lowest)
        chance += 1 / len(c.step_advantages)
    n = len(cases)
    out = {f"{key}_adv": (total / count if count else None) for key, (total, count) in sums.items()}
    out.update(responses=n, accuracy=hits / n if n else None, tied_frac=ties / n if n else None,
               accuracy_random_tiebreak=expected / n if n else None, chance=chance / n if n else None)
    return out


def advantage_stats(advantages: Sequence[torch.Tensor], rewards: Sequence[float]) -> dict:
    """Per-token statistics of one estimator's advantages over responses (one tensor each):
    zero_frac (tokens with advantage exactly 0, the trainer's adv_zero_frac), zero_response_frac
    (responses with no nonzero token), mean, std, abs_mean, and the mean and mean |adv| over the
    tokens of correct (reward 1) and incorrect (reward < 1) responses (None when there are none)."""
    if len(advantages) != len(rewards) or not advantages:
        raise ValueError(f"advantage_stats: {len(advantages)} advantage tensors for {len(rewards)} rewards")
    flat = torch.cat([a.double().flatten() for a in advantages])
    out = {"tokens": flat.numel(), "zero_frac": float((flat == 0).double().mean()),
           "zero_response_frac": sum(bool((a == 0).all()) for a in advantages) / len(advantages),
           "mean": float(flat.mean()), "std": float(flat.std()) if flat.numel() > 1 else 0.0,
           "abs_mean": float(flat.abs().mean())}
    for name, keep in (("correct", lambda r: r == 1.0), ("incorrect", lambda r: r < 1.0)):
        part = [a.double().flatten() for a, r in zip(advantages, rewards) if keep(r)]
        tokens = torch.cat(part) if part else torch.zeros(0, dtype=torch.float64)
        out[f"{name}_mean"] = float(tokens.mean()) if tokens.numel() else None
        out[f"{name}_abs_mean"] = float(tokens.abs().mean()) if tokens.numel() else None
    return out


def gram_matrix(vectors: Sequence[torch.Tensor]) -> list[list[float]]:
    """All pairwise dot products (float64) of flat vectors."""
    m = torch.stack([v.double() for v in vectors])
    return (m @ m.T).tolist()


def gradient_noise(gram: Sequence[Sequence[float]]) -> dict:
    """Noise statistics of B gradients g_1..g_B of independent batches, from their Gram matrix
    G[i][j] = g_i . g_j (so the gradients themselves need not be kept).

    cosine: the mean cosine similarity over pairs i < j (None when B < 2); cosine_se: its
    jackknife standard error over batches (None when B < 3);
    noise_to_signal: mean_i |g_i - g_mean|^2 / |g_mean|^2 (None when g_mean = 0). With few batches
    |g_mean|^2 overstates the signal by the noise / B; so also noise_to_signal_unbiased:
    (mean |g_i|^2 - mean_{i != j} g_i . g_j) / mean_{i != j} g_i . g_j, each term an unbiased
    estimate (for independent batches E g_i . g_j = |E g|^2), None when B < 2 or the signal
    estimate is <= 0 (no signal detectable above the noise);
    grad_norm: the mean |g_i|; mean_grad_norm: |g_mean|.
    Pure noise (E g = 0) gives cosine ~ 0 and noise_to_signal ~ B - 1 (|g_mean|^2 is then the
    noise / B): read noise_to_signal against B - 1.
    """
    b = len(gram)
    if b < 1 or any(len(row) != b for row in gram):
        raise ValueError("gradient_noise: a square Gram matrix of at least one gradient is needed")
    diag = [gram[i][i] for i in range(b)]
    mean_sq = sum(sum(row) for row in gram) / (b * b)              # |g_mean|^2
    noise = sum(diag) / b - mean_sq                                 # mean |g_i - g_mean|^2
    pairs = [(i, j) for i in range(b) for j in range(i + 1, b)]
    norms = [math.sqrt(max(d, 0.0)) for d in diag]

    def mean_cos(batches: list[int]) -> float | None:
        cos = [gram[i][j] / (norms[i] * norms[j]) for n, i in enumerate(batches) for j in batches[n + 1:]
               if norms[i] > 0 and norms[j] > 0]
        return sum(cos) / len(cos) if cos else None

    cosine = mean_cos(list(range(b)))
    # jackknife over batches: the mean pairwise cosine without each batch in turn
    leave_out = [mean_cos([j for j in range(b) if j != i]) for i in range(b)] if b >= 3 else []
    cosine_se = None
    if leave_out and all(c is not None for c in leave_out):
        centre = sum(leave_out) / b
        cosine_se = math.sqrt((b - 1) / b * sum((c - centre) ** 2 for c in leave_out))
    signal = sum(gram[i][j] for i, j in pairs) / len(pairs) if pairs else None
    return {
        "batches": b,
        "cosine": cosine,
        "cosine_se": cosine_se,
        "noise_to_signal": max(noise, 0.0) / mean_sq if mean_sq > 0 else None,
        "noise_to_signal_unbiased": ((sum(diag) / b - signal) / signal if signal is not None and signal > 0
                                     else None),
        "grad_norm": sum(norms) / b,
        "mean_grad_norm": math.sqrt(max(mean_sq, 0.0)),
    }


def mean_cosine(cross: Sequence[Sequence[float]], gram_a: Sequence[Sequence[float]],
                gram_b: Sequence[Sequence[float]]) -> float | None:
    """The cosine between the mean of gradients a_1..a_B and the mean of b_1..b_C, from the dot
    products cross[i][j] = a_i . b_j and each side's Gram matrix (None if a mean is zero)."""
    mean = lambda m: sum(sum(row) for row in m) / (len(m) * len(m[0]))  # noqa: E731
    na, nb = mean(gram_a), mean(gram_b)
    if na <= 0 or nb <= 0:
        return None
    return max(-1.0, min(1.0, mean(cross) / math.sqrt(na * nb)))


def _policy_gradient(trainer, episodes: Sequence, advantages: dict[int, torch.Tensor]) -> torch.Tensor:
    """The flattened gradient over all policy parameters of the trainer's policy loss at ratio 1
    (old log-probs = the current ones), with the trainer's loss aggregation over the whole batch
    (its token / sequence counts as the normalisers), accumulated over micro-batches as the
    trainer accumulates. No KL or entropy term: at the starting policy the KL's gradient is 0."""
    from engine.rl.loss import ppo_loss
    from engine.rl.packed import Packed, chunks

    cfg, policy = trainer.cfg, trainer.policy
    policy.zero_grad(set_to_none=True)
    from engine.rl.algorithms.policy_gradient import loss_weights

    num_tokens, num_seqs = sum(e.num_tokens for e in episodes), len(episodes)
    for micro in chunks(list(episodes), cfg.micro_batch_size):
        packed = Packed.build(micro, trainer.device)
        lp = trainer.token_logprobs(policy, packed)
        adv = packed.pad(torch.cat([advantages[id(e)] for e in micro]).to(trainer.device))
        weights = loss_weights(micro, None)  # (SPO-tree's 1 / multiplicity; None for the others)
        weights = packed.pad(torch.cat(weights).to(trainer.device)) if weights is not None else None
        loss, _ = ppo_loss(packed.pad(lp), packed.pad(lp.detach()), adv, packed.mask(), clip_low=cfg.clip_low,
                           clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation, num_tokens=num_tokens,
                           num_seqs=num_seqs, norm_length=cfg.max_new_tokens, token_weights=weights)
        loss.backward()
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float().cpu()
             for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    return torch.cat(grads)


def credit_analysis(trainer, *, batches: int, estimators: Sequence[str] = CREDIT_ESTIMATORS,
                    localise: bool = True, critic: torch.nn.Module | None = None) -> dict:
    """Run the credit-assignment analysis (see `credit_config` and the `credit` command's help)
    with a Trainer built for it: its policy is never updated.

    Batch b (b = 1..batches) is sampled as the trainer's iteration b samples (its prompts, and
    with seeded sampling its seeds), graded by the task; each estimator's advantages come from
    credit step of that algorithm (engine.rl.algorithms: VinePPO's MC values with its K, GRPO,
    RLOO, PPO's GAE with `critic`, CAPO with the rule judge), run on the trainer. The gradient uses
    the advantages as the loss sees them: whitened over the batch when the algorithm whitens
    (the trainer whitens each minibatch, here the batch is one minibatch).
    Statistics and localisation read the raw advantages.
    """
    from engine.rl.steps import step_spans

    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    estimators = list(dict.fromkeys(estimators))
    if not estimators or set(estimators) - set(ALL_CREDIT_ESTIMATORS):
        raise ValueError(f"estimators must be among {ALL_CREDIT_ESTIMATORS}, got {estimators}")
    if "ppo" in estimators and critic is None:
        raise ValueError("the ppo estimator needs `critic` (a PPO checkpoint's critic)")
    if "capo" in estimators and trainer.task.name != "arithmetic":
        raise ValueError("the capo estimator uses the exact rule judge: arithmetic only")
    from engine.rl.algorithms import REGISTRY
    from engine.rl.algorithms.capo import CAPO
    from engine.rl.algorithms.policy_gradient import whiten
    from engine.rl.judge import RuleJudge

    for name in estimators:
        if REGISTRY[name].owns_sampling and trainer.cfg.algo != name:
            raise ValueError(f"the {name} estimator samples its own episodes: build the Trainer with algo {name}")
    algorithms = {}
    for name in estimators:
        cfg = replace(trainer.cfg, algo=name, judge="rule")
        if REGISTRY[name].owns_sampling:  # (its credit reads the trees its sample() built)
            algorithms[name] = trainer.algorithm
        else:
            algorithms[name] = CAPO(cfg, judge=RuleJudge()) if name == "capo" else REGISTRY[name](cfg)
        if name == "ppo":
            algorithms[name].critic = critic
    t0 = time.perf_counter()
    base = trainer.cfg
    style = trainer.task.step_style if base.step_split == "task" else base.step_split
    tok = trainer.tokenizer
    raw: dict[str, list[torch.Tensor]] = {e: [] for e in estimators}
    cases: dict[str, list[CreditCase]] = {e: [] for e in estimators}
    grads: dict[str, list[torch.Tensor]] = {e: [] for e in estimators}
    rewards: list[float] = []
    per_batch: list[dict] = []
    wrong_located = wrong_unlocated = right_despite = 0
    steps_total = 0
    mc_rows = []
    for b in range(1, batches + 1):
        trainer.iteration = b
        trainer.policy.eval()
        episodes = trainer._sample_episodes()
        spans = [step_spans(ep.response_ids, tok, style) for ep in episodes]
        steps_total += sum(len(ends) for _, ends in spans)
        first_wrong = [first_wrong_step(texts) if localise else None for texts, _ in spans]
        if localise:
            right_despite += sum(f is not None and ep.reward == 1 for f, ep in zip(first_wrong, episodes))
            first_wrong = [f if ep.reward == 0 else None for f, ep in zip(first_wrong, episodes)]
            wrong_located += sum(f is not None for f in first_wrong)
            wrong_unlocated += sum(f is None and ep.reward == 0 for f, ep in zip(first_wrong, episodes))
        rewards += [ep.reward for ep in episodes]
        per_batch.append({"batch": b, "responses": len(episodes),
                          "reward_mean": _mean([ep.reward for ep in episodes])})
        for name in estimators:
            algo = algorithms[name]
            for ep in episodes:
                ep.token_weights = None  # (only the estimator that sets them weighs its tokens)
            algo.credit(episodes, trainer)
            mc = getattr(algo, "mc_stats", None)
            if mc is not None:
                algo.mc_stats = None
                mc_rows.append({"states": mc.states, "rollouts": mc.rollouts, "value_mean": mc.value_mean,
                                "truncated": mc.truncated})
            for ep, (_, ends), f in zip(episodes, spans, first_wrong):
                raw[name].append(ep.advantages.detach().float().cpu().clone())
                if f is not None:
                    cases[name].append(CreditCase(step_mean_advantages(ep.advantages, ends),
                                                  [e - a for a, e in zip([0, *ends[:-1]], ends)], f))
            loss_adv = (whiten(episodes, trainer) if algo.cfg.whiten
                        else {id(e): e.advantages for e in episodes})
            grads[name].append(_policy_gradient(trainer, episodes, loss_adv))
    grams = {name: gram_matrix(g) for name, g in grads.items()}
    noise = {name: gradient_noise(grams[name]) for name in estimators}
    ref = "vineppo" if "vineppo" in estimators else estimators[0]
    for name in estimators:
        gv = torch.stack([g.double() for g in grads[ref]])
        ge = torch.stack([g.double() for g in grads[name]])
        cross = (ge @ gv.T).tolist()
        noise[name][f"cosine_to_{ref}_mean"] = mean_cosine(cross, grams[name], grams[ref])
        same = [cross[i][i] / math.sqrt(grams[name][i][i] * grams[ref][i][i])
                for i in range(batches) if grams[name][i][i] > 0 and grams[ref][i][i] > 0]
        noise[name][f"cosine_to_{ref}_same_batch"] = _mean(same) if same else None
    report = {
        "estimators": estimators,
        "batches": batches,
        "responses": len(rewards),
        "reward_mean": _mean(rewards),
        "steps_per_response": steps_total / len(rewards),
        "advantages": {name: advantage_stats(raw[name], rewards) for name in estimators},
        "gradient": {"reference": ref, "parameters": int(grads[ref][0].numel()), **noise,
                     "gram": grams},
        "per_batch": per_batch,
    }
    if mc_rows:
        report["mc"] = {"states": sum(r["states"] for r in mc_rows), "rollouts": sum(r["rollouts"] for r in mc_rows),
                        "truncated": sum(r["truncated"] for r in mc_rows),
                        "value_mean": _mean([r["value_mean"] for r in mc_rows])}
    if localise:
        report["localisation"] = {
            "wrong_responses": wrong_located, "incorrect_without_wrong_line": wrong_unlocated,
            "correct_with_wrong_line": right_despite,
            "tie_rule": "accuracy counts a tie for the lowest step as a miss; tied_frac reports those ties and "
                        "accuracy_random_tiebreak counts a tie of m steps as 1/m",
            **{name: localisation_metrics(cases[name]) for name in estimators}}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def credit_config(model: str, task: str, task_args: dict | None, *, prompts: int, samples: int, k: int,
                  seed: int = 0, temperature: float = 0.6, top_p: float = 1.0, max_new_tokens: int = 256,
                  loss_aggregation: str = "token-mean", grpo_scale_by_std: bool = True, run_dir: str,
                  device: str = "auto", dtype: str = "auto", kv_cache_tokens: int | None = None,
                  tree_branching: Sequence[int] | None = None, tree_segment_tokens: int = 30):
    """The TrainConfig of a Trainer that samples, values and computes advantages as a VinePPO run
    with these settings would in its iterations 1, 2, ... (seeded sampling; no KL reference is
    loaded: the policy is its own reference; one minibatch = the whole batch). With
    `tree_branching`, an SPO-tree run's instead (its tree rollouts; `samples` is not used)."""
    from engine.rl.config import TrainConfig

    tree = dict(algo="spo-tree", tree_branching=list(tree_branching),
                tree_segment_tokens=tree_segment_tokens) if tree_branching else dict(algo="vineppo")
    n = prompts * (math.prod(tree_branching) if tree_branching else samples)
    micro = max(d for d in range(1, min(n, 64) + 1) if n % d == 0)
    return TrainConfig(**tree, task=task, task_args=dict(task_args or {}), model=model, seed=seed,
                       device=device, dtype=dtype, sft_steps=0, iterations=1, prompts_per_iteration=prompts,
                       samples_per_prompt=samples, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, k=k, minibatch_size=n, micro_batch_size=micro, kl_coef=0.0,
                       loss_aggregation=loss_aggregation, grpo_scale_by_std=grpo_scale_by_std,
                       kv_cache_tokens=kv_cache_tokens, eval_items=1, run_dir=run_dir, tensorboard=False,
                       seeded_sampling=True)


def format_credit_table(report: dict) -> str:
    def f(x):
        return "     -" if x is None else f"{x:6.3f}"

    est = report["estimators"]
    lines = [f"{report['responses']} responses in {report['batches']} batches, reward {report['reward_mean']:.3f}, "
             f"{report['steps_per_response']:.2f} steps per response",
             f"{'estimator':<10}{'zero':>8}{'std':>8}{'|A| ok':>8}{'|A| bad':>8}{'cos':>8}{'+-':>8}{'N/S':>8}"
             f"{'|g|':>8}{'cos vine':>9}"]
    for e in est:
        a, g = report["advantages"][e], report["gradient"][e]
        ref = report["gradient"]["reference"]
        lines.append(f"{e:<10}  {f(a['zero_frac'])}  {f(a['std'])}  {f(a['correct_abs_mean'])}  "
                     f"{f(a['incorrect_abs_mean'])}  {f(g['cosine'])}  {f(g.get('cosine_se'))}  {f(g['noise_to_signal'])}  "
                     f"{f(g['grad_norm'])}  {f(g[f'cosine_to_{ref}_mean'])}")
    lines.append(f"(cos: mean cosine between batches' gradients; N/S: noise-to-signal, about "
                 f"{report['batches'] - 1} = batches - 1 for pure noise; cos vine: of the mean gradients)")
    loc = report.get("localisation")
    if loc is not None:
        lines.append(f"localisation over {loc['wrong_responses']} wrong responses with a false line "
                     f"({loc['incorrect_without_wrong_line']} incorrect ones have none, "
                     f"{loc['correct_with_wrong_line']} correct ones have one)")
        lines.append(f"{'estimator':<10}{'before':>8}{'1st bad':>8}{'after':>8}{'acc':>8}{'ties':>8}"
                     f"{'acc~':>8}{'chance':>8}")
        for e in est:
            m = loc[e]
            lines.append(f"{e:<10}  {f(m['before_adv'])}  {f(m['first_wrong_adv'])}  {f(m['after_adv'])}  "
                         f"{f(m['accuracy'])}  {f(m['tied_frac'])}  {f(m['accuracy_random_tiebreak'])}  "
                         f"{f(m['chance'])}")
    elif "localisation_note" in report:
        lines.append(report["localisation_note"])
    return "\n".join(lines)


def plot_credit_report(report: dict, path: str | Path) -> Path:
    plt = pyplot()

    est = report["estimators"]
    x = list(range(len(est)))
    loc = report.get("localisation")
    panel = max(5.0, 1.4 * len(est))
    fig, axes = plt.subplots(1, 3 if loc else 2, figsize=(panel * (3 if loc else 2), 4.3))
    a = axes[0]
    w = 0.27
    adv = report["advantages"]
    a.bar([i - w for i in x], [adv[e]["zero_frac"] for e in est], w, label="zero-advantage tokens")
    a.bar(x, [adv[e]["correct_abs_mean"] or 0.0 for e in est], w, label="mean |A|, correct")
    a.bar([i + w for i in x], [adv[e]["incorrect_abs_mean"] or 0.0 for e in est], w, label="mean |A|, incorrect")
    a.set_xticks(x, est)
    a.set_title("advantages")
    a.legend(fontsize=8)
    if loc:
        b = axes[1]
        for off, key, label in ((-w, "before_adv", "steps before"), (0, "first_wrong_adv", "first wrong step"),
                                (w, "after_adv", "steps after")):
            b.bar([i + off for i in x], [loc[e][key] or 0.0 for e in est], w, label=label)
        b.axhline(0, color="black", lw=0.8)
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        b.set_xticks(x, [f"{e}\nacc {f(loc[e]['accuracy'])} (~{f(loc[e]['accuracy_random_tiebreak'])})"
                         for e in est], fontsize=8)
        chance = loc[est[0]]["chance"]
        b.set_title(f"mean advantage in {loc['wrong_responses']} wrong responses\n"
                    f"acc: first wrong step lowest (~ ties split), chance {f(chance)}", fontsize=9)
        b.legend(fontsize=8)
    c = axes[-1]
    g = report["gradient"]
    ref = g["reference"]
    c.bar([i - w / 2 for i in x], [g[e]["cosine"] or 0.0 for e in est], w, label="cosine between batches")
    c.bar([i + w / 2 for i in x], [g[e][f"cosine_to_{ref}_mean"] or 0.0 for e in est], w,
          label=f"cosine of mean to {ref}'s")
    c.axhline(0, color="black", lw=0.8)
    ns = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    c.set_xticks(x, [f"{e}\nN/S {ns(g[e]['noise_to_signal'])}" for e in est], fontsize=8)
    c.set_ylim(top=1.35)  # (cosines <= 1: room for the legend)
    c.set_title(f"policy gradients, {report['batches']} batches (N/S of pure noise: {report['batches'] - 1})")
    c.legend(fontsize=8)
    fig.suptitle(f"credit assignment: {report['responses']} responses, reward {report['reward_mean']:.3f}")
    return save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------- CLI


def credit_main(args: argparse.Namespace, sub: argparse.ArgumentParser) -> dict:
    """`python -m engine.analysis credit`: checks, the Trainer, the analysis, report + plot + table."""
    import tempfile

    from engine.rl.config import ConfigError
    from typing import get_args

    from engine.rl.loss import Aggregation
    from engine.tasks import TASKS

    # Bad input fails here, before anything is loaded.
    for flag, value in (("--prompts", args.prompts), ("--samples", args.samples), ("--k", args.k),
                        ("--batches", args.batches), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            sub.error(f"{flag} must be >= 1, got {value}")
    tree = args.tree_branching
    if tree is not None and (not tree or min(tree) < 1 or args.tree_segment_tokens < 1):
        sub.error(f"--tree-branching needs integers >= 1 and --tree-segment-tokens >= 1, got {tree} and "
                  f"{args.tree_segment_tokens}")
    if tree is None and args.samples < 2:
        sub.error(f"--samples must be >= 2 (GRPO and RLOO compare a prompt's samples), got {args.samples}")
    if not 0 < args.temperature < math.inf:
        sub.error(f"--temperature must be > 0 (the trainer samples), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        sub.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.loss_aggregation not in get_args(Aggregation):
        sub.error(f"--loss-aggregation must be one of {get_args(Aggregation)}, got {args.loss_aggregation!r}")
    if args.task not in TASKS:
        sub.error(f"unknown task {args.task!r}; choose one of {', '.join(sorted(TASKS))}")
    if not Path(args.model).is_dir():
        sub.error(f"model directory {args.model} does not exist")
    if args.critic is not None:
        try:
            critic_folder(args.critic)
        except FileNotFoundError as e:
            sub.error(str(e))
    localise = args.task == "arithmetic"

    from engine.rl.trainer import Trainer

    estimators = [*CREDIT_ESTIMATORS, *(["ppo"] if args.critic else []), *(["capo"] if localise else [])]
    if tree is not None:  # its own responses (the tree's leaves): SPO-tree's credit, and the exact judge's on them
        estimators = ["spo-tree", *(["capo"] if localise else [])]
    with tempfile.TemporaryDirectory(prefix="credit-") as run_dir:
        cfg = credit_config(args.model, args.task, args.task_args, prompts=args.prompts, samples=args.samples,
                            k=args.k, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, loss_aggregation=args.loss_aggregation,
                            run_dir=run_dir, device=args.device, dtype=args.dtype,
                            kv_cache_tokens=args.kv_cache_tokens, tree_branching=tree,
                            tree_segment_tokens=args.tree_segment_tokens)
        try:
            trainer = Trainer(cfg, progress=not args.quiet)
        except ConfigError as e:
            sub.error(str(e))
        critic = Critic.load(args.critic, device=trainer.device, dtype=trainer.dtype).model if args.critic else None
        report = credit_analysis(trainer, batches=args.batches, estimators=estimators, localise=localise,
                                 critic=critic)
    if not localise:
        report["localisation_note"] = NOT_ARITHMETIC.format(task=args.task)
    report["config"] = {k: v for k, v in vars(args).items() if k != "command"}
    path = Path(args.out) if args.out else Path(args.model) / f"credit-{args.task}.json"
    return write_report(report, path, plot_credit_report, format_credit_table)
