"""What a caller asks for (`SamplingParams`) and what it gets back (`Completion`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the completions of one prompt.

    n: completions per prompt; they share the prompt's KV (one prefill, then a KV fork).
    temperature: 0 means greedy. top_p in (0, 1]; top_k 0 means no top-k cut.
    max_new_tokens: generation stops with finish_reason "length" after this many tokens
        (or earlier, at the model's context length).
    stop_token_ids / stop: extra stop tokens and stop strings (strings need a tokenizer);
        the EOS token stops too unless ignore_eos. Stop strings are matched in the prompt's
        tail followed by the generated text, and a match stops only when it ends in
        generated text: a prompt that ends with "\n\n" stops at a generated "\nProblem:"
        for the stop string "\n\n\nProblem:", while a stop string inside the prompt never stops.
    seed: per-request seed; the i-th sample's token at position p uses the uniform
        hash(mix_seed(seed, i), p) (counter-based, engine/runtime/sampler.py), so its random
        numbers do not depend on what else is batched. Its logits may, in the last bits (the
        BLAS picks kernels by row count; a preempted sequence's KV is recomputed in other
        shapes): a draw that close to a CDF or top-p boundary flips to the neighbouring token,
        about once in 40,000 sampled tokens on the tiny model (bench/soak.py, README's
        "SamplingParams"). Without a seed, each sample's key is drawn
        from torch's global generator. One seeded
        SamplingParams shared by many prompts gives every prompt's i-th sample the same
        random numbers (correlated samples: a bad estimate of accuracy); use
        `params.per_prompt(len(prompts))` for one seed per prompt.
    logprobs: return the log-probability of each sampled token under the
        temperature-scaled distribution (before top-k / top-p), which is what a PPO
        trainer recomputes with logits / temperature.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples (the dataclass is frozen and hashable).
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < math.inf:  # (NaN fails every comparison)
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers >= 0, got {self.stop_token_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def per_prompt(self, count: int) -> list["SamplingParams"]:
        """One SamplingParams per prompt; when seeded, prompt k gets its own seed mixed from (seed, k).

        Reproducible like the shared seed, but the prompts' samples are independent draws.
        """
        if self.seed is None:
            return [self] * count
        return [replace(self, seed=mix_seed(self.seed, k)) for k in range(count)]


def mix_seed(seed: int, index: int) -> int:
    """A distinct, well-spread seed for item `index` (a sample, a prompt) under seed `seed`."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


FinishReason = Literal["stop", "length"]


def find_stop(text: str, stop: tuple[str, ...] | list[str], boundary: int = 0) -> int:
    """Start of the earliest stop-string match in `text` that ends past text[:boundary]; -1 if none.

    A match lying entirely within text[:boundary] (prompt text, or text already checked)
    does not count; one that starts there and ends after it does.
    """
    best = -1
    for s in stop:
        i = text.find(s, max(0, boundary - len(s) + 1))  # every match from here ends at > boundary
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str], context: str = "") -> str:
    """`text` up to (not including) the earliest stop string in context + text that ends inside `text`.

    context: the text just before `text` (a prompt's tail); a stop string may start in it
    (then the result is "": nothing of `text` precedes the stop), but a match entirely
    inside it does not count. Without context: `text` cut at the first stop string it contains.
    """
    i = find_stop(context + text, stop, len(context))
    return text if i < 0 else text[:max(0, i - len(context))]


@dataclass
class Completion:
    """One sampled continuation.

    token_ids: the generated tokens, including the stop token or the token that completed
        a stop string. text: their decoding (special tokens skipped, cut before a stop
        string; "" when that stop string starts in the prompt's tail), or None without a
        tokenizer. cached_tokens: prompt tokens whose KV was
        served from the prefix cache instead of being computed.
    """

    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
    logprobs: list[float] | None = None
    cached_tokens: int = 0


@dataclass
class EngineStats:
    """Counters since the Engine was built (or since `reset`)."""

    prefill_tokens: int = 0   # prompt (or re-admitted) tokens whose KV was computed
    cached_tokens: int = 0    # tokens whose KV was served from the prefix cache
    decode_tokens: int = 0    # generated tokens fed back through the model one at a time
    forked_sequences: int = 0  # sequences created by a KV fork (no prefill of their own)
    copied_tokens: int = 0    # KV copied to split a shared page (partial-page forks)
    preemptions: int = 0      # sequences evicted from the batch for lack of KV and recomputed
    evicted_tokens: int = 0   # cached tokens dropped from the prefix tree to free KV
    forward_steps: int = 0    # model forward calls
    # rows computed for a sequence that its previous step turned out to finish (EOS, a stop token or
    # string): the engine plans a step before the previous one's tokens are known (engine.py)
    overlap_wasted_rows: int = 0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, 0)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass
class StepTimes:
    """Host seconds spent in each phase of the Engine's steps (since the Engine was built or `reset`).

    On a GPU the phases are host time except where the host waits: `sample` includes the
    wait for the step's tokens (the one device-to-host transfer), and so the device's time.
    With overlap, `forward` and `sample` are the worker thread's time (beside the host's, not
    added to it) and `wait` is the host blocked on the worker for a step's tokens.
    """

    steps: int = 0
    schedule: float = 0.0     # the scheduler: admission, page growth, forks, eviction, preemption
    prepare: float = 0.0      # metadata, token ids and sampling parameters, sent to the device
    forward: float = 0.0      # the model (launches on a GPU) and the deferred KV copies
    sample: float = 0.0       # LM head, sampling and the transfer of the tokens
    postprocess: float = 0.0  # appending tokens, EOS / stop-string / length checks, finishing
    wait: float = 0.0         # the host waiting for a step's tokens (overlap: for the worker thread)
    first_done: float | None = None  # time.perf_counter() when the first step since reset was postprocessed
    last_done: float | None = None   # ... and the last one

    def add(self, schedule: float, prepare: float, forward: float, sample: float, postprocess: float,
            wait: float = 0.0, done: float | None = None) -> None:
        self.steps += 1
        self.schedule += schedule
        self.prepare += prepare
        self.forward += forward
        self.sample += sample
        self.postprocess += postprocess
        self.wait += wait
        if done is not None:
            self.first_done = done if self.first_done is None else self.first_done
            self.last_done = done

    def steady_step_s(self) -> float | None:
        """Seconds per step from the first step's end to the last's: the pace of the steps after the
        first (a generate call's admission and prefill), without the call's set-up and teardown."""
        if self.steps < 2 or self.first_done is None:
            return None
        return (self.last_done - self.first_done) / (self.steps - 1)

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, None if f in _STAMPS else type(getattr(self, f))(0))

    def as_dict(self) -> dict[str, float]:
        """The step count and each phase's seconds."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in _STAMPS}


_STAMPS = ("first_done", "last_done")  # StepTimes' timestamps, not sums
