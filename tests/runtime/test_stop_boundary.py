"""Stop strings across the prompt/generation boundary, through the Engine (VinePPO's MC rollouts)."""
from __future__ import annotations

import pytest

import engine.runtime.engine as engine_module
from engine import Engine, SamplingParams

STOP = "\n\n\nProblem:"


@pytest.fixture
def scripted(monkeypatch):
    """script(text): the Engine's sampler emits the char tokens of `text` in order (then repeats the last)."""
    real = engine_module.sample

    def install(tok, text: str) -> None:
        ids = tok.encode(text, add_special_tokens=False)
        calls = iter(range(1 << 30))

        def fake(logits, batch, **kwargs):
            tokens, logprobs = real(logits, batch, **kwargs)
            i = next(calls)
            return [ids[min(i, len(ids) - 1)]] * len(tokens), logprobs

        monkeypatch.setattr(engine_module, "sample", fake)

    return install


def _generate(model, tok, prompt: str, **params):
    engine = Engine(model, tok, page_size=4, kv_cache_tokens=1024)
    sp = SamplingParams(**{"temperature": 0, "max_new_tokens": 30, "ignore_eos": True, **params})
    return engine.generate([tok.encode(prompt)], sp)[0][0]


def test_a_stop_string_that_starts_in_the_prompt_stops_the_generation(tiny, scripted):
    model, tok = tiny
    scripted(tok, "\nProblem: what is 2+2?\nSolution: 4")
    out = _generate(model, tok, "Problem: 1+1?\nSolution: 2\n\n", stop=[STOP])
    assert out.finish_reason == "stop"
    assert tok.decode(out.token_ids) == "\nProblem:"  # up to the token that completes the stop string
    assert out.text == ""  # the stop string starts in the prompt: no generated text precedes it


def test_the_text_is_cut_where_the_earliest_counted_match_starts(tiny, scripted):
    model, tok = tiny
    # STOP started in the prompt but is not complete when "Problem" completes: the cut is at "Problem".
    scripted(tok, "\n\nProblem: 2\n\nmore")
    out = _generate(model, tok, "Solution: 2\n", stop=[STOP, "Problem"])
    assert out.finish_reason == "stop" and tok.decode(out.token_ids) == "\n\nProblem"
    assert out.text == "\n\n"
    # Two matches complete on the same token: the one that starts in the prompt is earlier.
    scripted(tok, "\nProblem: x")
    out = _generate(model, tok, "Solution: 2\n\n", stop=["Problem:", STOP])
    assert out.finish_reason == "stop" and tok.decode(out.token_ids) == "\nProblem:" and out.text == ""
    # A match that lies in the generation is cut as before.
    scripted(tok, "ab\nProblem: x")
    out = _generate(model, tok, "Solution: 2\n\n", stop=["b\nProb", STOP])
    assert out.finish_reason == "stop" and tok.decode(out.token_ids) == "ab\nProb" and out.text == "a"


def test_a_stop_string_inside_the_prompt_does_not_stop(tiny, scripted):
    model, tok = tiny
    scripted(tok, " 4\nSolution: done")
    out = _generate(model, tok, "Answer.\n\n\nProblem: 2+2?", stop=[STOP], max_new_tokens=12)
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert out.text == " 4\nSolution:"
    # the same stop string generated again does stop, cut as before
    scripted(tok, " 4\n\n\nProblem: next")
    out = _generate(model, tok, "Answer.\n\n\nProblem: 2+2?", stop=[STOP])
    assert out.finish_reason == "stop" and out.text == " 4"
