"""The A1111 API's generations as its /progress and /interrupt see them: how many wait (bounded, as the page's
queue is), which one runs, how far it is, its latest live preview, and the Stop that /interrupt presses.

A1111 runs one job at a time and reports that one; here the model manager's lock does the same for the API and the
page together, and the job reported is the API job that last moved (an API job waiting for the lock while the page
samples reports nothing yet).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from studio.a1111.fields import png_base64
from studio.stops import Stops


class QueueFull(Exception):
    """More API generations wait than the server's --queue-size allows."""


@dataclass
class ApiJob:
    """One API generation: its Stop session, what it is, and how far it got."""

    session: str
    name: str  # A1111's state.job: "txt2img", "img2img", "detect"
    steps: int  # the steps asked for (A1111's sampling_steps), known once the payload is read
    started: float  # time.time()
    fraction: float = 0.0
    textinfo: str | None = None
    interrupted: bool = False
    preview: np.ndarray | None = None  # the latest live preview (H, W, 3) uint8
    preview_png: str | None = None  # that preview as base64 PNG, made by the first /progress that shows it
    admitted_at: float = field(default_factory=time.monotonic)  # an /interrupt from then on stops it, even unstarted


class Jobs:
    """The API's generations in flight (at most `limit` waiting or running), and the last one to end: /progress
    reports whether it was interrupted until the next one runs, as A1111 does."""

    def __init__(self, stops: Stops, limit: int):
        self.stops = stops
        self.limit = max(1, int(limit))
        self._lock = threading.Lock()
        self._jobs: list[ApiJob] = []  # in arrival order
        self._current: ApiJob | None = None  # the job that last reported progress
        self._last: ApiJob | None = None  # the last job that ended (A1111 reports its state until the next begins)

    @contextmanager
    def admitted(self, name: str) -> Iterator[ApiJob]:
        """A place among the API's generations for one request, or QueueFull; the job leaves when the block ends."""
        job = ApiJob(f"a1111-{uuid.uuid4().hex}", name, 1, time.time())
        with self._lock:
            if len(self._jobs) >= self.limit:
                raise QueueFull(
                    f"{len(self._jobs)} API generations are waiting or running; this server takes at most "
                    f"{self.limit} (--queue-size). Try again when one has finished."
                )
            self._jobs.append(job)
        try:
            yield job
        finally:
            with self._lock:
                self._jobs.remove(job)
                self._last = job
                if self._current is job:
                    self._current = None

    def progress(self, job: ApiJob, fraction: float, desc: str = "") -> None:
        """`studio.generate`'s progress callback for `job`: the fraction of its steps done, and what it does."""
        with self._lock:
            job.fraction, job.textinfo = float(fraction), desc or None
            if fraction > 0 or self._current is None:
                self._current = job

    def preview(self, job: ApiJob, pictures: Sequence[np.ndarray]) -> None:
        """`studio.generate`'s live preview callback for `job`: the first picture of the batch is kept."""
        if len(pictures):
            with self._lock:
                job.preview, job.preview_png = np.asarray(pictures[0]), None

    def interrupt(self) -> bool:
        """A1111's Interrupt: the running API job ends at its next step (the one that last moved, else the first
        waiting). Whether there was one."""
        with self._lock:
            job = self._current or (self._jobs[0] if self._jobs else None)
            if job is None:
                return False
            job.interrupted = True
        self.stops.stop(job.session)
        return True

    def report(self, skip_current_image: bool = False) -> dict:
        """A1111's /sdapi/v1/progress answer. `sampling_step` is the fraction done of the steps asked for (an
        img2img pass runs strength x steps of them)."""
        with self._lock:
            job, count = self._current or (self._jobs[0] if self._jobs else None), len(self._jobs)
            last = job or self._last
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(last.started)) if last else ""
        state = {"skipped": False, "interrupted": last is not None and last.interrupted, "job": "",
                 "job_count": count, "job_timestamp": stamp, "job_no": 0, "sampling_step": 0,
                 "sampling_steps": 0}  # fmt: skip
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        fraction = min(1.0, max(0.0, job.fraction))
        elapsed = time.time() - job.started
        state.update(job=job.name, sampling_step=round(fraction * job.steps), sampling_steps=job.steps)
        shown = None
        if not skip_current_image:
            with self._lock:  # encoded once per preview, not once per poll
                if job.preview is not None and job.preview_png is None:
                    job.preview_png = png_base64(job.preview)
                shown = job.preview_png
        return {"progress": fraction, "eta_relative": elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0,
                "state": state, "current_image": shown, "textinfo": job.textinfo}  # fmt: skip
