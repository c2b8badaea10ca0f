"""Command line: `python -m cldm generate ...`, `python -m cldm convert ...` and `python -m cldm train ...`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import checkpoints
from .errors import CldmError, InputError
from .images import load_rgb, save_png
from .manager import ControlSpec, ModelManager
from .samplers import SAMPLERS


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="SD1.5 single file (.safetensors/.ckpt) or diffusers pipeline folder")
    p.add_argument("--controlnet", action="append", default=[], help="ControlNet file or folder (repeatable)")
    p.add_argument("--hint", action="append", default=[], help="hint image for each --controlnet, used as is")
    p.add_argument("--control-scale", action="append", type=float, default=[], help="strength per ControlNet (1.0)")
    p.add_argument("--control-start", action="append", type=float, default=[], help="start fraction per ControlNet (0)")
    p.add_argument("--control-end", action="append", type=float, default=[], help="end fraction per ControlNet (1)")
    p.add_argument("--guess-mode", action="store_true", help="ControlNet on the conditional half only, decaying scales")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer; 2 = penultimate (anime models)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--init-image", help="img2img / inpaint source picture")
    p.add_argument("--strength", type=float, default=1.0, help="denoising strength with --init-image")
    p.add_argument("--mask", help="inpaint mask: white = repaint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.add_argument("--out", default="out.png", help="output PNG (a batch writes out-0.png, out-1.png, ...)")


def _per_control(values: list[float], n: int, default: float, name: str) -> list[float]:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InputError(f"give {name} once, or once per --controlnet ({n}); got {len(values)}")
    return values


def cmd_generate(a: argparse.Namespace) -> None:
    n = len(a.controlnet)
    if len(a.hint) != n:
        raise InputError(f"give one --hint per --controlnet (got {n} ControlNets and {len(a.hint)} hints)")
    scales = _per_control(a.control_scale, n, 1.0, "--control-scale")
    starts = _per_control(a.control_start, n, 0.0, "--control-start")
    ends = _per_control(a.control_end, n, 1.0, "--control-end")
    specs = [
        ControlSpec(p, load_rgb(h), s, st, e) for p, h, s, st, e in zip(a.controlnet, a.hint, scales, starts, ends)
    ]
    manager = ModelManager(a.base, device=a.device, dtype=a.dtype)
    result = manager.run(
        a.prompt,
        specs,
        negative_prompt=a.negative_prompt,
        steps=a.steps,
        cfg_scale=a.cfg,
        sampler=a.sampler,
        eta=a.eta,
        seed=a.seed,
        width=a.width,
        height=a.height,
        batch=a.batch,
        guess_mode=a.guess_mode,
        clip_skip=a.clip_skip,
        init_image=load_rgb(a.init_image) if a.init_image else None,
        strength=a.strength,
        mask=load_rgb(a.mask)[..., 0] if a.mask else None,
        callback=lambda i, total: print(f"\rstep {i}/{total}", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    out = Path(a.out)
    paths = [out] if a.batch == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(a.batch)]
    for img, path in zip(result.images, paths):
        save_png(img, path, result.parameters)
        print(path)
    t = result.timings
    print(f"swap {t['swap']:.2f}s, sampling {t['sampling']:.2f}s, decode {t['decode']:.2f}s", file=sys.stderr)


def cmd_convert(a: argparse.Namespace) -> None:
    src = Path(a.src)
    kind = a.kind
    if kind == "auto":
        if src.is_dir():
            kind = "sd" if (src / "model_index.json").is_file() else "controlnet"
        else:
            kind = "sd" if checkpoints.describe(checkpoints.read_file(src)) == "an SD base model" else "controlnet"
    if kind == "sd":
        if a.to == "bare":
            raise InputError("--to bare is for ControlNets; a base model converts to original or diffusers")
        model = checkpoints.load_sd(src)
        checkpoints.save_sd(model, a.dst, fmt=a.to)
    else:
        cn = checkpoints.load_controlnet(src)
        checkpoints.save_controlnet(cn, a.dst, fmt=a.to)
    print(f"wrote {a.dst} ({kind}, {a.to} format)")


def _train_args(p: argparse.ArgumentParser) -> None:
    from .shapes import HINTS
    from .train import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_WARMUP, DEMO_SCHEDULE

    p.add_argument("stage", choices=["vae", "base", "controlnet", "all", "export"])
    p.add_argument("--run", default="runs/shapes", help="run folder: one subfolder per stage, resumed when present")
    p.add_argument("--preset", choices=["demo", "tiny"], default="demo", help="model family (tiny: 32 px, for tests)")
    p.add_argument("--hint", action="append", choices=HINTS, help="ControlNet(s) to train/export (default: all)")
    p.add_argument("--steps", type=int, help="steps of this stage (vae/base/controlnet)")
    for stage, steps in DEMO_SCHEDULE.items():
        what = f"the {stage.split('_')[1]} ControlNet" if "_" in stage else f"the {stage} stage (each ControlNet)"
        p.add_argument(
            f"--{stage.replace('_', '-')}-steps", type=int, default=steps, help=f"steps of {what} with 'all'"
        )
    per_stage = lambda table: ", ".join(f"{v:g} {k}" for k, v in table.items())  # noqa: E731
    p.add_argument("--batch", type=int, help=f"pictures per step (default per stage: {per_stage(DEFAULT_BATCH)})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default per stage: {per_stage(DEFAULT_LR)})")
    p.add_argument("--warmup", type=int, help=f"warm-up steps (default per stage: {per_stage(DEFAULT_WARMUP)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=8192, help="distinct training pictures for base and ControlNets")
    p.add_argument("--vae-crop", type=int, default=32, help="VAE trained on random crops of this size (0: whole)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sample grids")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the sample grids")
    p.add_argument("--fresh", action="store_true", help="start the stage over instead of resuming")
    p.add_argument("--export", help="folder for the shipped fp16 files (with 'all' or 'export')")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    from . import train
    from .shapes import HINTS

    if a.threads:
        torch.set_num_threads(a.threads)
    # Zero-initialised layers (zero convs, output convs) make tiny gradients; denormal floats slow CPU maths down
    # many times over and matter nothing to training.
    torch.set_flush_denormal(True)
    hints = tuple(a.hint or HINTS)
    o = train.TrainOptions(
        run=Path(a.run), preset=a.preset, steps=a.steps or 0, batch=a.batch, lr=a.lr, warmup=a.warmup, seed=a.seed,
        pool=a.pool, vae_crop=a.vae_crop or None, ckpt_every=a.ckpt_every, eval_every=a.eval_every,
        eval_samples=a.eval_samples, sample_steps=a.sample_steps, cfg_scale=a.cfg, fresh=a.fresh,
    )  # fmt: skip
    if a.stage in ("vae", "base", "controlnet") and not a.steps:
        raise InputError(f"give --steps for the {a.stage} stage")
    if a.stage == "vae":
        print(train.train_vae(o))
    elif a.stage == "base":
        print(train.train_base(o))
    elif a.stage == "controlnet":
        for hint in hints:
            print(train.train_controlnet(o, hint))
    elif a.stage == "all":
        schedule = {stage: getattr(a, f"{stage}_steps") for stage in train.DEMO_SCHEDULE}
        train.train_all(o, schedule, hints)
    if a.stage == "export" or (a.stage == "all" and a.export):
        if not a.export:
            raise InputError("give --export FOLDER")
        for path in train.export(a.run, a.export, hints):
            size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            print(f"{path} ({size / 1e6:.1f} MB)")


def cmd_demo_eval(a: argparse.Namespace) -> None:
    from . import demo_eval

    model, cns = demo_eval.load_demo(a.demo)
    settings = {k: v for k, v in (("steps", a.steps), ("cfg", a.cfg)) if v is not None}  # else demo_eval's own
    report = demo_eval.evaluate(model, cns, n=a.n, grid=a.grid, **settings)
    demo_eval.write(report, a.out)
    for hint, f in report.control.items():
        print(f"{hint:9s} edge F1 with ControlNet {f['f1_on']:.3f}, without {f['f1_off']:.3f}")
    print(f"prompt colour {report.colour_rate:.0%}, hinted shape {report.shape_rate:.0%}, both {report.both_rate:.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cldm", description="Stable Diffusion 1.5 + ControlNet")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make pictures from a prompt and hint images")
    _generate_args(g)
    c = sub.add_parser("convert", help="rewrite weights: .ckpt/.pth -> .safetensors, diffusers <-> original")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=["original", "diffusers", "bare"], default="original")
    c.add_argument("--kind", choices=["auto", "sd", "controlnet"], default="auto")
    t = sub.add_parser("train", help="train the small shapes model family (VAE, base, ControlNets) from scratch")
    _train_args(t)
    e = sub.add_parser("demo-eval", help="measure how well the demo model follows hints and prompts")
    e.add_argument("--demo", default="assets/demo", help="folder with the exported demo model")
    e.add_argument("--n", type=int, default=24, help="unseen pictures per measurement")
    e.add_argument("--steps", type=int, help="sampling steps (default: what the app's demo mode uses, 20)")
    e.add_argument("--cfg", type=float, help="guidance scale (default: what the app's demo mode uses, 5)")
    e.add_argument("--out", default="assets/demo/report/report.json")
    e.add_argument("--grid", default="assets/demo/report/samples.png")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        commands = {"generate": cmd_generate, "convert": cmd_convert, "train": cmd_train, "demo-eval": cmd_demo_eval}
        commands[a.command](a)
    except CldmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
