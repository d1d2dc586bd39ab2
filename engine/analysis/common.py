"""What both analyses do with a finished report: write it, plot it, print its table."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(report: dict, path: Path, plot: Callable[[dict, Path], Path], table: Callable[[dict], str]) -> dict:
    """`report` as JSON at `path`, its plot next to it (.png), its table printed; the report
    with both paths added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    figure = plot(report, path.with_suffix(".png"))
    print(table(report))
    print(f"-> {path}, {figure}")
    report["path"], report["plot"] = str(path), str(figure)
    return report
