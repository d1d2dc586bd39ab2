"""A sequence being generated: its tokens, its KV pages and where it stands."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.runtime.params import SamplingParams

# The token id a sequence holds while the step that samples it is still running (the engine
# plans a step before the previous one's tokens reach the host): always the last token, at
# most one, replaced when that step's tokens arrive. The device fills it into the next step's
# input from the previous step's sampled ids; it never reaches the radix tree or an output.
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"      # queued; owns no KV pages
    RUNNING = "running"      # owns KV pages; computing its pending tokens
    FORK_PENDING = "fork"    # a sibling waiting for its leader's prefill to fork from
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion of one prompt.

    Invariants while RUNNING: tokens[:num_computed] have their KV in the pool at the slots
    given by page_table (position p -> page_table[p // page_size], offset p % page_size)
    once the step that scheduled them has run its forward; the sequence holds one
    allocator reference to each page of page_table; and it owns row `row` of the RowTable.
    While WAITING it holds no page and at most one radix hold (`hold_node`).
    While RUNNING its last token may be PLACEHOLDER (sampled by the step in flight); a WAITING
    sequence never holds one (the engine drains the step in flight before it preempts).
    """

    seq_id: int
    request: int                  # index of the prompt in the generate() call
    sample: int                   # which of the n samples of that prompt
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    seed: int = 0                 # uint64 key of the counter-based draws: token at position p uses (seed, p)
    status: Status = Status.WAITING
    page_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    admitted_len: int = 0         # len(tokens) when last admitted: positions below are prefill
    admitted_at: int = 0          # admission order (0: never admitted yet)
    version: int = 0              # weights version its KV is computed under
    cached_tokens: int = 0        # prompt tokens served from the prefix cache
    siblings: list["Sequence"] = field(default_factory=list)  # fork-pending, leader only
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    row: int = -1                 # row in the RowTable while RUNNING (-1 otherwise)
    hold_node: int = 0            # radix node held while WAITING, so its prefix is evicted last (0: none)
    stop_tail: str = ""           # the last characters of the prompt tail + generated text, for stop strings
    max_len: int = 1 << 62        # len(tokens) at which it finishes by length (prompt + max_new_tokens, or the context)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]
