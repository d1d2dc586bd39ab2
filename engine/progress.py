"""Progress bars that suit both a terminal and a log file.

On a terminal, tqdm's bar redraws in place. Elsewhere (CI, nohup, `> run.log 2>&1`) every redraw
would append a carriage-return update to one endless line: there the bar prints a plain line
instead, at most every LOG_INTERVAL_S seconds (and at its start and end).
"""
from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream wrapper for tqdm off a terminal: each redraw becomes one line; clears are dropped."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, *, file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal; a line per LOG_INTERVAL_S seconds elsewhere."""
    stream = sys.stderr if file is None else file
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.update(file=_Lines(stream), dynamic_ncols=False, ncols=kwargs.get("ncols", 100), ascii=True)
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, file=stream, **kwargs)
