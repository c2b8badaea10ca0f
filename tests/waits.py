"""Waits on a running app's jobs: until the server reports a state, never for a guessed duration."""

from __future__ import annotations

import time


def sampling_step(job) -> int:
    """The last sampling step the server reported for a gradio_client job (its progress reads `sampling i/n`)."""
    steps = [int(u.desc.split()[1].split("/")[0]) for u in job.status().progress_data or []
             if (u.desc or "").startswith("sampling ")]  # fmt: skip
    return max(steps, default=0)


def wait_for_sampling_step(job, step: int, timeout: float = 120) -> None:
    """Until the server says the job is at sampling step `step` or later (it reports every step)."""
    deadline = time.monotonic() + timeout
    while sampling_step(job) < step:
        assert not job.done(), f"the job ended before sampling step {step}: {job.status()}"
        assert time.monotonic() < deadline, f"no sampling step {step} reported in {timeout} s: {job.status()}"
        time.sleep(0.02)  # the pause between two looks at the job's status; the condition decides
