"""Training curves: one run's panels, several runs compared, and groups of seeds aggregated (mean ± sd)."""
from __future__ import annotations

import json
import math

import pytest

from engine.rl.plots import (_elapsed, aggregate_runs, main, plot_comparison, plot_groups, plot_metrics,
                             read_metrics)


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


# ---- seeds aggregated per group -------------------------------------------------------------------------------

def _seed(path, accs, minutes_per_iter=1.0):
    """A run dir whose evaluation rows carry `accs` ({iteration: accuracy}); every row costs `minutes_per_iter`."""
    path.mkdir(parents=True)
    rows = []
    for i in range(max(accs) + 1):
        row = {"iteration": i, "reward_mean": 0.1 * i, "time_sample": 60.0 * minutes_per_iter}
        if i in accs:
            row.update(eval_accuracy=accs[i], eval_stderr=0.05)
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _three_seeds(tmp_path):
    """Seeds with evals at 0, 2, 4; seed 2 lacks the eval at 2, so only 0 and 4 are common."""
    return [_seed(tmp_path / "s0", {0: 0.2, 2: 0.5, 4: 0.6}, 1.0),
            _seed(tmp_path / "s1", {0: 0.4, 2: 0.7, 4: 0.8}, 2.0),
            _seed(tmp_path / "s2", {0: 0.3, 4: 0.4}, 3.0)]


def test_aggregate_runs_mean_sd_min_max_minutes_and_final(tmp_path):
    agg = aggregate_runs({"a": _three_seeds(tmp_path)})
    g = agg["a"]
    assert g["seeds"] == 3 and g["key"] == "eval_accuracy"
    assert [p["iteration"] for p in g["points"]] == [0, 4]   # 2 is missing in seed 2
    p0, p4 = g["points"]
    # iteration 0: 0.2, 0.4, 0.3 -> mean 0.3, sample sd 0.1; minutes 1, 2, 3 -> mean 2
    assert p0["mean"] == pytest.approx(0.3) and p0["sd"] == pytest.approx(0.1)
    assert (p0["min"], p0["max"], p0["n"]) == (0.2, 0.4, 3)
    assert p0["minutes"] == pytest.approx(2.0)
    # iteration 4: 0.6, 0.8, 0.4 -> mean 0.6, sd 0.2; cumulative minutes 5, 10, 15 -> mean 10
    assert p4["mean"] == pytest.approx(0.6) and p4["sd"] == pytest.approx(0.2)
    assert (p4["min"], p4["max"]) == (0.4, 0.8)
    assert p4["minutes"] == pytest.approx(10.0)
    final = g["final"]
    assert final["iteration"] == 4 and final["values"] == pytest.approx([0.6, 0.8, 0.4])
    assert final["mean"] == pytest.approx(0.6) and final["sd"] == pytest.approx(0.2)
    assert final["stderr"] == pytest.approx(0.2 / math.sqrt(3))


def test_aggregate_runs_single_seed_has_zero_sd_and_other_key(tmp_path):
    run = _seed(tmp_path / "only", {0: 0.1, 3: 0.9})
    g = aggregate_runs({"one": [run]})["one"]
    assert [p["sd"] for p in g["points"]] == [0.0, 0.0]
    assert g["final"] == {"iteration": 3, "values": [0.9], "mean": 0.9, "sd": 0.0, "stderr": 0.0}
    rewards = aggregate_runs({"one": [run]}, key="reward_mean")["one"]
    assert [p["iteration"] for p in rewards["points"]] == [0, 1, 2, 3]
    assert rewards["final"]["mean"] == pytest.approx(0.3)


def test_aggregate_runs_errors(tmp_path):
    a = _seed(tmp_path / "a", {0: 0.1, 2: 0.2})
    b = _seed(tmp_path / "b", {1: 0.3, 3: 0.4})
    with pytest.raises(ValueError, match="'disjoint'"):
        aggregate_runs({"ok": [a], "disjoint": [a, b]})
    with pytest.raises(ValueError, match="'empty'"):
        aggregate_runs({"empty": []})
    missing = tmp_path / "nometrics"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="nometrics"):
        aggregate_runs({"x": [a, missing]})


def test_plot_groups_writes_png_and_json(tmp_path):
    seeds = _three_seeds(tmp_path)
    other = [_seed(tmp_path / "o0", {0: 0.1, 4: 0.3}), _seed(tmp_path / "o1", {0: 0.2, 4: 0.5})]
    png = plot_groups({"a": seeds, "b": other}, tmp_path / "groups.png")
    assert png == tmp_path / "groups.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads((tmp_path / "groups.json").read_text())
    assert set(data) == {"a", "b"}
    assert data["a"]["final"]["mean"] == pytest.approx(0.6)
    assert data["b"]["final"]["values"] == pytest.approx([0.3, 0.5])


def test_cli_group(tmp_path, capsys):
    s0, s1, s2 = _three_seeds(tmp_path)
    o0 = _seed(tmp_path / "o0", {0: 0.1, 4: 0.3})
    out = tmp_path / "cli.png"
    main(["--group", "a", str(s0), str(s1), str(s2), "--group", "b", str(o0), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["a"]["seeds"] == 3 and data["b"]["seeds"] == 1
    assert data["a"]["runs"] == [str(s0), str(s1), str(s2)]


def test_cli_group_usage_errors(tmp_path, capsys):
    s0 = _seed(tmp_path / "s0", {0: 0.1})
    out = str(tmp_path / "x.png")
    for argv in (["--group", "a", "--out", out],                       # label without runs
                 [str(s0), "--group", "a", str(s0), "--out", out],     # positional runs and --group
                 ["--out", out]):                                      # nothing to plot
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs a label and at least one run" in err and "not both" in err
    assert not (tmp_path / "x.png").exists()
