"""KV reads of the shared-prefix cascade on VinePPO's MC workload, measured by `engine.attention_stats`.

The model body is stubbed to zeros (as in bench.host_overhead): the scheduler, the prefix cache,
the page sharing and the step metadata are the real ones, and the counts are those of the
metadata the Triton kernels receive. The kernels' results on such layouts are checked in
tests/kernels/test_cascade_attention.py and tests/runtime/test_cuda_graphs.py.
"""
from __future__ import annotations

import torch

from engine import Engine, SamplingParams
from engine.model import Transformer, tiny_config


def stubbed_model() -> Transformer:
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Transformer(cfg).init_weights(0).eval()

    def zeros(input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        return torch.zeros(1, input_ids.shape[1], cfg.hidden_size)

    model.model.forward = zeros  # uniform next-token distribution; attention never runs
    return model


def test_five_nested_states_times_k9_read_within_1_25x_of_every_page_once():
    engine = Engine(stubbed_model(), attention_backend="triton", page_size=16, kv_cache_tokens=8192)
    prompt = torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    episode = engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=180, seed=1,
                                                       ignore_eos=True))[0][0]
    states = [prompt + episode.token_ids[:b] for b in (0, 36, 72, 108, 144)]  # shared prefixes 32-176 tokens
    engine.attention_stats.reset()
    engine.generate(states, SamplingParams(n=9, temperature=1.0, max_new_tokens=40, seed=2, ignore_eos=True))
    st = engine.attention_stats
    assert st.decode_steps >= 39 and st.shared_prefix_steps == st.decode_steps
    assert st.kv_tokens_read <= 1.25 * st.kv_tokens_ideal, st.as_dict()
    assert st.kv_tokens_read < 0.3 * st.kv_tokens_flat  # reading each row's context whole costs > 3x


def test_the_torch_backend_reads_every_row_whole():
    engine = Engine(stubbed_model(), attention_backend="torch", page_size=16, kv_cache_tokens=4096)
    prompt = list(range(40))
    engine.generate([prompt], SamplingParams(n=4, temperature=1.0, max_new_tokens=5, seed=3, ignore_eos=True))
    st = engine.attention_stats
    assert st.decode_steps == 4 and st.shared_prefix_steps == 0
    assert st.kv_tokens_read == st.kv_tokens_flat == 4 * sum(range(41, 45))  # contexts 41..44 (current token incl.)
    # Four forks share the prompt's two full pages (32 tokens); each has its own copy of the partial page.
    assert st.kv_tokens_ideal == sum(32 + 4 * (n - 32) for n in range(41, 45))
