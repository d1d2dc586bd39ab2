"""StepTimes: the phases' sums, and the steady pace from the first step's end to the last's."""
from __future__ import annotations

import time

import pytest

from engine import Engine, SamplingParams, load_model
from engine.runtime.params import StepTimes


def test_the_steady_pace_spans_the_steps_after_the_first():
    t = StepTimes()
    assert t.steady_step_s() is None
    t.add(0.1, 0.2, 0.3, 0.4, 0.5, wait=0.6, done=10.0)
    assert t.steady_step_s() is None  # one step: no pace yet
    t.add(0.1, 0.2, 0.3, 0.4, 0.5, done=10.5)
    t.add(0.1, 0.2, 0.3, 0.4, 0.5, done=11.5)
    assert t.steady_step_s() == pytest.approx(0.75)  # (11.5 - 10.0) / 2
    assert t.as_dict() == pytest.approx(dict(steps=3, schedule=0.3, prepare=0.6, forward=0.9, sample=1.2,
                                             postprocess=1.5, wait=0.6))
    t.reset()
    assert t.steps == 0 and t.first_done is None and t.last_done is None and t.steady_step_s() is None


@pytest.mark.parametrize("overlap", [False, True])
def test_an_engine_records_its_steps_pace(tiny_policy_dir, overlap):
    model, _ = load_model(tiny_policy_dir)
    engine = Engine(model, overlap=overlap)
    t0 = time.perf_counter()
    engine.generate([[1, 2, 3], [4, 5]], SamplingParams(n=2, temperature=0.7, max_new_tokens=6, ignore_eos=True))
    wall = time.perf_counter() - t0
    times = engine.step_times
    assert times.steps == engine.stats.forward_steps == 6
    assert t0 < times.first_done < times.last_done < t0 + wall
    assert 0 < times.steady_step_s() <= wall / 5
