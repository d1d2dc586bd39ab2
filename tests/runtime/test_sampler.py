"""The batched counter-based sampler: uniforms, greedy, distributions, fallback, batch independence.

These tests run the torch path (what CUDA runs); the C++ row loop that a CPU runs by default is
checked against it bit for bit in test_cpp_sampler.py.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch

from engine.runtime import sampler
from engine.runtime.sampler import SamplingBatch, counter_uniforms, reference_filtered_probs

sample = functools.partial(sampler.sample, backend="torch")

TINY = 2.0 ** -24


def batch(temperature, top_p, top_k, uniform, want_logprobs=False, vocab_size=None) -> SamplingBatch:
    return SamplingBatch.build(temperature, top_p, top_k, uniform, want_logprobs=want_logprobs, vocab_size=vocab_size)


def repeated(row: torch.Tensor, n: int, temperature: float, top_p: float, top_k: int, uniform):
    """The same logits row n times, one uniform each: n independent draws of one distribution."""
    return row[None].repeat(n, 1), batch([temperature] * n, [top_p] * n, [top_k] * n, uniform)


def filtered(row: torch.Tensor, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    logprobs = torch.log_softmax(row[None].float() / temperature, -1)
    return reference_filtered_probs(logprobs, torch.tensor([top_p]), torch.tensor([top_k]))[0].double().numpy()


def stratified(n: int) -> np.ndarray:
    """u = (i + 0.5) / n, exact in float32 when n is a power of two."""
    assert n & (n - 1) == 0
    return ((np.arange(n) + 0.5) / n).astype(np.float32)


def counts(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab)


@pytest.fixture
def spy(monkeypatch):
    """Counts the device->host transfers and the rows sent to the full-sort fallback."""
    calls = {"to_host": 0, "redo_rows": []}
    to_host, redo = sampler._to_host, sampler._redo_full_sort

    def counting_to_host(t):
        calls["to_host"] += 1
        return to_host(t)

    def counting_redo(probs, logprobs, b, rows):
        calls["redo_rows"].append(rows.tolist())
        return redo(probs, logprobs, b, rows)

    monkeypatch.setattr(sampler, "_to_host", counting_to_host)
    monkeypatch.setattr(sampler, "_redo_full_sort", counting_redo)
    return calls


# ---------------------------------------------------------------------------- counter_uniforms

def _splitmix_reference(seed: int, position: int) -> float:
    """The documented hash with Python integers, independently of numpy."""
    mask = (1 << 64) - 1
    x = seed ^ (((position + 1) * 0x9E3779B97F4A7C15) & mask)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return ((x >> 11) + 1) / 2 ** 53


def _ks(u: np.ndarray) -> float:
    s = np.sort(u.astype(np.float64))
    n = len(s)
    return max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))


def test_counter_uniforms_are_a_deterministic_hash_in_the_half_open_unit_interval():
    top = 2 ** 64 - 1
    seeds = np.array([0, 1, 12345, 2 ** 63, top, top - 1], dtype=np.uint64)
    positions = np.array([0, 1, 7, 1_000_000, 0, 2 ** 40], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings, even near 2**64
        u = counter_uniforms(seeds, positions)
        again = counter_uniforms(seeds.copy(), positions.copy())
        scalar = counter_uniforms(np.uint64(top), np.int64(3))
    assert u.dtype == np.float64 and u.shape == (6,)
    np.testing.assert_array_equal(u, again)
    expected = [_splitmix_reference(int(s), int(p)) for s, p in zip(seeds, positions)]
    np.testing.assert_array_equal(u, np.asarray(expected, dtype=np.float64))
    assert scalar == _splitmix_reference(top, 3)
    assert np.all(u > 0) and np.all(u <= 1)
    assert np.all((u * 2 ** 53) % 1 == 0)  # multiples of 2**-53: exact in float64


@pytest.mark.parametrize("stream", ["positions", "seeds", "seeds-near-2**64"])
def test_counter_uniforms_look_uniform_and_independent(stream):
    n = 100_000
    i = np.arange(n)
    if stream == "positions":      # one sequence, successive tokens
        u = counter_uniforms(np.full(n, 42, dtype=np.uint64), i)
    elif stream == "seeds":        # consecutive seeds, same position
        u = counter_uniforms(i.astype(np.uint64), np.full(n, 5))
    else:                          # seeds counting down from 2**64 - 1, varying positions
        u = counter_uniforms(np.uint64(2 ** 64 - 1) - i.astype(np.uint64), i % 17)
    assert u.min() > 0 and u.max() <= 1
    assert len(np.unique(u)) == n  # 53-bit values: a collision among 1e5 has probability ~1e-6
    assert _ks(u) < 2.0 / np.sqrt(n)    # Kolmogorov-Smirnov, well past the 1% critical value 1.63/sqrt(n)
    buckets = np.bincount(np.minimum((u * 100).astype(int), 99), minlength=100)
    chi2 = ((buckets - n / 100) ** 2 / (n / 100)).sum()
    assert chi2 < 99 + 5 * np.sqrt(2 * 99)  # chi-square, 99 degrees of freedom
    centred = u.astype(np.float64) - 0.5
    assert abs(np.corrcoef(centred[:-1], centred[1:])[0, 1]) < 4 / np.sqrt(n)  # neighbours uncorrelated


def test_counter_uniforms_differ_across_seeds_and_positions():
    base = counter_uniforms(np.full(1000, 7, dtype=np.uint64), np.arange(1000))
    other_seed = counter_uniforms(np.full(1000, 8, dtype=np.uint64), np.arange(1000))
    shifted = counter_uniforms(np.full(1000, 7, dtype=np.uint64), np.arange(1000) + 1)
    assert np.mean(base == other_seed) < 0.01
    assert np.mean(base[1:] == shifted[:-1]) == 1.0  # position is the counter: same (seed, position), same u
    assert np.mean(base == shifted) < 0.01


# ---------------------------------------------------------------------------- greedy and log-probs

def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 40, generator=g) * 0.5  # flat: a draw would rarely hit the argmax
    temps = [0, 1.0, 0, 0.5, 0, 2.0, 0, 1.0]
    top_p, top_k = [1, 1, 0.9, 0.9, 1, 1, 1, 1], [0, 0, 0, 5, 30, 0, 0, 2]
    argmax = logits.argmax(-1).tolist()
    greedy_rows, sampled_rows = [0, 2, 4, 6], [1, 3, 5, 7]
    seen = {r: set() for r in sampled_rows}
    for u in stratified(16):
        tokens, _ = sample(logits, batch(temps, top_p, top_k, np.full(8, u)), candidates=8)
        assert [tokens[r] for r in greedy_rows] == [argmax[r] for r in greedy_rows]
        for r in sampled_rows:
            seen[r].add(tokens[r])
    assert all(len(seen[r]) > 1 for r in sampled_rows)  # the sampled rows really sample


def test_all_greedy_skips_sampling(monkeypatch, spy):
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    b = batch([0] * 5, [0.5] * 5, [3] * 5, np.full(5, 0.5, dtype=np.float32), want_logprobs=True)
    assert b.all_greedy and b.greedy is not None
    monkeypatch.setattr(sampler, "_inverse_cdf", lambda *a, **k: pytest.fail("all-greedy step sampled"))
    tokens, lps = sample(logits, b)
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1)[:, None]).squeeze(1)
    np.testing.assert_allclose(lps, expected.numpy(), rtol=0, atol=1e-6)
    assert spy["to_host"] == 1


def test_logprobs_are_the_tempered_log_softmax_before_the_cut():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=g) * 2
    temps = [0, 0.7, 1.3, 1.0, 0.5, 0]
    top_p, top_k = [1, 0.8, 1, 0.5, 1, 0.3], [0, 0, 4, 3, 0, 2]
    u = counter_uniforms(np.arange(6) + 100, np.arange(6))
    tokens, lps = sample(logits, batch(temps, top_p, top_k, u, want_logprobs=True), candidates=16)
    t = torch.tensor([1.0 if x == 0 else x for x in temps])[:, None]
    expected = torch.log_softmax(logits / t, -1)[torch.arange(6), torch.tensor(tokens)]
    np.testing.assert_allclose(lps, expected.numpy(), rtol=0, atol=1e-6)
    # the cut does not renormalise the reported log-prob: a top-k row's log-prob is below its kept-prob log
    kept = filtered(logits[3], 1.0, 0.5, 3)[tokens[3]]
    assert lps[3] < np.log(kept) - 1e-3
    plain, none = sample(logits, batch(temps, top_p, top_k, u), candidates=16)
    assert none is None and plain == tokens


# ---------------------------------------------------------------------------- distributions

V_SMALL = 64
ROW = torch.randn(V_SMALL, generator=torch.Generator().manual_seed(3)) * 2.5  # peaked enough for top_p on 16 candidates
CASES = {  # name: (temperature, top_p, top_k)
    "no-cut": (1.0, 1.0, 0),
    "top-k": (0.7, 1.0, 5),
    "top-p": (1.3, 0.8, 0),
    "top-k-and-top-p": (1.0, 0.7, 12),
}


@pytest.mark.parametrize("case", CASES)
def test_sampled_frequencies_match_the_reference(case, spy):
    temperature, top_p, top_k = CASES[case]
    n = 20_000
    u = counter_uniforms(np.full(n, 99, dtype=np.uint64), np.arange(n))
    tokens, _ = sample(*repeated(ROW, n, temperature, top_p, top_k, u), candidates=16)
    assert spy["redo_rows"] == [] and spy["to_host"] == 1  # the one-sync path
    p = filtered(ROW, temperature, top_p, top_k)
    c = counts(tokens, V_SMALL)
    assert np.all(c[p == 0] == 0)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(c - n * p) <= 5 * sd + 1), (c, n * p)
    if case != "no-cut":
        assert (p == 0).sum() > 0  # the cut really cut something


@pytest.mark.parametrize("case", CASES)
def test_inverse_cdf_is_exact_on_stratified_uniforms(case, spy):
    temperature, top_p, top_k = CASES[case]
    n = 2 ** 14
    tokens, _ = sample(*repeated(ROW, n, temperature, top_p, top_k, stratified(n)), candidates=16)
    assert spy["redo_rows"] == []
    p = filtered(ROW, temperature, top_p, top_k)
    # u on a grid of step 1/n falls in a token's CDF interval of length p within one of n * p times
    assert np.max(np.abs(counts(tokens, V_SMALL) - n * p)) <= 1.01


def test_zero_probability_tokens_are_never_drawn_even_at_the_ends():
    extremes = np.array([TINY, 1.0, 2 * TINY, 1 - TINY], dtype=np.float32)
    # the unsorted path: -inf at both ends, underflowing exp in the middle
    row = torch.tensor([-float("inf"), 0.5, -1e4, 2.0, 1.0, -1e4, -float("inf")])
    tokens, _ = sample(*repeated(row, 4, 1.0, 1.0, 0, extremes))
    assert tokens[0] == 1 and tokens[2] == 1  # the first token of positive probability
    assert tokens[1] == 4 and tokens[3] == 4  # the last one
    # the candidates path: u = 1 lands on the last kept token in descending order, tiny u on the first
    row = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 0.5, -2.0, 4.0])
    order = row.argsort(descending=True).tolist()
    for top_p, top_k, kept in [(1.0, 3, 3), (1.0, 1, 1), (1e-6, 0, 1), (0.9, 5, None)]:
        p = filtered(row, 1.0, top_p, top_k)
        kept = kept or int((p > 0).sum())
        for candidates in (4, 256):
            tokens, _ = sample(*repeated(row, 4, 1.0, top_p, top_k, extremes), candidates=candidates)
            assert all(p[t] > 0 for t in tokens)
            assert tokens[0] == order[0] and tokens[1] == order[kept - 1]


# ---------------------------------------------------------------------------- the fallback

FLAT = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 0.1  # top_p=0.9 needs ~900 tokens


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (1.0, 100), (0.95, 300)])
def test_fallback_rows_match_the_reference_and_a_full_candidate_run(top_p, top_k, spy):
    n = 2 ** 11
    logits, b = repeated(FLAT, n, 1.0, top_p, top_k, stratified(n))
    b.want_logprobs = True
    tokens, lps = sample(logits, b, candidates=16)
    assert spy["redo_rows"] == [list(range(n))] and spy["to_host"] == 2
    np.testing.assert_allclose(lps, torch.log_softmax(FLAT, -1)[tokens].numpy(), rtol=0, atol=1e-6)
    p = filtered(FLAT, 1.0, top_p, top_k)
    c = counts(tokens, 1000)
    assert np.all(c[p == 0] == 0)
    assert np.max(np.abs(c - n * p)) <= 1.01
    # with every token a candidate (topk is then a full sort, same order) the draws coincide
    full, full_lps = sample(logits, b, candidates=1024)
    assert spy["redo_rows"] == [list(range(n))]  # no fallback for the full run
    assert full == tokens and full_lps == lps


def test_fallback_on_pseudo_random_uniforms(spy):
    n = 8_000
    u = counter_uniforms(np.arange(n, dtype=np.uint64) * 7919, np.full(n, 3))
    tokens, _ = sample(*repeated(FLAT * 20, n, 1.0, 0.9, 0, u), candidates=16)
    assert spy["redo_rows"] and len(spy["redo_rows"][0]) == n
    p = filtered(FLAT * 20, 1.0, 0.9, 0)
    c = counts(tokens, 1000)
    assert np.all(c[p == 0] == 0)
    # grouped into 20 bins of tokens by probability rank, the frequencies match
    order = np.argsort(-p)
    bins_c = np.add.reduceat(c[order], np.arange(0, 1000, 50))
    bins_p = np.add.reduceat(p[order], np.arange(0, 1000, 50))
    sd = np.sqrt(n * bins_p * (1 - bins_p))
    assert np.all(np.abs(bins_c - n * bins_p) <= 5 * sd + 1)


def test_common_case_makes_one_transfer_and_no_fallback(spy):
    logits = torch.randn(32, 500, generator=torch.Generator().manual_seed(5)) * 4
    b = batch([1.0] * 32, [0.9] * 16 + [1.0] * 16, [0] * 8 + [40] * 8 + [0] * 8 + [20] * 8,
              counter_uniforms(np.arange(32), np.arange(32)), want_logprobs=True)
    sample(logits, b)
    assert spy["to_host"] == 1 and spy["redo_rows"] == []


# ---------------------------------------------------------------------------- batch independence

def test_a_rows_token_and_logprob_do_not_depend_on_the_batch(spy):
    g = torch.Generator().manual_seed(6)
    V = 300
    rows = [
        (torch.randn(V, generator=g) * 3, 0.0, 1.0, 0),     # greedy
        (torch.randn(V, generator=g) * 3, 1.0, 1.0, 0),     # no cut
        (torch.randn(V, generator=g) * 3, 0.8, 1.0, 7),     # top-k
        (torch.randn(V, generator=g) * 3, 1.2, 0.7, 0),     # top-p on the candidates
        (torch.randn(V, generator=g) * 0.1, 1.0, 0.95, 0),  # top-p that needs the fallback
        (torch.randn(V, generator=g) * 3, 1.0, 1.0, 50),    # top-k > candidates: fallback
        (torch.randn(V, generator=g) * 3, 0.6, 0.5, 10),    # top-k and top-p
    ]
    u = counter_uniforms(np.arange(len(rows)) * 31 + 5, np.arange(len(rows)) * 3)

    def run(indices):
        logits = torch.stack([rows[i][0] for i in indices])
        b = batch([rows[i][1] for i in indices], [rows[i][2] for i in indices], [rows[i][3] for i in indices],
                  u[indices], want_logprobs=True)
        return sample(logits, b, candidates=16)

    alone = []
    for i in range(len(rows)):
        spy["redo_rows"].clear()
        alone.append(run([i]))
        assert bool(spy["redo_rows"]) == (i in (4, 5))  # the fallback rows really fall back, alone too
    for order in (list(range(len(rows))), [6, 4, 0, 5, 2, 1, 3], [4, 4, 1, 5, 5, 0]):
        tokens, lps = run(order)
        assert tokens == [alone[i][0][0] for i in order]
        assert lps == [alone[i][1][0] for i in order]  # bitwise


# ---------------------------------------------------------------------------- the rest

def test_reference_filtered_probs_keeps_the_right_tokens():
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.0625, 0.1875, 0.25, 0.5]]))
    probs = reference_filtered_probs(logprobs, torch.tensor([1.0, 0.75]), torch.tensor([2, 0]))
    # (binary fractions, exact in every sum: the token whose mass before it is exactly top_p is cut)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 1 / 3, 2 / 3]]))
    # top-k first, renormalise, then top-p: [.4 .3 .2 .1] -> top 2 = [.571 .429] -> p=0.5 keeps one
    both = reference_filtered_probs(torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])), torch.tensor([0.5]),
                                    torch.tensor([2]))
    torch.testing.assert_close(both, torch.tensor([[1.0, 0, 0, 0]]))
    # a row without a cut is exp(logprobs) whatever its neighbours ask for
    mixed = reference_filtered_probs(logprobs, torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    torch.testing.assert_close(mixed[0], logprobs[0].exp(), atol=0, rtol=0)


def test_input_is_not_modified_and_half_precision_is_accepted():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(7))
    before = logits.clone()
    b = batch([0.5, 1.0, 0, 2.0], [1, 0.9, 1, 1], [0, 0, 0, 3], np.full(4, 0.3, dtype=np.float32), want_logprobs=True)
    tokens, _ = sample(logits, b)
    torch.testing.assert_close(logits, before, atol=0, rtol=0)
    half, _ = sample(logits.bfloat16(), b)
    assert len(half) == 4 and half[2] == logits.bfloat16().argmax(-1)[2].item()


def test_non_finite_logits_of_a_sampled_row_raise():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample(logits, batch([1.0] * 3, [1.0] * 3, [0] * 3, np.full(3, 0.5, dtype=np.float32)))
    logits = torch.full((2, 10), -float("inf"))
    with pytest.raises(ValueError, match=r"rows \[0, 1\]"):
        sample(logits, batch([1.0, 1.0], [0.9, 1.0], [0, 0], np.full(2, 0.5, dtype=np.float32)))


def test_skipping_the_full_vocabulary_cdf_when_every_row_has_a_cut_changes_no_token():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 300, generator=g) * 3
    b = batch([0.7] * 64, [0.9] * 32 + [1.0] * 32, [0] * 32 + [20] * 32, stratified(64), vocab_size=300)
    assert b.any_cut and not b.any_uncut  # every row cuts: the unsorted CDF is skipped
    forced = dataclasses.replace(b, any_uncut=True)  # what a batch with an uncut neighbour computes
    assert sample(logits, b, candidates=64) == sample(logits, forced, candidates=64)


def test_without_the_vocabulary_size_a_top_k_row_takes_both_paths():
    """A row with top_p 1 and a top_k that may reach past the vocabulary must not lose its path:
    built without vocab_size, the batch computes both, and each row takes its own."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 30, generator=g) * 2
    u = counter_uniforms(np.arange(4) + 7, np.arange(4))
    unknown = batch([1.0] * 4, [1.0] * 4, [30, 45, 5, 0], u)
    known = batch([1.0] * 4, [1.0] * 4, [30, 45, 5, 0], u, vocab_size=30)
    assert unknown.any_cut and unknown.any_uncut and known.any_cut and known.any_uncut
    assert sample(logits, unknown) == sample(logits, known)
    only_k = batch([1.0] * 2, [1.0] * 2, [30, 45], u[:2])  # may cut: both paths; with V = 30 none cuts
    assert only_k.any_cut and only_k.any_uncut
    assert sample(logits[:2], only_k) == sample(logits[:2], batch([1.0] * 2, [1.0] * 2, [0, 0], u[:2]))


def test_host_flags_count_a_top_k_past_the_vocabulary_as_no_cut():
    from engine.runtime.sampler import host_flags

    greedy = np.array([False, False, True])
    top_p, top_k = np.array([1.0, 1.0, 0.5]), np.array([0, 500, 3])
    assert host_flags(greedy, top_p, top_k) == dict(all_greedy=False, any_cut=True, any_uncut=True)
    # With the vocabulary known, top_k=500 over 300 tokens cuts nothing; the greedy row's cut does not count.
    assert host_flags(greedy, top_p, top_k, vocab_size=300) == dict(all_greedy=False, any_cut=False, any_uncut=True)
    assert host_flags(greedy[:2], np.array([0.9, 1.0]), np.array([0, 20]), 300)["any_uncut"] is False
    assert host_flags(np.array([True]), np.array([1.0]), np.array([0]))["all_greedy"] is True


def test_the_cpu_sort_of_a_whole_vocabulary_is_descending_with_ties_by_index():
    """The sampler's candidate order when every token is a candidate (CPU): the same as a stable
    descending sort, so tied probabilities come in index order on any CPU."""
    from engine.runtime.sampler import _sort_descending_cpu

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 128, generator=g) * 2, -1)
    probs[0] = 0.001
    probs[0, [10, 50, 90]] = 0.3       # a tie at the top
    probs[1, :] = 1.0 / 128            # every token tied
    probs[2, 7] = 0.0                  # a zero
    order = _sort_descending_cpu(probs)
    assert order.dtype == torch.int64
    assert torch.equal(order, torch.sort(probs, dim=-1, descending=True, stable=True).indices)
    assert order[0, :3].tolist() == [10, 50, 90] and order[1].tolist() == list(range(128))
