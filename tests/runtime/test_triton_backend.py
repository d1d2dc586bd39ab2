"""The Triton attention backend: step metadata, the shared-prefix tree, and the Engine against the torch backend.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
about 30 ms per program instance, so the model and the workloads are tiny.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from engine import Engine, SamplingParams
from engine.model import Transformer, tiny_config
from engine.runtime import engine as engine_module
from engine.runtime.batch import StepBatch, cascade_layout, kv_tokens_ideal, kv_tokens_read


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """2 layers, 4 query heads over 2 KV heads of 16 dims, vocabulary 64 (weights large enough to vary tokens)."""
    cfg = tiny_config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False, **overrides)
    return Transformer(cfg).init_weights(seed, std=0.3).eval()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------- the shared-prefix tree


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def _layout(tables, kv_lens, min_tokens=1, page_size=4, **kw):
    got = cascade_layout(_t(tables), _t(kv_lens), page_size=page_size, min_prefix_tokens=min_tokens, **kw)
    if got is None:
        return None
    segments, suffix, levels = got
    assert segments.dtype == suffix.dtype == torch.int32
    return sorted(map(tuple, segments.tolist())), suffix.tolist(), levels


def test_siblings_sharing_full_pages_form_one_segment():
    # Three forks of a 9-token prefix (page_size 4): pages 5, 6 shared, the rest their own.
    got = _layout([[5, 6, 7, 8], [5, 6, 9, 10], [5, 6, 11, 12]], [13, 14, 13], min_tokens=4)
    assert got == ([(0, 3, 0, 8, 0)], [8, 8, 8], 1)


def test_nested_sharing_becomes_levels_and_loners_read_alone():
    # row 0: a loner; rows 1-4 share pages 1, 2 (an episode's prompt); rows 1-2 also share page 3
    # and rows 3-4 page 6 (two states, each forked twice); row 5 shares nothing.
    tables = [[9, 1, 1, 1], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 2, 6, 8], [20, 21, 22, 23]]
    segments, suffix, levels = _layout(tables, [16] * 6)
    assert segments == [(1, 3, 8, 12, 1), (1, 5, 0, 8, 0), (3, 5, 8, 12, 1)]
    assert suffix == [0, 12, 12, 12, 12, 0] and levels == 2


def test_a_chain_of_states_reads_each_page_once():
    # Three states of one episode, each extending the previous by a page, two rollouts each.
    tables = [[1, 2, 10], [1, 2, 11], [1, 2, 3, 12], [1, 2, 3, 13], [1, 2, 3, 4, 14], [1, 2, 3, 4, 15]]
    tables = [row + [0] * (5 - len(row)) for row in tables]
    segments, suffix, levels = _layout(tables, [9, 9, 13, 13, 17, 17])
    assert segments == [(0, 6, 0, 8, 0), (2, 6, 8, 12, 1), (4, 6, 12, 16, 2)]
    assert suffix == [8, 8, 12, 12, 16, 16] and levels == 3
    b = StepBatch.from_entries([(row, n - 1, n) for row, n in zip(tables, [9, 9, 13, 13, 17, 17])], 4,
                               shared_prefix_min_tokens=1)
    assert kv_tokens_read(b) == kv_tokens_ideal(b, 4) == 16 + 6  # 4 shared pages, one own position per row
    # Capped at two levels, the deepest rows read the third shared page themselves.
    segments, suffix, levels = _layout(tables, [9, 9, 13, 13, 17, 17], max_levels=2)
    assert segments == [(0, 6, 0, 8, 0), (2, 6, 8, 12, 1)] and suffix == [8, 8, 12, 12, 12, 12] and levels == 2


def test_sharing_needs_the_minimum_prefix_and_two_rows():
    tables = [[1, 2, 3], [1, 7, 8], [4, 5, 6]]
    assert _layout(tables, [10, 10, 10], min_tokens=5) is None  # 1 page < 2 pages
    assert _layout(tables, [10, 10, 10], min_tokens=4) == ([(0, 2, 0, 4, 0)], [4, 4, 0], 1)
    assert _layout(tables[:1], [10], min_tokens=1) is None
    # A shallow level under the minimum does not hide a deep one: rows 0-1 share 3 pages, row 2 one.
    deep = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 9, 9, 9]]
    assert _layout(deep, [16] * 3, min_tokens=8) == ([(0, 2, 0, 12, 0)], [12, 12, 0], 1)


def test_only_leading_equal_pages_are_shared():
    # Rows 0-1 have equal padding but different pages; rows 2-3 differ at page 1, so their equal
    # page 2 is not a shared prefix.
    tables = [[3, 0, 0], [4, 0, 0], [7, 8, 5], [7, 9, 5]]
    assert _layout(tables, [2, 2, 9, 9]) == ([(2, 4, 0, 4, 0)], [0, 0, 4, 4], 1)


def test_a_shared_page_holding_the_current_token_is_refused():
    # Both rows would write position 2 into slot 3 * 4 + 2: the scheduler must never do this,
    # even where the sharing is too short to be read once or deeper than the levels kept.
    for min_tokens, max_levels in ((1, 8), (8, 8), (1, 1)):
        with pytest.raises(RuntimeError, match="shares its current token's page"):
            cascade_layout(_t([[3], [3]]), _t([3, 3]), page_size=4, min_prefix_tokens=min_tokens,
                           max_levels=max_levels)
    with pytest.raises(RuntimeError, match="decode row 1 .*shares its current token's page"):
        cascade_layout(_t([[1, 2], [1, 3], [1, 3]]), _t([8, 7, 7]), page_size=4, min_prefix_tokens=1, max_levels=1)
    with pytest.raises(ValueError, match="max_levels must be >= 1, got 0"):
        cascade_layout(_t([[1, 2], [1, 3]]), _t([8, 8]), page_size=4, min_prefix_tokens=1, max_levels=0)


def test_step_metadata_of_mixed_decode_and_extend_rows():
    # decode, extend, decode, extend (a chunk of a partly computed sequence), decode sibling of row 0
    entries = [([4, 5], 6, 7), ([1, 2, 3], 0, 9), ([4, 6], 6, 7), ([8, 9], 3, 6), ([4, 7], 5, 6)]
    b = StepBatch.from_entries(entries, 4, shared_prefix_min_tokens=4)
    assert b.positions.tolist() == [6, 0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 3, 4, 5, 5]
    assert b.slot_mapping.tolist() == [22, 4, 5, 6, 7, 8, 9, 10, 11, 12, 26, 35, 36, 37, 29]
    assert b.num_tokens == 15
    assert b.decode_token_index.tolist() == [0, 10, 14]
    assert b.decode_kv_lens.tolist() == [7, 7, 6] and b.max_decode_kv_len == 7
    assert b.decode_tables.tolist() == [[4, 5, 0], [4, 6, 0], [4, 7, 0]]
    assert b.cascade_segments.tolist() == [[0, 3, 0, 4, 0]] and b.suffix_starts.tolist() == [4, 4, 4]
    assert b.cascade_levels == 1 and b.num_segments == 1 and b.grouped_rows == 3
    assert b.extend_token_index.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13]
    assert b.cu_seqlens_q.tolist() == [0, 9, 12] and b.max_seqlen_q == 9
    assert b.extend_kv_lens.tolist() == [9, 6] and b.extend_tables.tolist() == [[1, 2, 3], [8, 9, 0]]
    assert all(t.dtype == torch.int32 for t in (b.decode_tables, b.decode_kv_lens, b.extend_tables,
                                                  b.extend_kv_lens, b.cu_seqlens_q, b.cascade_segments, b.suffix_starts))
    assert StepBatch.from_entries(entries, 4, shared_prefix_min_tokens=None).cascade_segments is None
    only_extend = StepBatch.from_entries([([1, 2, 3], 0, 9)], 4)
    assert only_extend.num_decode == 0 and only_extend.decode_tables is None


# ---------------------------------------------------------------------------- backend selection


def test_auto_is_torch_on_cpu_and_the_environment_overrides(monkeypatch):
    model = tiny_model()
    monkeypatch.delenv("ENGINE_ATTENTION_BACKEND", raising=False)
    auto = Engine(model, kv_cache_tokens=256)
    assert auto.attention_backend == "torch" and auto.cuda_graphs is False
    monkeypatch.setenv("ENGINE_ATTENTION_BACKEND", "triton")
    forced = Engine(model, kv_cache_tokens=256, attention_backend="torch")
    assert forced.attention_backend == "triton" and forced.cuda_graphs is False
    greedy = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    monkeypatch.delenv("ENGINE_ATTENTION_BACKEND")
    ref = Engine(model, kv_cache_tokens=256).generate([[5, 6, 7]], greedy)
    assert forced.generate([[5, 6, 7]], greedy) == ref


def test_triton_without_the_interpreter_warns_once(monkeypatch):
    import engine.runtime.engine as engine_module
    import importlib

    # the module: `engine.kernels.decode_attention` is also the name of the re-exported function
    monkeypatch.setattr(importlib.import_module("engine.kernels.decode_attention"), "_INTERPRETED", False)
    monkeypatch.setattr(engine_module, "_warned", set())
    model = tiny_model()
    with pytest.warns(UserWarning, match="runs the kernels' torch references"):
        Engine(model, kv_cache_tokens=256, attention_backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(model, kv_cache_tokens=256, attention_backend="triton")  # once only


# ---------------------------------------------------------------------------- the Engine: triton == torch


def _workload(engine: Engine):
    """Chunked prefill next to decodes, n > 1 forks, then a fork from a cached prefix."""
    a, b = _ids(20, 1), _ids(7, 2)
    first = engine.generate([a, b], [
        SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=1, ignore_eos=True, logprobs=True),
        SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=2, ignore_eos=True, logprobs=True),
    ])
    state = a + first[0][0].token_ids[:3]
    second = engine.generate([state], SamplingParams(n=3, temperature=1.0, max_new_tokens=4, seed=3,
                                                     ignore_eos=True, logprobs=True))
    return [c for g in first + second for c in g]


@pytest.mark.parametrize("page_size,windows", [(1, None), (16, [5, None])], ids=["page1", "page16-window"])
def test_triton_backend_gives_the_torch_backends_tokens(page_size, windows, monkeypatch):
    model = tiny_model(seed=3, **({"sliding_windows": windows} if windows else {}))
    kw = dict(page_size=page_size, kv_cache_tokens=512, max_batch_tokens=8)
    expected = _workload(Engine(model, attention_backend="torch", **kw))
    steps = []
    build = engine_module.build_metadata

    def recording_build(*args, **kwargs):
        batch = build(*args, **kwargs)
        steps.append((batch.num_decode, batch.num_extend_tokens, batch.num_segments))
        return batch

    monkeypatch.setattr(engine_module, "build_metadata", recording_build)
    engine = Engine(model, attention_backend="triton", **kw)
    got = _workload(engine)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=0)
    # What the workload is meant to exercise did happen:
    assert engine.stats.cached_tokens > 0                        # a prefix-cache hit
    assert any(d and e for d, e, _ in steps)                      # decode rows next to a prefill chunk
    assert max(e for _, e, _ in steps) == 8                       # chunked prefill (budget 8)
    assert engine.attention_stats.shared_prefix_steps == sum(1 for *_, g in steps if g) > 0
    assert engine.attention_stats.shared_prefix_segments >= engine.attention_stats.shared_prefix_steps
    assert engine.attention_stats.kv_tokens_ideal <= engine.attention_stats.kv_tokens_read < engine.attention_stats.kv_tokens_flat
    assert len(steps) == engine.stats.forward_steps
    # The siblings really diverged, so the per-row suffixes mattered.
    assert len({tuple(c.token_ids) for c in got[:3]}) > 1
