"""The one-command GPU suite (`make gpu-check`): GPU tests and benchmarks in one call, results committed.

    python -m bench.gpu_check              # on a CUDA machine; without one it exits 2 at once
    python -m bench.gpu_check --dry-run    # print the steps (any machine)

GPU time is scarce (a lent machine, minutes per issue), so everything worth measuring on one
runs from here in a fixed order, each step under its own time limit, and what a step prints
and writes is kept even when a later one fails or runs out of time:

1. `pytest -m gpu` (model, engine with both backends and CUDA graphs, fused log-probs,
   attention kernels at real shapes);
2. `bench.host_overhead --real-model` at a 1.1B Llama shape (random weights, bench/configs/):
   host vs device ms per step of the RL workloads; then with `--overlap`: the Engine's overlap
   off and on (the host's time hidden behind the device's, bound max(host, device));
3. `bench.attention` (decode, shared-prefix and the episode-tree cascade vs the torch
   reference, SDPA, plain decode, % of HBM);
4. `bench.logprob` (fused log-probs vs materialised logits, and Liger when installed);
5. `bench.norm` (fused residual add + RMSNorm vs the torch ops, kernels per layer);
6. `bench.branching` on the VinePPO workload at the 1.1B shape: engine vs prefix cache off vs
   transformers `generate`.

Each bench prints its ratios against the baseline of the same run. Results: every step's JSON
and log under bench/results/<date>-<gpu>/, one merged bench/results/<date>-<gpu>.json, and a
dated section appended to bench/RESULTS.md (device, date, command, each step's table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "configs"


def steps(out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every step, in order."""
    py = [sys.executable]
    llama = str(CONFIGS / "llama-1.1b.json")
    return [
        ("pytest-gpu", py + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 150),
        ("host-overhead-llama-1.1b", py + ["-m", "bench.host_overhead", "--real-model", "--config", llama,
                                           "--repeats", "1", "--out", str(out / "host-overhead-llama-1.1b.json")], 75),
        ("overlap-llama-1.1b", py + ["-m", "bench.host_overhead", "--real-model", "--overlap", "--config", llama,
                                     "--repeats", "1", "--workloads", "mc,mc+stop+seed",
                                     "--out", str(out / "overlap-llama-1.1b.json")], 60),
        ("attention", py + ["-m", "bench.attention", "--no-flex", "--out", str(out / "attention.json")], 75),
        ("logprob", py + ["-m", "bench.logprob", "--out", str(out / "logprob.json")], 55),
        ("norm", py + ["-m", "bench.norm", "--quick", "--out", str(out / "norm.json")], 15),
        ("branching-llama-1.1b", py + ["-m", "bench.branching", "--config", llama, "--prompts", "4",
                                       "--response-len", "128", "--state-every", "32", "--max-num-seqs", "512",
                                       "--out", str(out / "branching-llama-1.1b.json")], 100),
    ]


def _stamp(device_name: str) -> str:
    return time.strftime("%Y-%m-%d") + "-" + "".join(c if c.isalnum() else "-" for c in device_name).strip("-")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the steps and their limits, run nothing")
    ap.add_argument("--only", nargs="+", default=None, help="run only these steps (names as --dry-run prints)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="markdown file to append to")
    args = ap.parse_args(argv)
    plan = steps(ROOT / "bench" / "results" / "<date>-<gpu>")
    names = [name for name, _, _ in plan]
    bad = [n for n in (args.only or []) if n not in names]
    if bad:
        ap.error(f"unknown step(s) {bad}; steps: {', '.join(names)}")
    if args.dry_run:
        for name, cmd, limit in plan:
            print(f"{name:<28} {limit:>4} s  {' '.join(cmd)}")
        print(f"total limit: {sum(limit for _, _, limit in plan)} s")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("make gpu-check needs a CUDA device: torch.cuda.is_available() is False on this machine",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    stamp = _stamp(device)
    out = ROOT / "bench" / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    merged: dict = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "steps": {}}
    section = [f"\n## GPU suite, {device}, {merged['date']}\n",
               f"- Command: `make gpu-check` (python -m bench.gpu_check); torch {torch.__version__}\n"]
    for name, cmd, limit in steps(out):
        if args.only and name not in args.only:
            continue
        print(f"== {name} (limit {limit} s): {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        seconds = time.perf_counter() - t0
        (out / f"{name}.log").write_text(text)
        print(_tail(text, 25), flush=True)
        step = {"rc": rc, "seconds": round(seconds, 1), "command": " ".join(cmd)}
        result = out / f"{name}.json"
        if result.exists():
            step["result"] = json.loads(result.read_text())
        merged["steps"][name] = step
        section.append(f"\n### {name}: exit {rc}, {seconds:.0f} s\n\n```\n{_tail(text)}\n```\n")
        (ROOT / "bench" / "results" / f"{stamp}.json").write_text(json.dumps(merged, indent=2))
    results = Path(args.results)
    if not results.exists():
        results.write_text("# Measured results\n")
    with results.open("a") as f:
        f.write("".join(section))
    failed = [n for n, s in merged["steps"].items() if s["rc"] != 0]
    print(f"\nwrote bench/results/{stamp}.json and a section of {results}; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
