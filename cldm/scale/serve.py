"""The model manager as a Ray Serve deployment of N replicas (one per GPU, or per CPU group), and RemoteManager:
what the app's Studio holds instead of a ModelManager when it runs with `--serve-replicas N`.

Each replica is one ModelManager (the base on its device, its own ControlNet cache) taking one request at a time;
Serve sends a request to a free replica, so N replicas make N pictures at once. A request's steps and live
previews stream back to the front end as they happen, the Stop button cancels the stream (the replica stops at its
next step), and errors arrive as the same exceptions a local manager raises. The pictures are the ones a local
ModelManager(prepack_cpu=False) makes for the same request: every replica runs the same code on the same weights.
The replicas read the files a request names (ControlNets, LoRAs, VAEs) at the same paths as the front end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from cldm.errors import Stopped
from cldm.pipeline.request import GenerationRequest
from cldm.pipeline.stages import Result
from cldm.runtime.devices import resolve_device
from cldm.runtime.manager import ModelManager
from cldm.scale.ray_batch import connect
from cldm.scale.render import worker_name

log = logging.getLogger("serve")
APP_NAME = "cldm"


class Replica:
    """One replica of the deployment (wrapped by `serve.deployment` in `start`)."""

    def __init__(self, base: str, device: str, dtype: str, cache_bytes: int, embeddings_dir: str | None):
        self.manager = ModelManager(base, device=device, dtype=dtype, cache_bytes=cache_bytes, prepack_cpu=False)
        self.embeddings_dir = embeddings_dir
        self.refused = self.manager.load_embeddings(embeddings_dir) if embeddings_dir else {}
        self.embeddings_version = 0
        self.name = worker_name()
        self.manager.sd  # noqa: B018 (the base is loaded before the replica reports healthy)

    def _embeddings(self, version: int) -> None:
        """The front end's Refresh reached this replica: read the embeddings folder again."""
        if version > self.embeddings_version and self.embeddings_dir:
            self.refused = self.manager.reload_embeddings()
        self.embeddings_version = max(version, self.embeddings_version)

    def info(self, embeddings_version: int = 0) -> dict:
        self._embeddings(embeddings_version)
        return {"device": str(self.manager.device), "dtype": str(self.manager.dtype).removeprefix("torch."),
                "replica": self.name, "refused": dict(self.refused),
                "embeddings": len(self.manager.sd.text.embeddings)}  # fmt: skip

    async def stream(self, request: GenerationRequest, preview_every: int = 0, embeddings_version: int = 0):
        """Run one request, yielding ("step", i, n), ("preview", pictures), then ("done", result, replica, start,
        end) or ("error", exception). A cancelled stream stops the generation at its next step."""
        self._embeddings(embeddings_version)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def step(i: int, n: int) -> None:
            if stop.is_set():
                raise Stopped(f"Stopped at step {i} of {n}; nothing saved.")
            events.put(("step", i, n))

        def work() -> None:
            t0 = time.time()
            try:
                preview = (lambda pictures: events.put(("preview", pictures))) if preview_every else None
                result = self.manager.run(request, step, preview, preview_every)
                events.put(("done", result, self.name, t0, time.time()))
            except BaseException as e:  # noqa: BLE001 (the front end raises it again)
                events.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        try:
            while True:
                event = await asyncio.to_thread(events.get)
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            stop.set()  # the client went away or pressed Stop: the worker thread ends at its next step


@dataclass
class Served:
    """Which replica made a request's pictures, and when (wall-clock seconds)."""

    replica: str
    start: float
    end: float


class RemoteManager:
    """The part of ModelManager the app uses, answered by the deployment's replicas."""

    prepack_cpu = False

    def __init__(self, handle, base: str):
        self.handle = handle
        self.base_path = base
        self._embeddings_version = 0
        info = handle.info.remote().result()
        self.device = torch.device(info["device"])  # the replicas'; what the status line and the limits name
        self.dtype = getattr(torch, info["dtype"])  # "float32", "bfloat16", ...
        self.annotator_device = resolve_device("auto")  # the preprocessors run in the front end
        self.refused, self.embedding_count = info["refused"], info["embeddings"]
        self.served: list[Served] = []  # the last requests, for the log and the tests
        self.lock = threading.Lock()

    def load_embeddings(self, folder) -> dict[str, str]:
        return dict(self.refused)  # the replicas read the folder when they start

    def reload_embeddings(self) -> dict[str, str]:
        """Refresh: each replica reads the embeddings folder again before its next request."""
        self._embeddings_version += 1
        info = self.handle.info.remote(self._embeddings_version).result()
        self.refused, self.embedding_count = info["refused"], info["embeddings"]
        return dict(self.refused)

    def run(self, request: GenerationRequest, callback=None, preview=None, preview_every: int = 0) -> Result:
        """Like ModelManager.run, on whichever replica is free; steps and previews arrive as they happen."""
        stream = self.handle.options(stream=True).stream.remote(
            request, preview_every if preview is not None else 0, self._embeddings_version
        )
        try:
            for event in stream:
                if event[0] == "step" and callback is not None:
                    callback(event[1], event[2])  # raises Stopped when the user pressed Stop
                elif event[0] == "preview" and preview is not None:
                    preview(event[1])
                elif event[0] == "done":
                    with self.lock:
                        self.served = [*self.served[-99:], Served(*event[2:])]
                    log.info("request served by %s in %.1fs", event[2], event[4] - event[3])
                    return event[1]
                elif event[0] == "error":
                    raise event[1]
        except BaseException:
            stream.cancel()
            raise
        raise RuntimeError("the replica's stream ended without a result")


def start(base: str, replicas: int, address: str = "local", device: str = "auto", dtype: str = "auto",
          cache_bytes: int = 4 * 1024**3, embeddings_dir: str | None = None, cpus_per_replica: float = 1.0,
          gpus_per_replica: float | None = None) -> RemoteManager:  # fmt: skip
    """Start (or join) Ray, deploy `replicas` replicas of the model manager and return the front end's handle."""
    connect(address, int(replicas * cpus_per_replica) + 1 if address == "local" else None)
    import ray
    from ray import serve

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    serve.start(http_options={"location": "NoServer"})  # the Gradio front end is the only way in
    deployment = serve.deployment(
        Replica, name="Generator", num_replicas=replicas, max_ongoing_requests=1,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    )  # fmt: skip
    t = time.perf_counter()
    handle = serve.run(deployment.bind(base, device, dtype, cache_bytes, embeddings_dir), name=APP_NAME,
                       route_prefix=None)  # fmt: skip
    log.warning("Ray Serve: %d replicas of %s ready in %.0fs (%g CPU, %g GPU each)", replicas, base,
                time.perf_counter() - t, cpus_per_replica, gpus_per_replica)  # fmt: skip
    return RemoteManager(handle, base)


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
