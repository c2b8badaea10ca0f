"""Giving a memory-mapped weight file's pages back as its tensors are copied.

The safetensors reader maps the whole file (privately) and hands out tensors that are views into the mapping; the
pages a copy has read stay in this process's memory until the last view is gone. Loading copies every tensor into
its own storage (`assemble.build`), so without this the file and the copy were both resident at the end of a load:
twice the model in fp32. After each copy the pages that lie wholly inside the copied tensor are dropped
(`madvise(MADV_DONTNEED)`), but only when the tensor lies in a private, file-backed mapping of this process (read
from /proc/self/maps): such pages are the file's and come back from it if touched again, never zeros. Anywhere else
(anonymous memory, another system) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import torch

MADV_DONTNEED = 4  # Linux


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files, [] where /proc is not there."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[1].endswith("p") or parts[4] == "0" or not parts[5].startswith("/"):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


class PageReleaser:
    """Reads the mappings once; `release(t)` drops the file pages under a tensor that has been copied."""

    def __init__(self):
        self.ranges = _file_mappings() if os.name == "posix" else []
        self._madvise = None
        if self.ranges:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.released = 0  # bytes

    def release(self, t: torch.Tensor) -> None:
        if self._madvise is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first and self._madvise(first, last - first, MADV_DONTNEED) == 0:
            self.released += last - first
