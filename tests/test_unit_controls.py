"""Resize modes, pixel perfect, picture size, inpaint modes and mask blur, one seed per picture, the hires fix, the live
preview and the unit parameters text: each against numbers worked out here, independently of the library."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cldm.errors import InputError
from cldm.io.images import image_to_tensor, mask_to_tensor, resize_rgb, soft_mask
from cldm.pipeline.fit import fit_mask, fit_rgb, fit_tensor, geometry, picture_size, pixel_perfect_resolution
from cldm.pipeline.infotext import parse_parameters
from cldm.pipeline.request import ControlUnit, GenerationRequest, HiresFix
from cldm.pipeline.stages import decode, fit_pictures, generate, latent_mask
from cldm.pipeline.vocabulary import ResizeMode
from cldm.sampling.preview import approx_rgb

SIZE = 64
MODES = ("just", "crop", "fill")
# three bands whose per-channel border median is none of them: (50, 150, 200) (worked out in `_landscape`)
LEFT, CENTRE, RIGHT = (10, 100, 200), (50, 150, 250), (90, 200, 30)
MEDIAN = (50, 150, 200)


def _landscape() -> tuple[np.ndarray, np.ndarray]:
    """128x64 (2:1): left band columns 0:32, centre 32:96, right 96:128; the mask marks the right band.

    Its border: top and bottom rows 2 x (32 L + 64 C + 32 R), the left column 64 L, the right column 64 R: 128 pixels
    of each colour, so each channel's median is the middle of the three values: (50, 150, 200)."""
    img = np.empty((64, 128, 3), np.uint8)
    img[:, :32], img[:, 32:96], img[:, 96:] = LEFT, CENTRE, RIGHT
    mask = np.zeros((64, 128), np.uint8)
    mask[:, 96:] = 255
    return img, mask


def _portrait() -> tuple[np.ndarray, np.ndarray]:
    """64x128 (1:2): top band rows 0:32, middle 32:96, bottom 96:128; the mask marks the bottom band."""
    img = np.empty((128, 64, 3), np.uint8)
    img[:32], img[32:96], img[96:] = LEFT, CENTRE, RIGHT
    mask = np.zeros((128, 64), np.uint8)
    mask[96:] = 255
    return img, mask


def _inpaint_hint(img: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The inpaint ControlNet's hint: the picture in [0, 1], -1 where the mask is."""
    t = image_to_tensor(img)
    t[:, :, torch.from_numpy(mask > 127)] = -1.0
    return t


def _nearest_band(pixels: np.ndarray) -> np.ndarray:
    """For each pixel (N, 3), which of LEFT, CENTRE, RIGHT is nearest: 0, 1, 2."""
    colours = np.array([LEFT, CENTRE, RIGHT], np.float64)
    return np.argmin(((pixels[:, None, :].astype(np.float64) - colours[None]) ** 2).sum(-1), axis=1)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# --------------------------------------------------------------------------------------------- 1. fit geometry
def test_crop_keeps_the_centre_band_of_a_landscape_picture():
    img, mask = _landscape()
    assert geometry(128, 64, SIZE, SIZE, "crop") == (128, 64, 32, 0)  # covers: x1, the cut starts at column 32
    for fill in ("median", "edge"):
        out = fit_rgb(img, SIZE, SIZE, "crop", fill=fill)
        assert out.shape == (SIZE, SIZE, 3) and (out == CENTRE).all()  # the left and right bands are cut off
    m = fit_mask(mask, SIZE, SIZE, "crop")
    assert m.shape == (SIZE, SIZE) and m.dtype == np.uint8 and (m == 0).all()  # the masked right band is cut too
    t = _inpaint_hint(img, mask)
    tc = fit_tensor(t, SIZE, SIZE, "crop")
    assert tc.shape == (1, 3, SIZE, SIZE) and torch.equal(tc, t[..., :, 32:96]) and (tc >= 0).all()
    # scaled down first (256x128 -> 128x64, as the extension does), then the centre cut
    big = np.asarray(resize_rgb(img, 256, 128))
    assert np.array_equal(fit_rgb(big, SIZE, SIZE, "crop"), resize_rgb(big, 128, 64)[:, 32:96])


def test_crop_keeps_the_middle_band_of_a_portrait_picture():
    img, mask = _portrait()
    assert geometry(64, 128, SIZE, SIZE, "crop") == (64, 128, 0, 32)
    out = fit_rgb(img, SIZE, SIZE, "crop")
    assert out.shape == (SIZE, SIZE, 3) and (out == CENTRE).all()
    assert (fit_mask(mask, SIZE, SIZE, "crop") == 0).all()
    t = _inpaint_hint(img, mask)
    assert torch.equal(fit_tensor(t, SIZE, SIZE, "crop"), t[..., 32:96, :])
    # and "fill" on a portrait pads left and right: 32x64 in the middle, columns 0:16 and 48:64 to be painted
    m = fit_mask(mask, SIZE, SIZE, "fill")
    assert (m[:, :16] == 255).all() and (m[:, 48:] == 255).all()
    assert (m[48:, 16:48] == 255).all() and (m[:48, 16:48] == 0).all()


def test_just_stretches_all_three_bands():
    img, mask = _landscape()
    assert geometry(128, 64, SIZE, SIZE, "just") == (SIZE, SIZE, 0, 0)
    out = fit_rgb(img, SIZE, SIZE, "just")
    assert np.array_equal(out, resize_rgb(img, SIZE, SIZE))
    bands = _nearest_band(out[32])
    # 32/64/32 source columns become 16/32/16: each keeps its share of the width, in order
    assert bands.tolist() == [0] * 16 + [1] * 32 + [2] * 16
    assert _diff(out[:, 4], np.array([LEFT] * SIZE)) <= 1 and _diff(out[:, 32], np.array([CENTRE] * SIZE)) <= 1
    assert _diff(out[:, 60], np.array([RIGHT] * SIZE)) <= 1
    m = fit_mask(mask, SIZE, SIZE, "just")
    assert (m[:, 48:] == 255).all() and (m[:, :48] == 0).all()  # nearest: exactly the last quarter
    t = fit_tensor(_inpaint_hint(img, mask), SIZE, SIZE, "just")
    assert t.shape == (1, 3, SIZE, SIZE)
    assert (t[..., 48:] == -1).all() and (t[..., :48] >= 0).all()
    assert torch.allclose(t[0, :, :, 16:48], torch.tensor(CENTRE, dtype=torch.float32)[:, None, None] / 255)


def test_fill_scales_inside_centres_and_pads_by_what_is_fitted():
    img, mask = _landscape()
    assert geometry(128, 64, SIZE, SIZE, "fill") == (64, 32, 0, 16)  # fits: x0.5, 16 rows above and below
    inner = resize_rgb(img, 64, 32)
    # a hint: padded with the median colour of its own border
    hint = fit_rgb(img, SIZE, SIZE, "fill")
    assert np.array_equal(hint[16:48], inner)
    assert (hint[:16] == MEDIAN).all() and (hint[48:] == MEDIAN).all()
    assert _nearest_band(hint[32]).tolist() == [0] * 16 + [1] * 32 + [2] * 16
    # an init picture: its edge rows repeated (np.pad "edge"), so the padding shows the bands
    init = fit_rgb(img, SIZE, SIZE, "fill", fill="edge")
    assert np.array_equal(init[16:48], inner)
    assert np.array_equal(init[:16], np.broadcast_to(inner[0], (16, SIZE, 3)))
    assert np.array_equal(init[48:], np.broadcast_to(inner[-1], (16, SIZE, 3)))
    assert np.array_equal(init, np.pad(inner, ((16, 16), (0, 0), (0, 0)), mode="edge"))
    assert _diff(init[0, 4], np.array(LEFT)) <= 1 and _diff(init[63, 60], np.array(RIGHT)) <= 1
    # the mask: the new border is to be painted (outpainting), the scaled mask in between
    m = fit_mask(mask, SIZE, SIZE, "fill")
    assert (m[:16] == 255).all() and (m[48:] == 255).all()
    assert (m[16:48, 48:] == 255).all() and (m[16:48, :48] == 0).all()
    # an inpaint hint tensor: -1 on the new border, the bilinear scaled hint in between
    t = _inpaint_hint(img, mask)
    tf = fit_tensor(t, SIZE, SIZE, "fill")
    assert tf.shape == (1, 3, SIZE, SIZE)
    assert (tf[..., :16, :] == -1).all() and (tf[..., 48:, :] == -1).all()
    assert torch.equal(tf[..., 16:48, :], F.interpolate(t, size=(32, 64), mode="bilinear", align_corners=False))
    assert (tf[..., 16:48, 48:] == -1).all() and (tf[..., 16:48, :48] >= 0).all()


# --------------------------------------------------------------------------------- 2. same shape: the old path
@pytest.mark.parametrize(
    "src, dst", [((128, 128), (64, 64)), ((64, 64), (64, 64)), ((200, 100), (128, 64)), ((1000, 751), (64, 48))]
)
def test_matching_aspect_is_the_plain_resize_in_every_mode(src, dst):
    """(1000x751 -> 64x48 rounds to the target size in every mode, so it is a plain resize too, as in the extension.)"""
    (sw, sh), (w, h) = src, dst
    rng = np.random.RandomState(sw + sh)
    img = rng.randint(0, 256, (sh, sw, 3)).astype(np.uint8)
    mask = (rng.rand(sh, sw) > 0.5).astype(np.uint8) * 255
    t = torch.from_numpy(rng.rand(1, 3, sh, sw).astype(np.float32))
    old_hint = t if (sh, sw) == (h, w) else F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    old_mask = (mask_to_tensor(mask, w, h)[0, 0].numpy() * 255).astype(np.uint8)
    for mode in MODES:
        assert geometry(sw, sh, w, h, mode)[:2] == (w, h)
        for fill in ("median", "edge"):
            out = fit_rgb(img, w, h, mode, fill=fill)
            assert out.dtype == np.uint8 and np.array_equal(out, resize_rgb(img, w, h)), (mode, fill)
        assert np.array_equal(fit_mask(mask, w, h, mode), old_mask), mode
        assert torch.equal(fit_tensor(t, w, h, mode), old_hint), mode


# ----------------------------------------------------------------------------------------- 3. pixel perfect
def _extension_pixel_perfect(raw_w: int, raw_h: int, target_w: int, target_h: int, outer_fit: bool) -> int:
    """Mikubill/sd-webui-controlnet, internal_controlnet/external_code.py, pixel_perfect_resolution."""
    k0 = float(target_h) / float(raw_h)
    k1 = float(target_w) / float(raw_w)
    estimation = min(k0, k1) * float(min(raw_h, raw_w)) if outer_fit else max(k0, k1) * float(min(raw_h, raw_w))
    return int(np.round(estimation))


PIXEL_PERFECT = [  # (raw w, raw h, target w, target h): {mode: worked out by hand}
    ((1024, 768, 512, 512), {"crop": 512, "just": 512, "fill": 384}),
    ((768, 1024, 512, 512), {"crop": 512, "just": 512, "fill": 384}),
    ((640, 480, 768, 512), {"crop": 576, "just": 576, "fill": 512}),
    ((512, 512, 512, 512), {"crop": 512, "just": 512, "fill": 512}),
    ((300, 200, 512, 768), {"crop": 768, "just": 768, "fill": 341}),  # 512/300 * 200 = 341.33
    ((1920, 1080, 512, 768), {"crop": 768, "just": 768, "fill": 288}),  # 512/1920 * 1080 = 288
    ((333, 500, 512, 512), {"crop": 512, "just": 512, "fill": 341}),  # 512/500 * 333 = 340.99
]


@pytest.mark.parametrize("sizes, expected", PIXEL_PERFECT)
def test_pixel_perfect_resolution_is_the_extensions_rule(sizes, expected):
    for mode in MODES:
        got = pixel_perfect_resolution(*sizes, mode)
        assert got == expected[mode] == _extension_pixel_perfect(*sizes, outer_fit=mode == "fill"), (sizes, mode)
    assert pixel_perfect_resolution(*sizes) == expected["crop"]  # "crop" is the default


# ----------------------------------------------------------------------------------------------- 4. picture size
def _expected_size(w: int, h: int, longest: int) -> tuple[int, int]:
    k = min(1.0, longest / max(w, h))
    return int(np.floor(w * k / 8 + 0.5)) * 8, int(np.floor(h * k / 8 + 0.5)) * 8  # nearest multiple of 8


@pytest.mark.parametrize(
    "src, longest, expected",
    [
        ((4000, 3000), 1024, (1024, 768)),
        ((3000, 4000), 1024, (768, 1024)),
        ((1920, 1080), 1024, (1024, 576)),
        ((512, 512), 1024, (512, 512)),
        ((333, 501), 1024, (336, 504)),
        ((1000, 750), 512, (512, 384)),
        ((800, 600), 1024, (800, 600)),
        ((517, 389), 1024, (520, 392)),
    ],
)
def test_picture_size_keeps_the_aspect_in_multiples_of_8(src, longest, expected):
    w, h = picture_size(*src, longest)
    assert (w, h) == expected == _expected_size(*src, longest)
    assert w % 8 == 0 and h % 8 == 0 and max(w, h) <= longest and min(w, h) >= 64
    assert abs(w / h - src[0] / src[1]) <= 8 / min(w, h)  # the aspect ratio, to within one step of 8 px


def test_picture_size_of_small_pictures_is_scaled_up_to_the_smallest_side():
    assert picture_size(32, 48, 1024) == (64, 96)  # x2: the short side reaches 64
    assert picture_size(50, 100, 1024) == (64, 128)


# -------------------------------------------------------------------------------- 5. inpaint with resize modes
def _inpaint(sd, **kw):
    img, mask = _landscape()
    rng = np.random.RandomState(0)
    init = np.clip(img.astype(int) + rng.randint(-40, 40, img.shape), 0, 255).astype(np.uint8)  # texture
    base = dict(steps=3, cfg_scale=5.0, seed=6, width=SIZE, height=SIZE, init_image=init, strength=1.0, mask=mask,
                resize_mode="fill")  # fmt: skip
    return GenerationRequest("a cat", **{**base, **kw})


def test_inpaint_fill_keeps_the_fitted_unmasked_pixels_and_outpaints_the_border(ours):
    sd, _ = ours
    r = _inpaint(sd)
    fitted = fit_rgb(r.init_image, SIZE, SIZE, "fill", fill="edge")
    m = fit_mask(r.mask, SIZE, SIZE, "fill")
    keep, paint = m == 0, m == 255
    assert keep.sum() == 32 * 48 and paint[:16].all() and paint[48:].all()  # the border is outpainted
    out = generate(sd, r)
    assert out.images.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(out.images[0][keep], fitted[keep])  # exactly, in register with the fitted mask
    assert _diff(out.images[0][paint], fitted[paint]) > 20
    assert "Resize mode: Resize and Fill" in out.parameters and "Mask blur" not in out.parameters
    assert "Inpaint mode" not in out.parameters
    # "global": the whole picture is redrawn, the mask only shapes the hint
    glob = generate(sd, replace(r, inpaint_mode="global"))
    assert not np.array_equal(glob.images[0][keep], fitted[keep])
    assert _diff(glob.images[0][keep], fitted[keep]) > 5
    assert "Inpaint mode: global" in glob.parameters
    # ... exactly as img2img of the fitted init picture would (the mask does not touch the latents or the pixels)
    assert np.array_equal(glob.images, generate(sd, replace(r, mask=None)).images)


def test_mask_blur_blends_softly_at_the_edge(ours):
    sd, _ = ours
    r = _inpaint(sd, mask_blur=3.0)
    fitted = fit_rgb(r.init_image, SIZE, SIZE, "fill", fill="edge")
    soft = soft_mask(fit_mask(r.mask, SIZE, SIZE, "fill"), 3.0)
    far, edge = soft == 0, (soft > 0.05) & (soft < 0.95)
    assert far.sum() > 0 and edge.sum() > 0
    blurred = generate(sd, r)
    sharp = generate(sd, replace(r, mask_blur=0.0))
    assert "Mask blur: 3" in blurred.parameters
    assert parse_parameters(blurred.parameters).fields["Mask blur"] == "3"
    assert np.array_equal(blurred.images[0][far], fitted[far])  # beyond the blur's reach: the init picture exactly
    assert not np.array_equal(blurred.images[0], sharp.images[0])
    # with the same latents, the blend at the edge lies between the init picture and the decoded one
    fr, f = fit_pictures(r), sd.latent_factor
    x = torch.randn((1, 4, SIZE // f, SIZE // f), generator=torch.Generator().manual_seed(1))
    decoded = decode(sd, replace(fr, mask=None), x)[0].astype(int)
    sharp_x = decode(sd, replace(fr, mask_blur=0.0), x)[0].astype(int)
    soft_x = decode(sd, fr, x)[0].astype(int)
    init = fitted.astype(int)
    lo, hi = np.minimum(init, decoded), np.maximum(init, decoded)
    assert ((soft_x >= lo - 1) & (soft_x <= hi + 1)).all()
    lo_s, hi_s = np.minimum(init, sharp_x), np.maximum(init, sharp_x)
    strictly = (soft_x > lo_s) & (soft_x < hi_s)  # strictly between the init picture and the sharp (blur 0) result
    assert strictly[edge].sum() > 10 and not strictly[far].any()
    expected = (init * (1 - soft[..., None]) + decoded * soft[..., None]).round()
    assert np.abs(soft_x - expected).max() <= 1
    # and in the latents: each cell the mean of the blurred mask over its f x f pixels (soft edges), not 0/1
    lm = latent_mask(fr, (SIZE // f, SIZE // f))[0, 0].numpy()
    cells = soft.reshape(SIZE // f, f, SIZE // f, f).mean(axis=(1, 3))
    assert np.allclose(lm, cells, atol=1e-6)
    assert ((lm > 0.01) & (lm < 0.99)).sum() > 10
    sharp_lm = latent_mask(replace(fr, mask_blur=0.0), (SIZE // f, SIZE // f))
    assert set(np.unique(sharp_lm.numpy()).tolist()) == {0.0, 1.0}


# --------------------------------------------------------------------------------------- 6. a seed per picture
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde_karras"])
def test_seed_per_picture_makes_each_picture_its_seeds_picture(ours, sampler):
    """Also for DPM++ SDE, whose Brownian noise is seeded per picture (A1111's rule) instead of drawn."""
    sd, _ = ours
    s = 1000
    kw = dict(steps=3, cfg_scale=5.0, sampler=sampler, width=SIZE, height=SIZE)
    batch = generate(sd, GenerationRequest("a cat", seed=s, batch=3, seed_per_picture=True, **kw))
    singles = [generate(sd, GenerationRequest("a cat", seed=s + i, **kw)).images[0] for i in range(3)]
    assert batch.seeds == [s, s + 1, s + 2]
    for i in range(3):
        assert f"Seed: {s + i}," in batch.text(i)
        assert parse_parameters(batch.text(i)).seed == s + i
        # exactly equal (the batch arithmetic of this CPU build does not change a bit)
        assert np.array_equal(batch.images[i], singles[i]), (i, _diff(batch.images[i], singles[i]))
    assert batch.parameters == batch.text(0)
    assert len({singles[i].tobytes() for i in range(3)}) == 3  # three different pictures
    # the default (one noise stream for the batch, diffusers) is unchanged: an ancestral sampler draws each step's
    # noise for the 3 pictures at once, so not even picture 0 is the seed's picture alone; all carry the one seed
    default = generate(sd, GenerationRequest("a cat", seed=s, batch=3, **kw))
    explicit = generate(sd, GenerationRequest("a cat", seed=s, batch=3, seed_per_picture=False, **kw))
    assert np.array_equal(default.images, explicit.images)
    assert default.seeds == [s, s, s] and all(f"Seed: {s}," in default.text(i) for i in range(3))
    if sampler == "euler_a":
        assert not np.array_equal(default.images[0], batch.images[0])  # per-step noise drawn for 3 pictures at once
    assert not np.array_equal(default.images[1], singles[1]) and not np.array_equal(default.images[1], batch.images[1])


def test_default_batch_picture_0_is_the_seeds_picture_with_a_deterministic_sampler(ours):
    """With DDIM (eta 0) the only noise is the first draw, whose first rows are picture 0's: unchanged by batching."""
    sd, _ = ours
    kw = dict(steps=3, cfg_scale=5.0, sampler="ddim", seed=7, width=SIZE, height=SIZE)
    one = generate(sd, GenerationRequest("a cat", **kw)).images[0]
    assert np.array_equal(generate(sd, GenerationRequest("a cat", batch=2, **kw)).images[0], one)


# ----------------------------------------------------------------------------------------------- 7. hires fix
def _hint(seed=0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.integration  # two full generations, the second at twice the size: 8 s (keeps the fast tier under 5 minutes)
def test_hires_fix_doubles_the_size_and_runs_exactly_its_steps(ours):
    # copies of the ControlNet and the VAE, whose methods are wrapped to record what they are given
    cn, sd = copy.deepcopy(ours[1]), replace(ours[0], vae=copy.deepcopy(ours[0].vae))
    hires = HiresFix(scale=2, steps=3, strength=0.5)
    r = GenerationRequest("a cat", units=(ControlUnit(cn, _hint()),), steps=3, cfg_scale=5.0, seed=3, width=SIZE,
                          height=SIZE, hires=hires)  # fmt: skip
    f = sd.latent_factor
    calls, hint_sizes, control_inputs, latents = [], [], [], []
    embed, forward, vae_decode = cn.embed_hint, cn.forward, sd.vae.decode

    def recording_embed(t):
        hint_sizes.append(tuple(t.shape))
        return embed(t)

    def recording_forward(x, *args, **kw):
        control_inputs.append(tuple(x.shape))
        return forward(x, *args, **kw)

    def recording_decode(x):
        latents.append(x.detach().clone())
        return vae_decode(x)

    cn.embed_hint, cn.forward, sd.vae.decode = recording_embed, recording_forward, recording_decode
    out = generate(sd, r, callback=lambda k, n: calls.append((k, n)))
    assert out.images.shape == (1, 2 * SIZE, 2 * SIZE, 3)
    assert calls == [(k, 6) for k in range(1, 7)]  # 3 first-pass steps + exactly 3 hires steps (A1111's rule)
    assert hint_sizes == [(1, 3, SIZE, SIZE), (1, 3, 2 * SIZE, 2 * SIZE)]  # the hint fitted again at the new size
    # the ControlNet runs at every step of both passes (the guidance batch of 2), at the hires latent size after
    assert control_inputs == [(2, 4, SIZE // f, SIZE // f)] * 3 + [(2, 4, 2 * SIZE // f, 2 * SIZE // f)] * 3
    assert "Hires upscale: 2," in out.parameters and "Hires steps: 3," in out.parameters
    info = parse_parameters(out.parameters)
    assert info.fields["Hires upscaler"] == "Latent" and info.width == SIZE and info.denoising_strength == 0.5

    # another hint at the new size only (the first pass unchanged) gives other hires latents. The tiny ControlNet's
    # hint block is weak: the pictures move by about 1/255, so the latents are compared.
    cn.embed_hint = lambda t: embed(1 - t if t.shape[-1] == 2 * SIZE else t)
    other = generate(sd, r)
    assert not np.array_equal(other.images, out.images)
    assert float((latents[1] - latents[0]).abs().max()) > 1e-2
    cn.embed_hint = embed
    again = generate(sd, r)
    assert np.array_equal(again.images, out.images) and torch.equal(latents[2], latents[0])  # same hint, same result
    without = generate(sd, replace(r, units=()))  # and the unit matters: without it, other pictures
    assert _diff(without.images[0], out.images[0]) > 10

    lanczos = generate(sd, replace(r, hires=replace(hires, upscaler="lanczos")))
    assert lanczos.images.shape == (1, 2 * SIZE, 2 * SIZE, 3)
    assert _diff(lanczos.images[0], out.images[0]) > 10
    assert "Hires upscaler: Lanczos" in lanczos.parameters


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hires=HiresFix(scale=5)), "hires.scale"),
        (dict(width=1088, hires=HiresFix(scale=2)), "allows at most 2048 px"),
        (dict(hires=HiresFix(scale=2), init_image=np.zeros((SIZE, SIZE, 3), np.uint8),
              mask=np.ones((SIZE, SIZE), np.uint8)), "hires: the hires fix does not combine with inpainting"),
        (dict(hires=HiresFix(upscaler="nearest")), "hires.upscaler"),
    ],
)  # fmt: skip
def test_hires_fix_refuses_what_it_cannot_do(ours, change, field):
    sd, _ = ours
    with pytest.raises(InputError, match=field):
        generate(sd, GenerationRequest("a cat", **{**dict(steps=2, width=SIZE, height=SIZE), **change}))


# ------------------------------------------------------------------------------------------------ 8. live preview
def test_live_preview_every_2_steps(ours):
    sd, cn = ours
    r = GenerationRequest("a cat", units=(ControlUnit(cn, _hint()),), steps=6, cfg_scale=5.0, seed=2, width=SIZE,
                          height=SIZE, batch=2, sampler="euler_a")  # fmt: skip
    events, previews = [], []

    def preview(p):
        previews.append(p)
        events.append("preview")

    out = generate(sd, r, callback=lambda k, n: events.append(k), preview=preview, preview_every=2)
    f = sd.latent_factor
    assert len(previews) == 2  # after steps 2 and 4, not after the last
    for p in previews:
        assert p.dtype == np.uint8 and p.shape == (2, SIZE // f, SIZE // f, 3)
    first, second = events.index("preview"), len(events) - 1 - events[::-1].index("preview")
    assert events[first - 1] == 1 and events[first + 1] == 2 or events[first - 1] == 2  # at step 2
    assert events[second - 1] == 3 and events[second + 1] == 4 or events[second - 1] == 4  # at step 4
    assert [e for e in events if e != "preview"] == [1, 2, 3, 4, 5, 6]
    assert not np.array_equal(previews[0], previews[1])
    none = []
    plain = generate(sd, r, preview=none.append, preview_every=0)
    assert none == []
    assert np.array_equal(plain.images, out.images) and np.array_equal(generate(sd, r).images, out.images)


def test_approx_rgb_is_a1111s_cheap_approximation():
    x = torch.zeros(1, 4, 2, 2)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.5, -0.5, 0.25])
    x[0, :, 0, 1] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # clamps to white
    x[0, :, 1, 0] = torch.tensor([0.0, 0.0, 0.0, 10.0])  # clamps to black
    out = approx_rgb(x)
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    # R = 0.298 + 0.187*0.5 + 0.158*0.5 - 0.184*0.25 = 0.4245 -> (1.4245 / 2) * 255 = 181.62 -> 181 (truncated)
    # G = 0.207 + 0.286*0.5 - 0.189*0.5 - 0.271*0.25 = 0.18775 -> 151.44 -> 151
    # B = 0.208 + 0.173*0.5 - 0.264*0.5 - 0.473*0.25 = 0.04425 -> 133.14 -> 133
    assert out[0, 0, 0].tolist() == [181, 151, 133]
    assert out[0, 0, 1].tolist() == [255, 255, 255] and out[0, 1, 0].tolist() == [0, 0, 0]
    assert out[0, 1, 1].tolist() == [127, 127, 127]  # zero latent: 0.5 * 255 = 127.5 -> 127


# ------------------------------------------------------------------------------------- 9. unit parameters text
def test_unit_settings_are_written_and_read_back(ours):
    sd, cn = ours
    wide = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    wide[:, 48:80] = 255
    unit = ControlUnit(cn, wide, resize_mode="fill", preprocessor="canny", processor_res=384, pixel_perfect=True,
                       name="control_v11p_sd15_canny")  # fmt: skip
    out = generate(sd, GenerationRequest("a cat", units=(unit,), steps=1, cfg_scale=5.0, width=SIZE, height=SIZE))
    text = out.parameters
    for part in ("Module: canny", "Resize Mode: Resize and Fill", "Processor Res: 384", "Pixel Perfect: True"):
        assert part in text, part
    (u,) = parse_parameters(text).units
    assert (u.module, u.model, u.resize_mode, u.processor_res, u.pixel_perfect) == (
        "canny", "control_v11p_sd15_canny", ResizeMode.FILL, 384, True,
    )  # fmt: skip
    default = generate(sd, GenerationRequest("a cat", units=(ControlUnit(cn, _hint()),), steps=1, cfg_scale=5.0,
                                             width=SIZE, height=SIZE))  # fmt: skip
    assert default.parameters.endswith(
        'ControlNet 0: "Model: controlnet, Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0"'
    )
    for key in ("Module", "Resize Mode", "Processor Res", "Pixel Perfect"):
        assert key not in default.parameters, key
    (d,) = parse_parameters(default.parameters).units
    assert (d.module, d.resize_mode, d.processor_res, d.pixel_perfect) == ("", ResizeMode.CROP, None, False)


def test_seed_per_picture_holds_with_a_reference(ours):
    """Reference-only draws its own noise: with one seed per picture, each picture's from its own seed too."""
    from dataclasses import replace as _replace

    from cldm.pipeline.request import GenerationRequest, ReferenceUnit
    from cldm.pipeline.stages import generate

    sd, _ = ours
    ref = np.zeros((64, 64, 3), np.uint8)
    ref[8:40, 8:40] = (200, 40, 40)
    r = GenerationRequest("a", steps=3, cfg_scale=4.0, width=64, height=64, seed=10, batch=3, seed_per_picture=True,
                          reference=ReferenceUnit(ref))  # fmt: skip
    batch = generate(sd, r).images
    for i in (1, 2):
        alone = generate(sd, _replace(r, batch=1, seed=10 + i)).images[0]
        assert np.abs(alone.astype(int) - batch[i]).max() <= 1
