"""The bench's second comparison: the same sampling step (ControlNet + UNet, guidance batch 2) compiled by OpenVINO,
the CPU engine users of the anchors pick for speed (an optional dependency: `pip install openvino`; skipped when it
is absent or on CUDA).

OpenVINO converts our own fp32 modules (the weights the step runs on, traced with the step's inputs) and runs them
with its precision hint: "bf16" is how its users run on a CPU with AMX or AVX512-BF16, "f32" for the fp32 row.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion

log = logging.getLogger(__name__)
PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class _Step(torch.nn.Module):
    """One step's networks as one module, the hint embedded once (as our pipeline does), for tracing."""

    def __init__(self, sd: StableDiffusion, cn: ControlNet, hint_embedding: torch.Tensor):
        super().__init__()
        self.unet, self.cn = sd.unet, cn
        self.register_buffer("emb", hint_embedding)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, ctx, control=self.cn(x, t, ctx, self.emb))


def openvino_step(sd: StableDiffusion, cn: ControlNet, size: int, dtype: torch.dtype) -> Callable[[], object] | None:
    """A closure running the step compiled by OpenVINO with `dtype`'s precision hint; `sd` and `cn` are fp32 modules
    on the CPU without the bf16 convolution packing (OpenVINO traces plain torch layers). None when OpenVINO is not
    installed or the dtype has no hint."""
    if not available() or dtype not in PRECISION_HINTS:
        return None
    import openvino as ov

    from cldm.bench.measure import step_inputs

    x, t, ctx, hint = step_inputs(sd, size, torch.device("cpu"), torch.float32)
    with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on the timestep's shape test
        warnings.simplefilter("ignore", (FutureWarning, torch.jit.TracerWarning))
        module = _Step(sd, cn, cn.embed_hint(hint).expand(2, -1, -1, -1).contiguous()).eval()
        model = ov.convert_model(module, example_input=(x, t, ctx))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype]})
    request = compiled.create_infer_request()
    inputs = [x.numpy(), t.numpy(), ctx.numpy()]

    def step():
        return request.infer(inputs)

    return step
