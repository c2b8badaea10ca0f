"""One Job -> its pictures, in two halves that may run on different machines: `prepare` (CPU: read the pictures,
run the preprocessor, build and check the request) and `render` (the model: generate, encode the PNGs).

Both the in-process batch and the Ray Data pipeline call exactly these two functions, so a row's pictures do not
depend on where it ran. A row that goes wrong raises; the caller records the error and goes on.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from PIL import Image

from cldm.errors import InputError
from cldm.hints.conditions import BY_KEY
from cldm.hints.fitted import fitted_hint, pixel_perfect
from cldm.io import checkpoints, locate
from cldm.io.images import encode_png, load_rgb
from cldm.io.model_card import ModelCard, card_for
from cldm.models.family import SD15
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.vocabulary import ResizeMode
from cldm.runtime.manager import ModelManager
from cldm.scale.jobs import Job

JOB_CHUNK = "cldm-job"  # the PNG text chunk holding the row's fingerprint: a rerun knows the file is this row's


@dataclass(frozen=True)
class Setup:
    """What every worker needs to know to run a job list: the base, where the models are, device and dtype."""

    base: str
    models_dir: str | None = None  # ControlNets named by condition and preprocessor weights; the card's folder for demo
    device: str = "auto"
    dtype: str = "auto"
    embeddings: str | None = None

    @cached_property
    def card(self) -> ModelCard | None:
        return card_for(self.base)  # read once per worker, not once per row

    @cached_property
    def family(self) -> tuple[str, int]:
        """(the base's family, its native picture side), told from its files without loading it (once per
        worker)."""
        found = locate.locate_base(self.base)
        return checkpoints.peek_family(found)[0], checkpoints.native_size(found)

    def manager(self) -> ModelManager:
        """The model replica. Packed CPU convolutions are off: their sums depend on the thread count, and a batch's
        pictures must not depend on how many threads a worker has (1/255 apart otherwise, measured)."""
        m = ModelManager(self.base, device=self.device, dtype=self.dtype, prepack_cpu=False)
        if self.embeddings:
            m.load_embeddings(self.embeddings)
        return m


@dataclass(frozen=True)
class Prepared:
    job: Job
    request: GenerationRequest
    fingerprint: str
    seconds: float


@dataclass(frozen=True)
class Rendered:
    job: Job
    files: list[tuple[str, bytes]]  # (file name, PNG bytes)
    seeds: list[int]
    seconds: float  # preparing + generating
    worker: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _controlnet(job: Job, setup: Setup, card: ModelCard | None) -> tuple[str, int, bool]:
    """(weights path, the condition's clip skip, global average pooling) for the row's ControlNet."""
    cond = BY_KEY.get(job.controlnet)
    if cond is None:
        if not Path(job.controlnet).exists():
            known = ", ".join(BY_KEY)
            raise InputError(f"ControlNet {job.controlnet!r} is neither a file or folder nor a condition ({known})")
        return job.controlnet, 1, False
    if card is not None and cond.key not in card.conditions:
        raise InputError(f"the {card.name} model has no {cond.key} ControlNet (it has {', '.join(card.conditions)})")
    family = SD15.name if card is not None else setup.family[0]
    weights = cond.weights(family)
    if weights is None:
        raise InputError(f"no {family} ControlNet is known for {cond.key}: name a file or folder instead")
    path = locate.locate_controlnet(weights.stem, weights.repo, setup.models_dir, weights.file)
    return str(path), cond.clip_skip, cond.global_average_pooling


def prepare(job: Job, setup: Setup) -> Prepared:
    """Read the row's pictures, make its hint at the picture size and check the whole request."""
    t = time.perf_counter()
    card = setup.card
    path, clip_skip, pooling = _controlnet(job, setup, card)
    cond = BY_KEY.get(job.controlnet)
    preprocessor = job.preprocessor or (cond.preprocessors[0] if cond else "none")
    resize_mode = ResizeMode.parse(job.resize_mode)  # a Job from `make_job` holds members already
    img = load_rgb(job.image)
    native = card.size if card else setup.family[1]
    width, height = job.width or native, job.height or native
    prompt, negative = job.prompt, job.negative_prompt
    if card is not None and card.words:  # words the demo model never saw would reach it as letters
        prompt, negative = card.split_known(prompt)[0], card.split_known(negative)[0]
    resolution = job.resolution or pixel_perfect(img, width, height, resize_mode)
    unit = ControlUnit(path, img, job.scale, job.start, job.end, pooling or None, mode=job.control_mode,
                       resize_mode=resize_mode, preprocessor=preprocessor, processor_res=resolution,
                       pixel_perfect=not job.resolution, mask=load_rgb(job.mask) if job.mask else None,
                       control_type=job.control_type)  # fmt: skip
    request = GenerationRequest(
        prompt, negative, (unit,), steps=job.steps, cfg_scale=job.cfg, sampler=job.sampler, seed=job.seed,
        width=width, height=height, batch=job.pictures, clip_skip=job.clip_skip or clip_skip,
        init_image=load_rgb(job.init_image) if job.init_image else None, strength=job.strength,
        resize_mode=resize_mode, seed_per_picture=True, base=setup.base,
    ).validate()  # every field checked before the preprocessor runs  # fmt: skip
    hint = fitted_hint(preprocessor, img, width, height, resize_mode, resolution, setup.models_dir)
    request = replace(request, units=(replace(unit, hint=hint),))
    return Prepared(job, request, job.fingerprint(setup.base), time.perf_counter() - t)


def render(prepared: Prepared, manager: ModelManager) -> Rendered:
    """Generate the row's pictures and encode them as PNGs with their parameters and the row's fingerprint."""
    t = time.perf_counter()
    result = manager.run(prepared.request)
    extra = {JOB_CHUNK: prepared.fingerprint}
    files = [(name, encode_png(img, result.text(i), extra)) for i, (name, img) in
             enumerate(zip(prepared.job.file_names(), result.images))]  # fmt: skip
    seconds = prepared.seconds + time.perf_counter() - t
    return Rendered(prepared.job, files, list(result.seeds), seconds, worker_name())


def is_complete(path: Path, fingerprint: str) -> bool:
    """The file is a whole PNG made for this row (a rerun skips it). Every chunk's checksum is checked up to the
    end chunk, without decoding the pixels: a file cut short or damaged fails, and a rerun over many done rows
    reaches the first row to do quickly."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG" or img.info.get(JOB_CHUNK) != fingerprint:
                return False
            img.verify()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
