"""Control-LoRA (cldm/io/control_lora.py) against diffusers, on the tiny SDXL of tests/tiny_families.py and a tiny
random Control-LoRA file in the published layout (Stability's ControlLoraSave: `<name>.up` / `<name>.down` pairs
for the weights the ControlNet shares with the base, full fp16 tensors for the rest, the `lora_controlnet` marker).

The reference is built the diffusers way: `ControlNetModel.from_unet(unet)` + `load_lora_adapter(file, prefix=None)`,
then StableDiffusionXLControlNetPipeline. diffusers 0.42.1 (peft 0.21) drops the file's biases of the layers that
get an up/down pair (they keep the base's); ComfyUI and we set them, so the test sets them in the reference too.

Bound: pictures within 2/255 per pixel in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.errors import CheckpointError
from cldm.io import checkpoints, files, identify
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.runtime.manager import ModelManager
from tests import tiny_families as tf
from tests.test_pipeline import _ref

SIZE = 64
PIXEL_TOL = 2
RANK = 16  # min(RANK, in, out) per layer, as the published files: conv_in (4 input channels) gets rank 4

pytestmark = pytest.mark.usefixtures("one_thread")


def write_control_lora(base_dir, out_path, seed: int = 5):
    """A Control-LoRA file as ControlLoraSave writes one: a trained ControlNet (here random, its 1-D tensors moved off
    the base's too) stored as its changes to the base UNet `base_dir` (a pipeline folder)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    ucfg = tf._unet_config(base_dir)
    base = tf.unet_to_original(UNet2DConditionModel.from_pretrained(base_dir / "unet").state_dict(), ucfg)
    torch.manual_seed(seed)
    trained_cn = tf._controlnet_from_unet_config(ucfg)
    tf.wake_zero_convs(trained_cn, seed + 100)
    trained = tf.controlnet_to_original(trained_cn.state_dict(), dict(trained_cn.config))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in trained.items():
        if k in base and v.ndim >= 2:  # a pair whose product is the change (random here, the SVD of it there)
            r = min(RANK, v.shape[0], v.shape[1])
            out[k.removesuffix(".weight") + ".up"] = (torch.randn(v.shape[0], r, *[1] * (v.ndim - 2), generator=g)
                                                      * 0.05).half()  # fmt: skip
            out[k.removesuffix(".weight") + ".down"] = (torch.randn(r, *v.shape[1:], generator=g) * 0.05).half()
        else:  # biases and norms (changed from the base's), hint block, zero convs: full tensors
            out[k] = (v + 0.05 * torch.randn(v.shape, generator=g) if v.ndim == 1 else v).half()
    out["lora_controlnet"] = torch.tensor([])
    save_file(out, str(out_path))
    return out_path


def _hint(seed=0):
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 8:40] = 255
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sdxl_control_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_lora")
    pipe_dir = tf.make_sdxl_pipeline(root)
    return pipe_dir, write_control_lora(pipe_dir, root / "control-lora-canny-rank16.safetensors")


def _diffusers_pipeline(pipe_dir, lora_file):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel
    from diffusers.utils import convert_sai_sd_control_lora_state_dict_to_peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tf.HINT_CHANNELS)
    controlnet.load_lora_adapter(str(lora_file), prefix=None)
    # the file's biases of the LoRA'd layers, which diffusers leaves at the base's (see the module docstring)
    file_state = {k: v.float() for k, v in files.read_file(lora_file).items()}
    modules, dropped = dict(controlnet.named_modules()), 0
    for key, value in convert_sai_sd_control_lora_state_dict_to_peft(file_state).items():
        layer = modules.get(key.removesuffix(".bias"))
        if key.endswith(".bias") and isinstance(layer, BaseTunerLayer):
            dropped += not torch.equal(layer.base_layer.bias, value)
            with torch.no_grad():
                layer.base_layer.bias.copy_(value)
    assert dropped > 50  # diffusers did leave them out (else this patch and the docstring are stale)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(pipe_dir, unet=unet, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_control_lora_is_told_from_its_content(sdxl_control_lora):
    _, lora_file = sdxl_control_lora
    state = files.read_file(lora_file)
    assert identify.weight_kind(state) is identify.WeightKind.CONTROL_LORA
    assert any(k.endswith(".up") for k in state) and "input_hint_block.0.weight" in state
    with pytest.raises(CheckpointError, match="Control-LoRA: it is built from the base model's own UNet"):
        checkpoints.load_controlnet(lora_file)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_control_lora_picture_matches_diffusers(sdxl_control_lora, sampler):
    pipe_dir, lora_file = sdxl_control_lora
    sd = checkpoints.load_sd(pipe_dir)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    cn = checkpoints.load_controlnet(lora_file, base=sd.config.unet, unet=sd.unet)
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())  # the base is left as it was
    # the pairs did change the base's weights (the change is the file's product, not a copy of either)
    w = "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert (cn.state_dict()[w] - before[w]).abs().max() > 1e-3
    ref_pipe = _diffusers_pipeline(pipe_dir, lora_file)
    kw = dict(prompt="a red circle", num_inference_steps=5, guidance_scale=5.0, seed=3,
              controlnet_conditioning_scale=0.8)  # fmt: skip
    ref = _ref(ref_pipe, sampler, image=Image.fromarray(_hint()), **kw)
    ours = generate(sd, GenerationRequest("a red circle", "", (ControlUnit(cn, _hint(), scale=0.8),), steps=5,
                                          cfg_scale=5.0, seed=3, width=SIZE, height=SIZE, sampler=sampler))  # fmt: skip
    assert int(np.abs(ours.images[0].astype(int) - ref[0].astype(int)).max()) <= PIXEL_TOL
    plain = generate(sd, GenerationRequest("a red circle", "", steps=5, cfg_scale=5.0, seed=3, width=SIZE,
                                           height=SIZE, sampler=sampler))  # fmt: skip
    assert np.abs(ours.images[0].astype(int) - plain.images[0].astype(int)).max() > 10  # the control acts


def test_an_sdxl_control_lora_is_refused_on_an_sd15_base(sdxl_control_lora, tiny_dirs):
    _, lora_file = sdxl_control_lora
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    unit = ControlUnit(str(lora_file), _hint())
    with pytest.raises(CheckpointError, match="made for SDXL models and the base model is SD1.5.*Switch to a SDXL"):
        manager.run(GenerationRequest("a", units=(unit,), steps=1, width=SIZE, height=SIZE))
    assert manager.controlnet_loads == 0


def test_the_manager_builds_it_on_the_current_base_and_again_after_a_switch(sdxl_control_lora, tmp_path):
    pipe_dir, lora_file = sdxl_control_lora
    other_base = tf.make_sdxl_pipeline(tmp_path, seed=7)  # the same family, other weights
    manager = ModelManager(str(pipe_dir), device="cpu", dtype="fp32")
    request = GenerationRequest("a red circle", units=(ControlUnit(str(lora_file), _hint()),), steps=2,
                                cfg_scale=5.0, width=SIZE, height=SIZE)  # fmt: skip
    first = manager.run(request).images[0]
    assert manager.run(request).images[0].tolist() == first.tolist() and manager.controlnet_loads == 1  # cached
    norm = "input_blocks.1.0.in_layers.2.weight"  # a LoRA'd weight: base + up @ down
    built_first = manager.controlnet(str(lora_file)).state_dict()[norm].clone()
    manager.use_base(str(other_base))
    manager.run(request)
    assert manager.controlnet_loads == 2  # built again, on the new base's weights
    delta = manager.controlnet(str(lora_file)).state_dict()[norm] - manager.sd.unet.state_dict()[norm]
    assert (manager.controlnet(str(lora_file)).state_dict()[norm] - built_first).abs().max() > 1e-3
    assert torch.allclose(delta, built_first - checkpoints.load_sd(pipe_dir).unet.state_dict()[norm], atol=1e-5)
