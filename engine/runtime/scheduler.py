"""Continuous batching over the paged KV pool: admission, chunked prefill, forks, preemption.

Every step the scheduler hands the engine a `Scheduled`: the sequences whose KV is computed
in this forward (tokens [start, end) of each), and the sequences that sample a token after
it. Running sequences come first, oldest first (a decode is 1 token, an unfinished prefill
a chunk), then waiting sequences are admitted in FIFO order while the token budget, the
sequence cap and the KV pool allow. When the pool runs dry, cached prefixes are evicted and
then the newest running sequences are preempted: their KV goes into the prefix tree and they
rejoin the front of the queue, to be re-matched later.

Page ownership (the invariant the tests check): the allocator's reference count of every
page equals the number of radix nodes whose slots touch it plus the number of running
sequences whose page table holds it; a page is free exactly when that count is 0.

Locks and holds: a matched radix node is locked only while its sequence is being admitted
(from the match until its pages are shared or planned for copying), so eviction cannot free
a page it is about to read. A running sequence holds references to its own pages instead of
a lock. A waiting sequence whose prefix is in the tree holds that node (`RadixTree.hold`):
the prefixes that queued requests will match are evicted last, finished outputs (inserted
cold) first, so a phase whose outputs overflow the pool never evicts the states it has not
visited yet.

KV copies are deferred into the step (`copies_before` run before the forward, `copies_after`
after it) so that admission does no device work: a copy's source is read before anything in
the step writes (the forward, or a later copy in the same batched op, which gathers first).

Planning one step ahead (engine.py): the engine plans step N+1 before step N's tokens reach
the host. A sequence sampled by step N then ends with a PLACEHOLDER token, which step N+1
computes like any other (the device fills in its id). A sequence whose pending token is its
last by length (`max_len`) is left out: it finishes for sure. One that step N finishes by EOS
or a stop has its row in step N+1 wasted: `finish` leaves that row's KV out of the tree and
counts it (`overlap_wasted_rows`). Preemption waits for a drained pipeline: with a step in
flight, a plan that finds the pool short is undone and returned with `need_sync`, and the
engine plans again once that step's tokens are in (finishes may have freed the pages).

Admission keeps a watermark: while other sequences run, it leaves a free page for every
running sequence whose next token starts a page and for every pending fork, so a decode
step right after an admission does not preempt for lack of pages (a long prefill chunk
may still need more than that).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.cache import PageAllocator, RadixTree
from engine.runtime.batch import RowTable
from engine.runtime.params import EngineStats
from engine.runtime.sequence import Sequence, Status


@dataclass
class Scheduled:
    """One step's work, as the scheduler planned it."""

    seqs: list[Sequence] = field(default_factory=list)     # sequences computing KV, in batch order
    starts: list[int] = field(default_factory=list)        # seqs[i] computes positions [starts[i], ends[i])
    ends: list[int] = field(default_factory=list)
    samplers: list[Sequence] = field(default_factory=list)  # sequences that sample a token after the forward
    sample_rows: list[int] = field(default_factory=list)   # the flat token whose hidden state each one samples from
    num_tokens: int = 0             # tokens computed in this forward (sum of ends - starts)
    decode_only: bool = True        # every entry computes one token and samples it (samplers == seqs)
    copies_before: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, count)
    copies_after: list[tuple[int, int, int]] = field(default_factory=list)
    cache_after: list[Sequence] = field(default_factory=list)  # prefills to insert into the tree after the forward
    requeued: dict[int, list[Sequence]] = field(default_factory=dict)  # leader seq_id -> siblings that found no page
    need_sync: bool = False         # the pool is short and a step is in flight: nothing planned, drain and retry


class Scheduler:
    def __init__(self, allocator: PageAllocator, tree: RadixTree, rows: RowTable, stats: EngineStats, *,
                 max_num_seqs: int, max_batch_tokens: int, prefix_cache: bool):
        self.allocator, self.tree, self.rows, self.stats = allocator, tree, rows, stats
        self.page_size = allocator.page_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; forked siblings follow their leader
        self._num_seqs = 0  # running sequences plus the fork-pending siblings of running leaders
        self._admissions = 0

    # ------------------------------------------------------------------ queue
    def add(self, leader: Sequence) -> None:
        """Queue a prompt; leader.siblings are forked from it once its prefill is done.

        The deepest cached node of the prompt is held, so eviction keeps it while it waits.
        """
        for sib in leader.siblings:
            sib.status = Status.FORK_PENDING
        if self.prefix_cache:
            node, _, _ = self.tree.match_prefix(leader.tokens, len(leader.tokens) - 1)
            self._hold(leader, node)
        self.waiting.append(leader)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _hold(self, seq: Sequence, node: int) -> None:
        if node > 0:
            self.tree.hold(node)
            seq.hold_node = node

    def _drop_hold(self, seq: Sequence) -> None:
        if seq.hold_node:
            self.tree.release_hold(seq.hold_node)  # False if it was evicted anyway: nothing to undo
            seq.hold_node = 0

    # ------------------------------------------------------------------ schedule
    def schedule(self, can_preempt: bool = True) -> Scheduled:
        """Plan this step: running sequences first (growing their page tables), then admissions, then forks.

        can_preempt: False while a step is in flight; if the running sequences' pages do not fit,
        nothing is planned (nothing evicted either) and the result has `need_sync` set.
        """
        out = Scheduled()
        saved = self.stats.prefill_tokens, self.stats.decode_tokens
        grow = self._plan_running(self.running, out)
        if grow:
            total = sum(need for _, need in grow)
            if not can_preempt and self.allocator.num_free < total:
                # Short with a step in flight: drain first (its finishes may free the pages) rather
                # than evict cached prefixes for a plan that may not need them.
                self._undo(out, saved)
                return Scheduled(need_sync=True)
            if self._make_room(total):
                pages = self.allocator.allocate(total)
                for seq, need in grow:
                    old = len(seq.page_table)
                    seq.page_table += pages[:need]
                    del pages[:need]
                    self.rows.write_pages(seq, old)
            else:  # the pool is short: undo the plan, serve the oldest first, preempt the newest
                self._undo(out, saved)
                served = self._grow_or_preempt(grow)
                out = Scheduled()
                regrow = self._plan_running(served, out)
                assert not regrow, "the survivors' page needs were met above"
        budget = self.max_batch_tokens - out.num_tokens
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self._num_seqs + 1 + len(seq.siblings) > self.max_num_seqs:
                break
            end = self._admit(seq, budget, out)
            if end is None:
                break
            self.waiting.popleft()
            budget -= end - seq.num_computed
            self._add_entry(out, seq, seq.num_computed, end)
        self._plan_samples(out)
        return out

    def _undo(self, out: Scheduled, saved: tuple[int, int]) -> None:
        """Take back a plan of running sequences (no page was given yet): their progress and the token counts."""
        for seq, start in zip(out.seqs, out.starts):
            seq.num_computed = start
        self.stats.prefill_tokens, self.stats.decode_tokens = saved

    def _plan_running(self, seqs: list[Sequence], out: Scheduled) -> list[tuple[Sequence, int]]:
        """Add running sequences to the step, oldest first, within the token budget.

        Returns the (sequence, pages) each still needs for its scheduled tokens.
        """
        P = self.page_size
        budget = self.max_batch_tokens
        grow: list[tuple[Sequence, int]] = []
        for seq in seqs:
            if budget <= 0:
                break
            start = seq.num_computed
            n = len(seq.tokens)
            if n >= seq.max_len:
                continue  # its pending token is its last: the step in flight finishes it by length
            end = n if n - start <= budget else start + budget
            need = (end + P - 1) // P - len(seq.page_table)
            if need > 0:
                grow.append((seq, need))
            budget -= end - start
            if end - start == 1 and end == n and start >= seq.admitted_len:  # a plain decode: the common case
                out.seqs.append(seq)
                out.starts.append(start)
                out.ends.append(end)
                out.num_tokens += 1
                seq.num_computed = end
                self.stats.decode_tokens += 1
            else:
                self._add_entry(out, seq, start, end)
        return grow

    def _add_entry(self, out: Scheduled, seq: Sequence, start: int, end: int) -> None:
        """A prefill chunk, an admission or a sequence whose prefill ends now."""
        out.seqs.append(seq)
        out.starts.append(start)
        out.ends.append(end)
        out.num_tokens += end - start
        prefill = max(min(end, seq.admitted_len) - start, 0)
        self.stats.prefill_tokens += prefill
        self.stats.decode_tokens += end - start - prefill
        seq.num_computed = end  # the forward of this step computes [start, end)
        done = end == len(seq.tokens)
        if end - start != 1 or not done or seq.siblings:
            out.decode_only = False
        if done and seq.siblings:
            out.cache_after.append(seq)  # the prompt becomes matchable (and re-matchable by requeued forks)
        elif not done and start < seq.admitted_len:
            out.cache_after.append(seq)  # a finished prefill chunk becomes matchable at once

    def _plan_samples(self, out: Scheduled) -> None:
        """Who samples after the forward, from which hidden row; then fork the leaders whose prefill ends now."""
        if out.decode_only:
            out.samplers = out.seqs  # token i of the step is sequence i's only token
            return
        offset = 0
        leaders = []
        for seq, start, end in zip(out.seqs, out.starts, out.ends):
            offset += end - start
            if end == len(seq.tokens):
                out.samplers.append(seq)
                out.sample_rows.append(offset - 1)
                if seq.siblings:
                    leaders.append((seq, offset - 1))
        for leader, row in leaders:
            self._fork(leader, row, out)

    def _grow_or_preempt(self, grow: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Give the running sequences their pages oldest first, preempting the newest while the pool is short.

        Returns the running sequences that stay scheduled (a prefix of `running`).
        """
        needs = {id(seq): need for seq, need in grow}
        served: list[Sequence] = []
        for seq in list(self.running):  # victims are always newer than seq
            if seq.status is not Status.RUNNING:
                break  # preempted while serving an older sequence: so is everything after it
            need = needs.get(id(seq), 0)
            while need > 0 and not self._make_room(need):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            if need > 0:
                old = len(seq.page_table)
                seq.page_table += self.allocator.allocate(need)
                self.rows.write_pages(seq, old)
            served.append(seq)
        return served

    def _make_room(self, pages: int) -> bool:
        """Evict cached prefixes until `pages` pages are free; False if that is impossible."""
        if self.allocator.num_free < pages and self.prefix_cache:
            self.stats.evicted_tokens += self.tree.evict(pages)
        return self.allocator.num_free >= pages

    def _watermark(self, seq: Sequence) -> int:
        """Pages to leave free when admitting seq while others run: one per running sequence whose
        next token starts a new page, and one per pending fork (of seq and of running leaders:
        each fork copies a partial page or starts a new one at its first token)."""
        if not self.running:
            return 0
        P = self.page_size
        reserve = len(seq.siblings)
        for s in self.running:
            reserve += (s.num_computed % P == 0) + len(s.siblings)
        return reserve

    def _admit(self, seq: Sequence, budget: int, out: Scheduled) -> int | None:
        """Match seq against the prefix cache, give it pages for its first chunk, mark it running.

        Returns the end of the first chunk, or None when the pool cannot take it now.
        """
        use_cache = self.prefix_cache
        reserve = self._watermark(seq)
        end = self._try_admit(seq, budget, use_cache, reserve, out)
        if end is None and use_cache and not self.running:
            # Alone, the sequence always fits without the cache (Engine checks the pool holds
            # one whole sequence); a locked match can pin a few pages the table does not use.
            end = self._try_admit(seq, budget, False, 0, out)
            if end is None:
                raise RuntimeError(f"KV pool of {self.allocator.num_pages} pages cannot hold one sequence")
        return end

    def _try_admit(self, seq: Sequence, budget: int, use_cache: bool, reserve: int, out: Scheduled) -> int | None:
        node, matched, slots = 0, 0, []
        if use_cache:
            # Keep one token to compute: its logits sample the next token.
            node, matched, slots = self.tree.match_prefix(seq.tokens, len(seq.tokens) - 1)
            if node:
                self.tree.lock(node)  # before any eviction below can take the match away
        held: list[int] = []  # pages this admission holds references to, released if it fails
        try:
            plan = self._plan_pages(slots)
            shared = [p for p in plan if isinstance(p, int)]
            self.allocator.retain(shared)
            held = list(shared)
            end = matched + min(len(seq.tokens) - matched, budget)
            need = self.allocator.pages_for_tokens(end) - len(shared)
            if not self._make_room(need + reserve):
                self.allocator.release(held)
                return None
            fresh = self.allocator.allocate(need)
            held += fresh
            table, it = [], iter(fresh)
            P = self.page_size
            for entry in plan:
                if isinstance(entry, int):
                    table.append(entry)
                else:  # a chunk the sequence cannot share: copy its KV into a page of its own
                    page = next(it)
                    out.copies_before += _runs(entry, page * P)
                    self.stats.copied_tokens += len(entry)
                    table.append(page)
            table += list(it)
        except BaseException:
            self.allocator.release(held)
            raise
        finally:
            if node:
                self.tree.unlock(node)  # the sequence now owns (references or copies) all it reads
        self._drop_hold(seq)
        if seq.admitted_at == 0:  # first admission: these prompt tokens came from the cache
            seq.cached_tokens = matched
        self.stats.cached_tokens += matched
        seq.page_table, seq.num_computed = table, matched
        seq.status, seq.admitted_len, seq.version = Status.RUNNING, len(seq.tokens), self.tree.version
        self._admissions += 1
        seq.admitted_at = self._admissions
        self.rows.attach(seq)
        self.running.append(seq)
        self._num_seqs += 1 + len(seq.siblings)
        return end

    def _plan_pages(self, slots: list[int]) -> list[int | list[int]]:
        """Page-table plan for matched slots: a page id to share, or a slot chunk to copy.

        Chunk j (positions jP .. jP+P-1) is shared when it is one whole page, in order. A
        partial last chunk, or one whose tokens live in different pages (the tree split at a
        fork point inside a page), is copied; so a fork copies at most the partial page.
        """
        P = self.page_size
        plan: list[int | list[int]] = []
        for j in range(0, len(slots), P):
            chunk = slots[j:j + P]
            page = chunk[0] // P
            whole = len(chunk) == P and chunk == list(range(page * P, page * P + P))
            plan.append(page if whole else chunk)
        return plan

    # ------------------------------------------------------------------ forks
    def _fork(self, leader: Sequence, row: int, out: Scheduled) -> None:
        """Fork leader's pending siblings off its KV (its prefill completes in this step's forward).

        Full pages are shared; the partial last page is copied after the forward. Siblings
        that find no page go back to the queue as ordinary sequences (they will hit the
        prefix cache once the leader's prompt is inserted after the forward). The forked
        siblings run right after the leader and sample from its hidden state.
        """
        siblings, leader.siblings = leader.siblings, []
        P = self.page_size
        n = leader.num_computed
        full, partial = n // P, n % P
        shared = leader.page_table[:full]
        forked: list[Sequence] = []
        requeue: list[Sequence] = []
        for sib in siblings:
            if partial and not self._make_room(1):
                sib.status = Status.WAITING
                requeue.append(sib)
                continue
            table = list(shared)
            if partial:
                page = self.allocator.allocate(1)[0]
                out.copies_after.append((leader.page_table[full] * P, page * P, partial))
                self.stats.copied_tokens += partial
                table.append(page)
            sib.page_table, sib.num_computed = table, n
            sib.cached_tokens, sib.version = leader.cached_tokens, leader.version
            sib.status, sib.admitted_len, sib.admitted_at = Status.RUNNING, len(sib.tokens), leader.admitted_at
            self.rows.attach(sib)
            forked.append(sib)
            out.samplers.append(sib)
            out.sample_rows.append(row)  # the leader's last token: the siblings draw their own first tokens
        self.allocator.retain(shared * len(forked))
        if forked:  # (the step is not decode-only: the leader's prefill ends in it)
            at = self.running.index(leader) + 1
            self.running[at:at] = forked
        if requeue:
            self._num_seqs -= len(requeue)
            self.waiting.extendleft(reversed(requeue))
            out.requeued[leader.seq_id] = requeue
        self.stats.forked_sequences += len(forked)

    # ------------------------------------------------------------------ after the forward
    def after_forward(self, out: Scheduled) -> None:
        """Make this step's computed prefills matchable (and held by their requeued forks)."""
        for seq in out.cache_after:
            if seq.status is Status.RUNNING:
                node = self.cache(seq)
                for sib in out.requeued.get(seq.seq_id, ()):
                    if sib.status is Status.WAITING and not sib.hold_node:
                        self._hold(sib, node)

    # ------------------------------------------------------------------ cache, finish, preempt
    def cache(self, seq: Sequence, cold: bool = False) -> int:
        """Insert seq's computed KV into the prefix tree (the tree keeps slots it already has).

        Returns the node spelling it (0 when nothing was inserted). cold: evict it first.
        """
        if not self.prefix_cache or seq.num_computed == 0:
            return 0
        node, _ = self.tree.insert_paged(seq.tokens, seq.page_table, seq.num_computed, seq.version, cold)
        return max(node, 0)

    def _release(self, seq: Sequence, cold: bool) -> int:
        node = self.cache(seq, cold)
        self.allocator.release(seq.page_table)
        self.rows.detach(seq)
        seq.page_table, seq.num_computed = [], 0
        self._num_seqs -= 1 + len(seq.siblings)  # a leader preempted mid-prefill still has its forks pending
        return node

    def finish(self, seq: Sequence, reason: str) -> None:
        """seq is done: its KV stays in the prefix tree (cold: evicted first), its pages are released.

        It leaves `running` at the next `drop_finished` (one pass per step, not one per sequence).
        If the step already in flight computes its last token (a row planned before this finish
        was known), that row is wasted: its KV stays out of the tree and is counted.
        """
        if seq.num_computed >= len(seq.tokens):
            self.stats.overlap_wasted_rows += 1
            seq.num_computed = len(seq.tokens) - 1
        self._release(seq, cold=True)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def drop_finished(self) -> None:
        self.running = [s for s in self.running if s.status is Status.RUNNING]

    def abort_all(self) -> None:
        """Drop every unfinished sequence, its pages, row and hold (a generate() that raised midway)."""
        for seq in self.running:
            if seq.status is Status.RUNNING:
                self.allocator.release(seq.page_table)
                self.rows.detach(seq)
                seq.page_table, seq.num_computed, seq.status = [], 0, Status.WAITING
        for seq in self.waiting:
            self._drop_hold(seq)
        self.running.clear()
        self.waiting.clear()
        self._num_seqs = 0

    def preempt(self, seq: Sequence) -> None:
        """Take seq out of the batch to free KV; it is re-matched (or recomputed) later.

        Its KV goes into the tree (warm) and stays held while it waits.
        """
        node = self._release(seq, cold=False)
        self.running.remove(seq)
        seq.status = Status.WAITING
        self._hold(seq, node)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1


def _runs(slots: list[int], dst: int) -> list[tuple[int, int, int]]:
    """(src, dst, count) runs copying `slots` (in order) to dst, dst + 1, ...: contiguous sources merge."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((slots[start], dst + start, i - start))
            start = i
    return runs
