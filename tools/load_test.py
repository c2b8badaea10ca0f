"""Load test: N clients at once against the demo app, several tabs, some bad requests mixed in.

    python tools/load_test.py --clients 4 --seconds 180
    python tools/load_test.py --clients 16 --seconds 180 --queue-size 8

It starts `app.py --demo` in its own process, makes each distinct good request once alone (the serial pictures),
then lets the clients loop over random good and bad requests for the given time. Every good answer must be exactly
its serial picture (pixels), every bad one its clear message, and a request refused because the queue is full must
be answered at once. It prints the server's memory (RSS) before and after, and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # annotators, conditions
EXAMPLES = ROOT / "assets" / "examples"
SIZE = 64
STEPS = 8


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def serve_demo(out_dir: str | os.PathLike, *args: str, port: int | None = None, timeout: float = 120,
               env: dict[str, str] | None = None, model: tuple[str, ...] = ("--demo",), root: Path = ROOT):  # fmt: skip
    """`python app.py --demo` (or the `model` flags) of the checkout `root` on 127.0.0.1 in a child process (`env`
    added to its environment): yields (url, process); killed on exit."""
    import httpx

    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(root / "app.py"), *model, "--port", str(port), "--out-dir", str(out_dir), *args]
    log = open(Path(out_dir).parent / f"server-{port}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited ({proc.returncode}); see {log.name}")
            try:
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the app did not start in {timeout} s; see {log.name}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def _canvas(path: Path):
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))}


def params(key: str) -> list:
    """The default slider values of every preprocessor of a condition's tab, in the API's order."""
    import annotators
    from cldm.hints.conditions import BY_KEY

    return [p.default for a in BY_KEY[key].preprocessors for p in annotators.ANNOTATORS[a].params]


# `/<tab>_generate` after the unit and the settings, by name (the rest keep the page's values): the unit's picture
# cropped at the detection resolution given, no init picture, no live previews, no image prompt, the page's base
PLAIN = dict(control_mode="Balanced", resize_mode="Crop and Resize", pixel_perfect=False, init_image=None,
             preview_every=0, image_prompt=None)  # fmt: skip


def _settings(prompt: str, seed: int, **kw) -> list:
    s = dict(prompt=prompt, added_prompt="", negative_prompt="", batch=1, width=SIZE, height=SIZE, steps=STEPS, cfg=5.0,
             sampler="ddim", seed=seed, randomize=False, denoise=1.0)  # fmt: skip
    s.update(kw)
    return list(s.values())


def good_requests() -> list[tuple[str, str, list]]:
    """(name, api, args): the canny, scribble and seg tabs at three seeds each."""
    from gradio_client import handle_file

    out = []
    for seed in (1, 2, 3):
        out.append((f"canny-{seed}", "/canny_generate", [handle_file(str(EXAMPLES / "shapes.png")), "canny", SIZE, 1.0, 0.0,
                    1.0, *params("canny"), *_settings("a blue circle and a yellow star on a pink background", seed)]))  # fmt: skip
        out.append((f"scribble-{seed}", "/scribble_generate", [_canvas(EXAMPLES / "triangle_sketch.png"), "scribble_sketch",
                    SIZE, 1.0, 0.0, 1.0, *_settings("a green triangle on a white background", seed)]))  # fmt: skip
        out.append((f"seg-{seed}", "/seg_generate", [handle_file(str(EXAMPLES / "shapes_seg.png")), "none", SIZE, 1.0, 0.0,
                    1.0, *_settings("a blue circle and a yellow star on a pink background", seed)]))  # fmt: skip
    return out


def bad_requests(folder: Path) -> list[tuple[str, str, list, str]]:
    """(name, api, args, the message expected)."""
    from gradio_client import handle_file

    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    strip = folder / "strip.png"
    Image.new("L", (60000, 8)).save(strip)
    shapes = handle_file(str(EXAMPLES / "shapes.png"))
    return [
        ("broken", "/canny_generate", [handle_file(str(broken)), "canny", SIZE, 1.0, 0.0, 1.0, *params("canny"),
                                  *_settings("a red square", 1)], "Cannot read the image"),  # fmt: skip
        ("strip", "/canny_generate", [handle_file(str(strip)), "canny", SIZE, 1.0, 0.0, 1.0, *params("canny"),
                                 *_settings("a red square", 1)], "8:1"),  # fmt: skip
        ("budget", "/canny_generate", [shapes, "canny", SIZE, 1.0, 0.0, 1.0, *params("canny"),
                                  *_settings("a", 1, width=1024, height=1024, steps=100, batch=4)], "megapixel-steps"),
        ("preprocessor", "/canny_generate", [shapes, "<b>x</b>", SIZE, 1.0, 0.0, 1.0, *params("canny"), *_settings("a", 1)],
         "&lt;b&gt;x&lt;/b&gt;' is not a preprocessor"),
        ("no-model", "/depth_generate", [shapes, "none", SIZE, 1.0, 0.0, 1.0, *params("depth"), *_settings("a", 1)], "only has ControlNets"),
    ]  # fmt: skip


def pixels(files: list[str]) -> list[bytes]:
    return [np.asarray(Image.open(f)).tobytes() for f in files]


@dataclass
class Report:
    clients: int
    seconds: float
    queue_size: int
    good: int = 0
    good_wrong: int = 0
    bad: int = 0
    bad_wrong: int = 0
    queue_full: int = 0
    queue_full_max_s: float = 0.0
    queue_full_s: list[float] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    good_latency_s: list[float] = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_mb: list[float] = field(default_factory=list)  # every 15 s
    pictures_per_minute: float = 0.0

    def summary(self) -> str:
        lat = sorted(self.good_latency_s) or [float("nan")]
        full = sorted(self.queue_full_s) or [0.0]
        return (
            f"{self.clients} clients, {self.seconds:.0f} s, queue {self.queue_size}: {self.good} good requests "
            f"({self.good_wrong} with another picture than alone), {self.bad} bad ({self.bad_wrong} without their "
            f"message), {self.queue_full} refused as queue full (answered in {full[len(full) // 2]:.2f} s median, "
            f"{full[int(len(full) * 0.95)]:.2f} s p95, {self.queue_full_max_s:.2f} s max), "
            f"{len(self.other_errors)} other errors; {self.pictures_per_minute:.1f} pictures/min; latency median "
            f"{lat[len(lat) // 2]:.1f} s, max {lat[-1]:.1f} s; server RSS {self.rss_start_mb:.0f} MB at start, "
            f"{self.rss_end_mb:.0f} MB at the end (every 15 s: {', '.join(f'{r:.0f}' for r in self.rss_mb)})"
        )


def run(clients: int, seconds: float, queue_size: int = 16, bad_share: float = 0.15, seed: int = 0,
        server_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Report:  # fmt: skip
    from gradio_client import Client

    report = Report(clients, seconds, queue_size)
    with tempfile.TemporaryDirectory(prefix="cldm-load-") as tmp:
        tmp = Path(tmp)
        goods, bads = good_requests(), bad_requests(tmp)
        with serve_demo(tmp / "out", "--queue-size", str(queue_size), *server_args, env=env) as (url, proc):
            first = Client(url, verbose=False)
            serial = {name: pixels(first.predict(*args, **PLAIN, api_name=api)[2]) for name, api, args in goods}
            report.rss_start_mb = rss_mb(proc.pid)
            lock = threading.Lock()
            deadline = time.time() + seconds

            def client(i: int) -> None:
                rng = random.Random(seed * 1000 + i)
                c = Client(url, verbose=False)
                while time.time() < deadline:
                    bad = rng.random() < bad_share
                    name, api, args, expect = rng.choice(bads) if bad else (*rng.choice(goods), "")
                    t0 = time.perf_counter()
                    try:
                        result = c.predict(*args, **PLAIN, api_name=api)
                    except Exception as e:  # noqa: BLE001 (every answer is sorted below)
                        took, msg = time.perf_counter() - t0, str(e)
                        with lock:
                            if "queue is full" in msg.lower():
                                report.queue_full += 1
                                report.queue_full_max_s = max(report.queue_full_max_s, took)
                                report.queue_full_s.append(took)
                                time.sleep(0.2)
                            elif bad:
                                report.bad += 1
                                report.bad_wrong += expect not in msg
                            else:
                                report.other_errors.append(f"{name}: {msg[:200]}")
                        continue
                    took = time.perf_counter() - t0
                    with lock:
                        if bad:
                            report.bad += 1
                            report.bad_wrong += 1  # a bad request that got pictures
                        else:
                            report.good += 1
                            report.good_wrong += pixels(result[2]) != serial[name]
                            report.good_latency_s.append(took)

            def sample_memory() -> None:
                while time.time() < deadline:
                    report.rss_mb.append(rss_mb(proc.pid))
                    time.sleep(15)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            threads.append(threading.Thread(target=sample_memory))
            t0 = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.time() - t0
            report.rss_end_mb = rss_mb(proc.pid)
            report.pictures_per_minute = report.good / elapsed * 60
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--bad-share", type=float, default=0.15)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--server-args", default="", help='more flags for app.py, e.g. "--no-trim-memory"')
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="set in the server's environment, e.g. MALLOC_ARENA_MAX=2 or LD_PRELOAD=libjemalloc.so.2")  # fmt: skip
    a = p.parse_args()
    env = dict(e.split("=", 1) for e in a.server_env)
    report = run(a.clients, a.seconds, a.queue_size, a.bad_share, server_args=tuple(a.server_args.split()), env=env)
    print(report.summary())
    if a.json:
        data = asdict(report)
        data["good_latency_s"] = sorted(data["good_latency_s"])
        Path(a.json).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
