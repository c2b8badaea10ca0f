"""Shared fixtures: tiny random models written by diffusers, and the same weights loaded into cldm."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(sd_folder, controlnet_folder) in diffusers format, written by diffusers."""
    return tiny.make_diffusers_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ours(tiny_dirs):
    from cldm import checkpoints

    sd_dir, cn_dir = tiny_dirs
    return checkpoints.load_sd(sd_dir), checkpoints.load_controlnet(cn_dir)


@pytest.fixture(scope="session")
def ref_pipe(tiny_dirs):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    sd_dir, cn_dir = tiny_dirs
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd_dir, controlnet=ControlNetModel.from_pretrained(cn_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
