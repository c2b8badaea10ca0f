"""The Stop buttons' flags (stops.py): a Stop reaches the generation sent before it, never one sent after it."""

from __future__ import annotations

import time

from studio import stops


def test_a_stop_before_the_generation_started_stops_it_and_an_older_stop_does_not():
    board = stops.Stops()
    sent = time.monotonic()
    assert "Nothing is running" in board.stop("a")  # Generate sent, its handler not started yet: Stop pressed
    first = board.start("a", sent)
    assert first.is_set()  # the generation starts already stopped
    board.release("a", first)
    later = time.monotonic()
    assert not board.start("a", later).is_set()  # that Stop was pressed before this Generate was sent
    assert not board.start("b", sent).is_set()  # another session's Stop is not this one's
    assert board.stop("a").startswith("Stopping")  # the flag of the generation sent at `later`
    flag = board.start("c", time.monotonic())
    board.stop("c")
    assert flag.is_set()  # a running generation is stopped at its next step


def test_remembered_stops_are_bounded(monkeypatch):
    monkeypatch.setattr(stops, "MAX_REMEMBERED_STOPS", 5)
    board = stops.Stops()
    for i in range(50):
        board.stop(f"s{i}")
    assert list(board._stopped_at) == [f"s{i}" for i in range(45, 50)]
    monkeypatch.setattr(stops, "STOP_MEMORY_S", 0.0)
    time.sleep(0.01)
    board.stop("last")
    assert list(board._stopped_at) == ["last"]  # the old ones are forgotten


def test_stop_reaches_every_running_generation_of_the_session():
    """A page may run a Batch while a tab's Generate waits for the model: Stop ends both, and the end of one does
    not take the other's flag away (review of issue 24)."""
    board = stops.Stops()
    batch, generate = board.start("x", time.monotonic()), board.start("x", time.monotonic())
    board.stop("x")
    assert batch.is_set() and generate.is_set()
    board = stops.Stops()
    first, second = board.start("x", time.monotonic()), board.start("x", time.monotonic())
    board.release("x", first)
    assert board.stop("x").startswith("Stopping") and second.is_set() and not first.is_set()
    board.release("x", second)
    assert board._flags == {}
