"""Pictures per minute for one jobs file: in-process vs Ray Data with 1 and 2 model replicas, on this machine.

    python tools/batch_throughput.py [--rows 50] [--steps 20] [--base assets/demo/shapes_sd.safetensors]

It writes the rows (the demo model's shapes and their hints) into a temporary folder, runs each way into its own
output folder, checks that every way made the same bytes and prints the figures. Ray must be installed
(requirements-scale.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cldm.scale.batch import Batch, run_local  # noqa: E402
from cldm.scale.jobs import read_jobs  # noqa: E402
from cldm.scale.ray_batch import connect, run_ray  # noqa: E402
from cldm.scale.render import Setup  # noqa: E402
from cldm.training.shapes import make_sample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--base", default=str(ROOT / "assets" / "demo" / "shapes_sd.safetensors"))
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cldm-throughput-"))
    rows = []
    for i in range(a.rows):
        s = make_sample(7_000 + i, 64)
        kind = ("canny", "scribble", "seg")[i % 3]
        Image.fromarray(s.hint(kind)).save(tmp / f"h{i}.png")
        rows.append({"hint": f"h{i}.png", "controlnet": kind, "prompt": s.caption, "seed": i, "steps": a.steps})
    (tmp / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    connect("local", num_cpus=3)  # room for 2 replicas and preprocessing
    setup = Setup(a.base, str(Path(a.base).parent))
    figures, made = {}, {}
    for name, run in [("in-process", lambda b: run_local(b)),
                      ("Ray, 1 replica", lambda b: run_ray(b, workers=1)),
                      ("Ray, 2 replicas", lambda b: run_ray(b, workers=2))]:  # fmt: skip
        out = tmp / name.replace(" ", "").replace(",", "-")
        jobs, bad = read_jobs(tmp / "jobs.jsonl")
        summary = run(Batch(jobs, bad, out, setup))
        figures[name] = summary
        made[name] = {f.name: f.read_bytes() for f in out.glob("*.png")}
        print(f"{name:16s} {summary.per_minute:6.1f} pictures/min ({summary.pictures} in {summary.seconds:.1f}s, "
              "start-up included)", flush=True)  # fmt: skip
    same = all(m == made["in-process"] for m in made.values())
    print(f"every way made the same bytes: {same}")


if __name__ == "__main__":
    main()
