"""The demo model's LoRA ("red"): its training pictures, the shipped file in kohya's layout, its effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cldm.adapters import lora
from cldm.io import checkpoints, files
from cldm.pipeline.request import GenerationRequest, LoraUnit

DEMO = Path(__file__).parent.parent / "assets" / "demo"


def test_training_pictures_are_the_shapes_painted_red():
    from cldm.training.lora_train import red_pictures
    from cldm.training.shapes import COLORS, make_batch

    pictures, captions = red_pictures([5, 6, 7])
    for pic, caption, s in zip(pictures, captions, make_batch([5, 6, 7], 64, hints=False)):
        assert caption == s.caption  # the captions keep the colours they name
        assert (pic[s.labels > 0] == COLORS["red"]).all()
        assert np.array_equal(pic[s.labels == 0], s.image[s.labels == 0])  # the background is untouched


def test_shipped_lora_is_a_kohya_file_for_the_demo_model():
    sd = checkpoints.load_sd(DEMO / "shapes_sd.safetensors")
    state = files.read_file(DEMO / "loras" / "red.safetensors")
    assert all(k.startswith("lora_unet_") for k in state)
    red = lora.parse(state, sd, "red")
    n_attn = sum(1 for name, _ in sd.unet.named_modules() if name.endswith(("attn1", "attn2")))
    assert len(red.layers) == 4 * n_attn  # to_q, to_k, to_v, to_out.0 of every attention
    kw = dict(steps=4, cfg_scale=5.0, width=64, height=64, seed=3)
    plain = generate_one(sd, "a blue circle on a white background", (), kw)
    with_red = generate_one(sd, "a blue circle on a white background", (LoraUnit(red, 1.0),), kw)
    assert not np.array_equal(plain, with_red)
    assert np.array_equal(generate_one(sd, "a blue circle on a white background", (), kw), plain)  # restored


def generate_one(sd, prompt, loras, kw):
    from cldm.pipeline.stages import generate

    return generate(sd, GenerationRequest(prompt, loras=loras, **kw)).images[0]


@pytest.mark.slow
def test_demo_lora_figures():
    """The README's figures for the shipped LoRA (24 unseen one-shape captions, with and without it)."""
    from cldm.training.lora_train import evaluate

    r = evaluate(DEMO, n=24)
    assert (round(r.red_with, 2), round(r.red_without, 2)) == (RED_WITH, RED_WITHOUT)


RED_WITH, RED_WITHOUT = 0.29, 0.0  # measured: python -m cldm train lora --export assets/demo --steps 800 --batch 16
