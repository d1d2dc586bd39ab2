"""SmolLM2-135M-Instruct: our model and engine against transformers on the same weights."""
from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams

pytestmark = pytest.mark.real_model

ATOL_FP32 = 1e-5  # tests/model/test_parity.py's bound (on this model the logits are bit-equal today)
# Padding changes the attention's shapes, hence its float32 rounding: with logits of size ~40 each
# side moves up to 8e-5 from its own unpadded logits (measured 2026-12-06); a wrong mask or
# position is off by O(1).
ATOL_PADDED = 5e-4
EOS = 2  # <|im_end|>, the end of the chat template's assistant turn
PROMPTS = ["What is 12 + 35?", "Name three colors.", "Translate 'hello world' to Chinese.",
           "What is the capital of France? Answer in one sentence."]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_the_checkpoint_is_smollm2_with_its_chat_template(smol, chat):
    model, tok = smol
    c = model.config
    shape = (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    assert shape == ("llama", 30, 9, 3, 49152)
    assert model.config.tie_word_embeddings and model.lm_head_weight is model.model.embed_tokens.weight  # tied embeddings
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == EOS
    ids = chat("Hi")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and ids.count(EOS) == 2  # system + user turns


@torch.no_grad()
def test_logits_match_transformers_fp32(smol, hf, chat):
    model, _ = smol
    for question in PROMPTS[:3]:
        ids = torch.tensor([chat(question)])
        expected = hf(ids).logits
        got = model(ids)
        assert got.shape == expected.shape == (1, ids.shape[1], 49152)
        assert expected.abs().max() > 10  # a real model's logits: the bound is tight relative to them
        torch.testing.assert_close(got, expected, atol=ATOL_FP32, rtol=0)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@torch.no_grad()
def test_padded_batch_logits_match_transformers(smol, hf, chat):
    """Left-padded prompts of different lengths in one batch, as the trainer scores them."""
    model, _ = smol
    prompts = [chat(q) for q in PROMPTS[:3]]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = hf(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL_PADDED, rtol=0)


def test_greedy_generation_matches_transformers_token_for_token(smol, hf, chat):
    model, tok = smol
    engine = Engine(model, tok, page_size=16, kv_cache_tokens=4096)
    assert EOS in engine.eos_token_ids
    budget = 48
    prompts = [chat(q) for q in PROMPTS]
    ours = [c for [c] in engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=budget))]
    stopped = 0
    for prompt, c in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                          eos_token_id=EOS, pad_token_id=EOS)
        expected = out[0, len(prompt):].tolist()
        assert c.token_ids == expected, (tok.decode(c.token_ids), tok.decode(expected))
        assert c.text == tok.decode(expected, skip_special_tokens=True)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] and len(c.token_ids) < budget
            stopped += 1
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == budget and EOS not in c.token_ids
    assert stopped >= 3, [(c.finish_reason, c.text) for c in ours]  # most end by the template's EOS
