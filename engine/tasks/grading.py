"""Final-answer grading: `math_correct` (MATH-style LaTeX answers) and `gsm8k_correct` (numbers).

Grading runs inside RL training on text the policy wrote, so it must never raise on a
response, never hang and never take the trainer down with it. The split that gives this:

* Cheap, safe work runs in-process: answer extraction, string normalisation, exact string
  equality and comparison of plain numbers (integers, decimals, `a/b`, `\\frac{a}{b}`).
  None of it evaluates an expression; normalisation only sees answers of at most
  MAX_ANSWER_CHARS characters, and extraction is linear in the response.
* Anything symbolic (math-verify, sympy) runs in a `GraderPool` worker process with a
  per-call timeout. A worker that times out or dies is killed and replaced, and the call
  grades False.

math-verify is optional: without it the worker compares with its own LaTeX-to-sympy
translation. Invariant: this module imports nothing from `engine` (workers load this file
by path, so they start in under a second without importing torch).
"""
from __future__ import annotations

import atexit
import importlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any, Callable

log = logging.getLogger(__name__)

# Relative tolerance for numeric equality: 1/3 matches 0.333333 but 3 does not match 3.0001.
REL_TOL = 1e-6
ABS_TOL = 1e-9
# A "final answer" longer than this is not one; it grades False without symbolic work.
MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_IS = re.compile(r"(?:final answer|the answer) is\s*:?", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _brace_group(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at text[start], or None if unbalanced.

    Escaped braces (`\\{`, `\\}`) are content, not grouping.
    """
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def last_boxed(text: str) -> tuple[bool, str | None]:
    """(found, content) of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5` in text.

    found is True when a box command is present; content is None when it is malformed
    (unbalanced braces or nothing after it).
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return False, None
    i = matches[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _brace_group(text, i)
        return True, (text[i + 1:end - 1] if end is not None else None)
    token = re.match(r"[^\s$]+", text[i:])  # `\boxed 5`
    return True, (token.group(0) if token else None)


def extract_math_answer(response: str) -> str | None:
    """The final answer of a solution: the last box, else "the answer is ...", else the last
    number. None when there is none or the last box is malformed."""
    found, boxed = last_boxed(response)
    if found:
        return boxed
    matches = list(_ANSWER_IS.finditer(response))
    if matches:
        rest = response[matches[-1].end():].strip().split("\n", 1)[0].strip()
        if rest.startswith("$"):  # "the answer is $x$." -> x
            rest = rest[1:].split("$", 1)[0]
        else:  # the sentence ends at a period before a space: "7. Check: ..." -> 7
            rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]
        rest = rest.strip().rstrip(".").strip()
        if rest:
            return rest
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


# -------------------------------------------------------------------------- normalisation

_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox)\s*\{")
_UNIT_WORDS = (
    "units?|sq|square|cubic|cm|centimeters?|mm|millimeters?|km|kilometers?|meters?|inch|inches|"
    "feet|foot|ft|yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|"
    "months?|years?|degrees?|dollars?|cents?|pounds?|lbs?|ounces?|oz|gallons?|liters?|ml|kg|"
    "grams?|people|persons?|students?|percent"
)
# A unit word (optionally squared/cubed) ending the answer right after a number or group.
_UNIT_TAIL = re.compile(
    rf"(?<=[\d}})])\s*(?:(?:sq|square|cubic)\.?\s+)?(?:{_UNIT_WORDS})(?:\^\{{?[23]\}}?)?\s*\.?\s*$",
    re.IGNORECASE,
)
_SPACING = re.compile(r"(?<!\\)\\[!,;: ]|\\q?quad(?![a-zA-Z])|~")  # not the `\\` of a matrix row
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°")
_ASSIGNMENT = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)\s*(?:=|\\in(?![a-zA-Z]))\s*")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _unwrap_text_commands(s: str) -> str:
    """`\\text{cm}` -> `cm`, outermost first; a malformed wrapper is left as it is."""
    for _ in range(50):  # bounded: each pass removes one wrapper
        m = _TEXT_COMMANDS.search(s)
        if not m:
            break
        end = _brace_group(s, m.end() - 1)
        if end is None:
            break
        s = s[:m.start()] + s[m.end():end - 1] + s[end:]
    return s


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer, so that equivalent writings compare equal.

    Drops math delimiters, `\\left`/`\\right`, spacing commands, text wrappers, trailing units,
    degrees, percent and currency signs, thousands separators and a leading `x =`; maps
    `\\dfrac`/`\\tfrac` to `\\frac`; braces `\\frac12` and `\\sqrt2`; removes whitespace.
    """
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", "", s)  # \( \) \[ \]
    s = _unwrap_text_commands(s)
    s = re.sub(r"\\(?:left|right)(?:\.|(?![a-zA-Z]))", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\displaystyle(?![a-zA-Z])", "", s)
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("{,}", "")
    for _ in range(3):  # "5 square units" loses one word a pass
        stripped = _UNIT_TAIL.sub("", s)
        if stripped == s:
            break
        s = stripped
    s = _ASSIGNMENT.sub("", s) if s.count("=") <= 1 else s
    # A space survives only where it ends a command name before a letter (`\pi r`).
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+", lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt(\d|[a-zA-Z](?![a-zA-Z]))", r"\\sqrt{\1}", s)
    s = s.rstrip(".,")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    return s


# ----------------------------------------------------------------- structure and numbers

_NUMERIC = re.compile(r"-?\d+(?:\.\d+)?")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def to_number(s: str) -> Fraction | None:
    """Exact value of a plain number (`3`, `-0.5`, `7/2`, `\\frac{7}{2}`), else None.

    Never evaluates an expression, so it is safe on any input.
    """
    if len(s) > 100:
        return None
    try:
        if _NUMERIC.fullmatch(s):
            return Fraction(s)
        if re.fullmatch(r"-?\d+/\d+", s):
            num, den = s.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        m = _FRAC.fullmatch(s)
        if m and Fraction(m.group(3)):
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def numbers_close(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))


def _split_top_level(s: str, sep: str) -> list[str]:
    """Split s at occurrences of sep outside any (), [], {} nesting."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _wraps_whole(s: str) -> bool:
    """True when the bracket at s[0] closes at s[-1] (so `(1,2)` but not `(1)+(2)`)."""
    depth = 0
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and i < len(s) - 1:
            return False
    return depth == 0


def structure(s: str) -> tuple[str, str, list[str]]:
    """(kind, brackets, elements) of a normalised answer.

    kind is "bag" for unordered answers (`\\{1,2\\}`, `1,2`, unions of intervals), "seq" for
    tuples and intervals (brackets keeps `(]` etc., which must match), else "atom".
    """
    union = _split_top_level(s, "\\cup")
    if len(union) > 1:
        return "bag", "", union
    if s.startswith("\\{") and s.endswith("\\}") and _wraps_whole(s[1:]):
        return "bag", "", _split_top_level(s[2:-2], ",")
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _wraps_whole(s):
        inner = _split_top_level(s[1:-1], ",")
        if len(inner) > 1:
            return "seq", s[0] + s[-1], inner
    items = _split_top_level(s, ",")
    if len(items) > 1:
        return "bag", "", items
    return "atom", "", [s]


AtomEqual = Callable[[str, str], "bool | None"]


def compare(gold: str, pred: str, atom_equal: AtomEqual) -> bool | None:
    """Compare normalised answers structurally; True/False when decided, None when not.

    atom_equal compares two single expressions and may itself answer None (undecided).
    """
    g_kind, g_br, g_items = structure(gold)
    p_kind, p_br, p_items = structure(pred)
    if g_kind == p_kind == "atom":
        return atom_equal(gold, pred)
    if g_kind != p_kind or g_br != p_br or len(g_items) != len(p_items):
        return False
    if g_kind == "seq":
        verdicts = [compare(g, p, atom_equal) for g, p in zip(g_items, p_items)]
        return False if False in verdicts else (True if all(verdicts) else None)
    # Unordered: equivalence is transitive, so greedy matching finds a full match if any.
    unused, undecided = list(p_items), False
    for g in g_items:
        verdicts = [compare(g, p, atom_equal) for p in unused]
        if True in verdicts:
            unused.pop(verdicts.index(True))
        elif None in verdicts:
            undecided = True
        else:
            return False
    return None if undecided else True


def fast_atom_equal(gold: str, pred: str) -> bool | None:
    """In-process comparison: equal strings, plain numbers, single words (case-insensitive)."""
    if gold == pred:
        return True
    g, p = to_number(gold), to_number(pred)
    if g is not None and p is not None:
        return numbers_close(g, p)
    if re.fullmatch(r"[A-Za-z]{2,}", gold) and re.fullmatch(r"[A-Za-z]{2,}", pred):
        return gold.lower() == pred.lower()
    return None


# ------------------------------------------------------------------------ public graders

def math_correct(response: str, gold: str, *, timeout: float | None = None,
                 pool: GraderPool | None = None) -> bool:
    """Whether a full MATH-style solution reaches the gold final answer.

    gold is the final answer (a full reference solution also works: its last box is used).
    Never raises on the response. Symbolic work is bounded by `timeout` (the pool's, 5 s by
    default), plus about a second when a worker has to be (re)started.
    """
    found, boxed = last_boxed(gold)
    gold_answer = boxed if found and boxed is not None else gold
    if not gold_answer.strip():
        raise ValueError(f"empty gold answer: {gold!r}")
    pred_answer = extract_math_answer(response)
    if pred_answer is None or len(pred_answer) > MAX_ANSWER_CHARS:
        return False
    g, p = normalize_answer(gold_answer), normalize_answer(pred_answer)
    if not p:
        return False
    try:
        verdict = compare(g, p, fast_atom_equal)
    except RecursionError:  # tuples nested hundreds deep: not an answer
        return False
    if verdict is not None:
        return verdict
    pool = pool or DEFAULT_POOL
    return pool.call("symbolic_equal", g, p, timeout=timeout, default=False) is True


_GSM8K_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_gsm8k_answer(text: str) -> Fraction | None:
    """The number after the last `####`, else the last number; commas and currency dropped."""
    clean = re.sub(r"(?<=\d),(?=\d)", "", text)
    clean = re.sub(r"[$€£¥]", "", clean)
    if "####" in clean:
        m = _GSM8K_NUMBER.search(clean.rsplit("####", 1)[1])
        found = m.group(0) if m else None
    else:
        numbers = _GSM8K_NUMBER.findall(clean)
        found = numbers[-1] if numbers else None
    if found is None or len(found) > 100:
        return None
    return Fraction(found)


GSM8K_GRADING = ("strict", "lenient")  # the modes of gsm8k_correct and the gsm8k task


def strict_gsm8k_answer(text: str) -> str | None:
    """The reference's GSM8K answer: the text after the last `####`, stripped, commas removed,
    lowercased; None without `####`. No number parsing, so `18.0`, `$18`, `18 apples` stay as
    written (and then differ from a gold `18`)."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "").lower()


def gsm8k_correct(response: str, gold: str, strict: bool = False) -> bool:
    """Whether the response's final answer equals the gold answer.

    gold is the answer (`"1,200"`) or a reference solution ending in `#### 1200`.
    strict=True is the VinePPO reference rule (`strict_gsm8k_answer` of both, compared as
    exact strings; a response without `####` is wrong). strict=False (lenient) compares
    numbers: the number after the last `####`, else the last number of the response, with
    commas and currency signs dropped, so `#### $18.0` and `So she has 18 apples.` match 18.
    """
    target = extract_gsm8k_answer(gold)
    if target is None:
        raise ValueError(f"gold answer has no number: {gold!r}")
    if strict:
        # A bare gold number ("1,200") is its own answer text; a solution's is after its ####.
        gold_text = strict_gsm8k_answer(gold)
        if gold_text is None:
            gold_text = gold.strip().replace(",", "").lower()
        pred_text = strict_gsm8k_answer(response)
        return pred_text is not None and pred_text == gold_text
    pred = extract_gsm8k_answer(response)
    return pred is not None and pred == target


# -------------------------------------------------------------- symbolic (worker side only)
# Functions below may run for unbounded time on hostile input: call them through the pool.

_MATH_VERIFY: Any = None


def _math_verify():
    """The math_verify module, or False when it is not installed (imported once)."""
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        try:
            import math_verify

            logging.getLogger("math_verify").setLevel(logging.ERROR)
            _MATH_VERIFY = math_verify
        except ImportError:
            _MATH_VERIFY = False
    return _MATH_VERIFY


def math_verify_equal(gold: str, pred: str) -> bool | None:
    """math-verify's verdict (gold first), or None if it is missing or parses neither side."""
    mv = _math_verify()
    if not mv:
        return None
    try:
        g = mv.parse("\\boxed{" + gold + "}", parsing_timeout=None)
        p = mv.parse("\\boxed{" + pred + "}", parsing_timeout=None)
        if not any(not isinstance(x, str) for x in g) or not any(not isinstance(x, str) for x in p):
            return None
        return bool(mv.verify(g, p, timeout_seconds=None))
    except Exception:
        return None


_SYMPY_NAMES = {"pi": "pi", "infty": "oo", "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot",
                "sec": "sec", "csc": "csc", "ln": "log", "log": "log", "exp": "exp"}
_ALLOWED_IDENTIFIERS = set(_SYMPY_NAMES.values()) | {"sqrt"}


def _rewrite_frac_sqrt(s: str) -> str | None:
    """`\\frac{a}{b}` -> `((a)/(b))`, `\\sqrt[n]{a}` -> `((a)**(1/(n)))`, `\\sqrt{a}` -> `sqrt(a)`."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac{", i):
            a_end = _brace_group(s, i + 5)
            if a_end is None or a_end >= len(s) or s[a_end] != "{":
                return None
            b_end = _brace_group(s, a_end)
            if b_end is None:
                return None
            a, b = _rewrite_frac_sqrt(s[i + 6:a_end - 1]), _rewrite_frac_sqrt(s[a_end + 1:b_end - 1])
            if a is None or b is None:
                return None
            out.append(f"(({a})/({b}))")
            i = b_end
        elif s.startswith("\\sqrt[", i):
            close = s.find("]", i)
            if close < 0 or close + 1 >= len(s) or s[close + 1] != "{":
                return None
            end = _brace_group(s, close + 1)
            n, a = _rewrite_frac_sqrt(s[i + 6:close]), _rewrite_frac_sqrt(s[close + 2:end - 1]) if end else None
            if n is None or a is None:
                return None
            out.append(f"(({a})**(1/({n})))")
            i = end
        elif s.startswith("\\sqrt{", i):
            end = _brace_group(s, i + 5)
            inner = _rewrite_frac_sqrt(s[i + 6:end - 1]) if end else None
            if inner is None:
                return None
            out.append(f"sqrt({inner})")
            i = end
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def latex_to_sympy(s: str):
    """A sympy expression for a simple LaTeX answer, or None if it is outside the subset.

    Safety invariant: the text handed to sympy's parser contains only digits, single-letter
    symbols, whitelisted function names, operators and parentheses (no attributes, strings,
    indexing or underscores), so parsing cannot run arbitrary code.
    """
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor, implicit_multiplication_application, parse_expr, standard_transformations)

    text = _rewrite_frac_sqrt(s)
    if text is None:
        return None
    text = re.sub(r"\\(?:cdot|times)(?![a-zA-Z])", "*", text).replace("\\div", "/")
    text = re.sub(r"\\([a-zA-Z]+)",
                  lambda m: f" {_SYMPY_NAMES[m.group(1)]} " if m.group(1) in _SYMPY_NAMES else "\\", text)
    if "\\" in text:
        return None
    text = text.replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[0-9a-zA-Z+\-*/^(). ]+", text) or re.search(r"(?<!\d)\.|\.(?!\d)", text):
        return None
    for word in re.findall(r"[a-zA-Z]+", text):
        if len(word) > 1 and word not in _ALLOWED_IDENTIFIERS:
            return None
    local = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    local.update(pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, sin=sympy.sin, cos=sympy.cos,
                 tan=sympy.tan, cot=sympy.cot, sec=sympy.sec, csc=sympy.csc, log=sympy.log, exp=sympy.exp)
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        return parse_expr(text, local_dict=local, transformations=transformations, evaluate=False)
    except Exception:
        return None


def sympy_atom_equal(gold: str, pred: str) -> bool | None:
    """Symbolic equality of two single LaTeX expressions via sympy; None if either won't parse."""
    import sympy

    if gold == pred:
        return True
    a, b = latex_to_sympy(gold), latex_to_sympy(pred)
    if a is None or b is None:
        return None
    try:
        if a.free_symbols or b.free_symbols:
            return sympy.simplify(a - b) == 0
        value, scale = complex(sympy.N(a - b, 30)), complex(sympy.N(b, 30))
        return abs(value) <= max(ABS_TOL, REL_TOL * abs(scale))
    except Exception:
        return None


def symbolic_equal(gold: str, pred: str) -> bool:
    """Worker entry point: math-verify's verdict, or the sympy fallback where it has none."""
    verdict = math_verify_equal(gold, pred)
    if verdict is not None:
        return verdict

    def atom_equal(g: str, p: str) -> bool | None:
        fast = fast_atom_equal(g, p)
        return fast if fast is not None else sympy_atom_equal(g, p)

    return compare(gold, pred, atom_equal) is True


# ---------------------------------------------------------------------------- worker pool

_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('vine_grading_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n"
)


def _limit_worker(parent_pid: int, memory_limit_mb: int) -> None:
    """Exit with the parent, ignore Ctrl-C (the parent handles it), cap address-space growth."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch_parent() -> None:  # a thread, so it fires even while a call is busy
        while os.getppid() == parent_pid:
            threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    if memory_limit_mb > 0:  # a huge power becomes a MemoryError instead of eating the host
        try:
            import resource

            with open("/proc/self/statm") as f:
                current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = current + memory_limit_mb * 2**20
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, OSError, ValueError):
            pass


def _worker_main(fd: int, parent_pid: int, memory_limit_mb: int) -> None:
    """Serve (function, args) requests on the socket until it closes.

    A function given by name is looked up in this module; anything else must be a picklable
    callable. Replies are ("ok", value) or ("error", message).
    """
    conn = Connection(fd)
    _math_verify()  # import math-verify and sympy before "ready" so calls don't pay for it
    importlib.import_module("sympy")

    _limit_worker(parent_pid, memory_limit_mb)
    conn.send(("ready", None))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            func = globals()[fn] if isinstance(fn, str) else fn
            reply = ("ok", func(*args))
        except BaseException as exc:  # a MemoryError or RecursionError is just a failed call
            reply = ("error", f"{type(exc).__name__}: {exc}"[:500])
        try:
            conn.send(reply)
        except Exception as exc:
            conn.send(("error", f"unpicklable result: {exc}"[:500]))


class _Worker:
    """One grader subprocess and its socket."""

    def __init__(self, memory_limit_mb: int, start_timeout: float):
        parent_sock, child_sock = socket.socketpair()
        self.conn = Connection(parent_sock.detach())
        child_fd = child_sock.detach()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__), str(child_fd),
                 str(os.getpid()), str(memory_limit_mb)],
                pass_fds=(child_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C goes to the trainer only
            )
        except BaseException:
            self.conn.close()
            raise
        finally:
            os.close(child_fd)
        try:
            ready = self.conn.poll(start_timeout) and self.conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"grader worker did not start within {start_timeout} s (see its stderr)")

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        self.conn.close()


class GraderPool:
    """Worker processes for symbolic grading, each call bounded by a timeout.

    Workers start lazily (a single-threaded caller only ever uses one) and are thread-safe
    to share. A call that times out, crashes its worker or raises returns `default`; the
    worker is killed and a fresh one replaces it on demand, so the pool always survives.
    `stats` counts calls and their outcomes (ok, timeouts, crashes, errors) for logging.
    """

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S,
                 memory_limit_mb: int = 2048, start_timeout: float = 60.0):
        if workers < 1 or timeout <= 0:
            raise ValueError(f"GraderPool needs workers >= 1 and timeout > 0, got {workers}, {timeout}")
        self.workers, self.timeout = workers, timeout
        self.memory_limit_mb, self.start_timeout = memory_limit_mb, start_timeout
        self.stats = {"calls": 0, "ok": 0, "timeouts": 0, "crashes": 0, "errors": 0}
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0  # workers idle or checked out; invariant: _live <= workers
        self._pid = os.getpid()

    def _checkout(self) -> _Worker:
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's workers are not ours
                self._idle, self._live, self._pid = [], 0, os.getpid()
            while not self._idle and self._live >= self.workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return _Worker(self.memory_limit_mb, self.start_timeout)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._cond:
            if healthy:
                self._idle.append(worker)
            else:
                self._live -= 1
            self._cond.notify()

    def call(self, fn: str | Callable, *args: Any, timeout: float | None = None, default: Any = None) -> Any:
        """fn(*args) in a worker (fn: a function name in this module or a picklable callable).

        Returns its result, or `default` if it raised, timed out or killed the worker.
        """
        timeout = self.timeout if timeout is None else timeout
        try:
            worker = self._checkout()
        except Exception as exc:
            log.error("grader worker failed to start: %s", exc)
            self._count("crashes")
            return default
        outcome = "crashes"  # until the worker answers
        try:
            worker.conn.send((fn, args))
            if not worker.conn.poll(timeout):
                outcome = "timeouts"
                log.warning("grader call %s timed out after %.1f s; worker replaced", fn, timeout)
                return default
            status, value = worker.conn.recv()
            outcome = "ok" if status == "ok" else "errors"
            if status != "ok":
                log.debug("grader call %s failed: %s", fn, value)
            return value if status == "ok" else default
        except Exception:  # the worker died mid-call (EOF), or the request would not pickle
            return default
        finally:
            self._release(worker, healthy=outcome in ("ok", "errors"))
            self._count(outcome)

    def _count(self, outcome: str) -> None:
        with self._cond:
            self.stats["calls"] += 1
            self.stats[outcome] += 1

    def close(self) -> None:
        """Stop the idle workers (busy ones return to the pool; later calls start new ones)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.kill()


DEFAULT_POOL = GraderPool()
atexit.register(DEFAULT_POOL.close)
