"""The A1111 API's routes (`/sdapi/v1/*`) and the ControlNet extension's (`/controlnet/*`), answering in their
shapes. The payloads become the app's own records in `payloads.py`; a generation runs `studio.generate` exactly as
a tab's Generate does, in a worker thread, so that /progress and /interrupt answer meanwhile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Body

from cldm.errors import InputError, Stopped
from cldm.io import locate
from cldm.io.images import read_parameters
from cldm.pipeline.infotext import parse_parameters
from cldm.sampling.samplers import SAMPLER_LABELS
from cldm.sampling.schedules import SCHEDULE_LABELS
from studio.a1111.fields import Fields, PayloadError, picture_bytes
from studio.a1111.jobs import ApiJob, Jobs
from studio.a1111.payloads import (
    MAX_CLIP_SKIP,
    Job,
    base_name,
    detect,
    img2img_job,
    model_list,
    module_list,
    run_job,
    txt2img_job,
)
from studio.service import Studio
from studio.settings import MAX_UI_STEPS

log = logging.getLogger("app")
CONTROLNET_API_VERSION = 2  # the extension's /controlnet/version today
PREVIEW_EVERY = 10  # A1111's default for show_progress_every_n_steps


class Options:
    """The A1111 settings the API keeps (GET and POST /sdapi/v1/options): the base that requests run on when they
    name none, the clip skip they get when they set none, and the live previews /progress shows."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.checkpoint: str | None = None  # a key of studio.bases; None: the first, the one the page shows
        self.clip_skip = 1
        self.live_previews = True
        self.preview_every = PREVIEW_EVERY

    def read(self) -> dict:
        return {"sd_model_checkpoint": self.checkpoint or next(iter(self.studio.bases)), "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": self.clip_skip, "live_previews_enable": self.live_previews,
                "show_progress_every_n_steps": self.preview_every, "samples_format": "png"}  # fmt: skip

    def write(self, values: dict[str, Any]) -> None:
        """The settings sent (all checked before any is kept); other A1111 settings are accepted and ignored, as
        A1111 itself ignores names it does not know."""
        f = Fields(values)
        checkpoint = self.checkpoint
        if f.given("sd_model_checkpoint"):
            checkpoint = base_name(self.studio, values["sd_model_checkpoint"], f)
        clip_skip = f.number("CLIP_stop_at_last_layers", self.clip_skip, 1, MAX_CLIP_SKIP, whole=True)
        every = f.number("show_progress_every_n_steps", self.preview_every, -1, MAX_UI_STEPS, whole=True)
        live = f.flag("live_previews_enable", self.live_previews)
        self.checkpoint, self.clip_skip, self.preview_every, self.live_previews = checkpoint, clip_skip, every, live
        ignored = sorted(set(values) - set(self.read()))
        if ignored:
            log.info("API options ignored (not used by this server): %s", ", ".join(ignored))

    def applied(self, job: Job) -> Job:
        """`job` with the server's settings where the request set none: the base, the clip skip, the previews."""
        extras = job.extras
        if not extras.clip_skip and self.clip_skip > 1:
            extras = replace(extras, clip_skip=self.clip_skip)
        if not extras.preview_every and self.live_previews and self.preview_every > 0:
            extras = replace(extras, preview_every=self.preview_every)
        return replace(job, base=job.base or self.checkpoint, extras=extras)


def png_info(data: bytes) -> dict:
    """A1111's /png-info answer: the "parameters" text, and the fields it holds by A1111's names."""
    try:
        text = read_parameters(data)
    except InputError as e:
        raise PayloadError("image", str(e)) from e
    if not text:
        return {"info": "", "items": {}, "parameters": {}}
    info = parse_parameters(text)
    parameters = {"Prompt": info.prompt, "Negative prompt": info.negative_prompt, **info.fields}
    if info.width is not None and info.height is not None:
        parameters.update({"Size-1": info.width, "Size-2": info.height})
    return {"info": text, "items": {}, "parameters": parameters}


def interrupted(job: Job, stop: Stopped) -> dict:
    """What an interrupted generation answers: no pictures (it ends at a step boundary with nothing made), its
    parameters, and why, where A1111 would send the pictures made so far."""
    info = {"prompt": job.settings.prompt, "negative_prompt": job.settings.negative_prompt, "infotexts": [],
            "interrupted": True, "textinfo": str(stop)}  # fmt: skip
    return {"images": [], "parameters": job.echo, "info": json.dumps(info)}


def api_routes(studio: Studio, jobs: Jobs) -> APIRouter:
    """Every route of the API on `studio`; `jobs` bounds and reports its generations."""
    router = APIRouter()
    options = Options(studio)

    def generation(api_job: ApiJob, make_job: Callable[[Studio, dict], Job], payload: dict) -> dict:
        job = options.applied(make_job(studio, payload))
        api_job.steps = max(1, int(job.settings.steps))
        try:
            return run_job(studio, job, partial(jobs.progress, api_job), partial(jobs.preview, api_job),
                           api_job.session, api_job.admitted_at)  # fmt: skip
        except Stopped as e:
            log.info("API %s interrupted: %s", api_job.name, e)
            return interrupted(job, e)

    async def generate(name: str, make_job: Callable[[Studio, dict], Job], payload: dict) -> dict:
        with jobs.admitted(name) as api_job:
            return await to_thread.run_sync(generation, api_job, make_job, payload)

    @router.post("/sdapi/v1/txt2img")
    async def txt2img(payload: dict[str, Any] = Body(...)) -> dict:  # noqa: B008 (FastAPI's way)
        """Pictures from a prompt, with ControlNet units in alwayson_scripts.controlnet.args."""
        return await generate("txt2img", txt2img_job, payload)

    @router.post("/sdapi/v1/img2img")
    async def img2img(payload: dict[str, Any] = Body(...)) -> dict:  # noqa: B008
        """Pictures from init_images[0] (inpainted where `mask` is white), with ControlNet units."""
        return await generate("img2img", img2img_job, payload)

    @router.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict:
        """How far the running API generation is, with its latest live preview."""
        return jobs.report(skip_current_image)

    @router.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        """Stop the running API generation at its next step."""
        jobs.interrupt()
        return {}

    @router.get("/sdapi/v1/options")
    def get_options() -> dict:
        return options.read()

    @router.post("/sdapi/v1/options")
    def set_options(values: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        """Set the base later requests run on (sd_model_checkpoint), the clip skip and the live previews."""
        options.write(values)

    @router.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict]:
        return [{"title": name, "model_name": Path(name).stem, "hash": None, "sha256": None, "filename": name,
                 "config": None} for name in studio.bases]  # fmt: skip

    @router.get("/sdapi/v1/samplers")
    def samplers() -> list[dict]:
        return [{"name": label, "aliases": [key], "options": {}} for key, label in SAMPLER_LABELS.items()]

    @router.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict]:
        return [{"name": key or "automatic", "label": label or "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for key, label in SCHEDULE_LABELS.items()]  # fmt: skip

    @router.get("/sdapi/v1/loras")
    def loras() -> list[dict]:
        """The models folder's LoRAs, for <lora:name:weight> in a prompt."""
        names = locate.list_loras(studio.models_dir)
        return [{"name": n, "alias": n, "path": studio.public(str(locate.locate_lora(n, studio.models_dir))),
                 "metadata": {}} for n in names]  # fmt: skip

    @router.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """Read the models folder again (bases, control models, LoRAs, VAEs, embeddings), as the page's Refresh."""
        studio.refresh_models()

    @router.post("/sdapi/v1/png-info")
    def png_info_route(body: dict[str, Any] = Body(...)) -> dict:  # noqa: B008
        """The generation parameters a PNG carries."""
        return png_info(picture_bytes("image", body.get("image")))

    @router.get("/controlnet/version")
    def version() -> dict:
        return {"version": CONTROLNET_API_VERSION}

    @router.get("/controlnet/model_list")
    def controlnet_models(update: bool = True) -> dict:
        """The control models a unit may name (`update` is accepted; the lists are read on each call)."""
        return model_list(studio)

    @router.get("/controlnet/module_list")
    def controlnet_modules(alias_names: bool = False) -> dict:
        return module_list(studio, alias_names)

    @router.post("/controlnet/detect")
    async def controlnet_detect(payload: dict[str, Any] = Body(...)) -> dict:  # noqa: B008
        """The hints a preprocessor makes of controlnet_input_images."""
        with jobs.admitted("detect"):
            return await to_thread.run_sync(detect, studio, payload)

    return router
