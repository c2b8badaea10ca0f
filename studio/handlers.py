"""What wraps every click handler: errors shown the user's way, the Stop button, the live preview stream, and the
one way a tab's buttons become its API (`tab_endpoints`)."""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch

import annotators
from cldm.errors import CldmError, Stopped
from studio.forms import Form
from studio.gate import arrived
from studio.service import Studio

log = logging.getLogger("app")
PREVIEW_SIDE = 256  # live previews (latent-sized) are enlarged to at least this short side, nearest-neighbour


def _shown(studio: Studio, fn, e: Exception) -> gr.Error:
    """The error the browser gets for `e`: our errors by their message (no server paths, escaped), anything else
    by its type only, with the traceback in the log."""
    if isinstance(e, (CldmError, annotators.AnnotatorError)):
        message = studio.public(str(e))
        log.info("refused %s: %s", fn.__name__, message)
        return gr.Error(message, print_exception=False)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        log.warning("out of GPU memory in %s", fn.__name__)
        return gr.Error("Out of GPU memory: lower the resolution or the number of images.", print_exception=False)
    if isinstance(e, gr.Error):
        return e
    log.error("unexpected error in %s", fn.__name__, exc_info=e)
    return gr.Error(f"Internal error ({type(e).__name__}); the server log has the details.", print_exception=False)


def friendly(studio: Studio):
    """Handler wrapper (plain functions and generators): errors become a message in the UI and one log line."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)  # Gradio reads the signature (the progress parameter) through __wrapped__
            def streaming(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    raise _shown(studio, fn, e) from e

            return streaming

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise _shown(studio, fn, e) from e

        return wrapped

    return wrap


def session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def stop_button(studio: Studio, stop: gr.Button, key: str) -> None:
    """Stop: this browser session's running generation ends at its next step boundary and frees the model lock (it
    runs outside the queue's one-at-a-time limit, so it is answered while the generation runs)."""

    def do_stop(request: gr.Request = None):
        gr.Info(studio.stops.stop(session(request)))

    stop.click(do_stop, None, None, api_name=f"{key}_stop", concurrency_limit=None, queue=False,
               api_description="Stop this client session's running generation (at its next step).")  # fmt: skip


def preview_picture(p: np.ndarray) -> np.ndarray:
    k = max(1, -(-PREVIEW_SIDE // max(1, min(p.shape[:2]))))
    return np.repeat(np.repeat(p, k, axis=0), k, axis=1)


def streamed(studio: Studio, work: Callable, progress, who: str | None) -> Iterator:
    """Run `work(progress, preview)` (a `studio.generate` call) in a worker thread; yield the live previews to the
    gallery while it samples, then its result. Gradio's progress bar is driven from the handler's own thread. A Stop
    is no error: the status line says where it stopped, the gallery keeps this run's last preview and no file is
    offered. A browser that goes away stops the generation at its next step (nobody would see the pictures)."""
    events: queue.Queue = queue.Queue()
    box: dict = {}

    def target():
        try:
            box["out"] = work(
                lambda f, desc="": events.put(("progress", f, desc)), lambda p: events.put(("preview", p))
            )
        except BaseException as e:  # handed to the handler's thread, which raises it
            box["err"] = e
        finally:
            events.put(None)

    worker = threading.Thread(target=target, daemon=True, name="generate")
    worker.start()
    previewed = False
    try:
        while (event := events.get()) is not None:
            if event[0] == "progress":
                progress(event[1], desc=event[2])
            else:
                previewed = True
                yield [(preview_picture(p), "preview") for p in event[1]], gr.skip(), gr.skip()
    finally:
        if worker.is_alive():  # the generator was closed: the client left
            studio.stops.stop(who)
    if isinstance(box.get("err"), Stopped):
        log.info("stopped: %s", box["err"])
        yield gr.skip() if previewed else [], studio.public(str(box["err"])), None
        return
    if "err" in box:
        raise box["err"]
    yield box["out"]


@dataclass(frozen=True)
class Call:
    """One Generate as its job sees it: who sent it and when (for Stop), where its progress and live previews go."""

    session: str | None
    sent_at: float | None
    progress: Callable[..., None]
    preview: Callable[[np.ndarray], None]


@dataclass(frozen=True)
class Hint:
    """A tab's hint button: `make(records)` gives the picture for `output` from the form's records."""

    button: gr.Button
    form: Form
    make: Callable[[tuple], object]
    output: gr.components.Component


def optional_parameters(fn: Callable, names: tuple[str, ...]) -> inspect.Signature:
    """`fn`'s signature with `names` as keyword parameters that default to None, before its **values: Gradio's API
    then lets a client leave them out (a positional call that stops before them still works), and passes them in
    **values like the others."""
    sig = inspect.signature(fn)
    *head, rest = sig.parameters.values()
    added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    return sig.replace(parameters=[*head, *added, rest])


def tab_endpoints(studio: Studio, key: str, form: Form, job: Callable[[tuple, Call], object], outputs: list,
                  run: gr.Button, stop: gr.Button, about: str, hint: Hint | None = None,
                  api_name: str | None = None) -> None:  # fmt: skip
    """A tab's API, the same for every kind of tab: `/<key>_generate` (or `api_name`) takes the form's widgets by
    name and runs `job(records, call)` in a worker thread, streaming its live previews; `/<key>_hint` where the tab
    has a hint; `/<key>_stop`. `about` is the generate endpoint's description in the API page."""

    @friendly(studio)
    def generate(request: gr.Request, progress=gr.Progress(), **values):  # noqa: B008 (Gradio's progress bar)
        records, who, sent = form.read(values), session(request), arrived(request)
        yield from streamed(studio, lambda prog, show: job(records, Call(who, sent, prog, show)), progress, who)

    generate.__signature__ = optional_parameters(generate, form.optional)

    # `outputs` are (gallery, status line, files): Gradio's progress bar covers the status line only, so that the
    # live previews in the gallery stay in sight
    run.click(generate, None, outputs, inputs_kwargs=form.named, api_name=api_name or f"{key}_generate",
              api_description=about, show_progress="full", show_progress_on=outputs[1])  # fmt: skip
    if hint is not None:

        @friendly(studio)
        def make_hint(**values):
            return hint.make(hint.form.read(values))

        hint.button.click(make_hint, None, hint.output, inputs_kwargs=hint.form.named, api_name=f"{key}_hint",
                          api_description="The hint the tab's preprocessor makes of the picture, at the picture "
                          "size.")  # fmt: skip
    stop_button(studio, stop, key)
