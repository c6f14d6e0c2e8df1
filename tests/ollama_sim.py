"""An in-process simulator of the Ollama HTTP API, for tests and benchmarks.

Why it exists: clawdbot talks to Ollama only through the official ``ollama`` Python client (httpx
underneath), and no Ollama server (nor a GPU) is available where the tests and CI run. This module serves
the parts of the Ollama API that clawdbot uses over real HTTP/1.1 on 127.0.0.1, with real NDJSON
streaming (``Transfer-Encoding: chunked``, one chunk per token, flushed as it is written), so that
``ollama.Client`` and ``ollama.AsyncClient`` cannot tell it from the real server. On top of that it can be
slowed down (time to first token, tokens per second), scripted (replies, thinking, tool calls) and told to
fail (HTTP errors, dropped or stalled streams, errors in mid-stream), and it records what it received.

It uses the standard library only. Wire shapes follow Ollama's ``server/routes.go`` and ``api/types.go``
(0.12 era) and the ``ollama`` 0.6.x client's ``_types.py``:

* ``GET /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``, ``POST /api/show``,
  ``POST /api/generate`` (load/unload with an empty prompt, or a default streamed answer),
  ``POST /api/chat`` (streaming NDJSON or one JSON object).
* A chat chunk is ``{"model", "created_at", "message": {"role", "content", "thinking"?,
  "tool_calls"?}, "done": false}``; the last one has ``done: true``, ``done_reason`` and the metrics
  (``total_duration``, ``load_duration``, ``prompt_eval_count``, ``prompt_eval_duration``,
  ``eval_count``, ``eval_duration``; durations in nanoseconds). Tool calls carry an ``id``
  (``call_`` + 8 characters) and ``function.index`` like current Ollama does.
* An unknown model in ``/api/chat`` answers 404 ``model "NAME" not found, try pulling it first``
  (Ollama's ``handleScheduleError`` text; the very newest servers say ``model 'NAME' not found``
  there, so match on the status code, not the text). ``/api/show`` and ``/api/generate`` answer
  ``model 'NAME' not found`` like the real handlers.

Deliberate simplifications (documented so nobody mistakes them for Ollama's behaviour):

* ``num_predict`` caps the *content* tokens only (real Ollama counts thinking tokens too).
* Thinking is emitted only when ``think`` is truthy (set ``think_by_default = True`` to emulate newer
  servers that enable it when ``think`` is omitted on a thinking-capable model); a scripted
  ``thinking`` is dropped when thinking is off, as a real server would not separate it.
* Prompt truncation (``num_ctx``) drops the oldest non-system messages first, like Ollama's
  ``chatPrompt``; if the rest still does not fit, the count is capped at ``num_ctx``.
* ``eval_count`` is the number of chunks streamed before the final one (one token per chunk).
* There is no request queue: every request is served at once, however many arrive.

Run it standalone (for browser tests or by hand)::

    python -m tests.ollama_sim --port 11434 --tokens-per-s 50 --ttft 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import re
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, cast

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_THINKING",
    "FAULT_KINDS",
    "RUNNER_CRASH_MESSAGE",
    "VERSION",
    "CountTokens",
    "OllamaSimulator",
    "SimModel",
    "chat_not_found_message",
    "default_count_tokens",
    "main",
    "parse_keep_alive",
    "split_tokens",
]

JSONDict = dict[str, Any]
CountTokens = Callable[[list[JSONDict], list[JSONDict]], int]

VERSION = "0.12.0-sim"
DEFAULT_THINKING = "Let me think about this."
# Ollama's ErrMaxQueue text (server/sched.go), sent with 503 when OLLAMA_MAX_QUEUE is exceeded.
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_CRASH_MESSAGE = "llama runner process has terminated: exit status 2"
FAULT_KINDS = frozenset({"http_500", "http_503", "not_found", "drop", "stall", "error_chunk"})
_HTTP_FAULTS = frozenset({"http_500", "http_503", "not_found"})

DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_NUM_CTX = 4096
_FOREVER_S = 100 * 365 * 24 * 3600.0
_MODIFIED_AT = "2025-09-18T10:00:00.000000Z"
_LOREM = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
    "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "ut", "enim", "ad", "minim",
    "veniam", "quis", "nostrud", "exercitation", "ullamco", "laboris",
)  # fmt: skip
_TOKEN_RE = re.compile(r"\S+\s*|\s+")
_WORD_RE = re.compile(r"\w+|[^\w\s]")
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Below this, pacing sleeps with time.sleep (precise); above it, it waits on the socket so that a client
# disconnect or a stop() ends the wait at once.
_SHORT_WAIT_S = 0.005
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def split_tokens(text: str) -> list[str]:
    """Split text into simulated tokens: each non-space run with the whitespace that follows it.

    ``"".join(split_tokens(t)) == t`` always holds.
    """
    return cast(list[str], _TOKEN_RE.findall(text))


def default_count_tokens(messages: list[JSONDict], tools: list[JSONDict]) -> int:
    """A deterministic prompt-size estimate: words and punctuation, plus a few tokens per message."""
    total = 3  # the assistant turn the template opens
    for message in messages:
        total += 4  # role markers
        content = message.get("content")
        if isinstance(content, str):
            total += len(_WORD_RE.findall(content))
        tool_calls = message.get("tool_calls")
        if tool_calls:
            total += len(_WORD_RE.findall(json.dumps(tool_calls)))
    if tools:
        total += len(_WORD_RE.findall(json.dumps(tools)))
    return total


def chat_not_found_message(model: str) -> str:
    """The body text of a 404 from /api/chat for a model that is not installed (Go's %q quoting)."""
    return f"model {json.dumps(model)} not found, try pulling it first"


def parse_keep_alive(value: object) -> float | None:
    """Seconds from a ``keep_alive`` value; None when absent or unreadable (the server default applies).

    Numbers are seconds, strings are Go durations ("5m", "1h30m", "0s", "0"); negative means forever
    (returned as ``math.inf``).
    """
    if value is None or isinstance(value, bool):
        return None
    seconds: float
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = sign * float(text)
        except ValueError:
            parts = _DURATION_RE.findall(text)
            if not parts or "".join(num + unit for num, unit in parts) != text:
                return None
            seconds = sign * sum(float(num) * _DURATION_UNITS[unit] for num, unit in parts)
    else:
        return None
    return float("inf") if seconds < 0 else seconds


_iso_second: tuple[int, str] = (0, "")


def _now_iso() -> str:
    """The current UTC time as Ollama writes ``created_at`` (microseconds, ``Z``); cheap per chunk."""
    global _iso_second
    now = time.time()
    second = int(now)
    cached, prefix = _iso_second
    if second != cached:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _iso_second = (second, prefix)
    return f"{prefix}.{int((now - second) * 1e6):06d}Z"


def _iso_at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _normalize_name(name: str) -> str:
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    if name and ":" not in last:
        name += ":latest"
    return name.lower()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class SimModel:
    """An installed model as the simulator reports it."""

    name: str
    family: str
    parameter_size: str = "7B"
    quantization_level: str = "Q4_K_M"
    context_length: int = DEFAULT_NUM_CTX
    capabilities: tuple[str, ...] = ("completion", "tools")
    size: int = 4_700_000_000
    template: str = "{{ .Prompt }}"
    modified_at: str = _MODIFIED_AT

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> JSONDict:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _default_models() -> list[SimModel]:
    qwen_template = (
        "{{- if .Messages }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}{{ end }}<|im_start|>assistant\n{{- if .Think }}<think>{{ end }}"
    )
    llama_template = (
        "<|start_header_id|>system<|end_header_id|>\n{{ .System }}<|eot_id|>"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>"
    )
    return [
        SimModel(
            name="qwen3:32b",
            family="qwen3",
            parameter_size="32.8B",
            context_length=40960,
            capabilities=("completion", "tools", "thinking"),
            size=20_201_253_588,
            template=qwen_template,
        ),
        SimModel(
            name="qwen3:0.6b",
            family="qwen3",
            parameter_size="751.63M",
            context_length=40960,
            capabilities=("completion", "tools", "thinking"),
            size=522_653_767,
            template=qwen_template,
        ),
        SimModel(
            name="llama3.2:1b",
            family="llama",
            parameter_size="1.2B",
            quantization_level="Q8_0",
            context_length=131072,
            capabilities=("completion", "tools"),
            size=1_321_098_329,
            template=llama_template,
        ),
    ]


@dataclass
class _Script:
    content: str
    thinking: str | None
    tool_calls: list[JSONDict]
    model: str | None


@dataclass
class _Fault:
    kind: str
    remaining: int
    model: str | None
    after_chunks: int = 1
    seconds: float = 1.0
    then: str = "continue"
    message: str = ""


@dataclass
class _Loaded:
    expires_at: float
    context_length: int


@dataclass
class _Plan:
    thinking: list[str]
    content: list[str]
    tool_calls: list[JSONDict]
    done_reason: str


class _ClientGone(Exception):
    """The client went away (or the simulator was stopped) while a response was being served."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sim: OllamaSimulator) -> None:
        self.sim = sim
        self.stop_event = threading.Event()
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away is not a server error
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class OllamaSimulator:
    """A fake Ollama server on 127.0.0.1; see the module docstring.

    Every attribute and method may be used from any thread while the server runs. Speed settings are
    read once per request.
    """

    def __init__(
        self,
        models: Iterable[SimModel] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttft: float = 0.0,
        tokens_per_s: float | None = None,
        default_tokens: int = 20,
        default_num_ctx: int | None = None,
        think_by_default: bool = False,
        count_tokens: CountTokens | None = None,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self._port = port
        self.ttft = ttft
        """Seconds between the request and its first chunk (prompt evaluation)."""
        self.tokens_per_s = tokens_per_s
        """Pacing of the chunks after the first; None sends them as fast as possible."""
        self.default_tokens = default_tokens
        """Length, in tokens, of the answer given when no reply is scripted."""
        self.default_num_ctx = default_num_ctx
        """num_ctx assumed when a request sets none; None disables truncation for such requests."""
        self.think_by_default = think_by_default
        self.count_tokens: CountTokens = count_tokens or default_count_tokens
        self.verbose = verbose
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._lifecycle = threading.Lock()
        self._models: dict[str, SimModel] = {}
        for model in _default_models() if models is None else models:
            self._models[_normalize_name(model.name)] = model
        self._scripts: list[_Script] = []
        self._faults: list[_Fault] = []
        self._requests: list[JSONDict] = []
        self._loaded: dict[str, _Loaded] = {}
        self._active = 0
        self._max_active = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> OllamaSimulator:
        """Listen and serve in a daemon thread; after a stop(), listen again on the same port."""
        with self._lifecycle:
            if self._server is not None:
                return self
            server = _Server((self.host, self._port), self)
            self._port = server.server_port
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"ollama-sim:{self._port}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening (clients then get 'connection refused') and cut every open connection."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None:
                return
            server.stop_event.set()
            server.shutdown()
            server.server_close()
            server.close_connections()
            if thread is not None:
                thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the simulator has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> OllamaSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- models ------------------------------------------------------------------------------------

    def add_model(
        self,
        name: str,
        *,
        context_length: int = DEFAULT_NUM_CTX,
        capabilities: Sequence[str] = ("completion", "tools"),
        family: str | None = None,
        parameter_size: str = "7B",
        quantization_level: str = "Q4_K_M",
        size: int = 4_700_000_000,
    ) -> SimModel:
        """Install a model (replacing one of the same name)."""
        base = name.rsplit("/", 1)[-1].split(":", 1)[0]
        model = SimModel(
            name=name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest",
            family=family or re.split(r"[.:]", base, maxsplit=1)[0],
            parameter_size=parameter_size,
            quantization_level=quantization_level,
            context_length=context_length,
            capabilities=tuple(capabilities),
            size=size,
        )
        with self._lock:
            self._models[_normalize_name(name)] = model
        return model

    def remove_model(self, name: str) -> None:
        key = _normalize_name(name)
        with self._lock:
            self._models.pop(key, None)
            self._loaded.pop(key, None)

    @property
    def models(self) -> list[str]:
        with self._lock:
            return [m.name for m in self._models.values()]

    @property
    def loaded(self) -> list[str]:
        """Names of the models /api/ps would list now."""
        with self._lock:
            self._expire_locked()
            return [self._models[k].name for k in self._loaded if k in self._models]

    def _get_model(self, name: str) -> SimModel | None:
        with self._lock:
            return self._models.get(_normalize_name(name)) if name else None

    def _expire_locked(self) -> None:
        now = time.time()
        for key in [k for k, v in self._loaded.items() if v.expires_at <= now]:
            del self._loaded[key]

    def _load(self, model: SimModel, keep_alive: float | None, num_ctx: int | None) -> bool:
        """Mark a model loaded; returns whether it was loaded already."""
        key = _normalize_name(model.name)
        duration = DEFAULT_KEEP_ALIVE_S if keep_alive is None else min(keep_alive, _FOREVER_S)
        ctx = min(num_ctx or self.default_num_ctx or DEFAULT_NUM_CTX, model.context_length)
        with self._lock:
            self._expire_locked()
            was_loaded = key in self._loaded
            # keep_alive 0 unloads once the request is done: until then the model is resident.
            self._loaded[key] = _Loaded(time.time() + max(duration, 1.0), ctx)
        return was_loaded

    def _unload(self, model: SimModel) -> None:
        with self._lock:
            self._loaded.pop(_normalize_name(model.name), None)

    # -- scripting and faults ----------------------------------------------------------------------

    def script(
        self,
        content: str = "",
        thinking: str | None = None,
        tool_calls: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
    ) -> None:
        """Queue a reply for the next /api/chat request (FIFO; model=None matches any model).

        ``tool_calls`` items are ``{"name": ..., "arguments": {...}}`` or Ollama's own
        ``{"function": {"name": ..., "arguments": {...}}}`` (an ``id`` is kept if given).
        """
        calls: list[JSONDict] = []
        for index, call in enumerate(tool_calls or ()):
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            calls.append(
                {
                    "id": call.get("id") or self._tool_call_id(),
                    "function": {"index": index, "name": function["name"], "arguments": dict(arguments)},
                }
            )
        entry = _Script(content, thinking, calls, _normalize_name(model) if model else None)
        with self._lock:
            self._scripts.append(entry)

    def fail_next(self, kind: str, count: int = 1, model: str | None = None, **params: Any) -> None:
        """Queue a fault for the next ``count`` matching /api/chat requests.

        Kinds: ``http_500`` / ``http_503`` / ``not_found`` answer that status at once (``message``
        overrides the error text); ``drop`` sends ``after_chunks`` chunks (default 1) and then closes
        the connection without the terminating chunk; ``stall`` sends ``after_chunks`` chunks, goes
        silent for ``seconds`` (default 1.0), then goes on (``then="continue"``) or drops the
        connection (``then="close"``); ``error_chunk`` sends ``after_chunks`` chunks then an
        ``{"error": message}`` line, as Ollama does when a runner dies mid-stream. Headers go out with
        the first chunk, so ``after_chunks=0`` acts before the client sees any response. For a
        non-streaming request a chunk counts as the time it would have been sent.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        unknown = set(params) - {"after_chunks", "seconds", "then", "message"}
        if unknown:
            raise TypeError(f"unknown fault parameters: {sorted(unknown)}")
        then = str(params.get("then", "continue"))
        if then not in ("continue", "close"):
            raise ValueError("then must be 'continue' or 'close'")
        fault = _Fault(
            kind=kind,
            remaining=count,
            model=_normalize_name(model) if model else None,
            after_chunks=max(0, int(params.get("after_chunks", 1))),
            seconds=float(params.get("seconds", 1.0)),
            then=then,
            message=str(params.get("message", "")),
        )
        if count > 0:
            with self._lock:
                self._faults.append(fault)

    def _take_script(self, model: SimModel) -> _Script | None:
        key = _normalize_name(model.name)
        with self._lock:
            for i, entry in enumerate(self._scripts):
                if entry.model is None or entry.model == key:
                    return self._scripts.pop(i)
        return None

    def _take_fault(self, model_name: str) -> _Fault | None:
        key = _normalize_name(model_name) if model_name else ""
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.model is None or fault.model == key:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del self._faults[i]
                    return fault
        return None

    def _tool_call_id(self) -> str:
        return "call_" + "".join(self._rng.choices(_ID_ALPHABET, k=8))

    # -- observation -------------------------------------------------------------------------------

    @property
    def requests(self) -> list[JSONDict]:
        """Received /api/chat and /api/generate requests, oldest first.

        Each is a dict with ``path``, ``body`` (parsed JSON), ``headers`` (lower-case names),
        ``received_at`` (epoch seconds), ``model``, ``truncated``, ``prompt_eval_count``,
        ``prompt_tokens`` (the count before truncation) and ``fault`` (the fault kind applied, if any).
        """
        with self._lock:
            return list(self._requests)

    @property
    def active(self) -> int:
        """/api/chat requests being served right now."""
        with self._lock:
            return self._active

    @property
    def max_active(self) -> int:
        with self._lock:
            return self._max_active

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no /api/chat request is being served; returns False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def reset(self) -> None:
        """Forget scripts, faults, the request log, the counters and every loaded model."""
        with self._lock:
            self._scripts.clear()
            self._faults.clear()
            self._requests.clear()
            self._loaded.clear()
            self._max_active = self._active

    def _log_request(self, path: str, body: JSONDict, headers: Iterable[tuple[str, str]]) -> JSONDict:
        record: JSONDict = {
            "path": path,
            "body": body,
            "headers": {k.lower(): v for k, v in headers},
            "received_at": time.time(),
            "model": body.get("model"),
            "truncated": False,
            "prompt_eval_count": None,
            "prompt_tokens": None,
            "fault": None,
        }
        with self._lock:
            self._requests.append(record)
        return record

    def _enter(self) -> None:
        with self._lock:
            self._active += 1
            self._max_active = max(self._max_active, self._active)

    def _exit(self) -> None:
        with self._idle:
            self._active -= 1
            if self._active == 0:
                self._idle.notify_all()

    # -- generation --------------------------------------------------------------------------------

    def _prompt_tokens(
        self, messages: list[JSONDict], tools: list[JSONDict], num_ctx: int | None
    ) -> tuple[int, int, bool]:
        """(prompt_eval_count, count before truncation, truncated)."""
        full = self.count_tokens(messages, tools)
        limit = num_ctx or self.default_num_ctx
        if not limit or full <= limit:
            return full, full, False
        kept = list(messages)
        count = full
        while count > limit:
            droppable = [i for i, m in enumerate(kept[:-1]) if m.get("role") != "system"]
            if not droppable:
                break
            del kept[droppable[0]]
            count = self.count_tokens(kept, tools)
        return min(count, limit), full, True

    def _default_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        last_user = ""
        for message in reversed(messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                last_user = message["content"]
                break
        tokens = ["Echo: "] + [word + " " for word in last_user.split()]
        i = 0
        while len(tokens) < self.default_tokens:
            tokens.append(_LOREM[i % len(_LOREM)] + " ")
            i += 1
        tokens = tokens[: max(0, self.default_tokens)]
        if tokens:
            tokens[-1] = tokens[-1].rstrip()
        return tokens

    def _plan(
        self,
        script: _Script | None,
        messages: Sequence[Mapping[str, Any]],
        think: bool,
        num_predict: int | None,
    ) -> _Plan:
        if script is None:
            content = self._default_tokens(messages)
            thinking = split_tokens(DEFAULT_THINKING) if think else []
            calls: list[JSONDict] = []
        else:
            content = split_tokens(script.content)
            thinking = split_tokens(script.thinking or DEFAULT_THINKING) if think else []
            calls = [json.loads(json.dumps(c)) for c in script.tool_calls]  # a private copy
        done_reason = "stop"
        if num_predict is not None and num_predict > 0 and len(content) >= num_predict:
            content = content[:num_predict]
            calls = []
            done_reason = "length"
        return _Plan(thinking, content, calls, done_reason)


# -- HTTP --------------------------------------------------------------------------------------------


def _think_value(value: object) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "none", "off")
    return bool(value)


def _int_option(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ollama-sim"
    sys_version = ""
    disable_nagle_algorithm = True

    _selector: selectors.BaseSelector | None = None

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def srv(self) -> _Server:
        return cast(_Server, self.server)

    @property
    def sim(self) -> OllamaSimulator:
        return self.srv.sim

    def setup(self) -> None:
        super().setup()
        with self.srv.conns_lock:
            self.srv.conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.srv.conns_lock:
                self.srv.conns.discard(self.connection)
            if self._selector is not None:
                self._selector.close()

    def log_message(self, format: str, *args: Any) -> None:
        if self.sim.verbose:
            super().log_message(format, *args)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone from exc

    def _send_bytes(self, status: int, body: bytes, content_type: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.headers.get("Origin"):
            self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        if not head_only:
            self._write(body)

    def _send_json(self, status: int, obj: object) -> None:
        self._send_bytes(status, _dumps(obj), "application/json; charset=utf-8")

    def _send_error_json(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        if self.headers.get("Origin"):
            self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self._write(b"%x\r\n" % len(data) + data + b"\r\n")

    def _abort(self) -> None:
        """Close the connection abruptly: no terminating chunk, no further response."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _wait(self, seconds: float) -> None:
        """Sleep, but end at once (raising _ClientGone) if the client leaves or the simulator stops."""
        deadline = time.perf_counter() + seconds
        stop_event = self.srv.stop_event
        while True:
            if stop_event.is_set():
                raise _ClientGone
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            if remaining <= _SHORT_WAIT_S:
                time.sleep(remaining)
                return
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                self._selector.register(self.connection, selectors.EVENT_READ)
            if self._selector.select(min(remaining, 0.25)):
                # During a response the client sends nothing: readable means closed (or shut down).
                try:
                    peeked = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _ClientGone from exc
                if not peeked:
                    raise _ClientGone
                # Unexpected bytes from the client: stop watching the socket, just sleep.
                stop_event.wait(max(0.0, deadline - time.perf_counter()))

    def _read_json(self) -> JSONDict | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            self._send_error_json(400, "missing request body")
            return None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._send_error_json(400, f"invalid JSON: {exc}")
            return None
        if not isinstance(body, dict):
            self._send_error_json(400, "json: cannot unmarshal request body into a JSON object")
            return None
        return body

    # -- routing -----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type, User-Agent, Accept")
        self.send_header("Content-Length", "0")
        self.end_headers()

    _ROUTES: ClassVar[dict[str, tuple[str, ...]]] = {
        "/": ("GET", "HEAD"),
        "/api/version": ("GET", "HEAD"),
        "/api/tags": ("GET", "HEAD"),
        "/api/ps": ("GET",),
        "/api/show": ("POST",),
        "/api/generate": ("POST",),
        "/api/chat": ("POST",),
    }

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            methods = self._ROUTES.get(path)
            if methods is None:
                self._send_bytes(404, b"404 page not found", "text/plain", method == "HEAD")
            elif method not in methods:
                self._send_bytes(405, b"405 method not allowed", "text/plain", method == "HEAD")
            elif path == "/":
                self._send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8", method == "HEAD")
            elif path == "/api/version":
                body = _dumps({"version": VERSION})
                self._send_bytes(200, body, "application/json; charset=utf-8", method == "HEAD")
            elif path == "/api/tags":
                body = _dumps(self._tags())
                self._send_bytes(200, body, "application/json; charset=utf-8", method == "HEAD")
            elif path == "/api/ps":
                self._send_json(200, self._ps())
            elif path == "/api/show":
                self._show()
            elif path == "/api/generate":
                self._generate()
            else:
                self._chat()
        except (_ClientGone, OSError):
            # The client left (or stop() cut the connection) mid-response: nothing more to send.
            self.close_connection = True

    # -- simple endpoints --------------------------------------------------------------------------

    def _tags(self) -> JSONDict:
        with self.sim._lock:
            models = list(self.sim._models.values())
        return {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": m.modified_at,
                    "size": m.size,
                    "digest": m.digest,
                    "details": m.details(),
                }
                for m in models
            ]
        }

    def _ps(self) -> JSONDict:
        sim = self.sim
        with sim._lock:
            sim._expire_locked()
            loaded = [(sim._models[k], v) for k, v in sim._loaded.items() if k in sim._models]
        loaded.sort(key=lambda item: -item[1].expires_at)
        return {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "size": m.size,
                    "digest": m.digest,
                    "details": m.details(),
                    "expires_at": _iso_at(state.expires_at),
                    "size_vram": m.size,
                    "context_length": state.context_length,
                }
                for m, state in loaded
            ]
        }

    def _show(self) -> None:
        body = self._read_json()
        if body is None:
            return
        name = str(body.get("model") or body.get("name") or "")
        if not name:
            self._send_error_json(400, "model is required")
            return
        model = self.sim._get_model(name)
        if model is None:
            self._send_error_json(404, f"model '{name}' not found")
            return
        self._send_json(
            200,
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {model.name}\n',
                "parameters": 'stop                           "<|im_end|>"',
                "template": model.template,
                "details": model.details(),
                "model_info": {
                    "general.architecture": model.family,
                    "general.basename": model.name.split(":", 1)[0],
                    "general.parameter_count": _parameter_count(model.parameter_size),
                    "general.quantization_version": 2,
                    f"{model.family}.context_length": model.context_length,
                    f"{model.family}.embedding_length": 4096,
                    f"{model.family}.block_count": 32,
                },
                "capabilities": list(model.capabilities),
                "modified_at": model.modified_at,
            },
        )

    # -- generation endpoints ----------------------------------------------------------------------

    def _generate(self) -> None:
        body = self._read_json()
        if body is None:
            return
        sim = self.sim
        t0 = time.perf_counter()
        record = sim._log_request("/api/generate", body, self.headers.items())
        name = str(body.get("model") or "")
        if not name:
            self._send_error_json(400, "model is required")
            return
        model = sim._get_model(name)
        if model is None:
            self._send_error_json(404, f"model '{name}' not found")
            return
        raw_options = body.get("options")
        options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str) or not prompt:
            if keep_alive == 0:
                sim._unload(model)
                reason = "unload"
            else:
                sim._load(model, keep_alive, _int_option(options, "num_ctx"))
                reason = "load"
            self._send_json(
                200,
                {
                    "model": name,
                    "created_at": _now_iso(),
                    "response": "",
                    "done": True,
                    "done_reason": reason,
                },
            )
            return
        think = _think_value(body.get("think"))
        if think and "thinking" not in model.capabilities:
            self._send_error_json(400, f"{json.dumps(name)} does not support thinking")
            return
        if think is None:
            think = sim.think_by_default and "thinking" in model.capabilities
        messages: list[JSONDict] = []
        if isinstance(body.get("system"), str) and body["system"]:
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": prompt})
        num_ctx = _int_option(options, "num_ctx")
        count, full, truncated = sim._prompt_tokens(messages, [], num_ctx)
        record.update(prompt_eval_count=count, prompt_tokens=full, truncated=truncated)
        sim._load(model, keep_alive, num_ctx)
        load_ns = int((time.perf_counter() - t0) * 1e9)
        plan = sim._plan(None, messages, think, _int_option(options, "num_predict"))
        rests = [b'","response":"","thinking":' + _dumps(tok) + b',"done":false}\n' for tok in plan.thinking]
        rests += [b'","response":' + _dumps(tok) + b',"done":false}\n' for tok in plan.content]
        try:
            self._serve(
                t0=t0,
                model_json=_dumps(name),
                rests=rests,
                final={"model": name, "response": ""},
                plan=plan,
                prompt_count=count,
                load_ns=load_ns,
                stream=body.get("stream") is not False,
                fault=None,
                non_stream_body=lambda: {
                    "model": name,
                    "response": "".join(plan.content),
                    **({"thinking": "".join(plan.thinking)} if plan.thinking else {}),
                },
            )
        finally:
            if keep_alive == 0:
                sim._unload(model)

    def _chat(self) -> None:
        body = self._read_json()
        if body is None:
            return
        sim = self.sim
        t0 = time.perf_counter()
        record = sim._log_request("/api/chat", body, self.headers.items())
        sim._enter()
        model: SimModel | None = None
        keep_alive: float | None = None
        try:
            name = str(body.get("model") or "")
            fault = sim._take_fault(name)
            record["fault"] = fault.kind if fault else None
            if fault is not None and fault.kind in _HTTP_FAULTS:
                if fault.kind == "http_500":
                    self._send_error_json(500, fault.message or RUNNER_CRASH_MESSAGE)
                elif fault.kind == "http_503":
                    self._send_error_json(503, fault.message or BUSY_MESSAGE)
                else:
                    self._send_error_json(404, fault.message or chat_not_found_message(name))
                return
            if not name:
                self._send_error_json(400, "model is required")
                return
            model = sim._get_model(name)
            if model is None:
                self._send_error_json(404, chat_not_found_message(name))
                return
            raw_options = body.get("options")
            options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
            keep_alive = parse_keep_alive(body.get("keep_alive"))
            raw_messages = body.get("messages")
            messages: list[JSONDict] = (
                [m for m in raw_messages if isinstance(m, dict)] if isinstance(raw_messages, list) else []
            )
            raw_tools = body.get("tools")
            tools: list[JSONDict] = (
                [t for t in raw_tools if isinstance(t, dict)] if isinstance(raw_tools, list) else []
            )
            if tools and "tools" not in model.capabilities:
                library_name = f"registry.ollama.ai/library/{_normalize_name(name)}"
                self._send_error_json(400, f"{library_name} does not support tools")
                return
            think = _think_value(body.get("think"))
            if think and "thinking" not in model.capabilities:
                self._send_error_json(400, f"{json.dumps(name)} does not support thinking")
                return
            if think is None:
                think = sim.think_by_default and "thinking" in model.capabilities
            num_ctx = _int_option(options, "num_ctx")
            if not messages:
                if keep_alive == 0:
                    sim._unload(model)
                    keep_alive = None
                    reason = "unload"
                else:
                    sim._load(model, keep_alive, num_ctx)
                    reason = "load"
                self._send_json(
                    200,
                    {
                        "model": name,
                        "created_at": _now_iso(),
                        "message": {"role": "assistant", "content": ""},
                        "done_reason": reason,
                        "done": True,
                    },
                )
                return
            count, full, truncated = sim._prompt_tokens(messages, tools, num_ctx)
            record.update(prompt_eval_count=count, prompt_tokens=full, truncated=truncated)
            sim._load(model, keep_alive, num_ctx)
            load_ns = int((time.perf_counter() - t0) * 1e9)
            plan = sim._plan(sim._take_script(model), messages, think, _int_option(options, "num_predict"))
            head = b'","message":{"role":"assistant","content":'
            tail = b'},"done":false}\n'
            rests = [head + b'"","thinking":' + _dumps(tok) + tail for tok in plan.thinking]
            rests += [head + _dumps(tok) + tail for tok in plan.content]
            if plan.tool_calls:
                rests.append(head + b'"","tool_calls":' + _dumps(plan.tool_calls) + tail)

            def non_stream_body() -> JSONDict:
                message: JSONDict = {"role": "assistant", "content": "".join(plan.content)}
                if plan.thinking:
                    message["thinking"] = "".join(plan.thinking)
                if plan.tool_calls:
                    message["tool_calls"] = plan.tool_calls
                return {"model": name, "message": message}

            self._serve(
                t0=t0,
                model_json=_dumps(name),
                rests=rests,
                final={"model": name, "message": {"role": "assistant", "content": ""}},
                plan=plan,
                prompt_count=count,
                load_ns=load_ns,
                stream=body.get("stream") is not False,
                fault=fault,
                non_stream_body=non_stream_body,
            )
        finally:
            sim._exit()
            if model is not None and keep_alive == 0:
                sim._unload(model)

    def _serve(
        self,
        *,
        t0: float,
        model_json: bytes,
        rests: list[bytes],
        final: JSONDict,
        plan: _Plan,
        prompt_count: int,
        load_ns: int,
        stream: bool,
        fault: _Fault | None,
        non_stream_body: Callable[[], JSONDict],
    ) -> None:
        """Send the chunks on schedule (or wait for that long and send one object), applying a fault."""
        sim = self.sim
        ttft = max(0.0, float(sim.ttft or 0.0))
        tps = sim.tokens_per_s
        interval = 1.0 / tps if tps and tps > 0 else 0.0
        first_at = t0 + ttft
        n = len(rests)
        fault_at = min(fault.after_chunks, n + 1) if fault is not None else -1
        prefix = b'{"model":' + model_json + b',"created_at":"'
        shift = 0.0
        headers_sent = False
        first_sent = 0.0
        # Slots 0..n-1 are the token chunks, slot n the final chunk, slot n+1 the terminating chunk.
        for i in range(n + 2):
            if i == fault_at and fault is not None:
                if fault.kind == "drop":
                    self._abort()
                    return
                if fault.kind == "stall":
                    self._wait(fault.seconds)
                    if fault.then == "close":
                        self._abort()
                        return
                    shift += fault.seconds
                elif fault.kind == "error_chunk":
                    message = fault.message or RUNNER_CRASH_MESSAGE
                    if not stream:
                        self._send_error_json(500, message)
                        return
                    if not headers_sent:
                        self._start_stream()
                    self._chunk(_dumps({"error": message}) + b"\n")
                    self._write(b"0\r\n\r\n")
                    return
            if i == n + 1:
                break
            target = first_at + i * interval + shift
            remaining = target - time.perf_counter()
            if remaining > 0:
                self._wait(remaining)
            if i == 0:
                first_sent = time.perf_counter()
            if not stream:
                continue
            if not headers_sent:
                self._start_stream()
                headers_sent = True
            if i < n:
                self._chunk(prefix + _now_iso().encode() + rests[i])
            else:
                done = self._final(final, plan, prompt_count, load_ns, t0, first_sent, n)
                self._chunk(_dumps(done) + b"\n")
        if stream:
            self._write(b"0\r\n\r\n")
            return
        body = non_stream_body()
        body["created_at"] = _now_iso()
        done = self._final({}, plan, prompt_count, load_ns, t0, first_sent, n)
        done.pop("created_at")
        body.update(done)
        self._send_json(200, body)

    @staticmethod
    def _final(
        base: JSONDict, plan: _Plan, prompt_count: int, load_ns: int, t0: float, first_sent: float, n: int
    ) -> JSONDict:
        now = time.perf_counter()
        done: JSONDict = dict(base)
        done["created_at"] = _now_iso()
        done["done_reason"] = plan.done_reason
        done["done"] = True
        metrics = {
            "total_duration": max(1, int((now - t0) * 1e9)),
            "load_duration": max(1, load_ns),
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": max(1, int((first_sent - t0) * 1e9) - load_ns),
            "eval_count": n,
            "eval_duration": max(1, int((now - first_sent) * 1e9)),
        }
        # Go's omitempty: zero metrics are left out.
        done.update({k: v for k, v in metrics.items() if v})
        return done


def _parameter_count(parameter_size: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMBT]?)\s*", parameter_size.upper())
    if not match:
        return 0
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)


# -- standalone --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.ollama_sim", description="Serve a simulated Ollama API until Ctrl-C or SIGTERM."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument(
        "--tokens-per-s", type=float, default=None, help="pacing (default: as fast as possible)"
    )
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--default-tokens", type=int, default=20, help="length of the unscripted answer")
    parser.add_argument("--num-ctx", type=int, default=None, help="num_ctx assumed when a request sets none")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    sim = OllamaSimulator(
        host=args.host,
        port=args.port,
        ttft=args.ttft,
        tokens_per_s=args.tokens_per_s,
        default_tokens=args.default_tokens,
        default_num_ctx=args.num_ctx,
        verbose=args.verbose,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sim.start()
    print(f"ollama simulator {VERSION} listening on {sim.url}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
