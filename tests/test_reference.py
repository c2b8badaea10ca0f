"""Reference-only control on the shipped demo model: it pulls the picture toward the reference, more so with a
higher style fidelity, and without a reference nothing changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cldm.errors import InputError
from cldm.pipeline.request import ControlUnit, GenerationRequest, ReferenceUnit
from cldm.pipeline.stages import generate

ROOT = Path(__file__).resolve().parents[1]
KW = dict(steps=12, cfg_scale=5.0, width=64, height=64, sampler="ddim")
SEEDS = range(4)


@pytest.fixture(scope="module")
def demo():
    from cldm.io import checkpoints

    return checkpoints.load_sd(ROOT / "assets" / "demo" / "shapes_sd.safetensors").freeze()


@pytest.fixture(scope="module")
def reference():
    return np.asarray(Image.open(ROOT / "assets" / "examples" / "shapes.png").convert("RGB").resize((64, 64)))


def _distance(demo, reference, **ref) -> float:
    """Mean absolute pixel distance to the reference over a few seeds (empty prompt: only the reference steers)."""
    unit = ReferenceUnit(reference, **ref) if ref else None
    pics = [generate(demo, GenerationRequest("", seed=s, reference=unit, **KW)).images[0] for s in SEEDS]
    return float(np.mean([np.abs(p.astype(float) - reference).mean() for p in pics]))


@pytest.mark.integration  # ~9 s of demo-model pictures, kept out of the fast tier's 5 minutes
def test_reference_only_pulls_toward_the_reference_more_with_fidelity(demo, reference):
    """Measured on the demo model (4 seeds, 12 DDIM steps): distance 70 without, about 60 at fidelity 0 and
    about 42 at fidelity 1. The bounds hold a margin."""
    without = _distance(demo, reference)
    loose = _distance(demo, reference, mode="only", style_fidelity=0.0)
    faithful = _distance(demo, reference, mode="only", style_fidelity=1.0)
    assert loose < without - 3 and faithful < loose - 8, (without, loose, faithful)
    both = _distance(demo, reference, mode="adain+attn", style_fidelity=1.0)
    assert both < without - 8, (without, both)


def test_no_reference_changes_nothing_and_adain_changes_something(demo, reference):
    plain = generate(demo, GenerationRequest("a red star", seed=1, **KW))
    again = generate(demo, GenerationRequest("a red star", seed=1, **KW))
    assert np.array_equal(plain.images, again.images) and "Reference" not in plain.parameters
    adain = generate(demo, GenerationRequest("a red star", seed=1, reference=ReferenceUnit(reference, "adain"), **KW))
    assert not np.array_equal(plain.images, adain.images) and 'Reference: "Mode: adain' in adain.parameters
    late = ReferenceUnit(reference, "only", start=0.5)  # inactive for the first half of the steps
    assert not np.array_equal(generate(demo, GenerationRequest("a red star", seed=1, reference=late, **KW)).images,
                              generate(demo, GenerationRequest("a red star", seed=1, reference=ReferenceUnit(reference), **KW)).images)  # fmt: skip


def test_reference_with_a_controlnet_and_bad_values(demo, reference):
    from cldm.io import checkpoints

    cn = checkpoints.load_controlnet(ROOT / "assets" / "demo" / "control_v11p_sd15_canny.safetensors")
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[16:48, 16] = hint[16:48, 47] = hint[16, 16:48] = hint[47, 16:48] = 255
    out = generate(demo, GenerationRequest("", units=[ControlUnit(cn, hint)], reference=ReferenceUnit(reference), **KW))
    assert out.images.shape == (1, 64, 64, 3)
    with pytest.raises(InputError, match=r"reference.mode must be one of only, adain, adain\+attn"):
        GenerationRequest("", reference=ReferenceUnit(reference, "reference_only")).validate()
    with pytest.raises(InputError, match="style_fidelity must be 0..1"):
        GenerationRequest("", reference=ReferenceUnit(reference, style_fidelity=2)).validate()


def test_cli_reference(tmp_path):
    from cldm.__main__ import main

    out = tmp_path / "ref.png"
    args = ["generate", "--base", str(ROOT / "assets" / "demo" / "shapes_sd.safetensors"), "--prompt", "",
            "--steps", "4", "--reference", str(ROOT / "assets" / "examples" / "shapes.png"), "--reference-mode",
            "adain+attn", "--style-fidelity", "0.8", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert 'Reference: "Mode: adain+attn, Weight: 1.0, Style fidelity: 0.8' in Image.open(out).text["parameters"]
