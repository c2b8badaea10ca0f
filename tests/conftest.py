"""Shared fixtures: tiny random models written by diffusers, and the same weights loaded into cldm."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # every gr.Blocks would ask api.gradio.app for its version
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import tiny  # noqa: E402

# Fixtures that start something outside the test's own process or run for long: a server (the app), a browser, a
# Ray cluster, a training run. Every test that uses one, directly or through another fixture, is an integration test.
INTEGRATION_FIXTURES = {"running_app", "demo_app", "browser", "cluster", "trained", "family_app", "api_servers"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    """Mark the tests that use an integration fixture, so that `pytest` (the fast tier) leaves them out."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(sd_folder, controlnet_folder) in diffusers format, written by diffusers."""
    return tiny.make_diffusers_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ours(tiny_dirs):
    from cldm.io import checkpoints

    sd_dir, cn_dir = tiny_dirs
    return checkpoints.load_sd(sd_dir), checkpoints.load_controlnet(cn_dir)


@pytest.fixture(scope="session")
def other_controlnet(ours):
    """The tiny ControlNet with other zero-conv weights, so that a request that ran the wrong one shows it."""
    import copy

    cn = copy.deepcopy(ours[1])
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cn


@pytest.fixture(scope="session")
def ref_pipe(tiny_dirs):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    sd_dir, cn_dir = tiny_dirs
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd_dir, controlnet=ControlNetModel.from_pretrained(cn_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def misfit_controlnet(ours):
    """A ControlNet of another family than the tiny base: twice the channel widths and an SD2-like text context."""
    from dataclasses import replace

    from cldm.models.controlnet import ControlNet

    cfg = ours[1].cfg
    torch.manual_seed(5)
    return ControlNet(replace(cfg, model_channels=2 * cfg.model_channels, context_dim=2 * cfg.context_dim))


@pytest.fixture(scope="session")
def running_app(tiny_dirs, ours, other_controlnet, misfit_controlnet, tmp_path_factory):
    """The real app on 127.0.0.1 with tiny weights: (url, manager, output folder)."""
    import shutil

    from cldm.io import checkpoints, writers
    from cldm.runtime.manager import ModelManager
    from studio import launch, page, service

    sd_dir, cn_dir = tiny_dirs
    _, cn = ours
    models = tmp_path_factory.mktemp("models")
    writers.save_controlnet(cn, models / "control_v11p_sd15_canny.safetensors")  # 1.1 layout
    # other weights than canny's: a request that ran the wrong ControlNet gives another picture
    writers.save_controlnet(other_controlnet, models / "control_v11p_sd15_scribble.safetensors", fmt="bare")
    writers.save_controlnet(misfit_controlnet, models / "control_v11p_sd15_lineart.safetensors")  # another family
    # an IP-Adapter (plain, published key names) and its image encoder, where the app looks for them
    from safetensors.torch import save_file

    save_file(tiny.adapter_state(ours[0].unet, "plain"), str(models / "ip-adapter_sd15.safetensors"))
    tiny.write_image_encoder(models / "image_encoder")
    writers.save_controlnet(cn, models / "control_v11e_sd15_shuffle", fmt="diffusers")
    # a second base in the models folder's checkpoints/ (other UNet weights), for the base-model list
    other = checkpoints.load_sd(sd_dir)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    (models / "checkpoints").mkdir()
    writers.save_sd(other, models / "checkpoints" / "other.safetensors")
    shutil.copytree(sd_dir / "tokenizer", models / "checkpoints" / "tokenizer")
    (models / "vae").mkdir()  # another VAE (a brighter decoder), chosen by name in the app
    vae = {k: v.clone() for k, v in ours[0].vae.state_dict().items()}
    vae["decoder.conv_out.weight"] *= 1.5
    save_file(vae, str(models / "vae" / "bright.safetensors"))
    (models / "loras").mkdir()
    save_file(tiny.lora_state(ours[0]), str(models / "loras" / "ink.safetensors"))  # for <lora:ink:0.8>
    for name in ("control_v11p_sd15_inpaint", "control_v11f1e_sd15_tile"):
        writers.save_controlnet(cn, models / f"{name}.safetensors")
    manager = ModelManager(str(sd_dir), device="cpu", dtype="fp32")
    (models / "embeddings").mkdir()
    manager.load_embeddings(models / "embeddings")  # empty until a test adds one (and presses Refresh)
    studio = service.Studio(manager, str(models), str(tmp_path_factory.mktemp("out")))
    demo = page.build_app(studio)
    demo.queue(max_size=8, default_concurrency_limit=4)  # requests really overlap: the manager's lock must hold
    port = _free_port()
    launch.serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(studio.out_dir)])  # fmt: skip
    yield f"http://127.0.0.1:{port}/", manager, studio.out_dir, models
    demo.close()


DEMO_DIR = Path(__file__).parents[1] / "assets" / "demo"


@pytest.fixture(scope="session")
def demo_app(tmp_path_factory):
    """The real app in demo mode on the shipped demo model: (url, manager)."""
    from cldm.io.model_card import card_for
    from cldm.runtime.manager import ModelManager
    from studio import launch, page, service

    manager = ModelManager(str(DEMO_DIR / "shapes_sd.safetensors"), device="cpu", dtype="fp32")
    studio = service.Studio(
        manager, str(DEMO_DIR), str(tmp_path_factory.mktemp("out")), card=card_for(DEMO_DIR / "shapes_sd.safetensors")
    )
    blocks = page.build_app(studio, banner="demo")
    blocks.queue(max_size=8)
    port = _free_port()
    launch.serve(blocks, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", manager
    blocks.close()


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny models: too small to share out, they run 50-100x slower on two threads
    of a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
