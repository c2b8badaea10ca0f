"""Effective region per control unit (cldm/pipeline/regions.py): each unit's residuals times its mask, resized
bilinearly to every level (the A1111 extension's rule), on the tiny SD1.5 model and ControlNet of tests/tiny.py.

The residuals are inspected exactly (0 where a level's cell is all black in the mask, unchanged where it is all
white); the pictures of two masked units are compared with each unit alone, half by half.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cldm.errors import InputError
from cldm.pipeline import stages
from cldm.pipeline.conditioning import encode_prompts
from cldm.pipeline.regions import apply_region_mask, mask_tensor, with_region_masks
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.vocabulary import ControlMode

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run far slower on two busy threads

SIZE = 64  # the tiny VAE halves: a 32x32 latent, residuals at 32, 16 and 8
MASK = 128  # masks are stretched to each level, so one of another size than the picture is fine


def _hint(seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[12:52, 8 + 2 * seed : 40 + 2 * seed] = 255
    return np.clip(img.astype(int) + rng.randint(0, 80, img.shape), 0, 255).astype(np.uint8)


def _half(left: bool, size: int = MASK) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[:, : size // 2] = 255
    return m if left else 255 - m


def _residuals(sd, unit: ControlUnit, mode_cfg: float = 5.0) -> list[torch.Tensor]:
    r = GenerationRequest("a red circle", units=(unit,), steps=4, cfg_scale=mode_cfg, width=SIZE, height=SIZE)
    r = with_region_masks(r, sd.device)
    ctx = encode_prompts(sd, r)
    hints = stages.embed_hints(sd, r)
    x = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    x_full = torch.cat([x, x]) if r.use_cfg else x
    with torch.no_grad():
        return stages.control_residuals(r, hints, x, x_full, torch.tensor([500]), ctx, 0, 4)


@pytest.mark.parametrize("mode", [ControlMode.BALANCED, ControlMode.CONTROL])
def test_residuals_are_zero_outside_the_mask_and_unchanged_inside_at_every_level(ours, mode):
    sd, cn = ours
    mask = np.zeros((MASK, MASK), np.uint8)
    mask[16:80, 32:96] = 255  # a square, not aligned with the halves
    plain = _residuals(sd, ControlUnit(cn, _hint(0), mode=mode))
    masked = _residuals(sd, ControlUnit(cn, _hint(0), mode=mode, mask=mask))
    assert len(masked) == len(plain) == 10  # 9 input blocks + the middle block of the tiny ControlNet
    seen = set()
    for a, b in zip(plain, masked):
        h, w = a.shape[-2:]
        cell = MASK // h  # the mask pixels under one cell of this level
        cells = mask.reshape(h, cell, w, cell).transpose(0, 2, 1, 3).reshape(h, w, -1)
        black, white = torch.from_numpy(cells.max(-1) == 0), torch.from_numpy(cells.min(-1) == 255)
        assert black.any() and white.any()
        assert (b[..., black] == 0).all()  # exactly zero outside, every channel, both halves of the guidance batch
        assert (a[..., black] != 0).any()  # ... where the unit alone does act
        assert torch.equal(b[..., white], a[..., white])  # unchanged inside
        seen.add(h)
    assert seen == {32, 16, 8}
    if mode is ControlMode.CONTROL:  # the unconditional half stays zero
        assert all((b[0] == 0).all() for b in masked)


def test_a_white_mask_changes_nothing_and_a_black_one_turns_the_unit_off(ours):
    sd, cn = ours
    req = GenerationRequest("a red circle", steps=3, cfg_scale=5.0, seed=2, width=SIZE, height=SIZE)

    def with_unit(mask):
        return stages.generate(sd, replace(req, units=(ControlUnit(cn, _hint(0), mask=mask),))).images[0]

    plain = with_unit(None)
    assert np.array_equal(with_unit(np.full((8, 8), 255, np.uint8)), plain)
    assert np.array_equal(with_unit(np.zeros((8, 8), np.uint8)), stages.generate(sd, req).images[0])
    assert not np.array_equal(plain, stages.generate(sd, req).images[0])  # the unit does change the picture


def test_the_extension_s_resize_rule():
    """Bilinear, align_corners False, the first channel of a picture / 255: a 4-px ramp read at 2 px."""
    ramp = np.zeros((1, 4, 3), np.uint8)
    ramp[0, :, 0] = [0, 255, 255, 255]
    ramp[0, :, 1] = 255  # the other channels are not read
    m = mask_tensor(ramp)
    assert m.shape == (1, 1, 1, 4) and m[0, 0, 0, 1] == 1.0
    res = apply_region_mask([torch.ones(1, 2, 1, 2)], m)[0]
    # the two cells sample at x = 0.5 and 2.5: (0 + 1) / 2 and 1
    assert torch.allclose(res[0, :, 0], torch.tensor([[0.5, 1.0]] * 2))


def test_two_masked_units_each_steer_their_own_half(ours, other_controlnet):
    """Unit A (one ControlNet, one hint) on the left, unit B (another ControlNet, another hint) on the right: each
    half of the picture is nearer to what its own unit makes alone than to what the other unit makes alone, and
    nearer than the two units without masks come."""
    sd, cn = ours
    req = dict(prompt="a red circle", steps=4, cfg_scale=5.0, seed=4, width=SIZE, height=SIZE)

    def picture(*units):
        return stages.generate(sd, GenerationRequest(**req, units=units)).images[0].astype(float)

    a, b = ControlUnit(cn, _hint(0), scale=2.0), ControlUnit(other_controlnet, _hint(5), scale=2.0)
    only_a, only_b = picture(a), picture(b)
    masked = picture(replace(a, mask=_half(True)), replace(b, mask=_half(False)))
    both = picture(a, b)
    left, right = np.s_[:, : SIZE // 2], np.s_[:, SIZE // 2 :]
    d = lambda x, y, half: float(np.abs(x[half] - y[half]).mean())  # noqa: E731
    assert d(only_a, only_b, left) > 5 and d(only_a, only_b, right) > 5  # the two units do differ on both halves
    assert d(masked, only_a, left) < 0.5 * d(masked, only_b, left)
    assert d(masked, only_b, right) < 0.5 * d(masked, only_a, right)
    assert d(masked, only_a, left) < d(both, only_a, left) and d(masked, only_b, right) < d(both, only_b, right)


@pytest.mark.parametrize(
    "mask, why",
    [
        (np.zeros((4, 4, 2), np.uint8), "HxW or HxWx3"),
        (np.full((4, 4), 1.5, np.float32), "0..1"),
        (np.zeros((4, 4), np.int64), "uint8"),
        (np.zeros((0, 4), np.uint8), "HxW or HxWx3"),
        ("mask.png", "must be a picture"),
        (torch.zeros(1, 3, 4, 4), r"\(1, 1, H, W\)"),
    ],
)
def test_bad_masks_are_refused_by_field_before_anything_runs(mask, why):
    r = GenerationRequest("a", units=(ControlUnit("cn.safetensors", _hint(0), mask=mask),), width=SIZE, height=SIZE)
    with pytest.raises(InputError, match=rf"ControlNet 1 \(cn\): mask.*{why}"):
        r.validate()


def test_controlnet_mask_on_the_command_line_goes_with_its_unit(tmp_path):
    import argparse

    from PIL import Image

    from cldm import cli

    hint, mask = tmp_path / "hint.png", tmp_path / "left.png"
    Image.fromarray(_hint(0)).save(hint)
    Image.fromarray(_half(True)).convert("RGB").save(mask)
    parser = argparse.ArgumentParser()
    cli.add_generate_args(parser)
    words = ["--base", "b", "--prompt", "a", "--width", "64", "--height", "64"]
    for m in (str(mask), "none"):
        words += ["--controlnet", "cn.safetensors", "--hint", str(hint), "--controlnet-mask", m]
    units = cli.request_from_args(parser.parse_args(words)).validate().units
    assert np.array_equal(units[0].mask, _half(True)) and units[1].mask is None
    with pytest.raises(InputError, match="--controlnet-mask once, or once per --controlnet"):
        cli.request_from_args(parser.parse_args([*words, "--controlnet-mask", str(mask)]))
