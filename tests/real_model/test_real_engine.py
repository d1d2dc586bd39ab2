"""SmolLM2-135M-Instruct in the Engine: seeds, stop strings across BPE and byte tokens, forks."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine import Engine, SamplingParams

pytestmark = pytest.mark.real_model

EOS = 2
PAGE = 16
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=48)
FRANCE = "What is the capital of France? Answer in one sentence."  # -> "The capital of France is Paris."
CHINESE = "Translate 'hello world' to Chinese."  # -> "智能客户端 (XinXin...) is a Chinese language ..."
EMOJI = "Say hello with a smiley emoji."  # -> "👌🏼👌🏼👌🏼..." (3 byte tokens per emoji) to the length limit


@pytest.fixture(scope="module")
def engine(smol):
    model, tok = smol
    return Engine(model, tok, page_size=PAGE, kv_cache_tokens=4096)


def _greedy(engine, prompt, **kw):
    [[c]] = engine.generate([prompt], replace(GREEDY, **kw))
    return c


def _tokens_until(tok, ids, text):
    """The shortest prefix of `ids` whose decoded text contains `text`."""
    for k in range(1, len(ids) + 1):
        if text in tok.decode(ids[:k], skip_special_tokens=True):
            return ids[:k]
    raise AssertionError(f"{text!r} is not in {tok.decode(ids)!r}")


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine, smol, chat):
    _, tok = smol
    params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_new_tokens=24, seed=1234)
    prompt = chat("Write a haiku about the sea.")
    alone = [c.token_ids for c in engine.generate([prompt], params)[0]]
    again = [c.token_ids for c in engine.generate([prompt], params)[0]]  # now from the prefix cache
    fresh = Engine(engine.model, tok, page_size=PAGE, kv_cache_tokens=4096, prefix_cache=False)
    others = SamplingParams(n=3, temperature=1.0, max_new_tokens=30)
    batched = fresh.generate([chat("Name three colors."), prompt, chat("What is 12 + 35?")], [others, params, others])
    assert alone == again == [c.token_ids for c in batched[1]]
    assert alone[0] != alone[1]  # the two samples draw from different streams
    reseeded = engine.generate([prompt], replace(params, seed=99))[0]
    assert [c.token_ids for c in reseeded] != alone


def test_a_stop_string_spanning_several_tokens_cuts_the_text_right_before_it(engine, smol, chat):
    _, tok = smol
    prompt = chat(FRANCE)
    full = _greedy(engine, prompt)
    assert full.text == "The capital of France is Paris." and full.finish_reason == "stop"
    # " France is": two whole tokens; "ance is P": starts inside " France", ends inside " Paris"
    for stop in (" France is", "ance is P"):
        assert len(tok.encode(stop, add_special_tokens=False)) >= 2
        c = _greedy(engine, prompt, stop=(stop,))
        assert c.finish_reason == "stop"
        assert c.text == full.text[:full.text.index(stop)]
        assert c.token_ids == _tokens_until(tok, full.token_ids, stop)  # stopped at the token completing it
    assert _greedy(engine, prompt, stop=(" France is",)).text == "The capital of"
    assert _greedy(engine, prompt, stop=("Berlin",)).token_ids == full.token_ids  # no match: to EOS


def _split_characters(tok, ids):
    """Characters of the decoded ids whose UTF-8 bytes come from several byte-level tokens (each of
    which decodes alone to U+FFFD)."""
    return [i for i, t in enumerate(ids) if "\ufffd" in tok.decode([t])]


def test_characters_split_across_byte_tokens_decode_whole(engine, smol, chat):
    _, tok = smol
    prompt = chat(CHINESE)
    full = _greedy(engine, prompt)
    assert full.finish_reason == "stop" and full.token_ids[-1] == EOS
    assert full.text.startswith("智能客户端") and "\ufffd" not in full.text
    assert len(_split_characters(tok, full.token_ids)) >= 4  # 智, 客 (at least) come as byte tokens
    assert len(tok.encode("客", add_special_tokens=False)) >= 2
    # A stop string of CJK characters whose bytes span several tokens: matched on whole characters.
    for stop, before in (("客户", "智能"), ("能客", "智"), ("端", "智能客户")):
        c = _greedy(engine, prompt, stop=(stop,))
        assert (c.finish_reason, c.text) == ("stop", before)
        assert c.token_ids == _tokens_until(tok, full.token_ids, stop)
        assert "\ufffd" not in c.text


def test_an_emoji_made_of_byte_tokens_is_matched_and_cut_whole(engine, smol, chat):
    _, tok = smol
    prompt = chat(EMOJI)
    full = _greedy(engine, prompt)
    assert full.text.startswith("👌🏼👌🏼")
    assert [len(tok.encode(e, add_special_tokens=False)) for e in ("👌", "🏼")] == [3, 3]
    # "🏼👌" begins with the second emoji of the first pair and ends with the next pair's first
    c = _greedy(engine, prompt, stop=("🏼👌",))
    assert (c.finish_reason, c.text) == ("stop", "👌")
    assert c.token_ids == _tokens_until(tok, full.token_ids, "🏼👌") and len(c.token_ids) == 9
    # Cut by length inside a character: the partial bytes decode to one U+FFFD at the end, nothing before.
    cut = _greedy(engine, prompt, max_new_tokens=7)
    assert cut.finish_reason == "length" and cut.text == "👌🏼\ufffd"


def test_mc_forks_from_the_middle_of_a_real_response_prefill_at_most_one_page(engine, smol, chat):
    model, tok = smol
    prompt = chat("Name three colors and describe each in a few words.")
    response = _greedy(engine, prompt, max_new_tokens=40).token_ids
    assert len(response) >= 30
    rollouts = SamplingParams(n=4, temperature=0.8, max_new_tokens=8, seed=7)
    cold = Engine(model, tok, page_size=PAGE, kv_cache_tokens=4096, prefix_cache=False)
    for j in (1, 13, 29):
        state = prompt + response[:j]
        engine.stats.reset()
        forked = engine.generate([state], rollouts)[0]
        assert engine.stats.prefill_tokens < PAGE
        assert engine.stats.prefill_tokens == 1  # the state's last token; the rest came from the cache
        assert engine.stats.forked_sequences == 3
        assert all(c.cached_tokens == len(state) - 1 for c in forked)
        cold.stats.reset()
        expected = cold.generate([state], rollouts)[0]
        assert cold.stats.prefill_tokens == len(state)
        assert [c.token_ids for c in forked] == [c.token_ids for c in expected]
