"""Converting SDXL, SD2.x and their ControlNets between the layouts (writers.py, `python -m cldm convert`).

The tiny models of tests/tiny_families.py, written by diffusers in the published layouts, go through our loader and
writers both ways (single file <-> diffusers folder). Each file we write is read back three ways and must give the
original tensors exactly: by our loader (with no `config=`: our metadata makes a single file self-describing), by
diffusers' published readers (from_pretrained for folders; single_file_utils' converters and from_single_file for
single files), and through the command line.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import tiny_families as tf
import torch
from safetensors.torch import load_file

from cldm.__main__ import main
from cldm.io import checkpoints, files, writers
from cldm.io.model_configs import CONFIG_METADATA_KEY

IGNORED_CONFIG = {"_name_or_path", "_diffusers_version", "_use_default_values", "sample_size"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def sdxl_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_sdxl")
    pipe = tf.make_sdxl_pipeline(root)
    return pipe, tf.make_sdxl_controlnet(root, pipe, seed=1)


@pytest.fixture(scope="module")
def sdxl(sdxl_dirs):
    return checkpoints.load_sd(sdxl_dirs[0])


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd2_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_sd2")
    pipe = tf.make_sd2_pipeline(root, prediction=request.param)
    return pipe, tf.make_sd2_controlnet(root, pipe)


# ------------------------------------------------------------------------------------------------------ helpers
def _same(got: dict, want: dict, what: str) -> None:
    """The same keys and bit-identical tensors."""
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))[:8]}"
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {bad[:8]}"


def _same_models(a, b) -> None:
    """Two of our StableDiffusion models: the same config and the same tensors in every module."""
    assert a.config == b.config
    assert len(a.modules()) == len(b.modules())
    for i, (ma, mb) in enumerate(zip(a.modules(), b.modules())):
        _same(mb.state_dict(), ma.state_dict(), f"module {i}")


def _weights(folder) -> dict:
    """A diffusers component's weights as the folder holds them (text encoders without `text_model.`)."""
    stem = "model" if (folder / "model.safetensors").is_file() else "diffusion_pytorch_model"
    return {k.removeprefix("text_model."): v for k, v in load_file(str(folder / f"{stem}.safetensors")).items()}


def _cfg(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def _beside(pipe, path, names=("tokenizer", "tokenizer_2")) -> None:
    """The tiny vocabulary's tokenizer folders beside a single file (as the demo model ships its own)."""
    for name in names:
        if (pipe / name).is_dir() and not (path.parent / name).exists():
            shutil.copytree(pipe / name, path.parent / name)


def _meta(path) -> dict:
    return json.loads(files.read_metadata(path)[CONFIG_METADATA_KEY])


def _config_diff(got, want) -> dict:
    """Config entries (of two diffusers/transformers models) that differ, but for the ones that say nothing about
    the weights (and a CLIPTextModel's projection_dim: it has no projection, we keep none)."""
    g, w = (m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config) for m in (got, want))
    ignored = IGNORED_CONFIG | ({"projection_dim"} if type(want).__name__ == "CLIPTextModel" else set())
    norm = {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
    return {k: (norm.get(k), list(v) if isinstance(v, tuple) else v) for k, v in w.items()
            if k not in ignored and norm.get(k) != (list(v) if isinstance(v, tuple) else v)}  # fmt: skip


def _prefixes(state: dict) -> set[str]:
    roots = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.", "cond_stage_model.",
             "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")  # fmt: skip
    return {next((r for r in roots if k.startswith(r)), k) for k in state}


# ------------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_single_file_round_trip(sdxl_dirs, sdxl, tmp_path):
    pipe, _ = sdxl_dirs
    path = tmp_path / "sdxl.safetensors"
    writers.save_sd(sdxl, path)
    state = files.read_file(path)
    assert _prefixes(state) == {"model.diffusion_model.", "first_stage_model.",
                                "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."}  # fmt: skip
    g = "conditioner.embedders.1.model."
    assert state[g + "text_projection"].shape == (48, 40)  # OpenCLIP applies x @ P: the Linear weight transposed
    assert state[g + "transformer.resblocks.3.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert not any(k.startswith(g + "transformer.resblocks.4.") for k in state)  # SDXL keeps all of bigG's layers
    meta = _meta(path)
    assert meta["model"] == {"family": "SDXL", "prediction": "epsilon"}
    assert set(meta) == {"unet", "vae", "text", "text_2", "model"}
    _beside(pipe, path)
    back = checkpoints.load_sd(path)  # no config=: the metadata says the head widths the shapes cannot
    _same_models(sdxl, back)
    assert back.text_2.tokenizer.pad_token == "!" and back.text.tokenizer.pad_token == "<|endoftext|>"


def test_sdxl_single_file_read_by_diffusers(sdxl_dirs, sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModelWithProjection

    pipe, _ = sdxl_dirs
    path = tmp_path / "sdxl.safetensors"
    writers.save_sd(sdxl, path)
    ck = load_file(str(path))
    assert sfu.is_clip_sdxl_model(ck) and sfu.is_open_clip_sdxl_model(ck)
    _same(sfu.convert_ldm_unet_checkpoint(ck, _cfg(pipe / "unet")), _weights(pipe / "unet"), "unet")
    _same(sfu.convert_ldm_vae_checkpoint(ck, _cfg(pipe / "vae")), _weights(pipe / "vae"), "vae")
    clip_l = sfu.convert_ldm_clip_checkpoint(ck)
    clip_l.pop("text_model.embeddings.position_ids", None)
    _same({k.removeprefix("text_model."): v for k, v in clip_l.items()}, _weights(pipe / "text_encoder"), "clip-l")
    model = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2")
    clip_g = sfu.convert_open_clip_checkpoint(model, ck, prefix="conditioner.embedders.1.model.")
    _same({k.removeprefix("text_model."): v for k, v in clip_g.items()}, _weights(pipe / "text_encoder_2"), "clip-g")
    # and the whole pipeline, the way users load a single file (the folder lends the configs)
    got = StableDiffusionXLPipeline.from_single_file(str(path), config=str(pipe), local_files_only=True)
    want = StableDiffusionXLPipeline.from_pretrained(pipe)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same(getattr(got, name).state_dict(), getattr(want, name).state_dict(), name)


def test_sdxl_diffusers_folder_round_trip(sdxl_dirs, sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe, _ = sdxl_dirs
    out = tmp_path / "sdxl"
    writers.save_sd(sdxl, out, fmt="diffusers")
    got = StableDiffusionXLPipeline.from_pretrained(out)  # the published reader
    want = StableDiffusionXLPipeline.from_pretrained(pipe)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same(getattr(got, name).state_dict(), getattr(want, name).state_dict(), name)
        assert type(getattr(got, name)) is type(getattr(want, name)), name
        diff = _config_diff(getattr(got, name), getattr(want, name))
        assert not diff, (name, diff)
    assert got.text_encoder_2.config.projection_dim == 40
    assert type(got.scheduler) is type(want.scheduler)
    assert not _config_diff(got.scheduler, want.scheduler), _config_diff(got.scheduler, want.scheduler)
    assert got.config.force_zeros_for_empty_prompt is True
    # the tokenizers: the same ids, the same padding ("!" for the second), also from vocab.json + merges.txt alone
    # (the files of the published folders, which transformers 4's CLIPTokenizer reads)
    with torch.no_grad():
        a = got.encode_prompt("a photo of a cat", device="cpu", negative_prompt="blue")
        b = want.encode_prompt("a photo of a cat", device="cpu", negative_prompt="blue")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for name in ("tokenizer", "tokenizer_2"):
        bare = tmp_path / f"bare_{name}"
        bare.mkdir()
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(out / name / f, bare / f)
        tok = CLIPTokenizer(str(bare / "vocab.json"), str(bare / "merges.txt"))
        assert tok("a photo of a cat").input_ids == getattr(want, name)("a photo of a cat").input_ids
    back = checkpoints.load_sd(out)  # and ours
    _same_models(sdxl, back)


def test_sdxl_controlnet_both_ways(sdxl_dirs, sdxl, tmp_path):
    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils as sfu

    _, cn_dir = sdxl_dirs
    cn = checkpoints.load_controlnet(cn_dir, base=sdxl.config.unet)
    path = tmp_path / "cn.safetensors"
    writers.save_controlnet(cn, path)
    back = checkpoints.load_controlnet(path)  # no base: the metadata says
    assert back.cfg == cn.cfg
    _same(back.state_dict(), cn.state_dict(), "controlnet (file)")
    # diffusers' reader of the original layout (it leaves label_emb out; its own name table says where it goes)
    ck = load_file(str(path))
    got = sfu.convert_controlnet_checkpoint(ck, _cfg(cn_dir))
    for new, old in sfu.DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        got[new] = ck["control_model." + old]
    _same(got, _weights(cn_dir), "controlnet (diffusers' converter)")

    out = tmp_path / "cn"
    writers.save_controlnet(back, out, fmt="diffusers")
    got_m, want_m = ControlNetModel.from_pretrained(out), ControlNetModel.from_pretrained(cn_dir)
    _same(got_m.state_dict(), want_m.state_dict(), "controlnet (folder)")
    assert not _config_diff(got_m, want_m), _config_diff(got_m, want_m)
    again = checkpoints.load_controlnet(out)
    assert again.cfg == cn.cfg
    _same(again.state_dict(), cn.state_dict(), "controlnet (folder, ours)")


def test_cli_converts_sdxl_both_ways(sdxl_dirs, sdxl, tmp_path, capsys):
    pipe, cn_dir = sdxl_dirs
    single = tmp_path / "one" / "sdxl.safetensors"
    assert main(["convert", str(pipe), str(single), "--to", "original"]) == 0
    assert "SDXL" in capsys.readouterr().out
    _beside(pipe, single)
    folder = tmp_path / "two"
    assert main(["convert", str(single), str(folder), "--to", "diffusers"]) == 0
    _same_models(sdxl, checkpoints.load_sd(folder))
    half = tmp_path / "half.safetensors"
    assert main(["convert", str(cn_dir), str(half), "--dtype", "fp16"]) == 0  # a ControlNet, told from its folder
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.float16}
    assert main(["convert", str(half), str(tmp_path / "cn_dir"), "--to", "diffusers"]) == 0
    assert (tmp_path / "cn_dir" / "diffusion_pytorch_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------ SD2.x
def test_sd2_single_file_and_folder_round_trips(sd2_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, _ = sd2_dirs
    sd = checkpoints.load_sd(pipe)
    v = sd.config.prediction == "v"
    assert sd.config.family == "SD2.x" and v == (pipe.name == "sd2-v")
    path = tmp_path / "sd2.safetensors"
    writers.save_sd(sd, path)
    state = files.read_file(path)
    assert _prefixes(state) == {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."}
    p = "cond_stage_model.model."
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))}
    assert blocks == {0, 1, 2, 3}  # OpenCLIP's layer count: one more than diffusers (and we) keep
    extra = {k: t for k, t in state.items() if k.startswith(p + "transformer.resblocks.3.")}
    assert len(extra) == 12 and not any(t.any() for t in extra.values())  # the identity block: all zeros
    assert _meta(path)["model"] == {"family": "SD2.x", "prediction": "v" if v else "epsilon"}
    assert not path.with_suffix(".yaml").exists()
    _beside(pipe, path)
    one = checkpoints.load_sd(path)  # no config=, no prediction=: the metadata says (v stays v)
    _same_models(sd, one)

    out = tmp_path / "sd2"
    writers.save_sd(one, out, fmt="diffusers")
    got = StableDiffusionPipeline.from_pretrained(out)
    want = StableDiffusionPipeline.from_pretrained(pipe)
    for name in ("unet", "vae", "text_encoder"):
        _same(getattr(got, name).state_dict(), getattr(want, name).state_dict(), name)
        diff = _config_diff(getattr(got, name), getattr(want, name))
        assert not diff, (name, diff)
    assert got.scheduler.config.prediction_type == want.scheduler.config.prediction_type
    assert got.scheduler.config.prediction_type == ("v_prediction" if v else "epsilon")
    assert got.unet.config.upcast_attention == v
    _same_models(sd, checkpoints.load_sd(out))


def test_sd2_single_file_read_by_diffusers(sd2_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel

    pipe, _ = sd2_dirs
    sd = checkpoints.load_sd(pipe)
    path = tmp_path / "sd2.safetensors"
    writers.save_sd(sd, path)
    ck = load_file(str(path))
    _same(sfu.convert_ldm_unet_checkpoint(ck, _cfg(pipe / "unet")), _weights(pipe / "unet"), "unet")
    _same(sfu.convert_ldm_vae_checkpoint(ck, _cfg(pipe / "vae")), _weights(pipe / "vae"), "vae")
    p = "cond_stage_model.model."
    ref = CLIPTextModel.from_pretrained(pipe / "text_encoder")
    text = {k.removeprefix("text_model."): v for k, v in sfu.convert_open_clip_checkpoint(ref, ck, prefix=p).items()}
    last = {k for k in text if k.startswith("encoder.layers.3.")}
    assert len(last) == 16  # the extra layer (q/k/v split from in_proj): weight + bias of 8 parts
    _same({k: v for k, v in text.items() if k not in last}, _weights(pipe / "text_encoder"), "text")
    # The extra layer is the identity: an encoder with all four layers gives the same states at its last layer as the
    # three-layer one (so a reader that takes the last layer, or the penultimate, gets SD2's states either way).
    cfg = ref.config.to_dict() | {"num_hidden_layers": ref.config.num_hidden_layers + 1}
    full = CLIPTextModel(type(ref.config).from_dict(cfg)).eval()
    full.load_state_dict(text)
    ids = torch.tensor([[0, 5, 17, 33, 2] + [1] * 72])
    with torch.no_grad():
        a = full(ids, output_hidden_states=True)
        b = ref(ids, output_hidden_states=True)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-1])
    got = StableDiffusionPipeline.from_single_file(str(path), config=str(pipe), local_files_only=True)
    want = StableDiffusionPipeline.from_pretrained(pipe)
    for name in ("unet", "vae", "text_encoder"):
        _same(getattr(got, name).state_dict(), getattr(want, name).state_dict(), name)


def test_sd2_controlnet_both_ways(sd2_dirs, tmp_path):
    from diffusers import ControlNetModel

    _, cn_dir = sd2_dirs
    cn = checkpoints.load_controlnet(cn_dir)
    path = tmp_path / "cn.safetensors"
    writers.save_controlnet(cn, path)
    back = checkpoints.load_controlnet(path)
    assert back.cfg == cn.cfg and back.cfg.upcast_attention == (cn_dir.name == "cn-sd2-v")
    _same(back.state_dict(), cn.state_dict(), "controlnet (file)")
    want = ControlNetModel.from_pretrained(cn_dir)
    got = ControlNetModel.from_single_file(str(path), config=str(cn_dir), local_files_only=True)
    _same(got.state_dict(), want.state_dict(), "controlnet (diffusers from our file)")
    out = tmp_path / "cn"
    writers.save_controlnet(back, out, fmt="diffusers")
    got = ControlNetModel.from_pretrained(out)
    _same(got.state_dict(), want.state_dict(), "controlnet (folder)")
    assert not _config_diff(got, want), _config_diff(got, want)
    _same(checkpoints.load_controlnet(out).state_dict(), cn.state_dict(), "controlnet (folder, ours)")
