"""Training curves as PNG: one run's panels, several runs compared, or groups of seeds aggregated.

    python -m engine.rl.plots runs/vineppo --out vineppo.png
    python -m engine.rl.plots runs/vineppo runs/ppo runs/grpo --out compare.png
    python -m engine.rl.plots --group vineppo runs/cmp/vineppo-s0 runs/cmp/vineppo-s1 runs/cmp/vineppo-s2 --group grpo runs/cmp/grpo-s0 runs/cmp/grpo-s1 runs/cmp/grpo-s2 --out docs/img/compare.png

With --group (repeatable; the first value is the label, the rest its runs) each group is drawn as the
mean over its seeds with a ±1 sd band, and the aggregate is also written as JSON next to the PNG.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

PANELS = [
    ("reward_mean", "train reward (sampled)"),
    ("eval_accuracy", "held-out accuracy"),
    ("kl_ref", "KL to reference (k3)"),
    ("entropy", "entropy (nats/token)"),
    ("clip_frac", "clip fraction"),
    ("adv_abs_mean", "|advantage| (before whitening)"),
]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure; its path."""
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str, x: str = "iteration") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _elapsed(rows: list[dict]) -> list[dict]:
    """Add `minutes`: cumulative wall-clock of the phases up to each row."""
    total, out = 0.0, []
    for r in rows:
        total += sum(v for k, v in r.items() if k.startswith("time_") and isinstance(v, (int, float)))
        out.append({**r, "minutes": total / 60})
    return out


def plot_metrics(metrics: str | Path, out: str | Path, title: str = "") -> Path:
    """A grid of the run's main curves against the iteration."""
    plt = pyplot()

    rows = read_metrics(metrics)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, label) in zip(axes.flat, PANELS):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        if key == "eval_accuracy":
            _, errs = _series(rows, "eval_stderr")
            if len(errs) == len(ys):
                ax.fill_between(xs, [y - e for y, e in zip(ys, errs)], [y + e for y, e in zip(ys, errs)], alpha=0.2)
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    out = save_figure(fig, out)
    return out


def plot_comparison(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Held-out accuracy and train reward of several runs, against iterations and wall-clock minutes."""
    plt = pyplot()

    labels = list(labels) if labels else [Path(r).name for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, label in zip(runs, labels):
        rows = _elapsed(read_metrics(run))
        for ax, (key, x) in zip(axes, [("eval_accuracy", "iteration"), ("eval_accuracy", "minutes"),
                                       ("reward_mean", "iteration")]):
            xs, ys = _series(rows, key, x)
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    for ax, (title, x) in zip(axes, [("held-out accuracy", "iteration"), ("held-out accuracy", "wall-clock minutes"),
                                     ("train reward (sampled)", "iteration")]):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend()
    out = save_figure(fig, out)
    return out


def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _by_iteration(run: str | Path, key: str) -> dict[int, tuple[float, float]]:
    """Iteration -> (value of `key`, cumulative minutes) over the rows that carry `key`."""
    rows = _elapsed(read_metrics(run))
    return {r["iteration"]: (float(r[key]), r["minutes"]) for r in rows
            if r.get(key) is not None and r.get("iteration") is not None}


def aggregate_runs(groups: Mapping[str, Sequence[str | Path]], key: str = "eval_accuracy") -> dict:
    """Per group: mean/sd/min/max of `key` over seeds at each iteration common to all its runs, and the final values.

    Returns {label: {"key", "runs", "seeds", "points": [{"iteration", "mean", "sd", "min", "max", "n", "minutes"}],
    "final": {"iteration", "values", "mean", "sd", "stderr"}}}; sd is the sample sd over seeds (0 for one seed).
    """
    out: dict = {}
    for label, runs in groups.items():
        if not runs:
            raise ValueError(f"group {label!r} has no runs")
        series = [_by_iteration(run, key) for run in runs]
        common = sorted(set.intersection(*(set(s) for s in series)))
        if not common:
            raise ValueError(f"group {label!r}: its runs share no iteration with {key!r}")
        points = []
        for it in common:
            vals = [s[it][0] for s in series]
            points.append({"iteration": it, "mean": statistics.fmean(vals), "sd": _sd(vals), "min": min(vals),
                           "max": max(vals), "n": len(vals), "minutes": statistics.fmean(s[it][1] for s in series)})
        last = common[-1]
        finals = [s[last][0] for s in series]
        sd = _sd(finals)
        out[label] = {"key": key, "runs": [str(r) for r in runs], "seeds": len(runs), "points": points,
                      "final": {"iteration": last, "values": finals, "mean": statistics.fmean(finals), "sd": sd,
                                "stderr": sd / math.sqrt(len(finals))}}
    return out


def plot_groups(groups: Mapping[str, Sequence[str | Path]], out: str | Path, key: str = "eval_accuracy") -> Path:
    """Mean of `key` over each group's seeds with a ±1 sd band (min/max dotted), against iterations and minutes.

    The aggregate is written as JSON next to the PNG (same stem, .json). Returns the PNG path.
    """
    plt = pyplot()

    agg = aggregate_runs(groups, key)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, g in agg.items():
        pts = g["points"]
        mean = [p["mean"] for p in pts]
        lo = [p["mean"] - p["sd"] for p in pts]
        hi = [p["mean"] + p["sd"] for p in pts]
        for ax, x in zip(axes, ["iteration", "minutes"]):
            xs = [p[x] for p in pts]
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={g['seeds']})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
            ax.plot(xs, [p["min"] for p in pts], ls=":", lw=0.8, color=line.get_color())
            ax.plot(xs, [p["max"] for p in pts], ls=":", lw=0.8, color=line.get_color())
    seeds = sorted({g["seeds"] for g in agg.values()})
    n = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    for ax, x in zip(axes, ["iteration", "wall-clock minutes"]):
        ax.set_title(f"{key}: mean over {n} seeds, band ±1 sd")
        ax.set_xlabel(x)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    out = save_figure(fig, out)
    out.with_suffix(".json").write_text(json.dumps(agg, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run directories (or metrics.jsonl files)")
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--group", action="append", nargs="+", default=None, metavar=("LABEL", "RUN"),
                    help="LABEL RUN [RUN ...]: seeds aggregated as mean ± sd (repeatable)")
    ap.add_argument("--key", default="eval_accuracy", help="metric aggregated with --group")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.group:
        if args.runs:
            ap.error("give either positional runs or --group, not both")
        for g in args.group:
            if len(g) < 2:
                ap.error(f"--group {g[0]}: needs a label and at least one run")
        groups = {g[0]: g[1:] for g in args.group}
        if len(groups) < len(args.group):
            ap.error("--group labels must be distinct")
        print(plot_groups(groups, args.out, args.key))
        return
    if not args.runs:
        ap.error("give run directories or --group LABEL RUN [RUN ...]")
    if len(args.runs) == 1:
        print(plot_metrics(args.runs[0], args.out))
    else:
        print(plot_comparison(args.runs, args.out, args.labels))


if __name__ == "__main__":
    main()
