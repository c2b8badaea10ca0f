"""Record every picture the project makes through its outward interfaces, and compare two such records.

    python tools/pictures.py record OUT.json [--only cli,batch,ray,app] [--work DIR] [--parallel 2] [--root DIR]
    python tools/pictures.py compare A.json B.json

Meant to show that a refactor (modules moved into packages, ...) changes no picture, byte for byte: record once on
the commit before it, once after (each in its own checkout, with that checkout's .venv: the Python that runs this
script runs the project; --root names the checkout, default the one holding this script), and compare. `record`
drives only what a user drives, so it survives the move of any module:

- cli: `python -m cldm generate` on the demo model (assets/demo), one process per case (`picture_cases.cli_cases`), --parallel
  at a time: six samplers and more, one and two ControlNets, control and resize modes, img2img, inpaint (both
  modes), hires fix (latent, lanczos), a LoRA, IP-Adapter, reference-only, batches of 2 (with and without
  --seed-per-picture), clip skip 2 with guess mode, bf16; fp32 on the CPU otherwise, 64 px, 6 steps.
- batch: `python -m cldm batch` on a jobs CSV of six varied rows (`picture_cases.JOB_ROWS`), fp32.
- ray: the same jobs file with `--ray --workers 2` (an error "ray is not installed" when it is not). Its pictures
  should equal the batch's, byte for byte (same names after the part).
- app: `python app.py --demo` on a free port, driven with gradio_client (`picture_cases.app_cases`: ONE table of case, endpoint
  and positional arguments; adapt it there when the endpoints' names or arguments change). The two Inpaint-tab
  requests run on a second server whose model folder is the demo's plus a stand-in inpaint ControlNet (see there).

Each picture gets a name (`<part>/<case>/<index>`; `app/<case>/gallery<i>` for the app's gallery items, hints
included) and a record: the sha256 of its decoded RGB pixels, the sha256 of its PNG "parameters" text (null if none)
and of its other PNG text chunks (the batch's `cldm-job` fingerprint), and its size. The parameters text itself is
kept too, so that `compare` can show what changed in it. A case that fails is recorded as an error (and `record`
exits 1).

Determinism: fixed seeds everywhere (the app's "Randomize seed" off), live previews off, the same inputs (copied
from assets/examples or drawn here, never made by the project), and OMP/MKL threads fixed to 2 in every child (the
CPU's bf16 sums depend on the thread count; OMP_WAIT_POLICY=PASSIVE, which changes no sum, keeps a busy machine
from slowing the sampling 50-fold). The work folder has a fixed path (default /tmp/cldm-pictures, emptied
first) because the batch's `cldm-job` fingerprint hashes the absolute paths of a row's pictures: use the same
--work for both records, and do not run two records with the same --work at once. The other paths are given
relative to the checkout, so the checkout's own path does not matter.

`compare` prints each picture that differs (pixels, parameters text, other text, size), is missing on one side, or
whose case failed on one side, and exits 1 if there is any; 0 if the records agree. Only the parts both records
have are compared (with a note when they differ).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from load_test import serve_demo  # tools/ is this script's folder
from picture_cases import (
    BASE,
    BATCH_DEFAULTS,
    CN,
    DEMO,
    JOB_ROWS,
    ROOT,
    SIZE,
    app_cases,
    cli_cases,
    make_inputs,
    write_jobs,  # fmt: skip
)
from PIL import Image

PARTS = ("cli", "batch", "ray", "app")
DEFAULT_WORK = Path("/tmp/cldm-pictures")
MARKER = ".pictures-work"  # the work folder is only emptied when it has this file
THREADS = "2"

# ---------------------------------------------------------------------------------------------------------------
# recording


def picture_record(path: str | Path) -> dict:
    with Image.open(path) as im:
        im.load()
        text = dict(getattr(im, "text", {}) or {})
        rgb = im.convert("RGB")
    params = text.pop("parameters", None)
    return {
        "pixels": hashlib.sha256(rgb.tobytes()).hexdigest(),
        "parameters": hashlib.sha256(params.encode()).hexdigest() if params is not None else None,
        "other_text": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(text.items())},
        "size": list(rgb.size),
        "parameters_text": params,
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    # passive: threads that wait sleep instead of spinning (the same sums; 50x faster sampling on a busy machine)
    env.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, OMP_WAIT_POLICY="PASSIVE")
    return env


def run_cmd(cmd: list[str], log: Path, timeout: float) -> None:
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit {r.returncode}: {' | '.join(tail)}")


def _index(stem: str) -> int:
    m = re.search(r"-(\d+)$", stem)
    return int(m.group(1)) if m else 0


def record_cli(work: Path, inputs: dict[str, str], rec: dict, parallel: int = 2) -> None:
    """One `python -m cldm generate` process per case, `parallel` at a time (each with its fixed thread count, so
    the pictures do not depend on it)."""

    def one(c: dict) -> None:
        folder = work / "cli" / c["case"]
        folder.mkdir(parents=True)
        cmd = [sys.executable, "-m", "cldm", "generate", "--base", BASE, "--device", "cpu"]
        defaults = {"--dtype": "fp32", "--width": str(SIZE), "--height": str(SIZE), "--steps": "6", "--cfg": "5"}
        for flag, value in defaults.items():
            if flag not in c["args"]:
                cmd += [flag, value]
        cmd += [*c["args"], "--out", str(folder / "out.png")]
        t = time.perf_counter()
        try:
            run_cmd(cmd, folder / "log.txt", timeout=400)
            files = sorted(folder.glob("*.png"), key=lambda p: _index(p.stem))
            if not files:
                raise RuntimeError("no picture written")
            for n, p in enumerate(files):
                rec["pictures"][f"cli/{c['case']}/{n}"] = picture_record(p)
        except Exception as e:  # noqa: BLE001 (recorded; the other cases go on)
            rec["errors"][f"cli/{c['case']}"] = str(e)[:500]
        say(f"cli/{c['case']}: {time.perf_counter() - t:.1f}s")

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(one, cli_cases(inputs)))


def record_batch(part: str, work: Path, inputs: dict[str, str], rec: dict) -> None:
    folder = work / part
    folder.mkdir(parents=True)
    # one jobs file for batch and ray, beside the inputs: the same rows, so the same fingerprints and pictures
    jobs = Path(inputs["shapes"]).parent / "jobs.csv"
    if not jobs.exists():
        write_jobs(jobs, JOB_ROWS)
    cmd = [sys.executable, "-m", "cldm", "batch", "--base", BASE, "--jobs", str(jobs), "--out", str(folder / "out"),
           "--device", "cpu", "--dtype", "fp32", *BATCH_DEFAULTS]  # fmt: skip
    if part == "ray":
        cmd += ["--ray", "--workers", "2"]
    try:
        run_cmd(cmd, folder / "log.txt", timeout=400)
    except Exception as e:  # noqa: BLE001 (the rows that were done are still recorded)
        rec["errors"][part] = str(e)[:500]
    manifest = folder / "out" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()] if manifest.exists() else []
    for r in rows:
        if r.get("status") != "done":
            rec["errors"][f"{part}/{r.get('id')}"] = f"{r.get('status')}: {str(r.get('error'))[:300]}"
            continue
        for n, name in enumerate(r["files"]):
            rec["pictures"][f"{part}/{r['id']}/{n}"] = picture_record(folder / "out" / name)
    missing = {row["id"] for row in JOB_ROWS} - {r.get("id") for r in rows}
    for m in sorted(missing):
        rec["errors"][f"{part}/{m}"] = "not in the manifest"


def inpaint_demo(folder: Path) -> Path:
    """A copy of the demo model's folder (links) whose card lists inpaint too, with the canny ControlNet's weights
    as the inpaint ControlNet; returns its base file."""
    folder.mkdir(parents=True)
    demo = ROOT / DEMO
    for p in demo.iterdir():
        if p.name != "model_card.json":
            (folder / p.name).symlink_to(p.resolve())
    card = json.loads((demo / "model_card.json").read_text())
    card["conditions"] = [*card["conditions"], "inpaint"]
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    (folder / "control_v11p_sd15_inpaint.safetensors").symlink_to((ROOT / CN["canny"]).resolve())
    return folder / card["base"]


@contextlib.contextmanager
def serve_app(folder: Path, server: str, timeout: float = 180):
    """`python app.py --demo` (or the inpaint variant) on 127.0.0.1 in a child process (load_test's); yields its
    url; killed on exit."""
    folder.mkdir(parents=True)
    model = ("--demo",) if server == "demo" else ("--base", str(inpaint_demo(folder / "model")))
    env = dict(child_env(), GRADIO_TEMP_DIR=str(folder / "gradio-tmp"), GRADIO_ANALYTICS_ENABLED="False")
    with serve_demo(folder / "out", model=model, timeout=timeout, env=env, root=ROOT) as (url, _):
        yield url


def _paths(result) -> tuple[list[str], list[str]]:
    """(gallery images, files) from an endpoint's answer: the gallery is a list of {"image": ...}, the files the
    last list of paths."""
    gallery, files = [], []
    for item in result if isinstance(result, (list, tuple)) else [result]:
        if isinstance(item, list) and item and all(isinstance(x, dict) and "image" in x for x in item):
            gallery = [x["image"] if isinstance(x["image"], str) else x["image"]["path"] for x in item]
        elif isinstance(item, list) and item and all(isinstance(x, str) for x in item):
            files = item
    return gallery, files


def record_app(work: Path, inputs: dict[str, str], rec: dict) -> None:
    from gradio_client import Client

    cases = app_cases(inputs)
    for server in dict.fromkeys(c.get("server", "demo") for c in cases):
        try:
            with serve_app(work / "app" / server, server) as url:
                client = Client(url, verbose=False)
                for c in (c for c in cases if c.get("server", "demo") == server):
                    t = time.perf_counter()
                    try:
                        gallery, files = _paths(client.predict(*c["args"], api_name=c["api_name"]))
                        if not files:
                            raise RuntimeError("no files in the answer")
                        for n, p in enumerate(files):
                            rec["pictures"][f"app/{c['case']}/{n}"] = picture_record(p)
                        for n, p in enumerate(gallery):
                            rec["pictures"][f"app/{c['case']}/gallery{n}"] = picture_record(p)
                    except Exception as e:  # noqa: BLE001 (recorded; the other requests go on)
                        rec["errors"][f"app/{c['case']}"] = str(e)[:500]
                    say(f"app/{c['case']}: {time.perf_counter() - t:.1f}s")
        except Exception as e:  # noqa: BLE001
            rec["errors"][f"app ({server} server)"] = str(e)[:500]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_work(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            sys.exit(f"{work} exists and is not a pictures work folder (no {MARKER}): choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by tools/pictures.py; emptied by each record\n")


def record(out: Path, parts: list[str], work: Path, parallel: int = 2) -> int:
    from importlib.metadata import version

    prepare_work(work)
    inputs = make_inputs(work / "inputs", ROOT)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec: dict = {
        "meta": {"root": str(ROOT), "commit": commit, "work": str(work), "parts": parts,
                 "python": platform.python_version(), "torch": version("torch"), "threads": THREADS,
                 "cpus": os.cpu_count(), "seconds": {}},
        "pictures": {},
        "errors": {},
    }  # fmt: skip
    t0 = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        if part == "cli":
            record_cli(work, inputs, rec, parallel)
        elif part == "app":
            record_app(work, inputs, rec)
        elif part == "ray" and subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode:
            rec["errors"]["ray"] = "ray is not installed"
        else:
            record_batch(part, work, inputs, rec)
        rec["meta"]["seconds"][part] = round(time.perf_counter() - t, 1)
        n = sum(k.startswith(part + "/") for k in rec["pictures"])
        say(f"== {part}: {n} pictures in {rec['meta']['seconds'][part]:.0f}s")
    rec["meta"]["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    rec["meta"]["counts"] = {p: sum(k.startswith(p + "/") for k in rec["pictures"]) for p in parts}
    out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    say(f"{len(rec['pictures'])} pictures {rec['meta']['counts']} in {rec['meta']['seconds']['total']:.0f}s -> {out}")
    for k, v in rec["errors"].items():
        say(f"ERROR {k}: {v}")
    return 1 if rec["errors"] else 0


FIELDS = ("pixels", "parameters", "other_text", "size")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    parts_a, parts_b = a["meta"]["parts"], b["meta"]["parts"]
    parts = [p for p in parts_a if p in parts_b]
    if parts_a != parts_b:
        print(f"note: A recorded {','.join(parts_a)}, B {','.join(parts_b)}: comparing {','.join(parts)} only")

    def ours(d: dict) -> dict:
        return {k: v for k, v in d.items() if re.split(r"[/ ]", k)[0] in parts}

    pa, pb = ours(a["pictures"]), ours(b["pictures"])
    diffs = []
    for name in sorted(set(pa) | set(pb)):
        if name not in pb:
            diffs.append(f"{name}: only in {a_path}")
        elif name not in pa:
            diffs.append(f"{name}: only in {b_path}")
        else:
            bad = [f for f in FIELDS if pa[name].get(f) != pb[name].get(f)]
            if bad:
                line = f"{name}: {', '.join(bad)} differ"
                if "parameters" in bad:
                    line += f"\n    A: {pa[name].get('parameters_text')!r}\n    B: {pb[name].get('parameters_text')!r}"
                diffs.append(line)
    ea, eb = ours(a.get("errors", {})), ours(b.get("errors", {}))
    for case in sorted(set(ea) | set(eb)):
        if ea.get(case) != eb.get(case):
            diffs.append(f"{case}: error A: {ea.get(case)!r} / B: {eb.get(case)!r}")
    for line in diffs:
        print(line)
    counts = {}
    for name in pa:
        counts[name.split("/")[0]] = counts.get(name.split("/")[0], 0) + 1
    if diffs:
        print(f"{len(diffs)} differences ({len(pa)} pictures in A, {len(pb)} in B)")
        return 1
    print(f"identical: {len(pa)} pictures {counts}, {len(ea)} errors on both sides")
    return 0


def main() -> None:
    global ROOT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="make every picture, write their hashes to OUT.json")
    r.add_argument("out", type=Path)
    r.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: {','.join(PARTS)})")
    r.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"work folder, emptied first (default: {DEFAULT_WORK})"
    )
    r.add_argument("--root", type=Path, default=ROOT, help=f"the checkout to record (default: {ROOT})")
    r.add_argument("--parallel", type=int, default=2, help="CLI processes at a time (default: 2)")
    c = sub.add_parser("compare", help="print the pictures that differ; exit 1 if any")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args()
    if a.cmd == "compare":
        sys.exit(compare(a.a, a.b))
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    ROOT = a.root.resolve()
    sys.exit(record(a.out.resolve(), parts, a.work.resolve(), a.parallel))


if __name__ == "__main__":
    main()
