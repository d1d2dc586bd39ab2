"""Run the code blocks of README.md and docs/*.md that are marked runnable.

A renamed flag or function should break a test, not the reader. The convention: a fenced
block whose fence line is *immediately* preceded by the HTML comment line

    <!-- run -->                 (or <!-- run timeout=NNN -->, seconds; default 300)

is run; every other block is not. The comment is invisible in rendered markdown. Only
```bash (run as a script with `bash -euo pipefail`) and ```python (run as a script with
`sys.executable`) can be marked; marking a block in any other language is a failing test.

Each block is its own test (id `README.md:123`: file and line of the opening fence). The
blocks of one file run in file order in one fresh temporary directory, their working
directory, so a block may use what an earlier block of the same file wrote (`runs/sft`);
files share nothing. (Run a later block alone with `-k` and its inputs are missing; do not
reorder these tests, e.g. with pytest-randomly or xdist.) The environment: `python` on PATH
is this interpreter, PYTHONPATH is the repo root (so `python -m bench...` and `import engine`
use this tree), TOKENIZERS_PARALLELISM=false, HF_HUB_OFFLINE=1, and TRITON_INTERPRET=1 unless
CUDA is available. Run just these with `pytest -q tests/test_doc_snippets.py`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 300
MARKER = re.compile(r"^\s*<!--\s*run(?:\s+timeout=(\d+))?\s*-->\s*$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)")
RUNNERS = {"bash": ["bash", "-euo", "pipefail"], "python": [sys.executable]}
SUFFIX = {"bash": ".sh", "python": ".py"}


@dataclass(frozen=True)
class Snippet:
    """One marked code block: where it is, its language, its code and its time limit."""

    source: str  # file name relative to the repo root, e.g. "docs/rl.md"
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    timeout: int = DEFAULT_TIMEOUT

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def extract_snippets(text: str, source: str) -> list[Snippet]:
    """The fenced blocks of markdown `text` whose fence line directly follows a run marker."""
    lines = text.splitlines()
    found: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        i += 1
        while i < len(lines) and not close.match(lines[i]):
            i += 1
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        if marker:
            code = textwrap.dedent("\n".join(lines[start + 1 : i])) + "\n"
            timeout = int(marker.group(1) or DEFAULT_TIMEOUT)
            found.append(Snippet(source, start + 1, lang, code, timeout))
        i += 1  # past the closing fence (or the end of the text when unclosed)
    return found


def collect(repo: Path = REPO) -> list[Snippet]:
    """The marked blocks of README.md and docs/*.md, in file then line order."""
    files = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    return [s for f in files if f.is_file()
            for s in extract_snippets(f.read_text(encoding="utf-8"), f.relative_to(repo).as_posix())]


def snippet_env() -> dict[str, str]:
    """The environment a block runs in (see the module docstring)."""
    import torch  # already imported by conftest; only needed for the CUDA check

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


SNIPPETS = collect()
WORKDIRS: dict[str, Path] = {}  # source file -> the working directory its blocks share
NONE_YET = pytest.param(None, id="none", marks=pytest.mark.skip(
    reason="no block in README.md or docs/*.md is marked <!-- run --> yet"))


@pytest.mark.parametrize("snippet", [pytest.param(s, id=s.id) for s in SNIPPETS] or [NONE_YET])
def test_doc_snippet(snippet: Snippet, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Run one marked block; fail with the tail of its output if it fails or hangs."""
    if snippet.lang not in RUNNERS:
        pytest.fail(f"{snippet.id}: block marked <!-- run --> is {snippet.lang or 'unlabelled'!r}, "
                    f"but only {sorted(RUNNERS)} blocks can be run", pytrace=False)
    if snippet.source not in WORKDIRS:
        WORKDIRS[snippet.source] = tmp_path_factory.mktemp(re.sub(r"\W", "_", snippet.source))
    script = tmp_path / f"snippet{SUFFIX[snippet.lang]}"  # outside the working directory
    script.write_text(snippet.code, encoding="utf-8")
    proc = subprocess.Popen([*RUNNERS[snippet.lang], str(script)], cwd=WORKDIRS[snippet.source],
                            env=snippet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=snippet.timeout)
        verdict = f"{snippet.lang} block exited {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the block's whole process group, children included
        out, _ = proc.communicate()
        verdict = f"{snippet.lang} block timed out after {snippet.timeout}s"
    if proc.returncode != 0:
        pytest.fail(f"{snippet.id}: {verdict}; output tail (stdout and stderr):\n"
                    f"{out[-3000:] or '(no output)'}", pytrace=False)


SAMPLE = """\
# Title
<!-- run -->
```bash
echo hi
```
```bash
echo unmarked
```
<!-- run timeout=42 -->
```python
print("py")
```
<!-- run -->

```bash
echo marker not directly above the fence
```
<!-- run -->
```text
not runnable
```
````markdown
<!-- run -->
```bash
echo inside another block
```
````
"""


def test_marker_parser() -> None:
    """Marked blocks are found with their fence line, language and timeout; others skipped."""
    got = [(s.line, s.lang, s.code, s.timeout) for s in extract_snippets(SAMPLE, "sample.md")]
    assert got == [
        (3, "bash", "echo hi\n", DEFAULT_TIMEOUT),
        (10, "python", 'print("py")\n', 42),
        (19, "text", "not runnable\n", DEFAULT_TIMEOUT),
    ]
    assert extract_snippets(SAMPLE, "sample.md")[0].id == "sample.md:3"
