"""The C++ radix prefix tree with the page allocator: matching, splitting, locks, holds, eviction."""
from __future__ import annotations

import random
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


def _insert_sequence(alloc: PageAllocator, tree: RadixTree, tokens: list[int], cold: bool = False
                     ) -> tuple[list[int], int]:
    """A sequence computes `tokens` into fresh pages and caches them: (its pages, the node)."""
    pages, slots = _seq_slots(alloc, len(tokens))
    return pages, tree.insert(tokens, slots, tree.version, cold=cold)[0]


def _cache_finished(alloc: PageAllocator, tree: RadixTree, tokens: list[int], cold: bool = False) -> tuple[list[int], int]:
    """A sequence caches `tokens` and finishes: the tree is left the only owner of its pages."""
    pages, node = _insert_sequence(alloc, tree, tokens, cold)
    alloc.release(pages)
    return pages, node


def _is_live(tree: RadixTree, node: int) -> bool:
    try:
        tree.hold_ref(node)
    except ValueError:
        return False
    return True


def _eviction_order(alloc: PageAllocator, tree: RadixTree, owners: dict[int, str]) -> list[str]:
    """Evicts one page at a time until nothing more goes; names (owners[page]) in eviction order.

    Reads the tree only through page_refs(), which touches nothing (a match would reorder the LRU).
    """
    order = []
    while True:
        before = set(tree.page_refs())
        if tree.evict(alloc.num_free + 1) == 0:
            return order
        tree.check_invariants()
        order += sorted(owners[p] for p in before - set(tree.page_refs()))


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
    """Random inserts (warm or cold, by slots or by page table), matches, locks, holds,
    evictions and resets over a small vocabulary.

    After every operation: the tree's own invariants hold (among them: the evictable set is
    exactly the unlocked leaves under their current keys, hold counts add up); every page's
    reference count equals the tree's references plus those of the live "sequences" this
    model holds; a locked prefix is still fully matchable; the root's hold count is the
    number of holds on nodes still live; release_hold returns whether its node is live. At
    the end, releasing everything frees every page.
    """

    NUM_PAGES = 24

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(self.NUM_PAGES, P)
        self.tree = RadixTree(self.alloc)
        self.seqs: list[list[int]] = []  # pages held by live sequences
        self.locks: list[tuple[int, list[int]]] = []  # (node, tokens it spells)
        self.holds: list[int] = []  # one entry per hold taken and not yet released

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=14), cut=st.integers(0, 14),
          cold=st.booleans(), paged=st.booleans())
    def insert(self, tokens, cut, cold, paged):
        """A sequence computes `tokens` and caches the first `n` of them (prompt or output)."""
        n = min(cut, len(tokens))
        n_pages = self.alloc.pages_for_tokens(len(tokens))
        self.tree.evict(n_pages)
        if self.alloc.num_free < n_pages:
            return
        pages = self.alloc.allocate(n_pages)
        if paged:
            node, adopted = self.tree.insert_paged(tokens, pages, n, self.tree.version, cold=cold)
        else:
            node, adopted = self.tree.insert(tokens[:n], self.alloc.slot_mapping(pages, 0, n), self.tree.version, cold)
        assert self.tree.tokens_of(node) == tokens[:n] and 0 <= adopted <= n
        self.seqs.append(pages)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=0, max_size=14))
    def hold(self, tokens):
        """A request joins the queue: hold the deepest node its prompt matches (maybe the root)."""
        node = self.tree.match_prefix(tokens)[0]
        self.tree.hold(node)
        self.holds.append(node)

    @precondition(lambda self: self.holds)
    @rule(i=st.integers(0, 50))
    def release_hold(self, i):
        node = self.holds.pop(i % len(self.holds))
        live = _is_live(self.tree, node)
        assert self.tree.release_hold(node) is live

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
        if self.holds:  # reset drops every hold, live or evicted
            with pytest.raises(ValueError):
                self.tree.release_hold(self.holds[0])
        self.holds.clear()

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

    @invariant()
    def holds_add_up(self):
        live = Counter(node for node in self.holds if _is_live(self.tree, node))
        assert self.tree.hold_ref(0) == sum(live.values())  # evicted holds left the counts
        for node, count in live.items():
            assert self.tree.hold_ref(node) >= count

    def teardown(self):
        for node in self.holds:
            assert self.tree.release_hold(node) is _is_live(self.tree, node)
        assert self.tree.hold_ref(0) == 0
        for node, _ in self.locks:
            self.tree.unlock(node)
        for pages in self.seqs:
            self.alloc.release(pages)
        self.tree.evict(self.NUM_PAGES)
        self.tree.check_invariants()
        assert self.alloc.num_free == self.NUM_PAGES and self.tree.num_nodes == 0


TestTreeModel = TreeModel.TestCase
TestTreeModel.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


@pytest.mark.parametrize("seed", range(12))
def test_seeded_random_operations_keep_every_invariant(seed):
    """TreeModel's rules and invariants, driven by a fixed seed for long runs: deterministic,
    and long enough that splits of held nodes and evictions of held leaves always occur."""
    rng = random.Random(seed)
    model = TreeModel()

    def tokens(min_size=1):
        return [rng.randrange(4) for _ in range(rng.randint(min_size, 14))]

    for _ in range(400):
        op = rng.choice(["insert", "insert", "match", "hold", "hold", "release_hold", "unlock",
                         "release_sequence", "evict", "reset"])
        if op == "insert":
            model.insert(tokens=tokens(), cut=rng.randint(0, 14), cold=rng.random() < 0.5, paged=rng.random() < 0.5)
        elif op == "match":
            model.match(tokens=tokens(), lock=rng.random() < 0.3)
        elif op == "hold":
            model.hold(tokens=tokens(min_size=0))
        elif op == "release_hold" and model.holds:
            model.release_hold(i=rng.randrange(50))
        elif op == "unlock" and model.locks:
            model.unlock(i=rng.randrange(50))
        elif op == "release_sequence" and model.seqs:
            model.release_sequence(i=rng.randrange(50))
        elif op == "evict":
            model.evict(pages=rng.randint(0, TreeModel.NUM_PAGES))
        elif op == "reset" and not model.locks and rng.random() < 0.1:
            model.reset()
        model.ownership_adds_up()
        model.holds_add_up()
    model.teardown()


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


def test_eviction_order_cold_then_lru_then_held_and_never_locked():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    owners = {}
    nodes = {}
    # One page per sequence, distinct first tokens: every sequence is its own leaf.
    for name, first, cold in [("warm1", 1, False), ("warm2", 2, False), ("cold1", 3, True),
                              ("cold2", 4, True), ("held", 5, True), ("locked", 6, False)]:
        pages, nodes[name] = _cache_finished(alloc, tree, [first] * P, cold)
        owners[pages[0]] = name
    tree.hold(nodes["held"])  # cold, yet held: after every unheld leaf
    tree.lock(nodes["locked"])
    tree.match_prefix([1] * P)  # warm1 is now more recent than warm2
    tree.check_invariants()
    assert _eviction_order(alloc, tree, owners) == ["cold1", "cold2", "warm2", "warm1", "held"]
    assert set(tree.page_refs()) == {p for p, name in owners.items() if name == "locked"}
    assert tree.release_hold(nodes["held"]) is False  # it was evicted while held
    tree.unlock(nodes["locked"])
    assert _eviction_order(alloc, tree, owners) == ["locked"]
    assert alloc.num_free == alloc.num_pages


def test_cold_insert_touches_the_existing_path_and_a_match_warms_a_cold_node():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    owners = {}
    a_pages, _ = _cache_finished(alloc, tree, [1] * P)
    b_pages, _ = _cache_finished(alloc, tree, [2] * P)
    # A finished output extending a: the existing node a is touched, only the new node is cold.
    pages, slots = _seq_slots(alloc, 2 * P)
    tree.insert([1] * P + [5] * P, slots, tree.version, cold=True)
    alloc.release(pages)
    c_pages, c_node = _cache_finished(alloc, tree, [3] * P, cold=True)
    d_pages, _ = _cache_finished(alloc, tree, [4] * P)
    tree.match_prefix([3] * P)  # c is warm now, and the most recent leaf
    assert tree.tokens_of(c_node) == [3] * P
    owners.update({a_pages[0]: "a", b_pages[0]: "b", pages[1]: "a+cold", c_pages[0]: "c", d_pages[0]: "d"})
    # The cold node first; then b before a (a was touched by the cold insert), then d, then c.
    assert _eviction_order(alloc, tree, owners) == ["a+cold", "b", "a", "d", "c"]


def test_a_held_leaf_outlives_every_unheld_one_and_its_holds_leave_with_it():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    # x = [1]*P is shared by the leaves b and c; d is unrelated. One page per node.
    b_pages, b = _cache_finished(alloc, tree, [1] * P + [2] * P)
    c_pages, c = _cache_finished(alloc, tree, [1] * P + [3] * P)
    d_pages, d = _cache_finished(alloc, tree, [4] * (2 * P))
    x = tree.match_prefix([1] * P)[0]
    assert tree.tokens_of(x) == [1] * P
    tree.match_prefix([4] * (2 * P))  # b, the held leaf, is the least recently used of all
    tree.hold(b)
    tree.hold(b)  # two queued requests match b
    tree.hold(x)  # one queued request matches only x
    assert (tree.hold_ref(b), tree.hold_ref(c), tree.hold_ref(x), tree.hold_ref(0)) == (2, 0, 3, 3)
    tree.check_invariants()

    # Everything unheld goes (c: 1 page, d: 2 pages); b and its parent x stay.
    free = alloc.num_free
    assert tree.evict(free + 3) == 3 * P and alloc.num_free == free + 3
    assert set(tree.page_refs()) == {b_pages[1], b_pages[0]}  # b's page and x's page
    assert tree.hold_ref(x) == 3
    tree.check_invariants()

    # Needing one more page takes b, the held leaf; x keeps only its own hold.
    assert tree.evict(alloc.num_free + 1) == P
    assert set(tree.page_refs()) == {b_pages[0]}
    assert (tree.hold_ref(x), tree.hold_ref(0)) == (1, 1)
    tree.check_invariants()
    assert tree.release_hold(b) is False and tree.release_hold(b) is False
    with pytest.raises(ValueError, match=f"release_hold of radix node {b}"):
        tree.release_hold(b)  # only two holds were outstanding
    assert tree.release_hold(x) is True
    assert (tree.hold_ref(x), tree.hold_ref(0)) == (0, 0)
    tree.check_invariants()
    assert tree.evict(alloc.num_pages) == P and alloc.num_free == alloc.num_pages


def test_holds_survive_splits_by_match_and_insert():
    alloc = PageAllocator(16, P)
    tree = RadixTree(alloc)
    _, n = _cache_finished(alloc, tree, list(range(8)))
    tree.hold(n)
    upper, length, _ = tree.match_prefix([0, 1, 2, 99])  # splits n after 3 tokens
    assert length == 3 and upper != n and tree.tokens_of(n) == list(range(8))
    assert (tree.hold_ref(upper), tree.hold_ref(n), tree.hold_ref(0)) == (1, 1, 1)
    tree.check_invariants()
    pages, slots = _seq_slots(alloc, 7)
    tail, adopted = tree.insert([0, 1, 2, 3, 4, 50, 51], slots, tree.version)  # splits n again
    alloc.release(pages)
    assert adopted == 2 and tree.tokens_of(tail) == [0, 1, 2, 3, 4, 50, 51]
    mid = tree.match_prefix([0, 1, 2, 3, 4])[0]
    assert tree.tokens_of(mid) == [0, 1, 2, 3, 4] and mid not in (upper, n)
    assert (tree.hold_ref(upper), tree.hold_ref(mid), tree.hold_ref(n)) == (1, 1, 1)
    tree.check_invariants()
    # n is still the held leaf: the newer unheld leaf [50, 51] is evicted first.
    assert tree.evict(alloc.num_free + 1) == 2
    assert tree.tokens_of(n) == list(range(8))
    assert tree.release_hold(n) is True
    assert (tree.hold_ref(upper), tree.hold_ref(mid), tree.hold_ref(n), tree.hold_ref(0)) == (0, 0, 0, 0)
    tree.check_invariants()


def test_insert_paged_equals_insert_with_the_explicit_slots():
    trees = []
    for paged in (False, True):
        alloc = PageAllocator(16, P)
        tree = RadixTree(alloc)
        out = []
        for tokens, n, page_order, cold in [
            (list(range(11)), 10, [2, 0, 1], False),       # scrambled, partly used last page
            (list(range(6)) + [70, 71, 72], 9, [1, 0, 2], True),  # shares a prefix, straddles a page
            ([9] * 5, 5, [1, 0], False),
        ]:
            fresh = alloc.allocate(alloc.pages_for_tokens(len(tokens)))
            table = [fresh[i] for i in page_order]
            if paged:
                res = tree.insert_paged(tokens, table, n, tree.version, cold=cold)
            else:
                res = tree.insert(tokens[:n], alloc.slot_mapping(table, 0, n), tree.version, cold=cold)
            out.append((res, tree.tokens_of(res[0])))
            alloc.release(fresh)
        tree.check_invariants()
        out.append(sorted(tree.page_refs().items()))
        out.append([alloc.ref_count(p) for p in range(alloc.num_pages)])
        out.append(tree.evict(alloc.num_free + 1))  # the cold leaf goes first in both (no match yet)
        out.append(tree.match_prefix(list(range(11))))
        out.append(tree.match_prefix([9] * 5))
        trees.append(out)
    assert trees[0] == trees[1]
    assert trees[0][1][0][1] == 3  # adopted only the new suffix [70, 71, 72]
    assert trees[0][5] == 3        # which is what the eviction took


def test_insert_paged_validates_num_tokens_and_the_page_table():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    table = alloc.allocate(2)
    tokens = list(range(10))
    with pytest.raises(ValueError, match="num_tokens 11 is outside \\[0, 10\\]"):
        tree.insert_paged(tokens, table, 11, tree.version)
    with pytest.raises(ValueError, match="num_tokens -1 is outside"):
        tree.insert_paged(tokens, table, -1, tree.version)
    with pytest.raises(ValueError, match="num_tokens 9 exceeds the page table's 8 slots \\(2 pages of 4\\)"):
        tree.insert_paged(tokens, table, 9, tree.version)
    assert tree.num_nodes == 0 and tree.page_refs() == {}
    assert [alloc.ref_count(p) for p in table] == [1, 1]
    assert tree.insert_paged(tokens, table, 8, tree.version - 1) == (-1, 0)  # stale weights
    assert tree.insert_paged(tokens, table, 0, tree.version) == (0, 0)
    node, adopted = tree.insert_paged(tokens, table, 8, tree.version)
    assert adopted == 8 and tree.tokens_of(node) == tokens[:8]


def test_release_hold_misuse_raises():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    _, leaf = _cache_finished(alloc, tree, [1] * P + [2] * P)
    tree.match_prefix([1] * P + [3])  # split: the upper node holds no hold of its own
    upper = tree.match_prefix([1] * P)[0]
    with pytest.raises(ValueError, match="no radix node 99"):
        tree.hold(99)
    with pytest.raises(ValueError, match="release_hold of radix node 99: no such node"):
        tree.release_hold(99)
    with pytest.raises(ValueError, match=f"release_hold of radix node {leaf}, which has no hold of its own \\(hold_ref 0\\)"):
        tree.release_hold(leaf)
    tree.hold(leaf)
    with pytest.raises(ValueError, match="hold_ref 1"):
        tree.release_hold(upper)  # it carries the leaf's hold, but was never held itself
    assert tree.hold_ref(leaf) == tree.hold_ref(upper) == 1
    tree.check_invariants()
    assert tree.release_hold(leaf) is True
    with pytest.raises(ValueError, match="no hold of its own"):
        tree.release_hold(leaf)
    # reset drops live holds and the memory of evicted ones.
    tree.hold(leaf)
    tree.hold(upper)
    tree.evict(alloc.num_pages)
    assert tree.num_nodes == 0
    tree.reset()
    for node in (leaf, upper):
        with pytest.raises(ValueError, match="no such node"):
            tree.release_hold(node)
    assert tree.hold_ref(0) == 0
    tree.check_invariants()


def test_reset_drops_live_holds_but_not_for_locks():
    alloc = PageAllocator(8, P)
    tree = RadixTree(alloc)
    _, node = _cache_finished(alloc, tree, [1] * 6)
    tree.hold(node)
    tree.lock(node)
    with pytest.raises(RuntimeError, match="lock"):
        tree.reset()
    tree.unlock(node)
    tree.reset()  # holds do not block a reset
    assert tree.hold_ref(0) == 0 and tree.num_nodes == 0 and alloc.num_free == alloc.num_pages
    with pytest.raises(ValueError):
        tree.release_hold(node)
    tree.check_invariants()


def test_insert_keeps_its_positional_signature():
    alloc = PageAllocator(4, P)
    tree = RadixTree(alloc)
    pages, slots = _seq_slots(alloc, 3)
    assert tree.insert([1, 2, 3], slots, tree.version) == (1, 3)
    assert tree.insert(tokens=[1, 2, 3, 4], slots=slots + [3], version=tree.version, cold=False) == (2, 1)
