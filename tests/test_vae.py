"""Another VAE per request: original-key files (with or without first_stage_model., .ckpt with a loss), diffusers
folders; refusals; the checkpoint's VAE is untouched; the CLI flag."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cldm import checkpoints
from cldm.errors import CheckpointError
from cldm.request import GenerationRequest


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
    from cldm.manager import ModelManager

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
