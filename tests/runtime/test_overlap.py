"""Overlap scheduling: the forward of step N+1 runs on a worker thread while the host
postprocesses step N. Both modes run the same plans, so every output must be the same bit for
bit; the look-ahead rows of sequences that just finished must never reach an output or the
prefix tree; a failure in the worker must reach the caller and leave nothing behind."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from engine import Engine, SamplingParams
from engine.runtime.sequence import PLACEHOLDER
from tests.runtime.test_scheduler_stress import _check_ownership


def _outputs(groups):
    return [[(c.token_ids, c.logprobs, c.finish_reason, c.cached_tokens, c.text) for c in g] for g in groups]


def _random_requests(rng: random.Random, vocab: int, history: list[list[int]], n_prompts: int = 12):
    """Prompts that share roots or continue earlier outputs (MC states), with every kind of ending:
    EOS, stop tokens, stop strings, max_new_tokens; greedy and seeded, n up to 4."""
    roots = [[rng.randrange(4, vocab) for _ in range(rng.randint(2, 12))] for _ in range(3)]
    prompts, params = [], []
    for _ in range(n_prompts):
        if history and rng.random() < 0.4:
            earlier = rng.choice(history)
            prompt = earlier[:rng.randint(max(1, len(earlier) // 2), len(earlier))]
        else:
            prompt = rng.choice(roots) + [rng.randrange(4, vocab) for _ in range(rng.randint(0, 9))]
        greedy = rng.random() < 0.3
        ending = rng.choice(["eos", "stop_token", "stop", "length"])
        params.append(SamplingParams(
            n=rng.randint(1, 4), temperature=0.0 if greedy else 1.0, top_p=rng.choice([1.0, 0.9]),
            max_new_tokens=rng.randint(1, 24), seed=rng.randrange(1 << 30), logprobs=True,
            ignore_eos=ending != "eos", stop_token_ids=[rng.randrange(4, vocab)] if ending == "stop_token" else [],
            stop=(rng.choice("0123456789+="),) if ending == "stop" else ()))
        prompts.append(prompt)
    return prompts, params


@pytest.mark.parametrize("engine_kwargs", [
    dict(page_size=4, kv_cache_tokens=4096),
    dict(page_size=4, kv_cache_tokens=160, max_num_seqs=16),     # preempts and recomputes
    dict(page_size=2, kv_cache_tokens=4096, max_batch_tokens=9),  # chunked prefills
])
def test_overlap_on_and_off_give_the_same_outputs_bit_for_bit(tiny, engine_kwargs):
    model, tok = tiny
    serial = Engine(model, tok, overlap=False, **engine_kwargs)
    overlap = Engine(model, tok, overlap=True, **engine_kwargs)
    assert overlap.overlap and not serial.overlap
    rng = random.Random(7)
    history: list[list[int]] = []
    for round_ in range(4):
        prompts, params = _random_requests(rng, model.config.vocab_size, history)
        a, b = serial.generate(prompts, params), overlap.generate(prompts, params)
        assert _outputs(a) == _outputs(b)
        history += [p + c.token_ids for p, g in zip(prompts, a) for c in g]
        if round_ == 1:
            serial.invalidate_cache(), overlap.invalidate_cache()
        if round_ == 2:
            serial.release_kv_memory(), overlap.release_kv_memory()
        _check_ownership(overlap)
    assert serial.stats.as_dict() == overlap.stats.as_dict()
    assert overlap.stats.overlap_wasted_rows > 0  # EOS / stop endings left look-ahead rows to drop
    if engine_kwargs["kv_cache_tokens"] < 1000:
        assert overlap.stats.preemptions > 0


def test_a_wasted_row_reaches_no_output_and_not_the_prefix_tree(tiny):
    """A sequence stopped by a stop token had its next row planned already; its outputs and the
    tree must hold exactly what it generated, its KV up to (not including) its last token."""
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=4096, overlap=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    free = Engine(model, tok, page_size=4, overlap=False).generate(
        prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=20, seed=1, ignore_eos=True, logprobs=True))
    stop_token = free[0][0].token_ids[3]  # a token the first sample draws at its 4th position
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=20, seed=1, ignore_eos=True, logprobs=True,
                            stop_token_ids=[stop_token])
    out = engine.generate(prompts, params)
    assert engine.stats.overlap_wasted_rows > 0
    stopped = 0
    for prompt, group, free_group in zip(prompts, out, free):
        for c, f in zip(group, free_group):
            assert PLACEHOLDER not in c.token_ids and len(c.logprobs) == len(c.token_ids)
            assert c.token_ids == f.token_ids[:len(c.token_ids)]  # the same draws, cut at the stop token
            if c.finish_reason == "stop":
                stopped += 1
                assert c.token_ids[-1] == stop_token and stop_token not in c.token_ids[:-1]
            full = prompt + c.token_ids
            _, matched, _ = engine.tree.match_prefix(full, len(full))
            assert matched == len(full) - 1  # the last token's KV (computed by the wasted row) is not cached
    assert stopped >= 1
    _check_ownership(engine)
    engine.invalidate_cache()
    assert engine.allocator.num_free == engine.allocator.num_pages


def test_a_sequence_ending_by_length_costs_no_extra_row(tiny):
    model, tok = tiny
    for overlap in (False, True):
        engine = Engine(model, tok, page_size=4, overlap=overlap)
        out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))
        assert len(out[0][0].token_ids) == 10
        assert engine.stats.forward_steps == 10  # one prefill, nine decodes, as without planning ahead
        assert engine.stats.overlap_wasted_rows == 0


def test_the_host_postprocesses_step_n_while_the_worker_runs_step_n_plus_1(tiny):
    """Forward k (numbered from 0) waits until the host has postprocessed step k - 1. With
    overlap the host does that meanwhile; had the forward run in the host's thread, it would wait
    for ever (here: time out and count a miss)."""
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, overlap=True)
    forward, postprocess = engine._forward, engine._postprocess
    progress = threading.Condition()
    postprocessed, forwards, missed, threads = [0], [], [], set()

    def counting_postprocess(*args):
        result = postprocess(*args)
        with progress:
            postprocessed[0] += 1
            progress.notify_all()
        return result

    def waiting_forward(*args):
        k = len(forwards)
        forwards.append(k)
        threads.add(threading.current_thread().name)
        with progress:
            if not progress.wait_for(lambda: postprocessed[0] >= k, timeout=10):
                missed.append(k)
        return forward(*args)

    engine._forward, engine._postprocess = waiting_forward, counting_postprocess
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    assert len(out[0][0].token_ids) == 6 and len(forwards) == 6
    assert missed == []
    assert threading.current_thread().name not in threads  # every forward ran on the worker


def _assert_left_clean(engine: Engine) -> None:
    """After an interrupted generate: no sequence, row, pending index, page, lock or hold is left."""
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.scheduler._num_seqs == 0
    assert len(engine.rows._free) == engine.scheduler.max_num_seqs  # every row is back
    assert (engine.rows.pending == -1).all()
    _check_ownership(engine)
    engine.invalidate_cache()  # would raise if a lock or a running sequence were left behind
    assert engine.allocator.num_free == engine.allocator.num_pages


def test_an_error_in_the_worker_reaches_the_caller_and_leaks_nothing(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=512, overlap=True)
    forward, calls = engine._forward, []

    def failing_forward(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device fault in step 4")
        return forward(*args)

    engine._forward = failing_forward
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=3, logprobs=True)
    with pytest.raises(RuntimeError, match="device fault in step 4"):
        engine.generate(prompts, params)
    engine._forward = forward
    _assert_left_clean(engine)
    again = engine.generate(prompts, params)
    fresh = Engine(model, tok, page_size=4, kv_cache_tokens=512, overlap=False).generate(prompts, params)
    assert _outputs(again) == _outputs(fresh)


def test_an_interrupt_in_the_host_thread_while_the_worker_runs_leaks_nothing(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=512, overlap=True)
    postprocess, calls = engine._postprocess, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # (the worker is running the next step meanwhile)
            raise KeyboardInterrupt
        return postprocess(*args)

    engine._postprocess = interrupted
    switch = __import__("sys").getswitchinterval()
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=3, max_new_tokens=10, ignore_eos=True))
    engine._postprocess = postprocess
    assert __import__("sys").getswitchinterval() == switch  # restored
    _assert_left_clean(engine)
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    assert len(out[0][0].token_ids) == 4


def test_overlap_defaults_on_cuda_only_and_the_environment_overrides(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.delenv("ENGINE_OVERLAP", raising=False)
    assert Engine(model, tok).overlap is False  # a CPU: the "device" would compete with the host for the cores
    assert Engine(model, tok, overlap=True).overlap is True
    monkeypatch.setenv("ENGINE_OVERLAP", "0")
    assert Engine(model, tok, overlap=True).overlap is False
    monkeypatch.setenv("ENGINE_OVERLAP", "yes")
    with pytest.raises(ValueError, match="ENGINE_OVERLAP must be 0 or 1, got 'yes'"):
        Engine(model, tok)
    monkeypatch.setenv("ENGINE_OVERLAP", "1")
    monkeypatch.setenv("ENGINE_OVERLAP_SWITCH_S", "0")
    with pytest.raises(ValueError, match="ENGINE_OVERLAP_SWITCH_S must be a number of seconds > 0, got '0'"):
        Engine(model, tok).generate([[5, 6]], SamplingParams(max_new_tokens=2))
