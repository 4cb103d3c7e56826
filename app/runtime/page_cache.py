"""The kernel calls the streaming engine makes, and the advice it gives the page cache (measured choices)."""

from __future__ import annotations

import ctypes
import os

MADV_RANDOM, MADV_DONTNEED, MADV_HUGEPAGE, MADV_POPULATE_READ = 1, 4, 14, 22
# read ahead by populating llama.cpp's own mapping: its reads take the mapping's 4 MiB read-around (see HUGEPAGE),
# where WILLNEED on a file descriptor reads through the file's 128 KiB read-ahead; CORRAL_STREAM_POPULATE=0: WILLNEED
POPULATE = os.environ.get("CORRAL_STREAM_POPULATE", "1") != "0"
PROT_READ, MAP_SHARED = 1, 1
# Streamed layers are advised MADV_HUGEPAGE in llama.cpp's mapping: a page fault there, or a populate, then reads
# 4 MiB around it (PMD-sized read-around; the 2 MiB folio with RANDOM below) instead of 128 KiB. Disks serve a
# bounded number of requests per second, so request size sets the read speed: measured at file/limit 2, 2.3-2.7
# tok/s against 1.3-1.6 with no advice and 0.9-1.0 with MADV_SEQUENTIAL (whose faults read 128 KiB at a time).
# CORRAL_STREAM_HUGEPAGE=0 leaves it out.
HUGEPAGE = os.environ.get("CORRAL_STREAM_HUGEPAGE", "1") != "0"
# ... and MADV_RANDOM: a fault then reads the 2 MiB folio around it and no more. Otherwise the file's read-ahead
# runs on past the end of a streamed layer into whatever the file holds next (with Llama 3 GGUFs' tensor order,
# often a layer far ahead in the graph), ~20 MiB at a time with an 8 MiB read_ahead_kb, which is read, crowds the
# memory group and is read again when needed; and a token's embedding row read the 8 MiB around it. The token
# embedding is advised MADV_RANDOM too (its faults read 4 KiB). Measured with bench_streaming at file/limit 1.3, 2
# and 3: 0.190, 0.572, 0.752 GiB read per token against 0.259, 0.721, 0.930 without it (CORRAL_STREAM_RANDOM=0;
# only with HUGEPAGE: alone, streamed layers' faults would read 4 KiB).
RANDOM = HUGEPAGE and os.environ.get("CORRAL_STREAM_RANDOM", "1") != "0"

# A huge-page folio holding the end of one streamed layer and the start of another that is still to come this
# token is left for that layer when the first is dropped (the last of them drops it): otherwise both read it.
# CORRAL_STREAM_EDGES=0 drops it with the first.
EDGES = os.environ.get("CORRAL_STREAM_EDGES", "1") != "0"

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mlock.argtypes = libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
malloc_trim = getattr(libc, "malloc_trim", None)  # glibc only


def read_bytes() -> int:
    """What this process has read from disk (its /proc/self/io read_bytes; 0 where that is unreadable)."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


__all__ = ["EDGES", "MADV_DONTNEED", "MADV_HUGEPAGE", "MADV_POPULATE_READ", "MADV_RANDOM", "HUGEPAGE", "MAP_SHARED",
           "POPULATE", "PROT_READ", "RANDOM", "libc", "malloc_trim", "read_bytes"]
