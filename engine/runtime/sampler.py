"""Next-token sampling for a whole batch at once: temperature, top-k, top-p, greedy, log-probs.

`sample(logits [B, V], SamplingBatch)` draws one token per row with a fixed number of tensor
operations whatever B is (no Python loop over rows), and costs exactly one device->host
transfer per step in the common case: the tokens (and their log-probs, and the rows that
need the rare full-sort fallback) come back together in one copy.

Randomness is counter-based. Each row brings its own uniform u in (0, 1], a pure hash of
(the sequence's seed, the position of the token being drawn) computed on the host by
`counter_uniforms`, and the token is the inverse CDF of the row's filtered distribution at
u. Hence:
  * a seeded row is reproducible without a torch.Generator per row, and its token does not
    depend on what else is batched (every operation below is row-wise);
  * a draw is keyed by (seed, position), not by how many numbers a generator has handed out,
    so a sequence that is preempted and recomputed, or forked from a shared prefix, redraws
    exactly the numbers it would have drawn anyway.

The one-sync contract. Rows without a cut (top_p == 1, top_k == 0) draw from the cumulative
sum of the unsorted full-vocabulary probabilities: no sort. Rows with a cut take the
`candidates` most likely tokens (torch.topk, sorted; on a CPU the first of a full sort with
ties by ascending id, the order the C++ loop uses) and apply top-k / top-p to them, which
is exact when the row's top-k lies within the candidates, or when it has no top-k cut and
the candidates' mass reaches its top_p. A row where neither holds is flagged on the device;
the flag travels with the tokens in the single transfer, and only then (rare: a top_p close
to 1 over a flat distribution, or top_k > candidates) are those rows redone with a full
descending sort and a second transfer.

Two implementations, one definition. On a CPU the default is a C++ row loop (`engine._C.sample_rows`,
csrc/sampler.h): torch still computes logits / T, log_softmax and exp (three vectorised passes),
and the loop does the rest per row with a partial sort of just the tokens a cut can keep, in one
call that releases the GIL: 2-9x faster than the ~40 tensor operations above at 504 x 128 with a
cut (1.5x without), which matters where the sampler's time is the host's (a CPU engine, the
overlap worker; `python -m bench.sampler`). Its
tokens and log-probs are the torch path's bit for bit on a CPU (tests/runtime/test_cpp_sampler.py),
because every sum over a row is a float64 running sum in a stated order (vocabulary order for a
row's total, descending probability for a cut), which is what torch's CPU cumsum computes. On
CUDA the torch path runs, with reductions in place of the running sums: the same definition up
to float64 rounding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch
import torch.nn.functional as F

from engine import _C

SAMPLER_BACKENDS = ("auto", "torch", "cpp")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def counter_uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One uniform in (0, 1] per row, a pure function of (seed, position): float64 [B].

    seeds: uint64 [B] (each sequence's own seed); positions: int64 [B] (the index in the
    sequence of the token being sampled). x = seed ^ (position + 1) * golden ratio, then the
    splitmix64 finaliser; the top 53 bits give u = (k + 1) / 2**53, k in [0, 2**53): exactly
    representable in float64, never 0 (so target = u * total > 0 in the draw), at most 1.
    53 bits, not 24: a token of probability 1e-9 is drawn at its own rate, not on a coarse grid.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    positions = np.asarray(positions, dtype=np.int64)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        x = seeds ^ ((positions.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX1
        x = x ^ (x >> np.uint64(27))
        x = x * _MIX2
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * (2.0 ** -53)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature: torch.Tensor    # float32 [B], > 0 (1.0 on greedy rows)
    top_p: torch.Tensor          # float32 [B] in (0, 1]
    top_k: torch.Tensor          # int64 [B], 0 = no top-k cut
    uniform: torch.Tensor        # float64 [B] in (0, 1]: the row's draw (counter_uniforms)
    greedy: torch.Tensor | None  # bool [B]; None when no row is greedy
    all_greedy: bool             # host-known: every row is greedy (skip sampling entirely)
    any_cut: bool                # host-known: some non-greedy row has top_p < 1 or top_k > 0
    want_logprobs: bool          # host-known: some row asked for log-probs
    any_uncut: bool = True       # host-known: some non-greedy row has no cut (False: skip the full-vocabulary CDF)

    @classmethod
    def build(
        cls,
        temperature: Seq[float] | np.ndarray,
        top_p: Seq[float] | np.ndarray,
        top_k: Seq[int] | np.ndarray,
        uniform: Seq[float] | np.ndarray,
        *,
        want_logprobs: bool = False,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
    ) -> "SamplingBatch":
        """From host arrays, with SamplingParams' convention temperature 0 = greedy (vocab_size: see host_flags).

        Vectorised (no loop over rows), with one host->device copy for all the columns. (The
        engine packs its own tensors; this is a convenience for tests and simple callers.)
        """
        temperature = np.asarray(temperature, dtype=np.float64)
        greedy = temperature == 0
        top_p = np.asarray(top_p, dtype=np.float64)
        top_k = np.asarray(top_k, dtype=np.int64)
        uniform = np.asarray(uniform, dtype=np.float64)
        packed = np.stack([np.where(greedy, 1.0, temperature), top_p, top_k, uniform, greedy])
        dev = torch.from_numpy(packed).to(device)
        return cls(
            temperature=dev[0].float(), top_p=dev[1].float(), top_k=dev[2].long(), uniform=dev[3],
            greedy=dev[4].bool() if greedy.any() else None, want_logprobs=want_logprobs,
            **host_flags(greedy, top_p, top_k, vocab_size),
        )


def host_flags(greedy: np.ndarray, top_p: np.ndarray, top_k: np.ndarray,
               vocab_size: int | None = None) -> dict[str, bool]:
    """SamplingBatch's host-known flags (all_greedy, any_cut, any_uncut) from the rows' host arrays.

    A row cuts when top_p < 1 or 0 < top_k < vocab_size (a larger top_k cuts nothing). Without
    vocab_size a row with top_p == 1 and a top_k may go either way, so it counts for both flags:
    they say which paths to compute, and a row must never miss its own.
    """
    sampled = ~greedy
    if vocab_size is None:
        may_cut, may_uncut = (top_p < 1) | (top_k > 0), ~(top_p < 1)
    else:
        may_cut = (top_p < 1) | ((top_k > 0) & (top_k < vocab_size))
        may_uncut = ~may_cut
    return dict(all_greedy=bool(greedy.all()), any_cut=bool((sampled & may_cut).any()),
                any_uncut=bool((sampled & may_uncut).any()))


def sample(
    logits: torch.Tensor, batch: SamplingBatch, *, candidates: int = 256, ids_out: list | None = None,
    backend: str = "auto",
) -> tuple[list[int], list[float] | None]:
    """Sample one token per row of logits [B, V] (any float dtype; math in fp32).

    Greedy rows take the argmax of the raw logits. Other rows draw from softmax(logits /
    temperature) after the row's top-k cut and then its top-p cut (the smallest
    descending-probability prefix whose mass reaches top_p survives: a token is kept if the
    mass strictly before it is below top_p, so the most likely token always is),
    renormalised, at the inverse CDF of the row's uniform. Returns the tokens and, when
    batch.want_logprobs, their log-probabilities under log_softmax(logits / temperature)
    (temperature 1 for greedy rows) before any cut; else None.

    Every operation is row-wise: a row's token depends only on its own logits, parameters
    and uniform. One device->host transfer, two when some row needs the full-sort fallback.
    Raises ValueError when a sampled row's logits are not finite (NaN, +inf, all -inf).
    ids_out: a list that receives the tokens as an int64 tensor on the logits' device (the
    engine's next step reads its input ids from it on the device).
    backend: "cpp" (the C++ row loop; CPU logits only), "torch", or "auto": cpp on a CPU, torch
    elsewhere; with "auto" the ENGINE_SAMPLER environment variable (torch or cpp) picks the CPU's.
    `candidates` is the torch path's (the C++ loop sorts what it needs).
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    B, V = logits.shape
    if B == 0:
        return [], ([] if batch.want_logprobs else None)
    if _resolve_backend(backend, logits.device) == "cpp":
        return _sample_cpp(logits, batch, ids_out)
    if batch.all_greedy:
        token = logits.argmax(-1)
        chosen = None
        if batch.want_logprobs:
            chosen = torch.log_softmax(logits.float(), -1).gather(1, token[:, None]).squeeze(1)
        if ids_out is not None:
            ids_out.append(token)
        return _as_lists(*_unpack(_to_host(_pack(token, chosen)), batch.want_logprobs))

    scaled = logits.float()
    t = batch.temperature.float()[:, None]
    scaled = scaled / t if scaled.data_ptr() == logits.data_ptr() else scaled.div_(t)  # never write the input
    logprobs = torch.log_softmax(scaled, -1)
    del scaled
    probs = logprobs.exp()
    u = batch.uniform.double()
    top_p = batch.top_p.float()

    # Rows without a cut: inverse CDF over the unsorted vocabulary, no sort (skipped when
    # every row has a cut, the trainer's usual top_p < 1).
    token = weight = redo = None
    if batch.any_uncut:
        token, weight, _ = _inverse_cdf(probs, u)
    if batch.any_cut:
        total = _row_sums(probs)  # the row's full mass, the same whatever the other rows ask for
        k, cut = _effective_top_k(batch.top_k, top_p, V)
        c = min(candidates, V)
        if probs.device.type == "cpu":  # ties by ascending id, as the full sort and the C++ loop order them
            cand_i = _sort_descending_cpu(probs) if c == V else _top_candidates_cpu(probs, c)
            cand_p = probs.gather(1, cand_i)
        else:
            cand_p, cand_i = torch.topk(probs, c, dim=-1, largest=True, sorted=True)
        kept, mass = _cut_sorted(cand_p, top_p, k, total, V)
        # Exact on the candidates when the top-k cut lies within them, or when there is no
        # top-k cut and their mass reaches top_p (the first token past them is then cut,
        # and so is every later one). Else the row needs the full sort.
        exact = (k <= c) | ((k >= V) & (mass >= top_p))
        idx, cand_w, _ = _inverse_cdf(kept, u, flat=True)
        cand_token = cand_i.gather(1, idx[:, None]).squeeze(1)
        token = cand_token if token is None else torch.where(cut, cand_token, token)
        weight = cand_w if weight is None else torch.where(cut, cand_w, weight)
        redo = cut & ~exact
    if token is None:  # no row samples (cannot happen with all_greedy False): keep the shapes honest
        token, weight = logits.argmax(-1), torch.ones(B, device=logits.device)
    # Guard: the draw cannot land on a zero weight as long as a zero weight leaves the running
    # sum unchanged (see _inverse_cdf), which the candidates' flattened CDF guarantees and the
    # unsorted one (not flattened: a cummax over [B, V] would cost another pass) gets from
    # torch's scans. A row that lands on one anyway, or whose logits are not finite (NaN
    # weights), is redone by the fallback, which draws from a flattened CDF or raises.
    bad = ~(weight > 0)
    redo = bad if redo is None else redo | bad
    if batch.greedy is not None:
        greedy = batch.greedy.bool()
        token = torch.where(greedy, logits.argmax(-1), token)
        redo = redo & ~greedy
    token = torch.where(redo, -1, token)
    chosen = logprobs.gather(1, token.clamp(min=0)[:, None]).squeeze(1) if batch.want_logprobs else None
    tokens, lps = _unpack(_to_host(_pack(token, chosen)), batch.want_logprobs)  # the one sync of the common case
    rows = np.flatnonzero(tokens < 0)
    if rows.size:
        tokens[rows], redo_lps = _redo_full_sort(probs, logprobs, batch, rows)
        if lps is not None:
            lps[rows] = redo_lps
        token = torch.from_numpy(tokens).to(token.device)  # (rare) the redone rows, on the device too
    if ids_out is not None:
        ids_out.append(token)
    return _as_lists(tokens, lps)


def reference_filtered_probs(logprobs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Probabilities after each row's top-k cut, then top-p cut (as transformers and vLLM order them), by a full sort.

    logprobs [B, V]; top_p float [B] in (0, 1]; top_k int64 [B], 0 = none. The filtered
    rows are renormalised; rows without a cut (top_p == 1 and top_k == 0) get
    exp(logprobs) untouched, whatever the other rows ask for.
    """
    probs = logprobs.float().exp()
    V = probs.shape[-1]
    top_p = top_p.to(probs.device, torch.float32)
    top_k = top_k.to(probs.device, torch.int64)
    k, _ = _effective_top_k(top_k, top_p, V)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    kept, _ = _cut_sorted(sorted_p, top_p, k, _row_sums(probs), V)
    kept = (kept / kept.sum(-1, keepdim=True)).float()
    filtered = torch.zeros_like(kept).scatter_(1, order, kept)
    return torch.where(((top_k > 0) | (top_p < 1))[:, None], filtered, probs)


# ---------------------------------------------------------------------------- helpers

def _effective_top_k(top_k: torch.Tensor, top_p: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, cut): k = top_k when it cuts (0 < top_k < V) else V; cut = the row has a real cut.

    A top_k >= V cuts nothing, so such a row with top_p == 1 takes the unsorted path.
    """
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    return k, (top_p < 1) | (k < V)


def _cut_sorted(
    sorted_p: torch.Tensor, top_p: torch.Tensor, k: torch.Tensor, total: torch.Tensor, vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p on descending probabilities [R, N] (all `vocab` of them, or the first N).

    Returns the kept weights, float64 (renormalised after the top-k cut, not after the top-p
    cut), and the mass of all N tokens after the top-k renormalisation. A row with a top-k cut
    (k < vocab) divides by the running sum of its k kept tokens in descending order; a row
    without one divides by `total`, its whole mass in vocabulary order (`_row_sums`). A token is
    kept when the mass strictly before it is below top_p.
    """
    n = sorted_p.shape[-1]
    rank = torch.arange(n, device=sorted_p.device)
    p = torch.where(rank < k[:, None], sorted_p, 0.0).double()
    denom = torch.where(k < vocab, _row_sums(p), total)
    w = p / denom[:, None]
    cum = w.cumsum(-1)
    # Keep a token if the mass strictly before it is below top_p: the smallest prefix whose mass
    # reaches top_p survives, and the most likely token always does. (The exclusive running sum
    # never decreases, so the kept tokens are a prefix.)
    before = F.pad(cum[:, :-1], (1, 0))
    return torch.where(before < top_p[:, None], w, 0.0), cum[:, -1]


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """float64 [R]: each row's sum; on a CPU the sequential running sum in column order (torch's
    CPU cumsum is a plain loop, which the C++ row loop repeats exactly: test_cpp_sampler.py would
    catch a torch that changed it), elsewhere a reduction."""
    x = x.double()
    return x.cumsum(-1)[:, -1] if x.device.type == "cpu" else x.sum(-1)


def _inverse_cdf(
    weights: torch.Tensor, u: torch.Tensor, *, flat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the first index whose cumulative weight reaches u * total: (index, its weight, total).

    weights [R, N] >= 0 (unnormalised), u float64 [R] in (0, 1]. The CDF is summed in
    float64: in float32, a tail token below half an ulp of the running sum (~3e-8 near 1)
    would be absorbed and never drawn, and a 150k vocabulary has a lot of such tail.

    Why a zero-weight token is never returned: target = u * total is > 0 (u >= 2**-24 and
    total >= the largest weight > 0) and <= total (u <= 1, and rounding is monotone), and
    searchsorted(right=False) returns i with cdf[i] >= target and, for i > 0, cdf[i - 1] <
    target (binary search returns an index it compared, or N, and cdf[N-1] = total >= target
    excludes N). So cdf[i] > cdf[i - 1] (or cdf[0] > 0): the weight at i is positive,
    provided a zero weight leaves the running sum unchanged. It does with torch's scans
    (sequential on CPU; Sklansky on CUDA adds a zero to an exact partial sum), except in
    principle CUDA's single-row CUB scan, which may reassociate; `flat` makes it hold by
    construction (zero-weight entries copy the previous CDF value: cummax of the CDF with
    -inf at zeros) at the cost of a cummax, which the callers pay only on narrow tensors,
    and only on CUDA (the CPU scan is sequential, so it already holds there).
    """
    cdf = weights.double().cumsum_(-1)
    if flat and weights.is_cuda:
        cdf = torch.where(weights > 0, cdf, float("-inf")).cummax(-1).values
    total = cdf[:, -1].clone()  # not a view: the [R, N] float64 CDF is freed on return
    target = (u * total)[:, None]
    idx = torch.searchsorted(cdf, target, right=False).squeeze(1).clamp_(max=weights.shape[-1] - 1)
    return idx, weights.gather(1, idx[:, None]).squeeze(1), total


def _redo_full_sort(
    probs: torch.Tensor, logprobs: torch.Tensor, batch: SamplingBatch, rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The fallback: redraw `rows` (host indices) with a full descending sort and the same uniforms."""
    V = probs.shape[-1]
    index = torch.from_numpy(rows.astype(np.int64)).to(probs.device)
    top_p = batch.top_p[index].float()
    k, cut = _effective_top_k(batch.top_k[index], top_p, V)
    row_probs = probs.index_select(0, index)
    sorted_p, order = row_probs.sort(dim=-1, descending=True, stable=True)  # ties by ascending id
    kept, _ = _cut_sorted(sorted_p, top_p, k, _row_sums(row_probs), V)
    kept = torch.where(cut[:, None], kept, sorted_p)  # a row without a cut got here by the guard only
    idx, weight, _ = _inverse_cdf(kept, batch.uniform[index].double(), flat=True)
    token = torch.where(weight > 0, order.gather(1, idx[:, None]).squeeze(1), -1)
    chosen = None
    if batch.want_logprobs:
        chosen = logprobs.index_select(0, index).gather(1, token.clamp(min=0)[:, None]).squeeze(1)
    tokens, lps = _unpack(_to_host(_pack(token, chosen)), batch.want_logprobs)
    failed = rows[tokens < 0]
    if failed.size:
        raise _not_finite(failed)
    return tokens, lps


def _sample_cpp(
    logits: torch.Tensor, batch: SamplingBatch, ids_out: list | None,
) -> tuple[list[int], list[float] | None]:
    """`sample` on a CPU through the C++ row loop; the same tokens and log-probs as the torch path.

    torch computes the tempered log-softmax and its exp exactly as the torch path does (the same
    operations on the same tensors); `_C.sample_rows` reads them in place, without the GIL.
    """
    logits32 = logits.float().contiguous()  # (no copy for the engine's fp32 logits)
    greedy = None if batch.greedy is None else batch.greedy.bool().contiguous().numpy()
    if batch.all_greedy and greedy is None:  # (a batch built by hand may leave the mask out)
        greedy = np.ones(logits.shape[0], dtype=bool)
    probs = logprobs = None
    if batch.all_greedy:
        if batch.want_logprobs:
            logprobs = torch.log_softmax(logits32, -1)
    else:
        logprobs = torch.log_softmax(logits32 / batch.temperature.float()[:, None], -1)
        probs = logprobs.exp()
    tokens, chosen = _C.sample_rows(
        logits32.numpy() if greedy is not None else None,
        None if probs is None else probs.numpy(),
        logprobs.numpy() if batch.want_logprobs else None,
        batch.top_p.float().contiguous().numpy(), batch.top_k.long().contiguous().numpy(),
        batch.uniform.double().contiguous().numpy(), greedy,
    )
    failed = np.flatnonzero(tokens < 0)
    if failed.size:
        raise _not_finite(failed)
    if ids_out is not None:
        ids_out.append(torch.from_numpy(tokens))
    return _as_lists(tokens, chosen)


def _not_finite(rows: np.ndarray) -> ValueError:
    """The error for sampled rows that could not be drawn (both paths raise the same one)."""
    return ValueError(f"cannot sample rows {rows.tolist()}: their logits are not finite (NaN, +inf or all -inf)")


def _resolve_backend(backend: str, device: torch.device) -> str:
    """"cpp" or "torch" for logits on `device` (see `sample`)."""
    if backend not in SAMPLER_BACKENDS:
        raise ValueError(f"backend must be one of {SAMPLER_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("ENGINE_SAMPLER", "")
        if env not in ("", "torch", "cpp"):
            raise ValueError(f"ENGINE_SAMPLER must be torch or cpp, got {env!r}")
        backend = (env or "cpp") if device.type == "cpu" else "torch"  # (the variable picks the CPU's path)
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"the cpp sampler reads CPU logits; these are on {device} (use backend='torch')")
    return backend


def _sort_descending_cpu(probs: torch.Tensor) -> torch.Tensor:
    """int64 [R, N]: each row's indices by descending probability, ties by ascending index.

    numpy's vectorised sort of one uint64 key per entry (the probability's bits, reversed, then
    the index, the C++ loop's key): unique keys, so the order does not depend on the sort's
    algorithm or the CPU's instruction set, and ~5x faster than torch's topk or sort on a CPU.
    probs >= 0, whose float32 bits order as the values do.
    """
    p = probs.float().contiguous().numpy()
    bits = p.view(np.uint32).astype(np.uint64)
    key = ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(32)) | np.arange(p.shape[-1], dtype=np.uint64)
    key.sort(axis=-1)
    return torch.from_numpy((key & np.uint64(0xFFFFFFFF)).astype(np.int64))


def _top_candidates_cpu(probs: torch.Tensor, c: int) -> torch.Tensor:
    """int64 [R, c]: each row's c most likely indices in order, ties by ascending index.

    torch.topk over one unique int64 key per entry (the probability's float32 bits, then the
    reversed index), so ties come out the same way as `_sort_descending_cpu` and the C++ loop
    whatever topk's algorithm. probs >= 0.
    """
    bits = probs.float().contiguous().view(torch.int32).long()
    V = probs.shape[-1]
    key = (bits << 32) | (0xFFFFFFFF - torch.arange(V, device=probs.device))
    return key.topk(c, dim=-1, largest=True, sorted=True).indices


def _pack(token: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    """Tokens (and log-probs) in one tensor, for one transfer; token ids < 2**53 are exact in float64."""
    return token if chosen is None else torch.stack((token.double(), chosen.double()))


def _to_host(t: torch.Tensor) -> np.ndarray:
    """The device->host transfer (a sync on CUDA)."""
    return t.cpu().numpy()


def _unpack(host: np.ndarray, want_logprobs: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens int64 [B], log-probs float64 [B] or None) from what _pack sent."""
    if not want_logprobs:
        return host.astype(np.int64, copy=True), None
    return host[0].astype(np.int64), host[1].copy()


def _as_lists(tokens: np.ndarray, lps: np.ndarray | None) -> tuple[list[int], list[float] | None]:
    return tokens.tolist(), (None if lps is None else lps.tolist())
