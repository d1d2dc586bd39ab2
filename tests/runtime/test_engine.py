"""The Engine against full-recompute decoding and transformers, and its cache behaviour."""
from __future__ import annotations

from collections import Counter

import pytest
import numpy as np
import torch

from engine import Engine, SamplingParams, load_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


def _prompts(seed: int = 0, lengths=(5, 11, 1, 17, 8)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _pages_balance(engine: Engine) -> None:
    """With nothing running, every page is free or held by the prefix tree, exactly."""
    refs = engine.tree.page_refs()
    for p in range(engine.allocator.num_pages):
        assert engine.allocator.ref_count(p) == refs.get(p, 0), p
    engine.tree.check_invariants()
    assert engine.tree.lock_ref(0) == 0


@pytest.mark.parametrize("family,page_size", [("llama", 1), ("llama", 4), ("qwen3", 16), ("mistral", 3)])
def test_greedy_equals_recompute_and_transformers_generate(save_hf, family, page_size):
    overrides = {"sliding_window": 6} if family == "mistral" else {}
    hf, folder = save_hf(family, **overrides)
    model, _ = load_model(folder)
    engine = Engine(model, page_size=page_size, kv_cache_tokens=2048)
    prompts = _prompts()
    outs = engine.generate(prompts, GREEDY)
    for prompt, (out,) in zip(prompts, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == 12
        assert out.token_ids == _recompute_greedy(model, prompt, 12)
        assert out.token_ids == _recompute_greedy(lambda x: hf(x).logits, prompt, 12)
        if family != "mistral":
            # transformers 5.23's cached generate with a sliding window disagrees with its own
            # full forward once the context passes the window, so compare it only without one.
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)
            assert out.token_ids == ref[0, len(prompt):].tolist()
    _pages_balance(engine)


def test_chunked_prefill_gives_the_same_tokens(save_hf):
    _, folder = save_hf("qwen2")
    model, _ = load_model(folder)
    prompts = _prompts(lengths=(40, 23, 31))
    big = Engine(model, page_size=4, kv_cache_tokens=2048).generate(prompts, GREEDY)
    chunked = Engine(model, page_size=4, kv_cache_tokens=2048, max_batch_tokens=7)
    assert chunked.generate(prompts, GREEDY) == big
    assert chunked.stats.prefill_tokens == sum(map(len, prompts))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_fork_from_the_middle_of_a_completion_prefills_at_most_one_page(tiny, page_size):
    model, tok = tiny
    engine = Engine(model, tok, page_size=page_size, kv_cache_tokens=4096)
    prompt = tok.encode("23+58-17=")
    first = engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=30, ignore_eos=True, seed=0))
    completion = first[0][0].token_ids
    rollouts = SamplingParams(n=9, temperature=1.0, max_new_tokens=10, ignore_eos=True, seed=7, logprobs=True)
    for j in (0, 1, 5, 13, 29):
        state = prompt + completion[:j]
        engine.stats.reset()
        forked = engine.generate([state], rollouts)[0]
        assert engine.stats.prefill_tokens <= page_size
        assert engine.stats.prefill_tokens == 1  # all but the last token of the state is cached
        assert engine.stats.forked_sequences == 8
        # Pages are shared, not copied: admission copies only the partial page of the match,
        # and each of the 8 forked siblings only the partial page after the prefill.
        L = len(state)
        assert engine.stats.copied_tokens == (L - 1) % page_size + 8 * (L % page_size)
        assert all(c.cached_tokens == len(state) - 1 for c in forked)
        fresh = Engine(model, tok, page_size=page_size, kv_cache_tokens=4096, prefix_cache=False)
        cold = fresh.generate([state], rollouts)[0]
        assert fresh.stats.prefill_tokens == len(state) and fresh.stats.cached_tokens == 0
        assert [c.token_ids for c in forked] == [c.token_ids for c in cold]
        for a, b in zip(forked, cold):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    _pages_balance(engine)


def test_n_samples_prefill_the_prompt_once_and_differ(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=4096)
    prompt = tok.encode("12*3+45-6=")
    outs = engine.generate([prompt], SamplingParams(n=9, temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=1))
    assert engine.stats.prefill_tokens == len(prompt)
    assert engine.stats.forked_sequences == 8
    assert len({tuple(c.token_ids) for c in outs[0]}) > 1
    _pages_balance(engine)


def test_a_pool_ten_times_too_small_gives_the_same_outputs(tiny):
    model, tok = tiny
    prompts = [tok.encode(f"{a}+{a * 7 % 50}=") for a in range(12)]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=24, ignore_eos=True, seed=11, logprobs=True)
    roomy = Engine(model, tok, page_size=4, kv_cache_tokens=4096)
    expected = roomy.generate(prompts, params)
    need = sum(3 * (len(p) + 24) for p in prompts)
    small = Engine(model, tok, page_size=4, kv_cache_tokens=need // 10)
    got = small.generate(prompts, params)
    assert small.stats.preemptions > 0
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    _pages_balance(small)


def test_released_kv_memory_comes_back_empty_on_the_next_generate(tiny):
    # A trainer frees the pool for its update (parallel fsdp); the next generate allocates it
    # again, with nothing cached, and samples what a fresh Engine samples.
    model, tok = tiny
    prompts = [tok.encode(f"{a}+{a * 3}=") for a in range(4)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=5)
    expected = Engine(model, tok, page_size=4, kv_cache_tokens=1024).generate(prompts, params)
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=1024)
    engine.generate(prompts, params)
    engine.stats.reset()
    engine.generate(prompts, params)
    assert engine.stats.cached_tokens > 0  # (without a release the prompts come from the cache)
    engine.release_kv_memory()
    assert not engine.pool.allocated and engine.pool.kv.numel() == 0
    assert engine.pool.num_slots == 1024 and engine.kv_cache_tokens == 1024
    engine.stats.reset()
    got = engine.generate(prompts, params)
    assert engine.pool.allocated and tuple(engine.pool.kv.shape) == engine.pool.shape
    assert engine.stats.cached_tokens == 0  # the prefix cache was forgotten with the pool
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    _pages_balance(engine)


def test_seeded_request_does_not_depend_on_the_batch(tiny):
    model, tok = tiny
    params = SamplingParams(n=2, temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=15, ignore_eos=True, seed=42)
    alone = Engine(model, tok, page_size=4).generate([tok.encode("9+9=")], params)[0]
    others = SamplingParams(n=4, temperature=1.3, max_new_tokens=20, ignore_eos=True)
    engine = Engine(model, tok, page_size=4)
    batched = engine.generate([tok.encode("1+2="), tok.encode("9+9="), tok.encode("77-5=")], [others, params, others])
    assert [c.token_ids for c in batched[1]] == [c.token_ids for c in alone]
    assert alone[0].token_ids != alone[1].token_ids  # the two samples use different streams


def test_per_prompt_seeds_make_the_prompts_samples_independent(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4)
    prompts = [tok.encode("9+9=")] * 3  # the same prompt three times
    shared = SamplingParams(n=2, temperature=1.0, max_new_tokens=15, ignore_eos=True, seed=42)
    same = engine.generate(prompts, shared)
    # One seeded params for all: every prompt's i-th sample draws the same random numbers.
    assert [c.token_ids for c in same[0]] == [c.token_ids for c in same[1]] == [c.token_ids for c in same[2]]
    per_prompt = shared.per_prompt(3)
    assert len({p.seed for p in per_prompt}) == 3 and all(p.n == 2 and p.temperature == 1.0 for p in per_prompt)
    apart = engine.generate(prompts, per_prompt)
    assert len({tuple(g[0].token_ids) for g in apart}) == 3  # independent draws
    again = Engine(model, tok, page_size=4).generate(prompts, shared.per_prompt(3))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in apart]  # reproducible
    unseeded = SamplingParams(n=2).per_prompt(3)
    assert unseeded == [SamplingParams(n=2)] * 3


def test_no_stale_kv_after_the_weights_change(tiny):
    model, tok = tiny
    model = type(model)(model.config).eval()
    model.load_state_dict(tiny[0].state_dict())
    model.reset_rope()
    engine = Engine(model, tok, page_size=4)
    prompt = tok.encode("31+4=")
    before = engine.generate([prompt], GREEDY)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an in-place update, like optimizer.step()
    after = engine.generate([prompt], GREEDY)
    assert engine.stats.cached_tokens == 0  # the in-place update was noticed: nothing reused
    assert after[0][0].token_ids == _recompute_greedy(model, prompt, 12)
    assert after != before
    engine.stats.reset()
    engine.invalidate_cache()
    assert engine.tree.cached_tokens == 0 and engine.allocator.num_free == engine.allocator.num_pages
    assert engine.generate([prompt], GREEDY) == after


def test_fused_optimizer_steps_are_noticed(tiny):
    """Fused AdamW does not bump autograd's version counters; the fingerprint still sees the step."""
    model = type(tiny[0])(tiny[0].config)
    model.load_state_dict(tiny[0].state_dict())
    model.reset_rope()
    tok = tiny[1]
    engine = Engine(model, tok, page_size=4)
    prompt = tok.encode("8*8-1=")
    engine.generate([prompt], GREEDY)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    versions = [p._version for p in model.parameters()]
    model(torch.tensor([prompt])).logsumexp(-1).sum().backward()
    opt.step()
    assert [p._version for p in model.parameters()] == versions  # the hazard this test is about
    engine.stats.reset()
    after = engine.generate([prompt], GREEDY)
    assert engine.stats.cached_tokens == 0
    assert after[0][0].token_ids == _recompute_greedy(model, prompt, 12)


def test_stop_strings_and_stop_ids(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4)
    free = engine.generate(["4+4="], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))[0][0]
    text = free.text
    assert len(text) >= 6
    stop_at = text[3:5]
    out = engine.generate(["4+4="], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, stop=[stop_at]))[0][0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop_at)] and stop_at not in out.text
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    stop_id = free.token_ids[4]
    out = engine.generate(["4+4="], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True,
                                                   stop_token_ids=[stop_id]))[0][0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_id
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]


def test_eos_stops_unless_ignored(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4)
    free = engine.generate(["4+4="], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))[0][0]
    eos = free.token_ids[2]
    engine.eos_token_ids = frozenset({eos})  # pretend that token is EOS
    out = engine.generate(["4+4="], SamplingParams(temperature=0, max_new_tokens=10))[0][0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]


def test_eos_lists_from_generation_config_stop_generation(save_hf, tmp_path):
    import json

    _, folder = save_hf("llama")
    model, _ = load_model(folder)
    free = Engine(model, page_size=4).generate([[3, 4, 5]], GREEDY)[0][0].token_ids
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [90, free[3]]}))
    model, _ = load_model(folder)
    assert model.config.generation["eos_token_id"] == [90, free[3]]
    out = Engine(model, page_size=4).generate([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=12))[0][0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(free[3]) + 1]
    model.save_pretrained(tmp_path / "resaved")  # generation_config.json travels with the checkpoint
    assert json.loads((tmp_path / "resaved" / "generation_config.json").read_text())["eos_token_id"] == [90, free[3]]


def test_generation_stops_at_the_context_length(save_hf):
    _, folder = save_hf("llama", max_position_embeddings=20)
    model, _ = load_model(folder)
    out = Engine(model, page_size=4).generate([[1] * 15], SamplingParams(temperature=0, max_new_tokens=50))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_sampling_filters(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4)
    greedy = engine.generate(["5+5="], GREEDY)[0][0].token_ids
    for params in (SamplingParams(top_k=1, max_new_tokens=12, ignore_eos=True, seed=3),
                   SamplingParams(top_p=1e-6, max_new_tokens=12, ignore_eos=True, seed=3)):
        assert engine.generate(["5+5="], params)[0][0].token_ids == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    from engine.runtime.sampler import SamplingBatch, reference_filtered_probs, sample

    def cut(lp, top_p, top_k):
        return reference_filtered_probs(lp, torch.tensor(top_p), torch.tensor(top_k))

    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    probs = cut(logprobs, [1.0, 0.7], [2, 0])
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    # a mass before a token exactly equal to top_p cuts it (binary fractions: every sum exact)
    exact = cut(torch.log(torch.tensor([[0.0625, 0.1875, 0.25, 0.5]])), [0.75], [0])
    torch.testing.assert_close(exact, torch.tensor([[0, 0, 1 / 3, 2 / 3]]))
    # top-k first, renormalise, then top-p: [.4 .3 .2 .1] -> top 2 = [.571 .429] -> p=0.5 keeps one
    both = cut(torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])), [0.5], [2])
    torch.testing.assert_close(both, torch.tensor([[1.0, 0, 0, 0]]))
    # a row without a cut is exp(logprobs) whatever its neighbours ask for
    mixed = cut(logprobs, [1.0, 1.0], [0, 1])
    torch.testing.assert_close(mixed[0], logprobs[0].exp(), atol=0, rtol=0)
    # The engine's sampler: 4000 evenly spread draws of the first row under top_p 0.85.
    n = 4000
    batch = SamplingBatch(temperature=torch.ones(n), top_p=torch.full((n,), 0.85), top_k=torch.zeros(n, dtype=torch.long),
                          uniform=(torch.arange(n) + 0.5) / n, greedy=None, all_greedy=False, any_cut=True,
                          want_logprobs=False)
    counts = Counter(sample(logprobs[:1].repeat(n, 1), batch)[0])
    assert set(counts) == {0, 1, 2} and abs(counts[0] / n - 0.5 / 0.95) < 0.01


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0 .*got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0 .*got inf"),
    (dict(top_p=float("nan")), "top_p must be in \\(0, 1\\], got nan"),
    (dict(seed=1.5), "seed must be an integer or None, got 1.5"), (dict(seed=True), "seed must be an integer"),
    (dict(stop_token_ids=[2.0]), "stop_token_ids must be integers >= 0, got \\(2.0,\\)"),
    (dict(stop=[""]), "stop strings must be non-empty strings"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_and_pools(tiny):
    model, tok = tiny
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=256)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt 1 has {limit} tokens; the model's context is {limit}"):
        engine.generate([[5], [5] * limit], GREEDY)
    with pytest.raises(ValueError, match=r"prompt 0 has token id 1.5: token ids must be integers"):
        engine.generate([[1.5, 2.0]], GREEDY)  # (int() would have made it the prompt [1, 2])
    with pytest.raises(ValueError, match=r"prompt 0 must be a 1-d integer tensor of token ids, got torch.float32"):
        engine.generate([torch.tensor([1.0, 2.0])], GREEDY)
    assert engine.generate([torch.tensor([5, 6]), np.array([5, 6])], GREEDY)[0][0].token_ids == \
        engine.generate([[5, 6]], GREEDY)[0][0].token_ids  # integer tensors and arrays are fine
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(ValueError, match=r"token id 128, outside the vocabulary \[0, 128\)"):
        engine.generate([[5, 128]], GREEDY)
    with pytest.raises(ValueError, match=r"KV pool \(256 tokens, 64 pages of 4\) cannot hold one sequence"):
        engine.generate([[5] * 10], SamplingParams(max_new_tokens=300))
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        Engine(model, page_size=4).generate(["1+1="], GREEDY)
    with pytest.raises(ValueError, match="holds 0 page"):
        Engine(model, kv_cache_tokens=10, page_size=16)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(model, attention_backend="cuda")
    with pytest.raises(ValueError, match="cuda_graphs needs attention_backend='triton'"):
        Engine(model, attention_backend="torch", cuda_graphs=True)
    with pytest.raises(ValueError, match="shared_prefix_min_tokens"):
        Engine(model, shared_prefix_min_tokens=0)
    with pytest.raises(ValueError, match="a list of prompts"):
        engine.generate("1+1=", GREEDY)
    _pages_balance(engine)


def test_attention_backend_environment_override(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("ENGINE_ATTENTION_BACKEND", "flex")
    with pytest.raises(ValueError, match="got 'flex'"):
        Engine(model, tok, attention_backend="torch")
    monkeypatch.setenv("ENGINE_ATTENTION_BACKEND", "torch")
    assert Engine(model, tok, attention_backend="auto").generate([[5]], GREEDY)[0][0].finish_reason == "length"


def test_engine_samples_with_the_models_own_parameters(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    assert engine.model is model
    assert engine.model.lm_head_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_siblings_of_a_fork_run_next_to_each_other(tiny):
    """The shared-prefix decode kernel relies on a fork's siblings being adjacent in the batch."""
    model, tok = tiny
    engine = Engine(model, tok, page_size=4)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, ignore_eos=True)
    for i, text in enumerate(["1+1=", "22+2=", "3+33="]):
        engine.scheduler.add(engine._make_group(i, tok.encode(text), params)[0])
    engine._step()  # prefills the three prompts and forks each into three
    assert [s.request for s in engine.scheduler.running] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    batch = engine.scheduler.schedule()
    assert [s.request for s in batch.seqs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(end - start == 1 for start, end in zip(batch.starts, batch.ends)) and batch.decode_only


def test_inference_never_calls_a_decoder_layer_module(tiny, monkeypatch):
    """Generation runs each layer through `forward_fused`, never `layer(...)`: under --parallel
    fsdp a module call goes through FSDP's hooks and would make that layer a root of its own."""
    from engine.model.transformer import DecoderLayer

    model, tok = tiny
    want = Engine(model, tok, page_size=4, kv_cache_tokens=256).generate([[5, 6, 7]], GREEDY)[0][0].token_ids

    def refuse(self, *args, **kwargs):
        raise AssertionError("the inference path called a DecoderLayer module")

    monkeypatch.setattr(DecoderLayer, "forward", refuse)
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=256)
    assert engine.generate([[5, 6, 7]], GREEDY)[0][0].token_ids == want
    assert engine.generate([[5, 6, 7, 8], [5, 6, 7, 9]], SamplingParams(n=2, max_new_tokens=4, seed=3))
