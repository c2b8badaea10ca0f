"""Loading gives a memory-mapped file's pages back as it copies (cldm/file_pages.py), and never touches other
memory."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cldm.io.pages import PageReleaser

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


def test_the_pages_under_a_copied_tensor_leave_and_the_rest_stay_right(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(4096, 1024, generator=g), "next": torch.randn(1000, generator=g)}
    save_file(tensors, tmp_path / "w.safetensors")
    state = load_file(tmp_path / "w.safetensors")
    touched = state["big"].sum().item() + state["next"].sum().item()  # every page read in
    before = _rss_file()
    copy = state["big"].clone()
    pages = PageReleaser()
    pages.release(state["big"])
    assert pages.released >= 16 * 2**20 - 2 * 4096  # the 16 MiB tensor's whole pages
    assert _rss_file() <= before - 15 * 2**20  # and this process holds them no more
    assert torch.equal(copy, tensors["big"]) and torch.equal(state["next"], tensors["next"])
    assert torch.equal(state["big"], tensors["big"])  # touched again, it is read back from the file
    assert touched == pytest.approx(tensors["big"].sum().item() + tensors["next"].sum().item())


def test_anonymous_memory_is_never_released():
    t = torch.randn(1024, 1024)
    keep = t.clone()
    pages = PageReleaser()
    pages.release(t)
    assert pages.released == 0 and torch.equal(t, keep)  # a dropped anonymous page would read as zeros
