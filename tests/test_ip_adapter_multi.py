"""Several IP-Adapters in one request (a plain and a plus one, each its own picture, scale and left / right region
mask) against diffusers' multi-adapter path (`load_ip_adapter` with lists, `set_ip_adapter_scale` with a list,
`cross_attention_kwargs={"ip_adapter_masks": ...}` from its IPAdapterMaskProcessor), on tiny random weights in the
published layout; pictures within 2/255. Also: the refusals before sampling and the command line's groups."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import ENC, adapter_state
from tiny import nested_adapter as _nested

from cldm.errors import InputError
from cldm.pipeline.request import GenerationRequest, ImagePrompt
from cldm.pipeline.stages import generate

SIZE = 64
PIXEL_TOL = 2  # out of 255, per pixel, as the other whole-picture comparisons
SCALES = (0.9, 0.7)
KW = dict(steps=4, cfg_scale=5.0, seed=7, width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def files(ours, tmp_path_factory):
    """(folder, {kind: adapter file}, image-encoder folder): a plain and a plus adapter with their own weights."""
    from tiny import write_image_encoder

    folder = tmp_path_factory.mktemp("ip_multi")
    paths = {}
    for seed, kind in enumerate(("plain", "plus")):
        paths[kind] = folder / f"ip-adapter-{kind}_sd15.bin"
        torch.save(_nested(adapter_state(ours[0].unet, kind, seed=20 + seed)), paths[kind])
    return folder, paths, write_image_encoder(folder / "image_encoder")


def _picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    img[10:30, 8:30] = (40, 40 + 90 * seed, 220)
    return img


def _halves() -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves, at another size than the picture's (both sides resize them to it)."""
    left = np.zeros((40, 40), np.uint8)
    left[:, :20] = 255
    return left, 255 - left


def _ours(paths, encoder_dir, masks=(None, None), scales=SCALES) -> list[ImagePrompt]:
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.io.image_encoder import load_image_encoder

    encoder = load_image_encoder(encoder_dir)
    return [ImagePrompt(load_ip_adapter(paths[kind]), (_picture(i),), encoder, s, mask=m)
            for i, (kind, s, m) in enumerate(zip(("plain", "plus"), scales, masks))]  # fmt: skip


def _diffusers_pictures(ref_pipe, folder, paths, encoder_dir) -> np.ndarray:
    from diffusers import StableDiffusionPipeline
    from diffusers.image_processor import IPAdapterMaskProcessor
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    parts = {
        k: v for k, v in ref_pipe.components.items() if k not in ("controlnet", "image_encoder", "feature_extractor")
    }
    parts["unet"] = copy.deepcopy(parts["unet"])  # load_ip_adapter changes the UNet: the shared reference stays clean
    crop = {"height": ENC["image_size"], "width": ENC["image_size"]}
    extractor = CLIPImageProcessor(size={"shortest_edge": ENC["image_size"]}, crop_size=crop)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir))
    pipe = StableDiffusionPipeline(**parts, image_encoder=encoder, feature_extractor=extractor)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter([str(folder)] * 2, subfolder=["", ""], weight_name=[paths["plain"].name, paths["plus"].name],
                         image_encoder_folder=None)  # fmt: skip
    pipe.set_ip_adapter_scale(list(SCALES))
    masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(m) for m in _halves()], height=SIZE, width=SIZE)
    out = pipe("a cat", ip_adapter_image=[Image.fromarray(_picture(0)), Image.fromarray(_picture(1))],
               cross_attention_kwargs={"ip_adapter_masks": [masks[:1], masks[1:]]}, num_inference_steps=KW["steps"],
               guidance_scale=KW["cfg_scale"], generator=torch.Generator("cpu").manual_seed(KW["seed"]),
               output_type="np", width=SIZE, height=SIZE)  # fmt: skip
    return (out.images * 255).round().astype(np.uint8)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_two_masked_adapters_match_diffusers(ours, ref_pipe, files, tiny_dirs, tmp_path):
    folder, paths, encoder_dir = files
    sd, _ = ours
    ref = _diffusers_pictures(ref_pipe, folder, paths, encoder_dir)
    masked = generate(sd, GenerationRequest("a cat", image_prompts=_ours(paths, encoder_dir, _halves()), **KW))
    assert _diff(masked.images[0], ref[0]) <= PIXEL_TOL
    assert 'IP-Adapter 0: "Model: ' in masked.parameters and "Images: 1, Mask: True" in masked.parameters
    # the masks matter: swapped, or left out, the picture is another one
    swapped = generate(sd, GenerationRequest("a cat", image_prompts=_ours(paths, encoder_dir, _halves()[::-1]), **KW))
    unmasked = generate(sd, GenerationRequest("a cat", image_prompts=_ours(paths, encoder_dir), **KW))
    assert _diff(swapped.images[0], ref[0]) > 10 and _diff(unmasked.images[0], ref[0]) > 10
    from cldm.__main__ import main  # the same through the command line: one option group per adapter

    for i, (pic, mask) in enumerate(zip((_picture(0), _picture(1)), _halves())):
        Image.fromarray(pic).save(tmp_path / f"ip{i}.png")
        Image.fromarray(mask).save(tmp_path / f"mask{i}.png")
    args = ["generate", "--dtype", "fp32", "--base", str(tiny_dirs[0]), "--prompt", "a cat", "--steps", "4",
            "--cfg", "5", "--seed", "7", "--width", str(SIZE), "--height", str(SIZE), "--image-encoder", str(encoder_dir),
            "--ip-adapter", str(paths["plain"]), "--ip-image", str(tmp_path / "ip0.png"), "--ip-scale", str(SCALES[0]),
            "--ip-mask", str(tmp_path / "mask0.png"),
            "--ip-adapter", str(paths["plus"]), "--ip-image", str(tmp_path / "ip1.png"), "--ip-scale", str(SCALES[1]),
            "--ip-mask", str(tmp_path / "mask1.png"), "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    assert _diff(np.asarray(Image.open(tmp_path / "out.png")), ref[0]) <= PIXEL_TOL


def test_an_adapter_masked_out_everywhere_adds_nothing(ours, files):
    """Its attention output times an all-zero mask: the picture of the other adapter alone, to the bit."""
    _, paths, encoder_dir = files
    sd, _ = ours
    kw = dict(KW, steps=2)
    plain, plus = _ours(paths, encoder_dir, masks=(None, np.zeros((8, 8), bool)))
    both = generate(sd, GenerationRequest("a cat", image_prompts=[plain, plus], **kw)).images
    alone = generate(sd, GenerationRequest("a cat", image_prompt=plain, **kw)).images
    assert np.array_equal(both, alone)
    with_plus = generate(sd, GenerationRequest("a cat", image_prompts=[plain, _ours(paths, encoder_dir)[1]], **kw))
    assert _diff(with_plus.images[0], alone[0]) > 10  # unmasked, the second adapter does change the picture


def test_a_mask_of_a_wrong_shape_is_refused_with_what_to_give(ours, files):
    _, paths, encoder_dir = files
    sd, _ = ours
    steps = []
    colour = np.zeros((SIZE, SIZE, 3), np.uint8)
    prompts = _ours(paths, encoder_dir, masks=(None, colour))
    with pytest.raises(InputError, match=r"image_prompts\[1\]\.mask must be HxW.*got shape \(64, 64, 3\)"):
        generate(sd, GenerationRequest("a", image_prompts=prompts, **KW), callback=lambda i, n: steps.append(i))
    with pytest.raises(InputError, match=r"image_prompts\[0\]\.mask must be uint8.*float64"):
        generate(sd, GenerationRequest("a", image_prompts=_ours(paths, encoder_dir, masks=(np.ones((4, 4)), None)),
                                       **KW))  # fmt: skip
    assert steps == []


def test_an_adapter_of_another_family_in_the_list_is_refused_before_sampling(ours, files, tmp_path, tiny_dirs):
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.errors import CheckpointError
    from cldm.runtime.manager import ModelManager

    _, paths, encoder_dir = files
    sd, _ = ours
    ctx = 64  # an adapter made for a text context twice as wide (SD2's is 1024 to SD1.5's 768)
    state = {k: torch.zeros(v.shape[0], ctx) for k, v in adapter_state(sd.unet, "plain").items()
             if k.startswith("ip_adapter.")}  # fmt: skip
    state |= {"image_proj.proj.weight": torch.zeros(4 * ctx, ENC["projection_dim"]),
              "image_proj.proj.bias": torch.zeros(4 * ctx), "image_proj.norm.weight": torch.ones(ctx),
              "image_proj.norm.bias": torch.zeros(ctx)}  # fmt: skip
    torch.save(_nested(state), tmp_path / "sd2-ish.bin")
    good = _ours(paths, encoder_dir)[0]
    steps = []
    wrong = ImagePrompt(load_ip_adapter(tmp_path / "sd2-ish.bin"), (_picture(1),), good.encoder)
    with pytest.raises(InputError, match="image prompt 2: the IP-Adapter ip-adapter does not fit.*text context"):
        generate(sd, GenerationRequest("a", image_prompts=[good, wrong], **KW), callback=lambda i, n: steps.append(i))
    m = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    files_ = [ImagePrompt(str(paths["plain"]), (_picture(0),), str(encoder_dir)),
              ImagePrompt(str(tmp_path / "sd2-ish.bin"), (_picture(1),), str(encoder_dir))]  # fmt: skip
    with pytest.raises(CheckpointError, match="sd2-ish.bin does not fit the base model.*text context"):
        m.run(GenerationRequest("a", image_prompts=files_, **KW), callback=lambda i, n: steps.append(i))
    assert steps == []


def test_the_manager_keeps_a_requests_adapters_and_drops_the_others(files, tiny_dirs):
    from cldm.runtime.manager import ModelManager

    _, paths, encoder_dir = files
    m = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    kw = dict(KW, steps=2)
    both = [ImagePrompt(str(paths[k]), (_picture(i),), str(encoder_dir), s) for i, (k, s) in
            enumerate(zip(("plain", "plus"), SCALES))]  # fmt: skip
    first = m.run(GenerationRequest("a cat", image_prompts=both, **kw))
    again = m.run(GenerationRequest("a cat", image_prompt=both[0], image_prompts=both[1:], **kw))
    assert np.array_equal(first.images, again.images) and m.ip_loads == 2  # both kept, the same picture
    m.run(GenerationRequest("a cat", image_prompt=both[1], **kw))
    assert m.ip_loads == 2  # the plus one was kept
    m.run(GenerationRequest("a cat", image_prompt=both[0], **kw))
    assert m.ip_loads == 3  # the plain one had left with the request that did not name it


def test_the_app_runs_two_masked_slots_and_names_both(ours, files, tiny_dirs, tmp_path):
    """The Image prompt tab's slots as the handler reads them (`studio.generate` with two ImagePromptSettings): the
    picture of the same request made by the library, both adapters in the status line and the parameters; the
    tab's API names the second slot's fields with _2 and keeps the first slot's."""
    import shutil
    from dataclasses import replace

    from cldm.runtime.manager import ModelManager
    from studio import page
    from studio.forms import ImagePromptPanel
    from studio.service import Studio
    from studio.settings import ImagePromptSettings, Settings

    folder, paths, encoder_dir = files
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(paths["plain"], models / "ip-adapter_sd15.bin")
    shutil.copytree(encoder_dir, models / "image_encoder")
    studio = Studio(ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32"), str(models), str(tmp_path / "out"))
    left, right = _halves()
    slots = [ImagePromptSettings(_picture(0), "ip-adapter_sd15", 0.9, np.stack([left] * 3, -1)),
             ImagePromptSettings(_picture(1), "ip-adapter_sd15", 0.7, np.stack([right] * 3, -1))]  # fmt: skip
    s = Settings(prompt="a cat", width=SIZE, height=SIZE, steps=2, cfg=5.0, seed=3, randomize=False)
    _, status, pngs = studio.generate([], s, lambda *a, **k: None, slots)
    assert status.count("IP-Adapter: ip-adapter_sd15") == 2 and "in its region" in status
    text = Image.open(pngs[0]).text["parameters"]
    assert "IP-Adapter 0: " in text and "IP-Adapter 1: " in text
    prompts = [ImagePrompt(str(models / "ip-adapter_sd15.bin"), (_picture(i),), str(models / "image_encoder"), sc,
                           mask=m) for i, (sc, m) in enumerate(zip(SCALES, (left, right)))]  # fmt: skip
    request, _, _ = studio.request([], s, 3, lambda *a, **k: None, slots, family="SD1.5")
    lib = studio.manager.run(replace(request, image_prompts=prompts))  # the slots' prompts made by hand
    assert np.array_equal(np.asarray(Image.open(pngs[0])), lib.images[0])
    ids = {c["props"].get("elem_id") for c in page.build_app(studio).config["components"]}
    slot_ids = {f"image_prompt-ip-{w}" for w in ("image", "scale", "mask", "image-2", "scale-2", "mask-2")}
    assert slot_ids <= ids  # the first slot's ids as they were (the browser test uses them)
    first, second = (list(ImagePromptPanel(*"iasm", tag=t).named) for t in ("", "_2"))
    assert first == ["image_prompt", "ip_adapter", "ip_scale", "ip_mask"] and second[0] == "image_prompt_2"


def test_the_command_line_reads_one_group_per_adapter(tmp_path):
    import argparse

    from cldm import cli

    Image.fromarray(_picture(0)).save(tmp_path / "a.png")
    Image.fromarray(_halves()[0]).save(tmp_path / "m.png")
    p = argparse.ArgumentParser()
    cli.add_image_prompt_args(p)
    a, m = str(tmp_path / "a.png"), str(tmp_path / "m.png")
    args = ["--ip-image", a, "--ip-adapter", "A", "--image-encoder", "E", "--ip-adapter", "B", "--ip-image", a,
            "--ip-image", a, "--ip-scale", "0.5", "--ip-mask", m, "--ip-adapter", "C", "--image-encoder", "F",
            "--ip-image", a]  # fmt: skip
    prompts = cli.image_prompts_from_args(p.parse_args(args))
    # the picture before the first --ip-adapter is the first group's; B takes A's encoder, C its own
    assert [(x.adapter, x.encoder, x.scale, len(x.images)) for x in prompts] == [
        ("A", "E", 1.0, 1), ("B", "E", 0.5, 2), ("C", "F", 1.0, 1)]  # fmt: skip
    assert prompts[1].mask.shape == (40, 40) and prompts[0].mask is None
    with pytest.raises(InputError, match=r"image prompt 1 \(A\): an image prompt needs .*--ip-image FILE"):
        cli.image_prompts_from_args(p.parse_args(["--ip-adapter", "A", "--ip-adapter", "B", "--ip-image", a]))
    with pytest.raises(SystemExit):  # a group takes one scale
        p.parse_args(["--ip-adapter", "A", "--ip-scale", "1", "--ip-scale", "2"])
