"""Every accepted checkpoint format loads to the same model; bad files raise our own errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from cldm.errors import CheckpointError, MissingWeightsError
from cldm.io import checkpoints, files, writers
from cldm.io.identify import CONTROL_PREFIX
from cldm.pipeline import prompts


def _probe(sd, cn):
    """UNet + ControlNet output on fixed inputs: a fingerprint of all the weights that matter."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    ctx = prompts.encode(sd.text, ["a red square"])
    hint = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = sd.unet(x, t, ctx, control=cn(x, t, ctx, cn.embed_hint(hint)))
        img = sd.vae.decode(x)
    return out, img


@pytest.fixture(scope="module")
def reference(ours):
    return _probe(*ours)


def _same(a, b, tol=0.0):
    return all((x - y).abs().max() <= tol for x, y in zip(a, b))


def test_original_single_files_load_identically(ours, reference, tmp_path):
    sd, cn = ours
    writers.save_sd(sd, tmp_path / "sd.safetensors")
    writers.save_controlnet(cn, tmp_path / "cn11.safetensors")  # 1.1 style: control_model.*
    writers.save_controlnet(cn, tmp_path / "bare.safetensors", fmt="bare")
    sd2 = checkpoints.load_sd(tmp_path / "sd.safetensors", tokenizer=sd.text.tokenizer)
    assert _same(_probe(sd2, checkpoints.load_controlnet(tmp_path / "cn11.safetensors")), reference)
    assert _same(_probe(sd2, checkpoints.load_controlnet(tmp_path / "bare.safetensors")), reference)
    keys = files.read_file(tmp_path / "sd.safetensors")
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k") for k in keys)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_pickles_fp16_extracts_and_10_full_files(ours, reference, tmp_path):
    sd, cn = ours
    # ControlNet 1.0 style: one .pth pickle holding SD + control_model.*, inside a Lightning "state_dict"
    full = {f"model.diffusion_model.{k}": v for k, v in sd.unet.state_dict().items()}
    full |= {f"first_stage_model.{k}": v for k, v in sd.vae.state_dict().items()}
    full |= {f"cond_stage_model.{k}": v for k, v in sd.text.state_dict().items()}
    full |= {f"{CONTROL_PREFIX}{k}": v for k, v in cn.state_dict().items()}
    full["alphas_cumprod"] = torch.ones(1000)  # training buffers: skipped on purpose
    torch.save({"state_dict": full, "global_step": 7}, tmp_path / "control_sd15_canny.pth")
    # a pickle has no metadata, and head counts cannot be read off shapes: the caller gives the config
    sd2 = checkpoints.load_sd(tmp_path / "control_sd15_canny.pth", tokenizer=sd.text.tokenizer, config=sd.config)
    cn2 = checkpoints.load_controlnet(tmp_path / "control_sd15_canny.pth", base=sd.config.unet)
    assert _same(_probe(sd2, cn2), reference)
    # bare fp16 extract (what most "diff" ControlNets on the hub are), named like a ckpt on purpose
    torch.save({k: v.half() for k, v in cn.state_dict().items()}, tmp_path / "cn_fp16.ckpt")
    cn3 = checkpoints.load_controlnet(tmp_path / "cn_fp16.ckpt", base=sd.config.unet)
    assert cn3.input_hint_block[0].weight.dtype == torch.float32  # cast to the asked dtype
    assert _same(_probe(sd, cn3), reference, tol=5e-2) and not _same(_probe(sd, cn3), reference)


def test_diffusers_round_trip_is_readable_by_diffusers(ours, reference, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    sd, cn = ours
    writers.save_sd(sd, tmp_path / "pipe", fmt="diffusers")
    writers.save_controlnet(cn, tmp_path / "cn", fmt="diffusers")
    sd2 = checkpoints.load_sd(tmp_path / "pipe")
    assert _same(_probe(sd2, checkpoints.load_controlnet(tmp_path / "cn")), reference)
    # and diffusers itself reads what we wrote
    unet_ref = UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet")
    cn_ref = ControlNetModel.from_pretrained(tmp_path / "cn")
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    hint = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        down, mid = cn_ref(x, t, ctx, hint, return_dict=False)
        ref = unet_ref(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        mine = sd.unet(x, t, ctx, control=cn(x, t, ctx, cn.embed_hint(hint)))
    assert (ref - mine).abs().max() <= 1e-5


def test_config_is_inferred_from_shapes_without_metadata(ours, tmp_path):
    from safetensors.torch import save_file

    sd, cn = ours
    save_file(
        {CONTROL_PREFIX + k: v.contiguous() for k, v in cn.state_dict().items()}, str(tmp_path / "plain.safetensors")
    )
    cn2 = checkpoints.load_controlnet(tmp_path / "plain.safetensors", base=sd.config.unet)
    assert cn2.cfg == cn.cfg


# ------------------------------------------------------------------------------------------------ bad files
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"control_model.x": torch.zeros(1), "payload": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="Refused to load"):
        checkpoints.load_controlnet(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (bytes(range(256)) * 40, "not a weight file"),
        (b"<html><body>404 Not Found</body></html>", "not a weight file"),
    ],
)
def test_garbage_files(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load_controlnet(path)


def test_truncated_files(ours, tmp_path):
    _, cn = ours
    writers.save_controlnet(cn, tmp_path / "cn.safetensors")
    torch.save(cn.state_dict(), tmp_path / "cn.pth")
    for name in ("cn.safetensors", "cn.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="damaged|truncated|not a weight file"):
            checkpoints.load_controlnet(tmp_path / f"cut_{name}")


def test_safetensors_header_lies(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}).encode()
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError):
        checkpoints.load_controlnet(tmp_path / "lie.safetensors")


def test_wrong_models(ours, tmp_path):
    sd, cn = ours
    writers.save_sd(sd, tmp_path / "sd.safetensors")
    writers.save_controlnet(cn, tmp_path / "cn.safetensors")
    with pytest.raises(CheckpointError, match="SD base model, not a ControlNet"):
        checkpoints.load_controlnet(tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="is a ControlNet, not a base model"):
        checkpoints.load_sd(tmp_path / "cn.safetensors")
    torch.save(
        {"image_proj.proj.weight": torch.zeros(4, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)},
        tmp_path / "ip.bin",
    )
    with pytest.raises(CheckpointError, match="IP-Adapter"):
        checkpoints.load_controlnet(tmp_path / "ip.bin")
    # a ControlNet for another base (SD2-sized context): shapes do not fit
    state = {CONTROL_PREFIX + k: v for k, v in cn.state_dict().items()}
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    state[key] = torch.zeros(state[key].shape[0], 1024)
    writers.save_file(state, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match="do not fit"):
        checkpoints.load_controlnet(tmp_path / "sd2.safetensors", base=sd.config.unet)
    # a key too many (another ControlNet family)
    state = {CONTROL_PREFIX + k: v for k, v in cn.state_dict().items()} | {
        CONTROL_PREFIX + "extra.weight": torch.zeros(1)
    }
    writers.save_file(state, tmp_path / "extra.safetensors", {"controlnet": cn.cfg})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys.*extra\.weight"):
        checkpoints.load_controlnet(tmp_path / "extra.safetensors")


def test_nan_weights_refused(ours, tmp_path):
    _, cn = ours
    state = {CONTROL_PREFIX + k: v.clone() for k, v in cn.state_dict().items()}
    state[CONTROL_PREFIX + "zero_convs.3.0.weight"][0, 0] = float("nan")
    writers.save_file(state, tmp_path / "nan.safetensors", {"controlnet": cn.cfg})
    with pytest.raises(CheckpointError, match="NaN or infinite.*zero_convs.3.0.weight"):
        checkpoints.load_controlnet(tmp_path / "nan.safetensors")


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found"):
        checkpoints.load_controlnet(tmp_path / "nope.safetensors")
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    with pytest.raises((MissingWeightsError, CheckpointError)):
        checkpoints.load_controlnet(tmp_path / "cn")
    (tmp_path / "pipe").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        checkpoints.load_sd(tmp_path / "pipe")


def test_loaded_weights_own_aligned_storage(ours, tmp_path):
    """The file reader's buffers sit at arbitrary offsets; on AVX-512 CPUs oneDNN's results depend on alignment, so
    the same weights from two formats gave different last bits until every tensor was copied to its own storage."""
    _, cn = ours
    writers.save_controlnet(cn, tmp_path / "bare.safetensors", fmt="bare")
    raw = files.read_file(tmp_path / "bare.safetensors")
    assert any(v.data_ptr() % 64 for v in raw.values())  # what the reader gives (why the copy is needed)
    loaded = checkpoints.load_controlnet(tmp_path / "bare.safetensors")
    tensors = list(loaded.state_dict().values())
    assert all(v.data_ptr() % 64 == 0 for v in tensors if v.numel())
    assert not {v.untyped_storage().data_ptr() for v in raw.values()} & {
        v.untyped_storage().data_ptr() for v in tensors
    }
