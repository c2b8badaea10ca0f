"""What the app does, without Gradio: the user's settings as records, hints, requests for the model manager.

`app.py` lays out the widgets and turns their values into the records here; everything a click does is here.
"""

from __future__ import annotations

import html
import logging
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import annotators
import annotators.cache
from cldm.adapters.emphasis import MAX_PROMPT_CHARS
from cldm.adapters.lora import prompt_tags
from cldm.errors import CldmError, InputError, Stopped
from cldm.hints.conditions import BY_KEY, PREPROCESSOR_NONE, Condition
from cldm.hints.fitted import fitted_hint
from cldm.io import checkpoints, locate
from cldm.io.images import save_png
from cldm.io.model_card import ModelCard
from cldm.pipeline.request import ControlUnit, GenerationRequest, LoraUnit
from cldm.runtime.manager import ModelManager
from cldm.sampling.samplers import SAMPLERS, sampler_class
from studio.availability import choose_base, controlnet_problem, tab_states  # noqa: F401 (choose_base: read here too)
from studio.canvas import editor_image, inpaint_hint
from studio.control_models import control_model_names, control_type, model_path, region_mask
from studio.picture_prompts import image_prompts, reference
from studio.settings import (  # noqa: F401 (the records app.py and forms.py read through here)
    CONTROL_MODES,
    INPAINT_MODES,
    MAX_SEED,
    MAX_SEED_INPUT,
    REFERENCE_PREPROCESSORS,
    RESIZE_MODES,
    UPSCALERS,
    Defaults,
    GuidanceSettings,
    ImagePromptSettings,
    ModelLists,
    PassSettings,
    ReferenceSettings,
    Settings,
    UnitSettings,
)  # fmt: skip
from studio.stops import Stops

log = logging.getLogger("studio")
Progress = Callable[..., None]  # progress(fraction, desc=...), as gr.Progress takes it
SHOWN_DIR = "shown"  # hints shown in the page, one file per request (pruned like the results)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a shared server, and how much output it keeps.

    `max_work` is in megapixel-steps: width x height x steps actually run x pictures / 1e6. 512x512, 20 steps, one
    picture is 5.2; the default (32) allows 512 px x 20 steps x 4 pictures or one 1024 px picture with 30 steps,
    minutes each on a 2-core CPU. A GPU server can allow far more (`python app.py --max-work`).
    """

    max_work: float = 32.0
    keep_outputs: int = 500  # result PNGs kept in the output folder (the oldest go first)
    keep_hours: float = 24.0  # and none older than this

    @classmethod
    def for_device(cls, device_type: str) -> Limits:
        return cls(max_work=400.0) if device_type == "cuda" else cls()


class Studio:
    """What the handlers share: the model manager, the models folder, the base's model card, the output folder,
    the per-request limits, and what this machine can run (offline or not, each condition tab's state), decided once
    at start-up: `offline` as `locate.detect_offline` found it (None: as HF_HUB_OFFLINE says, nothing probed)."""

    def __init__(
        self, manager: ModelManager, models_dir: str | None, out_dir: str | None = None, card: ModelCard | None = None,
        limits: Limits | None = None, offline: bool | None = None,
    ):  # fmt: skip
        self.manager = manager
        # the hint extractors run where the model runs (in the front end when the model is served by Ray)
        annotators.cache.use_device(getattr(manager, "annotator_device", manager.device))
        self.models_dir = models_dir
        self.card = card  # a small model (the demo model): only its conditions work, at its size
        self.defaults = Defaults.for_card(card)
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="cldm-out-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out_dir.glob(".*.part"), *(self.out_dir / SHOWN_DIR).glob(".*.part")]:  # a PNG being
            # written when the server was killed
            stale.unlink(missing_ok=True)
        self.limits = limits or Limits.for_device(manager.device.type)
        self.bases = self._find_bases(manager.base_path)
        self.stops = Stops()  # each browser session's Stop button
        self.offline = locate.offline() if offline is None else offline
        self.tabs = tab_states(card, models_dir, self.offline, self._first_family())

    def _first_family(self) -> str:
        """The start-up base's family, told without downloading anything: SD1.5 while a hub base is not here yet."""
        try:
            return self.family_of() if self.offline or Path(self.manager.base_path).exists() else "SD1.5"
        except CldmError:  # not readable here: the first request says why
            return "SD1.5"

    def _find_bases(self, first: str) -> dict[str, str]:
        """The bases a request may name: the one the server started with, then the models folder's (not in demo
        mode)."""
        bases = {Path(first).name or first: first}
        if self.card is None:
            bases.update({k: v for k, v in locate.list_bases(self.models_dir).items() if k not in bases})
        return bases

    def base_for(self, name: str | None) -> str:
        """The base a request names (a key of `bases`), or the first one: what the page shows by default."""
        if name is None or name == "":
            return next(iter(self.bases.values()))
        if name not in self.bases:
            raise InputError(f"Unknown base model {name!r}; choose one of {', '.join(self.bases)}.")
        return self.bases[name]

    def refresh_models(self) -> ModelLists:
        """The models folder read again, as A1111's refresh buttons do: new or removed bases, control models, LoRAs
        and VAEs show in the lists, and the embeddings folder is read again. Nothing loaded is dropped."""
        self.bases = self._find_bases(next(iter(self.bases.values())))
        refused = self.manager.reload_embeddings()
        lists = ModelLists(list(self.bases), locate.list_loras(self.models_dir), locate.list_vaes(self.models_dir),
                           self.manager.embedding_count, refused, self.control_models())  # fmt: skip
        log.info("model lists refreshed: %s", lists.summary)
        return lists

    def control_models(self) -> list[str]:
        """The files a unit's Model list offers besides the condition's own ControlNet (by name, never read here)."""
        return control_model_names(self.models_dir, self.bases.values())

    # ------------------------------------------------------------------------------------------------ messages
    def public(self, message: str) -> str:
        """An error message as a user may see it: no server paths (the models folder, upload folders, this
        program's folders), and HTML-escaped, since it may repeat what the user sent."""
        folders = [f for f in (self.models_dir, self.out_dir) if f]
        for folder in sorted(
            {str(Path(f).resolve()) for f in folders} | {str(f) for f in folders}, key=len, reverse=True
        ):
            message = message.replace(folder.rstrip("/") + "/", "")
        message = _ABSOLUTE_PATH.sub(lambda m: m.group(1) + Path(m.group(2)).name, message)
        return html.escape(message, quote=False)

    def check_work(self, units: list[UnitSettings], s: Settings, extras: PassSettings | None = None) -> None:
        """Refuse a request over the work budget, or a prompt over the length limit as sent (LoRA tags included),
        before any preprocessor or model runs (a hires pass counts at its size)."""
        texts = {"prompt": s.prompt, "added prompt": s.added_prompt, "negative prompt": s.negative_prompt}
        for name, text in texts.items():
            if len(text or "") > MAX_PROMPT_CHARS:
                raise InputError(
                    f"The {name} is {len(text)} characters long, tags included; at most {MAX_PROMPT_CHARS}. Shorten it."
                )
        img2img = any(u.cond.img2img or u.cond.inpaint for u in units) or (extras and extras.init_image is not None)
        partial = img2img and float(s.denoise) < 1
        steps = max(1, int(int(s.steps) * float(s.denoise))) if partial else int(s.steps)
        work = int(s.width) * int(s.height) * steps * int(s.batch) / 1e6
        what = f"{int(s.width)}x{int(s.height)} px x {steps} steps x {int(s.batch)} pictures"
        hires = extras.hires_fix if extras is not None else None
        if hires is not None:
            w2, h2 = hires.size(int(s.width), int(s.height))
            steps2 = hires.schedule(int(s.steps))[0]
            work += w2 * h2 * steps2 * int(s.batch) / 1e6
            what += f" + hires {w2}x{h2} px x {steps2} steps"
        order = sampler_class(s.sampler).order if s.sampler in SAMPLERS else 1
        if order > 1:  # DPM++ SDE calls the model twice per step
            work *= order
            what += f", {order} model calls per step ({s.sampler})"
        if work > self.limits.max_work:
            raise InputError(
                f"This request is {work:.0f} megapixel-steps ({what}); this server allows {self.limits.max_work:g} "
                "per request. Lower the size, the steps or the number of pictures."
            )

    def _prune_outputs(self, folder: Path | None = None) -> None:
        """Keep the output folder (or its `shown/`) bounded: at most `keep_outputs` PNGs, none older than
        `keep_hours`. Another request may prune at the same time: a file already gone is skipped."""
        dated = []
        for path in (folder or self.out_dir).glob("*.png"):
            try:
                dated.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue
        cutoff = time.time() - self.limits.keep_hours * 3600
        for i, (mtime, path) in enumerate(sorted(dated, reverse=True)):
            if i >= self.limits.keep_outputs or mtime < cutoff:
                path.unlink(missing_ok=True)

    def shown(self, picture: np.ndarray) -> str:
        """A picture to show (a hint), as a PNG of its own under the output folder's `shown/`. Gradio's cache names a
        picture by its content and rewrites that file in place, so two users shown the same hint at once could
        download it while it was being rewritten (an empty answer); a file per request cannot be."""
        path = self.out_dir / SHOWN_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.png"
        save_png(picture, path)
        self._prune_outputs(path.parent)
        return str(path)

    @property
    def size(self) -> int:
        return self.defaults.size

    def available(self, cond: Condition) -> bool:
        """Whether the base's model card (if any) has a ControlNet for `cond`."""
        return self.card is None or cond.key in self.card.conditions

    # ------------------------------------------------------------------------------------------------ hints
    def hint(self, unit: UnitSettings, size: tuple[int, int]) -> np.ndarray:
        """The hint for one ControlNet, at the size of the pictures to generate (width, height)."""
        img = editor_image(unit.image)
        if img is None:
            raise InputError("Upload an image (or draw on the canvas) first.")
        if unit.preprocessor not in unit.cond.preprocessors:
            raise InputError(f"{unit.preprocessor!r} is not a preprocessor for {unit.cond.label}.")
        resolution = unit.detection_resolution(img, size)
        return fitted_hint(unit.preprocessor, img, *size, unit.resize_mode, resolution, self.models_dir,
                           **unit.params)  # fmt: skip

    def native_size(self, name: str | None) -> int:
        """The picture side of a base the page offers (by its name in `bases`): the model card's for the demo
        model, else its family's native size."""
        path = self.base_for(name)
        if self.card is not None and path == next(iter(self.bases.values())):
            return self.card.size
        return checkpoints.native_size(locate.locate_base(path))

    def family_of(self, base_path: str | None = None) -> str:
        """The model family of a base (default: the one loaded now), told from its weights without loading them."""
        path = base_path or self.manager.base_path
        # the loaded base answers at once; a manager elsewhere (Ray Serve's replicas) is asked nothing
        if path == self.manager.base_path and getattr(self.manager, "loaded", False):
            return self.manager.sd.family.name
        return checkpoints.peek_family(locate.locate_base(path))[0]

    def _control(self, unit: UnitSettings, s: Settings, progress: Progress, extras: PassSettings | None = None,
                 family: str = "SD1.5"):  # fmt: skip
        """(ControlUnit, the hint to show, init picture, mask, strength) for one unit, with its picked control model
        or else the condition's ControlNet for a base of `family`."""
        cond = unit.cond
        if unit.model is None and (problem := controlnet_problem(cond, self.card, family)):
            raise InputError(problem)
        img = editor_image(unit.image)
        if img is None:
            raise InputError(f"{cond.label}: upload an image (or draw on the canvas) first.")
        # the model before the hint: a missing one is said at once (offline: without the network), before a
        # preprocessor spends any time
        path = model_path(unit, family, self.models_dir)
        progress(0, desc=f"{cond.label}: preparing the hint")
        init, mask, strength = None, None, None
        w, h = int(s.width), int(s.height)
        if cond.inpaint:
            init, mask, hint = inpaint_hint(unit.image, w, h, unit.resize_mode)
            strength = float(s.denoise)
        else:
            hint = self.hint(unit, (w, h))
            if cond.img2img:
                init, strength = img, float(s.denoise)
            elif extras is not None and (picture := editor_image(extras.init_image)) is not None:
                init, strength = picture, float(s.denoise)  # img2img on any tab
        shown = hint if isinstance(hint, np.ndarray) else (hint[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()
        res = None if cond.inpaint or unit.preprocessor == PREPROCESSOR_NONE else unit.detection_resolution(img, (w, h))
        preprocessor = "" if cond.inpaint else unit.preprocessor
        control = ControlUnit(
            str(path), hint, unit.scale, unit.start, unit.end, cond.global_average_pooling or None, mode=unit.mode,
            resize_mode=unit.resize_mode, preprocessor=preprocessor, processor_res=res,
            pixel_perfect=unit.pixel_perfect, mask=region_mask(unit), control_type=control_type(unit, preprocessor),
        )  # fmt: skip
        return control, shown, init, mask, strength

    # --------------------------------------------------------------------------------------------- generate
    def request(self, units: list[UnitSettings], s: Settings, seed: int, progress: Progress,
                ip: ImagePromptSettings | Sequence[ImagePromptSettings] | None = None,
                ref: ReferenceSettings | None = None, extras: PassSettings | None = None,
                family: str | None = None, guidance: GuidanceSettings | None = None, plain: bool = False):  # fmt: skip
        """(GenerationRequest, hints to show, a note for the status line) for these units and settings, with the
        ControlNets of the base's `family` (default: the loaded base's)."""
        controls, shown, init, mask, strength, resize = [], [], None, None, 1.0, "crop"
        family = family or self.family_of()
        for unit in units:
            control, hint, u_init, u_mask, u_strength = self._control(unit, s, progress, extras, family)
            controls.append(control)
            shown.append(hint)
            if u_strength is not None:  # the last img2img / inpaint unit gives the init picture, fitted its way
                init, mask, strength, resize = u_init, u_mask, u_strength, unit.resize_mode
        if init is None and extras is not None and (picture := editor_image(extras.init_image)) is not None:
            init, strength = picture, float(s.denoise)  # img2img with no unit (the Image prompt tab)
        prompt = ", ".join(p for p in (s.prompt.strip(), s.added_prompt.strip()) if p)
        prompt, tags = prompt_tags(prompt)  # A1111's <lora:name:weight>, found in the models folder's loras/
        loras = tuple(LoraUnit(str(locate.locate_lora(name, self.models_dir)), w, te) for name, w, te in tags)
        negative, note = s.negative_prompt, ""
        if self.card is not None and self.card.words:  # unknown words would reach the model as letters it never saw
            (prompt, unknown), (negative, unknown_neg) = self.card.split_known(prompt), self.card.split_known(negative)
            if unknown or unknown_neg:
                note = (
                    f" | left out (not in the {self.card.name} model's vocabulary): {', '.join(unknown + unknown_neg)}"
                )
        request = GenerationRequest(
            prompt, negative, tuple(controls), steps=int(s.steps), cfg_scale=float(s.cfg), sampler=s.sampler,
            seed=seed, width=int(s.width), height=int(s.height), batch=int(s.batch),
            clip_skip=(int(extras.clip_skip) if extras is not None and extras.clip_skip else None)
            or max([1, *(u.cond.clip_skip for u in units)]), init_image=init, strength=strength, mask=mask,
            image_prompts=image_prompts([ip] if isinstance(ip, ImagePromptSettings) else ip or [], self.models_dir,
                                        family), reference=reference(ref), resize_mode=resize, loras=loras,
            vae=None if extras is None or extras.vae in ("", locate.VAE_FROM_CHECKPOINT) else str(
                locate.locate_vae(extras.vae, self.models_dir)),
            **({} if extras is None else dict(
                mask_blur=float(extras.mask_blur), inpaint_mode=extras.inpaint_mode, hires=extras.hires_fix,
                seed_per_picture=bool(extras.seed_per_picture))),
            **(guidance or GuidanceSettings()).request_fields(family),
            # live previews through the family's TAESD when A1111's models/VAE-taesd holds one (else Approx cheap)
            preview_vae=locate.locate_taesd(family, self.models_dir) if extras and int(extras.preview_every) else None,
        )  # fmt: skip
        if not plain and not units and not request.all_image_prompts and request.reference is None:
            raise InputError("Give a picture: an image prompt or a reference.")  # `plain`: the A1111 API's txt2img
        return request, shown, note

    def generate(self, units: list[UnitSettings], s: Settings, progress: Progress,
                 ip: ImagePromptSettings | Sequence[ImagePromptSettings] | None = None,
                 ref: ReferenceSettings | None = None, session: str | None = None, extras: PassSettings | None = None,
                 preview: Callable[[np.ndarray], None] | None = None, base: str | None = None,
                 sent_at: float | None = None, guidance: GuidanceSettings | None = None,
                 plain: bool = False):  # fmt: skip
        """Run one request: (gallery items: hints then pictures, status line, PNG files with their parameters).

        `base` names one of `self.bases` (None: the first, the one the page shows until the user picks another):
        every request runs on the base it names, whatever another user's request loaded before it. The session's Stop
        button ends it at the next step boundary, or before it starts if pressed after `sent_at` (Stopped is raised;
        nothing is written). `preview(pictures)` gets the live previews (every `extras.preview_every` steps)."""
        self.check_work(units, s, extras)
        base_path = self.base_for(base)
        flag = self.stops.start(session, sent_at)  # from now on, Stop ends this request (preparing the hints included)

        def step(i: int, n: int) -> None:
            if flag.is_set():
                raise Stopped(f"Stopped at step {i} of {n}; nothing saved.")
            progress(i / n, desc=f"sampling {i}/{n}")

        try:
            seed = random.randint(0, MAX_SEED) if s.randomize else int(s.seed)
            if flag.is_set():
                raise Stopped("Stopped before it started; nothing saved.")
            request, shown, note = self.request(units, s, seed, progress, ip, ref, extras, self.family_of(base_path),
                                                guidance, plain)  # fmt: skip
            request = replace(request, base=base_path)
            if flag.is_set():
                raise Stopped("Stopped before sampling; nothing saved.")
            t0 = time.perf_counter()
            every = 0 if extras is None or preview is None else int(extras.preview_every)
            result = self.manager.run(request, callback=step, preview=preview, preview_every=every)
        finally:
            self.stops.release(session, flag)
        files = []
        for i, img in enumerate(result.images):
            path = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{result.seeds[i]}-{uuid.uuid4().hex[:6]}.png"
            save_png(img, path, result.text(i))  # each picture with its own seed
            files.append(str(path))
        self._prune_outputs()
        t = result.timings
        names = ", ".join(str(u.model).rstrip("/").split("/")[-1] for u in request.units) or "none"
        for p in request.all_image_prompts:
            names += f" | IP-Adapter: {p.label} ({p.scale:g})" + (" in its region" if p.mask is not None else "")
        if request.reference is not None:
            names += f" | reference: {request.reference.mode}"
        if request.vae is not None:
            names += f" | VAE: {request.vae_label}"
        if request.loras:
            names += " | LoRA: " + ", ".join(f"{u.label} ({u.weight:g})" for u in request.loras)
        status = (
            f"Base: {result.base.rstrip('/').split('/')[-1]} | ControlNet: {names} | seed {seed} | "
            f"swap {t['swap']:.2f}s, sampling {t['sampling']:.2f}s, decode {t['decode']:.2f}s, "
            f"total {time.perf_counter() - t0:.1f}s on {self.manager.device} "
            f"{str(self.manager.dtype).removeprefix('torch.')}{note}"
        )
        pictures = [(f, f"seed {s_}") for f, s_ in zip(files, result.seeds)]
        return [(self.shown(hh), "hint") for hh in shown] + pictures, status, files


# an absolute path (after a space, quote, bracket or the start): shown as its file name only
_ABSOLUTE_PATH = re.compile(r"""(^|[\s'"(\[=])(/(?:[^\s'"():,;\]]+/)+[^\s'"():,;\]]*)""")


def condition(key: str) -> Condition:
    """The condition table's row for `key`, or a clear error (API callers may send anything)."""
    if key not in BY_KEY:
        raise InputError(f"Unknown condition {key!r}; choose one of {', '.join(BY_KEY)}.")
    return BY_KEY[key]
