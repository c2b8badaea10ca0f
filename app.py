"""ControlNet studio: `python app.py [flags]` builds the web app (the `studio` package) and launches it."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from cldm.io.locate import DEFAULT_BASE_REPO, detect_offline
from cldm.runtime.manager import ModelManager
from studio.a1111.server import api_app
from studio.availability import choose_base
from studio.launch import quiet_dependencies, read_auth, serve
from studio.page import build_app
from studio.service import Limits, Studio

log = logging.getLogger("app")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="ControlNet studio web app")
    p.add_argument("--base", default=DEFAULT_BASE_REPO, help="hub id, .safetensors/.ckpt file or diffusers folder")
    p.add_argument("--models-dir", default="models", help="local ControlNet (and preprocessor) weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache-gb", type=float, default=4.0, help="CPU memory for cached ControlNets")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (use it with --auth)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD", help="require a login (repeatable)")
    p.add_argument("--auth-file", help="a file of USER:PASSWORD lines (keeps passwords out of the process list)")
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--no-api", action="store_true", help="leave out the A1111 API (/sdapi/v1/*, /controlnet/*, "
                   "/docs); it is on by default, behind the same --auth")  # fmt: skip
    p.add_argument("--max-work", type=float, help="megapixel-steps one request may take (default: 32 on the CPU, "
                   "400 on CUDA; 512x512 x 20 steps x 1 picture is 5.2)")  # fmt: skip
    p.add_argument("--keep-outputs", type=int, default=500, help="result PNGs kept on the server (oldest go first)")
    p.add_argument("--out-dir", help="folder for result PNGs (default: a new temporary folder)")
    p.add_argument("--demo", action="store_true", help="use the small shapes model shipped in assets/demo")
    p.add_argument("--low-vram", action="store_true", help="keep only the running module on the GPU (slower; for "
                   "4-6 GB cards)")  # fmt: skip
    p.add_argument("--no-prepack", action="store_true", help="bf16 on the CPU without the prepacked convolutions "
                   "(about 2 GiB less memory with one ControlNet; slower steps)")  # fmt: skip
    p.add_argument("--no-trim-memory", action="store_true", help="leave freed memory with the allocator after each "
                   "request (the server's RSS then creeps up; see docs on the load test)")  # fmt: skip
    g = p.add_argument_group("serving on Ray (pip install -r requirements-scale.txt)")
    g.add_argument("--serve-replicas", type=int, default=0, metavar="N",
                   help="run the model as a Ray Serve deployment of N replicas (one per GPU); N requests at once")  # fmt: skip
    g.add_argument("--ray", default="local", metavar="ADDRESS", help="with --serve-replicas: the Ray cluster to "
                   "join (auto, ray://host:10001); default: start a local one")  # fmt: skip
    g.add_argument("--cpus-per-replica", type=float, default=1.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_dependencies()
    auth = read_auth(a.auth, a.auth_file)
    if a.share and not auth:
        log.warning("--share without --auth: anyone with the link can use every endpoint of this server")
    # once, before any weight is looked up: offline, every later lookup of this process stays on this machine
    offline = detect_offline()
    base, card, banner = choose_base(a.base, a.demo)
    # textual inversions in <models>/embeddings, used by file name in any prompt (as A1111's embeddings folder)
    embeddings_dir = Path(str(card.folder) if card else a.models_dir) / "embeddings"
    if a.serve_replicas > 0:
        from cldm.scale.serve import start

        manager = start(base, a.serve_replicas, a.ray, a.device, a.dtype, int(a.cache_gb * 1024**3),
                        str(embeddings_dir), a.cpus_per_replica)  # fmt: skip
    else:
        manager = ModelManager(base, device=a.device, dtype=a.dtype, cache_bytes=int(a.cache_gb * 1024**3),
                               low_vram=a.low_vram, prepack_cpu=not a.no_prepack,
                               trim_memory=not a.no_trim_memory)  # fmt: skip
    log.warning("running on %s in %s%s", manager.device, str(manager.dtype).removeprefix("torch."),
                " (prepacked bf16 convolutions)" if manager.prepack_cpu else "")  # fmt: skip
    for name, why in manager.load_embeddings(embeddings_dir).items():
        log.warning("embedding %s left out: %s", name, why)
    limits = Limits.for_device(manager.device.type)
    limits = replace(limits, keep_outputs=a.keep_outputs, **({} if a.max_work is None else {"max_work": a.max_work}))
    # a model with a card (the demo model) ships its ControlNets beside it
    studio = Studio(manager, str(card.folder) if card else a.models_dir, a.out_dir, card=card, limits=limits,
                    offline=offline)  # fmt: skip
    where = f"{a.serve_replicas} Ray Serve replicas on {manager.device}" if a.serve_replicas else manager.device
    offline_note = " Offline: only weights on this machine are used." if offline else ""
    demo = build_app(studio, banner=f"{banner} Device: {where}.{offline_note}")
    demo.queue(max_size=a.queue_size, default_concurrency_limit=max(1, a.serve_replicas))  # one per replica
    api = None if a.no_api else api_app(studio, a.queue_size)
    serve(demo, api, server_name=a.host, server_port=a.port, share=a.share, allowed_paths=[str(studio.out_dir)],
          auth=auth or None)  # fmt: skip


if __name__ == "__main__":
    main()
