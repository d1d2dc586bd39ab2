"""Real-precision checks on CUDA (`pytest -m gpu`); skipped on machines without a GPU."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import load_model
from engine.model.attention import flash_attn_varlen

pytestmark = pytest.mark.gpu


def test_bf16_logits_track_transformers_on_cuda(save_hf):
    hf, folder = save_hf("qwen3", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, num_hidden_layers=4, vocab_size=4096)
    ids = torch.randint(0, 4096, (4, 256), device="cuda")
    with torch.no_grad():
        reference = hf.cuda()(ids).logits
        hf_err = (hf.to(torch.bfloat16)(ids).logits.float() - reference).abs().max()
        model, _ = load_model(folder, dtype=torch.bfloat16, device="cuda")
        our_err = (model(ids).float() - reference).abs().max()
    assert our_err <= 2 * hf_err + 1e-2, (our_err, hf_err)


@pytest.mark.parametrize("impl", ["sdpa", "flash"])
def test_packed_equals_padded_bf16_on_cuda(save_hf, impl):
    if impl == "flash" and flash_attn_varlen() is None:
        pytest.skip("flash-attn is not installed")
    _, folder = save_hf("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    model, _ = load_model(folder, dtype=torch.bfloat16, device="cuda", attn_impl=impl)
    lengths = [100, 3, 257, 64]
    seqs = [torch.randint(0, 1024, (n,), device="cuda") for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu)[0].float()
        for i, s in enumerate(seqs):
            alone = model(s[None])[0].float()
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, atol=5e-2, rtol=5e-2)
