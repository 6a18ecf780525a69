"""Handing freed heap memory back to the system, where the C library can (glibc's ``malloc_trim``).

glibc keeps freed memory for reuse, and each thread that allocates gets a heap (arena) of its own, so memory that
one thread freed is not reused by another's allocations and stays in the process's resident set. Extraction
frees such memory at two points (benchmarks/README.md, "Extraction's memory"): after each shard the store writes
(zarr encodes and assembles shards in its own threads) and at the end of a run (``extract.run.release_memory``).
A trim costs a few milliseconds at most.

Between those points a CPU extraction keeps its heap steady (``steady_heap``): by default glibc serves each batch's
activations (10-30 MB blocks) from fresh memory maps or trims them off the heap's top when freed, so every batch
faults its pages in again (0.57 M minor faults and 1.1 s of kernel time for 96 frames at batch 4, against
video_features' 0.18 M and 0.4 s); with blocks up to 32 MiB kept in the heap, 64 MiB of free top kept, and one
arena, the same run takes 0.20 M faults and 0.6 s at the same peak RSS.
"""
from __future__ import annotations

import ctypes
from functools import cache


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters (glibc's malloc.h)


@cache
def _c_library():
    try:
        return ctypes.CDLL(None)
    except OSError:  # no C library to load by name
        return None


def steady_heap(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 64 * 2**20, arenas: int | None = 1) -> bool:
    """Keep blocks up to ``mmap_threshold`` bytes in the heap and up to ``trim_threshold`` bytes of free heap top,
    and with ``arenas`` at most that many arenas, for the rest of the process; False where the C library has no
    ``mallopt``. One arena suits a CPU run, whose few threads seldom allocate at once."""
    mallopt = getattr(_c_library(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    mallopt(M_TRIM_THRESHOLD, trim_threshold)
    if arenas:
        mallopt(M_ARENA_MAX, arenas)
    return True


@cache
def _malloc_trim():
    return getattr(_c_library(), "malloc_trim", None)  # None: no C library, or one without it (musl, macOS)


def trim_heap() -> bool:
    """Return the free pages of every heap (arena) to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
