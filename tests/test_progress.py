"""Progress output: tqdm's bar on a terminal; plain lines, at most one per interval, in a log file."""
from __future__ import annotations

import io

from engine.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_every_redraw_is_its_own_line_and_clears_are_dropped():
    log = io.StringIO()
    for _ in progress_bar(range(5), desc="work", file=log, mininterval=0, miniters=1, leave=False):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines and all(line.startswith("work:") for line in lines)   # no blank line from the clear
    assert "5/5" in lines[-1]


def test_off_a_terminal_lines_come_at_most_once_per_interval():
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="work", file=log):   # the default interval: 30 s
        pass
    assert len(log.getvalue().splitlines()) <= 3                  # start, (at most one update), end


def test_on_a_terminal_the_bar_redraws_in_place():
    tty = _Terminal()
    for _ in progress_bar(range(5), desc="work", file=tty, mininterval=0, miniters=1):
        pass
    assert "\r" in tty.getvalue()
