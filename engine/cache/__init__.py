"""KV cache bookkeeping: a thin facade over the C++ extension `engine._C`.

`PageAllocator` hands out fixed-size pages of the KV pool with reference counts, so the
radix tree and every sequence forked from a shared prefix can own the same pages.
`RadixTree` maps token prefixes to the KV slots that hold them (node split on partial
matches, lock and hold counts up to the root, a weights version).

Eviction takes leaves from an incrementally maintained ordered set, in this order:
unheld leaves first -- cold ones (inserted with ``cold=True``, e.g. finished outputs, and
not matched since) before the rest, least recently used first -- then held leaves
(``hold(node)``: prefixes that queued requests will match) as a last resort; locked nodes
(``lock(node)``: prefixes running admissions read) never. ``insert_paged`` inserts the first
``num_tokens`` tokens of a sequence straight from its page table.
"""
from engine._C import OutOfPages, PageAllocator, RadixTree

__all__ = ["OutOfPages", "PageAllocator", "RadixTree"]
