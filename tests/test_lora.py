"""LoRA against diffusers (kohya files with LoCon convolutions, diffusers/PEFT files), exact restore, refusals,
A1111's prompt tags, and LoRAs through the model manager."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cldm.adapters import lora
from cldm.errors import InputError
from cldm.io import checkpoints, files
from cldm.pipeline.request import GenerationRequest, LoraUnit

RANK, ALPHA = 4, 2.0


def _kohya_state(pipe, seed=0) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA over every attention and feed-forward layer, the resnet convolutions (LoCon) and the
    text encoder's attention and MLP, with random weights (real key names: lora_unet_<module>, lora_te_<module>)."""
    g = torch.Generator().manual_seed(seed)
    out = {}

    def add(prefix, name, module):
        w = module.weight
        key = f"{prefix}_{name.replace('.', '_')}"
        if w.ndim == 4:
            down = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g) * 0.1
            up = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * 0.1
        else:
            down, up = (
                torch.randn(RANK, w.shape[1], generator=g) * 0.1,
                torch.randn(w.shape[0], RANK, generator=g) * 0.1,
            )
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(ALPHA)

    for name, m in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                          "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "resnets.0.conv1", "resnets.0.conv2")):  # fmt: skip
            add("lora_unet", name, m)
    for name, m in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            # the published names: transformers 4's CLIPTextModel had an inner text_model
            add("lora_te", name if name.startswith("text_model.") else f"text_model.{name}", m)
    return out


@pytest.fixture()
def pair(tiny_dirs):
    """A fresh diffusers pipeline and our model, the same tiny weights."""
    from diffusers import StableDiffusionPipeline

    sd_dir, _ = tiny_dirs
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    return pipe, checkpoints.load_sd(sd_dir)


def _outputs(pipe_or_sd, ours: bool):
    g = torch.Generator().manual_seed(3)
    cfg_in = 4
    x = torch.randn(2, cfg_in, 8, 8, generator=g)
    t = torch.tensor([500, 500])
    ids = torch.randint(0, 90, (2, 16), generator=g)  # within the tiny vocabulary
    with torch.no_grad():
        if ours:
            sd = pipe_or_sd
            text = sd.text(ids)
            return text, sd.unet(x, t, text)
        text = pipe_or_sd.text_encoder(ids)[0]
        return text, pipe_or_sd.unet(x, t, encoder_hidden_states=text).sample


def test_kohya_lora_matches_diffusers_and_restores_the_base(pair, tmp_path):
    pipe, sd = pair
    state = _kohya_state(pipe)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "style.safetensors"))
    before = {k: v.clone() for k, v in {**sd.unet.state_dict(), **sd.text.state_dict()}.items()}
    ref_before = _outputs(pipe, False)
    ours_before = _outputs(sd, True)
    assert torch.allclose(ref_before[1], ours_before[1], atol=1e-5)  # the same model to start with
    pipe.load_lora_weights(state)
    pipe.fuse_lora(lora_scale=0.7)
    parsed = lora.parse(files.read_file(tmp_path / "style.safetensors"), sd, "style")
    n_conv = sum(layer.down.ndim == 4 for layer in parsed.layers)
    assert len(parsed.layers) == len(state) // 3 and n_conv > 0  # every layer, the LoCon convolutions included
    originals = lora.apply(sd, [(parsed, 0.7)])
    ref, got = _outputs(pipe, False), _outputs(sd, True)
    for a, b, a0 in zip(ref, got, ref_before):
        assert not torch.allclose(a, a0, atol=1e-3)  # the LoRA changes the outputs
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    lora.restore(sd, originals)
    after = {**sd.unet.state_dict(), **sd.text.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit


def test_peft_lora_matches_diffusers(pair, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, sd = pair
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    config = pipe.unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(tmp_path / "with", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=config)  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(tmp_path / "bare", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    file = next((tmp_path / "with").glob("*.safetensors"))
    state = files.read_file(file)
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in state)
    # alpha comes from the PEFT config diffusers saves in the file's metadata (lora_alpha 8 at rank 4: scale 2)
    parsed = lora.parse(state, sd, "peft", files.read_metadata(file))
    assert {layer.scale for layer in parsed.layers} == {8 / RANK}
    originals = lora.apply(sd, [(parsed, 1.0)])
    ref, got = _outputs(pipe, False), _outputs(sd, True)
    assert torch.allclose(ref[1], got[1], atol=1e-5), (ref[1] - got[1]).abs().max()
    lora.restore(sd, originals)
    # without the metadata, alpha = rank (scale 1), as diffusers reads such a file
    bare = next((tmp_path / "bare").glob("*.safetensors"))
    assert {x.scale for x in lora.parse(files.read_file(bare), sd, "b", files.read_metadata(bare)).layers} == {1.0}


def test_other_families_and_damaged_loras_are_refused(ours):
    sd, _ = ours
    w = torch.zeros(4, 8)
    with pytest.raises(InputError, match="LoRA for SDXL"):
        lora.parse({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": w,
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": w}, sd, "xl")  # fmt: skip
    with pytest.raises(InputError, match="LoRA for SDXL"):
        lora.parse({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": w}, sd, "xl2")
    key = next(k for k in lora.targets(sd) if k.startswith("lora_te_") and k.endswith("q_proj"))
    width = sd.text.state_dict()[lora.targets(sd)[key][1]].shape[1]
    with pytest.raises(InputError, match="does not fit"):
        lora.parse({f"{key}.lora_down.weight": torch.zeros(4, width * 2),
                    f"{key}.lora_up.weight": torch.zeros(width, 4)}, sd, "sd2")  # fmt: skip
    with pytest.raises(InputError, match="lacks its up weight"):
        lora.parse({f"{key}.lora_down.weight": torch.zeros(4, width)}, sd, "half")
    with pytest.raises(InputError, match="none of its 1 layers exists in an SD1.5 model"):
        lora.parse({"lora_unet_nowhere.lora_down.weight": w, "lora_unet_nowhere.lora_up.weight": w}, sd, "odd")
    # a file with some layers this model lacks: the others are used, as A1111 does
    known = {f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(width, 4)}
    partial = lora.parse({**known, "lora_unet_nowhere.lora_down.weight": w, "lora_unet_nowhere.lora_up.weight": w},
                         sd, "partial")  # fmt: skip
    assert len(partial.layers) == 1 and partial.skipped == 1
    with pytest.raises(InputError, match="NaN or infinite"):
        lora.parse({**known, f"{key}.alpha": torch.tensor(float("nan"))}, sd, "nan")
    with pytest.raises(InputError, match="DoRA"):
        lora.parse({**known, f"{key}.dora_scale": torch.ones(1, width)}, sd, "dora")
    with pytest.raises(InputError, match="LyCORIS"):
        lora.parse({f"{key}.hada_w1_a": w, f"{key}.hada_w1_b": w}, sd, "loha")
    with pytest.raises(InputError, match="is not a LoRA"):
        lora.parse({"model.weight": w}, sd, "plain")


def test_prompt_tags():
    assert lora.prompt_tags("a castle, <lora:ink:0.6>, night <lora:film>") == (
        "a castle, night",
        [("ink", 0.6, 0.6), ("film", 1.0, 1.0)],
    )
    assert lora.prompt_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    # A1111's other spellings: text-encoder then UNet weight, named weights, <lyco:...>, exponents, upper case
    assert lora.prompt_tags("<lora:a:0.8:0.5> <lora:b:1:te=0.3> <LYCO:c:1e-1> <lora:d:unet=0.2:dyn=8>")[1] == [
        ("a", 0.5, 0.8), ("b", 0.3, 0.3), ("c", 0.1, 0.1), ("d", 0.2, 1.0)  # b: the UNet follows te= (A1111)
    ]  # fmt: skip
    with pytest.raises(InputError, match="must be numbers"):
        lora.prompt_tags("<lora:x:1.2.3>")


def test_text_and_unet_weights_apart(ours):
    import tiny

    sd, _ = ours
    parsed = lora.parse(tiny.lora_state(sd, seed=4), sd, "ink")
    before = {k: v.clone() for k, v in {**sd.unet.state_dict(), **sd.text.state_dict()}.items()}
    originals = lora.apply(sd, [(parsed, 1.0, 0.0)])  # the UNet only
    try:
        assert all(torch.equal(v, before[k]) for k, v in sd.text.state_dict().items())
        assert any(not torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    finally:
        lora.restore(sd, originals)


def plain_text(manager, r) -> str:
    return manager.run(r).parameters


def test_lora_hash_is_a1111s(tmp_path):
    """The addnet hash ignores the header (metadata edits keep it); kohya's saved sshs_model_hash wins."""
    from safetensors.torch import save_file

    from cldm.io.hashes import lora_hash

    t = {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}
    save_file(t, str(tmp_path / "a.safetensors"))
    save_file(t, str(tmp_path / "b.safetensors"), metadata={"ss_output_name": "something longer"})
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors")
    assert len(lora_hash(tmp_path / "a.safetensors")) == 12
    assert lora_hash(tmp_path / "b.safetensors", {"sshs_model_hash": "ABCDEF0123456789"}) == "abcdef012345"
    assert lora_hash(tmp_path / "b.safetensors", {"sshs_model_hash": "not a hash"}) == lora_hash(
        tmp_path / "a.safetensors"
    )
    torch.save(t, tmp_path / "c.pt")  # another format: the whole file's SHA-256
    assert lora_hash(tmp_path / "c.pt") == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()[:12]


def test_lora_through_the_manager_changes_the_picture_and_leaves_the_base(tiny_dirs, pair, tmp_path):
    from safetensors.torch import save_file

    from cldm.runtime.manager import ModelManager

    pipe, _ = pair
    save_file(_kohya_state(pipe, seed=1), str(tmp_path / "ink.safetensors"))
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    r = GenerationRequest("a red square", steps=2, width=64, height=64, seed=1)
    plain = manager.run(r).images
    with_lora = manager.run(GenerationRequest("a red square", steps=2, width=64, height=64, seed=1,
                                              loras=(LoraUnit(str(tmp_path / "ink.safetensors"), 0.8),)))  # fmt: skip
    assert not np.array_equal(plain, with_lora.images)
    assert "a red square <lora:ink:0.8>" in with_lora.parameters
    # A1111's "Lora hashes": the SHA-256 of the tensor bytes after the safetensors header ("addnet" hash), 12 digits
    data = (tmp_path / "ink.safetensors").read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]
    assert f'Lora hashes: "ink: {addnet}"' in with_lora.parameters and "Lora hashes" not in plain_text(manager, r)
    assert np.array_equal(manager.run(r).images, plain)  # the base is back
    with pytest.raises(InputError, match="weight must be"):
        manager.run(GenerationRequest("a", loras=(LoraUnit("x.safetensors", 50.0),)))


def test_cli_lora_flag_and_prompt_tag_agree(tiny_dirs, ours, tmp_path):
    import tiny
    from PIL import Image
    from safetensors.torch import save_file

    from cldm.__main__ import main

    (tmp_path / "models" / "loras").mkdir(parents=True)
    save_file(tiny.lora_state(ours[0], seed=2), str(tmp_path / "models" / "loras" / "ink.safetensors"))
    base = ["generate", "--base", str(tiny_dirs[0]), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]
    assert main([*base, "--prompt", "a red square", "--out", str(tmp_path / "plain.png")]) == 0
    flag = ["--lora", f"{tmp_path / 'models' / 'loras' / 'ink.safetensors'}:0.5"]
    assert main([*base, "--prompt", "a red square", *flag, "--out", str(tmp_path / "flag.png")]) == 0
    tag = ["--prompt", "a red square <lora:ink:0.5>", "--lora-dir", str(tmp_path / "models")]
    assert main([*base, *tag, "--out", str(tmp_path / "tag.png")]) == 0
    plain, by_flag, by_tag = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "flag", "tag"))
    assert np.array_equal(by_flag, by_tag) and not np.array_equal(plain, by_flag)
    assert "a red square <lora:ink:0.5>" in Image.open(tmp_path / "tag.png").text["parameters"]
    assert main([*base, "--prompt", "x <lora:nowhere>", "--lora-dir", str(tmp_path / "models"),
                 "--out", str(tmp_path / "no.png")]) == 2  # fmt: skip
