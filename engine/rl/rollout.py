"""Episodes: sampling trajectories through the Engine, and VinePPO's Monte Carlo state values.

An `Episode` is one sampled response to one prompt, with its reward and (for VinePPO) its
step boundaries in token positions. `mc_values` estimates V(s) for the states of many
episodes: for each state (the prompt plus the response up to the end of a step) it samples K
continuations through `Engine.generate`. Those prefixes are the episodes' own tokens, which
the Engine still holds in its radix cache, so a rollout request computes no prefill: it forks
the cached KV K ways.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from engine.runtime import Engine, SamplingParams
from engine.runtime.params import cut_at_stop, mix_seed
from engine.tasks import Item, Task


@dataclass(eq=False)
class Episode:
    """One response to one prompt. `group` indexes the prompt within its iteration."""

    group: int
    item: Item
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finish_reason: str
    reward: float
    step_ends: list[int] = field(default_factory=list)      # token index where each step ends
    state_values: list[float] = field(default_factory=list)  # V(s_i) per step (VinePPO)
    advantages: torch.Tensor | None = None                   # [len(response_ids)] float32
    returns: torch.Tensor | None = None                      # critic targets (PPO)
    old_values: torch.Tensor | None = None                   # critic values at sampling (PPO)
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    # The sampler's log-prob of each response token (the Engine's, at the sampling temperature);
    # NaN for a token it did not draw (the EOS that replaces a stop string). None: not requested.
    sampler_logprobs: torch.Tensor | None = None
    # Per-token weights of the policy-gradient term (SPO-tree: 1 / how many leaves share the
    # token, so a shared segment counts once); None: every token weighs 1.
    token_weights: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


def response_text(tokenizer, token_ids: Sequence[int], stop: Sequence[str]) -> str:
    """The decoded response, cut before the first stop string (as the Engine cuts `Completion.text`)."""
    return cut_at_stop(tokenizer.decode(list(token_ids), skip_special_tokens=True), stop)


def trim_stop_string(tokenizer, token_ids: Sequence[int], text: str, eos_id: int) -> list[int]:
    """The tokens of a response that ended on a stop string, cut before it, plus EOS.

    `text` is the response already cut before the stop string. The kept tokens are the longest
    prefix whose decoding is a prefix of `text` (a token that straddles the stop string's
    start goes with it). As in VinePPO, a response is trained to end with EOS, not to emit
    the stop string (the next prompt of the template).
    """
    ids = list(token_ids)
    for i in range(len(ids), -1, -1):
        head = tokenizer.decode(ids[:i], skip_special_tokens=True)
        if len(head) <= len(text) and text.startswith(head):
            return ids[:i] + [eos_id]
    return [eos_id]  # unreachable: the empty prefix always qualifies


def sample_episodes(engine: Engine, task: Task, items: Sequence[Item],
                    params: SamplingParams | Sequence[SamplingParams], progress: bool | str = False,
                    first_group: int = 0) -> list[Episode]:
    """params.n responses per item, graded by the task. Episodes of one item are consecutive.

    params: one SamplingParams for all items, or one per item (e.g. each with its own seed);
    they must agree on `stop`. Item j's episodes get group `first_group + j` (a rank's shard
    of an iteration's prompts keeps the prompts' global indices).

    Responses that ended on a stop string are cut before it and end with EOS instead. A
    response that stopped without a final answer (`task.final_answer` is None) is unfinished,
    as in the VinePPO reference: finish_reason "unfinished", reward 0, and no EOS at its end,
    so the policy is not trained to stop there.
    """
    tok = engine.tokenizer
    prompts = [tok.encode(task.prompt(it)) for it in items]
    outs = engine.generate(prompts, params, progress=progress)
    stop = params.stop if isinstance(params, SamplingParams) else (params[0].stop if params else ())
    eos = set(engine.eos_token_ids)
    episodes = []
    for g, (item, ids, completions) in enumerate(zip(items, prompts, outs), start=first_group):
        for c in completions:
            episodes.append(graded_episode(tok, task, item, g, ids, c.token_ids, c.text, c.finish_reason,
                                           c.logprobs, stop, eos))
    return episodes


def graded_episode(tok, task: Task, item: Item, group: int, prompt_ids: Sequence[int], token_ids: Sequence[int],
                   text: str, finish: str, logprobs: Sequence[float] | None, stop: Sequence[str],
                   eos: set[int]) -> Episode:
    """One sampled response as an Episode (sample_episodes' rules): cut before a stop string and
    ended with EOS; "unfinished" (reward 0, no EOS) when it stopped without a final answer.
    `text` is the decoded response already cut before the stop string."""
    response = list(token_ids)
    sampled = list(logprobs) if logprobs is not None else None
    if stop and finish == "stop" and response[-1] not in eos:
        response = trim_stop_string(tok, response, text, tok.eos_token_id)
    if finish == "stop" and task.final_answer(text) is None:
        finish = "unfinished"
        while len(response) > 1 and response[-1] in eos:  # (an EOS-only response keeps its one token)
            response.pop()
    reward = 0.0 if finish == "unfinished" else task.reward(text, item, finish)
    lps = None
    if sampled is not None:  # (the kept tokens are a prefix of the sampled ones, maybe plus an EOS)
        lps = torch.tensor((sampled + [math.nan] * len(response))[: len(response)], dtype=torch.float32)
        if len(response) <= len(token_ids) and response != list(token_ids[: len(response)]):
            lps[-1] = math.nan  # the EOS that replaced a stop string was not drawn
    return Episode(group=group, item=item, prompt_ids=list(prompt_ids), response_ids=response,
                   text=text, finish_reason=finish, reward=reward, sampler_logprobs=lps)


@dataclass
class MCStats:
    """What the value phase did, for the metrics row."""

    states: int = 0             # states estimated (after deduplication)
    states_requested: int = 0   # states before deduplication
    backfilled: int = 0         # states past the cap, valued with the realised return
    rollouts: int = 0
    rollout_tokens: int = 0
    truncated: int = 0          # rollouts cut by the length limit (scored 0)
    value_mean: float = 0.0
    seconds: float = 0.0
    k_max_used: int = 0         # most rollouts any state got (adaptive budgets vary it)
    rounds: int = 0             # generate calls (1 with a fixed K)


@dataclass(frozen=True)
class AdaptiveK:
    """An adaptive MC budget: every state starts with `k_min` rollouts; the rest of a budget of
    `mean_k` rollouts per state (on average, the fixed-K equivalent) then goes, `k_min` at a
    time, to the states whose estimates are most uncertain, up to `k_max` per state.

    Uncertain = mixed outcomes so far (0 < V < 1 for 0/1 rewards), ranked by the standard error
    of the mean sqrt(var / n): a state whose first k_min rollouts all agree gets no more.
    """

    k_min: int
    k_max: int
    mean_k: float

    def __post_init__(self):
        if not 1 <= self.k_min <= self.mean_k <= self.k_max:
            raise ValueError(f"an adaptive MC budget needs 1 <= k_min <= mean k <= k_max; got k_min {self.k_min}, "
                             f"mean k {self.mean_k}, k_max {self.k_max}")


def allocate_rollouts(counts: Sequence[int], sums: Sequence[float], sq_sums: Sequence[float], budget: int,
                      k_max: int, step: int) -> list[int]:
    """One round of an adaptive budget: extra rollouts per state (at most `step`, never past
    `k_max`, `budget` in all), to the states with the largest standard error of their mean
    among those whose outcomes so far are not all equal. Ties go to the earlier state."""
    ranked = []
    for i, (n, s, q) in enumerate(zip(counts, sums, sq_sums)):
        var = q / n - (s / n) ** 2 if n else 0.0
        if n < k_max and var > 1e-12:
            ranked.append((-math.sqrt(var / n), i))
    ranked.sort()
    extra = [0] * len(counts)
    for _, i in ranked:
        if budget <= 0:
            break
        extra[i] = min(step, k_max - counts[i], budget)
        budget -= extra[i]
    return extra


def state_boundaries(ep: Episode, max_states: int | None) -> list[int]:
    """Response lengths of the states whose value VinePPO needs: 0 (the prompt alone), then the
    end of every step but the last. With a cap only the first `max_states` are estimated."""
    bounds = [0] + ep.step_ends[:-1]
    return bounds[:max_states] if max_states is not None else bounds


def state_seed(seed: int, tokens: Sequence[int]) -> int:
    """The rollout seed of the state `tokens` (prompt + response prefix) under `seed`: a pure
    function of the state's content, so a state gets the same rollouts whichever episode, rank
    or batch it is estimated in (and whether or not it was merged with an identical state)."""
    digest = hashlib.blake2b(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens),
                             digest_size=8).digest()
    return mix_seed(seed, int.from_bytes(digest, "little") >> 1)


def mc_values(engine: Engine, task: Task, episodes: Sequence[Episode], *, k: int, params: SamplingParams,
              max_states: int | None = None, stop: Sequence[str] = (), progress: bool | str = False,
              adaptive: AdaptiveK | None = None, seed: int | None = None) -> MCStats:
    """Fill `ep.state_values` (one per step) with Monte Carlo estimates.

    V(s) = mean reward of k rollouts from s, each graded on the whole response (the state's
    part of the response plus the rollout); a rollout cut by the length limit scores 0.
    Identical states (same prompt and response prefix, e.g. the prompt alone for the n
    samples of one prompt) are estimated once. States past `max_states` get the episode's
    reward (the paper's back-fill), which gives their steps an advantage of 0.
    `params` supplies temperature, top_p and max_new_tokens; its n is replaced by k.
    With `adaptive`, k is ignored: states get adaptive.k_min rollouts, then rounds of
    `allocate_rollouts` spend the rest of round(mean_k x states) rollouts (the prefixes are
    still cached, so a later round forks their KV again).
    seed: None draws the rollouts from torch's global generator (as before); an int seeds each
    state's rollouts from (seed, the state's tokens, the round) with `state_seed`, so the values
    do not depend on which other states are estimated with it (data-parallel ranks). With
    `adaptive`, which states get more rollouts still depends on the other states of the call.
    """
    t0 = time.perf_counter()
    stats = MCStats()
    requests: dict[tuple[int, ...], int] = {}   # state tokens -> request index
    owners: list[tuple[Episode, int]] = []      # (episode, response length of the state)
    per_episode: list[list[int]] = []
    for ep in episodes:
        if not ep.step_ends:
            raise ValueError("mc_values needs the step boundaries of every episode (ep.step_ends)")
        idx = []
        for b in state_boundaries(ep, max_states):
            key = tuple(ep.prompt_ids + ep.response_ids[:b])
            if key not in requests:
                requests[key] = len(owners)
                owners.append((ep, b))
            idx.append(requests[key])
            stats.states_requested += 1
        per_episode.append(idx)
    stats.states = len(owners)
    keys = [list(key) for key in requests]
    tok = engine.tokenizer
    counts, sums, sq_sums = [0] * len(keys), [0.0] * len(keys), [0.0] * len(keys)
    state_seeds = [state_seed(seed, key) for key in keys] if seed is not None else []

    def run(rows: list[int], ns: list[int]) -> None:
        """`ns[j]` rollouts from state `rows[j]`, graded into the running sums."""
        by_n = {n: SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                  max_new_tokens=params.max_new_tokens, stop=params.stop) for n in set(ns)}
        if seed is None:
            sampling = by_n[ns[0]] if len(by_n) == 1 else [by_n[n] for n in ns]
        else:  # one seed per (state, round): a later round draws new rollouts, not the first round's again
            sampling = [replace(by_n[n], seed=mix_seed(state_seeds[i], stats.rounds)) for i, n in zip(rows, ns)]
        outs = engine.generate([keys[i] for i in rows], sampling, progress=progress if not stats.rounds else False)
        stats.rounds += 1
        for i, completions in zip(rows, outs):
            ep, b = owners[i]
            for c in completions:
                stats.rollouts += 1
                stats.rollout_tokens += len(c.token_ids)
                stats.truncated += c.finish_reason == "length"
                full = response_text(tok, ep.response_ids[:b] + c.token_ids, stop or params.stop)
                r = task.reward(full, ep.item, c.finish_reason)
                counts[i] += 1
                sums[i] += r
                sq_sums[i] += r * r

    everyone = list(range(len(keys)))
    if adaptive is None:
        run(everyone, [k] * len(keys))
    else:
        run(everyone, [adaptive.k_min] * len(keys))
        left = round(adaptive.mean_k * len(keys)) - adaptive.k_min * len(keys)
        while left > 0:
            extra = allocate_rollouts(counts, sums, sq_sums, left, adaptive.k_max, adaptive.k_min)
            rows = [i for i, e in enumerate(extra) if e]
            if not rows:
                break  # every state is settled (all outcomes equal) or at k_max
            run(rows, [extra[i] for i in rows])
            left -= sum(extra)
    values = [s / n for s, n in zip(sums, counts)]
    stats.k_max_used = max(counts, default=0)
    for ep, idx in zip(episodes, per_episode):
        vals = [values[i] for i in idx]
        stats.backfilled += len(ep.step_ends) - len(vals)
        ep.state_values = vals + [ep.reward] * (len(ep.step_ends) - len(vals))
    stats.value_mean = sum(values) / max(1, len(values))
    stats.seconds = time.perf_counter() - t0
    return stats
