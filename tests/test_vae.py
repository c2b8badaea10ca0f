"""Another VAE per request: original-key files (with or without first_stage_model., .ckpt with a loss), diffusers
folders; refusals; the checkpoint's VAE is untouched; the CLI flag."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cldm.errors import CheckpointError
from cldm.io import checkpoints
from cldm.pipeline.request import GenerationRequest


def _other_vae_state(sd, scale=1.5):
    """The tiny VAE with a changed decoder output layer (a "fine-tuned" VAE: other pictures from the same latents)."""
    state = {k: v.clone() for k, v in sd.vae.state_dict().items()}
    state["decoder.conv_out.weight"] *= scale
    return state


def test_vae_formats_load_the_same_weights(tiny_dirs, ours, tmp_path):
    sd, _ = ours
    want = sd.vae.state_dict()
    from_folder = checkpoints.load_vae(tiny_dirs[0] / "vae", sd.config.vae)  # diffusers keys
    save_file({f"first_stage_model.{k}": v for k, v in want.items()}, str(tmp_path / "prefixed.safetensors"))
    torch.save({"state_dict": {**want, "loss.logvar": torch.zeros(())}}, tmp_path / "vae.ckpt")
    for vae in (from_folder, checkpoints.load_vae(tmp_path / "prefixed.safetensors", sd.config.vae),
                checkpoints.load_vae(tmp_path / "vae.ckpt", sd.config.vae)):  # fmt: skip
        got = vae.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    save_file({k: v for k, v in sd.unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="holds no VAE decoder"):
        checkpoints.load_vae(tmp_path / "unet.safetensors", sd.config.vae)


def test_a_request_with_another_vae(tiny_dirs, ours, tmp_path):
    from cldm.runtime.manager import ModelManager

    sd, _ = ours
    save_file(_other_vae_state(sd), str(tmp_path / "bright-vae.safetensors"))
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    base = dict(prompt="a red square", steps=2, width=64, height=64, seed=2)
    plain = manager.run(GenerationRequest(**base))
    other = manager.run(GenerationRequest(**base, vae=str(tmp_path / "bright-vae.safetensors")))
    assert not np.array_equal(plain.images, other.images)
    assert other.parameters.endswith("VAE: bright-vae.safetensors") and "VAE:" not in plain.parameters
    want = hashlib.sha256((tmp_path / "bright-vae.safetensors").read_bytes()).hexdigest()[:10]  # A1111's "VAE hash"
    assert f"VAE hash: {want}, VAE: bright-vae.safetensors" in other.parameters
    assert np.array_equal(manager.run(GenerationRequest(**base)).images, plain.images)  # the checkpoint's VAE again
    with pytest.raises(Exception, match="not found"):
        manager.run(GenerationRequest(**base, vae=str(tmp_path / "missing.safetensors")))


def test_cli_vae(tiny_dirs, ours, tmp_path):
    from PIL import Image

    from cldm.__main__ import main

    save_file(_other_vae_state(ours[0]), str(tmp_path / "v.safetensors"))
    args = ["generate", "--base", str(tiny_dirs[0]), "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--vae", str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert not np.array_equal(a, b) and "VAE: v" in Image.open(tmp_path / "b.png").text["parameters"]


# --------------------------------------------------------------------------------------------- tiled decode
def _decoder_probe(vae):
    """Forward hooks on every decoder module: how many times the decoder ran and its largest output, in elements."""
    seen = {"runs": 0, "largest": 0}

    def hook(module, args, out):
        seen["largest"] = max(seen["largest"], out.numel())
        seen["runs"] += module is vae.decoder

    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules()]
    return seen, handles


@torch.no_grad()
def test_tiled_decode_matches_diffusers(tiny_dirs, ours, monkeypatch):
    from diffusers import AutoencoderKL

    vae = ours[0].vae
    ref = AutoencoderKL.from_pretrained(tiny_dirs[0] / "vae").eval()
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size = 8, 8 * vae.cfg.downsample_factor  # 16 px tiles
    monkeypatch.setattr(vae, "tile_latent_size", 8)
    z = torch.randn(2, 4, 20, 27, generator=torch.Generator().manual_seed(3))  # 4 x 5 tiles, ragged at the edges
    scaled = z * vae.cfg.scale_factor
    want = ref.decode(z).sample
    seen, handles = _decoder_probe(vae)
    try:
        got = vae.decode(scaled, tiled=True)
        tiled_runs, tiled_largest = seen["runs"], seen["largest"]
        seen.update(runs=0, largest=0)
        whole = vae.decode(scaled, tiled=False)
    finally:
        for h in handles:
            h.remove()
    assert got.shape == want.shape == whole.shape == (2, 3, 40, 54)
    assert (got - want).abs().max() <= 1e-4
    assert tiled_runs == 20 and seen["runs"] == 1
    assert (got - whole).abs().max() > 1e-3  # the tiles really were decoded apart and blended
    assert tiled_largest * 4 < seen["largest"]  # the memory cap: the largest activation is a tile's, not the picture's
    ref.disable_tiling()
    assert torch.equal(vae.decode(scaled[:, :, :8, :8], tiled=True), vae.decode(scaled[:, :, :8, :8], tiled=False))


@torch.no_grad()
def test_decode_tiles_only_above_the_memory_cap(ours, monkeypatch):
    from cldm.models.config import VAEConfig
    from cldm.models.vae import TILE_PX_ENV, VAE_TILE_PX, AutoencoderKL

    monkeypatch.delenv(TILE_PX_ENV, raising=False)
    with torch.device("meta"):
        sd15 = AutoencoderKL(VAEConfig())
    assert VAE_TILE_PX == 1024
    for side, tiles in ((512, False), (768, False), (1024, False), (1024 + 64, True), (2048, True)):
        assert sd15.wants_tiles((1, 4, side // 8, side // 8)) is tiles
    assert not sd15.wants_tiles((1, 4, 64, 160)) and sd15.wants_tiles((1, 4, 128, 160))  # by area: 512x1280 whole
    monkeypatch.setenv(TILE_PX_ENV, "0")
    assert sd15.wants_tiles((1, 4, 65, 8)) and not sd15.wants_tiles((1, 4, 64, 64))  # one tile is never split

    vae = ours[0].vae
    monkeypatch.setattr(vae, "tile_latent_size", 8)
    z = torch.randn(1, 4, 20, 28, generator=torch.Generator().manual_seed(4))  # a 40 x 56 px picture
    whole = vae.decoder(vae.post_quant_conv(z / vae.cfg.scale_factor))
    monkeypatch.setenv(TILE_PX_ENV, "48")  # 48**2 = 2304 >= 40 * 56 = 2240 pixels: under the cap
    assert torch.equal(vae.decode(z), whole)
    monkeypatch.setenv(TILE_PX_ENV, "47")
    tiled = vae.decode(z)
    assert torch.equal(tiled, vae.decode(z, tiled=True)) and not torch.equal(tiled, whole)
    monkeypatch.setenv(TILE_PX_ENV, "big")
    with pytest.raises(ValueError, match=TILE_PX_ENV):
        vae.decode(z)
