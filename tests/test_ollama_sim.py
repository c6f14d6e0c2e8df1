"""Tests of the Ollama simulator through the official ``ollama`` client, over real HTTP on 127.0.0.1.

What these pin down about the real client (ollama 0.6.x on httpx 0.28), so the product's tests can rely on
it: an HTTP error status becomes ``ollama.ResponseError`` with ``status_code`` and the server's
``error`` text; an ``{"error": ...}`` line in mid-stream becomes ``ResponseError`` with status_code -1;
a connection cut mid-stream surfaces as ``httpx.RemoteProtocolError`` (the client does not wrap it); and a
refused connection is the builtin ``ConnectionError`` for non-streaming calls but a raw
``httpx.ConnectError`` for streaming ones (the client only wraps ConnectError in its non-streaming path,
and a streaming call connects lazily, on the first ``next()``).

Timing assertions are deliberately loose: they check that a delay happened, never that it was exact.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import GeneratorType
from typing import Any

import httpx
import ollama
import pytest

from tests.helpers import HELLO, MODEL, WEATHER_TOOL
from tests.ollama_sim import (
    BUSY_MESSAGE,
    DEFAULT_THINKING,
    OllamaSimulator,
    default_count_tokens,
    parse_keep_alive,
    split_tokens,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def client(sim: OllamaSimulator) -> Iterator[ollama.Client]:
    with ollama.Client(host=sim.url, timeout=15) as c:
        yield c


def _stream(client: ollama.Client, **kwargs: Any) -> list[ollama.ChatResponse]:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", HELLO)
    return list(client.chat(stream=True, **kwargs))


# -- plain endpoints ---------------------------------------------------------------------------------


def test_root_and_version(sim: OllamaSimulator) -> None:
    root = httpx.get(sim.url + "/")
    assert root.status_code == 200
    assert root.text == "Ollama is running"
    assert httpx.get(sim.url + "/api/version").json() == {"version": "0.12.0-sim"}
    assert httpx.get(sim.url + "/api/nope").status_code == 404
    assert httpx.get(sim.url + "/api/chat").status_code == 405


def test_list_show_ps(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"qwen3:32b", "qwen3:0.6b", "llama3.2:1b"}
    qwen = listed["qwen3:32b"]
    assert qwen.details is not None
    assert qwen.details.family == "qwen3"
    assert qwen.details.parameter_size and qwen.details.quantization_level and qwen.details.format == "gguf"
    assert qwen.size and qwen.digest and qwen.modified_at is not None

    shown = client.show(MODEL)
    assert shown.capabilities == ["completion", "tools", "thinking"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["qwen3.context_length"] == 40960
    assert shown.template
    assert "thinking" not in (client.show("llama3.2:1b").capabilities or [])

    assert client.ps().models == []


def test_show_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.show("mistral:7b")
    assert info.value.status_code == 404
    assert info.value.error == "model 'mistral:7b' not found"


def test_add_and_remove_model(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.add_model("phi4:14b", context_length=16384, capabilities=["completion"])
    assert "phi4:14b" in {m.model for m in client.list().models}
    info = client.show("phi4:14b")
    assert info.capabilities == ["completion"]
    assert info.modelinfo is not None
    assert info.modelinfo["phi4.context_length"] == 16384
    with pytest.raises(ollama.ResponseError) as refused:  # a model without the tools capability
        client.chat(model="phi4:14b", messages=HELLO, tools=[WEATHER_TOOL])
    assert refused.value.status_code == 400
    sim.remove_model("phi4:14b")
    with pytest.raises(ollama.ResponseError) as gone:
        client.chat(model="phi4:14b", messages=HELLO)
    assert gone.value.status_code == 404


# -- chat --------------------------------------------------------------------------------------------


def test_chat_streams_one_token_per_chunk(client: ollama.Client) -> None:
    parts = _stream(client)
    assert len(parts) == 20 + 1  # default_tokens chunks, then the final one
    assert all(not p.done for p in parts[:-1])
    assert all(p.model == MODEL and p.created_at and ISO_UTC.match(p.created_at) for p in parts)
    text = "".join(p.message.content or "" for p in parts)
    assert text.startswith("Echo: hello there lorem ipsum")
    assert len(split_tokens(text)) == 20
    final = parts[-1]
    assert final.done and final.done_reason == "stop"
    assert final.message.role == "assistant" and final.message.content == ""
    assert final.eval_count == 20
    assert final.prompt_eval_count == default_count_tokens(HELLO, [])
    for metric in (
        final.total_duration,
        final.load_duration,
        final.prompt_eval_duration,
        final.eval_duration,
    ):
        assert isinstance(metric, int) and metric > 0


def test_thinking_comes_before_content(client: ollama.Client) -> None:
    parts = _stream(client, think=True)
    kinds = ["thinking" if p.message.thinking else "content" for p in parts[:-1]]
    assert kinds == ["thinking"] * len(split_tokens(DEFAULT_THINKING)) + ["content"] * 20
    assert "".join(p.message.thinking or "" for p in parts) == DEFAULT_THINKING
    assert all(p.message.thinking is None for p in _stream(client, think=False))


def test_think_on_a_model_without_thinking_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3.2:1b", messages=HELLO, think=True)
    assert info.value.status_code == 400
    assert "does not support thinking" in info.value.error


def test_non_streaming_chat(client: ollama.Client) -> None:
    response = client.chat(model=MODEL, messages=HELLO, think=True, stream=False)
    assert response.done and response.done_reason == "stop"
    assert response.message.content is not None
    assert response.message.content.startswith("Echo: hello there")
    assert response.message.thinking == DEFAULT_THINKING
    assert response.eval_count == 20 + len(split_tokens(DEFAULT_THINKING))
    assert response.prompt_eval_count == default_count_tokens(HELLO, [])
    assert response.total_duration and response.eval_duration


def test_scripted_replies_are_fifo_and_can_target_a_model(
    sim: OllamaSimulator, client: ollama.Client
) -> None:
    sim.script(content="for the small one", model="qwen3:0.6b")
    sim.script(content="first reply")
    sim.script(content="second reply", thinking="Hmm, let me see.")
    assert client.chat(model=MODEL, messages=HELLO).message.content == "first reply"
    small = client.chat(model="qwen3:0.6b", messages=HELLO)
    assert small.message.content == "for the small one"
    parts = _stream(client, think=True)
    assert [p.message.content for p in parts if p.message.content] == ["second ", "reply"]
    assert "".join(p.message.thinking or "" for p in parts) == "Hmm, let me see."
    assert (client.chat(model=MODEL, messages=HELLO).message.content or "").startswith("Echo:")


def test_scripted_tool_call(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.script(content="Let me check.", tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    parts = _stream(client, tools=[WEATHER_TOOL])
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    tool_calls = with_calls[0].message.tool_calls
    assert tool_calls is not None
    call = tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris"}
    assert "".join(p.message.content or "" for p in parts) == "Let me check."

    sim.script(tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}])
    response = client.chat(model=MODEL, messages=HELLO, tools=[WEATHER_TOOL])
    assert response.message.content == ""
    assert response.message.tool_calls is not None
    assert response.message.tool_calls[0].function.arguments == {"city": "Oslo"}

    # On the wire, like current Ollama: an id per call and the function's index.
    sim.script(tool_calls=[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    raw = httpx.post(
        sim.url + "/api/chat",
        json={"model": MODEL, "messages": HELLO, "tools": [WEATHER_TOOL], "stream": False},
    ).json()
    calls = raw["message"]["tool_calls"]
    assert [c["function"]["index"] for c in calls] == [0, 1]
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", c["id"]) for c in calls)


def test_num_predict_stops_with_length(client: ollama.Client) -> None:
    parts = _stream(client, options={"num_predict": 5})
    assert len(parts) == 5 + 1
    assert parts[-1].done_reason == "length"
    assert parts[-1].eval_count == 5
    whole = client.chat(model=MODEL, messages=HELLO, options={"num_predict": 1000})
    assert whole.done_reason == "stop"


def test_unknown_model_is_404_with_ollamas_text(client: ollama.Client) -> None:
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as info:
            if stream:
                _stream(client, model="nope:1b")
            else:
                client.chat(model="nope:1b", messages=HELLO)
        assert info.value.status_code == 404
        assert info.value.error == 'model "nope:1b" not found, try pulling it first'


def test_generate_with_a_prompt_streams_a_response(client: ollama.Client) -> None:
    parts = list(client.generate(model=MODEL, prompt="tell me", stream=True))
    assert "".join(p.response or "" for p in parts).startswith("Echo: tell me lorem")
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 20
    single = client.generate(model=MODEL, prompt="tell me", think=True)
    assert single.thinking == DEFAULT_THINKING
    assert (single.response or "").startswith("Echo: tell me")
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope:1b", prompt="x")
    assert info.value.status_code == 404


# -- loading and unloading ---------------------------------------------------------------------------


def test_load_and_unload_through_generate_and_keep_alive(client: ollama.Client) -> None:
    loaded = client.generate(model="qwen3:0.6b")
    assert loaded.done and loaded.done_reason == "load"
    ps = client.ps().models
    assert [m.model for m in ps] == ["qwen3:0.6b"]
    assert ps[0].expires_at is not None and ps[0].size_vram and ps[0].context_length == 4096

    unloaded = client.generate(model="qwen3:0.6b", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []

    client.chat(model=MODEL, messages=HELLO, options={"num_ctx": 8192})
    [entry] = client.ps().models
    assert entry.model == MODEL and entry.context_length == 8192
    client.generate(model=MODEL, keep_alive="0s")
    assert client.ps().models == []

    # A chat with keep_alive 0 loads the model for the request and unloads it right after.
    client.chat(model=MODEL, messages=HELLO, keep_alive=0)
    assert client.ps().models == []
    client.chat(model=MODEL, messages=HELLO, keep_alive="0")
    assert client.ps().models == []


def test_keep_alive_parsing() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0.0
    assert parse_keep_alive("0") == 0.0
    assert parse_keep_alive("0s") == 0.0
    assert parse_keep_alive("5m") == 300.0
    assert parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive(12.5) == 12.5
    assert parse_keep_alive(-1) == float("inf")
    assert parse_keep_alive("-1m") == float("inf")
    assert parse_keep_alive("soon") is None


# -- prompt size and truncation ----------------------------------------------------------------------


def test_num_ctx_truncation_is_silent_but_recorded(sim: OllamaSimulator, client: ollama.Client) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    for i in range(30):
        history.append({"role": "user", "content": f"question number {i} about a long topic " * 3})
        history.append({"role": "assistant", "content": f"answer number {i} " * 5})
    history.append({"role": "user", "content": "and now?"})
    full = default_count_tokens(history, [])
    assert full > 500

    fine = client.chat(model=MODEL, messages=history, options={"num_ctx": 8192})
    assert fine.prompt_eval_count == full
    assert sim.requests[-1]["truncated"] is False

    cut = client.chat(model=MODEL, messages=history, options={"num_ctx": 256})
    assert cut.done_reason == "stop"  # still a normal 200 answer
    assert cut.prompt_eval_count is not None and 0 < cut.prompt_eval_count <= 256
    record = sim.requests[-1]
    assert record["truncated"] is True
    assert record["prompt_eval_count"] == cut.prompt_eval_count
    assert record["prompt_tokens"] == full

    # Without num_ctx nothing is truncated, unless the simulator is given a server default.
    assert client.chat(model=MODEL, messages=history).prompt_eval_count == full
    sim.default_num_ctx = 128
    assert (client.chat(model=MODEL, messages=history).prompt_eval_count or 0) <= 128
    assert sim.requests[-1]["truncated"] is True


def test_count_tokens_is_pluggable(sim: OllamaSimulator, client: ollama.Client) -> None:
    seen: list[int] = []

    def count(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
        seen.append(len(tools))
        return 1000 * len(messages)

    sim.count_tokens = count
    response = client.chat(model=MODEL, messages=HELLO * 3, tools=[WEATHER_TOOL])
    assert response.prompt_eval_count == 3000
    assert seen == [1]


def test_request_log_and_reset(sim: OllamaSimulator, client: ollama.Client) -> None:
    before = time.time()
    client.chat(model=MODEL, messages=HELLO, options={"temperature": 0.1, "seed": 7})
    client.generate(model=MODEL)
    first, second = sim.requests
    assert first["path"] == "/api/chat" and second["path"] == "/api/generate"
    assert first["body"]["options"] == {"temperature": 0.1, "seed": 7}
    assert first["headers"]["user-agent"].startswith("ollama-python/")
    assert first["received_at"] >= before and first["model"] == MODEL
    assert sim.max_active == 1 and sim.active == 0
    sim.script(content="never used")
    sim.fail_next("http_500")
    sim.reset()
    assert sim.requests == [] and sim.max_active == 0 and client.ps().models == []
    assert (client.chat(model=MODEL, messages=HELLO).message.content or "").startswith("Echo:")


# -- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "text"),
    [
        ("not_found", 404, 'model "qwen3:32b" not found, try pulling it first'),
        ("http_500", 500, "llama runner process has terminated: exit status 2"),
        ("http_503", 503, BUSY_MESSAGE),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_http_faults(
    sim: OllamaSimulator, client: ollama.Client, kind: str, status: int, text: str, stream: bool
) -> None:
    sim.fail_next(kind, count=2)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as info:
            _stream(client) if stream else client.chat(model=MODEL, messages=HELLO)
        assert info.value.status_code == status
        assert info.value.error == text
    assert client.chat(model=MODEL, messages=HELLO).done  # the faults are used up
    assert [r["fault"] for r in sim.requests] == [kind, kind, None]


def test_fault_targets_a_model(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("http_503", model="qwen3:0.6b", message="busy now")
    assert client.chat(model=MODEL, messages=HELLO).done
    with pytest.raises(ollama.ResponseError, match="busy now"):
        client.chat(model="qwen3:0.6b", messages=HELLO)


def test_drop_mid_stream(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("drop", after_chunks=3)
    received: list[ollama.ChatResponse] = []
    with pytest.raises(httpx.RemoteProtocolError):
        for part in client.chat(model=MODEL, messages=HELLO, stream=True):
            received.append(part)
    assert len(received) == 3
    assert "".join(p.message.content or "" for p in received) == "Echo: hello there "
    assert sim.wait_idle(2) and sim.active == 0
    assert client.chat(model=MODEL, messages=HELLO).done  # the server is fine afterwards


def test_drop_before_any_response(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("drop", after_chunks=0)
    with pytest.raises(httpx.RemoteProtocolError):
        client.chat(model=MODEL, messages=HELLO)


def test_error_line_mid_stream(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("error_chunk", after_chunks=2, message="out of memory")
    received: list[ollama.ChatResponse] = []
    with pytest.raises(ollama.ResponseError) as info:
        for part in client.chat(model=MODEL, messages=HELLO, stream=True):
            received.append(part)
    assert len(received) == 2
    assert info.value.error == "out of memory" and info.value.status_code == -1


def test_stall_delays_then_continues(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("stall", after_chunks=2, seconds=0.4)
    stamps: list[float] = []
    parts: list[ollama.ChatResponse] = []
    for part in client.chat(model=MODEL, messages=HELLO, stream=True):
        stamps.append(time.perf_counter())
        parts.append(part)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps.index(max(gaps)) == 1  # between the 2nd and the 3rd chunk
    assert max(gaps) >= 0.35
    assert parts[-1].done and len(parts) == 21


def test_stall_then_close(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("stall", after_chunks=1, seconds=0.2, then="close")
    started = time.perf_counter()
    with pytest.raises(httpx.RemoteProtocolError):
        _stream(client)
    assert time.perf_counter() - started >= 0.15


def test_stall_ends_early_when_the_simulator_stops(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.fail_next("stall", after_chunks=1, seconds=60)
    received: list[ollama.ChatResponse] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for part in client.chat(model=MODEL, messages=HELLO, stream=True):
                received.append(part)
        except Exception as exc:
            errors.append(exc)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.perf_counter()
    sim.stop()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert time.perf_counter() - started < 3
    assert len(received) == 1
    assert errors and isinstance(errors[0], httpx.RemoteProtocolError)
    assert sim.wait_idle(2)


def test_unknown_fault_kind_is_refused(sim: OllamaSimulator) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.fail_next("explode")
    with pytest.raises(TypeError, match="unknown fault parameters"):
        sim.fail_next("stall", second=3)


def test_stopped_server_refuses_connections(sim: OllamaSimulator, client: ollama.Client) -> None:
    url = sim.url
    assert client.chat(model=MODEL, messages=HELLO).done
    sim.stop()
    # Streaming: the client lets httpx.ConnectError through (it only wraps it in non-streaming calls),
    # and raises it on the first next(), not when chat() is called.
    stream = client.chat(model=MODEL, messages=HELLO, stream=True)
    with pytest.raises(httpx.ConnectError):
        next(iter(stream))
    # Non-streaming: the client turns it into the builtin ConnectionError with its own message.
    with pytest.raises(ConnectionError, match="Failed to connect to Ollama"):
        client.chat(model=MODEL, messages=HELLO)
    with pytest.raises(ConnectionError):
        client.list()

    async def async_stream() -> None:
        async with ollama.AsyncClient(host=url, timeout=5) as async_client:
            async for _ in await async_client.chat(model=MODEL, messages=HELLO, stream=True):
                pass

    with pytest.raises(httpx.ConnectError):
        asyncio.run(async_stream())

    sim.start()  # same port again
    assert sim.url == url
    assert client.chat(model=MODEL, messages=HELLO).done


# -- speed -------------------------------------------------------------------------------------------


def test_tokens_per_s_pacing(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.default_tokens = 50
    sim.tokens_per_s = 100
    started = time.perf_counter()
    parts = _stream(client)
    elapsed = time.perf_counter() - started
    assert len(parts) == 51
    assert 0.45 <= elapsed < 3.0
    final = parts[-1]
    assert final.eval_duration is not None and final.eval_duration >= 0.4e9


def test_ttft_delays_the_first_chunk(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.ttft = 0.3
    started = time.perf_counter()
    first = next(iter(client.chat(model=MODEL, messages=HELLO, stream=True)))
    assert time.perf_counter() - started >= 0.25
    assert first.message.content == "Echo: "
    assert (client.chat(model=MODEL, messages=HELLO).prompt_eval_duration or 0) >= 0.25e9


def test_fast_stream_keeps_up_with_1000_tokens_per_s(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.default_tokens = 500
    sim.tokens_per_s = 1000
    started = time.perf_counter()
    parts = _stream(client)
    elapsed = time.perf_counter() - started
    assert len(parts) == 501
    assert 0.45 <= elapsed < 2.5


def test_twenty_concurrent_streams(sim: OllamaSimulator) -> None:
    sim.tokens_per_s = 20  # 20 tokens: about a second per stream, so they all overlap
    sim.ttft = 0.05

    async def one(async_client: ollama.AsyncClient, i: int) -> str:
        messages = [{"role": "user", "content": f"client {i}"}]
        text = ""
        async for part in await async_client.chat(model=MODEL, messages=messages, stream=True):
            text += part.message.content or ""
        return text

    async def run_all() -> list[str]:
        async with ollama.AsyncClient(host=sim.url, timeout=15) as async_client:
            return await asyncio.gather(*(one(async_client, i) for i in range(20)))

    texts = asyncio.run(run_all())
    assert [t.split()[:3] for t in texts] == [["Echo:", "client", str(i)] for i in range(20)]
    assert sim.max_active == 20
    assert sim.wait_idle(2) and sim.active == 0


def test_client_disconnect_mid_stream_frees_the_slot(sim: OllamaSimulator, client: ollama.Client) -> None:
    sim.tokens_per_s = 10
    stream = client.chat(model=MODEL, messages=HELLO, stream=True)
    assert isinstance(stream, GeneratorType)
    next(stream)
    next(stream)
    assert sim.active == 1
    stream.close()  # leaves the client's `with` block: the connection is closed mid-body
    assert sim.wait_idle(2)
    assert sim.active == 0
    sim.tokens_per_s = None
    assert client.chat(model=MODEL, messages=HELLO).done


# -- standalone --------------------------------------------------------------------------------------


def test_runs_standalone_until_sigterm() -> None:
    with OllamaSimulator() as probe:  # borrow a free port
        port = probe.port
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "tests.ollama_sim", "--port", str(port), "--tokens-per-s", "500"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
            with ollama.Client(host=f"http://127.0.0.1:{port}", timeout=10) as c:
                assert c.chat(model=MODEL, messages=HELLO).done
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_split_tokens_keeps_whitespace() -> None:
    text = "Hello,  world!\nNew line "
    assert split_tokens(text) == ["Hello,  ", "world!\n", "New ", "line "]
    assert "".join(split_tokens(text)) == text
    assert json.loads(json.dumps(split_tokens(" x"))) == [" ", "x"]
