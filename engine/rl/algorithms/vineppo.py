"""VinePPO: each step's value is the mean reward of K Monte Carlo rollouts forked from the
state after it (the Engine's KV-level forks of the response's cached prefix); a step's
advantage is the value difference across it, given to each of its tokens."""
from __future__ import annotations

import time

from engine.rl import advantages as adv_lib
from engine.rl.algorithms.base import TrainerContext
from engine.rl.algorithms.policy_gradient import PolicyGradient
from engine.rl.rollout import AdaptiveK, Episode, mc_values
from engine.rl.steps import step_token_ends
from engine.runtime import SamplingParams


class VinePPO(PolicyGradient):
    name = "vineppo"
    whitens_by_default = True
    mc_stats = None  # the last credit step's MCStats (engine.analysis reads it)

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        for ep in episodes:
            ep.step_ends = step_ends(ep, cfg, ctx)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.mc_max_new_tokens or cfg.max_new_tokens, stop=ctx.stop)
        adaptive = AdaptiveK(cfg.k_min, cfg.k_max, cfg.k) if cfg.k_adaptive else None
        mc = mc_values(ctx.engine, ctx.task, episodes, k=cfg.k, params=params,
                       max_states=cfg.max_states_per_response, progress=ctx.progress and "MC values",
                       adaptive=adaptive, seed=ctx.iteration_seed("mc") if ctx.seeded else None)
        self.mc_stats = mc
        for ep in episodes:
            step_adv = adv_lib.vineppo_step_advantages(ep.state_values, ep.reward)
            ep.advantages = adv_lib.broadcast_steps(step_adv, ep.step_ends)
        seconds = time.perf_counter() - t0
        s = ctx.engine.stats
        # summed over ranks (a state shared by two ranks' episodes counts once per rank)
        states, requested, backfilled, rollouts, rollout_tokens, truncated, value_sum, cached, prefill, steps = (
            ctx.dist.all_reduce_sum([mc.states, mc.states_requested, mc.backfilled, mc.rollouts,
                                     mc.rollout_tokens, mc.truncated, mc.value_mean * mc.states,
                                     s.cached_tokens, s.prefill_tokens, sum(len(e.step_ends) for e in episodes)]))
        k_max_used, rounds = ctx.dist.all_reduce_max([mc.k_max_used, mc.rounds])
        return dict(mc_states=int(states), mc_states_requested=int(requested), mc_backfilled=int(backfilled),
                    mc_rollouts=int(rollouts), mc_k_max=int(k_max_used), mc_rounds=int(rounds),
                    mc_truncated_frac=truncated / max(1, rollouts),
                    value_mean=value_sum / max(1, states), mc_tokens_per_s=rollout_tokens / seconds,
                    prefix_cache_hit_rate=cached / max(1, cached + prefill),
                    mc_prefill_tokens=int(prefill), mc_cached_tokens=int(cached), mc_rollout_tokens=int(rollout_tokens),
                    steps_per_response=steps / (len(episodes) * ctx.dist.world_size))


def step_ends(ep: Episode, cfg, ctx: TrainerContext) -> list[int]:
    """The response's step boundaries (token ends) by the configured splitter."""
    if cfg.step_split == "chunks":
        return step_token_ends(ep.response_ids, ctx.tokenizer, chunk_tokens=cfg.chunk_tokens)
    style = ctx.task.step_style if cfg.step_split == "task" else cfg.step_split
    return step_token_ends(ep.response_ids, ctx.tokenizer, style)
