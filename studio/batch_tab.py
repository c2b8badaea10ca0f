"""The Batch tab: a zip or a set of pictures, one condition and preprocessor, one prompt template -> one picture per
input (A1111's batch tab), with progress, Stop, and a zip of the PNGs and the manifest.

It runs the same rows as `python -m cldm batch` (`cldm.scale.jobs`, `cldm.scale.render`, `cldm.scale.batch`), on the app's own
model manager (or its Ray Serve replicas), one row after the other.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import gradio as gr

from cldm.errors import InputError
from cldm.hints.conditions import ADDED_PROMPT, CONDITIONS, NEGATIVE_PROMPT
from cldm.io.images import MAX_PIXELS
from cldm.sampling.samplers import SAMPLER_LABELS, SAMPLERS
from cldm.scale.batch import Batch, run_local
from cldm.scale.jobs import RowError, make_job
from cldm.scale.render import Setup
from studio.forms import BasePanel, FieldsPanel, Form
from studio.handlers import Call, tab_endpoints
from studio.panels import MAX_UI_SIZE, results_panel
from studio.service import MAX_SEED_INPUT, Studio
from studio.settings import MAX_UI_STEPS

MAX_PICTURES = 500  # one batch on a shared server
KEEP_BATCHES = 20  # batch folders (inputs, PNGs, zip) kept in the output folder; none older than the limits say
MAX_ZIP_BYTES = 1024**3  # uncompressed, all pictures together (the bytes really unpacked, not what a zip claims)
# One picture: the largest the image loader reads (MAX_PIXELS) as an uncompressed 8-bit RGBA file. A zip entry
# larger than this is no picture we could use, and unpacking stops there (a zip bomb costs this much disk, briefly).
MAX_PICTURE_BYTES = MAX_PIXELS * 4
COPY_CHUNK = 1024**2  # bytes unpacked at a time: memory holds one piece, whatever the zip holds
# A picture's stem in UTF-8 bytes: a 255-byte file name keeps room for `-<n>`, the suffix and write_atomic's
# `.<name>.<pid>.<thread>.part` (the stem becomes the row id, which cldm.scale.jobs shortens again for the PNGs).
MAX_STEM_BYTES = 120
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ZIP_ENCRYPTED = 0x1  # the general-purpose flag bit of an encrypted zip entry
# zipfile's errors for an entry it cannot unpack: damaged data, a compression method it lacks, data cut short
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError)
SHOWN_NAME = 80  # characters of a file name an error message shows


def _shown(name: str) -> str:
    return name if len(name) <= SHOWN_NAME else f"{name[: SHOWN_NAME - 3]}..."


class _Unpacked:
    """Pictures copied into a folder a piece at a time, under unique short names, within the batch's limits."""

    def __init__(self, folder: Path):
        self.folder, self.files, self.taken, self.total = folder, [], set(), 0

    def name(self, name: str) -> str:
        """The file name only (a zip's folders and `..` dropped), its stem at most MAX_STEM_BYTES, unique ignoring
        case."""
        name = Path(name.replace("\\", "/")).name
        suffix = Path(name).suffix.lower()
        stem = Path(name).stem.encode("utf-8", "surrogatepass")[:MAX_STEM_BYTES].decode("utf-8", "ignore")
        stem = stem or "picture"
        unique, n = f"{stem}{suffix}", 1
        while unique.lower() in self.taken:
            n += 1
            unique = f"{stem}-{n}{suffix}"
        self.taken.add(unique.lower())
        return unique

    def copy(self, source: BinaryIO, name: str, what: str) -> None:
        """`source` to the folder as `name` (made unique); InputError, and nothing left, past a limit."""
        if len(self.files) >= MAX_PICTURES:
            raise InputError(f"At most {MAX_PICTURES} pictures per batch.")
        target = self.folder / self.name(name)
        part, size = self.folder / ".unpacking.part", 0
        try:
            with open(part, "wb") as f:
                while chunk := source.read(COPY_CHUNK):
                    size += len(chunk)
                    self.total += len(chunk)
                    if size > MAX_PICTURE_BYTES:
                        raise InputError(f"{what} is larger than {MAX_PICTURE_BYTES // 1024**2} MB: no picture this "
                                         "app reads is that large. Leave it out.")  # fmt: skip
                    if self.total > MAX_ZIP_BYTES:
                        raise InputError(f"Too much to unpack: at most {MAX_PICTURES} pictures and "
                                         f"{MAX_ZIP_BYTES // 1024**2} MB in all per batch.")  # fmt: skip
                    f.write(chunk)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        self.files.append(target)

    def unzip(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    name = info.filename
                    if info.is_dir() or Path(name).name.startswith(".") or not name.lower().endswith(
                            PICTURE_SUFFIXES):  # fmt: skip
                        continue
                    what = f"{_shown(Path(name).name)} in {_shown(path.name)}"
                    if info.flag_bits & ZIP_ENCRYPTED:
                        raise InputError(f"{what} is encrypted: zip the pictures without a password.")
                    try:
                        with z.open(info) as entry:
                            self.copy(entry, name, what)
                    except ZIP_READ_ERRORS as e:
                        raise InputError(f"{what} cannot be unpacked ({type(e).__name__}: {e}).") from None
        except (zipfile.BadZipFile, ValueError, EOFError):
            raise InputError(f"{path.name} is not a readable zip file.") from None


def unpack(uploads: list[str], folder: Path) -> list[Path]:
    """The uploaded pictures (and those inside uploaded zips) copied into `folder`, by file name only (a zip's
    folders and `..` are dropped), names shortened and made unique, other files skipped. A file that is not a
    picture under a picture's name is copied: its row fails with the loader's message. Past a limit (a picture
    larger than any we read, too much in all, a damaged zip): InputError, and nothing copied is left."""
    folder.mkdir(parents=True, exist_ok=True)
    unpacked = _Unpacked(folder)
    try:
        for upload in uploads or []:
            path = Path(upload)
            if path.suffix.lower() == ".zip":
                unpacked.unzip(path)
            elif path.suffix.lower() in PICTURE_SUFFIXES:
                with open(path, "rb") as f:
                    unpacked.copy(f, path.name, _shown(path.name))
    except BaseException:
        for f in unpacked.files:
            f.unlink(missing_ok=True)
        raise
    if not unpacked.files:
        raise InputError("Upload pictures (PNG, JPEG, WebP, BMP) or a .zip of them first.")
    return sorted(unpacked.files)


def prune_batches(out_dir: Path, keep: int, hours: float) -> None:
    """Keep the output folder bounded: the newest `keep` batch folders, none older than `hours`."""
    folders = sorted((f for f in out_dir.glob("batch-*") if f.is_dir()), key=lambda f: f.stat().st_mtime, reverse=True)
    cutoff = time.time() - hours * 3600
    for i, folder in enumerate(folders):
        if i >= keep or folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)


def run_batch(studio: Studio, uploads: list[str], condition: str, preprocessor: str, prompt_template: str,
              negative_prompt: str, seed: int, steps: int, cfg: float, sampler: str, width: int, height: int,
              scale: float, denoise: float, progress, who: str | None = None, base: str | None = None,
              sent_at: float | None = None):  # fmt: skip
    """(gallery, status line, [zip]) for one batch on the base it names (`studio.bases`; None: the page's first);
    the session's Stop ends it after the current picture."""
    cond = next((c for c in CONDITIONS if c.key == condition), None)
    if cond is None or cond.inpaint or not studio.available(cond):
        raise InputError(f"{condition!r} cannot run as a batch here; choose one of the listed conditions.")
    base_path = studio.base_for(base)
    prune_batches(studio.out_dir, KEEP_BATCHES - 1, studio.limits.keep_hours)  # room for this one
    folder = studio.out_dir / f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:  # the unpacked copies of the uploads go when the batch ends: a small zip may unpack to a gigabyte
        pictures = unpack(uploads, folder / "inputs")
        defaults = dict(controlnet=condition, preprocessor=preprocessor, prompt=prompt_template,
                        negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg, sampler=sampler, width=width,
                        height=height, scale=scale)  # fmt: skip
        if cond.img2img:  # tile: each picture is also its own init picture
            defaults["strength"] = denoise
        jobs, bad = [], []
        for i, picture in enumerate(pictures):
            row = {"image": picture.name, "id": picture.stem, "seed": int(seed) + i}
            if cond.img2img:
                row["init_image"] = picture.name
            try:
                jobs.append(make_job(i, row, defaults, folder / "inputs"))
            except InputError as e:
                bad.append(RowError(i, picture.stem, str(e)))
        batch = Batch(jobs, bad, folder / "pictures", Setup(base_path, studio.models_dir))
        flag = studio.stops.start(who, sent_at)
        progress(0, desc=f"batch: {len(jobs)} pictures")
        try:
            summary = run_local(batch, lambda i, n: progress(i / n, desc=f"batch: {i}/{n} pictures"), flag,
                                manager=studio.manager)  # fmt: skip
        finally:
            studio.stops.release(who, flag)
    finally:
        shutil.rmtree(folder / "inputs", ignore_errors=True)
    made = sorted((folder / "pictures").glob("*.png"))
    archive = folder / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
        for f in [*made, batch.manifest.path]:
            z.write(f, f.name)
    status = f"Batch: {summary.line()}" + (" (stopped)" if flag.is_set() else "")
    if summary.errors:
        status += "\n\n" + "\n".join(f"- {studio.public(e)}" for e in summary.errors[:10])
    return [(str(f), f.stem) for f in made], status, [str(archive)]


def batch_tab(studio: Studio, base: BasePanel) -> None:
    conds = [c for c in CONDITIONS if not c.inpaint and studio.available(c)]
    first = conds[0]
    d = studio.defaults
    example = studio.card.examples.get(first.key, {}) if studio.card is not None else {}
    with gr.Row():
        with gr.Column():
            uploads = gr.File(label="Pictures, or a .zip of them", file_count="multiple",
                              file_types=[*PICTURE_SUFFIXES, ".zip"], type="filepath", elem_id="batch-files")  # fmt: skip
            with gr.Row():
                cond = gr.Dropdown([(c.label, c.key) for c in conds], value=first.key, label="Condition",
                                   elem_id="batch-condition")  # fmt: skip
                pre = gr.Dropdown(list(first.preprocessors), value=example.get("preprocessor", first.preprocessors[0]),
                                  label="Preprocessor", elem_id="batch-preprocessor")  # fmt: skip
            words = example.get("prompt", first.example[2]) + (f", {ADDED_PROMPT}" if d.quality_words else "")
            prompt = gr.Textbox(words, label="Prompt template", lines=2,
                                info="{stem} is each picture's file name without its extension", elem_id="batch-prompt")  # fmt: skip
            negative = gr.Textbox(NEGATIVE_PROMPT if d.quality_words else "", label="Negative prompt")
            with gr.Row():
                seed = gr.Number(12345, label="Seed of the first picture (then +1 each)", precision=0, minimum=0,
                                 maximum=MAX_SEED_INPUT)  # fmt: skip
                steps = gr.Slider(1, MAX_UI_STEPS, d.steps, step=1, label="Steps")
                cfg = gr.Slider(1, 30, d.cfg, step=0.5, label="Guidance")
            with gr.Row():
                sampler = gr.Dropdown([(SAMPLER_LABELS[k], k) for k in SAMPLERS], value=d.sampler, label="Sampler")
                width = gr.Slider(64, MAX_UI_SIZE, d.size, step=8, label="Width")
                height = gr.Slider(64, MAX_UI_SIZE, d.size, step=8, label="Height")
            with gr.Row():
                scale = gr.Slider(0, 2, 1.0, step=0.05, label="Control strength")
                strength = gr.Slider(0, 1, 0.75, step=0.05, label="Denoising (tile: img2img from each picture)")
        with gr.Column():
            run, stop, status, gallery = results_panel("batch", run_label="Run the batch", columns=4)
            archive = gr.Files(label="Download all (zip: PNGs with parameters + manifest.jsonl)")
    preprocessors_of = {c.key: c.preprocessors for c in conds}  # condition -> its preprocessors, the default first
    cond.change(
        lambda k: gr.update(choices=list(preprocessors_of[k]), value=preprocessors_of[k][0]), cond, pre, api_name=False
    )

    def job(records, call: Call):
        values, base_name = records
        return run_batch(studio, **values, progress=call.progress, who=call.session, base=base_name,
                         sent_at=call.sent_at)  # fmt: skip

    fields = FieldsPanel(dict(uploads=uploads, condition=cond, preprocessor=pre, prompt_template=prompt,
                              negative_prompt=negative, seed=seed, steps=steps, cfg=cfg, sampler=sampler, width=width,
                              height=height, scale=scale, denoise=strength), optional=("uploads",))  # fmt: skip
    tab_endpoints(studio, "batch", Form(fields, base), job, [gallery, status, archive], run, stop,
                  "Batch: one picture per uploaded picture (or per picture in an uploaded zip), one condition and "
                  "prompt template; a zip of the PNGs and the manifest.", api_name="batch_run")  # fmt: skip
