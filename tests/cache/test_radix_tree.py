"""The C++ radix prefix tree with the page allocator: matching, splitting, locks, eviction."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.cache import PageAllocator, RadixTree

P = 4


def _seq_slots(alloc: PageAllocator, n: int) -> tuple[list[int], list[int]]:
    pages = alloc.allocate(alloc.pages_for_tokens(n))
    return pages, alloc.slot_mapping(pages, 0, n)


def _insert_sequence(alloc: PageAllocator, tree: RadixTree, tokens: list[int]) -> tuple[list[int], int]:
    """A sequence computes `tokens` into fresh pages and caches them: (its pages, the node)."""
    pages, slots = _seq_slots(alloc, len(tokens))
    return pages, tree.insert(tokens, slots, tree.version)[0]


def test_match_splits_a_node_and_returns_exact_slots():
    alloc = PageAllocator(16, P)
    tree = RadixTree(alloc)
    pages, slots = _seq_slots(alloc, 10)
    node, adopted = tree.insert(list(range(10)), slots, tree.version)
    assert adopted == 10 and tree.num_nodes == 1
    alloc.release(pages)  # the tree is now the only owner
    assert all(alloc.ref_count(p) == 1 for p in pages)
    mnode, length, mslots = tree.match_prefix([0, 1, 2, 3, 4, 5, 99])
    assert (length, mslots) == (6, slots[:6])
    assert tree.num_nodes == 2 and tree.tokens_of(mnode) == [0, 1, 2, 3, 4, 5]
    assert alloc.ref_count(pages[1]) == 2  # page 1 straddles the split: both halves hold it
    assert tree.match_prefix(list(range(10)), max_len=3)[1] == 3
    assert tree.match_prefix([7, 8])[:2] == (0, 0)
    tree.check_invariants()


def test_insert_keeps_existing_slots_and_adopts_only_the_new_suffix():
    alloc = PageAllocator(16, P)
    tree = RadixTree(alloc)
    _, a = _seq_slots(alloc, 6)
    tree.insert([1, 2, 3, 4, 5, 6], a, tree.version)
    b_pages, b = _seq_slots(alloc, 8)
    node, adopted = tree.insert([1, 2, 3, 4, 5, 6, 7, 8], b, tree.version)
    assert adopted == 2
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])[2] == a + b[6:]
    assert alloc.ref_count(b_pages[0]) == 1  # the duplicate prefix page stays the caller's alone
    assert alloc.ref_count(b_pages[1]) == 2


def test_locked_nodes_survive_eviction_and_lru_goes_first():
    alloc = PageAllocator(6, P)
    tree = RadixTree(alloc)
    handles = []
    for first in (10, 20, 30):
        pages, node = _insert_sequence(alloc, tree, [first] + list(range(7)))
        handles.append(node)
        alloc.release(pages)
    assert alloc.num_free == 0
    tree.lock(handles[0])
    tree.match_prefix([30, 0])  # touches the third sequence: the second is now least recent
    assert tree.evict(2) == 8 and alloc.num_free == 2
    assert tree.match_prefix([20, 0, 1])[1] == 0
    assert tree.match_prefix([30, 0, 1])[1] == 3
    assert tree.evict(6) == 8  # only the locked sequence is left
    assert tree.match_prefix([10] + list(range(7)))[1] == 8
    tree.unlock(handles[0])
    assert tree.evict(6) == 8 and alloc.num_free == 6 and tree.num_nodes == 0


def test_reset_bumps_the_version_and_stale_inserts_are_refused():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    pages, slots = _seq_slots(alloc, 5)
    old = tree.version
    node, _ = tree.insert([1, 2, 3, 4, 5], slots, old)
    tree.lock(node)
    with pytest.raises(RuntimeError, match="lock"):
        tree.reset()
    tree.unlock(node)
    tree.reset()
    assert tree.version == old + 1 and tree.cached_tokens == 0
    assert tree.insert([1, 2, 3, 4, 5], slots, old) == (-1, 0)  # KV of the old weights
    alloc.release(pages)
    assert alloc.num_free == 8


def test_bad_handles_and_unbalanced_unlocks():
    tree = RadixTree(PageAllocator(4, P))
    with pytest.raises(ValueError, match="no radix node 7"):
        tree.lock(7)
    with pytest.raises(ValueError, match="unlock of unlocked"):
        tree.unlock(0)
    with pytest.raises(ValueError, match="3 tokens but 2 slots"):
        tree.insert([1, 2, 3], [0, 1], 0)


class TreeModel(RuleBasedStateMachine):
    """Random inserts, matches, locks, evictions and resets over a small vocabulary.

    After every operation: the tree's own invariants hold; every page's reference count
    equals the tree's references plus those of the live "sequences" this model holds; and
    a locked prefix is still fully matchable. At the end, releasing everything frees every page.
    """

    NUM_PAGES = 24

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(self.NUM_PAGES, P)
        self.tree = RadixTree(self.alloc)
        self.seqs: list[list[int]] = []  # pages held by live sequences
        self.locks: list[tuple[int, list[int]]] = []  # (node, tokens it spells)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=14))
    def insert(self, tokens):
        n_pages = self.alloc.pages_for_tokens(len(tokens))
        self.tree.evict(n_pages)
        if self.alloc.num_free < n_pages:
            return
        pages = self.alloc.allocate(n_pages)
        node, _ = self.tree.insert(tokens, self.alloc.slot_mapping(pages, 0, len(tokens)), self.tree.version)
        assert self.tree.tokens_of(node) == tokens
        self.seqs.append(pages)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=14), lock=st.booleans())
    def match(self, tokens, lock):
        node, length, slots = self.tree.match_prefix(tokens)
        assert len(slots) == length and self.tree.tokens_of(node) == tokens[:length]
        if lock and node:
            self.tree.lock(node)
            self.locks.append((node, tokens[:length]))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 50))
    def unlock(self, i):
        node, _ = self.locks.pop(i % len(self.locks))
        self.tree.unlock(node)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 50))
    def release_sequence(self, i):
        self.alloc.release(self.seqs.pop(i % len(self.seqs)))

    @rule(pages=st.integers(0, NUM_PAGES))
    def evict(self, pages):
        self.tree.evict(pages)

    @precondition(lambda self: not self.locks)
    @rule()
    def reset(self):
        self.tree.reset()

    @invariant()
    def ownership_adds_up(self):
        self.tree.check_invariants()
        expected = Counter(self.tree.page_refs())
        for pages in self.seqs:
            expected.update(pages)
        for p in range(self.NUM_PAGES):
            assert self.alloc.ref_count(p) == expected[p], p
        for node, tokens in self.locks:
            assert self.tree.match_prefix(tokens)[1] == len(tokens)  # locked: never evicted

    def teardown(self):
        for node, _ in self.locks:
            self.tree.unlock(node)
        for pages in self.seqs:
            self.alloc.release(pages)
        self.tree.evict(self.NUM_PAGES)
        assert self.alloc.num_free == self.NUM_PAGES and self.tree.num_nodes == 0


TestTreeModel = TreeModel.TestCase
TestTreeModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_evictable_pages_is_what_a_full_eviction_frees():
    alloc = PageAllocator(12, P)
    tree = RadixTree(alloc)
    held = [_insert_sequence(alloc, tree, [first] * 7) for first in (1, 2, 3)]
    alloc.release(held[0][0])  # sequence 1 finished: its pages are the tree's alone
    tree.lock(held[1][1])      # sequence 2's prefix is locked
    # sequence 3 still holds its own pages: evicting its node frees nothing
    assert tree.evictable_pages == 2
    free = alloc.num_free
    tree.evict(alloc.num_pages)
    assert alloc.num_free - free == 2
