"""Model backends behind one small, synchronous interface that yields typed events.

Why: the gateway runs one thread per request and should not care whether an answer comes from Ollama (the
team's Qwen3-32B on the GPU) or from the small GGUF model embedded in the process (the fallback when Ollama
is down). Each backend turns a `ModelCall` into a generator of `ThinkingDelta` / `ContentDelta` /
`ToolCall` events that ends with exactly one `Done`, and turns every failure into a `BackendError` whose
message says what to do and whose `retryable` says whether trying again can help.

Closing the generator is the cancel signal: for Ollama it closes the HTTP response at once (the server
notices the disconnect and stops generating); for the embedded model it stops asking llama.cpp for tokens
and releases the model for the next caller.

What the official `ollama` client (0.6.3, on httpx) does with failures, which `OllamaBackend` maps:

* a refused connection is the builtin `ConnectionError` for non-streaming calls, but a raw
  `httpx.ConnectError` for streaming ones, raised on the first `next()` (the request is sent lazily);
* an HTTP error status is `ollama.ResponseError` with `status_code` and the server's `error` text;
  404 texts differ between Ollama versions, so only the status code is trusted;
* an `{"error": ...}` line in mid-stream is `ResponseError` with status_code -1;
* a connection cut in mid-stream is a raw `httpx.RemoteProtocolError` (or `ReadError`), silence longer
  than the read timeout a raw `httpx.ReadTimeout`; the client wraps neither.

The package: `base` (the call, the events, the errors), `ollama_server`, `embedded_model`, and `selection`
(which one serves). Callers import from `clawdbot.backends`.
"""

from __future__ import annotations

from clawdbot.backends.base import (
    Backend,
    BackendBusy,
    BackendError,
    BackendEvent,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ContentDelta,
    Done,
    LoadedModel,
    ModelCall,
    ModelInfo,
    ModelNotFound,
    StreamBroken,
    ThinkingDelta,
    ToolCall,
    without_credentials,
)
from clawdbot.backends.embedded_model import (
    EMBEDDED_DEFAULT_N_CTX,
    EMBEDDED_MAX_OUTPUT_TOKENS,
    EmbeddedBackend,
    plain_messages,
)
from clawdbot.backends.ollama_server import OllamaBackend
from clawdbot.backends.selection import BackendSelector

__all__ = [
    "EMBEDDED_DEFAULT_N_CTX",
    "EMBEDDED_MAX_OUTPUT_TOKENS",
    "Backend",
    "BackendBusy",
    "BackendError",
    "BackendEvent",
    "BackendSelector",
    "BackendServerError",
    "BackendTimeout",
    "BackendUnavailable",
    "ContentDelta",
    "Done",
    "EmbeddedBackend",
    "LoadedModel",
    "ModelCall",
    "ModelInfo",
    "ModelNotFound",
    "OllamaBackend",
    "StreamBroken",
    "ThinkingDelta",
    "ToolCall",
    "plain_messages",
    "without_credentials",
]
