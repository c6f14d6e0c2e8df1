"""The sign-in route and the page guard, over HTTP in-process (Starlette's test client) with a real database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clawdbot.auth import SESSION_COOKIE
from clawdbot.db import Database
from clawdbot.models import Event
from clawdbot.runtime import Runtime
from clawdbot.settings import load_settings
from clawdbot.web import CSRF_COOKIE, SignInRedirectMiddleware, routes, safe_next
from tests.ollama_sim import VERSION, OllamaSimulator

PASSWORD = "correct horse battery"


@pytest.fixture
def runtime(workdir: Path, db: Database) -> Iterator[Runtime]:
    rt = Runtime(load_settings(database_url=db.url, data_dir="data", backend="ollama"))
    rt.users.add("admin", "alice", ["staff"], PASSWORD)
    yield rt
    rt.close()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    async def streamlit_page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the Streamlit app")

    app = Starlette(
        routes=[*routes(lambda: runtime), Route("/{path:path}", streamlit_page)],
        middleware=[Middleware(SignInRedirectMiddleware, runtime=lambda: runtime)],
    )
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client


def sign_in(
    client: TestClient, name: str, password: str, next_path: str = "/"
) -> Any:  # the test client's response type depends on which httpx it found
    form = client.get("/signin", params={"next": next_path})
    assert form.status_code == 200
    csrf = client.cookies.get(CSRF_COOKIE)
    return client.post(
        "/signin",
        data={"name": name, "password": password, "csrf": csrf, "next": next_path},
        follow_redirects=False,
    )


def actions(runtime: Runtime) -> list[str]:
    with runtime.db.read() as session:
        return list(session.scalars(select(Event.action).order_by(Event.id)))


def test_a_page_load_without_a_session_goes_to_sign_in(client: TestClient) -> None:
    response = client.get("/agents?x=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/signin?next=%2Fagents%3Fx%3D1"
    # assets and Streamlit's own endpoints are not pages
    assert client.get("/static/app.js", follow_redirects=False).status_code == 200


def test_signing_in_sets_a_signed_httponly_cookie_and_returns_to_the_page(
    client: TestClient, runtime: Runtime
) -> None:
    response = sign_in(client, "alice", PASSWORD, "/chat")
    assert response.status_code == 303
    assert response.headers["location"] == "/chat"
    set_cookie = next(
        h for k, h in response.headers.multi_items() if k == "set-cookie" and SESSION_COOKIE in h
    )
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie and "Max-Age=43200" in set_cookie
    cookie = client.cookies.get(SESSION_COOKIE)
    assert cookie and runtime.auth.resolve(cookie) is not None
    page = client.get("/chat", follow_redirects=False)
    assert page.status_code == 200 and page.text == "the Streamlit app"
    assert page.headers["x-frame-options"] == "SAMEORIGIN"
    assert actions(runtime)[-1] == "auth.sign_in"


def test_a_wrong_password_is_refused_recorded_and_says_nothing_about_which_part(
    client: TestClient, runtime: Runtime
) -> None:
    for name in ("alice", "nobody"):
        response = sign_in(client, name, "wrong password!")
        assert response.status_code == 401
        assert "wrong user name or password" in response.text
        assert SESSION_COOKIE not in client.cookies
    assert actions(runtime)[-2:] == ["auth.sign_in_failed", "auth.sign_in_failed"]


def test_repeated_failures_are_throttled_even_with_the_right_password(
    client: TestClient, runtime: Runtime
) -> None:
    for _ in range(5):
        assert sign_in(client, "alice", "wrong password!").status_code == 401
    response = sign_in(client, "alice", PASSWORD)
    assert response.status_code == 429
    assert "too many failed sign-ins" in response.text
    assert int(response.headers["retry-after"]) >= 1
    assert actions(runtime)[-1] == "auth.sign_in_throttled"


def test_a_disabled_account_is_refused(client: TestClient, runtime: Runtime) -> None:
    runtime.users.set_disabled("admin", "alice")
    response = sign_in(client, "alice", PASSWORD)
    assert response.status_code == 401
    assert "disabled" in response.text


def test_a_post_without_the_form_token_is_refused(client: TestClient) -> None:
    response = client.post(
        "/signin", data={"name": "alice", "password": PASSWORD, "next": "/"}, follow_redirects=False
    )
    assert response.status_code == 400
    assert SESSION_COOKIE not in client.cookies


def test_user_text_is_escaped_on_the_sign_in_page(client: TestClient) -> None:
    response = sign_in(client, "<script>alert(1)</script>", "x")
    assert "<script>alert(1)</script>" not in response.text
    assert "&lt;script&gt;" in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/chat?c=1", "/chat?c=1"), ("//evil.example/x", "/"), ("https://evil.example", "/"),
     ("/\\evil.example", "/"), ("", "/"), ("/a\r\nSet-Cookie: x", "/")],
)  # fmt: skip
def test_the_return_path_stays_on_this_site(target: str, expected: str) -> None:
    assert safe_next(target) == expected


def test_a_revoked_session_cookie_is_dropped_on_the_next_page_load(
    client: TestClient, runtime: Runtime
) -> None:
    sign_in(client, "alice", PASSWORD)
    identity = runtime.auth.resolve(client.cookies.get(SESSION_COOKIE))
    assert identity is not None
    runtime.auth.sign_out(identity)
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303
    assert SESSION_COOKIE in response.headers["set-cookie"] and "Max-Age=0" in response.headers["set-cookie"]


def test_with_single_sign_on_the_page_links_to_each_provider_and_lets_its_flow_through(
    runtime: Runtime,
) -> None:
    async def streamlit_page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the Streamlit app")

    app = Starlette(
        routes=[*routes(lambda: runtime, ["google", "okta"]), Route("/{path:path}", streamlit_page)],
        middleware=[Middleware(SignInRedirectMiddleware, runtime=lambda: runtime, sso=True)],
    )
    with TestClient(app, base_url="http://127.0.0.1") as client:
        form = client.get("/signin").text
        assert 'href="/?sso=google"' in form and 'href="/?sso=okta"' in form
        assert client.get("/?sso=google", follow_redirects=False).status_code == 200
        assert client.get("/oauth2callback?code=x", follow_redirects=False).status_code == 200
        assert client.get("/chat", follow_redirects=False).status_code == 303


def test_health_is_ok_with_the_model_server_and_degraded_without_it(workdir: Path, db: Database) -> None:
    with OllamaSimulator() as sim:
        rt = Runtime(
            load_settings(database_url=db.url, data_dir="data", backend="ollama", ollama_host=sim.url)
        )
        app = Starlette(routes=routes(lambda: rt))
        with TestClient(app) as client:
            healthy = client.get("/health")
            assert healthy.status_code == 200
            body = healthy.json()
            assert body["status"] == "ok"
            assert body["database"]["status"] == "ok"
            assert body["ollama"] == {"status": "ok", "host": sim.url, "version": VERSION}
            # no NVIDIA driver on this machine: said plainly, and not a reason to be unhealthy
            assert body["gpu"]["status"] in ("ok", "unavailable") and body["gpu"]["message"]
            sim.stop()
            degraded = client.get("/health")
            assert degraded.status_code == 200
            assert degraded.json()["status"] == "degraded"
            assert degraded.json()["ollama"]["status"] == "unreachable"
            assert degraded.json()["database"]["status"] == "ok"
        rt.close()


def test_health_hides_credentials_in_the_model_server_address(workdir: Path, db: Database) -> None:
    rt = Runtime(
        load_settings(
            database_url=db.url, data_dir="data", backend="ollama", ollama_host="http://u:hunter2@127.0.0.1:9"
        )
    )
    with TestClient(Starlette(routes=routes(lambda: rt))) as client:
        text = client.get("/health").text
    rt.close()
    assert "hunter2" not in text and "127.0.0.1:9" in text
