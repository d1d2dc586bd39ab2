"""CAPO's model-free building blocks: judge prompt, critique parsing, voting, token rewards.

CAPO (arXiv 2508.02298) asks a frozen LLM judge, once per policy response, which reasoning
steps are wrong; k such critiques vote; every token of a step the vote flags is penalised on
top of the 0/1 outcome reward, R_t = r_v * W_whole - 1[t in a flagged step] * W_process; the
advantages are normalised over all tokens of a prompt's group. This module holds the pieces
that need no model:

    critique_prompt(question, steps, reference_answer) -> the judge's prompt
    parse_critique(text, num_steps)                     -> Critique (flagged steps or abstain)
    vote(critiques, num_steps, mode)                    -> the flagged steps after voting
    token_rewards(num_tokens, step_ends, flagged, outcome, w_whole, w_process) -> R_t
    group_token_advantages(rewards, groups)             -> per-token advantages
    rule_wrong_steps(steps)                             -> an exact judge for the arithmetic task
    flag_precision_recall(predicted, truth)             -> how well a judge flags wrong steps

Steps are 0-based everywhere in code and 1-based in the text the judge reads and writes.
Token steps follow engine.rl.steps: step i covers tokens [step_ends[i-1], step_ends[i]) with
step_ends[-1] = 0, and the last end is the number of tokens.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

VERDICT_PREFIX = "Wrong steps:"
VERDICT_NONE = "none"
STEP_HEADER = "Step {number}: "
# Every line of a step after its first starts with this marker, so step text can never begin
# a prompt line with "Step N:" or the verdict prefix (the parser does not skip "|").
CONTINUATION = "    | "
PROMPT_END = "Critique:\n"
VOTING_MODES = ("intersection", "majority", "union")

# The whole judge prompt. No line of it starts with VERDICT_PREFIX: the format is quoted
# inline, so a judge that echoes the instructions does not cast a vote by doing so.
CRITIQUE_TEMPLATE = (
    "You are checking a step-by-step solution to a problem.\n"
    "\n"
    "Problem:\n"
    "{question}\n"
    "{reference}"
    "\n"
    "Solution steps (a line starting with \"|\" continues the step above it):\n"
    "{steps}\n"
    "\n"
    "Judge each step only on the correctness of the step itself: a step that correctly uses a "
    "wrong result from an earlier step is not wrong. Write a short critique of the steps, then "
    "end with exactly one line that lists the numbers of the wrong steps, in the form "
    "\"" + VERDICT_PREFIX + " 2, 5\", or \"" + VERDICT_PREFIX + " " + VERDICT_NONE + "\" "
    "if every step is correct.\n"
    "\n"
    + PROMPT_END
)
REFERENCE_LINE = "Reference final answer: {answer}\n"
NO_STEPS = "(the solution has no steps)"


def _render(text: str) -> str:
    """text with trailing whitespace stripped and every line after the first behind CONTINUATION.

    splitlines() breaks on every Unicode line boundary (\\r, \\u2028, ...), so no raw line
    break survives inside a rendered line.
    """
    lines = text.rstrip().splitlines() or [""]
    return "\n".join([lines[0], *(CONTINUATION + line for line in lines[1:])])


def critique_prompt(question: str, steps: Sequence[str], reference_answer: str | None = None) -> str:
    """The judge's prompt for one response: the problem, the reference answer when given,
    the steps numbered from 1, and the verdict format. Ends with PROMPT_END, so the judge's
    generation starts with its critique."""
    rendered = "\n".join(STEP_HEADER.format(number=i + 1) + _render(step) for i, step in enumerate(steps))
    reference = "" if reference_answer is None else REFERENCE_LINE.format(answer=_render(reference_answer))
    return CRITIQUE_TEMPLATE.format(question=question.strip(), reference=reference, steps=rendered or NO_STEPS)


@dataclass(frozen=True)
class Critique:
    """One judge's verdict on one response.

    flagged: the 0-based indices of the steps it calls wrong; None when it abstained (no
    parseable verdict line). out_of_range: how many numbers it named outside 1..num_steps
    (dropped; a judge quality signal).
    """

    flagged: frozenset[int] | None
    out_of_range: int = 0


# A verdict line: optional whitespace and markdown ("**", "-", "#", ">", "`", "_"), then the
# prefix, case-insensitive, where "**" may also close before the colon ("**Wrong steps**:").
_VERDICT_LINE = re.compile(r"^[\s*_\-#>`]*wrong\s+steps\s*[*_`]*\s*:(.*)$", re.IGNORECASE)
_NONE_ANSWERS = frozenset({"none", "no wrong steps", "no wrong step", "no steps", "none of them",
                           "none of the steps"})
# One listed number: optional "Step"/"Steps"/"#", then a possibly negative integer.
_ITEM = re.compile(r"(?:steps?\s*)?#?\s*(-?[0-9]+)", re.IGNORECASE)
# Between numbers: commas, semicolons, "&" or "and" (any run of them), or plain whitespace.
_SEPARATOR = re.compile(r"(?:\s*(?:[,;&]|\band\b)\s*)+|\s+", re.IGNORECASE)


def parse_critique(text: str, num_steps: int) -> Critique:
    """The verdict of the LAST line of text that starts with VERDICT_PREFIX (case-insensitive,
    after optional whitespace and markdown), for a response of num_steps steps.

    After the prefix (markdown and one trailing period removed) the judge may write "none"
    (or "no wrong steps", ...: the empty set) or a list of numbers, each optionally behind
    "Step" or "#", separated by commas, semicolons, spaces, "&" or "and" (a trailing
    separator is ignored). Anything else abstains (flagged=None): no verdict line, nothing
    after the prefix, words, decimals, and ranges such as "3-5" (the format asks for a list;
    guessing what a range means would put words in the judge's mouth, and an abstention
    only costs its vote). Numbers outside 1..num_steps (0, negatives, too large) are dropped
    and counted; they are compared by digit count first, so a number of any length is safe.
    Duplicates count once.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    body = None
    for line in text.splitlines():
        match = _VERDICT_LINE.match(line)
        if match:
            body = match.group(1)
    if body is None:
        return Critique(None)
    body = body.strip().strip("*_`").strip()
    if body.endswith("."):
        body = body[:-1].rstrip()
    if not body:
        return Critique(None)
    if body.lower() in _NONE_ANSWERS:
        return Critique(frozenset())
    flagged, out_of_range = set(), 0
    limit_digits = len(str(num_steps))
    pos = 0
    while pos < len(body):  # alternate number, separator; anything else abstains
        item = _ITEM.match(body, pos)
        if item is None:
            return Critique(None)
        digits = item.group(1)
        negative = digits.startswith("-")
        digits = digits.lstrip("-").lstrip("0") or "0"
        # Invariant: int() only ever sees at most as many digits as num_steps has.
        if negative or len(digits) > limit_digits or not 1 <= int(digits) <= num_steps:
            out_of_range += 1
        else:
            flagged.add(int(digits) - 1)
        pos = item.end()
        sep = _SEPARATOR.match(body, pos)
        if sep is None:
            if pos < len(body):  # e.g. "3-5" or "2x"
                return Critique(None)
            break
        pos = sep.end()
    return Critique(frozenset(flagged), out_of_range)


def vote(critiques: Sequence[Critique], num_steps: int, mode: str = "intersection") -> frozenset[int]:
    """The steps flagged after voting among the critiques that did not abstain.

    "intersection": flagged by every valid critique (the default; best for small policies in
    the paper); "majority": by at least half of them (count * 2 >= valid); "union": by any.
    Abstentions do not vote; if all abstained, nothing is flagged.
    """
    if mode not in VOTING_MODES:
        raise ValueError(f"unknown voting mode {mode!r}; choose one of {VOTING_MODES}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    valid = [c.flagged for c in critiques if c.flagged is not None]
    for flagged in valid:
        bad = sorted(i for i in flagged if not 0 <= i < num_steps)
        if bad:
            raise ValueError(f"a critique flags step indices {bad} outside 0..{num_steps - 1} (num_steps={num_steps})")
    if not valid:
        return frozenset()
    counts = [sum(i in flagged for flagged in valid) for i in range(num_steps)]
    need = {"intersection": len(valid), "majority": (len(valid) + 1) // 2, "union": 1}[mode]
    # count * 2 >= valid  <=>  count >= ceil(valid / 2).
    return frozenset(i for i, count in enumerate(counts) if count >= need)


def _check_step_ends(num_tokens: int, step_ends: Sequence[int]) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if any(b <= a for a, b in zip([0, *step_ends[:-1]], step_ends)):
        raise ValueError(f"step ends must rise strictly from above 0, got {list(step_ends)}")
    last = step_ends[-1] if step_ends else 0
    if last != num_tokens:
        raise ValueError(f"the last step end must equal num_tokens={num_tokens}, got {list(step_ends)}")


def token_rewards(num_tokens: int, step_ends: Sequence[int], flagged: Collection[int], outcome: float,
                  w_whole: float = 2.0, w_process: float = 1.0) -> torch.Tensor:
    """CAPO's per-token reward, float32 [num_tokens]: outcome * w_whole, minus w_process on
    every token of a flagged step (step i covers tokens [step_ends[i-1], step_ends[i])).

    With the paper's defaults (2, 1) and a 0/1 outcome a token gets +2, +1, 0 or -1: a
    correct answer always outweighs a flagged step. flagged holds 0-based step indices
    already checked against the step count; one outside it is an error here.
    """
    if w_process < 0:
        raise ValueError(f"w_process must be >= 0 (it is a penalty), got {w_process}")
    _check_step_ends(num_tokens, step_ends)
    bad = sorted(i for i in flagged if not 0 <= i < len(step_ends))
    if bad:
        raise ValueError(f"flagged step indices {bad} outside 0..{len(step_ends) - 1} ({len(step_ends)} steps)")
    rewards = torch.full((num_tokens,), float(outcome) * w_whole, dtype=torch.float32)
    starts = [0, *step_ends[:-1]]
    for i in set(flagged):  # a set: a duplicated index penalises its step once
        rewards[starts[i]:step_ends[i]] -= w_process
    return rewards


def group_token_advantages(rewards: Sequence[torch.Tensor], groups: Sequence[int],
                           eps: float = 1e-6) -> list[torch.Tensor]:
    """Per-token advantages (R_t - mean) / (std + eps), mean and std over ALL tokens of all
    responses that share a group id (the n samples of one prompt), as CAPO's Eq. 2 is
    described.

    groups[j] is response j's group id. As engine.rl.advantages.grpo_advantages: std is the
    unbiased sample std, eps = 1e-6 added to it; a group of fewer than two tokens, or whose
    tokens all have the same reward, gets zeros. Responses of 0 tokens get empty tensors.
    Returned tensors are float32, computed in float64.
    """
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} reward tensors for {len(groups)} group ids")
    for j, r in enumerate(rewards):
        if r.dim() != 1:
            raise ValueError(f"response {j}: rewards must be 1-D, got shape {tuple(r.shape)}")
    members: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        members.setdefault(g, []).append(j)
    out: list[torch.Tensor] = [torch.zeros(0)] * len(rewards)
    for idx in members.values():
        flat = torch.cat([rewards[j].detach().double().flatten() for j in idx])
        constant = flat.numel() < 2 or bool((flat == flat[0]).all())
        mean = flat.mean() if flat.numel() else flat.new_zeros(())
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        for j in idx:
            r = rewards[j].detach().double()
            # Invariant: a constant group gives exact zeros, not rounding noise over eps.
            adv = torch.zeros_like(r) if constant else (r - mean) / (std + eps)
            out[j] = adv.float()
    return out


# "a op b = c" alone on a line, integers possibly negative, op in + - *.
_EQUATION = re.compile(r"\s*(-?[0-9]+)\s*([-+*])\s*(-?[0-9]+)\s*=\s*(-?[0-9]+)\s*")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def rule_wrong_steps(steps: Sequence[str]) -> frozenset[int]:
    """An exact judge for the built-in arithmetic task: the 0-based steps with a line
    "a op b = c" (op in + - *) where c != a op b.

    Each line is checked on its own, as CAPO's judge judges "only the correctness of the
    step itself": a line that computes correctly from a wrong earlier result is not flagged.
    Lines that are not exactly one such equation (the "#### answer" line, prose, "a+b=c=d")
    are never flagged; neither are numbers beyond Python's int() digit limit.
    """
    wrong = set()
    for i, step in enumerate(steps):
        for line in step.splitlines():
            match = _EQUATION.fullmatch(line)
            if match is None:
                continue
            try:
                a, b, c = int(match.group(1)), int(match.group(3)), int(match.group(4))
            except ValueError:  # over sys.get_int_max_str_digits()
                continue
            if _APPLY[match.group(2)](a, b) != c:
                wrong.add(i)
    return frozenset(wrong)


def flag_counts(predicted: Sequence[Collection[int]], truth: Sequence[Collection[int]]) -> tuple[int, int, int]:
    """(|pred & truth|, |pred|, |truth|) summed over responses: what micro precision and recall
    are made of (counts add up across batches and ranks; ratios do not)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted flag sets for {len(truth)} true ones")
    hits = n_pred = n_true = 0
    for p, t in zip(predicted, truth):
        p, t = set(p), set(t)
        hits += len(p & t)
        n_pred += len(p)
        n_true += len(t)
    return hits, n_pred, n_true


def flag_precision_recall(predicted: Sequence[Collection[int]],
                          truth: Sequence[Collection[int]]) -> tuple[float | None, float | None]:
    """Micro-averaged (precision, recall) of flagged steps over responses: precision =
    |pred & truth| / |pred| (None if nothing was predicted), recall = |pred & truth| / |truth|
    (None if nothing is truly wrong)."""
    hits, n_pred, n_true = flag_counts(predicted, truth)
    return (hits / n_pred if n_pred else None, hits / n_true if n_true else None)
