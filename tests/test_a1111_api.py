"""The A1111 API beside the app (studio/a1111): its routes through starlette's TestClient behind the same gate as
the page, and (integration) the registry's `webuiapi` client against the running app on the demo model, each
picture equal to the same request made through the app's own Gradio endpoints."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cldm.errors import Stopped
from studio.service import Limits, Studio

USERS = {"ana": "s3cret"}


def _fake_studio(tmp_path, limits: Limits | None = None) -> Studio:
    """A Studio whose model is never run: for the routes that read lists, settings and pictures only."""
    family = SimpleNamespace(family=SimpleNamespace(name="SD1.5"))
    manager = SimpleNamespace(device=torch.device("cpu"), base_path=str(tmp_path / "first.safetensors"), loaded=True,
                              sd=family, embedding_count=0, reload_embeddings=lambda: {})  # fmt: skip
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "second.safetensors").write_bytes(b"")  # listed by name, never read here
    (models / "loras" / "style").mkdir(parents=True)
    (models / "loras" / "style" / "ink.safetensors").write_bytes(b"")
    return Studio(manager, str(models), str(tmp_path / "out"), limits=limits)


def _server(studio: Studio | None, auth: dict | None = None, queue_size: int = 4):
    """The page's server with `launch.serve`'s own middleware (`launch.layers`), Gradio left out: a stand-in page
    behind the gate and, unless `studio` is None (`--no-api`), the API's dispatch."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from studio.a1111.server import api_app
    from studio.launch import layers

    page = Route("/gradio_api/info", lambda request: PlainTextResponse("the page's own API"))
    api = None if studio is None else api_app(studio, queue_size)
    outer = Starlette(routes=[page], middleware=layers(api))
    outer.auth, outer.cookie_id, outer.tokens = auth, "id", {}  # what the gate reads of Gradio's app
    return outer


@pytest.fixture
def api(tmp_path):
    from starlette.testclient import TestClient

    studio = _fake_studio(tmp_path)
    with TestClient(_server(studio)) as client:
        yield client, studio


def _png(text: str | None = None, size=(8, 8)) -> str:
    out = io.BytesIO()
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG", pnginfo=info)
    return base64.b64encode(out.getvalue()).decode()


def _field(response) -> list:
    """The body fields a 422 names, FastAPI's way."""
    assert response.status_code == 422, response.text
    return [d["loc"][-1] for d in response.json()["detail"]]


def test_lists_and_settings_answer_in_a1111_shapes(api):
    client, studio = api
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["first.safetensors", "second.safetensors"]
    assert models[1]["model_name"] == "second" and "/" not in models[1]["filename"]  # no server folder shown
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "DPM++ 2M Karras", "aliases": ["dpmpp_2m_karras"], "options": {}} in samplers
    assert {s["name"] for s in client.get("/sdapi/v1/schedulers").json()} >= {"automatic", "karras", "exponential"}
    assert client.get("/sdapi/v1/loras").json() == [
        {"name": "ink", "alias": "ink", "path": "loras/style/ink.safetensors", "metadata": {}}
    ]
    assert client.get("/controlnet/version").json() == {"version": 2}
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "first.safetensors" and options["CLIP_stop_at_last_layers"] == 1
    # A1111 takes a checkpoint by title or by name; settings it does not use are accepted and ignored
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "second", "eta_noise_seed_delta": 31337,
                                                  "CLIP_stop_at_last_layers": 2}).status_code == 200  # fmt: skip
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "second.safetensors" and options["CLIP_stop_at_last_layers"] == 2
    assert "eta_noise_seed_delta" not in options
    assert _field(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})) == ["sd_model_checkpoint"]
    assert _field(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 40})) == [
        "CLIP_stop_at_last_layers"
    ]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "second.safetensors"  # unchanged
    (studio.out_dir.parent / "models" / "checkpoints" / "third.safetensors").write_bytes(b"")
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert "third.safetensors" in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert client.get("/sdapi/v1/no-such-route").status_code == 404


def test_png_info_reads_the_parameters_and_names_a_bad_picture(api):
    client, _ = api
    text = "a red square\nNegative prompt: lowres\nSteps: 20, Sampler: DDIM, CFG scale: 5, Seed: 7, Size: 64x48"
    answer = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + _png(text)}).json()
    assert answer["info"] == text
    p = answer["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Seed"]) == ("a red square", "lowres", "20", "7")
    assert (p["Size-1"], p["Size-2"]) == (64, 48)
    wrapped = "\n".join(_png(text)[i : i + 76] for i in range(0, len(_png(text)), 76))  # MIME-style lines, as txt2img
    assert client.post("/sdapi/v1/png-info", json={"image": wrapped}).json()["info"] == text
    assert client.post("/sdapi/v1/png-info", json={"image": _png()}).json() == {"info": "", "items": {},
                                                                                "parameters": {}}  # fmt: skip
    assert _field(client.post("/sdapi/v1/png-info", json={"image": "not base64!"})) == ["image"]
    assert _field(client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"text").decode()})) == ["image"]
    assert client.post("/sdapi/v1/png-info", content=b"{no json").status_code == 422


def test_auth_takes_basic_credentials_on_the_api_and_keeps_the_page_gated(tmp_path):
    from starlette.testclient import TestClient

    with TestClient(_server(_fake_studio(tmp_path), auth=USERS)) as client:
        anonymous = client.get("/sdapi/v1/sd-models")
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Basic"
        assert client.get("/sdapi/v1/sd-models", auth=("ana", "wrong")).status_code == 401
        assert client.get("/sdapi/v1/sd-models", auth=("bo", "s3cret")).status_code == 401
        assert client.post("/sdapi/v1/interrupt").status_code == 401
        assert client.get("/controlnet/version").status_code == 401
        assert client.get("/sdapi/v1/sd-models", auth=("ana", "s3cret")).status_code == 200
        assert client.get("/controlnet/version", auth=("ana", "s3cret")).json() == {"version": 2}
        assert client.get("/docs", auth=("ana", "s3cret")).status_code == 200  # the API page, as A1111's
        bad = client.get("/sdapi/v1/sd-models", headers={"Authorization": "Basic %%%"})
        assert bad.status_code == 401
        # the page's routes take the login cookie only, as before
        assert client.get("/gradio_api/info", auth=("ana", "s3cret")).status_code == 401
        assert 'type="password"' in client.get("/").text


def test_without_the_api_nothing_answers_on_its_paths(tmp_path):
    """`launch.layers` without an API (`--no-api`): the page still answers, the API's paths are not there."""
    from starlette.testclient import TestClient

    with TestClient(_server(None)) as client:
        assert client.get("/gradio_api/info").text == "the page's own API"
        for path in ("/sdapi/v1/sd-models", "/docs", "/controlnet/version"):
            assert client.get(path).status_code == 404, path


def test_bad_payloads_are_refused_naming_the_field(api):
    """422 in FastAPI's shape, naming the field as the client sent it; a request over the work budget is refused as
    the page refuses it, before any model runs."""
    client, _ = api
    unit = {"image": _png(size=(64, 64)), "module": "canny", "model": "control_v11p_sd15_canny"}
    good = {"prompt": "a red square", "width": 64, "height": 64, "steps": 2, "sampler_name": "DDIM",
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip

    def refused(changes: dict | None = None, **unit_changes) -> str:
        payload = dict(good, **(changes or {}))
        if unit_changes:
            payload["alwayson_scripts"] = {"controlnet": {"args": [dict(unit, **unit_changes)]}}
        (name,) = _field(client.post("/sdapi/v1/txt2img", json=payload))
        return name

    assert refused({"prompt": 5}) == "prompt"
    assert refused({"width": 5000}) == "width"
    assert refused({"sampler_name": "Nope a"}) == "sampler_name"
    assert refused(image="%%% not base64").endswith("image")
    assert refused(module="no_such_module").endswith("module")
    detect = client.post("/controlnet/detect", json={"controlnet_module": "nope", "controlnet_input_images": [_png()]})
    assert _field(detect) == ["controlnet_module"]
    over = client.post("/sdapi/v1/txt2img", json=dict(good, width=1024, height=1024, steps=150))
    assert over.status_code == 422 and "megapixel-steps" in over.json()["detail"]


def test_the_app_serves_the_api_unless_no_api(monkeypatch):
    import app
    from studio.a1111.server import ApiDispatch
    from tests.test_hardening import app_without_a_server

    launched = app_without_a_server(monkeypatch)
    for flags, served in (([], True), (["--no-api"], False)):
        app.main(["--demo", *flags])
        layers = [m.cls for m in launched["app_kwargs"]["middleware"]]
        assert (ApiDispatch in layers) == served


def _slow_jobs(monkeypatch, studio: Studio, steps: int, started: threading.Event) -> None:
    """Stand-ins for `payloads.txt2img_job` and `run_job`: a job that samples `steps` steps of 20 ms, with Stop and
    live previews as `studio.generate` does them."""
    from studio.a1111 import routes
    from studio.a1111.payloads import Job
    from studio.settings import GuidanceSettings, PassSettings, Settings

    def job(_studio, payload):
        return Job([], Settings(prompt=payload["prompt"], steps=steps), PassSettings(), GuidanceSettings(), [], None,
                   None, dict(payload))  # fmt: skip

    def run(_studio, job, progress, preview, session, sent_at=None):
        flag = studio.stops.start(session, sent_at)
        try:
            for i in range(steps):
                if flag.is_set():
                    raise Stopped(f"Stopped at step {i} of {steps}; nothing saved.")
                progress(i / steps, desc=f"sampling {i}/{steps}")
                preview(np.full((1, 8, 8, 3), 10 * i, np.uint8))
                started.set()
                time.sleep(0.02)
        finally:
            studio.stops.release(session, flag)
        return {"images": ["done"], "parameters": job.echo, "info": "{}"}

    monkeypatch.setattr(routes, "txt2img_job", job)
    monkeypatch.setattr(routes, "run_job", run)


def test_progress_and_interrupt_while_a_job_runs(api, monkeypatch):

    client, studio = api
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    started = threading.Event()
    _slow_jobs(monkeypatch, studio, 500, started)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(client.post("/sdapi/v1/txt2img", json={
        "prompt": "a red square", "steps": 500})))  # fmt: skip
    t0 = time.monotonic()
    worker.start()
    assert started.wait(30)
    time.sleep(0.1)
    during = client.get("/sdapi/v1/progress").json()
    assert 0 < during["progress"] < 1 and during["state"]["job_count"] == 1
    assert during["state"]["sampling_steps"] == 500 and 0 < during["state"]["sampling_step"] < 500
    preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(during["current_image"]))))
    assert preview.shape == (8, 8, 3)
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").json() == {}
    worker.join(30)
    assert time.monotonic() - t0 < 5  # 500 steps would take 10 s
    answer = answers[0].json()
    assert answers[0].status_code == 200 and answer["images"] == []
    assert '"interrupted": true' in answer["info"] and answer["parameters"]["prompt"] == "a red square"
    after = client.get("/sdapi/v1/progress").json()
    assert after["state"]["interrupted"] and after["state"]["job_count"] == 0


def test_an_interrupt_while_the_payload_is_read_stops_the_job(api, monkeypatch):
    """/interrupt between admission and the job's start (its payload still being read) is not lost."""
    from studio.a1111 import routes

    client, studio = api
    started, reading, go_on = threading.Event(), threading.Event(), threading.Event()
    _slow_jobs(monkeypatch, studio, 100, started)
    make = routes.txt2img_job
    monkeypatch.setattr(routes, "txt2img_job", lambda *a: reading.set() or go_on.wait(30) and make(*a))
    answers = []
    worker = threading.Thread(target=lambda: answers.append(client.post("/sdapi/v1/txt2img", json={"prompt": "a"})))
    worker.start()
    assert reading.wait(30)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    go_on.set()
    worker.join(30)
    assert not started.is_set() and answers[0].json()["images"] == []  # not one step ran
    assert '"interrupted": true' in answers[0].json()["info"]


def test_a_preview_is_encoded_once_however_often_progress_is_asked(monkeypatch):
    from studio.a1111 import jobs as jobs_module
    from studio.stops import Stops

    encoded = []
    monkeypatch.setattr(jobs_module, "png_base64", lambda a: encoded.append(a) or f"png{len(encoded)}")
    jobs = jobs_module.Jobs(Stops(), 2)
    with jobs.admitted("txt2img") as job:
        jobs.progress(job, 0.5)
        assert jobs.report()["current_image"] is None and not encoded
        jobs.preview(job, [np.zeros((8, 8, 3), np.uint8)])
        assert [jobs.report()["current_image"] for _ in range(3)] == ["png1"] * 3
        jobs.preview(job, [np.ones((8, 8, 3), np.uint8)])
        assert jobs.report()["current_image"] == "png2" and len(encoded) == 2


def test_a_full_queue_answers_503(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    studio = _fake_studio(tmp_path)
    started = threading.Event()
    _slow_jobs(monkeypatch, studio, 100, started)
    with TestClient(_server(studio, queue_size=1)) as client:
        worker = threading.Thread(target=lambda: client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 100}))
        worker.start()
        assert started.wait(30)
        full = client.post("/sdapi/v1/txt2img", json={"prompt": "b"})
        assert full.status_code == 503 and "--queue-size" in full.json()["detail"]
        client.post("/sdapi/v1/interrupt")
        worker.join(30)


# ------------------------------------------------------------------------------------------------ integration
EXAMPLES = Path(__file__).parents[1] / "assets" / "examples"
DEMO = Path(__file__).parents[1] / "assets" / "demo"
PROMPT = "a blue circle and a yellow star on a pink background"  # the demo model's words
STEPS = 4
# what the page's generate endpoints take besides the units: the same settings as the API requests below (DDIM's
# eta 1.0 is webuiapi's default `eta`, which A1111 gives DDIM)
PAGE = dict(prompt=PROMPT, added_prompt="", negative_prompt="", batch=1, width=64, height=64, steps=STEPS, cfg=5.0,
            sampler="ddim", seed=3, randomize=False, eta=1.0, init_image=None, image_prompt=None, preview_every=0,
            seed_per_picture=False)  # fmt: skip


def _pixels(picture) -> np.ndarray:
    """A picture's pixels (a PIL picture, or a file): what is compared; the PNG files' text chunks may differ."""
    img = picture if isinstance(picture, Image.Image) else Image.open(picture)
    return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def api_servers(tmp_path_factory):
    """The app on the demo model with the A1111 API, twice on one Studio: open, and behind --auth.
    (url_open, url_gated, the Studio)."""
    import socket

    from cldm.io.model_card import card_for
    from cldm.runtime.manager import ModelManager
    from studio import launch, page
    from studio.a1111.server import api_app

    manager = ModelManager(str(DEMO / "shapes_sd.safetensors"), device="cpu", dtype="fp32")
    studio = Studio(
        manager, str(DEMO), str(tmp_path_factory.mktemp("out")), card=card_for(DEMO / "shapes_sd.safetensors")
    )
    urls, servers = [], []
    for auth in (None, list(USERS.items())):
        blocks = page.build_app(studio, banner="demo")
        blocks.queue(max_size=8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch.serve(blocks, api_app(studio, 8), server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                     quiet=True, auth=auth)  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
        servers.append(blocks)
    yield (*urls, studio)
    for blocks in servers:
        blocks.close()


def _clients(url: str, auth: tuple[str, str] | None = None):
    """(webuiapi's client, gradio_client's) for one server."""
    import webuiapi
    from gradio_client import Client

    host, port = url.removeprefix("http://").split(":")
    web = webuiapi.WebUIApi(host=host, port=int(port), username=auth and auth[0], password=auth and auth[1])
    return web, Client(url + "/", auth=auth, verbose=False)


@pytest.mark.integration
def test_webuiapi_txt2img_with_two_units_equals_the_multi_tab(api_servers):
    """Canny (its thresholds) + scribble (weight, guidance start/end, control mode): the picture and both hints
    equal, pixel for pixel, what /multi_generate makes of the same settings."""
    import webuiapi
    from gradio_client import handle_file

    web, page = _clients(api_servers[0])
    shapes, sketch = Image.open(EXAMPLES / "shapes.png"), Image.open(EXAMPLES / "triangle_sketch.png")
    units = [webuiapi.ControlNetUnit(image=shapes, module="canny", model="control_v11p_sd15_canny", weight=1.0,
                                     resize_mode="Crop and Resize", processor_res=64, threshold_a=100,
                                     threshold_b=200),
             webuiapi.ControlNetUnit(image=sketch, module="invert", model="control_v11p_sd15_scribble [0123abcd]",
                                     weight=0.7, resize_mode="Crop and Resize", processor_res=64, guidance_start=0.1,
                                     guidance_end=0.9, control_mode=1)]  # fmt: skip
    api = web.txt2img(prompt=PROMPT, seed=3, steps=STEPS, cfg_scale=5.0, width=64, height=64, sampler_name="DDIM",
                      controlnet_units=units)  # fmt: skip
    assert len(api.images) == 3  # the picture, then each unit's hint (the extension's detected maps)
    assert api.info["all_seeds"] == [3] and "Steps: 4" in api.info["infotexts"][0]
    gallery, status, files = page.predict(
        enabled_1=True, condition_1="canny", image_1=handle_file(str(EXAMPLES / "shapes.png")), preprocessor_1="canny",
        resolution_1=64, canny_low_threshold_1=100, canny_high_threshold_1=200, pixel_perfect_1=False,
        enabled_2=True, condition_2="scribble", image_2=handle_file(str(EXAMPLES / "triangle_sketch.png")),
        preprocessor_2="invert", resolution_2=64, scale_2=0.7, start_2=0.1, end_2=0.9,
        control_mode_2="My prompt is more important", pixel_perfect_2=False, enabled_3=False, image_3=None, **PAGE,
        api_name="/multi_generate",
    )  # fmt: skip
    assert len(files) == 1 and "control_v11p_sd15_scribble" in status
    assert np.array_equal(_pixels(api.images[0]), _pixels(files[0]))
    for hint, item in zip(api.images[1:], gallery[:2]):
        assert np.array_equal(_pixels(hint), _pixels(item["image"]))
    assert not np.array_equal(_pixels(api.images[1]), _pixels(api.images[2]))  # two hints, two units


@pytest.mark.integration
def test_webuiapi_plain_txt2img_is_the_librarys_picture(api_servers):
    """No ControlNet unit (what most A1111 clients send): the base alone, the library's picture of the same
    request on the same model."""
    from cldm.pipeline.request import GenerationRequest

    web, _ = _clients(api_servers[0])
    # webuiapi's txt2img keeps earlier calls' units in its mutable default `alwayson_scripts`: a fresh one here
    api = web.txt2img(prompt=PROMPT, seed=7, steps=STEPS, cfg_scale=5.0, width=64, height=64, sampler_name="Euler a",
                      alwayson_scripts={}, controlnet_units=[])  # fmt: skip
    assert len(api.images) == 1 and api.info["all_seeds"] == [7] and "Sampler: Euler a" in api.info["infotexts"][0]
    same = GenerationRequest(PROMPT, steps=STEPS, cfg_scale=5.0, width=64, height=64, sampler="euler_a", seed=7,
                             seed_per_picture=True)  # fmt: skip
    assert np.array_equal(_pixels(api.images[0]), api_servers[2].manager.run(same).images[0])


@pytest.mark.integration
def test_webuiapi_inpaint_and_detect_equal_the_inpaint_tab_and_the_hint_button(api_servers):
    from gradio_client import handle_file

    web, page = _clients(api_servers[0])
    shapes, mask = Image.open(EXAMPLES / "shapes.png"), Image.open(EXAMPLES / "shapes_circle_mask.png")
    prompt = "a white circle and a yellow star on a pink background"
    api = web.img2img(images=[shapes], mask_image=mask, prompt=prompt, seed=3, steps=STEPS, cfg_scale=5.0, width=64,
                      height=64, sampler_name="DDIM", denoising_strength=1.0, mask_blur=4, inpainting_fill=1)  # fmt: skip
    editor = {"background": handle_file(str(EXAMPLES / "shapes.png")),
              "layers": [handle_file(str(EXAMPLES / "shapes_circle_mask.png"))],
              "composite": handle_file(str(EXAMPLES / "shapes.png"))}  # fmt: skip
    _, status, files = page.predict(image=editor, preprocessor="none", **dict(PAGE, prompt=prompt), denoise=1.0,
                                    resize_mode="Just Resize", pixel_perfect=True, mask_blur=4,
                                    api_name="/inpaint_generate")  # fmt: skip
    assert "control_v11p_sd15_inpaint" in status
    assert np.array_equal(_pixels(api.images[0]), _pixels(files[0]))
    detected = web.controlnet_detect([shapes], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    hint = page.predict(image=handle_file(str(EXAMPLES / "shapes.png")), preprocessor="canny", resolution=64,
                        canny_low_threshold=100, canny_high_threshold=200, width=256, height=256,
                        resize_mode="Crop and Resize", pixel_perfect=False, api_name="/canny_hint")  # fmt: skip
    assert detected.info == "Success"
    assert np.array_equal(_pixels(detected.images[0]), _pixels(hint))


@pytest.mark.integration
def test_webuiapi_interrupt_ends_the_job_early(api_servers):
    """A long txt2img interrupted while it samples: it answers at once with no pictures, /progress says it was
    interrupted, and the next request runs."""
    import webuiapi

    web, _ = _clients(api_servers[0])
    unit = webuiapi.ControlNetUnit(image=Image.open(EXAMPLES / "shapes.png"), module="canny",
                                   model="control_v11p_sd15_canny", processor_res=64)  # fmt: skip
    long = dict(prompt=PROMPT, seed=3, steps=150, cfg_scale=5.0, width=64, height=64, sampler_name="DDIM")
    answers = []
    worker = threading.Thread(target=lambda: answers.append(web.txt2img(**long, controlnet_units=[unit])))
    worker.start()
    deadline = time.monotonic() + 60
    while web.get_progress()["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    web.interrupt()
    worker.join(60)
    answer = answers[0]
    assert answer.images == [] and answer.info["interrupted"]
    stopped_at = int(answer.info["textinfo"].split("step ")[1].split(" ")[0])
    assert 2 <= stopped_at < 150
    state = web.get_progress()["state"]
    assert state["interrupted"] and state["job_count"] == 0
    again = web.txt2img(**dict(long, steps=2), controlnet_units=[unit])
    assert len(again.images) == 2 and not web.get_progress()["state"]["interrupted"]


@pytest.mark.integration
def test_under_auth_the_api_takes_basic_credentials_and_the_page_still_works(api_servers):
    import httpx
    import webuiapi

    url = api_servers[1]
    anonymous = httpx.get(url + "/sdapi/v1/sd-models")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Basic"
    assert httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": PROMPT}).status_code == 401
    assert httpx.get(url + "/controlnet/version", auth=("ana", "wrong")).status_code == 401
    with pytest.raises(RuntimeError, match="401"):
        webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1])).txt2img(prompt=PROMPT)
    web, page = _clients(url, ("ana", "s3cret"))
    assert [m["title"] for m in web.get_sd_models()] == ["shapes_sd.safetensors"]
    assert web.controlnet_version() == 2
    detected = web.controlnet_detect([Image.open(EXAMPLES / "shapes.png")], module="canny", processor_res=64)
    assert detected.images[0].size == (256, 256)
    hint = page.predict(image=_file(EXAMPLES / "shapes.png"), preprocessor="canny", resolution=64, width=64,
                        height=64, pixel_perfect=False, api_name="/canny_hint")  # fmt: skip
    assert _pixels(hint).shape == (64, 64, 3)
    assert 'type="password"' in httpx.get(url + "/").text  # the page's login, as before
    with httpx.Client() as browser:
        assert browser.post(url + "/login", data={"username": "ana", "password": "s3cret"}).status_code == 200
        assert "gradio_api_info" in browser.get(url + "/").text
        assert browser.get(url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes_sd.safetensors"


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))
