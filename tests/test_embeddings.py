"""Textual-inversion embeddings: A1111 .pt / .safetensors and diffusers files, against diffusers'
load_textual_inversion; chunk placement; refusals; through the model manager."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cldm.adapters.embeddings import from_state
from cldm.errors import InputError
from cldm.io import checkpoints, files
from cldm.pipeline import prompts
from cldm.pipeline.request import GenerationRequest


@pytest.fixture()
def fresh(tiny_dirs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs[0], safety_checker=None, requires_safety_checker=False)
    return pipe, checkpoints.load_sd(tiny_dirs[0])


def _a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 3000,
                "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5"}, path)  # fmt: skip


def test_a1111_embedding_matches_diffusers(fresh, tmp_path):
    pipe, sd = fresh
    width = sd.text.cfg.hidden_size
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    _a1111_pt(tmp_path / "inkstyle.pt", vectors)
    state = files.read_file(tmp_path / "inkstyle.pt")
    sd.text.embeddings["inkstyle"] = from_state(state, "inkstyle", width)
    prompt = "a inkstyle house"
    pipe.load_textual_inversion(str(tmp_path / "inkstyle.pt"), token="inkstyle")
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    n = sd.text.cfg.max_length
    ids = pipe.tokenizer(converted, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)[0]
    got = prompts.encode(sd.text, [prompt])
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    plain = prompts.encode(sd.text, [prompt], emphasis=False)
    assert torch.equal(got, plain)  # the embedding does not depend on the emphasis switch
    sd.text.embeddings.clear()
    assert not torch.allclose(prompts.encode(sd.text, [prompt]), ref, atol=1e-3)  # without it the word is only letters


def test_formats_and_refusals(ours):
    width = ours[0].text.cfg.hidden_size
    v = torch.randn(2, width)
    assert torch.equal(from_state({"emb_params": v}, "a", width).vectors, v)  # A1111 .safetensors
    assert from_state({"<cat-toy>": v[0]}, "b", width).tokens == 1  # diffusers learned_embeds
    with pytest.raises(InputError, match="SDXL"):
        from_state({"clip_l": v, "clip_g": v}, "xl", width)
    with pytest.raises(InputError, match="1024-wide|takes"):
        from_state({"emb_params": torch.randn(2, width * 2)}, "wide", width)
    with pytest.raises(InputError, match="not a textual-inversion"):
        from_state({"a": v, "b": v}, "two", width)
    with pytest.raises(InputError, match="NaN"):
        from_state({"emb_params": torch.full((1, width), float("nan"))}, "nan", width)


def test_an_embedding_is_never_split_between_chunks(ours):
    text = ours[0].text
    per = prompts.chunk_tokens(text)
    width = text.cfg.hidden_size
    text.embeddings["wide"] = from_state({"emb_params": torch.randn(4, width)}, "wide", width)
    try:
        filler = " ".join(["a"] * (per - 2))  # leaves 2 places: the 4 vectors go to the next chunk
        ids, _, vectors = prompts.weighted_chunks(text, [f"{filler} wide"])
        assert ids.shape[1] == 2 and {(c, place) for _, c, place, _ in vectors} == {(1, 1), (1, 2), (1, 3), (1, 4)}
    finally:
        text.embeddings.clear()


def test_manager_loads_an_embeddings_folder(tiny_dirs, tmp_path):
    from safetensors.torch import save_file

    from cldm.runtime.manager import ModelManager

    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    width = manager.sd.text.cfg.hidden_size
    (tmp_path / "emb").mkdir()
    _a1111_pt(tmp_path / "emb" / "inkstyle.pt", torch.randn(2, width))
    save_file({"emb_params": torch.randn(1, width)}, str(tmp_path / "emb" / "glow.safetensors"))
    save_file({"emb_params": torch.randn(1, 1024)}, str(tmp_path / "emb" / "sd2thing.safetensors"))
    (tmp_path / "emb" / "broken.pt").write_bytes(b"not a checkpoint")
    refused = manager.load_embeddings(tmp_path / "emb")
    assert set(manager.sd.text.embeddings) == {"inkstyle", "glow"}
    assert set(refused) == {"sd2thing", "broken"} and "1024" in refused["sd2thing"]
    # A1111's "TI hashes": the embeddings a prompt uses (negative prompt included), the file's SHA-256, 12 digits
    want = {n: hashlib.sha256((tmp_path / "emb" / f).read_bytes()).hexdigest()[:12]
            for n, f in (("inkstyle", "inkstyle.pt"), ("glow", "glow.safetensors"))}  # fmt: skip
    used = manager.run(GenerationRequest("a (glow:1.2) house", "inkstyle", steps=1, width=64, height=64)).parameters
    assert f'TI hashes: "glow: {want["glow"]}, inkstyle: {want["inkstyle"]}"' in used
    assert "TI hashes" not in manager.run(GenerationRequest("a house", steps=1, width=64, height=64)).parameters


def test_cli_embeddings_folder(tiny_dirs, ours, tmp_path):
    import numpy as np
    from PIL import Image

    from cldm.__main__ import main

    width = ours[0].text.cfg.hidden_size
    (tmp_path / "emb").mkdir()
    _a1111_pt(tmp_path / "emb" / "inkstyle.pt", torch.randn(2, width, generator=torch.Generator().manual_seed(4)) * 3)
    base = ["generate", "--base", str(tiny_dirs[0]), "--steps", "2", "--width", "64", "--height", "64",
            "--prompt", "a inkstyle house"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "ti.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "ti"))
    assert not np.array_equal(a, b)
