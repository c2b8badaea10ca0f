"""The server's front door, in front of every route Gradio (and anything mounted beside it) serves.

- With logins (`--auth`), a request without a valid login cookie reaches nothing but a small login page and Gradio's
  `/login`: Gradio itself leaves its page config (every endpoint, the model lists, the upload folder), `/cancel`
  (anyone could stop anyone's job with its session hash and event id) and the heartbeat open. The A1111 API's
  paths (`studio/a1111`) also take HTTP Basic credentials of the same logins, as A1111's --api-auth does; without
  either they answer 401 with `WWW-Authenticate: Basic`.
- Every request is stamped with the time it arrived, so a handler knows when its Generate was sent: a Stop pressed
  after that and before the handler ran (while the job waited in the queue) still stops it.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import cookie_parser

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# what a browser without a login may reach: our login page, Gradio's login form handler, and the start-up call that
# Gradio's own launch() makes to the server (it only starts the queue, once; it returns a boolean)
OPEN_PATHS = frozenset({"/", "/login", "/login/", "/favicon.ico", "/gradio_api/startup-events"})
ARRIVED = "cldm_arrived"  # the request scope's state key: time.monotonic() when the request reached the server

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} - log in</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f5f5f7;display:flex;min-height:100vh;margin:0;
align-items:center;justify-content:center}}
form{{background:#fff;padding:2rem;border-radius:12px;box-shadow:0 2px 12px #0002;width:min(22rem,90vw)}}
h1{{font-size:1.3rem;margin:0 0 1rem}} label{{display:block;margin:.6rem 0 .2rem;font-size:.9rem}}
input{{width:100%;box-sizing:border-box;padding:.5rem;border:1px solid #ccc;border-radius:6px;font-size:1rem}}
button{{margin-top:1.2rem;width:100%;padding:.6rem;border:0;border-radius:6px;background:#f97316;color:#fff;
font-size:1rem;cursor:pointer}} #why{{color:#b91c1c;min-height:1.2rem;margin-top:.8rem;font-size:.9rem}}
</style></head><body>
<form id="login"><h1>{title}</h1>
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button><div id="why" role="alert"></div></form>
<script>
document.getElementById("login").addEventListener("submit", async (e) => {{
  e.preventDefault();
  const r = await fetch("login", {{method: "POST", body: new FormData(e.target), credentials: "same-origin"}});
  if (r.ok) location.reload();
  else document.getElementById("why").textContent = "Wrong user name or password.";
}});
</script></body></html>
"""


def logged_in(app: Any, cookies: dict[str, str]) -> bool:
    """Whether the request carries a login Gradio gave out (its cookies, as Gradio's own check reads them)."""
    cookie_id = getattr(app, "cookie_id", "")
    tokens = getattr(app, "tokens", {})
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        token = cookies.get(name)
        if token is not None and token in tokens:
            return True
    return False


def basic_login(auth: Any, authorization: str) -> bool:
    """Whether an `Authorization: Basic ...` header names a login of the server's (Gradio's `app.auth`: a dict of
    user -> password, or a function)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    if not sep:
        return False
    if callable(auth):
        return bool(auth(user, password))
    expected = auth.get(user) if isinstance(auth, dict) else None
    return expected is not None and secrets.compare_digest(password.encode(), str(expected).encode())


def _header(scope: Scope, wanted: bytes) -> str:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return value.decode("latin-1")
    return ""


def _cookies(scope: Scope) -> dict[str, str]:
    cookie = _header(scope, b"cookie")
    return cookie_parser(cookie) if cookie else {}


class Gate:
    """ASGI middleware: stamps each request's arrival; with logins, refuses anonymous requests to every route but the
    login page (401 JSON for API calls; the login page for a browser's GET of the root)."""

    def __init__(self, app: Callable, title: str = "ControlNet studio", basic: Callable[[str], bool] | None = None):
        self.app = app
        self.page = LOGIN_PAGE.format(title=html.escape(title)).encode()
        self.basic = basic  # which paths also take HTTP Basic credentials (the A1111 API's, as its clients send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[ARRIVED] = time.monotonic()
        server = scope.get("app")
        if getattr(server, "auth", None) is None or logged_in(server, _cookies(scope)):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if self.basic is not None and scope["type"] == "http" and self.basic(path):
            if basic_login(server.auth, _header(scope, b"authorization")):
                await self.app(scope, receive, send)
            else:  # a browser asks for the login; a client (webuiapi's set_auth) sends it
                body = json.dumps({"detail": "Not authenticated: send HTTP Basic credentials (a user:password "
                                   "of the server's --auth)."}).encode()  # fmt: skip
                await _respond(send, 401, "application/json", body, [(b"www-authenticate", b"Basic")])
        elif path == "/" and scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            await _respond(send, 200, "text/html; charset=utf-8", self.page)
        elif path in OPEN_PATHS and path != "/":
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = json.dumps({"detail": {"error": "Not authenticated: log in first (POST /login)."}}).encode()
            await _respond(send, 401, "application/json", body)


def route_path(scope: Scope) -> str:
    """The request's path below the app's root path (a reverse proxy may mount the app under a prefix)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return "/" + path.lstrip("/")


async def _respond(send: Send, status: int, kind: str, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middleware(basic: Callable[[str], bool] | None = None) -> list[Middleware]:
    """What `Blocks.launch(app_kwargs={"middleware": ...})` takes: the gate in front of every route; the paths
    `basic` picks also take HTTP Basic credentials."""
    return [Middleware(Gate, basic=basic)]


def arrived(request: Any) -> float | None:
    """When the HTTP request behind a Gradio handler call reached the server (time.monotonic()), if the gate saw it."""
    inner = getattr(request, "request", None)
    state = getattr(inner, "scope", {}).get("state", {}) if inner is not None else {}
    return state.get(ARRIVED)
