"""bench.host_overhead runs end to end at a tiny size, reports every phase, and rejects bad sizes."""
from __future__ import annotations

import json

import pytest

from bench import host_overhead


def test_a_tiny_run_reports_every_workload_and_phase(tmp_path):
    out = tmp_path / "host.json"
    report = host_overhead.main(["--rows", "6", "--new-tokens", "3", "--episodes", "2", "--states", "4", "--k", "2",
                                 "--prompt-len", "8", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["workload"]: r for r in report["results"]}
    assert set(rows) == {"plain", "mc", "mc+stop", "mc+stop+seed"}
    assert rows["plain"]["sampled_rows"] == 6 * 3
    for r in rows.values():
        assert r["steps"] >= 3 and r["host_ms_per_step"] > 0 and r["steady_ms_per_step"] > 0
        assert set(r["phases_ms_per_step"]) == {"schedule", "prepare", "forward", "sample", "postprocess", "wait"}
    assert rows["mc"]["prefill_tokens"] == 4  # the states' prefixes come from the cache: one token each


def test_the_overlap_report_covers_each_workload_at_each_simulated_device_time(tmp_path):
    out = tmp_path / "overlap.json"
    report = host_overhead.main(["--overlap", "--rows", "6", "--new-tokens", "3", "--episodes", "2", "--states", "4",
                                 "--k", "2", "--prompt-len", "8", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["overlap"]
    assert [(r["workload"], r["point"]) for r in rows] == [
        (w, p) for w in ("plain", "mc", "mc+stop+seed") for p in ("D=0", "D=host", "D=3xhost")]
    for r in rows:
        factor = {"D=0": 0.0, "D=host": 1.0, "D=3xhost": 3.0}[r["point"]]
        assert r["device_ms"] == pytest.approx(factor * r["host_ms"])
        assert r["host_ms"] > 0 and r["host_call_ms"] > 0
        if factor:  # the simulated device's measured time: never shorter than the sleep asked for
            assert r["device_slept_ms"] >= 0.999 * r["device_ms"]
        else:
            assert r["device_slept_ms"] == 0
        assert r["ratio"] == pytest.approx(r["overlap_ms"] / r["serial_ms"])
        assert r["bound_ms"] == pytest.approx(max(r["host_ms"], r["device_slept_ms"]))
        expected = r["ratio"] if r["check"] == "overlap/serial" else r["overlap_ms"] / r["device_slept_ms"]
        assert r["value"] == pytest.approx(expected)
        assert r["met"] == (r["value"] <= r["limit"])


def test_the_free_sampler_what_if_runs_and_says_so(tmp_path, monkeypatch):
    import engine.runtime.engine as engine_module

    monkeypatch.setattr(engine_module, "sample", engine_module.sample)  # restored after the test
    report = host_overhead.main(["--overlap", "--free-sampler", "--workloads", "plain", "--rows", "4",
                                 "--new-tokens", "3", "--repeats", "1", "--out", str(tmp_path / "free.json")])
    assert "sampling replaced by an argmax" in report["mode"]
    assert engine_module.sample.__name__ == "argmax_sample"
    assert len(report["overlap"]) == 3


@pytest.mark.parametrize("flag", ["--rows", "--new-tokens", "--k", "--states", "--repeats"])
def test_sizes_below_one_are_errors(flag, capsys):
    with pytest.raises(SystemExit):
        host_overhead.main([flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_real_model_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        host_overhead.main(["--real-model"])
    assert "--real-model needs a CUDA device" in capsys.readouterr().err
