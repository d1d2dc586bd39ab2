"""Tight pools, small budgets and many forks: every step keeps page ownership exact, never
reads KV that belongs to other tokens, finishes, and gives the roomy engine's outputs."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine import Engine, SamplingParams


def _check_ownership(engine: Engine) -> None:
    owners = Counter(engine.tree.page_refs())
    for seq in engine.scheduler.running:
        assert len(set(seq.page_table)) == len(seq.page_table)
        owners.update(seq.page_table)
    for p in range(engine.allocator.num_pages):
        assert engine.allocator.ref_count(p) == owners[p], f"page {p}"
    for seq in engine.scheduler.waiting:
        assert not seq.page_table
    engine.tree.check_invariants()
    assert engine.tree.lock_ref(0) == 0  # locks live only inside an admission


def _instrument(engine: Engine, max_steps: int = 2000) -> None:
    """Check ownership after every schedule and step, and track what each slot holds.

    `shadow[slot]` is the token prefix whose last token's KV the slot holds. Each schedule's
    plan is applied to it in the order the step runs it (the deferred copies before the
    forward, the forward's writes, the copies after it), and then every position p below
    num_computed of every running sequence must find exactly tokens[:p + 1] there. The
    pool's copies must be exactly the planned ones. A write is recorded as (writer, position)
    and read as the writer's tokens[:position + 1] at check time: a token planned as a
    placeholder is compared once it is known.
    """
    shadow: dict[int, tuple[int, ...]] = {}
    P = engine.page_size
    copy = engine.pool.copy_slots
    planned: list[list[int]] = []

    def expand(copies):
        return [(s + i, d + i) for s, d, n in copies for i in range(n)]

    def prefix(value):
        return tuple(value[0].tokens[:value[1] + 1]) if len(value) == 2 else value

    def apply(pairs):
        values = [shadow.get(a, ("garbage",)) for a, _ in pairs]  # gather first, as the batched copy does
        for (_, b), v in zip(pairs, values):
            shadow[b] = v

    def copy_slots(src, dst):
        assert planned and list(zip(src.tolist(), dst.tolist())) == planned.pop(0), "an unplanned KV copy"
        copy(src, dst)

    schedule = engine.scheduler.schedule

    def checked_schedule(**kwargs):
        batch = schedule(**kwargs)
        _check_ownership(engine)
        before, after = expand(batch.copies_before), expand(batch.copies_after)
        planned[:] = [c for c in (before, after) if c]
        apply(before)
        written = {}
        for seq, start, end in zip(batch.seqs, batch.starts, batch.ends):
            for pos in range(start, end):
                slot = seq.page_table[pos // P] * P + pos % P
                assert slot not in written, "two writes to one slot in a step"
                written[slot] = (seq, pos)
        for seq in engine.scheduler.running:  # nobody's computed KV is overwritten (forks share it now)
            if not any(seq is s for s in batch.seqs + batch.samplers):
                for pos in range(seq.num_computed):
                    assert seq.page_table[pos // P] * P + pos % P not in written
        assert not set(written) & {d for _, d in before + after}, "a copy and the forward write one slot"
        shadow.update(written)
        apply(after)
        for seq in engine.scheduler.running:
            for pos in range(seq.num_computed):
                got = shadow.get(seq.page_table[pos // P] * P + pos % P)
                assert got is not None and prefix(got) == tuple(seq.tokens[:pos + 1])
        return batch

    launch = engine._launch

    def checked_launch(*args):
        assert engine.stats.forward_steps < max_steps, "no progress: the scheduler is cycling"
        step = launch(*args)
        step.result()  # (inline: already run)
        assert not planned, "a planned KV copy did not run"
        _check_ownership(engine)
        return step

    engine.pool.copy_slots, engine.scheduler.schedule, engine._launch = copy_slots, checked_schedule, checked_launch


def _outputs(groups):
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in g] for g in groups]


CASES = [
    # (page_size, kv_cache_tokens, max_num_seqs, max_batch_tokens)
    (8, 32, 8, 7),  # a lone sequence once cycled here: admit, run out of pages, preempt itself
    (2, 24, 8, 5),
    (1, 20, 4, 3),
    (4, 40, 16, 64),
]


@pytest.mark.parametrize("page_size,kv_tokens,max_seqs,max_batch", CASES)
def test_tight_engines_match_a_roomy_one(tiny, page_size, kv_tokens, max_seqs, max_batch):
    model, tok = tiny
    prompts = [[12, 76, 13, 79, 85, 14, 5], [6, 7, 77, 9, 12, 9, 10, 77, 8, 12, 13],
               [6, 7, 77, 8, 8, 5, 11, 79, 77, 9, 5, 5], [6, 7, 77, 8, 77, 77, 11, 6, 9, 8, 77]]
    params = [SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=43, ignore_eos=True, logprobs=True),
              SamplingParams(n=4, temperature=1.0, top_k=5, max_new_tokens=4, seed=37, ignore_eos=True, logprobs=True),
              SamplingParams(n=1, temperature=0, max_new_tokens=4, ignore_eos=True, logprobs=True),
              SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=37, ignore_eos=True, logprobs=True)]
    expected = Engine(model, tok, page_size=4, kv_cache_tokens=4096).generate(prompts, params)
    tight = Engine(model, tok, page_size=page_size, kv_cache_tokens=kv_tokens, max_num_seqs=max_seqs,
                   max_batch_tokens=max_batch)
    _instrument(tight)
    for _ in range(2):  # the second round meets a warm prefix cache
        got = tight.generate(prompts, params)
        assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
        for g_got, g_exp in zip(got, expected):
            for a, b in zip(g_got, g_exp):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        _check_ownership(tight)


def test_an_interrupted_generate_leaves_the_engine_clean(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4)
    launch, calls = engine._launch, []

    def failing_launch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return launch(*args)

    engine._launch = failing_launch
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=3, max_new_tokens=10, ignore_eos=True))
    engine._launch = launch
    assert not engine.scheduler.running and not engine.scheduler.waiting
    _check_ownership(engine)
    engine.invalidate_cache()  # would raise if a lock or a running sequence were left behind
    assert engine.allocator.num_free == engine.allocator.num_pages
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    assert len(out[0][0].token_ids) == 4
