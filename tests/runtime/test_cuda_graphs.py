"""The decode graph runner's static-buffer, padded path, run eagerly on a CPU (capture needs CUDA).

The same `DecodeGraphRunner.run` code fills the static buffers and pads the batch whether it
then replays a graph or calls the forward; on a CPU it calls the forward (kernels in Triton's
interpreter), so these tests check the padding, the scratch page and the step routing.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine import Engine, SamplingParams
from engine.model import Transformer, tiny_config
from engine.runtime.cuda_graphs import graph_batch_sizes, max_padding, scratch_pages_needed
from engine.runtime.batch import StepBatch


def tiny_model(seed: int = 0) -> Transformer:
    """2 layers, 4 query heads over 2 KV heads of 16 dims, vocabulary 64 (as in test_triton_backend)."""
    cfg = tiny_config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return Transformer(cfg).init_weights(seed, std=0.3).eval()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256] and len(graph_batch_sizes(256)) == 35
    assert graph_batch_sizes(512)[-1] == 512 and len(graph_batch_sizes(512)) == 67  # the presets' max_num_seqs
    with pytest.raises(ValueError, match="max_batch"):
        graph_batch_sizes(0)
    assert [max_padding(n) for n in (1, 2, 5, 8, 30, 512)] == [0, 0, 1, 3, 7, 7]
    assert scratch_pages_needed(512, 16) == 1 and scratch_pages_needed(512, 4) == 2 and scratch_pages_needed(1, 16) == 1


def test_graph_settings_resolve_and_reserve_scratch_pages(monkeypatch):
    model = tiny_model()
    monkeypatch.delenv("ENGINE_CUDA_GRAPHS", raising=False)
    assert Engine(model, kv_cache_tokens=256, attention_backend="triton").cuda_graphs is False  # CPU default: off
    on = Engine(model, page_size=4, kv_cache_tokens=256, attention_backend="triton", cuda_graphs=True)
    assert on.cuda_graphs and len(on.scratch_pages) == 2 and not on._graphs.capture  # CPU: the eager twin
    assert all(on.allocator.ref_count(p) == 1 for p in on.scratch_pages)  # 7 padding rows at most, 4 slots a page
    assert on.allocator.num_free == on.allocator.num_pages - 2
    assert on.kv_cache_tokens == 248 and on.usable_pages == 62
    monkeypatch.setenv("ENGINE_CUDA_GRAPHS", "0")
    assert Engine(model, kv_cache_tokens=256, attention_backend="triton", cuda_graphs=True).cuda_graphs is False
    monkeypatch.setenv("ENGINE_CUDA_GRAPHS", "1")
    assert Engine(model, kv_cache_tokens=256, attention_backend="triton").cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs needs attention_backend='triton'"):
        Engine(model, kv_cache_tokens=256, attention_backend="torch")
    monkeypatch.setenv("ENGINE_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="ENGINE_CUDA_GRAPHS must be 0 or 1"):
        Engine(model, kv_cache_tokens=256, attention_backend="triton")
    monkeypatch.delenv("ENGINE_CUDA_GRAPHS")
    with pytest.raises(ValueError, match=r"4 are needed \(2 for the CUDA graphs' padding rows\)"):
        Engine(model, page_size=4, kv_cache_tokens=8, attention_backend="triton", cuda_graphs=True)


def test_runner_routes_only_plain_decode_steps_that_fit():
    model = tiny_model()
    engine = Engine(model, page_size=4, kv_cache_tokens=256, attention_backend="triton", cuda_graphs=True,
                    max_num_seqs=5)
    runner = engine._graphs
    assert runner.sizes == [1, 2, 4, 5] and runner.max_pages == 32  # 128 positions / 4
    assert [runner.padded_size(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
    decode = [([1, 2], 5, 6), ([3, 4], 6, 7), ([5, 6], 4, 5)]
    assert runner.fits(StepBatch.from_entries(decode, 4))
    assert not runner.fits(StepBatch.from_entries(decode + [([7], 0, 3)], 4))  # a prefill chunk
    assert not runner.fits(StepBatch.from_entries(decode * 2, 4, shared_prefix_min_tokens=None))  # 6 rows > 5
    siblings = [([1, 2], 5, 6), ([1, 3], 6, 7)]
    shared = StepBatch.from_entries(siblings, 4, shared_prefix_min_tokens=4)
    assert shared.cascade_segments is not None and runner.fits(shared)  # shared prefixes: the cascade variant
    assert runner.fits(StepBatch.from_entries(siblings, 4, shared_prefix_min_tokens=None))


def test_graphs_are_dropped_when_a_parameter_moves_to_new_storage():
    model = tiny_model()
    engine = Engine(model, page_size=4, kv_cache_tokens=256, attention_backend="triton", cuda_graphs=True)
    runner = engine._graphs
    runner.graphs, runner.outputs = {(False, 1): "graph"}, {(False, 1): torch.zeros(1)}  # stand-ins for graphs
    runner._captured_storage = runner._storage()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # in place, as an optimizer step: the graphs stay valid
    runner.ensure_valid()
    assert runner.graphs
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # new storage
    runner.ensure_valid()
    assert not runner.graphs and not runner.outputs


def _balanced_but_scratch(engine: Engine) -> None:
    """With nothing running, every page is free or held by the prefix tree, except the scratch pages."""
    refs = Counter(engine.tree.page_refs())
    scratch = set(engine.scratch_pages)
    assert not any(refs[p] for p in scratch)
    for p in range(engine.allocator.num_pages):
        assert engine.allocator.ref_count(p) == refs[p] + (p in scratch), p


def _checked_runner(engine: Engine, seen: list) -> None:
    """Wrap the runner: padding rows use distinct scratch slots and read only their own page; nothing
    outside the step's slots and the scratch pages is written."""
    runner, P = engine._graphs, engine.page_size
    scratch = {p * P + o for p in engine.scratch_pages for o in range(P)}
    run, load = runner.run, runner._load

    def checked_load(token_ids, batch, size):
        load(token_ids, batch, size)
        rows = batch.num_decode
        seen.append((rows, size, batch.cascade_segments is not None))
        slots = runner.inputs[2, rows:size].tolist()
        assert len(set(slots)) == len(slots) and set(slots) <= scratch  # distinct: no collision
        assert (runner.kv_lens[rows:size] == runner.inputs[1, rows:size] + 1).all()
        assert (runner.kv_lens[rows:size] <= P).all()  # one page: the one holding the row's slot
        pages = runner.page_tables[rows:size, 0].long()
        assert (pages * P + runner.inputs[1, rows:size] == runner.inputs[2, rows:size]).all()
        assert runner.inputs[2, :rows].tolist() == batch.slot_mapping.tolist()
        if batch.cascade_segments is not None:
            n = batch.cascade_segments.shape[0]
            assert runner.segments[:n].tolist() == batch.cascade_segments.tolist()
            assert not runner.segments[n:size].any() and not runner.suffix_starts[rows:size].any()

    def checked_run(token_ids, batch):
        before = engine.pool.kv.clone()
        hidden = run(token_ids, batch)
        changed = (engine.pool.kv != before).flatten(3).any(-1).any(-1).any(0).any(0)
        touched = set(torch.nonzero(changed).flatten().tolist())
        assert touched <= set(batch.slot_mapping.tolist()) | scratch  # no other page is written
        assert hidden.shape[0] == batch.num_decode
        return hidden

    runner._load, runner.run = checked_load, checked_run


def test_padded_static_decoding_gives_the_normal_paths_tokens():
    model = tiny_model(seed=4)
    prompts = [_ids(18, 10), _ids(5, 11), _ids(9, 12), _ids(3, 13)]
    params = [SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=5, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=1.0, max_new_tokens=7, seed=6, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=1.0, max_new_tokens=6, seed=7, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, logprobs=True)]
    kw = dict(page_size=4, kv_cache_tokens=256, max_num_seqs=5)
    expected = Engine(model, attention_backend="torch", **kw).generate(prompts, params)
    engine = Engine(model, attention_backend="triton", cuda_graphs=True, **kw)
    seen = []
    _checked_runner(engine, seen)
    got = engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    st = engine.attention_stats
    assert st.graph_steps == len(seen) > 0
    assert st.graph_padded_rows == sum(size - rows for rows, size, _ in seen) > 0
    assert (3, 4, False) in seen  # 3 rows padded to 4, no sharing
    assert st.graph_shared_steps == sum(shared for *_, shared in seen) > 0  # the forked pair: the cascade variant
    _balanced_but_scratch(engine)


def test_mc_rollouts_run_as_padded_graph_steps_with_shared_prefixes():
    """VinePPO's shape: 2 prompts sharing a 40-token prefix x n = 9 (18 rows, padded to 24), then
    K = 9 rollouts from two nested states of one response: decode steps replay the cascade variant.
    (One layer and one KV head: the interpreter pays ~60 ms per program, padding rows included.)"""
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = Transformer(cfg).init_weights(5, std=0.3).eval()
    common = _ids(40, 20)
    prompts = [common + _ids(5, 21 + i) for i in range(2)]
    kw = dict(page_size=4, kv_cache_tokens=1024, max_num_seqs=24)

    def workload(engine):
        first = engine.generate(prompts, SamplingParams(n=9, temperature=1.0, max_new_tokens=5, seed=8,
                                                        ignore_eos=True, logprobs=True))
        response = first[0][0].token_ids
        states = [prompts[0] + response[:1], prompts[0] + response[:4]]
        rollouts = engine.generate(states, SamplingParams(n=9, temperature=1.0, max_new_tokens=4, seed=9,
                                                          ignore_eos=True, logprobs=True))
        return [c for g in first + rollouts for c in g]

    expected = workload(Engine(model, attention_backend="torch", **kw))
    engine = Engine(model, attention_backend="triton", cuda_graphs=True, **kw)
    seen = []
    _checked_runner(engine, seen)
    got = workload(engine)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    st = engine.attention_stats
    assert st.graph_steps >= 0.9 * st.decode_only_steps and st.decode_only_steps >= 6
    assert (18, 24, True) in seen and st.graph_shared_steps >= 0.9 * st.graph_steps
    assert st.kv_tokens_read < 0.5 * st.kv_tokens_flat  # the shared prefixes really were read once
    assert len({tuple(c.token_ids) for c in got[18:27]}) > 1  # the rollouts of a state diverged
    _balanced_but_scratch(engine)
