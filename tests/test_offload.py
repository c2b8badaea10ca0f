"""Low VRAM (cldm/offload.py): only the running stage's modules on the device, the same pictures.

Without a GPU the mechanism runs with a compute device that is the CPU: nothing really moves, but every group move
goes through `Offloader._move`, which the tests record, and forward hooks check which group is on the compute
device while each module runs. The CUDA test (skipped without a GPU) checks the real moves and the memory peak.
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import save_file

from cldm.pipeline.request import ControlUnit, GenerationRequest, ImagePrompt, LoraUnit
from cldm.runtime.manager import ModelManager, module_bytes
from cldm.runtime.offload import Offloader

SIZE = 64


def _hint(seed=0):
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


def _request(cn_dir, **kw):
    kw = {"steps": 2, "width": SIZE, "height": SIZE, "seed": 1, **kw}
    return GenerationRequest("a red square", units=(ControlUnit(str(cn_dir), _hint()),), **kw)


@pytest.fixture(scope="module")
def managers(tiny_dirs):
    """(plain, offloaded): the same tiny weights; the second one's compute device is the CPU too."""
    plain = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    low = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    low.offloader = Offloader("cpu")
    return plain, low


@pytest.fixture
def moves(monkeypatch):
    """Every group move: (group name, onto the compute device?, the modules' classes, what was on it before)."""
    seen = []
    original = Offloader._move

    def spy(self, group, onto):
        seen.append((group.name, onto, [type(m).__name__ for m in group.modules], [g.name for g in [self.active] if g]))
        original(self, group, onto)

    monkeypatch.setattr(Offloader, "_move", spy)
    return seen


def _running_groups(modules: dict, offloader: Offloader):
    """Forward hooks that note which group is on the compute device while each named module runs."""
    log, handles = [], []
    for name, m in modules.items():
        hook = lambda mod, args, out, name=name: log.append((name, offloader.active and offloader.active.name))  # noqa: E731
        handles.append(m.register_forward_hook(hook))
    return log, handles


def _nothing_left(manager: ModelManager, *extra: torch.nn.Module) -> None:
    sd = manager.sd
    assert manager.offloader.on_compute() == [] and manager.offloader.active is None
    for m in [*sd.modules(), *extra]:
        assert all(not sub._forward_pre_hooks for sub in m.modules()), "a hook was left on a module"
        assert all(p.device.type == "cpu" for p in m.parameters())


def test_stages_come_on_one_group_at_a_time_and_the_picture_is_the_same(managers, tiny_dirs, moves):
    plain, low = managers
    r = _request(tiny_dirs[1])
    expected = plain.run(r).images
    sd, cn = low.sd, low.controlnet(str(tiny_dirs[1]))
    ran, handles = _running_groups(
        {"text": sd.text.clip, "unet": sd.unet, "controlnet": cn, "hint": cn.input_hint_block, "vae": sd.vae.decoder},
        low.offloader,
    )
    try:
        result = low.run(r)
    finally:
        for h in handles:
            h.remove()
    assert np.array_equal(result.images, expected)
    # text encoder -> UNet + ControlNet -> VAE, each back on the CPU before the next comes on
    assert [(name, onto, before) for name, onto, _, before in moves] == [
        ("text", True, []), ("text", False, ["text"]),
        ("unet", True, []), ("unet", False, ["unet"]),
        ("vae", True, []), ("vae", False, ["vae"]),
    ]  # fmt: skip
    assert moves[2][2] == ["UNet", "ControlNet"]  # one group: they run together at every step
    assert set(ran) == {("text", "text"), ("hint", "unet"), ("controlnet", "unet"), ("unet", "unet"), ("vae", "vae")}
    assert "offload" in result.timings
    _nothing_left(low, cn)
    assert result.parameters == plain.run(r).parameters


def test_a_lora_gives_the_same_picture_and_the_base_comes_back(managers, tiny_dirs, ours, tmp_path, moves):
    plain, low = managers
    save_file(tiny.lora_state(ours[0], seed=2), str(tmp_path / "ink.safetensors"))
    r = _request(tiny_dirs[1], loras=(LoraUnit(str(tmp_path / "ink.safetensors"), 0.8),))
    before = low.run(_request(tiny_dirs[1])).images
    with_lora = low.run(r)
    assert np.array_equal(with_lora.images, plain.run(r).images)
    assert not np.array_equal(with_lora.images, before) and "<lora:ink:0.8>" in with_lora.parameters
    assert np.array_equal(low.run(_request(tiny_dirs[1])).images, before)  # the merge was taken out again
    _nothing_left(low)


def test_img2img_and_an_image_prompt_switch_back_and_forth(managers, tiny_dirs, ours, tmp_path, moves):
    plain, low = managers
    tiny.write_image_encoder(tmp_path / "image_encoder")
    torch.save(tiny.nested_adapter(tiny.adapter_state(ours[0].unet, "plain")), tmp_path / "ip.bin")
    ip = ImagePrompt(str(tmp_path / "ip.bin"), (_hint(3),), str(tmp_path / "image_encoder"), 0.7)
    r = _request(tiny_dirs[1], init_image=_hint(5), strength=0.6, image_prompt=ip)
    expected = plain.run(r).images
    result = low.run(r)
    assert np.array_equal(result.images, expected)
    # the VAE encodes the init picture between the hint embedding (UNet group) and the denoising
    assert [name for name, onto, _, _ in moves if onto] == ["text", "image", "unet", "vae", "unet", "vae"]
    assert all(not onto for _, onto, _, _ in moves[1::2]) and len(moves) == 12
    assert moves[4][2] == ["UNet", "ControlNet", "IPAdapter"]
    _nothing_left(low, low.ip_adapter(ip.adapter), low.image_encoder(ip.encoder))  # the kept ones, not loaded again


def test_an_error_halfway_leaves_nothing_on_the_device(managers, tiny_dirs, moves):
    _, low = managers

    def stop(i, n):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        low.run(_request(tiny_dirs[1]), callback=stop)
    assert moves[-1][:2] == ("unet", False)
    _nothing_left(low)


def test_the_view_answers_the_compute_device(ours):
    sd, _ = ours
    view = Offloader("cpu").view(sd)
    assert view.device == torch.device("cpu") and view.unet is sd.unet and view.hash == sd.hash
    assert Offloader("cpu").view(view).compute == torch.device("cpu")  # a view of a view


def test_low_vram_on_the_cpu_does_nothing_and_says_so(tiny_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="cldm.runtime.manager"):
        m = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32", low_vram=True)
    assert m.offloader is None and "nothing to do (the model already runs on the CPU)" in caplog.text


def test_the_cli_flag(tiny_dirs, tmp_path, caplog):
    from PIL import Image

    from cldm.__main__ import main

    base = ["generate", "--base", str(tiny_dirs[0]), "--prompt", "a", "--steps", "1", "--width", "64", "--height", "64",
            "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="cldm.runtime.manager"):
        assert main([*base, "--low-vram", "--out", str(tmp_path / "low.png")]) == 0
    assert "low VRAM asked for on cpu: nothing to do" in caplog.text
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    low, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("low", "plain"))
    assert np.array_equal(low, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_is_lower_with_low_vram(tiny_dirs, ours, tmp_path):
    tiny.write_image_encoder(tmp_path / "image_encoder")
    torch.save(tiny.nested_adapter(tiny.adapter_state(ours[0].unet, "plain")), tmp_path / "ip.bin")
    ip = ImagePrompt(str(tmp_path / "ip.bin"), (_hint(3),), str(tmp_path / "image_encoder"), 0.7)
    save_file(tiny.lora_state(ours[0], seed=2), str(tmp_path / "ink.safetensors"))
    r = _request(tiny_dirs[1], image_prompt=ip, loras=(LoraUnit(str(tmp_path / "ink.safetensors"), 0.8),))
    full = ModelManager(str(tiny_dirs[0]), device="cuda", dtype="fp16")
    expected = full.run(r)
    del full
    gc.collect()
    base = torch.cuda.memory_allocated()
    low = ModelManager(str(tiny_dirs[0]), device="cuda", dtype="fp16", low_vram=True)
    assert low.offloader is not None and low.offloader.compute.index is not None
    result = low.run(r)
    assert int(np.abs(result.images.astype(int) - expected.images.astype(int)).max()) <= 2
    assert result.timings["peak_gib"] < expected.timings["peak_gib"]
    assert low.offloader.moves >= 8 and result.timings["offload"] > 0
    assert torch.cuda.memory_allocated() - base < module_bytes(low.sd.vae)  # no module's weights left on the GPU
    _nothing_left(low, low.controlnet(str(tiny_dirs[1])), low.ip_adapter(ip.adapter), low.image_encoder(ip.encoder))
