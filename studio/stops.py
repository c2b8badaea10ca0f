"""The Stop buttons: one flag per browser session, set by its Stop and read by its generation at each step.

A Stop may arrive before the generation it means has started: while the Generate waits in the queue, or while
Gradio prepares its inputs. So each Stop is remembered with the time it arrived, and a generation starting later
knows the time its own request arrived (`gate.arrived`): a Stop pressed after that stops it before it starts; a Stop
pressed before that (for an earlier generation) does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

log = logging.getLogger("studio")
# a Stop is remembered (per session) long enough to reach a generation that waited in a full queue, and no longer
STOP_MEMORY_S = 3600.0
MAX_REMEMBERED_STOPS = 10_000  # sessions; the oldest are forgotten first


class Stops:
    """The Stop flags of each session's running generations (a page may run a Batch and a tab's Generate at once:
    Stop ends both), and when each session last pressed Stop."""

    def __init__(self) -> None:
        self._flags: dict[str, list[threading.Event]] = {}  # session -> its running generations' Stop flags
        self._stopped_at: OrderedDict[str, float] = OrderedDict()  # session -> when its Stop was last pressed
        self._lock = threading.Lock()

    def stop(self, session: str | None) -> str:
        """The Stop button: the session's running generation ends at its next step boundary; one that was sent but
        has not started yet (waiting in the queue) does not start."""
        now = time.monotonic()
        with self._lock:
            running = list(self._flags.get(session or "", ()))
            self._stopped_at[session or ""] = now
            self._stopped_at.move_to_end(session or "")
            oldest = next(iter(self._stopped_at.values()))
            while len(self._stopped_at) > MAX_REMEMBERED_STOPS or oldest < now - STOP_MEMORY_S:
                self._stopped_at.popitem(last=False)
                oldest = next(iter(self._stopped_at.values()))
        if not running:
            log.info("stop: nothing running yet for session %s", session)
            return "Nothing is running (a generation already sent will not start)."
        for flag in running:
            flag.set()
        return "Stopping at the next step..."

    def start(self, session: str | None, sent_at: float | None = None) -> threading.Event:
        """A Stop flag for one generation of the session, sent at `sent_at` (time.monotonic(); None: now), set by the
        session's Stop button until `release(session, flag)`: already set if Stop was pressed after it was sent."""
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session or "", []).append(flag)
            stopped = self._stopped_at.get(session or "")
            if sent_at is not None and stopped is not None and stopped >= sent_at:
                flag.set()
            return flag

    def release(self, session: str | None, flag: threading.Event) -> None:
        """The generation that `start` gave `flag` ended: Stop no longer reaches it."""
        with self._lock:
            flags = self._flags.get(session or "", [])
            if flag in flags:
                flags.remove(flag)
            if not flags:
                self._flags.pop(session or "", None)
