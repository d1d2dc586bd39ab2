"""The Engine samples from the distribution the trainer trains: logits with fp32 accumulation."""
from __future__ import annotations

import torch

from engine import Engine, SamplingParams, load_model
from engine.runtime.engine import lm_head_logits
from engine.kernels import fused_logprobs


def _record_sampled_hidden(engine: Engine) -> list[torch.Tensor]:
    """Wrap engine._forward to keep the last row's hidden state of every step (one sequence: its sampling row)."""
    rows: list[torch.Tensor] = []
    forward = engine._forward

    def wrapped(*args, **kwargs):
        hidden = forward(*args, **kwargs)
        rows.append(hidden[-1].clone())
        return hidden

    engine._forward = wrapped
    return rows


@torch.no_grad()
def test_engine_logprobs_equal_the_losss_fused_logprobs_on_a_bf16_model(save_hf):
    _, folder = save_hf("qwen2")
    model, _ = load_model(folder, dtype=torch.bfloat16)
    weight = model.lm_head_weight
    assert weight.dtype == torch.bfloat16
    for temperature in (1.0, 0.7):
        engine = Engine(model, kv_cache_tokens=1024, prefix_cache=False)
        rows = _record_sampled_hidden(engine)
        params = SamplingParams(temperature=temperature, max_new_tokens=24, ignore_eos=True, seed=3, logprobs=True)
        (out,), = engine.generate([[5, 17, 42, 8, 1, 30]], params)
        assert len(rows) == len(out.token_ids) == 24
        hidden = torch.stack(rows)  # bf16 [24, d]: the rows each token was drawn from
        targets = torch.tensor(out.token_ids)
        ref = fused_logprobs(hidden, weight, targets, temperature)  # what the PPO loss computes
        got = torch.tensor(out.logprobs)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # fp32 round-off only
        # Not vacuous: bf16-rounded logits (the old LM head) are off by far more than that.
        bf16 = torch.log_softmax((hidden @ weight.T).float() / temperature, -1).gather(1, targets[:, None])[:, 0]
        assert (bf16 - ref).abs().max() > 1e-4


def test_lm_head_logits_accumulate_in_fp32():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 64, generator=g).bfloat16()
    weight = torch.randn(96, 64, generator=g).bfloat16()
    logits = lm_head_logits(hidden, weight)
    assert logits.dtype == torch.float32 and logits.shape == (5, 96)
    torch.testing.assert_close(logits, hidden.double() @ weight.double().T, atol=1e-5, rtol=1e-6, check_dtype=False)
    fp32 = torch.randn(4, 64, generator=g)
    torch.testing.assert_close(lm_head_logits(fp32, weight.float()), fp32 @ weight.float().T, atol=0, rtol=0)
