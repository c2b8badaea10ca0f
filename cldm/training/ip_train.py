"""An image prompt for the demo model: a small IP-Adapter trained here on the shapes data, the base frozen.

The image encoder is a small `CLIPVisionModelWithProjection` (64 px, 8 px patches, 2 layers) trained here together
with the adapter (the published adapters freeze a CLIP encoder pretrained on web pictures; there is none for the
shapes world, and a frozen random one passes on little more than the average colour). The adapter is a plain
one (Linear + LayerNorm to 4 tokens, `to_k_ip/to_v_ip` per cross-attention layer, initialised from the layer's text
`to_k/to_v` as the paper does), trained on eps-prediction with the picture as its own image prompt, the caption
dropped half of the time (so that the picture alone must carry the colours) and the image prompt dropped 5% of the
time (the zero embedding the unconditional side uses). The files are written in the published layouts
(`ip-adapter_sd15.safetensors`, `image_encoder/`), so the app and the CLI use them like any SD1.5 adapter.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cldm.adapters import ip_adapter
from cldm.adapters.ip_adapter import IPAdapter, IPAdapterConfig
from cldm.io import checkpoints, writers
from cldm.models.image_encoder import ImageEncoder
from cldm.pipeline.prompts import token_chunks
from cldm.pipeline.request import GenerationRequest, ImagePrompt
from cldm.pipeline.stages import generate
from cldm.training.demo_eval import CFG, DEMO_BASE, SAMPLER, STEPS, UNSEEN_SEED, nearest_colour
from cldm.training.latent_pool import LatentPool
from cldm.training.shapes import make_batch, make_sample
from cldm.training.train import _noisy, eps_loss
from cldm.training.trainer import make_optimizer, step_generator
from cldm.training.vocab import shapes_tokenizer

log = logging.getLogger(__name__)
IP_FILE, ENCODER_DIR = "ip-adapter_sd15.safetensors", "image_encoder"
ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
               patch_size=8, projection_dim=64)  # fmt: skip
DROP_TEXT, DROP_IMAGE = 0.5, 0.05


def make_encoder(seed: int = 0) -> ImageEncoder:
    from transformers import CLIPVisionConfig

    torch.manual_seed(seed)
    return ImageEncoder(CLIPVisionConfig(**ENCODER)).eval().requires_grad_(False)


def make_adapter(unet) -> IPAdapter:
    layers = unet.cross_attentions()
    cfg = IPAdapterConfig("plain", ENCODER["projection_dim"], layers[0].to_k.in_features, 4,
                          tuple(a.to_q.out_features for a in layers))  # fmt: skip
    adapter = IPAdapter(cfg)
    with torch.no_grad():
        for ip, attn in zip(adapter.layers, layers):
            ip.to_k_ip.weight.copy_(attn.to_k.weight)
            ip.to_v_ip.weight.copy_(attn.to_v.weight)
    return adapter


def train_ip_adapter(demo: str | Path, out: str | Path, steps: int = 1200, batch: int = 32, lr: float = 1e-3,
                     seed: int = 0, pool: int = 4096) -> list[Path]:  # fmt: skip
    """Train on the exported demo model in `demo`; write the adapter and its encoder into `out`."""
    demo, out = Path(demo), Path(out)
    sd = checkpoints.load_sd(demo / DEMO_BASE, tokenizer=shapes_tokenizer()).freeze()
    encoder, adapter = make_encoder(seed), make_adapter(sd.unet)
    adapter.train().requires_grad_(True)
    encoder.train().requires_grad_(True)
    params = [*adapter.parameters(), *encoder.parameters()]
    opt = make_optimizer(params, lr)
    latents = LatentPool(sd.vae, 64, pool)
    pixels: dict[int, torch.Tensor] = {}  # the encoder's input for each picture of the pool
    scales = [1.0] * len(adapter.layers)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        g = step_generator(seed, step)
        idx = torch.randint(0, pool, (batch,), generator=g).tolist()
        missing = [i for i in dict.fromkeys(idx) if i not in pixels]
        if missing:
            for i, px in zip(missing, encoder.pixels([s.image for s in make_batch(missing, 64, hints=False)])):
                pixels[i] = px
        mean, std, captions, _ = latents.get(idx)
        x_t, t, eps = _noisy(mean, std, g)
        drop_text = torch.rand(batch, generator=g) < DROP_TEXT
        keep_image = (torch.rand(batch, generator=g) >= DROP_IMAGE).float()[:, None]
        captions = ["" if d else c for c, d in zip(captions, drop_text.tolist())]
        with torch.no_grad():
            text = sd.text(token_chunks(sd.text, captions)[:, 0])
        image = encoder.embeds(torch.stack([pixels[i] for i in idx])) * keep_image
        cur = lr * min(1.0, step / 50)  # 50 warm-up steps, then constant
        for group in opt.param_groups:
            group["lr"] = cur
        with ip_adapter.attached(sd.unet, adapter, adapter.tokens(image), scales):
            loss = eps_loss(sd.unet(x_t, t, text), eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps:
            log.warning("ip-adapter step %d/%d loss %.4f (%.2f s/step)", step, steps, loss.item(),
                        (time.perf_counter() - t0) / step)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    adapter_path = out / IP_FILE
    writers.save_file({k: v.detach().half() for k, v in adapter.state_dict().items()}, adapter_path)
    encoder.eval().clip.save_pretrained(str(out / ENCODER_DIR))
    return [adapter_path, out / ENCODER_DIR]


# ------------------------------------------------------------------------------------------------ measure
@dataclass
class IPReport:
    n: int
    background_with: float
    background_without: float
    shape_with: float
    shape_without: float


def _unseen(n: int) -> list:
    """One shape on one background colour, from seeds no training ever drew."""
    out, seed = [], UNSEEN_SEED + 50_000
    while len(out) < n:
        s = make_sample(seed, 64)
        seed += 1
        if len(s.shapes) == 1 and len(s.background) == 1 and s.shapes[0].color not in s.background:
            out.append(s)
    return out


def _colours(pic: np.ndarray) -> tuple[str, set[str]]:
    """(the border's colour, the colours that cover at least 5% of the picture)."""
    border = np.concatenate([pic[:3].reshape(-1, 3), pic[-3:].reshape(-1, 3), pic[:, :3].reshape(-1, 3),
                             pic[:, -3:].reshape(-1, 3)])  # fmt: skip
    names = [nearest_colour(p) for p in pic.reshape(-1, 3)[::4].astype(float)]
    counts = {c: names.count(c) / len(names) for c in set(names)}
    return nearest_colour(np.median(border, axis=0)), {c for c, f in counts.items() if f >= 0.05}


def evaluate(demo: str | Path, n: int = 24, scale: float = 1.0) -> IPReport:
    """Empty text prompt, the picture as image prompt: does the result take the picture's background colour and
    its shape's colour? The same seeds without the image prompt give the chance level."""
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.io.image_encoder import load_image_encoder

    demo = Path(demo)
    sd = checkpoints.load_sd(demo / DEMO_BASE).freeze()
    adapter, encoder = load_ip_adapter(demo / IP_FILE), load_image_encoder(demo / ENCODER_DIR)
    kw = dict(steps=STEPS, cfg_scale=CFG, sampler=SAMPLER, width=64, height=64)
    bg = [0, 0]
    shape = [0, 0]
    for i, s in enumerate(_unseen(n)):
        prompt = ImagePrompt(adapter, (s.image,), encoder, scale)
        for k, ip in enumerate((prompt, None)):
            pic = generate(sd, GenerationRequest("", seed=i, image_prompt=ip, **kw)).images[0]
            border, present = _colours(pic)
            bg[k] += border == s.background[0]
            shape[k] += s.shapes[0].color in present
    return IPReport(n, bg[0] / n, bg[1] / n, shape[0] / n, shape[1] / n)
