"""`python -m engine.analysis values`: how well do value estimators predict a state's value?

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
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.analysis.common import write_report
from engine.rl.algorithms.ppo import VALUE_HEAD, ValueModel
from engine.rl.plots import pyplot, save_figure
from engine.rl.rollout import AdaptiveK, allocate_rollouts, response_text, sample_episodes
from engine.rl.steps import step_token_ends
from engine.runtime import Engine, SamplingParams
from engine.runtime.params import mix_seed
from engine.tasks import Item, Task, load_task

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
    """A PPO run's critic (engine.rl.algorithms.ppo.ValueModel) as a function: token-id states -> the
    value at each state's last token."""

    def __init__(self, model: torch.nn.Module, batch_tokens: int = 8192):
        self.model = model.eval()
        self.batch_tokens = batch_tokens

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype=None) -> "Critic":
        return cls(ValueModel.from_folder(critic_folder(checkpoint_dir), dtype=dtype, device=device))

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
    plt = pyplot()

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
    return save_figure(fig, path, dpi=100)


def values_main(args: argparse.Namespace, sub: argparse.ArgumentParser) -> dict:
    """`python -m engine.analysis values`: checks, the analysis, report + plot + table."""
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
    try:
        task.use_tokenizer(tokenizer)
    except ValueError as e:
        sub.error(str(e))
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
    return write_report(report, path, plot_report, format_table)
