"""CAPO's judges: who says which steps of a response are wrong.

    ModelJudge  a frozen LLM served by its own Engine in this process: one critique prompt per
                response, `votes` critiques sampled from it (the n samples fork one cached
                prefill of the prompt), each parsed by engine.rl.capo.parse_critique.
    RuleJudge   the exact checker of the built-in arithmetic task (capo.rule_wrong_steps): one
                critique per response, never wrong, never abstaining. It tests the machinery
                and bounds what a perfect judge could give.

Both answer `critique(requests, seeds=None) -> JudgeResult`: per response, the list of its
critiques (the rule judge has no randomness and ignores the seeds).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from engine.rl.capo import Critique, critique_prompt, parse_critique, rule_wrong_steps
from engine.runtime import Engine, SamplingParams
from engine.tasks.base import chat_prompt


@dataclass(frozen=True)
class JudgeRequest:
    """One response to judge: its problem, its steps (texts, in order) and the gold answer."""

    question: str
    steps: Sequence[str]
    answer: str | None = None


@dataclass
class JudgeResult:
    critiques: list[list[Critique]]             # per request, its critiques (votes)
    generated_tokens: int = 0                   # judge tokens sampled (model judge)
    prompt_tokens: int = 0                      # judge prompt tokens, one prompt per request
    prefill_tokens: int = 0                     # prompt KV the judge's Engine computed
    cached_tokens: int = 0                      # prompt KV served from its prefix cache (the shared template head)
    forked_sequences: int = 0                   # votes forked from a prompt's one prefill
    preemptions: int = 0                        # sequences recomputed for lack of KV (then prefill repeats)
    seconds: float = 0.0
    texts: list[list[str]] = field(default_factory=list)  # the raw critiques (model judge)


class RuleJudge:
    """Exact arithmetic checking: each line `a op b = c` is flagged when c is wrong."""

    votes = 1

    def critique(self, requests: Sequence[JudgeRequest], seeds: Sequence[int] | None = None) -> JudgeResult:
        t0 = time.perf_counter()
        critiques = [[Critique(rule_wrong_steps(r.steps))] for r in requests]
        return JudgeResult(critiques, seconds=time.perf_counter() - t0)


class ModelJudge:
    """A frozen LLM judge through an Engine: `votes` sampled critiques per response.

    The Engine forks the `votes` samples of a prompt from one prefill: each response's prompt
    KV is computed once (prefill_tokens + cached_tokens = prompt_tokens, not `votes` times
    them, unless KV ran short and sequences were preempted), and the template's head, the same
    for every response, is served from the prefix cache after the first.
    """

    def __init__(self, engine: Engine, *, votes: int, temperature: float, top_p: float, max_new_tokens: int,
                 show_answer: bool, chat: bool | str = "auto", progress: bool = False):
        if engine.tokenizer is None:
            raise ValueError("the judge's Engine needs a tokenizer: it reads and writes text")
        self.engine, self.votes, self.show_answer, self.progress = engine, votes, show_answer, progress
        has_template = bool(getattr(engine.tokenizer, "chat_template", None))
        if chat is True and not has_template:
            raise ValueError("capo_judge_chat is true but the judge's tokenizer has no chat template")
        # An instruct judge reads its prompt as a user turn; a base model reads the plain text.
        self.chat = has_template if chat == "auto" else bool(chat)
        self.params = SamplingParams(n=votes, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)

    def prompt(self, request: JudgeRequest) -> str:
        text = critique_prompt(request.question, request.steps, request.answer if self.show_answer else None)
        if not self.chat:
            return text
        return chat_prompt(self.engine.tokenizer, text)

    def critique(self, requests: Sequence[JudgeRequest], seeds: Sequence[int] | None = None) -> JudgeResult:
        """The critiques of every request; `seeds` (one per request) makes each request's votes
        a function of its seed alone, not of the batch (data-parallel ranks judge their shares)."""
        t0 = time.perf_counter()
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.encode(self.prompt(r)) for r in requests]  # (the Engine takes the ids as they are)
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"{len(seeds)} seeds for {len(requests)} requests")
        params = self.params if seeds is None else [replace(self.params, seed=s) for s in seeds]
        self.engine.stats.reset()
        outs = self.engine.generate(prompts, params, progress=self.progress and "judge")
        texts = [[c.text for c in cs] for cs in outs]
        critiques = [[parse_critique(t, len(r.steps)) for t in ts] for r, ts in zip(requests, texts)]
        return JudgeResult(
            critiques,
            generated_tokens=sum(len(c.token_ids) for cs in outs for c in cs),
            prompt_tokens=sum(len(p) for p in prompts),
            prefill_tokens=self.engine.stats.prefill_tokens,
            cached_tokens=self.engine.stats.cached_tokens,
            forked_sequences=self.engine.stats.forked_sequences,
            preemptions=self.engine.stats.preemptions,
            seconds=time.perf_counter() - t0,
            texts=texts,
        )
