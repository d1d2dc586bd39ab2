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
