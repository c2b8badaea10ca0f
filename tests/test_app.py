"""The real app on 127.0.0.1 with tiny weights in the real formats, driven through gradio_client."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

SIZE = 64
SETTINGS = dict(prompt="a red square", added_prompt="best quality", negative_prompt="lowres", batch=1, width=SIZE,
                height=SIZE, steps=2, cfg=5.0, sampler="ddim", seed=7, randomize=False, denoise=0.75)  # fmt: skip


@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app[0], verbose=False)


@pytest.fixture()
def square(tmp_path):
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    img[16:48, 16:48] = (200, 30, 30)
    path = tmp_path / "square.png"
    Image.fromarray(img).save(path)
    return str(path)


NO_SLOT_2 = [None, None, "ip-adapter_sd15", 0.6, None]  # the Image prompt tab: slot 1 unmasked, slot 2 empty
PASS = dict(init_image=None, mask_blur=0.0, inpaint_mode="Only the painted area (inpaint_only)", hires=False,
            hires_scale=2.0, hires_steps=0, hires_strength=0.7, hires_upscaler="Latent", seed_per_picture=True,
            preview_every=0, clip_skip=0, vae="From the checkpoint")  # fmt: skip


def _extras(mode="Balanced", resize="Crop and Resize", perfect=False, **changes):
    """What `/<tab>_generate` takes after the unit and settings: the unit's options, then the img2img / hires /
    preview panel (before the image prompt)."""
    return [mode, resize, perfect, *dict(PASS, **changes).values()]


def _rest(**changes) -> list:
    """What `/<tab>_generate` takes after the unit and the settings, with the page's plain choices: Balanced, Crop and
    Resize, no pixel perfect, the img2img / hires / preview panel (`PASS`), no image prompt, the page's first base."""
    return [*_extras(**changes), None, "ip-adapter_sd15", 0.6, None]


HINT = ["Balanced", "Crop and Resize", False]  # what `/<tab>_hint` takes after the unit and the size
MULTI_REST = [*HINT * 3, *PASS.values(), None, "ip-adapter_sd15", 0.6, None]  # `/multi_generate` after the settings


def _unit(image, preprocessor, params=()):
    # image, preprocessor, resolution, scale, start, end, then the tab's preprocessor sliders
    return [image, preprocessor, SIZE, 1.0, 0.0, 1.0, *params]


def _multi(enabled, key, image, preprocessor, scale=1.0, start=0.0, end=1.0, resolution=SIZE, **params):
    """One Multi unit: on/off, condition, then the same panel as a tab (every preprocessor's sliders, table order)."""
    import annotators
    from cldm.hints.conditions import CONDITIONS

    names = dict.fromkeys(a for c in CONDITIONS if not c.inpaint for a in c.preprocessors)
    sliders = [params.get(p.name, p.default) if n == preprocessor else p.default
               for n in names for p in annotators.ANNOTATORS[n].params]  # fmt: skip
    return [enabled, key, image, preprocessor, resolution, scale, start, end, *sliders]


def test_canny_preview_and_generate(client, square, running_app):
    from gradio_client import handle_file

    hint = client.predict(*_unit(handle_file(square), "canny", (100, 200)), SIZE, SIZE, *HINT, api_name="/canny_hint")
    edges = np.asarray(Image.open(hint))
    assert edges.shape[:2] == (SIZE, SIZE) and edges.max() == 255 and edges.mean() < 60  # edges only
    gallery, status, files = client.predict(
        *_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values(), *_rest(), api_name="/canny_generate"
    )
    assert len(gallery) == 2 and len(files) == 1  # the hint, then one picture
    png = Image.open(files[0])
    assert png.size == (SIZE, SIZE) and "a red square, best quality" in png.text["parameters"]
    assert "control_v11p_sd15_canny" in status and "seed 7" in status
    assert running_app[1].base_loads == 1


def test_scribble_canvas_shuffle_and_multi(client, square, tmp_path, running_app):
    from gradio_client import handle_file

    sketch = np.full((SIZE, SIZE, 3), 255, np.uint8)
    sketch[20:44, 30:34] = 0  # a black stroke on the white canvas
    Image.fromarray(sketch).save(tmp_path / "sketch.png")
    canvas = {
        "background": handle_file(str(tmp_path / "sketch.png")),
        "layers": [],
        "composite": handle_file(str(tmp_path / "sketch.png")),
    }
    hint = np.asarray(
        Image.open(client.predict(*_unit(canvas, "scribble_sketch"), SIZE, SIZE, *HINT, api_name="/scribble_hint"))
    )
    assert hint[30, 31].max() == 255 and hint[5, 5].max() == 0  # white stroke on black
    _, status, _ = client.predict(
        *_unit(canvas, "scribble_sketch"), *SETTINGS.values(), *_rest(), api_name="/scribble_generate"
    )
    assert "scribble" in status
    _, status, _ = client.predict(
        *_unit(handle_file(square), "shuffle", (3,)), *SETTINGS.values(), *_rest(), api_name="/shuffle_generate"
    )
    assert "shuffle" in status
    units = [*_multi(True, "canny", handle_file(square), "canny"),
             *_multi(True, "scribble", handle_file(str(tmp_path / "sketch.png")), "none", 0.5, 0.2, 0.8),
             *_multi(False, "depth", None, "depth_midas")]  # fmt: skip
    gallery, status, files = client.predict(*units, *SETTINGS.values(), *MULTI_REST, api_name="/multi_generate")
    assert len(gallery) == 3 and "canny" in status and "scribble" in status
    assert running_app[1].base_loads == 1


def test_multi_units_have_their_own_preprocessor_sliders_and_resolution(client, tmp_path):
    """Each Multi unit's preprocessor sliders and resolution reach its preprocessor (they were fixed defaults)."""
    from gradio_client import handle_file

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 6, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)  # faint noise...
    img[16:48, 16:48] = (200, 30, 30)  # ...around a strong square
    Image.fromarray(img).save(tmp_path / "noisy.png")
    off = _multi(False, "depth", None, "depth_midas")

    def hint(**canny):
        units = [*_multi(True, "canny", handle_file(str(tmp_path / "noisy.png")), "canny", **canny), *off, *off]
        gallery, _, _ = client.predict(*units, *SETTINGS.values(), *MULTI_REST, api_name="/multi_generate")
        return np.asarray(Image.open(gallery[0]["image"]))[..., 0] > 127  # the first gallery item is the hint

    default = hint()
    assert default.shape == (SIZE, SIZE) and 0 < default.mean() < 0.2  # the square's outline only
    assert hint(low_threshold=5, high_threshold=10).mean() > 2 * default.mean()  # the noise's edges too
    assert not np.array_equal(hint(resolution=256), default)  # detected at 256 px, then resized: other edges
    with pytest.raises(Exception, match="Canny high threshold: 999 is out of range; give a value from 1 to 255"):
        client.predict(*_multi(True, "canny", handle_file(str(tmp_path / "noisy.png")), "canny", high_threshold=999),
                       *off, *off, *SETTINGS.values(), *MULTI_REST, api_name="/multi_generate")  # fmt: skip


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 1000, "Steps: 1000 is out of range; give a value from 1 to 150"),
    ("width", 5000, "Width: 5000 is out of range; give a value from 64 to 1024"),
    ("cfg", 0, "Guidance scale: 0 is out of range; give a value from 0.1 to 30"),
])  # fmt: skip
def test_out_of_range_values_are_refused_by_name_never_clamped(client, square, field, value, message):
    """Issue 27: a value outside a field's range is refused with the field and its range, not made into the nearest
    value the field takes (nothing runs, nothing is saved)."""
    from gradio_client import handle_file

    with pytest.raises(Exception, match=re.escape(message)):
        client.predict(*_unit(handle_file(square), "canny", (100, 200)), *dict(SETTINGS, **{field: value}).values(),
                       *_rest(), api_name="/canny_generate")  # fmt: skip


def test_the_batch_tab_takes_the_steps_the_tabs_take(client):
    """One steps limit in every tab and the Batch tab (it allowed 150 while the tabs allowed 100)."""
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]

    def steps_range(endpoint):
        (param,) = [p for p in api[endpoint]["parameters"] if p["parameter_name"] == "steps"]
        return param["type"]["description"]

    ranges = {steps_range(e) for e in ("/batch_run", "/canny_generate", "/multi_generate", "/image_prompt_generate")}
    assert ranges == {"numeric value between 1 and 150"}


def test_bad_inputs_get_clear_messages_and_the_server_keeps_going(client, square, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(Exception, match="Cannot read the image"):
        client.predict(
            *_unit(handle_file(str(tmp_path / "broken.png")), "canny", (100, 200)),
            SIZE,
            SIZE,
            *HINT,
            api_name="/canny_hint",
        )
    with pytest.raises(Exception, match="(?i)draw something|empty"):
        blank = np.full((SIZE, SIZE, 3), 255, np.uint8)
        Image.fromarray(blank).save(tmp_path / "blank.png")
        canvas = {
            "background": handle_file(str(tmp_path / "blank.png")),
            "layers": [],
            "composite": handle_file(str(tmp_path / "blank.png")),
        }
        client.predict(*_unit(canvas, "scribble_sketch"), SIZE, SIZE, *HINT, api_name="/scribble_hint")
    with pytest.raises(Exception, match="(?i)not on this machine|put them in"):
        client.predict(
            *_unit(handle_file(square), "none", (0.1, 0.1)), *SETTINGS.values(), *_rest(), api_name="/mlsd_generate"
        )
    bad = dict(SETTINGS, steps=0)
    with pytest.raises(Exception, match="(?i)steps|minimum"):
        client.predict(
            *_unit(handle_file(square), "canny", (100, 200)), *bad.values(), *_rest(), api_name="/canny_generate"
        )
    # and the next request works
    _, status, _ = client.predict(
        *_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values(), *_rest(), api_name="/canny_generate"
    )
    assert "seed 7" in status


def test_concurrent_requests_give_the_sequential_images(client, square, tmp_path, running_app):
    """Three conditions at once through the queue give exactly what each gives alone; the base loads once."""
    from gradio_client import handle_file

    sketch = np.full((SIZE, SIZE, 3), 255, np.uint8)
    sketch[10:50, 20:26] = 0
    Image.fromarray(sketch).save(tmp_path / "sk.png")
    canvas = {
        "background": handle_file(str(tmp_path / "sk.png")),
        "layers": [],
        "composite": handle_file(str(tmp_path / "sk.png")),
    }
    requests = [
        ("/canny_generate", _unit(handle_file(square), "canny", (50, 150)), 11),
        ("/scribble_generate", _unit(canvas, "scribble_sketch"), 12),
        ("/shuffle_generate", _unit(handle_file(square), "shuffle", (5,)), 13),
        # the same hint and seed through two ControlNets with different weights
        ("/canny_generate", _unit(handle_file(square), "none", (100, 200)), 14),
        (
            "/scribble_generate",
            _unit({"background": handle_file(square), "layers": [], "composite": handle_file(square)}, "none"),
            14,
        ),
    ]

    def args(unit, seed):
        return [*unit, *dict(SETTINGS, seed=seed, batch=2).values(), *_rest()]

    alone = [client.predict(*args(u, seed), api_name=api)[2] for api, u, seed in requests]
    jobs = [client.submit(*args(u, seed), api_name=api) for api, u, seed in requests]
    together = [job.result(timeout=300)[2] for job in jobs]
    for a, b in zip(alone, together):
        assert len(a) == len(b) == 2
        for fa, fb in zip(a, b):
            assert np.array_equal(np.asarray(Image.open(fa)), np.asarray(Image.open(fb)))
    pictures = [np.asarray(Image.open(f[0])) for f in alone]
    assert not np.array_equal(pictures[0], pictures[1])  # different conditions, different pictures
    assert not np.array_equal(pictures[3], pictures[4])  # different ControlNet weights, different pictures
    assert running_app[1].base_loads == 1


def test_awkward_and_huge_uploads(client, tmp_path):
    from gradio_client import handle_file

    rgb = Image.new("RGB", (SIZE, SIZE), (20, 40, 200))
    rgb.paste((250, 250, 250), (16, 16, 48, 48))
    files = {
        "16bit.png": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
        "cmyk.jpg": rgb.convert("CMYK"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.gif": rgb.convert("P"),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
    frames = [rgb, Image.new("RGB", (SIZE, SIZE), "black")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    for name in [*files, "anim.gif"]:
        hint = np.asarray(
            Image.open(
                client.predict(
                    *_unit(handle_file(str(tmp_path / name)), "canny", (100, 200)),
                    SIZE,
                    SIZE,
                    *HINT,
                    api_name="/canny_hint",
                )
            )
        )
        assert hint.shape[:2] == (SIZE, SIZE) and hint.max() == 255, name  # the square's edges were found
    Image.new("L", (9000, 5000)).save(tmp_path / "huge.png", compress_level=1)
    with pytest.raises(Exception, match="(?i)too large"):
        client.predict(
            *_unit(handle_file(str(tmp_path / "huge.png")), "canny", (100, 200)),
            SIZE,
            SIZE,
            *HINT,
            api_name="/canny_hint",
        )
    with pytest.raises(Exception, match="(?i)strength|maximum|control scale"):
        client.predict(
            handle_file(str(tmp_path / "rgba.png")),
            "canny",
            SIZE,
            5.0,
            0.0,
            1.0,
            100,
            200,
            *SETTINGS.values(),
            *_rest(),
            api_name="/canny_generate",
        )


def test_inpaint_keeps_the_unpainted_area_and_tile_is_img2img(client, tmp_path):
    from gradio_client import handle_file

    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "pic.png")
    layer = np.zeros((SIZE, SIZE, 4), np.uint8)
    layer[8:32, 8:32] = (255, 255, 255, 255)  # the painted area
    Image.fromarray(layer).save(tmp_path / "layer.png")
    editor = {"background": handle_file(str(tmp_path / "pic.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": handle_file(str(tmp_path / "pic.png"))}  # fmt: skip
    settings = dict(SETTINGS, denoise=1.0)
    _, status, files = client.predict(
        editor, "none", SIZE, 1.0, 0.0, 1.0, *settings.values(), *_rest(), api_name="/inpaint_generate"
    )
    out = np.asarray(Image.open(files[0]))
    painted = layer[..., 3] > 0
    assert np.array_equal(out[~painted], picture[~painted])
    assert np.abs(out[painted].astype(int) - picture[painted].astype(int)).mean() > 10
    empty = dict(editor, layers=[])
    with pytest.raises(Exception, match="mask is empty"):
        client.predict(empty, "none", SIZE, 1.0, 0.0, 1.0, *settings.values(), *_rest(), api_name="/inpaint_generate")
    _, status, files = client.predict(handle_file(str(tmp_path / "pic.png")), "none", SIZE, 1.0, 0.0, 1.0,
                                      *dict(SETTINGS, denoise=0.5).values(), *_rest(),
                                      api_name="/tile_generate")  # fmt: skip
    tile = np.asarray(Image.open(files[0]))
    assert "Denoising strength: 0.5" in Image.open(files[0]).text["parameters"]
    assert tile.shape == (SIZE, SIZE, 3) and "tile" in status


def test_a_controlnet_of_another_family_is_refused_with_both_shapes(client, square, running_app):
    """models/control_v11p_sd15_lineart.safetensors is another family's ControlNet: refused at load, named, not
    cached; the next request runs."""
    from gradio_client import handle_file

    import annotators
    from cldm.hints.conditions import BY_KEY

    params = [p.default for a in BY_KEY["lineart"].preprocessors for p in annotators.ANNOTATORS[a].params]
    loads = running_app[1].controlnet_loads
    with pytest.raises(Exception, match=r"does not fit the base model.*block widths.*text context.*block widths"):
        client.predict(
            *_unit(handle_file(square), "invert", params), *SETTINGS.values(), *_rest(), api_name="/lineart_generate"
        )
    assert running_app[1].controlnet_loads == loads  # refused, not cached
    _, status, _ = client.predict(*_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values(), *_rest(),
                                  api_name="/canny_generate")  # fmt: skip
    assert "seed 7" in status


def test_image_prompt_accordion_and_tab(client, square, tmp_path):
    """The Image prompt accordion on a tab, the Image prompt tab (IP-Adapter, reference, both), clear errors."""
    from gradio_client import handle_file

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "style.png")
    style = handle_file(str(tmp_path / "style.png"))
    args = [*_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values()]
    plain = client.predict(*args, *_rest(), api_name="/canny_generate")  # no image prompt
    with_ip = client.predict(*args, *_extras(), style, "ip-adapter_sd15", 1.0, None, api_name="/canny_generate")
    assert "IP-Adapter: ip-adapter_sd15 (1)" in with_ip[1]
    a, b = (np.asarray(Image.open(r[2][0])) for r in (plain, with_ip))
    assert not np.array_equal(a, b)
    assert 'IP-Adapter: "Model: ip-adapter_sd15, Weight: 1.0' in Image.open(with_ip[2][0]).text["parameters"]
    settings = list(SETTINGS.values())
    # the Image prompt tab: IP-Adapter only, reference only, both; no ControlNet
    ip_only = client.predict(style, "ip-adapter_sd15", 0.8, *NO_SLOT_2, None, "reference_only", 0.5, 1.0, *settings,
                             *PASS.values(), None, api_name="/image_prompt_generate")  # fmt: skip
    assert "ControlNet: none | IP-Adapter" in ip_only[1] and len(ip_only[2]) == 1
    ref_only = client.predict(None, "ip-adapter_sd15", 0.8, *NO_SLOT_2, style, "reference_adain+attn", 0.5, 1.0, *settings,
                              *PASS.values(), None, api_name="/image_prompt_generate")  # fmt: skip
    assert "reference: adain+attn" in ref_only[1]
    both = client.predict(style, "ip-adapter_sd15", 0.8, *NO_SLOT_2, style, "reference_only", 1.0, 1.0, *settings,
                          *PASS.values(), None, api_name="/image_prompt_generate")  # fmt: skip
    assert "IP-Adapter" in both[1] and "reference: only" in both[1]
    with pytest.raises(Exception, match="Give a picture"):
        client.predict(None, "ip-adapter_sd15", 0.8, *NO_SLOT_2, None, "reference_only", 0.5, 1.0, *settings,
                       *PASS.values(), None, api_name="/image_prompt_generate")  # fmt: skip
    with pytest.raises(
        Exception, match=r"ip-adapter-plus_sd15.*not on this machine.*ip-adapter-plus_sd15\.safetensors"
    ):
        client.predict(*args, *_extras(), style, "ip-adapter-plus_sd15", 1.0, None, api_name="/canny_generate")
    with pytest.raises(Exception, match="is not a reference preprocessor"):
        client.predict(
            None,
            "ip-adapter_sd15",
            0.8,
            *NO_SLOT_2,
            style,
            "<i>x</i>",
            0.5,
            1.0,
            *settings,
            *PASS.values(),
            None,
            api_name="/image_prompt_generate",
        )


def test_control_mode_per_unit(client, square):
    """Each unit's Control mode radio reaches its ControlNet (A1111's three modes), in a tab and in Multi."""
    from gradio_client import handle_file

    args = [*_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values()]
    pics = {}
    for mode in ("Balanced", "My prompt is more important", "ControlNet is more important"):
        _, status, files = client.predict(
            *args, *_extras(mode), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate"
        )
        pics[mode] = np.asarray(Image.open(files[0]))
        text = Image.open(files[0]).text["parameters"]
        assert (f"Control Mode: {mode}" in text) == (mode != "Balanced")
    assert len({p.tobytes() for p in pics.values()}) == 3  # three modes, three pictures
    # by name, the control mode left out: the page's default, Balanced
    plain = client.predict(*args, resize_mode="Crop and Resize", pixel_perfect=False, **PASS, image_prompt=None,
                           api_name="/canny_generate")[2][0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(plain)), pics["Balanced"])
    with pytest.raises(Exception, match="Control mode"):
        client.predict(*args, *_extras("Guess"), None, "ip-adapter_sd15", 0.6, None, api_name="/canny_generate")
    off = _multi(False, "depth", None, "depth_midas")
    units = [*_multi(True, "canny", handle_file(square), "canny"), *off, *off]
    options = ["ControlNet is more important", "Crop and Resize", False] + ["Balanced", "Crop and Resize", False] * 2
    _, _, files = client.predict(*units, *SETTINGS.values(), *options, *PASS.values(), None, "ip-adapter_sd15", 0.6,
                                 None, api_name="/multi_generate")  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(files[0])), pics["ControlNet is more important"])


@pytest.mark.parametrize("preview_every", [0, 5])
def test_stop_ends_the_generation_at_a_step_and_frees_the_model(client, square, running_app, preview_every):
    """Stop during a long generation, with and without live previews: it ends at the next step with nothing saved,
    quietly (a status line, not an error), and the next request runs (the endpoint samples in a worker thread and
    streams the previews)."""
    import time

    from gradio_client import handle_file
    from waits import wait_for_sampling_step

    out_dir = running_app[2]
    before = set(out_dir.glob("*.png"))
    long = dict(SETTINGS, steps=100, batch=4, width=128, height=128)
    args = [*_unit(handle_file(square), "canny", (100, 200)), *long.values(), *_rest(preview_every=preview_every)]
    job = client.submit(*args, api_name="/canny_generate")
    wait_for_sampling_step(job, 1)  # Stop lands inside the sampling loop
    t_stop = time.time()
    client.predict(api_name="/canny_stop")
    _, status, files = job.result(timeout=120)
    assert re.fullmatch(r"Stopped (at step \d+ of 100|before sampling); nothing saved\.", status), status
    assert not files
    assert time.time() - t_stop < 30  # at the next step, not at the end
    assert set(out_dir.glob("*.png")) == before
    _, status, files = client.predict(*_unit(handle_file(square), "canny", (100, 200)), *SETTINGS.values(), *_rest(),
                                      api_name="/canny_generate")  # fmt: skip
    assert "seed 7" in status and len(files) == 1


def test_stop_pressed_while_the_generate_waits_in_the_queue_is_not_lost(client, square, running_app):
    """Issue 24: a Stop sent after Generate but before its handler ran (here: while it waits in the queue behind
    four others) stops it; before, Stop answered "Nothing is running" and the generation ran to its end. A Stop
    pressed before a Generate was sent does not stop that Generate."""
    import time

    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    endpoint = "/canny_generate"

    def args(settings: dict) -> list:
        return [*_unit(handle_file(square), "canny", (100, 200)), *settings.values(), *_rest()]

    def wait(job, codes) -> None:
        t0 = time.time()
        while job.status().code not in codes and time.time() - t0 < 60:
            time.sleep(0.01)

    url, manager = running_app[0], running_app[1]
    others = Client(url, verbose=False)
    with manager.lock:  # the four running requests wait for the model: the fifth waits in the queue
        blockers = [others.submit(*args(SETTINGS), api_name=endpoint) for _ in range(4)]
        for b in blockers:
            wait(b, (Status.PROCESSING, Status.PROGRESS))
        job = client.submit(*args(dict(SETTINGS, steps=100, batch=4)), api_name=endpoint)
        wait(job, (Status.IN_QUEUE,))
        time.sleep(0.2)
        assert job.status().code == Status.IN_QUEUE
        client.predict(api_name="/canny_stop")
    _, status, files = job.result(timeout=120)
    assert status == "Stopped before it started; nothing saved." and not files
    assert all(len(b.result(timeout=120)[2]) == 1 for b in blockers)  # the other client's requests are not stopped
    _, status, files = client.predict(*args(SETTINGS), api_name=endpoint)[-3:]  # the Stop before it: no effect
    assert "seed 7" in status and len(files) == 1


def test_each_tab_has_one_labelled_endpoint_set(client):
    """The API lists, per tab, exactly its generate / hint / stop endpoints (and the Batch and PNG info ones), every
    parameter named and labelled, and none of the older endpoints or the hidden guess-mode box."""
    from cldm.hints.conditions import CONDITIONS

    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    expected = {f"/{c.key}_{kind}" for c in CONDITIONS for kind in ("generate", "hint", "stop")}
    expected |= {"/multi_generate", "/multi_stop", "/image_prompt_generate", "/image_prompt_stop", "/batch_run",
                 "/batch_stop", "/png_info_read", "/png_info_send", "/refresh_models"}  # fmt: skip
    assert set(api) == expected
    assert not [name for name in api if name.endswith(("_run", "_preview")) and name != "/batch_run"]
    for name, endpoint in api.items():
        names = [p["parameter_name"] for p in endpoint["parameters"]]
        assert len(set(names)) == len(names), name
        for p in endpoint["parameters"]:
            assert p["label"] and not p["parameter_name"].startswith("param_"), (name, p)
        assert "guess_mode" not in names, name
    canny = [p["parameter_name"] for p in api["/canny_generate"]["parameters"]]
    extras = ["eta", "cfg_rescale", "freeu", "pag_scale", "pag_layers"]  # the guidance extras, optional, last
    assert canny[:8] == ["image", "preprocessor", "resolution", "scale", "start", "end", "canny_low_threshold",
                         "canny_high_threshold"] and canny[-8:] == ["base", "control_model", "region", *extras]  # fmt: skip
    hint = [p["parameter_name"] for p in api["/canny_hint"]["parameters"]]
    assert hint[-5:] == ["width", "height", "control_mode", "resize_mode", "pixel_perfect"]
    multi = [p["parameter_name"] for p in api["/multi_generate"]["parameters"]]
    assert {"enabled_1", "image_2", "control_mode_3", "prompt", "base"} <= set(multi)
    assert [p["parameter_name"] for p in api["/image_prompt_generate"]["parameters"]][-6:] == ["base", *extras]
    assert [p["parameter_name"] for p in api["/batch_run"]["parameters"]][-1] == "base"
    assert all(api[f"/{c.key}_generate"]["description"] for c in CONDITIONS)
