"""The CPU sampler's C++ row loop (`engine._C.sample_rows`): the torch path's tokens and log-probs,
bit for bit, on every kind of row; its errors; and the backend choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import _C
from engine.runtime import sampler
from engine.runtime.sampler import SamplingBatch, counter_uniforms, sample


def random_case(seed: int, rows: int = 64):
    """Logits and a batch with every kind of row: greedy, uncut, top-p, top-k (inside, at and past
    the vocabulary), both, a top_p so close to 1 that the whole vocabulary is kept."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    V = int(rng.integers(2, 700))
    logits = torch.randn(rows, V, generator=g) * float(rng.uniform(0.05, 8))
    temperature = rng.choice([0.0, 0.3, 0.6, 1.0, 1.7], rows)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.99, 0.999999, 0.1], rows)
    top_k = rng.choice([0, 0, 1, 5, 40, V, V + 3, max(V - 1, 1)], rows)
    u = counter_uniforms(rng.integers(0, 2 ** 62, rows).astype(np.uint64), np.arange(rows))
    return logits, SamplingBatch.build(temperature, top_p, top_k, u, want_logprobs=True)


def both(logits: torch.Tensor, b: SamplingBatch, candidates: int = 256):
    return sample(logits, b, backend="torch", candidates=candidates), sample(logits, b, backend="cpp")


@pytest.mark.parametrize("seed", range(40))
def test_cpp_rows_equal_the_torch_path_bit_for_bit(seed):
    logits, b = random_case(seed)
    for candidates in (256, 16):  # the full sort, and candidates with the torch path's fallback
        (t_tokens, t_lps), (c_tokens, c_lps) = both(logits, b, candidates)
        assert c_tokens == t_tokens
        assert c_lps == t_lps  # float64 lists: bitwise


def test_ties_masked_tokens_and_underflow_agree():
    """Tied probabilities go by ascending id in both; -inf and underflowing tokens are never drawn."""
    V = 300
    row = torch.full((V,), -1e4)
    row[::7] = 1.0  # 43 tied tokens
    row[5] = float("-inf")
    row[10:20] = 2.0  # ten tied leaders
    n = 256
    u = ((np.arange(n) + 0.5) / n).astype(np.float64)
    logits = row[None].repeat(n, 1)
    for top_p, top_k in [(1.0, 0), (0.9, 0), (0.5, 0), (1.0, 12), (0.7, 15), (1.0, V - 1), (0.9999999, 0)]:
        b = SamplingBatch.build([1.0] * n, [top_p] * n, [top_k] * n, u, want_logprobs=True)
        (t_tokens, t_lps), (c_tokens, c_lps) = both(logits, b)
        assert c_tokens == t_tokens and c_lps == t_lps
        assert all(row[t] > -1e4 for t in c_tokens)


def test_a_nucleus_wider_than_the_first_estimate_and_the_whole_vocabulary():
    """Flat rows whose top-p keeps most of a large vocabulary (the loop's widening path)."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(32, 5000, generator=g) * 0.05
    u = counter_uniforms(np.arange(32), np.arange(32))
    for top_p in (0.5, 0.9, 0.999999, 1.0 - 2 ** -24):
        b = SamplingBatch.build([1.0] * 32, [top_p] * 32, [0] * 32, u, want_logprobs=True)
        assert both(logits, b)[0] == both(logits, b)[1]


def test_greedy_rows_match_torch_argmax_with_nan_and_infinities():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(10))
    logits[0, 7] = float("nan")           # torch.argmax: the first NaN
    logits[1, :] = float("-inf")          # all -inf: index 0
    logits[2, 3] = logits[2, 40] = 99.0   # tied maxima: the first
    logits[3, 9] = float("inf")
    b = SamplingBatch.build([0.0] * 6, [1.0] * 6, [0] * 6, np.full(6, 0.5), want_logprobs=True)
    c_tokens, c_lps = sample(logits, b, backend="cpp")
    assert c_tokens == logits.argmax(-1).tolist() == [7, 0, 3, 9, c_tokens[4], c_tokens[5]]
    t_tokens, t_lps = sample(logits, b, backend="torch")
    assert c_tokens == t_tokens
    np.testing.assert_array_equal(np.array(c_lps), np.array(t_lps))  # NaN where torch has NaN


def test_a_greedy_row_in_a_sampled_batch_and_log_probs_at_temperature_one():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(11)) * 3
    b = SamplingBatch.build([0.0, 0.7, 0.0, 1.3], [1.0, 0.9, 0.5, 1.0], [0, 0, 3, 0],
                            counter_uniforms(np.arange(4), np.arange(4)), want_logprobs=True)
    (t_tokens, t_lps), (c_tokens, c_lps) = both(logits, b)
    assert c_tokens == t_tokens and c_lps == t_lps
    assert c_tokens[0] == logits[0].argmax() and c_tokens[2] == logits[2].argmax()
    assert c_lps[0] == torch.log_softmax(logits[0], -1)[c_tokens[0]].item()


def test_non_finite_sampled_rows_raise_with_their_indices():
    logits = torch.randn(4, 10)
    logits[1, 4] = float("nan")
    logits[3, :] = float("-inf")
    b = SamplingBatch.build([1.0, 1.0, 0.0, 1.0], [1.0, 0.9, 1.0, 0.9], [0, 0, 0, 2], np.full(4, 0.5))
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match=r"rows \[1, 3\]: their logits are not finite"):
            sample(logits, b, backend=backend)


def test_a_nan_with_its_sign_bit_set_is_a_non_finite_row_not_a_bucket():
    """x86's default NaN has the sign bit set; the cut path's exponent histogram must not index with it."""
    probs = np.full((3, 16), 1 / 16, dtype=np.float32)
    probs.view(np.uint32)[0, 5] = 0xFFC00000  # -NaN
    probs.view(np.uint32)[1, 0] = 0x7FC00000  # +NaN
    tokens, _ = _C.sample_rows(None, probs, None, np.full(3, 0.9, np.float32), np.array([0, 4, 0]),
                               np.full(3, 0.5), None)
    assert tokens.tolist()[:2] == [-1, -1] and tokens[2] >= 0


def test_a_batch_built_by_hand_with_top_p_zero_is_refused_not_read_past():
    logits = torch.randn(2, 20)
    b = SamplingBatch(temperature=torch.ones(2), top_p=torch.tensor([0.0, 0.5]), top_k=torch.zeros(2, dtype=torch.long),
                      uniform=torch.full((2,), 0.5, dtype=torch.float64), greedy=None, all_greedy=False, any_cut=True,
                      want_logprobs=False)
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match=r"rows \[0\]"):
            sample(logits, b, backend=backend)


def test_a_hand_built_all_greedy_batch_without_a_mask():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(13))
    b = SamplingBatch(temperature=torch.ones(3), top_p=torch.ones(3), top_k=torch.zeros(3, dtype=torch.long),
                      uniform=torch.full((3,), 0.5, dtype=torch.float64), greedy=None, all_greedy=True,
                      any_cut=False, want_logprobs=True)
    assert sample(logits, b, backend="cpp") == sample(logits, b, backend="torch")
    assert sample(logits, b, backend="cpp")[0] == logits.argmax(-1).tolist()


def test_a_nan_top_p_row_built_without_the_vocabulary_still_samples_the_same_way():
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(14))
    b = SamplingBatch.build([1.0, 1.0], [float("nan"), 1.0], [0, 0], counter_uniforms(np.arange(2), np.arange(2)))
    assert b.any_uncut  # NaN is not < 1: the row takes the uncut path, as with the vocabulary known
    assert sample(logits, b, backend="cpp") == sample(logits, b, backend="torch")


def test_ids_out_input_untouched_half_precision_and_empty():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(12))
    before = logits.clone()
    b = SamplingBatch.build([0.5, 1.0, 0.0, 2.0, 1.0], [1, 0.9, 1, 1, 0.3], [0, 0, 0, 3, 0],
                            counter_uniforms(np.arange(5), np.arange(5)))
    box: list[torch.Tensor] = []
    tokens, lps = sample(logits, b, backend="cpp", ids_out=box)
    assert lps is None and box[0].dtype == torch.int64 and box[0].tolist() == tokens
    torch.testing.assert_close(logits, before, atol=0, rtol=0)
    half = logits.bfloat16()
    assert sample(half, b, backend="cpp") == sample(half, b, backend="torch")
    empty = SamplingBatch.build([], [], [], [])
    assert sample(torch.zeros(0, 40), empty, backend="cpp") == ([], None)


def test_sample_rows_reads_arrays_in_place_or_says_which_is_wrong():
    B, V = 3, 8
    probs = np.full((B, V), 1 / V, dtype=np.float32)
    top_p, top_k, u = np.ones(B, np.float32), np.zeros(B, np.int64), np.full(B, 0.5)
    tokens, lps = _C.sample_rows(None, probs, None, top_p, top_k, u, None)
    assert tokens.tolist() == [3, 3, 3] and lps is None
    with pytest.raises(ValueError, match="top_p must be a numpy array of float32"):
        _C.sample_rows(None, probs, None, top_p.astype(np.float64), top_k, u, None)
    with pytest.raises(ValueError, match="probs must be C-contiguous"):
        _C.sample_rows(None, np.asfortranarray(np.ones((B, V), np.float32)), None, top_p, top_k, u, None)
    with pytest.raises(ValueError, match="uniform has size 2 in dimension 0, expected 3"):
        _C.sample_rows(None, probs, None, top_p, top_k, u[:2], None)
    with pytest.raises(ValueError, match="probs is required unless greedy marks every row"):
        _C.sample_rows(np.zeros((B, V), np.float32), None, None, top_p, top_k, u, np.array([True, False, True]))
    greedy_only, _ = _C.sample_rows(np.eye(B, V, dtype=np.float32), None, None, top_p, top_k, u, np.ones(B, bool))
    assert greedy_only.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="probs must be a numpy array"):
        _C.sample_rows(None, 2, None, top_p, top_k, u, None)
    with pytest.raises(ValueError, match="probs must be a numpy array"):
        _C.sample_rows(None, probs.tolist(), None, top_p, top_k, u, None)
    # a row without any mass (not what exp(log_softmax) gives) is refused, cut or not
    zero = probs.copy()
    zero[1] = 0
    for k in (0, 2):
        tokens, _ = _C.sample_rows(None, zero, None, top_p, np.full(B, k, np.int64), u, None)
        assert tokens.tolist()[1] == -1 and tokens[0] >= 0


def test_the_backend_is_cpp_on_a_cpu_unless_told(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ENGINE_SAMPLER", raising=False)
    assert sampler._resolve_backend("auto", cpu) == "cpp"
    assert sampler._resolve_backend("auto", torch.device("meta")) == "torch"
    assert sampler._resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("ENGINE_SAMPLER", "torch")
    assert sampler._resolve_backend("auto", cpu) == "torch"
    assert sampler._resolve_backend("cpp", cpu) == "cpp"  # an explicit choice wins
    monkeypatch.setenv("ENGINE_SAMPLER", "cpp")  # picks the CPU's path; other devices keep torch
    assert sampler._resolve_backend("auto", torch.device("meta")) == "torch"
    monkeypatch.setenv("ENGINE_SAMPLER", "fast")
    with pytest.raises(ValueError, match="ENGINE_SAMPLER must be torch or cpp, got 'fast'"):
        sampler._resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        sampler._resolve_backend("numpy", cpu)
    with pytest.raises(ValueError, match="the cpp sampler reads CPU logits; these are on meta"):
        sampler._resolve_backend("cpp", torch.device("meta"))


def test_the_engine_samples_the_same_with_either_backend(monkeypatch, tiny_policy_dir):
    """Seeded and greedy generation through the Engine: the C++ loop changes no token or log-prob."""
    from engine import Engine, SamplingParams, load_model
    from engine.model.tiny import char_tokenizer

    model, _ = load_model(tiny_policy_dir)
    prompts = ["12+7=", "3*4=", "99-1="]
    params = [SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=12, seed=5, logprobs=True),
              SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=6, logprobs=True),
              SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True)]
    outs = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("ENGINE_SAMPLER", backend)
        engine = Engine(model, char_tokenizer())
        outs[backend] = [[(c.token_ids, c.logprobs) for c in group] for group in engine.generate(prompts, params)]
    assert outs["cpp"] == outs["torch"]
