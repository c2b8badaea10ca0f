"""Giving freed memory back to the system after each request (glibc's allocator only).

A server that runs request after request frees most of what a request allocated (activations, pictures, decoded
uploads), but glibc keeps freed chunks in its arenas, one set per thread that ever allocated, and hands pages back
only from the top of each heap. Memory freed in the middle of a heap stays counted in the process's RSS, so a
long-running server grows slowly with no leak in Python or torch. `malloc_trim(0)` walks every arena and returns the
free pages inside them too (madvise); it takes milliseconds after a request that took a second or more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import cache

log = logging.getLogger(__name__)


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, if this process runs on it (musl, macOS and Windows have no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        log.info("malloc_trim is not available here: freed memory stays with the allocator")
        return None


def trim() -> bool:
    """Return the allocator's free pages to the system; False where the C library has no malloc_trim."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
