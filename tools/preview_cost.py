"""What the live preview costs: sampling time with a preview after every step (and every 5) against none.

    python tools/preview_cost.py [--base FILE] [--size PX] [--steps N] [--repeats N]

Prints the median sampling time of each setting and the preview's share. The preview is A1111's "Approx cheap"
(the predicted clean latent through a fixed 4->3 map), so it should stay far under 5% even on the small demo model,
where a step is cheapest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cldm.pipeline.request import GenerationRequest  # noqa: E402
from cldm.runtime.manager import ModelManager  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="assets/demo/shapes_sd.safetensors")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    manager = ModelManager(a.base, device=a.device)
    request = GenerationRequest("a red circle on a white background", steps=a.steps, cfg_scale=5.0, width=a.size,
                                height=a.size, sampler="ddim")  # fmt: skip
    manager.run(request)  # warm-up
    times: dict[int, list[float]] = {0: [], 5: [], 1: []}
    shown: list[np.ndarray] = []
    for _ in range(a.repeats):
        for every in times:  # interleaved, so that drift in the machine's speed hits every setting alike
            t = time.perf_counter()
            manager.run(request, preview=shown.append, preview_every=every)
            times[every].append(time.perf_counter() - t)
    # the preview's own work, timed alone (robust to a busy machine): one call per preview
    import torch

    from cldm.sampling.preview import approx_rgb, predicted_x0

    f = manager.sd.latent_factor
    x = torch.randn(1, manager.sd.config.unet.in_channels, a.size // f, a.size // f)
    t = time.perf_counter()
    for _ in range(200):
        approx_rgb(predicted_x0(x, x, torch.tensor(500)))
    per_preview = (time.perf_counter() - t) / 200
    base = statistics.median(times[0])
    print(
        f"one preview: {per_preview * 1e3:.2f} ms; one sampling step: {base / a.steps * 1e3:.1f} ms "
        f"(a preview every step adds {per_preview / (base / a.steps) * 100:.2f}%)"
    )
    print(f"{a.base} {a.size}x{a.size}, {a.steps} steps, {manager.device}, median of {a.repeats}:")
    for every, ts in times.items():
        label = "no preview" if every == 0 else f"preview every {every} step{'s' if every > 1 else ''}"
        print(f"  {label:<24} {statistics.median(ts):7.3f} s  ({(statistics.median(ts) / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
