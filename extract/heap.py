"""Handing freed heap memory back to the system, where the C library can (glibc's ``malloc_trim``).

glibc keeps freed memory for reuse, and each thread that allocates gets a heap (arena) of its own, so memory that
one thread freed is not reused by another's allocations and stays in the process's resident set. Extraction
frees such memory at two points (benchmarks/README.md, "Extraction's memory"): after each shard the store writes
(zarr encodes and assembles shards in its own threads) and at the end of a run (``extract.run.release_memory``).
A trim costs a few milliseconds at most.
"""
from __future__ import annotations

import ctypes
from functools import cache


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # no C library to load by name, or one without malloc_trim (musl, macOS)
        return None


def trim_heap() -> bool:
    """Return the free pages of every heap (arena) to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
