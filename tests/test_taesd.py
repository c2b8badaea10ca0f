"""TAESD, the tiny autoencoder: madebyollin's published halves (.pth / .safetensors, nn.Sequential keys) and
diffusers' AutoencoderTiny folder load as they are and decode / encode as diffusers does; a whole generation with a
TAESD as the VAE matches diffusers' pipeline with `pipe.vae = AutoencoderTiny`; live previews; refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cldm.errors import CheckpointError, InputError
from cldm.io import checkpoints, locate
from cldm.io.files import read_file
from cldm.io.identify import WeightKind, weight_kind
from cldm.models.config import VAEConfig
from cldm.models.taesd import TinyAutoencoder, TinyDecoder, TinyEncoder
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.sampling.preview import decoded_rgb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, or a busy 2-core machine crawls

TENSOR_ATOL = 1e-5  # ours vs diffusers' AutoencoderTiny at fp32: the same convolutions in the same order
PIXEL_TOL = 2  # out of 255, per pixel: whole generations
SIZE = 64

# madebyollin's taesd.py, the published halves: the nn.Sequential index of each layer that holds weights (the
# decoder's 0 is its Clamp, the gaps are ReLUs and Upsamples). `taesd_decoder.pth` has exactly these keys.
PUBLISHED_DECODER = (1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19)
PUBLISHED_ENCODER = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
# A TAESD of the tiny test base's scale (2 pixels per latent pixel: one upsample), 16 wide, in the same layout
SMALL = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 2),
             num_decoder_blocks=(2, 1))  # fmt: skip
SMALL_DECODER, SMALL_ENCODER = (1, 3, 4, 6, 7, 8), (0, 1, 2, 3, 4, 5)


def _reference(seed: int = 0, gain: float = 1.0, **config):
    """A diffusers AutoencoderTiny with random weights that give pictures with contrast (the default init gives an
    almost flat grey: a comparison of flat pictures would show little)."""
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = math.prod(p.shape[1:]) if p.ndim == 4 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in) if p.ndim == 4 else 0.05))
        model.decoder.layers[-1].bias.fill_(0.5)  # pictures centred on grey
    return model


def _published(layers, indices) -> dict[str, torch.Tensor]:
    """One diffusers half written with madebyollin's keys: its layers that hold weights, in order, at the published
    indices (built from the layer order, not from our key map)."""
    holding = [m for m in layers if any(True for _ in m.parameters())]
    assert len(holding) == len(indices)
    return {f"{i}.{k}": v.clone() for i, m in zip(indices, holding) for k, v in m.state_dict().items()}


def _write_halves(ref, folder, ext: str, prefix: str = "taesd", small: bool = False):
    dec, enc = (SMALL_DECODER, SMALL_ENCODER) if small else (PUBLISHED_DECODER, PUBLISHED_ENCODER)
    folder.mkdir(parents=True, exist_ok=True)
    for half, layers, indices in (("decoder", ref.decoder.layers, dec), ("encoder", ref.encoder.layers, enc)):
        state, path = _published(layers, indices), folder / f"{prefix}_{half}{ext}"
        save_file(state, str(path)) if ext == ".safetensors" else torch.save(state, path)
    return folder / f"{prefix}_decoder{ext}"


@torch.no_grad()
def _assert_matches(ours: TinyAutoencoder, ref, factor: int = 8):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.5
    want = ref.decode(z).sample  # diffusers' pipelines: vae.decode(latents / scaling_factor), which is 1.0
    got = ours.decode(z)
    assert got.shape == want.shape == (2, 3, 8 * factor, 8 * factor)
    assert want.std() > 0.2  # a picture with contrast
    assert (got - want).abs().max() <= TENSOR_ATOL
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    want_z = ref.encode(image).latents  # img2img: retrieve_latents takes AutoencoderTiny's latents as they are
    got_z = ours.encode(image, torch.Generator().manual_seed(0))
    assert got_z.shape == want_z.shape and want_z.std() > 0.05
    assert (got_z - want_z).abs().max() <= TENSOR_ATOL


def test_our_halves_have_the_published_keys():
    """The attribute layout is madebyollin's: the published files need no converter."""
    for cls, indices in ((TinyDecoder, PUBLISHED_DECODER), (TinyEncoder, PUBLISHED_ENCODER)):
        with torch.device("meta"):
            keys = set(cls().state_dict())
        assert {int(k.split(".")[0]) for k in keys} == set(indices)
        assert "3.conv.4.weight" in keys and "3.skip.weight" not in keys
    with torch.device("meta"):
        assert "7.bias" not in TinyDecoder().state_dict() and "2.bias" not in TinyEncoder().state_dict()


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_published_halves_load_and_match_diffusers(tmp_path, ext):
    ref = _reference()
    path = _write_halves(ref, tmp_path / "VAE-taesd", ext)
    ours = checkpoints.load_vae(path, VAEConfig())  # SD1.5's VAE config: 4 channels, 8 px per latent pixel
    assert isinstance(ours, TinyAutoencoder) and ours.encoder is not None and ours.source == path.name
    _assert_matches(ours, ref)
    assert weight_kind(read_file(path)) is WeightKind.TAESD


def test_diffusers_folder_and_file_load_and_match(tmp_path):
    ref = _reference(seed=3)
    ref.save_pretrained(str(tmp_path / "taesd"))
    for where in (tmp_path / "taesd", tmp_path / "taesd" / "diffusion_pytorch_model.safetensors"):
        _assert_matches(checkpoints.load_vae(where, VAEConfig()), ref)


def test_a_decoder_alone_has_no_encoder(tmp_path):
    ref = _reference()
    path = _write_halves(ref, tmp_path, ".safetensors")
    (tmp_path / "taesd_encoder.safetensors").unlink()
    alone = checkpoints.load_vae(path, VAEConfig())
    assert alone.encoder is None
    with pytest.raises(InputError, match="no encoder"):
        alone.encode(torch.zeros(1, 3, 64, 64))
    torch.save(_published(ref.encoder.layers, PUBLISHED_ENCODER), tmp_path / "taesd_encoder.pth")
    assert checkpoints.load_vae(path, VAEConfig()).encoder is not None  # the encoder beside it, in the other format
    _write_halves(ref, tmp_path / "enc", ".pth")
    with pytest.raises(CheckpointError, match="TAESD encoder alone"):
        checkpoints.load_vae(tmp_path / "enc" / "taesd_encoder.pth", VAEConfig())


# ------------------------------------------------------------------------------------------------ refusals
def test_a_taesd_of_another_latent_space_is_refused(tmp_path, tiny_dirs):
    """taesd3 / taef1 decode 16-channel latents: refused on a 4-channel base, before anything is built or run."""
    from cldm.runtime.manager import ModelManager

    path = _write_halves(_reference(latent_channels=16), tmp_path, ".pth", prefix="taesd3")
    with pytest.raises(CheckpointError, match="16-channel|SD3 or FLUX.1") as e:
        checkpoints.load_vae(path, VAEConfig())
    assert "taesd_decoder.pth" in str(e.value) and "4 channels" in str(e.value)
    steps = []
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    with pytest.raises(CheckpointError, match="SD3 or FLUX.1"):
        manager.run(GenerationRequest("x", steps=2, width=SIZE, height=SIZE, vae=str(path)),
                    callback=lambda k, n: steps.append(k))  # fmt: skip
    assert steps == []  # refused before sampling
    full_scale = _write_halves(_reference(), tmp_path / "sd", ".pth")  # 8 px per latent pixel, the tiny base 2
    with pytest.raises(CheckpointError, match="scales pictures by 8 per side"):
        manager.run(GenerationRequest("x", steps=2, width=SIZE, height=SIZE, vae=str(full_scale)))


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_a_damaged_taesd_is_refused(tmp_path, ext):
    path = _write_halves(_reference(), tmp_path, ext)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        checkpoints.load_vae(path, VAEConfig())
    state = _published(_reference().decoder.layers, PUBLISHED_DECODER)
    state["3.conv.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan_decoder.safetensors"))
    with pytest.raises(CheckpointError, match="(?i)finite|nan"):
        checkpoints.load_vae(tmp_path / "nan_decoder.safetensors", VAEConfig())


# ------------------------------------------------------------------------------------- whole generations
@pytest.fixture(scope="module")
def small_taesd(tmp_path_factory):
    """(reference AutoencoderTiny, its diffusers folder, its madebyollin decoder file) at the tiny base's scale."""
    ref = _reference(seed=5, gain=0.8, **SMALL)
    folder = tmp_path_factory.mktemp("small_taesd")
    ref.save_pretrained(str(folder / "taesd"))
    return ref, folder / "taesd", _write_halves(ref, folder / "halves", ".pth", small=True)


def _hint():
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    return img


def _diffusers(pipe_cls, ref_pipe, taesd, **kw):
    pipe = pipe_cls(**{**ref_pipe.components, "vae": taesd})  # vae_scale_factor from the tiny autoencoder: 2
    pipe.set_progress_bar_config(disable=True)
    seed = kw.pop("seed")
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", width=SIZE, height=SIZE, **kw)
    return (out.images * 255).round().astype(np.uint8)


def test_generation_with_a_taesd_matches_diffusers(ours, ref_pipe, small_taesd):
    from diffusers import StableDiffusionControlNetPipeline

    sd, cn = ours
    ref, folder, halves = small_taesd
    want = _diffusers(StableDiffusionControlNetPipeline, ref_pipe, ref, prompt="a red square",
                      image=Image.fromarray(_hint()), num_inference_steps=4, guidance_scale=5.0, seed=4)  # fmt: skip
    taesd = checkpoints.load_vae(halves, sd.config.vae)  # madebyollin's decoder file, its encoder beside it
    got = generate(sd, GenerationRequest("a red square", units=(ControlUnit(cn, _hint()),), steps=4, cfg_scale=5.0,
                                         seed=4, width=SIZE, height=SIZE, vae=taesd))  # fmt: skip
    assert np.abs(got.images[0].astype(int) - want[0].astype(int)).max() <= PIXEL_TOL
    assert want.std() > 10  # a picture, not a flat one (the checkpoint's VAE would give another one: its own test)


def test_img2img_with_a_taesd_encoder_matches_diffusers(ours, ref_pipe, small_taesd):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    sd, cn = ours
    ref, folder, _ = small_taesd
    init = np.asarray(Image.fromarray(_hint()).rotate(30, fillcolor=(40, 90, 200)))
    # controlnet_conditioning_scale: the img2img pipeline's default is 0.8, ours 1.0
    want = _diffusers(StableDiffusionControlNetImg2ImgPipeline, ref_pipe, ref, prompt="a cat",
                      image=Image.fromarray(init), control_image=Image.fromarray(_hint()), strength=0.5,
                      num_inference_steps=6, guidance_scale=5.0, seed=5,
                      controlnet_conditioning_scale=1.0)  # fmt: skip
    taesd = checkpoints.load_vae(folder, sd.config.vae)  # diffusers' AutoencoderTiny folder
    got = generate(sd, GenerationRequest("a cat", units=(ControlUnit(cn, _hint()),), steps=6, cfg_scale=5.0, seed=5,
                                         width=SIZE, height=SIZE, init_image=init, strength=0.5, vae=taesd))  # fmt: skip
    assert np.abs(got.images.astype(int) - want.astype(int)).max() <= PIXEL_TOL


def test_a_request_that_encodes_needs_the_encoder(ours, small_taesd):
    sd, _ = ours
    alone = TinyAutoencoder(checkpoints.load_vae(small_taesd[1], sd.config.vae).decoder)  # no encoder
    steps = []
    request = GenerationRequest("x", steps=2, cfg_scale=1.0, width=SIZE, height=SIZE, init_image=_hint(),
                                strength=0.5, vae=alone)  # fmt: skip
    with pytest.raises(InputError, match="only its decoder"):
        generate(sd, request, callback=lambda k, n: steps.append(k))
    assert steps == []
    generate(sd, replace(request, init_image=None, strength=1.0))  # text to image needs no encoder


# ------------------------------------------------------------------------------------------------ previews
def test_taesd_previews_are_full_size(ours, small_taesd):
    sd, _ = ours
    taesd = checkpoints.load_vae(small_taesd[1], sd.config.vae)
    base = dict(steps=3, cfg_scale=1.0, width=SIZE, height=SIZE, seed=1, batch=2)
    seen = {}
    for name, extra in (("cheap", {}), ("preview_vae", {"preview_vae": taesd}), ("vae", {"vae": taesd})):
        shots = []
        generate(sd, GenerationRequest("x", **base, **extra), preview=shots.append, preview_every=1)
        assert len(shots) == 2 and all(s.dtype == np.uint8 for s in shots)
        seen[name] = shots
    f = sd.latent_factor
    assert seen["cheap"][0].shape == (2, SIZE // f, SIZE // f, 3)  # A1111's "Approx cheap": the latent size
    assert seen["preview_vae"][0].shape == seen["vae"][0].shape == (2, SIZE, SIZE, 3)  # TAESD: the picture size
    assert all(np.array_equal(a, b) for a, b in zip(seen["preview_vae"], seen["vae"]))
    assert not np.array_equal(seen["vae"][0], seen["vae"][-1])  # the preview follows the sampling


@torch.no_grad()
def test_decoded_preview_is_the_tiny_decoders_picture(small_taesd, ours):
    ref, folder, _ = small_taesd
    taesd = checkpoints.load_vae(folder, ours[0].config.vae)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    want = (ref.decode(z).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    got = decoded_rgb(taesd, z)[0]
    assert got.shape == (32, 32, 3) and np.abs(got.astype(float) - want).max() <= 1  # truncated, as A1111 does


# ---------------------------------------------------------------------------- the manager, the CLI, files
def test_the_manager_loads_and_keeps_a_taesd(tiny_dirs, small_taesd, tmp_path):
    from cldm.runtime.manager import ModelManager

    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    folder = str(small_taesd[1])
    request = GenerationRequest("x", steps=2, cfg_scale=1.0, width=SIZE, height=SIZE, seed=3, vae=folder,
                                preview_vae=folder)  # fmt: skip
    shots = []
    result = manager.run(request, preview=shots.append, preview_every=1)
    assert shots[0].shape == (1, SIZE, SIZE, 3)
    assert isinstance(manager.vae(folder), TinyAutoencoder) and manager.vae(folder) is manager.vae(folder)
    assert result.parameters.endswith("VAE: taesd")
    direct = generate(manager.sd, replace(request, vae=checkpoints.load_vae(folder, manager.sd.config.vae),
                                          preview_vae=None))  # fmt: skip
    assert np.array_equal(result.images, direct.images)


def test_low_vram_runs_the_preview_taesd_with_the_unet(tiny_dirs, small_taesd, monkeypatch):
    """With low VRAM the preview decoder comes onto the device with the UNet (it runs between the steps): the same
    pictures and previews, and nothing left on the device or hooked."""
    from cldm.runtime.manager import ModelManager
    from cldm.runtime.offload import Offloader

    groups, original = [], Offloader._move

    def spy(self, group, onto):
        groups.append((group.name, [type(m).__name__ for m in group.modules]))
        original(self, group, onto)

    monkeypatch.setattr(Offloader, "_move", spy)
    request = GenerationRequest("x", steps=2, cfg_scale=1.0, width=SIZE, height=SIZE, vae=str(small_taesd[1]))
    plain, low = (ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32") for _ in range(2))
    low.offloader = Offloader("cpu")
    shots = {"plain": [], "low": []}
    want = plain.run(request, preview=shots["plain"].append, preview_every=1).images
    got = low.run(request, preview=shots["low"].append, preview_every=1).images
    assert np.array_equal(got, want) and np.array_equal(shots["low"][0], shots["plain"][0])
    assert ("unet", ["UNet", "TinyAutoencoder"]) in groups
    taesd = low.vae(str(small_taesd[1]))
    assert all(not m._forward_pre_hooks for m in taesd.modules()) and low.offloader.active is None


def test_cli_vae_takes_a_taesd(tiny_dirs, small_taesd, tmp_path):
    from cldm.__main__ import main

    args = ["generate", "--base", str(tiny_dirs[0]), "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64"]
    assert main([*args, "--vae", str(small_taesd[2]), "--out", str(tmp_path / "t.png")]) == 0
    png = Image.open(tmp_path / "t.png")
    assert png.size == (64, 64) and "VAE: taesd_decoder.pth" in png.text["parameters"]


def test_locate_finds_a1111_taesd_files(tmp_path):
    folder = tmp_path / "VAE-taesd"
    folder.mkdir()
    (folder / "taesd_decoder.pth").write_bytes(b"x")
    (folder / "taesdxl_decoder.safetensors").write_bytes(b"x")
    assert locate.locate_taesd("SD1.5", tmp_path) == folder / "taesd_decoder.pth"
    assert locate.locate_taesd("SD2.x", tmp_path) == folder / "taesd_decoder.pth"  # SD2 shares SD1's latent space
    assert locate.locate_taesd("SDXL", tmp_path) == folder / "taesdxl_decoder.safetensors"
    assert locate.locate_taesd("SDXL", tmp_path / "elsewhere") is None
