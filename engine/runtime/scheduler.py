"""Continuous batching over the paged KV pool: admission, chunked prefill, forks, preemption.

Every step the scheduler hands the engine a list of (sequence, start, end): the tokens
[start, end) of each sequence whose KV is computed in this forward. Running sequences come
first, oldest first (a decode is 1 token, an unfinished prefill a chunk), then waiting
sequences are admitted in FIFO order while the token budget, the sequence cap and the KV
pool allow. When the pool runs dry, unlocked cached prefixes are evicted (LRU) and then
the newest running sequences are preempted: their KV goes into the prefix tree (evictable)
and they rejoin the front of the queue, to be recomputed, or re-matched, later.

Page ownership (the invariant the tests check): the allocator's reference count of every
page equals the number of radix nodes whose slots touch it plus the number of running
sequences whose page table holds it; a page is free exactly when that count is 0.

Locks: a matched radix node is locked only while its sequence is being admitted (from the
match until its KV has been shared or copied), so eviction cannot free a page it is about
to read. A running sequence holds references to its own pages instead of a lock: a lock
kept longer would pin the tree's copies of pages the sequence does not use, and a lone
sequence could then fail to fit the pool (an admit/preempt cycle that never ends).
"""
from __future__ import annotations

from collections import deque

import torch

from engine.cache import PageAllocator, RadixTree
from engine.runtime.paged_attention import KVPool
from engine.runtime.params import EngineStats
from engine.runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, allocator: PageAllocator, tree: RadixTree, pool: KVPool, stats: EngineStats, *,
                 max_num_seqs: int, max_batch_tokens: int, prefix_cache: bool):
        self.allocator, self.tree, self.pool, self.stats = allocator, tree, pool, stats
        self.page_size = allocator.page_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; forked siblings follow their leader
        self._admissions = 0

    # ------------------------------------------------------------------ queue
    def add(self, leader: Sequence) -> None:
        """Queue a prompt; leader.siblings are forked from it once its prefill is done."""
        for sib in leader.siblings:
            sib.status = Status.FORK_PENDING
        self.waiting.append(leader)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _num_seqs(self) -> int:
        return sum(1 + len(s.siblings) for s in self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> list[tuple[Sequence, int, int]]:
        """Pick this step's work: (sequence, start, end) with tokens [start, end) to compute."""
        budget = self.max_batch_tokens
        batch: list[tuple[Sequence, int, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            end = seq.num_computed + min(seq.num_pending, budget)
            if not self._grow(seq, end):
                break  # seq itself was preempted: nothing newer is left to schedule
            batch.append((seq, seq.num_computed, end))
            budget -= end - seq.num_computed
            i += 1
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self._num_seqs() + 1 + len(seq.siblings) > self.max_num_seqs:
                break
            admitted = self._admit(seq, budget)
            if admitted is None:
                break
            self.waiting.popleft()
            batch.append((seq, seq.num_computed, admitted))
            budget -= admitted - seq.num_computed
        return batch

    def _grow(self, seq: Sequence, end: int) -> bool:
        """Give seq the pages for positions < end, preempting newer sequences if needed."""
        need = self.allocator.pages_for_tokens(end) - len(seq.page_table)
        while not self._make_room(need):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.page_table += self.allocator.allocate(max(need, 0))
        return True

    def _make_room(self, pages: int) -> bool:
        """Evict cached prefixes until `pages` pages are free; False if that is impossible."""
        if self.allocator.num_free < pages:
            self.stats.evicted_tokens += self.tree.evict(pages)
        return self.allocator.num_free >= pages

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Match seq against the prefix cache, give it pages for its first chunk, mark it running.

        Returns the end of the first chunk, or None when the pool cannot take it now.
        """
        use_cache = self.prefix_cache
        end = self._try_admit(seq, budget, use_cache)
        if end is None and use_cache and not self.running:
            # Alone, the sequence always fits without the cache (Engine checks the pool holds
            # one whole sequence); a locked match can pin a few pages the table does not use.
            end = self._try_admit(seq, budget, use_cache=False)
            if end is None:
                raise RuntimeError(f"KV pool of {self.allocator.num_pages} pages cannot hold one sequence")
        return end

    def _try_admit(self, seq: Sequence, budget: int, use_cache: bool) -> int | None:
        node, matched, slots = 0, 0, []
        if use_cache:
            # Keep one token to compute: its logits sample the next token.
            node, matched, slots = self.tree.match_prefix(seq.tokens, len(seq.tokens) - 1)
            if node:
                self.tree.lock(node)  # before any eviction below can take the match away
        plan = self._plan_pages(slots)
        shared = [p for p in plan if isinstance(p, int)]
        self.allocator.retain(shared)
        end = matched + min(len(seq.tokens) - matched, budget)
        need = self.allocator.pages_for_tokens(end) - len(shared)
        if not self._make_room(need):
            self.allocator.release(shared)
            if node:
                self.tree.unlock(node)
            return None
        fresh = iter(self.allocator.allocate(need))
        table = []
        for entry in plan:
            if isinstance(entry, int):
                table.append(entry)
            else:  # a chunk the sequence cannot share: copy its KV into a page of its own
                page = next(fresh)
                dev = self.pool.kv.device
                self.pool.copy_slots(torch.tensor(entry, device=dev),
                                     page * self.page_size + torch.arange(len(entry), device=dev))
                self.stats.copied_tokens += len(entry)
                table.append(page)
        table += list(fresh)
        if node:
            self.tree.unlock(node)  # the sequence now owns (references or copies) all it reads
        if seq.admitted_at == 0:  # first admission: these prompt tokens came from the cache
            seq.cached_tokens = matched
        self.stats.cached_tokens += matched
        seq.page_table, seq.num_computed = table, matched
        seq.status, seq.admitted_len, seq.version = Status.RUNNING, len(seq.tokens), self.tree.version
        self._admissions += 1
        seq.admitted_at = self._admissions
        self.running.append(seq)
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
    def fork(self, leader: Sequence) -> list[Sequence]:
        """Fork leader's pending siblings off its computed KV (call when its prefill is done).

        Full pages are shared; the partial last page is copied. Siblings that find no page
        go back to the queue as ordinary sequences (they will hit the prefix cache).
        Returns the forked siblings, which are running right after the leader.
        """
        siblings, leader.siblings = leader.siblings, []
        full = leader.num_computed // self.page_size
        partial = leader.num_computed % self.page_size
        forked: list[Sequence] = []
        requeue: list[Sequence] = []
        for sib in siblings:
            if partial and not self._make_room(1):
                sib.status = Status.WAITING
                requeue.append(sib)
                continue
            table = leader.page_table[:full]
            self.allocator.retain(table)
            if partial:
                page = self.allocator.allocate(1)[0]
                src = leader.page_table[full] * self.page_size
                dev = self.pool.kv.device
                self.pool.copy_slots(torch.arange(src, src + partial, device=dev),
                                     torch.arange(page * self.page_size, page * self.page_size + partial, device=dev))
                self.stats.copied_tokens += partial
                table = table + [page]
            sib.page_table, sib.num_computed = table, leader.num_computed
            sib.cached_tokens, sib.version = leader.cached_tokens, leader.version
            sib.status, sib.admitted_len, sib.admitted_at = Status.RUNNING, len(sib.tokens), leader.admitted_at
            forked.append(sib)
        at = self.running.index(leader) + 1
        self.running[at:at] = forked
        self.waiting.extendleft(reversed(requeue))
        self.stats.forked_sequences += len(forked)
        return forked

    # ------------------------------------------------------------------ cache, finish, preempt
    def cache(self, seq: Sequence) -> None:
        """Insert seq's computed KV into the prefix tree (the tree keeps slots it already has)."""
        if not self.prefix_cache or seq.num_computed == 0:
            return
        n = seq.num_computed
        self.tree.insert(seq.tokens[:n], self.allocator.slot_mapping(seq.page_table, 0, n), seq.version)

    def _release(self, seq: Sequence) -> None:
        self.cache(seq)
        self.allocator.release(seq.page_table)
        seq.page_table, seq.num_computed = [], 0
        self.running.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """seq is done: its KV stays in the prefix tree (evictable), its pages are released."""
        self._release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def abort_all(self) -> None:
        """Drop every unfinished sequence and its pages (a generate() that raised midway)."""
        for seq in list(self.running):
            self.allocator.release(seq.page_table)
            seq.page_table, seq.num_computed, seq.status = [], 0, Status.WAITING
        self.running.clear()
        self.waiting.clear()

    def preempt(self, seq: Sequence) -> None:
        """Take seq out of the batch to free KV; it is recomputed (or re-matched) later."""
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1
