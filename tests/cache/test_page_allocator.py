"""The C++ KV page allocator: reference counts, free stack, slot mapping, atomic failures."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.cache import OutOfPages, PageAllocator


def test_fresh_pool_hands_out_lowest_ids_first():
    a = PageAllocator(num_pages=6, page_size=4)
    assert (a.num_pages, a.page_size, a.num_free) == (6, 4, 6)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(0) == []
    assert a.num_free == 3
    assert [a.ref_count(p) for p in range(6)] == [1, 1, 1, 0, 0, 0]


def test_out_of_pages_names_request_and_free_count_and_changes_nothing():
    a = PageAllocator(4, 16)
    a.allocate(3)
    with pytest.raises(OutOfPages, match="requested 2, free 1 of 4"):
        a.allocate(2)
    assert a.num_free == 1
    assert issubclass(OutOfPages, RuntimeError)


def test_shared_page_is_freed_by_its_last_owner():
    a = PageAllocator(4, 2)
    pages = a.allocate(2)
    a.retain(pages)  # a fork: two owners
    assert a.release(pages) == 0 and a.num_free == 2
    assert a.release(pages) == 2 and a.num_free == 4
    assert sorted(a.allocate(4)) == [0, 1, 2, 3]


def test_bad_release_and_retain_leave_the_pool_untouched():
    a = PageAllocator(4, 2)
    p = a.allocate(2)
    with pytest.raises(ValueError, match="release of page 0 exceeds its 1 owner"):
        a.release([1, 0, 0])
    assert [a.ref_count(i) for i in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="retain of free page 3"):
        a.retain([0, 3])
    assert a.ref_count(0) == 1
    with pytest.raises(ValueError, match=r"page id 9 out of range \[0, 4\)"):
        a.release([9])
    assert a.release(p) == 2


@pytest.mark.parametrize("args,match", [((0, 4), "num_pages"), ((4, 0), "page_size")])
def test_bad_pool_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        PageAllocator(*args)


def test_negative_allocation_is_refused():
    with pytest.raises(ValueError, match="negative"):
        PageAllocator(2, 2).allocate(-1)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_pages_for_tokens_and_slot_mapping(page_size):
    a = PageAllocator(8, page_size)
    assert [a.pages_for_tokens(n) for n in (0, 1, page_size, page_size + 1)] == [0, 1, 1, 2]
    table = [5, 2, 7]
    n = 3 * page_size
    expected = [table[i // page_size] * page_size + i % page_size for i in range(n)]
    assert a.slot_mapping(table, 0, n) == expected
    assert a.slot_mapping(table, 1, n - 1) == expected[1:-1]
    with pytest.raises(ValueError, match="do not fit a page table of 3 pages"):
        a.slot_mapping(table, 0, n + 1)


class AllocatorModel(RuleBasedStateMachine):
    """Random allocate / fork / release sequences checked against a Python model."""

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(12, 4)
        self.owners: list[list[int]] = []  # each entry: pages held by one owner
        self.refs: Counter[int] = Counter()

    @rule(n=st.integers(0, 6))
    def allocate(self, n):
        if n > self.alloc.num_free:
            with pytest.raises(OutOfPages):
                self.alloc.allocate(n)
            return
        pages = self.alloc.allocate(n)
        assert len(set(pages)) == n and all(self.refs[p] == 0 for p in pages)
        self.owners.append(pages)
        self.refs.update(pages)

    @precondition(lambda self: self.owners)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        pages = list(self.owners[i % len(self.owners)])
        self.alloc.retain(pages)
        self.owners.append(pages)
        self.refs.update(pages)

    @precondition(lambda self: self.owners)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        pages = self.owners.pop(i % len(self.owners))
        self.refs.subtract(pages)
        freed = self.alloc.release(pages)
        assert freed == sum(1 for p in set(pages) if self.refs[p] == 0)

    @invariant()
    def counts_agree(self):
        for p in range(12):
            assert self.alloc.ref_count(p) == self.refs[p]
        assert self.alloc.num_free == sum(1 for p in range(12) if self.refs[p] == 0)

    def teardown(self):
        for pages in self.owners:
            self.alloc.release(pages)
        assert self.alloc.num_free == 12  # a full release returns every page


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
