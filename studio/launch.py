"""What `python app.py` does around the page: logins for a shared link, quiet start-up, and the launch behind the
gate."""

from __future__ import annotations

import warnings
from pathlib import Path

import gradio as gr

from studio.a1111.server import ASGIApp, dispatch, is_api_path
from studio.gate import middleware


def read_auth(pairs: list[str], auth_file: str | None) -> list[tuple[str, str]]:
    """`user:password` pairs from --auth and from an auth file (one pair per line; blank lines and # comments
    skipped)."""
    lines = list(pairs)
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as e:
            raise SystemExit(f"error: cannot read the auth file {auth_file}: {e.strerror}") from e
        lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    out = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: --auth and auth file lines take the form user:password (both non-empty)")
        out.append((user, password))
    return out


def quiet_dependencies() -> None:
    """The dependencies' import-time notices (controlnet-aux without mediapipe, timm's model registry, deprecations)
    say nothing a user of this app can act on."""
    for pattern in (r".*mediapipe.*", r"Overwriting .* in registry", r".*deprecated.*", r".*will be removed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


MAX_FILE_SIZE = "20mb"  # the largest upload Gradio takes
# A condition tab that cannot run here (`forms.tab_id`: its id ends in "-off"; Gradio gives its tab-bar button that id
# + "-button"): its name and its widgets greyed, its note (`forms.tab_note`) set off in the accent colour.
PAGE_CSS = """
button[role="tab"][id$="-tab-off-button"] { opacity: 0.45; }
[id$="-tab-off"] .block:not(.cldm-tab-note), [id$="-tab-off"] button { filter: grayscale(1); opacity: 0.7; }
.block.cldm-tab-note { border-left: 4px solid var(--color-accent); padding-left: 10px; }
"""


def layers(api: ASGIApp | None = None) -> list:
    """The middleware in front of every route: the gate, then (with an `api`) the A1111 API's dispatch, so the API
    paths pass the same logins (HTTP Basic besides the page's cookie) before they reach it."""
    return middleware() if api is None else [*middleware(basic=is_api_path), dispatch(api)]


def serve(demo: gr.Blocks, api: ASGIApp | None = None, **options):
    """`demo.launch(**options)` with the gate (`gate.py`) in front of every route, the A1111 API (`api`, from
    `a1111.server.api_app`; None: none) beside the page, the upload size cap and the page's CSS.

    Errors Gradio raises itself before a handler runs are not shown (they name server paths, e.g. "Cannot move
    /srv/app/file:/etc/passwd ..."); every handler's own error is a gr.Error, which Gradio always shows."""
    return demo.launch(
        app_kwargs={"middleware": layers(api)}, max_file_size=MAX_FILE_SIZE, show_error=False, css=PAGE_CSS, **options
    )
