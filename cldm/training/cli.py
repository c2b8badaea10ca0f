"""The training commands of `python -m cldm`: train (the demo model family) and demo-eval.

`cldm.__main__` imports this module only when one of these commands runs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from cldm.errors import InputError
from cldm.training import demo_eval
from cldm.training.shapes import HINTS


def add_train_args(p: argparse.ArgumentParser) -> None:
    from cldm.training.recipe import DEMO_SCHEDULE
    from cldm.training.train import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_WARMUP

    p.add_argument(
        "stage",
        choices=["vae", "base", "controlnet", "all", "export", "card", "ip-adapter", "lora"],
        help="card: write only the model card into --export; ip-adapter: train the demo model's image prompt on the "
        "exported model in --export (writes ip-adapter_sd15.safetensors and image_encoder/ there, then measures it)",
    )
    p.add_argument("--run", default="runs/shapes", help="run folder: one subfolder per stage, resumed when present")
    p.add_argument("--preset", choices=["demo", "tiny"], default="demo", help="model family (tiny: 32 px, for tests)")
    p.add_argument("--hint", action="append", choices=HINTS, help="ControlNet(s) to train/export (default: all)")
    p.add_argument("--steps", type=int, help="steps of this stage (vae/base/controlnet)")
    for stage, steps in DEMO_SCHEDULE.items():
        what = f"the {stage.split('_')[1]} ControlNet" if "_" in stage else f"the {stage} stage"
        what += " (each ControlNet without its own option)" if stage == "controlnet" else ""
        p.add_argument(
            f"--{stage.replace('_', '-')}-steps", type=int, default=steps, help=f"steps of {what} with 'all'"
        )
    per_stage = lambda table: ", ".join(f"{v:g} {k}" for k, v in table.items())  # noqa: E731
    p.add_argument("--batch", type=int, help=f"pictures per step (default per stage: {per_stage(DEFAULT_BATCH)})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default per stage: {per_stage(DEFAULT_LR)})")
    p.add_argument("--warmup", type=int, help=f"warm-up steps (default per stage: {per_stage(DEFAULT_WARMUP)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=16384, help="distinct training pictures for base and ControlNets")
    p.add_argument("--vae-crop", type=int, default=32, help="VAE trained on random crops of this size (0: whole)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sample grids")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the sample grids")
    p.add_argument("--fresh", action="store_true", help="start the stage over instead of resuming")
    p.add_argument("--cooldown", type=int, default=0, help="controlnet: its last N steps at a tenth of the learning "
                   "rate ('all' on the demo preset follows DEMO_PHASES instead)")  # fmt: skip
    p.add_argument("--empty-captions", type=float, help="controlnet: the share of captions dropped (default 0.3; 'all' "
                   "on the demo preset follows DEMO_PHASES)")  # fmt: skip
    p.add_argument("--init", help="controlnet: start from this ControlNet file (another hint's) instead of a copy of "
                   "the base's encoder ('all' on the demo preset follows DEMO_STARTS)")  # fmt: skip
    p.add_argument("--export", help="folder for the shipped fp16 files (with 'all' or 'export')")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    from cldm.training import export, recipe, train

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
    if a.stage == "lora":
        from cldm.training import lora_train

        if not a.export:
            raise InputError("give --export FOLDER (the exported demo model; the LoRA is written into its loras/)")
        print(lora_train.train_lora(a.export, steps=a.steps or 300, batch=a.batch or 16, lr=a.lr or 2e-3,
                                    seed=a.seed))  # fmt: skip
        r = lora_train.evaluate(a.export, n=24)
        print(f"LoRA red: shape red in {r.red_with:.0%} of pictures (without {r.red_without:.0%}), the prompt's "
              f"colour in {r.asked_with:.0%} (without {r.asked_without:.0%}) on {r.n} pictures")  # fmt: skip
        return
    if a.stage == "ip-adapter":
        from cldm.training import ip_train

        if not a.export:
            raise InputError("give --export FOLDER (the exported demo model; the adapter is written beside it)")
        for path in ip_train.train_ip_adapter(a.export, a.export, steps=a.steps or 800, batch=a.batch or 32,
                                              lr=a.lr or 1e-3, seed=a.seed, pool=a.pool):  # fmt: skip
            print(path)
        report = ip_train.evaluate(a.export, n=24)
        print(
            f"image prompt: background colour {report.background_with:.0%} (without {report.background_without:.0%}),"
            f" shape colour {report.shape_with:.0%} (without {report.shape_without:.0%}) on {report.n} pictures"
        )
        return
    if a.stage in ("vae", "base", "controlnet") and not a.steps:
        raise InputError(f"give --steps for the {a.stage} stage")
    if a.stage == "vae":
        print(train.train_vae(o))
    elif a.stage == "base":
        print(train.train_base(o))
    elif a.stage == "controlnet":
        empty = recipe.PLAIN.empty_captions if a.empty_captions is None else a.empty_captions
        if not 0 <= empty <= 1 or not 0 <= a.cooldown <= a.steps:
            raise InputError("--empty-captions is a share from 0 to 1 and --cooldown a number of steps up to --steps")
        o = replace(o, phases=recipe.cooldown_phases(a.steps, a.cooldown, empty), init=Path(a.init) if a.init else None)
        for hint in hints:
            print(train.train_controlnet(o, hint))
    elif a.stage == "all":
        schedule = {stage: getattr(a, f"{stage}_steps") for stage in recipe.DEMO_SCHEDULE}
        demo = a.preset == "demo"
        train.train_all(o, schedule, hints, recipe.DEMO_PHASES if demo else None, recipe.DEMO_STARTS if demo else None)
    if a.stage == "card":
        if not a.export:
            raise InputError("give --export FOLDER")
        print(export.demo_card(hints).write(a.export))
    if a.stage == "export" or (a.stage == "all" and a.export):
        if not a.export:
            raise InputError("give --export FOLDER")
        for path in export.export(a.run, a.export, hints):
            size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            print(f"{path} ({size / 1e6:.1f} MB)")


def cmd_demo_eval(a: argparse.Namespace) -> None:

    model, cns = demo_eval.load_demo(a.demo, a.dtype)
    settings = {k: v for k, v in (("steps", a.steps), ("cfg", a.cfg)) if v is not None}  # else demo_eval's own
    report = demo_eval.evaluate(model, cns, n=a.n, grid=a.grid, **settings)
    demo_eval.write(report, a.out)
    for hint, f in report.two_objects.items():
        print(f"two objects, {hint:9s} edge F1 {f['f1_on']:.3f} (without ControlNet {f['f1_off']:.3f}), "
              f"colour binding {f['binding']:.0%}")  # fmt: skip
    for hint, f in report.control.items():
        print(f"one object,  {hint:9s} edge F1 {f['f1_on']:.3f} (without ControlNet {f['f1_off']:.3f})")
    print(f"one object, canny: prompt colour {report.colour_rate:.0%}, hinted shape {report.shape_rate:.0%}, both "
          f"{report.both_rate:.0%}; sketched triangle {report.sketch_rate:.0%}")  # fmt: skip
    if report.inpaint_rate or "inpaint" in cns:
        print(f"inpaint: hidden shape redrawn in its colour {report.inpaint_rate:.0%}")
    if report.shuffle_rate:
        print(f"shuffle: background colour taken {report.shuffle_rate['with']:.0%} "
              f"(without {report.shuffle_rate['without']:.0%})")  # fmt: skip


def add_demo_eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--demo", default="assets/demo", help="folder with the exported demo model")
    e.add_argument("--n", type=int, default=24, help="unseen pictures per measurement")
    e.add_argument("--steps", type=int, help=f"sampling steps (default: the model card's, {demo_eval.STEPS})")
    e.add_argument("--cfg", type=float, help=f"guidance scale (default: the model card's, {demo_eval.CFG:g})")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the published figures are fp32's")
    e.add_argument("--out", default="assets/demo/report/report.json")
    e.add_argument("--grid", default="assets/demo/report/samples.png")
