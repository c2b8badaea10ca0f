"""The bench's progress: a bar over its parts on stderr (on a terminal only: a log gets no bar frames) and each
result as a line on stdout, written above the bar rather than through it."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from tqdm import tqdm


class PartsBar:
    """One tick per part of the bench; the running part is the bar's description."""

    def __init__(self, parts: Sequence[str]):
        self.bar = tqdm(total=len(parts), desc="bench", unit="part", file=sys.stderr, dynamic_ncols=True, disable=None)
        self.running_now = 0  # how many parts the current call to `running` named

    def running(self, *parts: str) -> None:
        """The parts named before are done; these run now (step and vae run together, one dtype after the other)."""
        self.bar.update(self.running_now)
        self.running_now = len(parts)
        if parts:
            self.bar.set_description(f"bench: {', '.join(parts)}")

    def close(self) -> None:
        self.bar.update(self.running_now)
        self.running_now = 0
        self.bar.close()


def show(what: str, row: object) -> None:
    """A result on stdout: its kind, then the row as JSON (a string as it is)."""
    tqdm.write(f"{what} {row if isinstance(row, str) else json.dumps(row)}", file=sys.stdout)
    sys.stdout.flush()  # a log read while the bench runs has every result so far
