"""Episodes: sampling trajectories through the Engine, and VinePPO's Monte Carlo state values.

An `Episode` is one sampled response to one prompt, with its reward and (for VinePPO) its
step boundaries in token positions. `mc_values` estimates V(s) for the states of many
episodes: for each state (the prompt plus the response up to the end of a step) it samples K
continuations through `Engine.generate`. Those prefixes are the episodes' own tokens, which
the Engine still holds in its radix cache, so a rollout request computes no prefill: it forks
the cached KV K ways.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.runtime import Engine, SamplingParams
from engine.runtime.params import cut_at_stop
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


def sample_episodes(engine: Engine, task: Task, items: Sequence[Item], params: SamplingParams,
                    progress: bool | str = False) -> list[Episode]:
    """params.n responses per item, graded by the task. Episodes of one item are consecutive.

    Responses that ended on a stop string are cut before it and end with EOS instead. A
    response that stopped without a final answer (`task.final_answer` is None) is unfinished,
    as in the VinePPO reference: finish_reason "unfinished", reward 0, and no EOS at its end,
    so the policy is not trained to stop there.
    """
    tok = engine.tokenizer
    prompts = [tok.encode(task.prompt(it)) for it in items]
    outs = engine.generate(prompts, params, progress=progress)
    eos = set(engine.eos_token_ids)
    episodes = []
    for g, (item, ids, completions) in enumerate(zip(items, prompts, outs)):
        for c in completions:
            response = list(c.token_ids)
            finish = c.finish_reason
            if params.stop and finish == "stop" and response[-1] not in eos:
                response = trim_stop_string(tok, response, c.text, tok.eos_token_id)
            if finish == "stop" and task.final_answer(c.text) is None:
                finish = "unfinished"
                while len(response) > 1 and response[-1] in eos:  # (an EOS-only response keeps its one token)
                    response.pop()
            reward = 0.0 if finish == "unfinished" else task.reward(c.text, item, finish)
            episodes.append(Episode(group=g, item=item, prompt_ids=list(ids), response_ids=response,
                                    text=c.text, finish_reason=finish, reward=reward))
    return episodes


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


def state_boundaries(ep: Episode, max_states: int | None) -> list[int]:
    """Response lengths of the states whose value VinePPO needs: 0 (the prompt alone), then the
    end of every step but the last. With a cap only the first `max_states` are estimated."""
    bounds = [0] + ep.step_ends[:-1]
    return bounds[:max_states] if max_states is not None else bounds


def mc_values(engine: Engine, task: Task, episodes: Sequence[Episode], *, k: int, params: SamplingParams,
              max_states: int | None = None, stop: Sequence[str] = (), progress: bool | str = False) -> MCStats:
    """Fill `ep.state_values` (one per step) with Monte Carlo estimates.

    V(s) = mean reward of k rollouts from s, each graded on the whole response (the state's
    part of the response plus the rollout); a rollout cut by the length limit scores 0.
    Identical states (same prompt and response prefix, e.g. the prompt alone for the n
    samples of one prompt) are estimated once. States past `max_states` get the episode's
    reward (the paper's back-fill), which gives their steps an advantage of 0.
    `params` supplies temperature, top_p and max_new_tokens; its n is replaced by k.
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
    rollout_params = SamplingParams(n=k, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                    max_new_tokens=params.max_new_tokens, stop=params.stop)
    outs = engine.generate([list(key) for key in requests], rollout_params, progress=progress)
    tok = engine.tokenizer
    values = []
    for (ep, b), completions in zip(owners, outs):
        total = 0.0
        for c in completions:
            stats.rollouts += 1
            stats.rollout_tokens += len(c.token_ids)
            stats.truncated += c.finish_reason == "length"
            full = response_text(tok, ep.response_ids[:b] + c.token_ids, stop or params.stop)
            total += task.reward(full, ep.item, c.finish_reason)
        values.append(total / len(completions))
    for ep, idx in zip(episodes, per_episode):
        vals = [values[i] for i in idx]
        stats.backfilled += len(ep.step_ends) - len(vals)
        ep.state_values = vals + [ep.reward] * (len(ep.step_ends) - len(vals))
    stats.value_mean = sum(values) / max(1, len(values))
    stats.seconds = time.perf_counter() - t0
    return stats
