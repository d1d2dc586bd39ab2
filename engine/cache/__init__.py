"""KV cache bookkeeping: a thin facade over the C++ extension `engine._C`.

`PageAllocator` hands out fixed-size pages of the KV pool with reference counts, so the
radix tree and every sequence forked from a shared prefix can own the same pages. The
radix prefix tree joins it here with the sampler.
"""
from engine._C import OutOfPages, PageAllocator

__all__ = ["OutOfPages", "PageAllocator"]
