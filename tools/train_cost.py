"""The ControlNet paper's training-cost claim, with our training code at SD1.5 size: "optimizing Stable Diffusion
with ControlNet requires only about 23% more GPU memory and 34% more time in each training iteration, compared to
optimizing Stable Diffusion without ControlNet" (Zhang et al. 2023, section 3.3; one A100).

    python tools/train_cost.py [--size PX] [--batch N] [--iters N] [--device cpu|cuda] [--dtype fp32|bf16]

Four training iterations, each in a fresh process (peak memory is per process):
- sd: the SD1.5 UNet trained alone (every UNet weight, AdamW, as `cldm.training.train.train_base` trains the base);
- controlnet: the UNet locked, a ControlNet (its encoder copy, zero convs, hint block) trained on top of it (as
  `train_controlnet` trains one);
- decoder / decoder+controlnet: the original code's `sd_locked=False`: the UNet's decoder (output blocks) trained,
  its encoder locked, without and with a ControlNet trained beside it. This pair is the paper's comparison (the
  same SD training, plus a ControlNet).
The text context and the latents are random (their cost is the same in both). Prints seconds per iteration (median
after a warm-up) and peak memory (resident on the CPU, allocated on CUDA), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one(kind: str, size: int, batch: int, iters: int, device: str, dtype: str) -> dict:
    import torch

    from cldm.bench.measure import rss_peak, sync
    from cldm.models.config import SDConfig
    from cldm.models.controlnet import ControlNet
    from cldm.models.unet import UNet
    from cldm.training.train import eps_loss
    from cldm.training.trainer import GRAD_CLIP, make_optimizer

    dev, dt = torch.device(device), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    cfg = SDConfig().unet
    unet = UNet(cfg).to(dev, dt)
    unet.requires_grad_(kind == "sd").train(kind != "controlnet")
    if kind.startswith("decoder"):  # sd_locked=False: the output blocks and the last layers learn
        for m in (unet.output_blocks, unet.out):
            m.requires_grad_(True)
    trained = [p for p in unet.parameters() if p.requires_grad]
    cn = None
    if kind.endswith("controlnet"):
        cn = ControlNet.from_unet(unet, cfg).to(dev, dt).requires_grad_(True).train()
        trained += list(cn.parameters())
    opt = make_optimizer(trained, 1e-5)
    g = torch.Generator().manual_seed(1)
    f = size // 8
    times = []
    for i in range(iters + 1):
        x = torch.randn(batch, 4, f, f, generator=g).to(dev, dt)
        eps = torch.randn(batch, 4, f, f, generator=g).to(dev)
        t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
        ctx = torch.randn(batch, 77, cfg.context_dim, generator=g).to(dev, dt)
        hint = torch.rand(batch, 3, size, size, generator=g).to(dev, dt)
        sync(dev)
        t0 = time.perf_counter()
        control = None if cn is None else cn(x, t, ctx, cn.embed_hint(hint))
        loss = eps_loss(unet(x, t, ctx, control=control), eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, GRAD_CLIP)
        opt.step()
        sync(dev)
        if i > 0:  # the first builds the optimizer state
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss_peak()
    return {"kind": kind, "seconds": statistics.median(times), "peak_bytes": peak,
            "trained_params": sum(p.numel() for p in trained)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="picture size in px (latent size / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.size, a.batch, a.iters, a.device, a.dtype)))
        return
    rows = {}
    for kind in ("sd", "controlnet", "decoder", "decoder+controlnet"):
        cmd = [sys.executable, __file__, "--one", kind, "--size", str(a.size), "--batch", str(a.batch), "--iters",
               str(a.iters), "--device", a.device, "--dtype", a.dtype]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[kind] = json.loads(out)
        r = rows[kind]
        print(f"{kind:10s} {r['seconds']:.2f} s per iteration, peak {r['peak_bytes'] / 1024**3:.2f} GiB, "
              f"{r['trained_params'] / 1e6:.0f} M trained weights", flush=True)  # fmt: skip
    for base, with_cn in (("sd", "controlnet"), ("decoder", "decoder+controlnet")):
        a, b = rows[base], rows[with_cn]
        print(f"{with_cn} / {base}: time {b['seconds'] / a['seconds']:.2f}x, memory "
              f"{b['peak_bytes'] / a['peak_bytes']:.2f}x (the paper: 1.34x and 1.23x)")  # fmt: skip


if __name__ == "__main__":
    main()
