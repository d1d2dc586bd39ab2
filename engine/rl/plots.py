"""Training curves as PNG: one run's panels, or several runs compared.

    python -m engine.rl.plots runs/vineppo runs/ppo runs/grpo --out compare.png
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

PANELS = [
    ("reward_mean", "train reward (sampled)"),
    ("eval_accuracy", "held-out accuracy"),
    ("kl_ref", "KL to reference (k3)"),
    ("entropy", "entropy (nats/token)"),
    ("clip_frac", "clip fraction"),
    ("adv_abs_mean", "|advantage| (before whitening)"),
]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Held-out accuracy and train reward of several runs, against iterations and wall-clock minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if len(args.runs) == 1:
        print(plot_metrics(args.runs[0], args.out))
    else:
        print(plot_comparison(args.runs, args.out, args.labels))


if __name__ == "__main__":
    main()
