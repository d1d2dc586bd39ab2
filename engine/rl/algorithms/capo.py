"""CAPO: a frozen judge (an LLM served by its own Engine, or the exact rule checker) flags each
response's wrong steps over `capo_votes` votes; flagged steps get a process penalty on top of
the outcome reward, and the token rewards are normalised over all tokens of a prompt's samples."""
from __future__ import annotations

from pathlib import Path

from engine.model import load_model
from engine.rl.algorithms.base import TrainerContext
from engine.rl.algorithms.grpo import GroupRelative
from engine.rl.capo import flag_counts, group_token_advantages, rule_wrong_steps, token_rewards, vote
from engine.rl.config import TOKENIZER_FILES, ConfigError, TrainConfig
from engine.rl.judge import JudgeRequest, ModelJudge, RuleJudge
from engine.rl.rollout import Episode
from engine.rl.steps import step_spans
from engine.runtime import Engine
from engine.runtime.params import mix_seed


class CAPO(GroupRelative):
    name = "capo"
    credit_phase = "judge"

    def __init__(self, cfg: TrainConfig, judge: RuleJudge | ModelJudge | None = None):
        super().__init__(cfg)
        self._judge = judge
        self._ctx: TrainerContext | None = None

    def setup(self, ctx: TrainerContext) -> list:
        self._ctx = ctx
        return []

    def after_engine(self, ctx: TrainerContext) -> None:
        # Built now, inside a gathered phase as the policy's Engine was: its KV pool takes
        # kv_memory_fraction of what the policy's pool and whole weights left free.
        with ctx.gathered():
            self.judge  # noqa: B018

    @property
    def judge(self) -> RuleJudge | ModelJudge:
        """The judge (built once, after the policy's Engine)."""
        if self._judge is None:
            self._judge = self.make_judge(self._ctx)
        return self._judge

    @classmethod
    def validate(cls, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if (cfg.judge == "rule" or cfg.judge_oracle == "rule") and cfg.task != "arithmetic":
            raise ConfigError(f"the rule judge checks the arithmetic task's lines `a op b = c`; task is {cfg.task!r}")
        if cfg.step_split == "chunks":
            raise ConfigError("capo needs reasoning steps a judge can read: step_split chunks is not supported "
                              "(use task, newline or math)")
        if cfg.judge == "model" and cfg.judge_model is not None:
            judge_dir = Path(cfg.judge_model)
            if not (judge_dir / "config.json").is_file():
                raise ConfigError(f"judge_model {judge_dir} is not a Hugging Face checkpoint folder (no config.json)")
            if not any((judge_dir / name).is_file() for name in TOKENIZER_FILES):
                raise ConfigError(f"judge_model {judge_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                  f"the judge reads and writes text")

    def make_judge(self, ctx: TrainerContext) -> RuleJudge | ModelJudge:
        """The rule checker, or a frozen LLM (judge_model, else the starting policy) served by its
        own Engine on the training device."""
        cfg = self.cfg
        if cfg.judge == "rule":
            return RuleJudge()
        path = Path(cfg.judge_model) if cfg.judge_model is not None else ctx.start_dir
        model, tokenizer = load_model(path, dtype=ctx.dtype, device=ctx.device)
        if tokenizer is None:
            raise ConfigError(f"the judge checkpoint {path} has no tokenizer; the judge reads and writes text")
        model.eval().requires_grad_(False)
        # On a GPU the judge's KV pool takes kv_memory_fraction of what the policy's Engine left free.
        engine = Engine(model, tokenizer, page_size=cfg.page_size, max_num_seqs=cfg.max_num_seqs,
                        max_batch_tokens=cfg.max_batch_tokens, kv_cache_tokens=cfg.kv_cache_tokens,
                        kv_memory_fraction=cfg.kv_memory_fraction)
        return ModelJudge(engine, votes=cfg.capo_votes, temperature=cfg.capo_judge_temperature,
                          top_p=cfg.capo_judge_top_p, max_new_tokens=cfg.capo_judge_max_new_tokens,
                          show_answer=cfg.capo_show_answer, chat=cfg.capo_judge_chat, progress=ctx.progress)

    def credit(self, episodes: list[Episode], ctx: TrainerContext) -> dict[str, float]:
        """The judge's votes on each response's steps -> token rewards -> advantages normalised over
        all tokens of each prompt's samples. Returns the judge's metrics over every rank's responses."""
        cfg = self.cfg
        style = ctx.task.step_style if cfg.step_split == "task" else cfg.step_split
        requests = []
        for ep in episodes:
            texts, ep.step_ends = step_spans(ep.response_ids, ctx.tokenizer, style)
            requests.append(JudgeRequest(ep.item.question, texts, ep.item.answer))
        seeds = None
        if ctx.seeded:  # each response's votes seeded by (seed, iteration, its global index)
            base, seen = ctx.iteration_seed("judge"), {}
            seeds = []
            for ep in episodes:
                index = seen[ep.group] = seen.get(ep.group, -1) + 1
                seeds.append(mix_seed(base, ep.group * cfg.samples_per_prompt + index))
        result = self.judge.critique(requests, seeds)
        if ctx.sharded and isinstance(self.judge, ModelJudge):
            self.judge.engine.release_kv_memory()  # as the policy's: the update gets the memory
        flagged = [vote(cs, len(r.steps), cfg.capo_voting) for cs, r in zip(result.critiques, requests)]
        rewards = [token_rewards(ep.num_tokens, ep.step_ends, f, ep.reward, cfg.capo_w_whole, cfg.capo_w_process)
                   for ep, f in zip(episodes, flagged)]
        for ep, adv in zip(episodes, group_token_advantages(rewards, [ep.group for ep in episodes])):
            ep.advantages = adv
        critiques = [c for cs in result.critiques for c in cs]
        oracle = cfg.judge == "rule" or cfg.judge_oracle == "rule"
        hits, n_pred, n_true = flag_counts(flagged, [rule_wrong_steps(r.steps) for r in requests]) if oracle \
            else (0, 0, 0)
        # counts summed over ranks (the ratios are of the sums); the judge's time is the slowest rank's
        (steps, responses, flagged_steps, flagged_responses, abstained, n_critiques, out_of_range, generated,
         prompt_tokens, prefill, cached, preemptions, hits, n_pred, n_true) = ctx.dist.all_reduce_sum(
            [sum(len(r.steps) for r in requests), len(requests), sum(len(f) for f in flagged),
             sum(bool(f) for f in flagged), sum(c.flagged is None for c in critiques), len(critiques),
             sum(c.out_of_range for c in critiques), result.generated_tokens, result.prompt_tokens,
             result.prefill_tokens, result.cached_tokens, result.preemptions, hits, n_pred, n_true])
        (seconds,) = ctx.dist.all_reduce_max([result.seconds])
        out = {
            "judge_flagged_step_frac": flagged_steps / max(1, steps),
            "judge_flagged_response_frac": flagged_responses / max(1, responses),
            "judge_abstain_frac": abstained / max(1, n_critiques),
            "judge_out_of_range": int(out_of_range),
            "judge_critiques": int(n_critiques),
            "steps_per_response": steps / max(1, responses),
            "time_judge": round(seconds, 3),
        }
        if isinstance(self.judge, ModelJudge):
            out.update(judge_tokens_per_s=generated / max(seconds, 1e-9), judge_generated_tokens=int(generated),
                       judge_prompt_tokens=int(prompt_tokens), judge_prefill_tokens=int(prefill),
                       judge_cached_tokens=int(cached), judge_preemptions=int(preemptions))
        if oracle:
            out["judge_true_wrong_step_frac"] = n_true / max(1, steps)
            if n_pred:
                out["judge_precision"] = hits / n_pred
            if n_true:
                out["judge_recall"] = hits / n_true
        return out
