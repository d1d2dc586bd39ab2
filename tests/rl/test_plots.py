"""Training curves: one run's panels and the comparison of several runs are written as PNGs."""
from __future__ import annotations

import json

from engine.rl.plots import _elapsed, plot_comparison, plot_metrics, read_metrics


def _run(path, scale):
    path.mkdir()
    rows = [{"iteration": 0, "eval_accuracy": 0.5, "eval_stderr": 0.05, "time_eval": 6.0}]
    rows += [{"iteration": i, "reward_mean": scale * i, "kl_ref": 0.01 * i, "entropy": 0.3, "clip_frac": 0.0,
              "adv_abs_mean": 0.1, "time_sample": 30.0, "time_update": 30.0,
              **({"eval_accuracy": 0.5 + scale * i, "eval_stderr": 0.05} if i % 2 == 0 else {})} for i in range(1, 5)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_single_run_and_comparison_plots(tmp_path):
    a, b = _run(tmp_path / "a", 0.1), _run(tmp_path / "b", 0.05)
    assert read_metrics(a)[1]["reward_mean"] == 0.1
    assert [round(r["minutes"], 3) for r in _elapsed(read_metrics(a))] == [0.1, 1.1, 2.1, 3.1, 4.1]
    single = plot_metrics(a, tmp_path / "one.png", title="t")
    both = plot_comparison([a, b], tmp_path / "cmp.png", labels=["a", "b"])
    for png in (single, both):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
