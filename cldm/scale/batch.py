"""`python -m cldm batch`: a jobs file -> a folder of PNGs and a manifest, in-process or (`--ray`) on Ray Data.

The output folder holds one PNG per picture (`<id>.png`, or `<id>-<i>.png` for several pictures per row) with its
parameters and the row's fingerprint, and `manifest.jsonl`: one record per row and run (done, skipped or failed,
with the error). A rerun skips every row whose pictures are all there, whole and made from the same settings; so
after a crash, a kill or a fix to a bad row, running the same command again does exactly the missing rows.

The jobs file is streamed: the first row runs as soon as it is read, whatever the file's length, and memory holds
one row at a time (and 8 bytes per row for `Names`). The command exits with 1 when a row failed.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path

from annotators import AnnotatorError
from cldm.errors import CldmError, InputError
from cldm.io.images import write_atomic
from cldm.io.model_card import card_for
from cldm.pipeline.vocabulary import ControlMode, ResizeMode
from cldm.sampling.samplers import SAMPLERS
from cldm.scale.jobs import SETTINGS, Job, Names, RowError, iter_jobs
from cldm.scale.render import Prepared, Rendered, Setup, is_complete, prepare, render, worker_name

log = logging.getLogger("batch")
MANIFEST = "manifest.jsonl"
SHOWN_ERRORS = 20  # failed rows printed at the end; the manifest has them all
KEPT_ERRORS = 100  # failed rows a Summary keeps the message of (memory stays bounded whatever the file)


def describe(error: BaseException) -> str:
    """A row's error for the manifest: our own errors by their message, anything else with its type."""
    if isinstance(error, (CldmError, AnnotatorError)):  # MissingAnnotatorWeights is an AnnotatorError
        return str(error)
    log.warning("unexpected error in a batch row:\n%s", "".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}"


class Manifest:
    """manifest.jsonl in the output folder: appended one line per row as it finishes, flushed at once (a killed
    run keeps every line it wrote). The last record of an id is its state."""

    def __init__(self, out: Path):
        self.path = out / MANIFEST
        out.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.run = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{uuid.uuid4().hex[:6]}"  # this run's records

    def add(self, record: dict, sync: bool = True) -> None:
        """Append a record; `sync`: on the disk before this returns (a skipped row's record need not be: a rerun
        writes it again)."""
        line = json.dumps({**record, "run": self.run}, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            if sync:
                os.fsync(f.fileno())


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    pictures: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first KEPT_ERRORS failed rows

    @property
    def per_minute(self) -> float:
        return 60 * self.pictures / self.seconds if self.seconds else 0.0

    @property
    def rows(self) -> int:
        return self.done + self.skipped + self.failed

    def line(self) -> str:
        """The summary in one line; a count of none (rows skipped, rows failed) is left out."""
        parts = [f"{self.done} rows done ({self.pictures} pictures, {self.per_minute:.1f}/min)"]
        parts += [f"{self.skipped} skipped (already there)"] * bool(self.skipped)
        parts += [f"{self.failed} failed"] * bool(self.failed)
        return ", ".join([*parts, f"{self.seconds:.1f}s"])


class Batch:
    """Rows against an output folder: which are still to do, and recording each row's outcome. `jobs` (Jobs, and
    RowErrors where a row is bad) and `bad` (RowErrors) are each in row order; either may be a stream (`iter_jobs`),
    read as the rows run. `total` is the number of Jobs when `jobs` is a list, else None."""

    def __init__(self, jobs: Iterable[Job | RowError], bad: Iterable[RowError], out: str | Path, setup: Setup):
        self.total = len(jobs) if isinstance(jobs, Sized) else None
        self._rows = heapq.merge(jobs, bad, key=lambda item: item.row)
        self.out, self.setup = Path(out), setup
        self.manifest = Manifest(self.out)
        self.summary = Summary()

    def pending(self) -> Iterator[Job]:
        """The rows to run, one at a time, each with a file name no other row has (`Names`); the others are
        recorded as they come: skipped (their pictures are there) or failed (a bad row)."""
        names = Names()
        for item in self._rows:
            item = names.assign(item)
            if isinstance(item, RowError):
                self.failed(item.row, item.id, item.error)
                continue
            fp = item.fingerprint(self.setup.base)
            if all(is_complete(self.out / name, fp) for name in item.file_names()):
                record = {"id": item.id, "row": item.row, "status": "skipped", "files": item.file_names()}
                self.manifest.add(record, sync=False)
                self.summary.skipped += 1
            else:
                yield item

    def failed(self, row: int, ident: str, error: str) -> None:
        self.manifest.add({"id": ident, "row": row, "status": "failed", "error": error, "worker": worker_name()})
        self.summary.failed += 1
        if len(self.summary.errors) < KEPT_ERRORS:
            self.summary.errors.append(f"row {row} ({ident}): {error}")

    def record(self, job: Job, result: Rendered | str) -> None:
        """A row's outcome: its pictures, or the error that stopped it."""
        if isinstance(result, Rendered):
            self.finished(result)
        else:
            self.failed(job.row, job.id, result)

    def finished(self, r: Rendered) -> None:
        """Write the row's PNGs (each atomically), then its manifest line; a file that cannot be written fails
        the row (the disk full, the folder gone), not the batch."""
        for name, data in r.files:
            try:
                write_atomic(data, self.out / name)
            except OSError as e:
                self.failed(r.job.row, r.job.id, f"cannot write {name}: {e.strerror or e}")
                return
        self.manifest.add({"id": r.job.id, "row": r.job.row, "status": "done", "files": [n for n, _ in r.files],
                           "seeds": r.seeds, "seconds": round(r.seconds, 3), "worker": r.worker})  # fmt: skip
        self.summary.done += 1
        self.summary.pictures += len(r.files)


def run_local(batch: Batch, progress: Callable[[int, int | None], None] | None = None, stop: threading.Event | None = None,
              manager=None) -> Summary:  # fmt: skip
    """Every pending row in this process, one after the other, on one model manager (`manager`, or a new one made
    for the first row to run). `progress(i, n)`: i rows run of n (None when the rows are a stream)."""
    t = time.perf_counter()
    todo, total = batch.pending(), None
    if batch.total is not None:  # a list: count what is left to do (the Batch tab's bar)
        todo = list(todo)
        total = len(todo)
    for i, job in enumerate(todo):
        if stop is not None and stop.is_set():
            break
        manager = manager or batch.setup.manager()
        prepared = prepare_or_error(job, batch.setup)
        batch.record(job, render_or_error(prepared, manager) if isinstance(prepared, Prepared) else prepared)
        if progress is not None:
            progress(i + 1, total)
    batch.summary.seconds = time.perf_counter() - t
    return batch.summary


def prepare_or_error(job: Job, setup: Setup) -> Prepared | str:
    """The row prepared, or its error (a row's failure, whatever it is, is that row's; the rest go on)."""
    try:
        return prepare(job, setup)
    except Exception as e:  # noqa: BLE001
        return describe(e)


def render_or_error(p: Prepared, manager) -> Rendered | str:
    try:
        return render(p, manager)
    except Exception as e:  # noqa: BLE001
        return describe(e)


# ------------------------------------------------------------------------------------------------ command line
def add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", required=True, help="a .csv (header row) or .jsonl file, one job per row")
    p.add_argument("--out", required=True, help="output folder: PNGs and manifest.jsonl (a rerun skips done rows)")
    p.add_argument("--base", required=True, help="SD1.5 file or folder (assets/demo/shapes_sd.safetensors: demo)")
    p.add_argument("--models-dir", help="ControlNets named by condition, preprocessor weights (default: models, or "
                   "the demo model's folder)")  # fmt: skip
    p.add_argument("--embeddings", metavar="DIR", help="textual-inversion files, used by name in the prompts")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    d = p.add_argument_group("defaults for the rows (a row's own column wins; any setting can be a column)")
    d.add_argument("--controlnet", help="file, folder or condition (canny, depth, scribble, ...)")
    d.add_argument("--preprocessor", help="preprocessor for `image` columns (default: the condition's first)")
    d.add_argument("--processor-res", dest="resolution", type=int, metavar="PX",
                   help="the preprocessor's resolution (default: pixel perfect)")  # fmt: skip
    d.add_argument("--prompt", help="prompt template: {column}, {stem} (picture name), {id} are filled in")
    d.add_argument("--negative-prompt")
    d.add_argument("--steps", type=int)
    d.add_argument("--cfg", type=float)
    d.add_argument("--sampler", choices=sorted(SAMPLERS))
    d.add_argument("--seed", type=int)
    d.add_argument("--width", type=int)
    d.add_argument("--height", type=int)
    d.add_argument("--control-scale", dest="scale", type=float)
    d.add_argument("--control-mode", choices=ControlMode.keys())
    d.add_argument("--resize-mode", choices=ResizeMode.keys())
    d.add_argument("--pictures", type=int, help="pictures per row (seed, seed + 1, ...)")
    r = p.add_argument_group("Ray (pip install -r requirements-scale.txt)")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray Data: a local cluster, or ADDRESS (ray://host:10001 or auto)")  # fmt: skip
    r.add_argument("--workers", type=int, help="model replicas (default: one per GPU, else 2)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")


def setup_from_args(a: argparse.Namespace) -> Setup:
    card = card_for(a.base)
    folder = str(card.folder) if card is not None else "models"  # the demo model's ControlNets lie beside it
    return Setup(a.base, a.models_dir or folder, a.device, a.dtype, a.embeddings)


def defaults_from_args(a: argparse.Namespace) -> dict[str, object]:
    return {k: getattr(a, k) for k in SETTINGS if getattr(a, k, None) is not None}


def _bar(total_rows: int | None):
    """The rows as a bar on stderr; on no terminal, no bar (a log gets the summary, not the bar's frames)."""
    from tqdm import tqdm

    return tqdm(total=total_rows, unit="row", desc="batch", file=sys.stderr, dynamic_ncols=True, disable=None)


def cmd_batch(a: argparse.Namespace) -> int:
    """The batch; the exit status: 0 when every row was done or skipped, 1 when a row failed."""
    batch = Batch(iter_jobs(a.jobs, defaults_from_args(a)), [], a.out, setup_from_args(a))
    bar = None

    def progress(i: int, n: int | None) -> None:
        nonlocal bar
        if bar is None:  # (a tqdm with no total has no truth value)
            bar = _bar(n)
        bar.update(1)

    if a.ray:
        from cldm.scale.ray_batch import run_ray

        summary = run_ray(batch, address=a.ray, workers=a.workers, cpus_per_worker=a.cpus_per_worker,
                          gpus_per_worker=a.gpus_per_worker, progress=progress)  # fmt: skip
    else:
        summary = run_local(batch, progress)
    if bar is not None:
        bar.close()
    if not summary.rows:
        raise InputError(f"jobs file {a.jobs} has no rows")
    print(summary.line())
    for e in summary.errors[:SHOWN_ERRORS]:
        print(f"  failed: {e}")
    if summary.failed > SHOWN_ERRORS:
        print(f"  ... and {summary.failed - SHOWN_ERRORS} more (see {batch.manifest.path})")
    if summary.failed:
        print(f"error: {summary.failed} of {summary.rows} rows failed (see {batch.manifest.path})", file=sys.stderr)
        return 1
    return 0
