"""KV cache bookkeeping: a thin facade over the C++ extension `engine._C`.

`PageAllocator` hands out fixed-size pages of the KV pool with reference counts, so the
radix tree and every sequence forked from a shared prefix can own the same pages.
`RadixTree` maps token prefixes to the KV slots that hold them (node split on partial
matches, lock counts up to the root, LRU eviction of unlocked leaves, a weights version).
"""
from engine._C import OutOfPages, PageAllocator, RadixTree

__all__ = ["OutOfPages", "PageAllocator", "RadixTree"]
