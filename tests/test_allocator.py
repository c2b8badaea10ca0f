"""Freed memory back to the system after each request (cldm/allocator.py), unless the manager is told not to."""

from __future__ import annotations

import sys

import pytest
from test_offload import _request

from cldm.runtime import allocator
from cldm.runtime.manager import ModelManager


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_runs_on_glibc():
    assert allocator.trim() is True


@pytest.mark.parametrize("trim", [True, False])
def test_the_manager_trims_after_each_request_unless_told_not_to(tiny_dirs, monkeypatch, trim):
    calls = []
    monkeypatch.setattr(allocator, "trim", lambda: calls.append(1) or True)
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32", trim_memory=trim)
    manager.run(_request(tiny_dirs[1]))
    with pytest.raises(RuntimeError, match="stopped"):  # a request that fails is trimmed after too

        def stop(i, n):
            raise RuntimeError("stopped")

        manager.run(_request(tiny_dirs[1]), callback=stop)
    assert len(calls) == (2 if trim else 0)
