"""HTTP routes served by the same process as the Streamlit UI, and the middleware around them.

The sign-in page is plain server-rendered HTML rather than a Streamlit page: only an HTTP response can set an
HttpOnly cookie, and a form post needs no JavaScript. Every page load without a valid session is sent there.
"""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Callable, Sequence
from functools import partial
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clawdbot.auth import SESSION_COOKIE, SESSION_LIFETIME, SignInRefusedError
from clawdbot.errors import ClawdbotError
from clawdbot.health import check_health
from clawdbot.openai_api import API_PREFIX, openai_routes
from clawdbot.runtime import Runtime

CSRF_COOKIE = "clawdbot_csrf"
SIGN_IN_PATH = "/signin"
HEALTH_PATH = "/health"
# Streamlit serves its index page for "/" and every page's url_path: one segment, no dot.
_PAGE_PATH = re.compile(r"^/(?:[A-Za-z0-9_-]+/?)?$")
# Routes that look like page paths but must open without a session: ours, and Streamlit's OIDC callback.
OPEN_PATHS = frozenset({SIGN_IN_PATH, HEALTH_PATH, "/oauth2callback"})
# Streamlit's own identity cookie after `st.login` (OIDC); the app checks it against our accounts.
SSO_COOKIE = "_streamlit_user"
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "Referrer-Policy": "same-origin",
}
_SIGN_IN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"

RuntimeSource = Callable[[], Runtime]


def safe_next(target: str | None) -> str:
    """A same-site path to return to after sign-in; anything else (another host, a scheme) becomes "/"."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 32 for c in target):
        return "/"
    return target


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _sign_in_page(
    csrf: str, next_path: str, message: str = "", name: str = "", sso_providers: Sequence[str] = ()
) -> str:
    notice = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    sso = "".join(
        f'<a class="sso" href="/?sso={quote(provider, safe="")}">Sign in with '
        f"{html.escape(provider.title() if provider else 'single sign-on')}</a>"
        for provider in sso_providers
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in · clawdbot</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f6f7f9; margin: 0; }}
main {{ max-width: 22rem; margin: 12vh auto; background: #fff; padding: 2rem; border-radius: .6rem;
  box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
h1 {{ font-size: 1.4rem; margin: 0 0 1.2rem; }}
label {{ display: block; margin: .8rem 0 .3rem; font-size: .9rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .55rem; font-size: 1rem; border: 1px solid #bbb;
  border-radius: .3rem; }}
button {{ margin-top: 1.3rem; width: 100%; padding: .6rem; font-size: 1rem; border: 0; border-radius: .3rem;
  background: #ff4b4b; color: #fff; cursor: pointer; }}
.error {{ color: #a40000; background: #fde8e8; padding: .6rem; border-radius: .3rem; }}
.sso {{ display: block; margin-top: .8rem; text-align: center; padding: .55rem; border: 1px solid #bbb;
  border-radius: .3rem; color: #222; text-decoration: none; }}
</style></head>
<body><main>
<h1>🦀 clawdbot</h1>
{notice}
<form method="post" action="{SIGN_IN_PATH}">
<input type="hidden" name="csrf" value="{html.escape(csrf)}">
<input type="hidden" name="next" value="{html.escape(next_path)}">
<label for="name">User name</label>
<input id="name" name="name" autocomplete="username" required autofocus value="{html.escape(name)}">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>
{sso}
</main></body></html>"""


def _page_response(
    request: Request,
    next_path: str,
    message: str = "",
    name: str = "",
    status: int = 200,
    providers: Sequence[str] = (),
) -> HTMLResponse:
    csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
    body = _sign_in_page(csrf, next_path, message, name, providers)
    response = HTMLResponse(body, status_code=status)
    response.headers["Content-Security-Policy"] = _SIGN_IN_CSP
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(
        CSRF_COOKIE,
        csrf,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/signin",
    )
    return response


def sign_in_routes(runtime: RuntimeSource, sso_providers: Sequence[str] = ()) -> list[BaseRoute]:
    """GET shows the form; POST checks it, sets the session cookie and returns to the page asked for.

    `sso_providers` are the OIDC providers configured for `st.login`; the page links to each.
    """
    page = partial(_page_response, providers=tuple(sso_providers))

    async def show(request: Request) -> Response:
        return page(request, safe_next(request.query_params.get("next")))

    async def submit(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("name") or "")
        password = str(form.get("password") or "")
        next_path = safe_next(str(form.get("next") or "/"))
        cookie_csrf = request.cookies.get(CSRF_COOKIE, "")
        form_csrf = str(form.get("csrf") or "")
        if not cookie_csrf or not secrets.compare_digest(cookie_csrf, form_csrf):
            return page(
                request, next_path, "The sign-in form expired. Please sign in again.", name, status=400
            )
        try:
            rt = runtime()
            cookie, _identity = await run_in_threadpool(
                rt.auth.sign_in, name, password, client_ip(request), request.headers.get("user-agent", "")
            )
        except SignInRefusedError as exc:
            status = 429 if exc.retry_after else 401
            refused = page(request, next_path, exc.message, name, status=status)
            if exc.retry_after:
                refused.headers["Retry-After"] = str(int(exc.retry_after))
            return refused
        except ClawdbotError as exc:
            return page(request, next_path, f"clawdbot cannot sign you in now: {exc.message}", name, 503)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(SESSION_LIFETIME.total_seconds()),
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        response.delete_cookie(CSRF_COOKIE, path="/signin")
        return response

    return [Route(SIGN_IN_PATH, show, methods=["GET"]), Route(SIGN_IN_PATH, submit, methods=["POST"])]


class SignInRedirectMiddleware:
    """Sends a page load without a valid session to the sign-in page, and adds security headers.

    The Streamlit script checks the session again on every run; this only spares signed-out visitors an
    empty app. WebSocket and asset requests pass through untouched.
    """

    def __init__(self, app: ASGIApp, runtime: RuntimeSource, sso: bool = False) -> None:
        self.app = app
        self.runtime = runtime
        self.sso = sso

    def _signed_in(self, cookie: str | None) -> bool:
        return self.runtime().auth.resolve(cookie) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        if (
            request.method == "GET"
            and _PAGE_PATH.match(path)
            # the HTTP API checks each request's key itself and answers JSON 401, never a redirect
            and path != API_PREFIX
            and not path.startswith(API_PREFIX + "/")
            and path.rstrip("/") not in OPEN_PATHS
            # with single sign-on the app itself starts `st.login` (?sso=) and checks Streamlit's identity
            and not (self.sso and ("sso" in request.query_params or SSO_COOKIE in request.cookies))
        ):
            cookie = request.cookies.get(SESSION_COOKIE)
            try:
                signed_in = await run_in_threadpool(self._signed_in, cookie)
            except ClawdbotError:
                signed_in = True  # let the page load: the app itself says what is wrong with the database
            if not signed_in:
                target = path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(f"{SIGN_IN_PATH}?next={quote(target, safe='')}", status_code=303)
                if cookie:
                    response.delete_cookie(SESSION_COOKIE, path="/")
                await response(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in _SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def health_route(runtime: RuntimeSource) -> BaseRoute:
    """`GET /health` per the contract; open without a session, and it never shows secrets."""

    async def health(request: Request) -> Response:
        try:
            report = await run_in_threadpool(check_health, runtime())
        except ClawdbotError as exc:  # the runtime itself cannot open: the database is the cause
            report = {
                "status": "degraded",
                "database": {"status": "error", "error": exc.message},
                "ollama": {"status": "unknown"},
                "gpu": {"status": "unknown"},
            }
        return JSONResponse(report, headers={"Cache-Control": "no-store"})

    return Route(HEALTH_PATH, health, methods=["GET"])


def routes(runtime: RuntimeSource, sso_providers: Sequence[str] = ()) -> list[BaseRoute]:
    """Every HTTP route clawdbot adds beside the Streamlit UI."""
    return [*sign_in_routes(runtime, sso_providers), health_route(runtime), *openai_routes(runtime)]


def middleware(runtime: RuntimeSource, sso: bool = False) -> list[Middleware]:
    return [Middleware(SignInRedirectMiddleware, runtime=runtime, sso=sso)]
