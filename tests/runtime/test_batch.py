"""The incremental step metadata: the row table, the builder's decode fast path, one staged copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.runtime.batch import RowTable, Staging, StepBatch, build_metadata
from engine.runtime.params import SamplingParams
from engine.runtime.sequence import Sequence


def _seq(i: int, params: SamplingParams, table: list[int]) -> Sequence:
    seq = Sequence(i, 0, 0, [1, 2, 3], 3, params, seed=1000 + i)
    seq.page_table = list(table)
    return seq


def test_rows_hold_page_tables_and_sampling_parameters_and_grow():
    rows = RowTable(max_rows=3, max_pages=300)
    a = _seq(0, SamplingParams(temperature=0), [7, 8])
    b = _seq(1, SamplingParams(temperature=0.6, top_p=0.9, top_k=5, logprobs=True), [9])
    rows.attach(a)
    rows.attach(b)
    assert (a.row, b.row) == (0, 1)
    assert rows.pages[a.row, :2].tolist() == [7, 8] and rows.pages[b.row, :1].tolist() == [9]
    assert rows.greedy[a.row] and rows.temperature[a.row] == 1.0  # greedy rows are scaled by 1
    assert rows.temperature[b.row] == np.float32(0.6) and rows.top_p[b.row] == np.float32(0.9)
    assert rows.top_k[b.row] == 5 and rows.logprobs[b.row] and rows.seed[b.row] == 1001
    b.page_table += list(range(100, 200))  # appends past the initial width: the table grows
    rows.write_pages(b, 1)
    assert rows.width >= 101 and rows.pages[b.row, :101].tolist() == [9] + list(range(100, 200))
    assert rows.pages[a.row, :2].tolist() == [7, 8]  # other rows survive the growth
    rows.detach(a)
    assert a.row == -1
    c = _seq(2, SamplingParams(), [])
    rows.attach(c)
    assert c.row == 0  # the freed row is reused
    d = _seq(3, SamplingParams(), [])
    rows.attach(d)
    with pytest.raises(RuntimeError, match="no free row"):
        rows.attach(_seq(4, SamplingParams(), []))
    with pytest.raises(RuntimeError, match="already owns row"):
        rows.attach(c)
    big = _seq(5, SamplingParams(), list(range(301)))
    rows.detach(d)
    with pytest.raises(RuntimeError, match="exceeds the row width limit 300"):
        rows.attach(big)


def test_the_decode_fast_path_equals_the_general_path():
    rng = np.random.default_rng(0)
    tables = rng.integers(0, 50, size=(6, 4)).astype(np.int32)
    ends = np.array([5, 9, 16, 1, 13, 12], dtype=np.int64)
    fast = build_metadata(tables, ends - 1, ends, 4, None)
    # The same rows plus one extend row take the general path; the decode rows must agree.
    starts2 = np.concatenate([ends - 1, [0]])
    ends2 = np.concatenate([ends, [7]])
    tables2 = np.concatenate([tables, rng.integers(0, 50, size=(1, 4)).astype(np.int32)])
    general = build_metadata(tables2, starts2, ends2, 4, None)
    assert fast.decode_token_index.tolist() == general.decode_token_index.tolist() == list(range(6))
    assert fast.slot_mapping.tolist() == general.slot_mapping[:6].tolist()
    assert fast.positions.tolist() == general.positions[:6].tolist() == (ends - 1).tolist()
    assert fast.decode_tables.tolist() == general.decode_tables.tolist()
    assert fast.decode_kv_lens.tolist() == general.decode_kv_lens.tolist() == ends.tolist()
    row = np.arange(6)
    assert fast.slot_mapping.tolist() == (tables[row, (ends - 1) // 4].astype(np.int64) * 4 + (ends - 1) % 4).tolist()
    assert general.extend_token_index.tolist() == list(range(6, 13)) and general.max_extend_kv_len == 7


def test_staging_on_a_cpu_wraps_the_arrays_without_a_copy():
    arrays = {"a": np.arange(5, dtype=np.int64), "b": np.ones((2, 3), dtype=np.int32),
              "c": np.array([True, False]), "d": np.full(3, 0.5, dtype=np.float32)}
    out = Staging(torch.device("cpu")).send(arrays)
    for name, a in arrays.items():
        assert out[name].numpy() is not None and np.shares_memory(out[name].numpy(), a)
        assert out[name].tolist() == a.tolist()


def test_staging_packs_every_array_into_one_buffer_with_aligned_views(monkeypatch):
    # The CUDA layout, exercised on the CPU: pack into the host buffer, one .to(), views by offset.
    staging = Staging(torch.device("cpu"))
    staging.device = torch.device("meta")  # anything but "cpu" takes the packing path
    moved = []
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        moved.append(self.numel())
        return self.clone()  # stands in for the device copy

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    arrays = {"ids": np.arange(7, dtype=np.int64), "tables": np.arange(6, dtype=np.int32).reshape(2, 3),
              "flag": np.array([True, False, True]), "u": np.linspace(0.1, 1, 5, dtype=np.float32)}
    out = staging.send(arrays)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert len(moved) == 1  # one copy for the whole step
    for name, a in arrays.items():
        assert out[name].dtype == torch.from_numpy(a).dtype and out[name].tolist() == a.tolist()
        assert out[name].storage_offset() * out[name].element_size() % Staging.ALIGN == 0


def test_from_entries_matches_build_metadata():
    entries = [([4, 5], 6, 7), ([1, 2, 3], 0, 9)]
    b = StepBatch.from_entries(entries, 4, shared_prefix_min_tokens=None)
    assert isinstance(b.slot_mapping, torch.Tensor) and b.slot_mapping.tolist() == [22] + list(range(4, 13))
