"""The Engine on CUDA (`pytest -m gpu`); skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams, load_model

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_greedy_on_cuda_equals_recompute_and_forks_hit_the_cache(save_hf):
    _, folder = save_hf("qwen2", hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=512, vocab_size=2048, num_hidden_layers=4)
    model, _ = load_model(folder, dtype=torch.float32, device="cuda")
    engine = Engine(model, page_size=16, kv_cache_tokens=1 << 15)
    assert engine.pool.kv.is_cuda
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in (33, 100, 7)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    for prompt, (out,) in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]
    state = prompts[1] + outs[1][0].token_ids[:10]
    engine.stats.reset()
    forked = engine.generate([state], SamplingParams(n=9, temperature=1.0, max_new_tokens=16, seed=0))[0]
    assert engine.stats.prefill_tokens == 1 and engine.stats.forked_sequences == 8
    assert len({tuple(c.token_ids) for c in forked}) > 1


def _qwen2(save_hf, dtype):
    _, folder = save_hf("qwen2", hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=512, vocab_size=2048, num_hidden_layers=4)
    model, _ = load_model(folder, dtype=dtype, device="cuda")
    return model


def _gpu_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 2048, (n,), generator=g).tolist() for n in (33, 100, 7)]


@torch.no_grad()
def test_triton_backend_and_cuda_graphs_give_the_torch_backends_tokens_in_fp32(save_hf):
    model = _qwen2(save_hf, torch.float32)
    prompts = _gpu_prompts()
    greedy = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    kw = dict(page_size=16, kv_cache_tokens=1 << 15, max_num_seqs=16)
    ref = Engine(model, attention_backend="torch", **kw).generate(prompts, greedy)
    eager = Engine(model, attention_backend="triton", cuda_graphs=False, **kw)
    graphs = Engine(model, **kw)  # auto: triton with CUDA graphs on CUDA
    assert graphs.attention_backend == "triton" and graphs.cuda_graphs and graphs._graphs.capture
    assert eager.generate(prompts, greedy) == ref
    assert graphs.generate(prompts, greedy) == ref
    assert graphs.attention_stats.graph_steps > 0 and graphs.attention_stats.graph_padded_rows > 0  # 3 rows -> 4
    assert sorted(graphs._graphs.graphs) == [(False, s) for s in graphs._graphs.sizes]  # no sharing: plain only
    assert graphs._graphs.sizes == [1, 2, 4, 8, 16]

    # Weights updated in place (as the trainer's optimizer does): the captured graphs read them.
    for p in model.parameters():
        p.mul_(1.5)
    after = Engine(model, attention_backend="torch", **kw).generate(prompts, greedy)
    assert after != ref
    steps = graphs.attention_stats.graph_steps
    assert graphs.generate(prompts, greedy) == after
    assert graphs.attention_stats.graph_steps > steps


@torch.no_grad()
def test_shared_prefix_groups_on_cuda_give_the_torch_backends_samples(save_hf):
    model = _qwen2(save_hf, torch.float32)
    prompts = _gpu_prompts()
    kw = dict(page_size=16, kv_cache_tokens=1 << 15, max_num_seqs=32)
    torch_engine, triton_engine = Engine(model, attention_backend="torch", **kw), Engine(model, **kw)
    first = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    base = torch_engine.generate(prompts, first)
    assert triton_engine.generate(prompts, first) == base
    states = [p + c[0].token_ids[:10] for p, c in zip(prompts, base)]  # 43, 110 and 17 tokens: cached
    params = SamplingParams(n=9, temperature=1.0, max_new_tokens=16, seed=0, ignore_eos=True, logprobs=True)
    expected = torch_engine.generate(states, params)
    triton_engine.attention_stats.reset()
    got = triton_engine.generate(states, params)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    for g_got, g_exp in zip(got, expected):
        for a, b in zip(g_got, g_exp):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3, rtol=0)
    st = triton_engine.attention_stats
    assert st.shared_prefix_steps > 0 and st.graph_shared_steps > 0  # the cascade, replayed from graphs
    assert st.graph_steps >= 0.9 * st.decode_only_steps
    assert len({tuple(c.token_ids) for c in got[1]}) > 1


@torch.no_grad()
def test_triton_backend_in_bf16_picks_the_dense_models_top_tokens(save_hf):
    """bf16 rounding differs between the backends, so tokens may part ways late; instead every
    greedy token of the triton engine (graphs on) must be a near-top logit of the dense bf16
    forward over the same tokens."""
    model = _qwen2(save_hf, torch.bfloat16)
    prompts = _gpu_prompts()
    engine = Engine(model, page_size=16, kv_cache_tokens=1 << 15, max_num_seqs=16)
    assert engine.attention_backend == "triton" and engine.cuda_graphs
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    assert engine.attention_stats.graph_steps > 0
    for prompt, (out,) in zip(prompts, outs):
        ids = torch.tensor([prompt + out.token_ids], device="cuda")
        logits = model(ids)[0, len(prompt) - 1:-1].float()  # the logits each generated token was picked from
        chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        assert bool((chosen >= logits.max(-1).values - 0.25).all()), (chosen - logits.max(-1).values).min()


@torch.no_grad()
def test_lm_head_logits_on_cuda_are_fp32_accumulated():
    """The CUDA path (one GEMM with fp32 output, no fp32 weight copy) equals the fp64 product within fp32 round-off."""
    from engine.runtime.engine import lm_head_logits

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 512, generator=g).bfloat16().cuda()
    weight = torch.randn(4096, 512, generator=g).bfloat16().cuda()
    logits = lm_head_logits(hidden, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, (hidden.double() @ weight.double().T).float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_overlap_is_on_by_default_on_cuda_and_changes_no_output(save_hf, cuda_graphs):
    """The worker thread and its own stream (and graph capture from that thread) give the serial
    engine's outputs bit for bit, stop tokens and forks included."""
    model = _qwen2(save_hf, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in (40, 7, 90)]
    params = [SamplingParams(n=4, temperature=1.0, max_new_tokens=40, seed=i, logprobs=True, ignore_eos=True,
                             stop_token_ids=[int(t) for t in torch.randint(0, 2048, (20,), generator=g)])
              for i in range(3)]
    outputs = {}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for overlap in (None, False):
        model.load_state_dict(start)
        engine = Engine(model, page_size=16, kv_cache_tokens=1 << 14, overlap=overlap, cuda_graphs=cuda_graphs)
        assert engine.overlap is (overlap is None)
        first = engine.generate(prompts, params)
        states = [p + c.token_ids[:len(c.token_ids) // 2] for p, grp in zip(prompts, first) for c in grp[:2]]
        second = engine.generate(states, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=7, logprobs=True))
        with torch.no_grad():  # an in-place update on the caller's stream, as an optimizer step is:
            for p in model.parameters():  # the worker's stream must wait for it
                p.mul_(1.01)
        engine.invalidate_cache()
        third = engine.generate(prompts, params)
        if cuda_graphs:
            assert engine.attention_stats.graph_steps > 0
        outputs[overlap] = [[(c.token_ids, c.logprobs, c.finish_reason, c.cached_tokens) for c in grp]
                            for grp in first + second + third]
    assert outputs[None] == outputs[False]
