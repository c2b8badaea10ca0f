"""The batch as a Ray Data pipeline: rows -> `prepare` on CPU tasks -> `render` on a pool of model replicas (one
per GPU, or per CPU worker group) -> the driver writes the PNGs and the manifest as results stream in.

The stages call the same `prepare` and `render` as the in-process batch, so a row's pictures are the same bytes
wherever it ran. Ray Data restarts a replica that dies and retries its rows; whatever is lost beyond that (the
driver killed, the cluster gone) a rerun of the same command completes, skipping the rows already written.
The driver alone writes the output folder, so workers on other machines need no shared disk for it; they do need
the jobs' pictures and the models at the same paths (a shared disk or the same image on every node).

The jobs file is streamed: Ray Data gets the pending rows RAY_WINDOW at a time, one dataset each, so the driver
holds one window of rows whatever the file's length.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from cldm.errors import InputError
from cldm.scale.batch import Batch, Summary, prepare_or_error, render_or_error
from cldm.scale.jobs import Job
from cldm.scale.render import Prepared, Setup

log = logging.getLogger("batch.ray")
ROOT = Path(__file__).resolve().parents[3]  # the project: on every worker's import path
DEFAULT_CPU_WORKERS = 2
PREPROCESS_MEMORY = 1024**3  # bytes a preprocessing task reserves (the largest annotator models, e.g. depth)
# Rows per dataset. Each starts its model replicas again and drains at its end: at several seconds a row, a model
# load and the last rows' wait are well under 1% of a window this long; its rows take a few MB on the driver.
RAY_WINDOW = 5_000


def connect(address: str = "local", num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ("auto", "ray://host:10001", ...) or start a local one ("local"), with the
    project on the workers' import path. Does nothing when Ray is up already."""
    try:
        import ray
    except ImportError:
        raise InputError("Ray is not installed: pip install -r requirements-scale.txt") from None
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}}
    if address == "local":
        ray.init(num_cpus=num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _prepare_row(row: dict, setup: Setup) -> dict:
    job = pickle.loads(row["job"])
    return {"job": row["job"], "prepared": pickle.dumps(prepare_or_error(job, setup))}


class Replica:
    """A Ray Data actor: one model manager (base on the device, ControlNets cached) rendering one row per call."""

    def __init__(self, setup: Setup):
        self.manager = setup.manager()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for prepared_bytes in rows["prepared"]:
            prepared = pickle.loads(prepared_bytes)
            result = render_or_error(prepared, self.manager) if isinstance(prepared, Prepared) else prepared
            out.append(pickle.dumps(result))
        return {"job": rows["job"], "result": np.array(out, dtype=object)}


def plan(workers: int | None, cpus_per_worker: float, gpus_per_worker: float | None) -> tuple[int, float]:
    """(replicas, GPUs per replica) from what the cluster has: one replica per GPU, else two CPU groups."""
    import ray

    have = ray.cluster_resources()
    gpus, cpus = have.get("GPU", 0), have.get("CPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus else 0.0
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else DEFAULT_CPU_WORKERS
    # Ray would wait for ever for replicas the cluster cannot hold: say so instead
    if workers * cpus_per_worker + 1 > cpus or workers * gpus_per_worker > gpus:
        raise InputError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; {workers} replicas x ({cpus_per_worker:g} CPU, "
            f"{gpus_per_worker:g} GPU) plus 1 CPU for preprocessing do not fit: ask for fewer --workers or less "
            "--cpus-per-worker / --gpus-per-worker, or add nodes"
        )
    free = ray.available_resources()
    if workers * cpus_per_worker + 1 > free.get("CPU", 0) or workers * gpus_per_worker > free.get("GPU", 0):
        log.warning("the Ray cluster is busy (free now: %g CPUs, %g GPUs): the batch starts when other work ends",
                    free.get("CPU", 0), free.get("GPU", 0))  # fmt: skip
    return workers, gpus_per_worker


def windows(rows: Iterable[Job], size: int) -> Iterator[list[Job]]:
    """`rows` in lists of `size` (the last one shorter), read as they are asked for."""
    rows = iter(rows)
    while window := list(islice(rows, size)):
        yield window


def run_ray(batch: Batch, address: str = "local", workers: int | None = None, cpus_per_worker: float = 1.0,
            gpus_per_worker: float | None = None, progress=None) -> Summary:  # fmt: skip
    """Every pending row of `batch` on Ray; the results are written here as they arrive. `progress(i, n)`: i rows
    run of n (None: the rows are a stream)."""
    t = time.perf_counter()
    todo, total = batch.pending(), None
    if batch.total is not None:  # a list: count what is left to do
        todo = list(todo)
        total = len(todo)
    n = 0
    for i, window in enumerate(windows(todo, RAY_WINDOW)):
        import ray

        if i == 0:  # a local cluster gets one CPU more than the replicas take: preprocessing always has a slot
            local_cpus = int((workers or DEFAULT_CPU_WORKERS) * cpus_per_worker) + 1 if address == "local" else None
            connect(address, local_cpus)
            workers, gpus_per_worker = plan(workers, cpus_per_worker, gpus_per_worker)
            log.info("Ray: %d replicas x (%g CPU, %g GPU), %d rows at a time", workers, cpus_per_worker,
                     gpus_per_worker, RAY_WINDOW)  # fmt: skip
        setup = batch.setup
        ds = ray.data.from_items([{"job": pickle.dumps(job)} for job in window], override_num_blocks=len(window))
        # preprocessing: CPU tasks with room for an annotator model (their own stage: the replicas never wait on it)
        ds = ds.map(_prepare_row, fn_kwargs={"setup": setup}, num_cpus=1, memory=PREPROCESS_MEMORY)
        ds = ds.map_batches(Replica, fn_constructor_kwargs={"setup": setup}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)  # fmt: skip
        for row in ds.iter_rows():
            batch.record(pickle.loads(row["job"]), pickle.loads(row["result"]))
            n += 1
            if progress is not None:
                progress(n, total)
    batch.summary.seconds = time.perf_counter() - t
    return batch.summary
