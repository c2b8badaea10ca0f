"""The shipped demo model: fp16 weight files, their tokenizer, the training curves and the model card.

The card (`cldm.io.model_card`) is how the app and the CLI learn the demo model's size, settings, conditions, examples
and vocabulary at run time; it is made here from the training code's own constants, so it cannot drift from them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from cldm.io import checkpoints, writers
from cldm.io.model_card import ModelCard
from cldm.training.demo_eval import CFG, DEMO_BASE, SAMPLER, STEPS, controlnet_file
from cldm.training.shapes import CAPTION_WORDS, HINTS
from cldm.training.train import CONTROLNET_FILE, SD_FILE, family
from cldm.training.vocab import shapes_tokenizer

log = logging.getLogger(__name__)

# Exported names: the ControlNets take the ControlNet 1.1 file names (demo_eval.controlnet_file), so the app's
# models-folder lookup finds them.
EXPORT_BASE, EXPORT_TOKENIZER = DEMO_BASE, "tokenizer"
DEMO_CAPTION = "a blue circle and a yellow star on a pink background"  # what assets/examples/shapes.png shows
# What the app's demo tabs offer as examples (pictures drawn by assets/make_examples.py).
DEMO_EXAMPLES = {
    "canny": {"image": "shapes.png", "preprocessor": "canny", "prompt": DEMO_CAPTION},
    "scribble": {
        "image": "triangle_sketch.png",
        "preprocessor": "scribble_sketch",
        "prompt": "a green triangle on a white background",
    },  # fmt: skip
    "seg": {"image": "shapes_seg.png", "preprocessor": "none", "prompt": DEMO_CAPTION},  # the shapes palette
    "tile": {
        "image": "shapes_blurry.png",
        "preprocessor": "none",
        "prompt": "a purple ring and an orange square on a white background",
    },
    # the circle painted over (the mask is the example's painted layer), and asked for in another colour
    "inpaint": {
        "image": "shapes.png",
        "mask": "shapes_circle_mask.png",
        "preprocessor": "none",
        "prompt": "a white circle and a yellow star on a pink background",
    },
    "shuffle": {"image": "shapes.png", "preprocessor": "shuffle", "prompt": ""},  # the picture's colours, no words
}  # fmt: skip


def demo_card(hints=HINTS) -> ModelCard:
    """The demo model's card: its training size, the settings its report measures (demo_eval), its ControlNets."""
    size = family("demo").size
    return ModelCard(
        name="demo", base=EXPORT_BASE, size=size, steps=STEPS, cfg=CFG, sampler=SAMPLER, conditions=tuple(hints),
        examples={h: DEMO_EXAMPLES[h] for h in hints if h in DEMO_EXAMPLES}, words=CAPTION_WORDS,
        description=f"a small model trained by this project on pictures of one to three coloured shapes, {size} px "
        "(demo model v2).",
    )  # fmt: skip


def export(run: str | os.PathLike, dest: str | os.PathLike, hints=HINTS, dtype=torch.float16) -> list[Path]:
    """Write the shipped files: base single file, its tokenizer folder, one ControlNet per hint (fp16 by default),
    the model card, and each stage's training curves as report/curves_<stage>.png."""
    run, dest = Path(run), Path(dest)
    tok = shapes_tokenizer()
    model = checkpoints.load_sd(run / "base" / SD_FILE, tokenizer=tok).to(dtype=dtype)
    out = [dest / EXPORT_BASE]
    writers.save_sd(model, out[0])
    tok.save_pretrained(str(dest / EXPORT_TOKENIZER))
    exported = []
    for hint in hints:
        src = run / f"controlnet_{hint}" / CONTROLNET_FILE
        if not src.is_file():
            log.warning("no %s ControlNet in %s: not exported", hint, run)
            continue
        out.append(dest / controlnet_file(hint))
        writers.save_controlnet(checkpoints.load_controlnet(src).to(dtype), out[-1])
        exported.append(hint)
    out.append(demo_card(tuple(exported)).write(dest))
    # the README's training curves come with the weights they describe
    for stage in ("vae", "base", *(f"controlnet_{h}" for h in hints)):
        if (run / stage / "curves.png").is_file():
            (dest / "report").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / stage / "curves.png", dest / "report" / f"curves_{stage}.png")
    return out
