"""The OpenAI-compatible HTTP API, through the official `openai` client against `clawdbot run` and the simulator.

One server per module, with the contract's defaults of 4 requests generating and 3 waiting, and a rate limit of
3 requests a minute per user; each test uses users of its own, so their limits do not meet.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from clawdbot.api_keys import ApiKeys
from clawdbot.models import Request, Status
from clawdbot.users import Users
from tests.api_helpers import AGENT, AGENT_PROMPT, ApiServer, serve_api

MAX_CONCURRENT = 4
QUEUE_SIZE = 3
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
_names = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from serve_api(
        tmp_path_factory,
        CLAWDBOT_MAX_CONCURRENT=str(MAX_CONCURRENT),
        CLAWDBOT_QUEUE_SIZE=str(QUEUE_SIZE),
        CLAWDBOT_RATE_LIMIT="3/minute",
        CLAWDBOT_RETRIES="0",
    )


@pytest.fixture
def api(server: ApiServer) -> Iterator[ApiServer]:
    """The server with its simulator at full speed and its counters cleared; put back after the test."""
    server.sim.reset()
    server.sim.tokens_per_s = None
    server.sim.default_tokens = 20
    yield server
    server.sim.tokens_per_s = None
    server.sim.wait_idle(30)


def new_user(api: ApiServer, *roles: str) -> tuple[str, str]:
    """A user of this test alone and its API key."""
    return new_users(api, 1, *roles)[0]


def new_users(api: ApiServer, count: int, *roles: str) -> list[tuple[str, str]]:
    names = [f"u{next(_names)}_{int(time.time() * 1000) % 100000}" for _ in range(count)]
    return list(zip(names, api.users_with_keys(names, *roles), strict=True))


def records(api: ApiServer, *users: str) -> list[Request]:
    with api.db.read() as session:
        return list(session.scalars(select(Request).where(Request.user.in_(users)).order_by(Request.id)))


def wait_final(api: ApiServer, *users: str, count: int) -> list[Request]:
    """The users' records once `count` of them are finalized (the server finalizes after the response)."""
    deadline = time.monotonic() + 30
    while True:
        found = records(api, *users)
        if sum(r.status != Status.STARTED for r in found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_non_streaming_answer_has_usage_and_is_recorded_with_the_key_s_user_and_address(
    api: ApiServer,
) -> None:
    user, key = new_user(api)
    answer = api.client(key).chat.completions.create(
        model=f"agent:{AGENT}",
        messages=[{"role": "system", "content": "Answer briefly."}, *HELLO],
        max_tokens=50,
    )
    text = answer.choices[0].message.content or ""
    assert text.startswith("Echo: hello there")
    assert answer.choices[0].finish_reason == "stop" and answer.model == f"agent:{AGENT}"
    assert answer.usage is not None and answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    (record,) = wait_final(api, user, count=1)
    assert (record.status, record.user, record.client_ip, record.agent) == ("ok", user, "127.0.0.1", AGENT)
    assert record.response == text and record.prompt == "hello there"
    assert answer.id == f"chatcmpl-{record.id}"
    # The agent's instructions come first, the client's system message after them, in one system message.
    sent = api.sim.requests[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": f"{AGENT_PROMPT}\n\nAnswer briefly."}
    assert sent["options"]["num_predict"] == 50
    assert json.loads(record.context)[0]["content"].startswith(AGENT_PROMPT)


def test_a_streaming_answer_arrives_in_chunks_with_usage_and_ends_with_done(api: ApiServer) -> None:
    user, key = new_user(api)
    stream = api.client(key).chat.completions.create(
        model=f"agent:{AGENT}", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.startswith("Echo: hello there")
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    )
    (record,) = wait_final(api, user, count=1)
    assert record.status == "ok" and record.response == content and record.client_ip == "127.0.0.1"

    # On the wire: server-sent events ending with [DONE], never compressed or buffered.
    with httpx.stream(
        "POST",
        f"{api.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "gzip"},
        json={"model": f"agent:{AGENT}", "messages": HELLO, "stream": True},
        timeout=30,
    ) as response:
        body = response.read().decode()
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in response.headers
    assert body.endswith("data: [DONE]\n\n") and body.startswith("data: {")


def test_models_are_the_agents_for_staff_and_also_the_server_s_models_for_admins(api: ApiServer) -> None:
    _, staff_key = new_user(api, "staff")
    _, admin_key = new_user(api, "admin", "staff")
    _, auditor_key = new_user(api, "auditor")
    assert [m.id for m in api.client(staff_key).models.list()] == [f"agent:{AGENT}"]
    admin_ids = [m.id for m in api.client(admin_key).models.list()]
    assert admin_ids[0] == f"agent:{AGENT}" and set(api.sim.models) <= set(admin_ids[1:])
    assert list(api.client(auditor_key).models.list()) == []
    # an admin may call a raw model; staff may not
    raw = api.client(admin_key).chat.completions.create(model="llama3.2:1b", messages=HELLO)
    assert raw.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="name an agent as agent:<name>"):
        api.client(staff_key).chat.completions.create(model="llama3.2:1b", messages=HELLO)
    with pytest.raises(openai.PermissionDeniedError, match="needs the staff role"):
        api.client(auditor_key).chat.completions.create(model=f"agent:{AGENT}", messages=HELLO)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_requests_without_a_valid_key_get_401_in_openai_s_shape(api: ApiServer) -> None:
    for method, path in (("GET", "/models"), ("POST", "/chat/completions")):
        response = httpx.request(method, api.base_url + path, json={}, follow_redirects=False)
        assert response.status_code == 401, response.text
        assert "Bearer" in response.headers["www-authenticate"]
        assert _error(response)["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in _error(response)["message"]
    assert httpx.get(api.url + "/v1", follow_redirects=False).status_code == 404  # JSON, not the sign-in page

    with pytest.raises(openai.AuthenticationError, match="not valid"):
        api.client("cb-" + "x" * 43).models.list()
    with pytest.raises(openai.AuthenticationError, match="must be `Bearer <key>`"):
        api.client("k", default_headers={"Authorization": "Basic abc"}).models.list()

    user, key = new_user(api)
    keys = ApiKeys(api.db)
    keys.revoke("admin", keys.all(user)[0].id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        api.client(key).chat.completions.create(model=f"agent:{AGENT}", messages=HELLO)

    user, key = new_user(api)
    assert api.client(key).models.list()
    Users(api.db).set_disabled("admin", user)
    with pytest.raises(openai.AuthenticationError, match="disabled"):
        api.client(key).chat.completions.create(model=f"agent:{AGENT}", messages=HELLO)
    assert records(api, user) == []  # nobody is named by a refused key, so no request was recorded


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (b'{"model": "agent:helper", "messages": [', 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "must be a JSON object"),
        ({"messages": HELLO}, 400, "model", "model is required"),
        ({"model": "agent:nobody", "messages": HELLO}, 404, "model", "there is no agent 'nobody'"),
        ({"model": "agent:helper", "messages": []}, 400, "messages", "non-empty list"),
        ({"model": "agent:helper", "messages": HELLO, "temperature": 5}, 400, "temperature", "from 0 to 2"),
        ({"model": "agent:helper", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
        ({"model": "agent:helper", "messages": HELLO, "n": 2}, 400, "n", "n must be 1"),
        ({"model": "agent:helper", "messages": HELLO, "stop": ["x"]}, 400, "stop", "unsupported parameter"),
        (
            {"model": "agent:helper", "messages": [*HELLO, {"role": "assistant", "content": "hi"}]},
            400,
            "messages[1].role",
            "last message must be the user's",
        ),
        (
            {"model": "agent:helper", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages[0].content",
            "only text content",
        ),
        (
            {"model": "agent:helper", "messages": [{"role": "user", "content": "  "}]},
            400,
            "messages[0].content",
            "last user message is empty",
        ),
    ],
)
def test_bad_requests_get_a_specific_message_and_are_recorded(
    api: ApiServer, body: Any, status: int, param: str | None, message: str
) -> None:
    user, key = new_user(api)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{api.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, content=content
    )
    assert response.status_code == status, response.text
    error = _error(response)
    assert message in error["message"] and error["param"] == param
    (record,) = wait_final(api, user, count=1)
    assert record.status == "rejected_input" and message in record.error
    assert api.sim.requests == []


def test_twenty_concurrent_streams_meet_the_cap_and_the_queue_and_every_one_is_recorded(
    api: ApiServer,
) -> None:
    """4 generate, 3 wait, 13 are answered busy at once with Retry-After; never more than 4 at the model."""
    api.sim.tokens_per_s = 10  # 30 tokens: 3 s per answer, so all 20 arrive while the first 4 generate
    api.sim.default_tokens = 30
    users = new_users(api, 20)
    clients = [api.client(key) for _, key in users]
    start = threading.Barrier(len(clients))
    outcomes: list[tuple[str, str]] = [("", "")] * len(clients)

    def ask(i: int) -> None:
        start.wait()
        try:
            stream = clients[i].chat.completions.create(model=f"agent:{AGENT}", messages=HELLO, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            outcomes[i] = ("ok", text)
        except openai.APIStatusError as exc:
            outcomes[i] = (str(exc.status_code), exc.response.headers.get("retry-after", ""))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    answered = [text for kind, text in outcomes if kind == "ok"]
    busy = [retry_after for kind, retry_after in outcomes if kind == "503"]
    assert len(answered) == MAX_CONCURRENT + QUEUE_SIZE and len(busy) == 20 - len(answered), outcomes
    assert all(text.startswith("Echo: hello there") for text in answered)
    assert all(value.isdigit() and int(value) >= 1 for value in busy)
    assert api.sim.max_active <= MAX_CONCURRENT
    assert len(api.sim.requests) == len(answered)
    found = wait_final(api, *(name for name, _ in users), count=20)
    assert sorted(r.status for r in found) == sorted(["ok"] * len(answered) + ["busy"] * len(busy))
    assert {r.client_ip for r in found} == {"127.0.0.1"}
    assert all("try again" in r.error for r in found if r.status == "busy")


def test_a_client_that_disconnects_mid_stream_frees_its_slot_and_is_recorded_cancelled(
    api: ApiServer,
) -> None:
    api.sim.tokens_per_s = 10  # 100 tokens: 10 s per answer, far longer than the test needs them
    api.sim.default_tokens = 100
    users = new_users(api, MAX_CONCURRENT + 2)
    streams = []
    for _, key in users[:MAX_CONCURRENT]:  # every slot taken, each answer under way
        stream = api.client(key).chat.completions.create(model=f"agent:{AGENT}", messages=HELLO, stream=True)
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)
        assert first.choices[0].delta.content
        streams.append(stream)
    # A client waiting in the queue gives up (nothing is sent while it waits): its place is given back.
    waiting_user, waiting_key = users[MAX_CONCURRENT + 1]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{api.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {waiting_key}"},
            json={"model": f"agent:{AGENT}", "messages": HELLO, "stream": True},
            timeout=httpx.Timeout(5, read=0.5),
        )
    (waited,) = wait_final(api, waiting_user, count=1)
    assert waited.status == "cancelled" and waited.response == "" and waited.queue_ms is None
    assert len(api.sim.requests) == MAX_CONCURRENT
    streams[0].close()  # the first client goes away mid-answer

    (gone,) = wait_final(api, users[0][0], count=1)
    assert gone.status == "cancelled" and gone.response.startswith("Echo:")
    # The slot is free at once: the next request is served while the other three are still generating.
    api.sim.script("short answer")
    quick = api.client(users[MAX_CONCURRENT][1]).chat.completions.create(
        model=f"agent:{AGENT}", messages=HELLO
    )
    assert quick.choices[0].message.content == "short answer"
    others = [r for name, _ in users[1:MAX_CONCURRENT] for r in records(api, name)]
    assert [r.status for r in others] == ["started"] * (MAX_CONCURRENT - 1), "the quick one waited for a slot"
    for stream in streams[1:]:
        stream.close()
    assert api.sim.max_active <= MAX_CONCURRENT
    final = wait_final(api, *(name for name, _ in users), count=len(users))
    assert sorted(r.status for r in final) == ["cancelled"] * (MAX_CONCURRENT + 1) + ["ok"]


def test_the_rate_limit_answers_429_with_retry_after_and_is_recorded(api: ApiServer) -> None:
    user, key = new_user(api)
    client = api.client(key)
    for _ in range(3):
        client.chat.completions.create(model=f"agent:{AGENT}", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=f"agent:{AGENT}", messages=HELLO, stream=True)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert (
        refused.value.code == "rate_limit_exceeded"
        and "3 requests in the last minute" in refused.value.message
    )
    found = wait_final(api, user, count=4)
    assert [r.status for r in found] == ["ok", "ok", "ok", "rate_limited"]


def test_a_model_failing_mid_answer_ends_the_stream_with_an_error_event_and_before_it_with_502(
    api: ApiServer,
) -> None:
    user, key = new_user(api)
    api.sim.fail_next("error_chunk", after_chunks=8)  # 5 chunks of thinking, then 3 of the answer
    stream = api.client(key).chat.completions.create(model=f"agent:{AGENT}", messages=HELLO, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="llama runner process has terminated"):
        for chunk in stream:
            received += [chunk.choices[0].delta.content or ""] if chunk.choices else []
    assert "".join(received) == "Echo: hello there "
    api.sim.fail_next("http_500")
    with pytest.raises(openai.APIStatusError, match="llama runner process has terminated") as failed:
        api.client(key).chat.completions.create(model=f"agent:{AGENT}", messages=HELLO, stream=True)
    assert failed.value.status_code == 502 and failed.value.code == "model_unavailable"
    found = wait_final(api, user, count=2)
    assert [r.status for r in found] == ["error", "error"]
    assert found[0].response == "Echo: hello there " and "part-way" in found[0].error


def test_a_history_longer_than_the_budget_is_cut_like_a_chat_on_the_page(api: ApiServer) -> None:
    user, key = new_user(api)
    turn = "word " * 900  # about 900 tokens a message
    history = [{"role": r, "content": f"{i} {turn}"} for i in range(12) for r in ("user", "assistant")]
    response = httpx.post(
        f"{api.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": f"agent:{AGENT}", "messages": [*history, {"role": "user", "content": "and now?"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    dropped = int(response.headers["x-clawdbot-dropped-messages"])
    assert dropped > 0 and response.headers["x-clawdbot-request-id"] == response.json()["id"].split("-")[1]
    (record,) = wait_final(api, user, count=1)
    assert record.truncated and record.dropped_messages == dropped
    assert record.context_tokens_after is not None and record.context_tokens_after <= 7500
    sent = api.sim.requests[-1]["body"]["messages"]
    assert sent[0]["content"] == AGENT_PROMPT and sent[-1] == {"role": "user", "content": "and now?"}
    assert len(sent) == 1 + len(history) - dropped + 1
