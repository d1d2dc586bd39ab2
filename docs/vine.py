"""Draw "the vine": what VinePPO does on this engine, as a PNG.

One sampled response is a chain of steps after the prompt. At each state s_i (the prompt,
prompt + step 1, ...) the engine forks K = 3 continuations off the cached KV of the shared
prefix and scores them; V(s_i) is the mean of their rewards, and the advantage of step i is
A_i = V(s_i) - V(s_{i-1}). The final state is terminal: its value is the response's reward.

    python docs/vine.py --out docs/img/vine.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, PathPatch  # noqa: E402
from matplotlib.path import Path as MPath  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

PROMPT = "prompt\n3 + 7 − 4 = ?"
STEPS = ["3+7=10", "10-4=6", "#### 6"]
ROLLOUTS = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # rewards of the K=3 forks at s_0, s_1, s_2
REWARD = 1  # the sampled response's own reward: V of the terminal state

GREEN, RED, INK, GREY = "#2e7d32", "#c62828", "#263238", "#78909c"
BOX_W, GAP, Y_BOX, BOX_H = 1.45, 0.75, 3.0, 0.45
Y_BAND, BAND_H = 2.05, 0.3  # the KV band: bottom edge and height
FAN_DX, FAN_YS = 0.95, (1.55, 1.15, 0.75)  # where each fork ends, relative to its state


def box(ax: plt.Axes, x: float, text: str, face: str, size: float = 10) -> None:
    """A rounded box of width BOX_W with its left edge at x, on the chain's row."""
    ax.add_patch(FancyBboxPatch((x, Y_BOX), BOX_W, BOX_H, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=face, ec=INK, lw=1.0))
    ax.text(x + BOX_W / 2, Y_BOX + BOX_H / 2, text, ha="center", va="center", fontsize=size,
            family="monospace" if "\n" not in text else None, color=INK)


def fork(ax: plt.Axes, x0: float, y_end: float, reward: int) -> None:
    """A thin continuation from the state at (x0, Y_BAND): down, then right, then its mark."""
    x1 = x0 + FAN_DX
    path = MPath([(x0, Y_BAND), (x0, y_end), (x0 + 0.15, y_end), (x1, y_end)],
                 [MPath.MOVETO, MPath.CURVE3, MPath.CURVE3, MPath.LINETO])
    ax.add_patch(PathPatch(path, fc="none", ec=GREY, lw=1.1))
    for k in range(4):  # a few token dots along the sampled continuation
        ax.plot(x0 + 0.3 + 0.16 * k, y_end, "o", ms=2.2, color=GREY)
    ax.text(x1 + 0.05, y_end, "✓" if reward else "✗", ha="left", va="center", fontsize=12,
            color=GREEN if reward else RED, fontweight="bold")


def draw(out: Path) -> None:
    """Draw the figure and save it to out."""
    fig, ax = plt.subplots(figsize=(10, 4), dpi=150)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    ax.text(5, 3.78, "VinePPO on KV forks", ha="center", va="center", fontsize=14, fontweight="bold",
            color=INK)

    x0 = 0.25
    lefts = [x0 + i * (BOX_W + GAP) for i in range(len(STEPS) + 1)]
    states = [left + BOX_W + GAP / 2 for left in lefts[:-1]]  # s_0 .. s_{T-1}: the gaps
    end = lefts[-1] + BOX_W  # s_T: the end of the response

    box(ax, lefts[0], PROMPT, "#eceff1", size=9)
    for left, step in zip(lefts[1:], STEPS):
        box(ax, left, step, "#e3f2fd")
    for left, right in zip(lefts[:-1], lefts[1:]):
        ax.annotate("", (right, Y_BOX + BOX_H / 2), (left + BOX_W, Y_BOX + BOX_H / 2),
                    arrowprops=dict(arrowstyle="-|>", color=INK, lw=0.9, shrinkA=0, shrinkB=1))

    # The shared prefix's KV, read by every fork.
    ax.add_patch(FancyBboxPatch((lefts[0], Y_BAND), end - lefts[0], BAND_H,
                                boxstyle="round,pad=0,rounding_size=0.06", fc="#ffe0b2", ec="#fb8c00",
                                lw=0.8, alpha=0.9))
    ax.text((lefts[0] + end) / 2, Y_BAND + BAND_H / 2,
            "KV in the radix cache: each fork reads the shared prefix, one token of prefill per state",
            ha="center", va="center", fontsize=8.5, color="#6d4c41", style="italic")

    values = [sum(r) / len(r) for r in ROLLOUTS] + [REWARD]
    for i, (xs, rewards) in enumerate(zip(states, ROLLOUTS)):
        ax.plot([xs, xs], [Y_BAND + BAND_H, Y_BOX], ls=":", color=INK, lw=0.9)  # the state's prefix
        for y_end, r in zip(FAN_YS, rewards):
            fork(ax, xs, y_end, r)
        ax.plot(xs, Y_BAND, "o", ms=6, mfc="white", mec=INK, mew=1.3, zorder=5)
        ax.text(xs - 0.08, Y_BAND - 0.1, rf"$s_{i}$", ha="right", va="top", fontsize=10, color=INK)
        mean = "+".join(map(str, rewards))
        ax.text(xs + FAN_DX / 2 + 0.1, 0.38, rf"$V(s_{i}) = ({mean})/3 = {values[i]:.2f}$",
                ha="center", va="center", fontsize=8.5, color=INK)

    # The terminal state: its value is the response's own reward, no forks needed.
    ax.plot(end, Y_BAND, "o", ms=6, mfc="white", mec=INK, mew=1.3, zorder=5)
    t = len(STEPS)
    ax.text(end + 0.08, Y_BAND - 0.1, rf"$s_{t}$: end of response", ha="left", va="top", fontsize=9,
            color=INK)
    ax.text(end + 0.12, Y_BOX + BOX_H / 2, "✓" if REWARD else "✗", ha="left", va="center", fontsize=14,
            color=GREEN if REWARD else RED, fontweight="bold")
    ax.text(end + 0.42, Y_BOX + BOX_H / 2, f"reward {REWARD}", ha="left", va="center", fontsize=9,
            color=INK)
    ax.text(end + 0.1, 0.38, rf"$V(s_{t}) = R = {REWARD}$", ha="left", va="center", fontsize=8.5, color=INK)
    ax.text(end + 0.1, 1.15, "K = 3 forks per state\n✓ reward 1   ✗ reward 0", ha="left", va="center",
            fontsize=8, color=GREY, linespacing=1.5)

    # The advantage of each step: how much it moved the value.
    for i, left in enumerate(lefts[1:], start=1):
        a = values[i] - values[i - 1]
        ax.text(left + BOX_W / 2, Y_BOX - 0.13, rf"$A_{i} = V(s_{i}) - V(s_{i - 1})$", ha="center", va="center",
                fontsize=8, color=INK)
        ax.text(left + BOX_W / 2, Y_BOX - 0.33, f"= {a:+.2f}", ha="center", va="center", fontsize=9,
                fontweight="bold", color=GREEN if a > 0 else RED if a < 0 else GREY)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "vine.png",
                        help="where to write the PNG (default: docs/img/vine.png in this repo)")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
