"""A1111's unit controls in the running app: resize modes and pixel perfect in the hint, img2img on any tab,
outpainting, the hires fix, one seed per picture, the live preview stream, and PNG info's send-to-tab round trip."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import SETTINGS, SIZE, _extras, _unit


@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app[0], verbose=False)


@pytest.fixture()
def wide(tmp_path):
    """A 2:1 picture: red left quarter, white middle with a black square, blue right quarter."""
    img = np.full((SIZE, 2 * SIZE, 3), 255, np.uint8)
    img[:, : SIZE // 2] = (220, 20, 20)
    img[:, 3 * SIZE // 2 :] = (20, 20, 220)
    img[24:40, 56:72] = 0
    path = tmp_path / "wide.png"
    Image.fromarray(img).save(path)
    return str(path)


def _hint(client, path, resize, perfect=False, preprocessor="none"):
    from gradio_client import handle_file

    out = client.predict(*_unit(handle_file(path), preprocessor, (100, 200)), SIZE, SIZE, "Balanced", resize, perfect,
                         api_name="/canny_hint")  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB"))


def test_resize_modes_reach_the_hint(client, wide):
    crop, just, fill = (_hint(client, wide, m) for m in ("Crop and Resize", "Just Resize", "Resize and Fill"))
    assert crop.shape == just.shape == fill.shape == (SIZE, SIZE, 3)
    # crop keeps the centre (white with the black square), cut from the middle third of the wide picture
    assert crop[2, 2].tolist() == [255, 255, 255] and crop[SIZE // 2, SIZE // 2].tolist() == [0, 0, 0]
    # just resize squeezes all three bands in: red on the left, blue on the right
    assert just[SIZE // 2, 2].tolist()[0] > 200 and just[SIZE // 2, -3].tolist()[2] > 200
    # fill: the whole picture 64x32 in the middle, padded above and below with the border's median colour
    assert fill[SIZE // 2, 2].tolist()[0] > 200 and fill[SIZE // 2, -3].tolist()[2] > 200
    border = np.concatenate([fill[0], fill[-1]])
    assert (border == border[0]).all() and fill[SIZE // 4 - 2 :, :].shape[0] > 0
    # the resize mode left out (the parameters by name): the page's default, Crop and Resize
    from gradio_client import handle_file

    unit = _unit(handle_file(wide), "none", (100, 200))
    default = client.predict(*unit, SIZE, SIZE, control_mode="Balanced", pixel_perfect=False, api_name="/canny_hint")
    assert np.array_equal(np.asarray(Image.open(default).convert("RGB")), crop)


def test_pixel_perfect_sets_the_detection_resolution(client, wide):
    """Pixel perfect: canny runs at the extension's resolution (here 64 for crop, 32 for fill), not the slider's."""
    from cldm.pipeline.fit import pixel_perfect_resolution

    assert pixel_perfect_resolution(2 * SIZE, SIZE, SIZE, SIZE, "crop") == SIZE
    assert pixel_perfect_resolution(2 * SIZE, SIZE, SIZE, SIZE, "fill") == SIZE // 2
    from gradio_client import handle_file

    def canny(resolution, perfect):
        unit = _unit(handle_file(wide), "canny", (100, 200))
        unit[2] = resolution
        out = client.predict(*unit, SIZE, SIZE, "Balanced", "Crop and Resize", perfect, api_name="/canny_hint")
        return np.asarray(Image.open(out).convert("RGB"))

    assert np.array_equal(canny(512, True), canny(SIZE, False))  # the slider is ignored with pixel perfect
    assert not np.array_equal(canny(512, False), canny(SIZE, False))


def test_img2img_on_any_tab_hires_and_seed_per_picture(client, running_app, wide, tmp_path):
    from gradio_client import handle_file

    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    square = handle_file(str(tmp_path / "square.png"))
    args = [*_unit(square, "canny", (100, 200)), *SETTINGS.values()]
    _, status, files = client.predict(*args, *_extras(), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")
    txt2img = np.asarray(Image.open(files[0]))
    _, _, files = client.predict(*args, *_extras(init_image=handle_file(wide)), None, "ip-adapter_sd15", 0.6,
                                 None, api_name="/canny_generate")  # fmt: skip
    text = Image.open(files[0]).text["parameters"]
    assert "Denoising strength: 0.75" in text and not np.array_equal(np.asarray(Image.open(files[0])), txt2img)
    # hires: twice the size, the parameters say so
    _, status, files = client.predict(*args, *_extras(hires=True, hires_steps=2, hires_strength=0.5), None,
                                      "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")  # fmt: skip
    assert Image.open(files[0]).size == (2 * SIZE, 2 * SIZE)
    assert "Hires upscale: 2, Hires steps: 2" in Image.open(files[0]).text["parameters"]
    # a batch of 2 with one seed per picture: picture 2 is seed 8's picture alone, and says so
    batch = dict(SETTINGS, batch=2, sampler="euler_a")
    gallery, _, files = client.predict(*_unit(square, "canny", (100, 200)), *batch.values(), *_extras(), None,
                                       "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")  # fmt: skip
    assert [g["caption"] for g in gallery[1:]] == ["seed 7", "seed 8"]
    assert "Seed: 8," in Image.open(files[1]).text["parameters"]
    alone = dict(SETTINGS, seed=8, sampler="euler_a")
    _, _, one = client.predict(*_unit(square, "canny", (100, 200)), *alone.values(), *_extras(), None,
                               "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")  # fmt: skip
    assert np.abs(np.asarray(Image.open(one[0])).astype(int) - np.asarray(Image.open(files[1]))).max() <= 1
    # clip skip from the panel reaches the request (the tiny text encoder has layers to skip)
    _, _, files = client.predict(
        *args, *_extras(clip_skip=2), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate"
    )
    assert "Clip skip: 2" in Image.open(files[0]).text["parameters"]
    # over the limit with the hires pass counted
    with pytest.raises(Exception, match="hires"):
        big = dict(SETTINGS, width=1024, height=1024, steps=20)
        client.predict(*_unit(square, "canny", (100, 200)), *big.values(), *_extras(hires=True), None,
                       "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")  # fmt: skip


def test_outpaint_with_resize_and_fill(client, wide):
    """Inpaint tab, Resize and Fill on a 2:1 picture with nothing painted: the new border is painted (outpainting),
    the picture's own pixels are kept exactly where the mask is 0."""
    from gradio_client import handle_file

    from cldm.pipeline.fit import fit_rgb

    src = np.asarray(Image.open(wide).convert("RGB"))
    editor = {"background": handle_file(wide), "layers": [], "composite": handle_file(wide)}
    args = [editor, "none", SIZE, 1.0, 0.0, 1.0, *SETTINGS.values()]
    with pytest.raises(Exception, match="mask is empty"):
        client.predict(*args, *_extras(), None, "ip-adapter_sd15", 0.6, None, api_name="/inpaint_generate")
    _, _, files = client.predict(*args, *_extras(resize="Resize and Fill"), None, "ip-adapter_sd15", 0.6,
                                 None, api_name="/inpaint_generate")  # fmt: skip
    out = np.asarray(Image.open(files[0]))
    kept = fit_rgb(src, SIZE, SIZE, "fill", fill="edge")
    middle = slice(SIZE // 4, 3 * SIZE // 4)
    assert np.array_equal(out[middle], kept[middle])  # the picture itself, exactly
    assert not np.array_equal(out[: SIZE // 4], kept[: SIZE // 4])  # the border was painted
    assert "Resize mode: Resize and Fill" in Image.open(files[0]).text["parameters"]


def test_live_preview_streams_before_the_result(client, tmp_path):
    from gradio_client import handle_file

    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    settings = dict(SETTINGS, steps=6)
    job = client.submit(*_unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200)), *settings.values(),
                        *_extras(preview_every=2), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")  # fmt: skip
    final = job.result()
    outputs = job.outputs()
    previews = [o for o in outputs[:-1] if o[0] and o[0][0]["caption"] == "preview"]
    assert len(previews) == 2  # after steps 2 and 4 (none after the last)
    assert "seed 7" in final[1] and final[0][-1]["caption"] == "seed 7"


def _sent(values) -> list:
    """The values a send filled in (the others come back as Gradio's "no change")."""
    return [v for v in values if v is not None and not (isinstance(v, dict) and v.get("__type__") == "update")]


def test_png_info_round_trip(client, running_app, tmp_path):
    """A generated PNG's parameters back into the Canny tab's fields, and an A1111 PNG's."""
    from gradio_client import handle_file

    from cldm.io.images import save_png

    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    settings = dict(SETTINGS, steps=3, cfg=4.5, seed=321, sampler="euler_a", width=72, height=64)
    unit = _unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200))
    unit[3:6] = [0.7, 0.1, 0.9]
    _, _, files = client.predict(*unit, *settings.values(), *_extras("My prompt is more important", "Just Resize"),
                                 None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")  # fmt: skip
    summary, text, target = client.predict(handle_file(files[0]), api_name="/png_info_read")
    assert target == "canny" and summary["seed"] == 321 and summary["sampler"] == "euler_a"
    values = client.predict(handle_file(files[0]), "canny", api_name="/png_info_send")
    sent = _sent(values)
    expected_settings = ["a red square, best quality", "lowres", "euler_a", 3, 4.5, 321, False, 72, 64]
    assert sent[: len(expected_settings)] == expected_settings
    assert sent[len(expected_settings) :][:8] == ["canny", SIZE, 0.7, 0.1, 0.9, "My prompt is more important",
                                                  "Just Resize", False]  # fmt: skip
    # an A1111 PNG with two units goes to Multi
    a1111 = ("a castle\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, "
             "Seed: 99, Size: 512x768, Model: v1-5, ControlNet 0: \"Module: canny, Model: control_v11p_sd15_canny "
             "[d14c016b], Weight: 0.8, Resize Mode: Resize and Fill, Processor Res: 512, Threshold A: 100, Threshold B: "
             "200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: ControlNet is more "
             "important\", ControlNet 1: \"Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], Weight: "
             "0.5, Resize Mode: Crop and Resize, Processor Res: 384, Guidance Start: 0.2, Guidance End: 0.8, Pixel "
             "Perfect: False, Control Mode: Balanced\"")  # fmt: skip
    save_png(img, tmp_path / "a1111.png", a1111)
    _, _, target = client.predict(handle_file(str(tmp_path / "a1111.png")), api_name="/png_info_read")
    assert target == "multi"
    values = client.predict(handle_file(str(tmp_path / "a1111.png")), "multi", api_name="/png_info_send")
    sent = _sent(values)
    assert sent[:9] == ["a castle", "blurry", "dpmpp_2m_karras", 30, 6, 99, False, 512, 768]
    assert sent[9:19] == [True, "canny", "canny", 512, 0.8, 0.0, 1.0, "ControlNet is more important",
                          "Resize and Fill", True]  # fmt: skip
    assert sent[19:29] == [True, "depth", "depth_midas", 384, 0.5, 0.2, 0.8, "Balanced", "Crop and Resize", False]
    with pytest.raises(Exception, match="no generation parameters"):
        Image.fromarray(img).save(tmp_path / "plain.png")
        client.predict(handle_file(str(tmp_path / "plain.png")), "canny", api_name="/png_info_send")


@pytest.mark.parametrize(("parameters", "message"), [
    ("Steps: 1000, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512", "The PNG's Steps is 1000; the tab takes 1 to 150"),
    ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 5000x512", "The PNG's width is 5000; the tab takes 64 to 1024"),
])  # fmt: skip
def test_png_info_refuses_values_the_tab_cannot_hold(client, tmp_path, parameters, message):
    """Issue 27: "Send to" refuses a value outside the tab's range, by name, rather than sending the nearest one
    (a picture made with 1000 steps is not remade with 100)."""
    from gradio_client import handle_file

    from cldm.io.images import save_png

    save_png(np.zeros((SIZE, SIZE, 3), np.uint8), tmp_path / "big.png", f"a castle\n{parameters}")
    with pytest.raises(Exception, match=re.escape(message)):
        client.predict(handle_file(str(tmp_path / "big.png")), "canny", api_name="/png_info_send")


def test_lora_tag_in_the_prompt(client, tmp_path):
    """<lora:ink:0.8> in the prompt: the models folder's loras/ink.safetensors is merged for that request only."""
    from gradio_client import handle_file

    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    unit = _unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200))

    def run(prompt):
        settings = dict(SETTINGS, prompt=prompt)
        return client.predict(*unit, *settings.values(), *_extras(), None, "ip-adapter_sd15", 0.6,
                              None, api_name="/canny_generate")  # fmt: skip

    _, _, plain = run("a red square")
    _, status, tagged = run("a red square <lora:ink:0.8>")
    assert "LoRA: ink (0.8)" in status
    assert "a red square, best quality <lora:ink:0.8>" in Image.open(tagged[0]).text["parameters"]
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(tagged[0])))
    _, _, again = run("a red square")
    assert np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(again[0])))  # the base is back
    with pytest.raises(Exception, match=r"LoRA 'nowhere' not found.*loras/.*found: ink"):
        run("a red square <lora:nowhere>")


def test_vae_choice(client, tmp_path):
    from gradio_client import handle_file

    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    args = [*_unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200)), *SETTINGS.values()]
    _, _, plain = client.predict(*args, *_extras(), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")
    _, status, bright = client.predict(*args, *_extras(vae="bright.safetensors"), None, "ip-adapter_sd15", 0.6,
                                       None, api_name="/canny_generate")  # fmt: skip
    assert "VAE: bright" in status and "VAE: bright" in Image.open(bright[0]).text["parameters"]
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(bright[0])))
    with pytest.raises(Exception, match="VAE '../x' name|without folders"):
        client.predict(*args, *_extras(vae="../x"), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")


def test_base_model_choice(client, running_app, tmp_path):
    """The Base model list: the server's base and the models folder's checkpoints/; each Generate names its base."""
    from gradio_client import handle_file

    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    args = [*_unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200)), *SETTINGS.values(), *_extras(),
            None, "ip-adapter_sd15", 0.6]  # fmt: skip
    manager = running_app[1]
    start = Path(manager.base_path).name
    try:
        _, _, first = client.predict(*args, start, api_name="/canny_generate")
        _, status, other = client.predict(*args, "other.safetensors", api_name="/canny_generate")
        assert "Base: other.safetensors" in status
        assert "Model: other, ControlNet 0" in Image.open(other[0]).text["parameters"]  # A1111: no extension
        assert not np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(other[0])))
        with pytest.raises(Exception, match="Unknown base model"):
            client.predict(*args, "../etc/passwd", api_name="/canny_generate")
    finally:
        _, _, back = client.predict(*args, start, api_name="/canny_generate")  # the other tests' base
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(back[0])))


def test_refresh_model_lists_without_a_restart(client, running_app, tmp_path):
    """Files put into the models folder while the server runs: a base, a LoRA, a VAE and an embedding. Before
    Refresh the new base is unknown; after it, each can be used and the lists name them; removed files leave."""
    import shutil

    import torch
    from gradio_client import handle_file
    from safetensors.torch import save_file

    models, manager = running_app[3], running_app[1]
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    Image.fromarray(img).save(tmp_path / "square.png")
    args = [*_unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200)), *SETTINGS.values(), *_extras(),
            None, "ip-adapter_sd15", 0.6]  # fmt: skip
    start = Path(manager.base_path).name
    added = [models / "checkpoints" / "late.safetensors", models / "loras" / "late_ink.safetensors",
             models / "vae" / "late_vae.safetensors", models / "embeddings" / "lateword.safetensors"]  # fmt: skip
    try:
        with pytest.raises(Exception, match="Unknown base model 'late.safetensors'"):
            client.predict(*args, "late.safetensors", api_name="/canny_generate")
        shutil.copy(models / "checkpoints" / "other.safetensors", added[0])
        shutil.copy(models / "loras" / "ink.safetensors", added[1])
        shutil.copy(models / "vae" / "bright.safetensors", added[2])
        width = manager.sd.text.cfg.hidden_size
        save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(1))}, str(added[3]))
        bases, *lists = client.predict(api_name="/refresh_models")  # updates of every list on the page
        assert [c[0] for c in bases["choices"]] == [start, "late.safetensors", "other.safetensors"]
        lora_lists = [u for u in lists if ["late_ink", "late_ink"] in u["choices"]]
        vae_lists = [u for u in lists if ["late_vae.safetensors", "late_vae.safetensors"] in u["choices"]]
        control_lists = [u for u in lists if u["choices"][0][0] == "The condition's own"]  # each unit's Model list
        assert min(len(lora_lists), len(vae_lists)) >= 10  # all tabs
        assert len(lists) == len(lora_lists) + len(vae_lists) + len(control_lists)
        assert all(u["visible"] for u in lora_lists)
        _, status, pics = client.predict(*args, "late.safetensors", api_name="/canny_generate")
        assert "Base: late.safetensors" in status
        settings = dict(SETTINGS, prompt="a lateword square <lora:late_ink:0.5>")
        _, status, pics = client.predict(*_unit(handle_file(str(tmp_path / "square.png")), "canny", (100, 200)),
                                         *settings.values(), *_extras(vae="late_vae.safetensors"), None,
                                         "ip-adapter_sd15", 0.6, start, api_name="/canny_generate")  # fmt: skip
        text = Image.open(pics[0]).text["parameters"]
        assert "<lora:late_ink:0.5>" in text and 'Lora hashes: "late_ink: ' in text and "VAE: late_vae" in text
        assert 'TI hashes: "lateword: ' in text
    finally:
        for p in added:
            p.unlink(missing_ok=True)
        client.predict(api_name="/refresh_models")
        client.predict(*args, start, api_name="/canny_generate")  # the other tests' base
    assert "lateword" not in manager.sd.text.embeddings  # a removed file leaves with the next Refresh
    with pytest.raises(Exception, match="Unknown base model"):
        client.predict(*args, "late.safetensors", api_name="/canny_generate")


def test_refresh_lists_what_the_folder_holds(tiny_dirs, tmp_path):
    from cldm.runtime.manager import ModelManager
    from studio import service

    (tmp_path / "loras" / "sub").mkdir(parents=True)
    (tmp_path / "loras" / "sub" / "a.safetensors").write_bytes(b"")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "v.safetensors").write_bytes(b"")
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "bad.pt").write_bytes(b"not a checkpoint")
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    manager.load_embeddings(tmp_path / "embeddings")
    studio = service.Studio(manager, str(tmp_path), str(tmp_path / "out"))
    lists = studio.refresh_models()
    assert lists.loras == ["a"] and lists.vaes == ["v.safetensors"] and lists.bases == [Path(str(tiny_dirs[0])).name]
    assert lists.embeddings == 0 and "bad" in lists.refused_embeddings
    assert "1 base models, 0 control models, 1 LoRAs, 1 VAEs, 0 embeddings (left out: bad:" in lists.summary


def test_image_prompt_tab_names_its_base_and_takes_img2img(client, running_app, tmp_path):
    """The Image prompt tab's Generate sends what every tab sends: the img2img / hires panel and the base model."""
    from gradio_client import handle_file
    from test_app import NO_SLOT_2, PASS

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "style.png")
    style = handle_file(str(tmp_path / "style.png"))
    settings = list(SETTINGS.values())
    start = Path(running_app[1].base_path).name
    head = [style, "ip-adapter_sd15", 0.8, *NO_SLOT_2, None, "reference_only", 0.5, 1.0, *settings]
    try:
        _, status, pics = client.predict(*head, *dict(PASS, init_image=style).values(), "other.safetensors",
                                         api_name="/image_prompt_generate")  # fmt: skip
        text = Image.open(pics[0]).text["parameters"]
        assert "Base: other.safetensors" in status and "Model: other" in text and "Denoising strength" in text
        _, _, hires = client.predict(*head, *dict(PASS, hires=True, hires_scale=1.5).values(), start,
                                     api_name="/image_prompt_generate")  # fmt: skip
        assert Image.open(hires[0]).size == (96, 96)
    finally:
        client.predict(*head, *PASS.values(), start, api_name="/image_prompt_generate")  # the other tests' base


def test_every_request_runs_on_the_base_it_names_whatever_another_client_loaded(running_app, tmp_path):
    """Issue 24: client X works on `other.safetensors` while client Y names no base (a null base: the page's
    first base) and the Batch tab (its base from the page). Run at once through the queue, every picture is
    the one it is alone, byte for byte, and says its base; before, Y's pictures came out on X's base."""
    import threading
    import zipfile

    from gradio_client import Client, handle_file

    url, manager = running_app[0], running_app[1]
    start = Path(manager.base_path).name
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 20:44] = 255
    Image.fromarray(img).save(tmp_path / "shape.png")
    picture = handle_file(str(tmp_path / "shape.png"))
    unit = _unit(picture, "canny", (100, 200))
    on_other = [*unit, *SETTINGS.values(), *_extras(), None, "ip-adapter_sd15", 0.6, "other.safetensors"]
    null = [*unit, *SETTINGS.values(), *_extras(), None, "ip-adapter_sd15", 0.6, None]  # no base named: the first
    batch = [[picture], "canny", "none", "a {stem} shape", "", 100, 2, 5.0, "ddim", SIZE, SIZE, 1.0, 0.75]

    def pixels(path) -> bytes:
        return np.asarray(Image.open(path)).tobytes()

    def batch_pixels(archive) -> bytes:
        with zipfile.ZipFile(archive) as z:
            png = z.read("shape.png")
        import io

        return np.asarray(Image.open(io.BytesIO(png))).tobytes()

    calls = {
        "x": lambda c: pixels(c.predict(*on_other, api_name="/canny_generate")[2][0]),
        "y_null": lambda c: pixels(c.predict(*null, api_name="/canny_generate")[2][0]),
        "y_batch": lambda c: batch_pixels(c.predict(*batch, api_name="/batch_run")[2][0]),
        "y_batch_other": lambda c: batch_pixels(c.predict(*batch, "other.safetensors", api_name="/batch_run")[2][0]),
    }
    x, y = Client(url, verbose=False), Client(url, verbose=False)
    try:
        calls["x"](x)  # X loads the other base: what Y's next requests find loaded
        serial = {k: calls[k](y if k.startswith("y") else x) for k in ("y_null", "x", "y_batch", "x", "y_batch_other")}
        assert serial["y_null"] != serial["x"] and serial["y_batch"] != serial["y_batch_other"]  # the bases differ
        text = Image.open(y.predict(*null, api_name="/canny_generate")[2][0]).text["parameters"]
        assert f"Model: {Path(start).stem}" in text or f"Model: {start}" in text
        for order in (["x", "y_null", "y_batch", "y_batch_other"], ["y_batch", "x", "y_batch_other", "y_null"]):
            out: dict[str, bytes] = {}  # interleaved through the queue (4 at once), in two orders

            def call(k: str, out: dict = out) -> None:
                out[k] = calls[k](y if k.startswith("y") else x)

            threads = [threading.Thread(target=call, args=(k,)) for k in order]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert out == serial
    finally:
        y.predict(*[*unit, *SETTINGS.values(), *_extras(), None, "ip-adapter_sd15", 0.6, start],
                  api_name="/canny_generate")  # the other tests' base  # fmt: skip
