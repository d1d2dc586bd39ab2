"""The Engine's KV cache policy and robustness: what is evicted first, failures that leak
nothing, and admission that does not preempt what it just admitted."""
from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams


def _clean(engine: Engine) -> None:
    """Nothing running: every page is free or the tree's, no lock, no hold, every row free."""
    refs = engine.tree.page_refs()
    for p in range(engine.allocator.num_pages):
        assert engine.allocator.ref_count(p) == refs.get(p, 0), p
    engine.tree.check_invariants()
    assert engine.tree.lock_ref(0) == 0 and engine.tree.hold_ref(0) == 0
    assert len(engine.rows._free) == engine.rows.pages.shape[0]
    assert not engine.scheduler.running and not engine.scheduler.waiting and engine.scheduler._num_seqs == 0


def _episodes(engine: Engine, tok, count: int = 4, length: int = 24):
    prompts = [tok.encode(f"{a}+{a * 3 % 17}-{a % 5}=") for a in range(count)]
    traj = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=length, ignore_eos=True, seed=0))
    return [p + g[0].token_ids[:j] for p, g in zip(prompts, traj) for j in range(0, length, 6)]


def test_an_mc_phase_three_times_the_pool_prefills_one_token_per_state(tiny):
    # 16 states x K=9 rollouts of 16 tokens need ~4,500 tokens of KV in a 768-token pool. The
    # finished rollouts (inserted cold) are evicted first and the states still waiting are
    # held, so no state's prefix is ever recomputed: one token per state (the one whose
    # logits sample the first rollout token). With LRU alone, 112 tokens were prefilled.
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=768, max_num_seqs=18)
    states = _episodes(engine, tok)
    engine.stats.reset()
    params = SamplingParams(n=9, temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=1)
    outs = engine.generate(states, params)
    assert sum(len(s) + 16 for s in states) * 9 > 3 * engine.kv_cache_tokens
    assert engine.stats.evicted_tokens > engine.kv_cache_tokens  # the pool was recycled more than once
    assert engine.stats.prefill_tokens == len(states)
    assert engine.stats.cached_tokens == sum(len(s) - 1 for s in states)
    assert all(len(c.token_ids) == 16 for g in outs for c in g)
    _clean(engine)
    # Same tokens as an engine that never evicts.
    roomy = Engine(model, tok, page_size=4, kv_cache_tokens=8192)
    assert [[c.token_ids for c in g] for g in roomy.generate(states, params)] == [[c.token_ids for c in g] for g in outs]


def test_a_failed_kv_copy_leaks_no_lock_page_row_or_hold(tiny, monkeypatch):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=1024)
    states = _episodes(engine, tok, count=2)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, ignore_eos=True, seed=2)
    expected = Engine(model, tok, page_size=4, kv_cache_tokens=1024).generate(states, params)
    copy = engine.pool.copy_slots
    calls = []

    def failing_copy(src, dst):
        calls.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    engine.pool.copy_slots = failing_copy  # the partial-page copies of admissions and forks
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.generate(states, params)
    assert calls
    _clean(engine)
    engine.pool.copy_slots = copy
    assert [[c.token_ids for c in g] for g in engine.generate(states, params)] == \
        [[c.token_ids for c in g] for g in expected]
    _clean(engine)


def test_an_exception_inside_admission_releases_its_lock_and_pages(tiny, monkeypatch):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=1024)
    states = _episodes(engine, tok, count=2)
    sched = engine.scheduler
    plan = sched._plan_pages

    def failing_plan(slots):
        assert engine.tree.lock_ref(0) > 0  # the match is locked at this point
        raise MemoryError("simulated")

    monkeypatch.setattr(sched, "_plan_pages", failing_plan)
    with pytest.raises(MemoryError):
        engine.generate(states, SamplingParams(n=2, max_new_tokens=4, ignore_eos=True))
    _clean(engine)
    monkeypatch.setattr(sched, "_plan_pages", plan)
    assert len(engine.generate(states, SamplingParams(max_new_tokens=4, ignore_eos=True))) == len(states)
    _clean(engine)


def test_admission_leaves_room_for_the_next_step(tiny):
    """No sequence is preempted in the step right after the one that admitted it."""
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=96, max_num_seqs=8)
    sched = engine.scheduler
    admitted_step: dict[int, int] = {}
    immediate = []
    admit, fork, preempt = sched._try_admit, sched._fork, sched.preempt

    def recording_admit(seq, *args):
        end = admit(seq, *args)
        if end is not None:
            admitted_step[seq.seq_id] = engine.stats.forward_steps
        return end

    def recording_fork(leader, *args):
        siblings = list(leader.siblings)
        fork(leader, *args)
        admitted_step.update((s.seq_id, engine.stats.forward_steps) for s in siblings)

    def recording_preempt(seq):
        if engine.stats.forward_steps - admitted_step[seq.seq_id] <= 1:
            immediate.append(seq.seq_id)
        preempt(seq)

    sched._try_admit, sched._fork, sched.preempt = recording_admit, recording_fork, recording_preempt
    prompts = [tok.encode(f"{a}*{a + 3}=") for a in range(10)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=14, ignore_eos=True, seed=3)
    outs = engine.generate(prompts, params)
    roomy = Engine(model, tok, page_size=4, kv_cache_tokens=4096).generate(prompts, params)
    assert [[c.token_ids for c in g] for g in outs] == [[c.token_ids for c in g] for g in roomy]
    assert engine.stats.preemptions > 0  # the pool is tight enough to preempt at all
    assert immediate == []
    _clean(engine)
