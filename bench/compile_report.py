"""Registers, spills and shared memory of every Triton kernel, compiled for A100 and H100 without a GPU.

    python -m bench.compile_report                              # full matrix: sm_80 + sm_90, bf16 + fp32
    python -m bench.compile_report --archs sm90 --dtypes bfloat16 --ops decode extend
    python -m bench.compile_report --cache-dir /tmp/triton-cold   # a cold Triton cache (times real compiles)

Why: the kernels run under the Triton interpreter on CI machines, which accepts code that
the GPU compiler rejects and says nothing about register pressure. Triton's compiler and its
bundled ptxas run on a CPU, so every kernel can be compiled for sm_80 / sm_90 with the tiles its
launcher picks on CUDA (engine.kernels.aot captures the launchers' own launches), and the cubin says
what it costs: registers per thread, bytes spilled to local memory, shared memory per block
(dynamic + static, against the per-block opt-in maximum: 163 KiB on sm_80, 227 KiB on sm_90).

Matrix (engine.kernels.aot.full_matrix): decode (one split; 64 splits + merge; sliding window),
shared-prefix decode, extend (long chunk, sliding window, 16-token chunk), store_kv,
merge_states and fused log-probs (with and without entropy); head_dim 64 / 128, 1 / 4 / 8
query heads per KV head, page size 16 / 32 where the op's code depends on them; bf16 and fp32
inputs. Identical compiles are done once.

Results: a table on stdout (one row per distinct compile), JSON in
bench/results/compile_report.json, and the section "## Kernel resource usage (AOT, no GPU)"
of bench/RESULTS.md (replaced if present). A spill, a compile error or shared memory over the
limit is listed as a problem (the exit status stays 0: this is a report; the test
tests/kernels/test_aot_compile.py is the gate).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from engine.kernels import aot

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compile_report.json"
RESULTS_MD = HERE / "RESULTS.md"
SECTION = "## Kernel resource usage (AOT, no GPU)"


def compiles_of(results: dict[str, dict]) -> list[dict]:
    """Distinct compiles (a kernel config shared by several scenarios appears once), sorted."""
    seen: dict[tuple, dict] = {}
    for r in results.values():
        for k in r["kernels"]:
            key = (k.get("arch"), k["kernel"], k.get("config"), k.get("error") if k.get("config") is None else None)
            seen.setdefault(key, dict(k, scenarios=k.get("scenarios", [r["label"]])))
    return sorted(seen.values(), key=lambda k: (k.get("arch") or "", k["kernel"], k.get("config") or ""))


def kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def print_table(compiles: list[dict]) -> None:
    head = (f"{'arch':<5} {'kernel':<21} {'regs':>4} {'spill st/ld B':>13} {'smem KiB':>8} {'limit':>5} "
            f"{'s':>5}  {'first scenario (+ others)':<40} config")
    print(head)
    print("-" * len(head))
    for k in compiles:
        first = k["scenarios"][0] + (f" (+{len(k['scenarios']) - 1})" if len(k["scenarios"]) > 1 else "")
        if k.get("error"):
            print(f"{k.get('arch', '-'):<5} {k['kernel']:<21} {'ERROR':>4} {'':>13} {'':>8} {'':>5} {'':>5}  "
                  f"{first:<40} {k.get('config', '')}\n      {k['error'].splitlines()[0][:200]}")
            continue
        spill = f"{k['spill_stores']}/{k['spill_loads']}"
        print(f"{k['arch']:<5} {k['kernel']:<21} {k['regs']:>4} {spill:>13} {kib(k['shared']):>8} "
              f"{kib(k['shared_limit']):>5} {k['seconds']:>5.1f}  {first:<40} {k['config']}")


def problem_rows(compiles: list[dict]) -> list[dict]:
    return [dict(kernel=k["kernel"], arch=k.get("arch"), config=k.get("config"), scenarios=k["scenarios"],
                 problems=aot.problems(k)) for k in compiles if aot.problems(k)]


def input_dtype(compile_: dict) -> str:
    """The input dtype of the scenarios that need this compile (bf16 / fp32), from their labels."""
    return compile_["scenarios"][0].split("-")[2]


def markdown(report: dict) -> str:
    """The RESULTS.md section: targets, a per-kernel summary, the problems and every compile."""
    compiles = report["compiles"]
    targets = ", ".join(f"{name} ({t['gpu']}, at most {kib(t['max_shared'])} KiB shared memory per block)"
                        for name, t in report["targets"].items())
    lines = [SECTION, "",
             f"- Date: {report['date']}",
             f"- Command: `{report['command']}`",
             f"- Targets: {targets}",
             f"- Compiler: Triton {report['triton']} and its bundled ptxas on a CPU-only machine ({report['host']}); "
             f"{len(report['scenarios'])} scenarios, {len(compiles)} distinct compiles "
             f"({report['cache_hits']} from Triton's cache), {report['wall_s']:.0f} s", "",
             "Each kernel with the tiles its launcher picks on CUDA (engine/kernels/aot.py captures the launches): "
             "registers per thread, bytes spilled (ptxas' spill stores / loads, read from the cubin's STL / LDL "
             "instructions) and shared memory per block (dynamic + static). fp32 rows are fp32 inputs (the "
             "launchers' IEEE correctness path); bf16 rows are the production path.", "",
             "| kernel | inputs | arch | configs | registers (min-max) | configs spilling | max spill st/ld B "
             "| max smem KiB | limit KiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for k in compiles:
        groups.setdefault((k["kernel"], input_dtype(k), k.get("arch") or "-"), []).append(k)
    for (kernel, dtype, arch), ks in sorted(groups.items()):
        ok = [k for k in ks if not k.get("error")]
        bad = len(ks) - len(ok)
        spilling = [k for k in ok if k["spill_stores"] or k["spill_loads"]]
        regs = f"{min(k['regs'] for k in ok)}-{max(k['regs'] for k in ok)}" if ok else "-"
        spill = (f"{max(k['spill_stores'] for k in ok)}/{max(k['spill_loads'] for k in ok)}" if ok else "-")
        smem = kib(max(k["shared"] for k in ok)) if ok else "-"
        limit = kib(ok[0]["shared_limit"]) if ok else "-"
        count = f"{len(ks)}" + (f" ({bad} failed)" if bad else "")
        lines.append(f"| `{kernel}` | {dtype} | {arch} | {count} | {regs} | {len(spilling)} | {spill} | {smem} "
                     f"| {limit} |")
    lines += ["", "Problems (compile errors, spills, shared memory over the limit): "
                  f"{len(report['problems']) or 'none'}.", ""]
    for p in report["problems"]:
        more = ", ..." if len(p["scenarios"]) > 3 else ""
        lines.append(f"- {p['arch']} `{p['kernel']}` {p['config']} ({', '.join(p['scenarios'][:3])}{more}): "
                     + "; ".join(x.splitlines()[0] for x in p["problems"]))
    lines += ["", f"<details><summary>All {len(compiles)} compiles</summary>", "",
              "| arch | kernel | config | regs | spill st/ld B | smem KiB | scenarios |",
              "|---|---|---|---:|---:|---:|---|"]
    for k in compiles:
        if k.get("error"):
            lines.append(f"| {k.get('arch', '-')} | `{k['kernel']}` | {k.get('config', '')} | error | | | "
                         f"{', '.join(k['scenarios'])} |")
        else:
            lines.append(f"| {k['arch']} | `{k['kernel']}` | {k['config']} | {k['regs']} | "
                         f"{k['spill_stores']}/{k['spill_loads']} | {kib(k['shared'])} | {', '.join(k['scenarios'])} |")
    lines += ["", "</details>", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def write_section(path: Path, section: str) -> None:
    """Replace the section (its heading up to the next '## ' heading) or append it."""
    text = path.read_text() if path.exists() else "# Measured results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", choices=sorted(aot.ARCHS), default=sorted(aot.ARCHS))
    ap.add_argument("--dtypes", nargs="+", choices=aot.DTYPES, default=list(aot.DTYPES))
    ap.add_argument("--ops", nargs="+", choices=sorted(aot.OPS), default=list(aot.OPS))
    ap.add_argument("--workers", type=int, default=0, help="compile processes (default: one per CPU)")
    ap.add_argument("--cache-dir", default=None, help="Triton cache for the compiles (default: Triton's own)")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON output path")
    ap.add_argument("--results-md", type=Path, default=RESULTS_MD, help="markdown file whose section is replaced")
    ap.add_argument("--no-md", action="store_true", help="do not touch the markdown file")
    args = ap.parse_args(argv)
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")

    scenarios = aot.full_matrix(args.archs, args.dtypes, args.ops)
    start = time.perf_counter()
    with tqdm(total=len(scenarios), desc="AOT compile", unit="scenario") as bar:
        results = aot.run_scenarios(scenarios, workers=args.workers or None, cache_dir=args.cache_dir,
                                    on_result=lambda _: bar.update())
    wall = time.perf_counter() - start
    compiles = compiles_of(results)
    import triton

    report = dict(
        date=datetime.date.today().isoformat(),
        command="python -m bench.compile_report" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                            else sys.argv[1:])),
        host=f"{platform.machine()}, {os.cpu_count()} CPUs",
        triton=triton.__version__,
        targets={name: dict(capability=a.capability, gpu=a.gpu, max_shared=a.max_shared)
                 for name, a in aot.ARCHS.items() if name in args.archs},
        wall_s=round(wall, 1),
        cache_hits=sum(1 for k in compiles if not k.get("error") and k.get("ptxas") is None),  # no ptxas log
        scenarios={label: [k["kernel"] for k in r["kernels"]] for label, r in sorted(results.items())},
        compiles=compiles,
        problems=problem_rows(compiles),
    )
    print_table(compiles)
    print(f"\n{len(scenarios)} scenarios, {len(compiles)} distinct compiles ({report['cache_hits']} from Triton's "
          f"cache) in {wall:.0f} s; "
          f"problems: {len(report['problems']) or 'none'}")
    for p in report["problems"]:
        print(f"  {p['arch']} {p['kernel']} {p['config']} ({p['scenarios'][0]}"
              f"{' +' + str(len(p['scenarios']) - 1) if len(p['scenarios']) > 1 else ''}): "
              f"{'; '.join(x.splitlines()[0] for x in p['problems'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    if not args.no_md:
        write_section(args.results_md, markdown(report))
        print(f"wrote section '{SECTION}' of {args.results_md}")
    return report


if __name__ == "__main__":
    main()
