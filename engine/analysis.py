"""`python -m engine.analysis values`: how well do value estimators predict a state's value?
(`python -m engine.analysis credit`: credit assignment of the algorithms' advantages; its help.)

The VinePPO paper's value-prediction analysis at small scale:

    python -m engine.analysis values --model DIR --task arithmetic --states 64 --truth-rollouts 64 \\
        --k 1 3 9 --repeats 4 --critic runs/ppo/checkpoints/iter_000030 --out report.json

1. One response per item (`--items` items of `--split`), sampled at the given temperature / top-p /
   length with the task's stop strings (as the trainer samples).
2. States, as VinePPO values them: the prompt, and prompt + response up to the end of every step
   but the last (token step ends in the task's step style). `--states` of them are drawn at
   random (seeded) across all responses (all of them if fewer); identical states count once.
3. Ground truth V*(s): mean 0/1 reward of `--truth-rollouts` rollouts from s, graded as
   `engine.rl.rollout.mc_values` grades (the task's reward on the state's part of the response
   plus the rollout; a rollout cut by length scores 0).
4. MC estimates: for every K of `--k` and each of `--repeats` repeats, V_K(s) = mean reward of K
   fresh rollouts (drawn apart from the truth rollouts). Per K: MAE and RMSE against V*, the
   Pearson correlation with V* (averaged over repeats; null when undefined, e.g. a constant V*),
   and the binomial standard error sqrt(V*(1 - V*) / K) averaged over states, MC's expected
   error scale.
5. `--critic DIR` (a PPO checkpoint: DIR/critic/ holds the critic's body and
   value_head.safetensors): its value at each state's last token; the same metrics. A
   "constant" baseline predicts the mean of V* everywhere (`constant_mae`).
6. Step ranking: for up to `--ranking-states` of the states, `--alternatives` sampled next steps;
   each alternative's resulting state gets its truth value and every estimator's estimate (each
   K once, the critic). Over the pairs of alternatives of one state with different truth values,
   an estimator is right when it orders them the same way (a tie by the estimator is half
   right). Alternatives that end the response (EOS, a stop string) or are cut by the length
   limit are no states VinePPO values and are left out (`ranking_terminal_alternatives`).

Writes the JSON report (default: next to the model, values-<task>-<split>.json), a plot next to
it (same name, .png: MAE vs K with the critic and the constant baseline, and V_K / critic vs V*),
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.rl.rollout import AdaptiveK, allocate_rollouts, response_text, sample_episodes
from engine.rl.steps import step_token_ends
from engine.runtime import Engine, SamplingParams
from engine.runtime.params import mix_seed
from engine.tasks import Item, Task, load_task, parse_task_args

VALUE_HEAD = "value_head.safetensors"
NO_STEPS = "the model's responses have no steps to evaluate (no states: are there any items?)"

# Phase seeds: each sampling phase draws from its own seed stream mixed from --seed.
_PHASES = {"responses": 0, "truth": 1, "estimates": 2, "alternatives": 3, "ranking_truth": 4, "ranking_estimates": 5}


# ---------------------------------------------------------------------------- metric math (pure)

def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when undefined (fewer than 2 points or either side constant)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} and {len(y)} values")
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 1e-15 or syy <= 1e-15:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def estimator_metrics(truth: Sequence[float], estimates: Sequence[float] | Sequence[Sequence[float]]) -> dict:
    """MAE, RMSE and Pearson correlation of an estimator against the truth.

    estimates: one value per state, or one such list per repeat. MAE and RMSE pool all states
    and repeats; the correlation is each repeat's, averaged over the repeats where it is
    defined (None if it is defined for none).
    """
    if not truth:
        raise ValueError("estimator_metrics: no states")
    repeats = [list(estimates)] if estimates and not isinstance(estimates[0], (list, tuple)) else [list(r) for r in estimates]
    if not repeats:
        raise ValueError("estimator_metrics: no estimates")
    for r in repeats:
        if len(r) != len(truth):
            raise ValueError(f"estimator_metrics: {len(r)} estimates for {len(truth)} states")
    errors = [e - t for r in repeats for e, t in zip(r, truth)]
    corrs = [c for c in (pearson(r, truth) for r in repeats) if c is not None]
    return {
        "mae": sum(abs(d) for d in errors) / len(errors),
        "rmse": math.sqrt(sum(d * d for d in errors) / len(errors)),
        "correlation": sum(corrs) / len(corrs) if corrs else None,
    }


def binomial_se(truth: Sequence[float], k: int) -> float:
    """Mean over states of sqrt(V*(1 - V*) / k): the standard error of a k-rollout mean of 0/1 rewards."""
    return sum(math.sqrt(max(0.0, v * (1 - v)) / k) for v in truth) / len(truth)


def constant_mae(truth: Sequence[float]) -> float:
    """MAE of predicting the mean of the truth for every state (a baseline that knows nothing per state)."""
    mean = sum(truth) / len(truth)
    return sum(abs(v - mean) for v in truth) / len(truth)


def ranking_accuracy(truth_groups: Sequence[Sequence[float]],
                     estimate_groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """(accuracy, pairs) of an estimator ordering the alternatives of each group.

    Pairs are taken within a group (the alternative next steps from one state) and only where
    the truth values differ; the estimator scores 1 if it orders the pair as the truth does,
    1/2 on a tie, 0 otherwise. Accuracy None when there is no such pair.
    """
    if len(truth_groups) != len(estimate_groups):
        raise ValueError("ranking_accuracy: as many estimate groups as truth groups are needed")
    score, pairs = 0.0, 0
    for truth, est in zip(truth_groups, estimate_groups):
        if len(truth) != len(est):
            raise ValueError("ranking_accuracy: a group's estimates and truth differ in length")
        for i in range(len(truth)):
            for j in range(i + 1, len(truth)):
                if truth[i] == truth[j]:
                    continue
                pairs += 1
                if est[i] == est[j]:
                    score += 0.5
                elif (est[i] > est[j]) == (truth[i] > truth[j]):
                    score += 1.0
    return (score / pairs if pairs else None), pairs


# ---------------------------------------------------------------------------- states and rollouts

@dataclass
class State:
    """prompt + response[:cut] of one sampled response; `item` grades its rollouts."""

    item: Item
    prompt_ids: list[int]
    response_ids: list[int]   # the response part of the state (already cut)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def _seeded(params: SamplingParams, seed: int, phase: str, count: int) -> list[SamplingParams]:
    """One SamplingParams per prompt, each with its own seed from (seed, phase): the phases'
    rollouts are independent draws, and reproducible."""
    return replace(params, seed=mix_seed(seed, _PHASES[phase])).per_prompt(count)


def _rollout_rewards(engine: Engine, task: Task, states: Sequence[State], n: int, params: SamplingParams,
                     stop: Sequence[str], seed: int, phase: str, progress: bool | str) -> list[list[float]]:
    """n rollouts from every state in ONE engine.generate call; per state, the rollouts' 0/1
    rewards, graded as mc_values grades (task reward on state response + rollout; cut by length = 0)."""
    if not states:
        return []
    rollout = SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                             max_new_tokens=params.max_new_tokens, stop=tuple(stop))
    outs = engine.generate([s.ids for s in states], _seeded(rollout, seed, phase, len(states)), progress=progress)
    tok = engine.tokenizer
    rewards = []
    for s, completions in zip(states, outs):
        rewards.append([task.reward(response_text(tok, s.response_ids + list(c.token_ids), stop), s.item,
                                    c.finish_reason) for c in completions])
    return rewards


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def adaptive_estimates(pools: Sequence[Sequence[float]], adaptive: AdaptiveK) -> tuple[list[float], int]:
    """(per state, the adaptive-budget MC estimate; rollouts used in all), consuming each
    state's pool of k_max i.i.d. rewards in order, as the trainer's adaptive rounds would draw them."""
    counts = [adaptive.k_min] * len(pools)
    left = round(adaptive.mean_k * len(pools)) - adaptive.k_min * len(pools)
    while left > 0:
        sums = [sum(p[:n]) for p, n in zip(pools, counts)]
        squares = [sum(x * x for x in p[:n]) for p, n in zip(pools, counts)]
        extra = allocate_rollouts(counts, sums, squares, left, adaptive.k_max, adaptive.k_min)
        if not any(extra):
            break
        counts = [n + e for n, e in zip(counts, extra)]
        left -= sum(extra)
    return [_mean(p[:n]) for p, n in zip(pools, counts)], sum(counts)


def collect_states(engine: Engine, task: Task, items: Sequence[Item], params: SamplingParams, *,
                   step_style: str | None = None, progress: bool | str = False) -> tuple[list[State], dict]:
    """Sample one response per item; return every distinct VinePPO state (prompt, then prompt +
    response up to each step end but the last) and counts for the report."""
    episodes = sample_episodes(engine, task, items, params, progress=progress)
    style = step_style or task.step_style
    seen: dict[tuple[int, ...], State] = {}
    step_states = 0
    for ep in episodes:
        ends = step_token_ends(ep.response_ids, engine.tokenizer, style) if ep.response_ids else []
        for b in [0] + ends[:-1]:
            key = tuple(ep.prompt_ids + ep.response_ids[:b])
            if key not in seen:
                seen[key] = State(ep.item, list(ep.prompt_ids), list(ep.response_ids[:b]))
                step_states += b > 0
    info = {"responses": len(episodes), "candidate_states": len(seen), "candidate_step_states": step_states,
            "response_reward_mean": _mean([ep.reward for ep in episodes]) if episodes else None}
    return list(seen.values()), info


def _next_steps(engine: Engine, task: Task, states: Sequence[State], alternatives: int, params: SamplingParams,
                stop: Sequence[str], style: str, seed: int, progress: bool | str) -> tuple[list[list[State]], int]:
    """`alternatives` sampled next steps from each state: (per state, the resulting states of the
    alternatives that end a step without ending the response, how many were left out).

    Newline style stops the sample at "\\n" (saves the rest of the chunk); every style then cuts
    state response + sample at its first step end past the state. A sample that reaches no step
    end before it ends the response (EOS, a task stop string) or hits the length limit is left out.
    """
    if not states:
        return [], 0
    tok = engine.tokenizer
    extra = ("\n",) if style == "newline" else ()
    sp = SamplingParams(n=alternatives, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                        max_new_tokens=params.max_new_tokens, stop=tuple(stop) + extra)
    outs = engine.generate([s.ids for s in states], _seeded(sp, seed, "alternatives", len(states)), progress=progress)
    eos = set(engine.eos_token_ids)
    groups, left_out = [], 0
    for s, completions in zip(states, outs):
        group = []
        for c in completions:
            alt = list(c.token_ids)
            full = s.response_ids + alt
            ends = [e for e in step_token_ends(full, tok, style) if e > len(s.response_ids)] if alt else []
            cut = None
            if ends and ends[0] < len(full):
                cut = ends[0]
            elif ends and extra and c.finish_reason == "stop" and alt[-1] not in eos:
                raw = tok.decode(alt, skip_special_tokens=True)
                if raw.endswith("\n") and not any(x in raw for x in stop):  # stopped on the step's newline
                    cut = len(full)
            if cut is None or any(t in eos for t in full[len(s.response_ids):cut]):
                left_out += 1
                continue
            group.append(State(s.item, s.prompt_ids, full[:cut]))
        groups.append(group)
    return groups, left_out


# ---------------------------------------------------------------------------- critic

class Critic:
    """A PPO run's critic (engine.rl.trainer.ValueModel) as a function: token-id states -> the
    value at each state's last token."""

    def __init__(self, model: torch.nn.Module, batch_tokens: int = 8192):
        self.model = model.eval()
        self.batch_tokens = batch_tokens

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype=None) -> "Critic":
        from safetensors.torch import load_file

        from engine.model import load_model
        from engine.rl.trainer import ValueModel

        folder = critic_folder(checkpoint_dir)
        body, _ = load_model(folder, dtype=dtype, device=device)
        model = ValueModel(body)
        model.head.load_state_dict(load_file(str(folder / VALUE_HEAD), device=str(device)))
        return cls(model)

    @torch.no_grad()
    def __call__(self, states: Sequence[Sequence[int]]) -> list[float]:
        device = self.model.head.weight.device
        values: list[float] = []
        i = 0
        while i < len(states):
            chunk, total = [], 0
            while i < len(states) and (not chunk or total + len(states[i]) <= self.batch_tokens):
                chunk.append(list(states[i]))
                total += len(states[i])
                i += 1
            cu = [0]
            for ids in chunk:
                cu.append(cu[-1] + len(ids))
            ids = torch.tensor([[t for s in chunk for t in s]], dtype=torch.long, device=device)
            cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
            rows = torch.tensor([c - 1 for c in cu[1:]], dtype=torch.long, device=device)
            values += self.model(ids, cu_t, rows).float().cpu().tolist()
        return values


def critic_folder(checkpoint_dir: str | Path) -> Path:
    """DIR/critic of a PPO checkpoint; FileNotFoundError naming the missing value head otherwise."""
    folder = Path(checkpoint_dir) / "critic"
    head = folder / VALUE_HEAD
    if not head.is_file():
        raise FileNotFoundError(f"--critic {checkpoint_dir}: no critic value head at {head} "
                                f"(a PPO checkpoint dir, e.g. runs/ppo/checkpoints/iter_000030, holds critic/{VALUE_HEAD})")
    return folder


# ---------------------------------------------------------------------------- the analysis

def value_analysis(engine: Engine, task: Task, items: Sequence[Item], *, states: int, truth_rollouts: int,
                   ks: Sequence[int], repeats: int = 4, critic: Callable[[Sequence[Sequence[int]]], list[float]] | None = None,
                   ranking_states: int = 16, alternatives: int = 3, temperature: float = 0.6, top_p: float = 1.0,
                   max_new_tokens: int = 256, stop: Sequence[str] = (), seed: int = 0, step_style: str | None = None,
                   adaptive: AdaptiveK | None = None, progress: bool = False) -> dict:
    """Run the value-prediction analysis (module docstring) and return the report (without config).

    critic: a function from states (token-id lists) to values, e.g. `Critic.load(dir)`.
    adaptive: also estimate with an adaptive budget (the trainer's --k-adaptive): per repeat, each
    state draws from its own k_max fresh rollouts, k_min first, then as `allocate_rollouts`
    directs, round(mean_k x states) in all; reported as "adaptive" next to fixed K = mean_k at
    equal rollouts (an i.i.d. pool consumed in order is the same draw as sampling on demand).
    Raises ValueError on bad counts and when there are no states to evaluate.
    """
    t0 = time.perf_counter()
    ks = list(dict.fromkeys(int(k) for k in ks))
    for name, value in (("states", states), ("truth_rollouts", truth_rollouts), ("repeats", repeats),
                        ("alternatives", alternatives)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not ks or min(ks) < 1:
        raise ValueError(f"every K must be >= 1, got {ks}")
    if ranking_states < 0:
        raise ValueError(f"ranking_states must be >= 0, got {ranking_states}")
    style = step_style or task.step_style
    stop = tuple(stop)
    label = (lambda s: s) if progress else (lambda s: False)  # noqa: E731
    base = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=stop)

    # 1-2. responses and states
    torch.manual_seed(mix_seed(seed, _PHASES["responses"]))  # sample_episodes takes one params: unseeded, from torch
    pool, info = collect_states(engine, task, items, base, step_style=style, progress=label("responses"))
    if not pool:
        raise ValueError(NO_STEPS)
    rng = random.Random(seed)
    chosen = rng.sample(pool, states) if states < len(pool) else list(pool)
    rng.shuffle(chosen)
    ids = [s.ids for s in chosen]

    # 3. ground truth
    truth_rewards = _rollout_rewards(engine, task, chosen, truth_rollouts, base, stop, seed, "truth", label("truth"))
    truth = [_mean(r) for r in truth_rewards]

    # 4. MC estimates: repeats x sum(ks) fresh rollouts per state in one call, cut into disjoint groups
    per_state = repeats * (sum(ks) + (adaptive.k_max if adaptive else 0))
    fresh = _rollout_rewards(engine, task, chosen, per_state, base, stop, seed, "estimates", label("MC estimates"))
    estimates: dict[str, list[list[float]]] = {str(k): [] for k in ks}
    adaptive_used: list[int] = []
    offset = 0
    for _ in range(repeats):
        for k in ks:
            estimates[str(k)].append([_mean(r[offset:offset + k]) for r in fresh])
            offset += k
        if adaptive is not None:
            values, used = adaptive_estimates([r[offset:offset + adaptive.k_max] for r in fresh], adaptive)
            estimates.setdefault("adaptive", []).append(values)
            adaptive_used.append(used)
            offset += adaptive.k_max
    results = {key: estimator_metrics(truth, reps) for key, reps in estimates.items()}
    critic_values = None
    if critic is not None:
        critic_values = [float(v) for v in critic(ids)]
        results["critic"] = estimator_metrics(truth, critic_values)

    # 6. step ranking
    rank_from = chosen[:ranking_states]
    groups, left_out = _next_steps(engine, task, rank_from, alternatives, base, stop, style, seed,
                                   label("alternatives"))
    flat = [s for g in groups for s in g]
    r_truth = [_mean(r) for r in _rollout_rewards(engine, task, flat, truth_rollouts, base, stop, seed,
                                                  "ranking_truth", label("ranking truth"))]
    r_fresh = _rollout_rewards(engine, task, flat, sum(ks), base, stop, seed, "ranking_estimates",
                               label("ranking estimates"))
    r_est: dict[str, list[float]] = {}
    offset = 0
    for k in ks:
        r_est[str(k)] = [_mean(r[offset:offset + k]) for r in r_fresh]
        offset += k
    if critic is not None:
        r_est["critic"] = [float(v) for v in critic([s.ids for s in flat])] if flat else []

    def regroup(values: list[float]) -> list[list[float]]:
        out, i = [], 0
        for g in groups:
            out.append(values[i:i + len(g)])
            i += len(g)
        return out

    truth_groups = regroup(r_truth)
    ranking, pairs = {}, 0
    for key, values in r_est.items():
        ranking[key], pairs = ranking_accuracy(truth_groups, regroup(values))

    report = {
        "mae": {key: m["mae"] for key, m in results.items()},
        "rmse": {key: m["rmse"] for key, m in results.items()},
        "correlation": {key: m["correlation"] for key, m in results.items()},
        "ranking_accuracy": ranking,
        "ranking_pairs": pairs,
        "states": len(chosen),
        "step_states": sum(bool(s.response_ids) for s in chosen),
        "truth_rollouts": truth_rollouts,
        "repeats": repeats,
        "ks": ks,
        "binomial_se": {str(k): binomial_se(truth, k) for k in ks},
        "constant_mae": constant_mae(truth),
        "truth_mean": _mean(truth),
        "ranking_states": len(rank_from),
        "ranking_alternatives": sum(len(g) for g in groups),
        "ranking_terminal_alternatives": left_out,
        **({"adaptive": {"k_min": adaptive.k_min, "k_max": adaptive.k_max, "mean_k": adaptive.mean_k,
                         "rollouts_per_state": _mean(adaptive_used) / len(chosen)}} if adaptive else {}),
        "rollouts": {"truth": len(chosen) * truth_rollouts, "estimates": len(chosen) * per_state,
                     "alternatives": len(rank_from) * alternatives,
                     "ranking": len(flat) * (truth_rollouts + sum(ks))},
        **info,
        "values": {"truth": truth, "largest_k": estimates[str(max(ks))][0], "critic": critic_values},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return report


# ---------------------------------------------------------------------------- output

def format_table(report: dict) -> str:
    def f(x):
        return "     -" if x is None else f"{x:6.3f}"

    lines = [f"{report['states']} states ({report['step_states']} past the prompt), V* from "
             f"{report['truth_rollouts']} rollouts (mean {report['truth_mean']:.3f}), {report['repeats']} repeats",
             f"{'estimator':<10}{'mae':>8}{'rmse':>8}{'corr':>8}{'binom se':>10}{'rank acc':>10}"]
    for key in report["mae"]:
        name = key if key in ("critic", "adaptive") else f"K={key}"
        lines.append(f"{name:<10}  {f(report['mae'][key])}  {f(report['rmse'][key])}  {f(report['correlation'][key])}"
                     f"    {f(report['binomial_se'].get(key))}    {f(report['ranking_accuracy'].get(key))}")
    lines.append(f"{'constant':<10}  {f(report['constant_mae'])}")
    lines.append(f"ranking: {report['ranking_pairs']} pairs from {report['ranking_states']} states "
                 f"({report['ranking_terminal_alternatives']} alternatives left out: terminal or cut)")
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = report["ks"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ks, [report["mae"][str(k)] for k in ks], "o-", label="MC (V_K)")
    a.plot(ks, [report["binomial_se"][str(k)] for k in ks], "x:", color="gray", label="binomial s.e.")
    if "adaptive" in report["mae"]:
        cfg = report["adaptive"]
        a.plot([cfg["mean_k"]], [report["mae"]["adaptive"]], "s", color="tab:green",
               label=f"adaptive ({cfg['k_min']}..{cfg['k_max']}, mean {cfg['mean_k']})")
    if "critic" in report["mae"]:
        a.axhline(report["mae"]["critic"], color="tab:red", ls="--", label="critic")
    a.axhline(report["constant_mae"], color="black", ls="-.", label="constant (mean V*)")
    a.set_xscale("log")
    a.set_xticks(ks, [str(k) for k in ks])
    a.set_xlabel("K rollouts")
    a.set_ylabel("MAE vs V*")
    a.legend()
    v = report["values"]
    b.scatter(v["truth"], v["largest_k"], s=12, alpha=0.6, label=f"V_{max(ks)}")
    if v["critic"] is not None:
        b.scatter(v["truth"], v["critic"], s=12, alpha=0.6, color="tab:red", label="critic")
    b.plot([0, 1], [0, 1], color="gray", lw=0.8)
    b.set_xlabel("V* (truth)")
    b.set_ylabel("estimate")
    b.legend()
    fig.suptitle(f"value prediction: {report['states']} states, V* from {report['truth_rollouts']} rollouts")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ============================================================================ `credit`: credit assignment

CREDIT_HELP = """Credit assignment on one fixed policy (no training): what each algorithm's advantages say
about the same sampled responses, and how noisy the policy gradients they give are.

    python -m engine.analysis credit --model DIR --task arithmetic --task-args '{steps: [4, 6], max_operand: 50}' \\
        --prompts 32 --samples 4 --k 4 --batches 4 --temperature 0.6 --max-new-tokens 128 --out report.json

A Trainer (engine.rl.trainer) is built for the model with these settings (a VinePPO run's config:
seeded sampling, no KL reference, one minibatch per batch) and its own code does the work:
batch b = 1..B holds the prompts of its iteration b, sampled with seeds from (seed, b, prompt); each
estimator's advantages are its `_values_and_advantages` with that algorithm (VinePPO: MC values
from K rollouts at every step boundary; GRPO; RLOO; PPO's GAE with --critic's critic) and, on
the arithmetic task, its `_capo_advantages` with the exact rule judge ("capo": an oracle that
penalises every false line, the CAPO runs' judge).

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
CREDIT_ESTIMATORS = ("vineppo", "grpo", "rloo")   # and "ppo" with a critic, "capo" (the rule judge) on arithmetic
ALL_CREDIT_ESTIMATORS = (*CREDIT_ESTIMATORS, "ppo", "capo")
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
    from engine.rl.trainer import Packed, _chunks

    cfg, policy = trainer.cfg, trainer.policy
    policy.zero_grad(set_to_none=True)
    num_tokens, num_seqs = sum(e.num_tokens for e in episodes), len(episodes)
    for micro in _chunks(list(episodes), cfg.micro_batch_size):
        packed = Packed.build(micro, trainer.device)
        lp = trainer._token_logprobs(policy, packed)
        adv = packed.pad(torch.cat([advantages[id(e)] for e in micro]).to(trainer.device))
        loss, _ = ppo_loss(packed.pad(lp), packed.pad(lp.detach()), adv, packed.mask(), clip_low=cfg.clip_low,
                           clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation, num_tokens=num_tokens,
                           num_seqs=num_seqs, norm_length=cfg.max_new_tokens)
        loss.backward()
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float().cpu()
             for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    return torch.cat(grads)


def credit_analysis(trainer, *, batches: int, estimators: Sequence[str] = CREDIT_ESTIMATORS,
                    localise: bool = True) -> dict:
    """Run the credit-assignment analysis (see `credit_config` and the `credit` command's help)
    with a Trainer built for it: its policy is never updated.

    Batch b (b = 1..batches) is sampled as the trainer's iteration b samples (its prompts, and
    with seeded sampling its seeds), graded by the task; each estimator's advantages come from
    the trainer's own `_values_and_advantages` with cfg.algo set to that estimator (VinePPO's
    MC values with its K, GRPO, RLOO, PPO's GAE with trainer.critic). The gradient uses the
    advantages as the loss sees them: whitened over the batch when the algorithm whitens
    (trainer._whiten; the trainer whitens each minibatch, here the batch is one minibatch).
    Statistics and localisation read the raw advantages.
    """
    from engine.rl.steps import step_spans

    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    estimators = list(dict.fromkeys(estimators))
    if not estimators or set(estimators) - set(ALL_CREDIT_ESTIMATORS):
        raise ValueError(f"estimators must be among {ALL_CREDIT_ESTIMATORS}, got {estimators}")
    if "ppo" in estimators and trainer.critic is None:
        raise ValueError("the ppo estimator needs trainer.critic (a PPO checkpoint's critic)")
    if "capo" in estimators:
        if trainer.task.name != "arithmetic":
            raise ValueError("the capo estimator uses the exact rule judge: arithmetic only")
        from engine.rl.judge import RuleJudge

        trainer.judge = RuleJudge()
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
    try:
        for b in range(1, batches + 1):
            trainer.iteration = b
            trainer.cfg = base
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
                trainer.cfg = replace(base, algo=name, judge="rule")
                mc = None
                if name == "capo":
                    trainer._capo_advantages(episodes)
                else:
                    mc = trainer._values_and_advantages(episodes)
                if mc is not None:
                    mc_rows.append({"states": mc.states, "rollouts": mc.rollouts, "value_mean": mc.value_mean,
                                    "truncated": mc.truncated})
                for ep, (_, ends), f in zip(episodes, spans, first_wrong):
                    raw[name].append(ep.advantages.detach().float().cpu().clone())
                    if f is not None:
                        cases[name].append(CreditCase(step_mean_advantages(ep.advantages, ends),
                                                      [e - a for a, e in zip([0, *ends[:-1]], ends)], f))
                loss_adv = (trainer._whiten(episodes) if trainer.cfg.whiten
                            else {id(e): e.advantages for e in episodes})
                grads[name].append(_policy_gradient(trainer, episodes, loss_adv))
    finally:
        trainer.cfg = base
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
                  device: str = "auto", dtype: str = "auto", kv_cache_tokens: int | None = None):
    """The TrainConfig of a Trainer that samples, values and computes advantages as a VinePPO run
    with these settings would in its iterations 1, 2, ... (seeded sampling; no KL reference is
    loaded: the policy is its own reference; one minibatch = the whole batch)."""
    from engine.rl.config import TrainConfig

    n = prompts * samples
    micro = max(d for d in range(1, min(n, 64) + 1) if n % d == 0)
    return TrainConfig(algo="vineppo", task=task, task_args=dict(task_args or {}), model=model, seed=seed,
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- CLI

def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the program's parser, its subcommands' parsers by name, which report their command's errors)."""
    ap = argparse.ArgumentParser(prog="python -m engine.analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("values", help="value-prediction analysis: MC estimates and a critic against MC ground truth")
    v.add_argument("--model", required=True, help="policy checkpoint folder (Hugging Face layout)")
    v.add_argument("--task", required=True, help="gsm8k | math | arithmetic")
    v.add_argument("--task-args", default=None, type=parse_task_args, help="task options as a YAML mapping")
    v.add_argument("--split", default="test")
    v.add_argument("--items", type=int, default=64, help="items sampled (one response each)")
    v.add_argument("--states", type=int, required=True, help="states drawn at random across the responses")
    v.add_argument("--truth-rollouts", type=int, required=True, help="rollouts per state for V*")
    v.add_argument("--k", type=int, nargs="+", required=True, help="MC rollout counts to evaluate")
    v.add_argument("--repeats", type=int, default=4, help="independent V_K estimates per state and K")
    v.add_argument("--critic", default=None, help="a PPO checkpoint dir holding critic/ and critic/" + VALUE_HEAD)
    v.add_argument("--k-adaptive", type=int, nargs=3, default=None, metavar=("K_MIN", "K_MAX", "MEAN_K"),
                   help="also the adaptive budget (the trainer's --k-adaptive), at MEAN_K rollouts per state")
    v.add_argument("--ranking-states", type=int, default=16)
    v.add_argument("--alternatives", type=int, default=3, help="next steps sampled per ranking state")
    v.add_argument("--temperature", type=float, default=0.6)
    v.add_argument("--top-p", type=float, default=1.0)
    v.add_argument("--max-new-tokens", type=int, default=256)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None, help="report path (default: <model>/values-<task>-<split>.json)")
    v.add_argument("--device", default=None)
    v.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    v.add_argument("--kv-cache-tokens", type=int, default=None)
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    c = sub.add_parser("credit", help="credit assignment: VinePPO's, GRPO's, RLOO's (and PPO's) advantages and "
                                      "policy gradients on one policy's batches",
                       description=CREDIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", required=True, help="policy checkpoint folder (Hugging Face layout)")
    c.add_argument("--task", required=True, help="gsm8k | math | arithmetic (localisation: arithmetic only)")
    c.add_argument("--task-args", default=None, type=parse_task_args, help="task options as a YAML mapping")
    c.add_argument("--prompts", type=int, default=32, help="prompts per batch (the trainer's prompts_per_iteration)")
    c.add_argument("--samples", type=int, default=4, help="samples per prompt (>= 2: GRPO and RLOO compare them)")
    c.add_argument("--k", type=int, default=4, help="VinePPO's MC rollouts per state")
    c.add_argument("--batches", type=int, default=4, help="independent batches (the trainer's iterations 1..B)")
    c.add_argument("--critic", default=None, help="also PPO's GAE advantages with this PPO checkpoint's critic/")
    c.add_argument("--temperature", type=float, default=0.6)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--loss-aggregation", default="token-mean", help="the trainer's loss_aggregation")
    c.add_argument("--seed", type=int, default=0, help="the run seed: batch b is iteration b of a run with it")
    c.add_argument("--out", default=None, help="report path (default: <model>/credit-<task>.json)")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (auto: the trainer's choice)")
    c.add_argument("--kv-cache-tokens", type=int, default=None)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap, {"values": v, "credit": c}


def main(argv: list[str] | None = None) -> dict:
    ap, subs = _parser()
    args = ap.parse_args(argv)
    if args.command == "credit":
        return credit_main(args, subs["credit"])
    sub = subs["values"]
    # Bad input fails here, before anything is loaded.
    for flag, value in (("--states", args.states), ("--truth-rollouts", args.truth_rollouts),
                        ("--repeats", args.repeats), ("--alternatives", args.alternatives),
                        ("--items", args.items), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            sub.error(f"{flag} must be >= 1, got {value}")
    if min(args.k) < 1:
        sub.error(f"every --k must be >= 1, got {args.k}")
    if args.ranking_states < 0:
        sub.error(f"--ranking-states must be >= 0, got {args.ranking_states}")
    adaptive = None
    if args.k_adaptive is not None:
        try:
            adaptive = AdaptiveK(*args.k_adaptive)
        except ValueError as e:
            sub.error(f"--k-adaptive: {e}")
    if not Path(args.model).is_dir():
        sub.error(f"model directory {args.model} does not exist")
    if args.critic is not None:
        try:
            critic_folder(args.critic)
        except FileNotFoundError as e:
            sub.error(str(e))

    from engine.evaluate import STOP_STRINGS
    from engine.model import load_model

    try:
        task = load_task(args.task, **(args.task_args or {}))
        items = task.items(args.split)[: args.items]
    except (KeyError, TypeError, ValueError) as e:
        sub.error(f"task {args.task}: {e}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    if tokenizer is None:
        sub.error(f"{args.model} has no tokenizer files; the analysis needs one to grade responses")
    engine = Engine(model, tokenizer, kv_cache_tokens=args.kv_cache_tokens)
    critic = Critic.load(args.critic, device=device, dtype=args.dtype) if args.critic else None
    t0 = time.perf_counter()
    try:
        report = value_analysis(engine, task, items, states=args.states, truth_rollouts=args.truth_rollouts,
                                ks=args.k, repeats=args.repeats, critic=critic, ranking_states=args.ranking_states,
                                alternatives=args.alternatives, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, stop=STOP_STRINGS.get(args.task, ()),
                                seed=args.seed, adaptive=adaptive, progress=not args.quiet)
    except ValueError as e:
        if str(e) == NO_STEPS:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    config = {k: v for k, v in vars(args).items() if k != "command"}
    report = {**report, "config": config, "seconds": round(time.perf_counter() - t0, 3)}
    path = Path(args.out) if args.out else Path(args.model) / f"values-{args.task}-{args.split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    plot = plot_report(report, path.with_suffix(".png"))
    print(format_table(report))
    print(f"-> {path}, {plot}")
    report["path"], report["plot"] = str(path), str(plot)
    return report


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
    if args.samples < 2:
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
    with tempfile.TemporaryDirectory(prefix="credit-") as run_dir:
        cfg = credit_config(args.model, args.task, args.task_args, prompts=args.prompts, samples=args.samples,
                            k=args.k, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, loss_aggregation=args.loss_aggregation,
                            run_dir=run_dir, device=args.device, dtype=args.dtype,
                            kv_cache_tokens=args.kv_cache_tokens)
        try:
            trainer = Trainer(cfg, progress=not args.quiet)
        except ConfigError as e:
            sub.error(str(e))
        if args.critic:
            critic = Critic.load(args.critic, device=trainer.device, dtype=trainer.dtype)
            trainer.critic = critic.model
        report = credit_analysis(trainer, batches=args.batches, estimators=estimators, localise=localise)
    if not localise:
        report["localisation_note"] = NOT_ARITHMETIC.format(task=args.task)
    report["config"] = {k: v for k, v in vars(args).items() if k != "command"}
    path = Path(args.out) if args.out else Path(args.model) / f"credit-{args.task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    plot = plot_credit_report(report, path.with_suffix(".png"))
    print(format_credit_table(report))
    print(f"-> {path}, {plot}")
    report["path"], report["plot"] = str(path), str(plot)
    return report


if __name__ == "__main__":
    main()
