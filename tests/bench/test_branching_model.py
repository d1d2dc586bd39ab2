"""bench.branching --model runs the MC workload on a checkpoint folder with a chat-template tokenizer."""
from __future__ import annotations

import json

import pytest

from bench import branching
from engine.model import Transformer, tiny_config
from engine.model.tiny import char_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A random tiny Llama checkpoint whose character tokenizer has a chat template."""
    folder = tmp_path_factory.mktemp("chat-ckpt")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    Transformer(tiny_config(num_hidden_layers=2)).init_weights(0).save_pretrained(str(folder), tokenizer=tokenizer)
    return folder


def test_model_mode_times_the_engine_against_three_hf_batchings(chat_checkpoint, tmp_path):
    out = tmp_path / "branching-model.json"
    report = branching.main(["--model", str(chat_checkpoint), "--prompts", "2", "--responses", "2",
                             "--response-len", "6", "--state-every", "2", "--k", "3", "--max-num-seqs", "9",
                             "--profile-steps", "2", "--profile-skip", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert set(results) == {"engine"} | {f"transformers_{b}" for b in branching.HF_BATCHINGS}
    eng = results["engine"]
    states = 2 * 2 * 3  # prompts x responses x cuts (0, 2, 4)
    assert report["summary"]["states"] == states
    assert eng["mc_generated_tokens"] == 2 * 2 * 3 * (6 + 4 + 2)  # K rollouts of response_len - j from each state
    for batching in branching.HF_BATCHINGS:
        hf = results[f"transformers_{batching}"]
        assert hf["mc_generated_tokens"] == eng["mc_generated_tokens"]
        assert hf["mc_sampled_tokens"] >= hf["mc_generated_tokens"] and hf["mc_cached_tokens"] == 0
        assert hf["mc_prefill_tokens"] > eng["mc_prefill_tokens"] and hf["mc_tokens_per_s"] > 0
    assert results["transformers_per_state"]["calls"] == states
    assert results["transformers_per_cut"]["calls"] == 3 * 2  # 3 cuts, 4 states each, 3 states (9 rows) a call
    assert results["transformers_padded"]["calls"] == 4
    # the states' prefixes are cached: one token of prefill each
    assert eng["mc_prefill_tokens"] == states and eng["mc_cached_tokens"] > 0
    assert 0 < eng["attention_share_of_forward"] < 1 and 0 < eng["attention_share_of_mc"] < 1
    assert set(eng["mc_step_ms"]) >= {"schedule", "prepare", "forward", "sample", "postprocess"}
    prof = report["engine_profile"]
    assert prof["steps"] == 2 and 0 < prof["attention_share"] < 1 and prof["attention_top_ops_s"]
    best = report["summary"]["best_hf"]
    assert report["summary"]["engine_speedup_over_best_hf"] == pytest.approx(results[best]["mc_s"] / eng["mc_s"])
    assert report["example"].startswith("<user>")
