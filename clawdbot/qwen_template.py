"""Qwen3's chat template rendered as text pieces, the way each server builds the prompt, for exact counting.

Two dialects: Ollama's Go template for its `qwen3` library models (after Ollama's own preprocessing: system
messages to the top block, consecutive messages of one role merged), and the official Jinja template that
transformers, vLLM and llama-server use. Each rendering is cut into pieces that begin or end at a special token,
so that a tokenizer never merges across a cut and the pieces' counts add up to the whole (see `clawdbot.tokens`).
Kept apart from the counters because it is a copy of someone else's format, to be checked against theirs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

# -- message fields ------------------------------------------------------------------------------------


def text_of(value: Any) -> str:
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
    return text_of(function.get("name")), function.get("arguments")


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
    fields = [f'"name":{_go_json(text_of(function.get("name")))}']
    if function.get("description"):
        fields.append(f'"description":{_go_json(text_of(function.get("description")))}')
    params = [f'"type":{_go_json(text_of(parameters.get("type")))}']
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


def ollama_system(system: str, tools: Sequence[Mapping[str, Any]] | None) -> str:
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


def ollama_collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's template.collate: all system texts joined, consecutive same-role messages merged
    (except tool results); a merged message keeps the first one's thinking and tool calls."""
    system: list[str] = []
    collated: list[dict[str, Any]] = []
    for message in messages:
        role = text_of(message.get("role"))
        content = text_of(message.get("content"))
        if role == "system":
            system.append(content)
        if collated and collated[-1]["role"] == role and role != "tool":
            collated[-1]["content"] += "\n\n" + content
        else:
            collated.append(
                {
                    "role": role,
                    "content": content,
                    "thinking": text_of(message.get("thinking")),
                    "tool_calls": list(message.get("tool_calls") or ()),
                }
            )
    return "\n\n".join(system), collated


def ollama_message(
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


def ollama_pieces(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, think: bool | None
) -> list[str]:
    # Ollama turns thinking on when a request leaves `think` unset for a model that can think, so the
    # template always sees IsThinkSet; `think` only decides between on and off.
    thinking_on = think is not False
    system, collated = ollama_collate(messages)
    pieces = [ollama_system(system, tools)]
    last_user = max((i for i, m in enumerate(collated) if m["role"] == "user"), default=-1)
    for i, message in enumerate(collated):
        last = i == len(collated) - 1
        pieces.append(
            ollama_message(
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


def hf_system(first_system: str | None, tools: Sequence[Mapping[str, Any]] | None) -> str:
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


def hf_assistant(message: Mapping[str, Any], *, show_thinking: bool, last: bool) -> str:
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


def hf_content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def hf_pieces(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, think: bool | None
) -> list[str]:
    roles = [text_of(m.get("role")) for m in messages]
    first_system = hf_content(messages[0]) if messages and roles[0] == "system" else None
    pieces = [hf_system(first_system, tools)]
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
            pieces.append(f"<|im_start|>{role}\n{hf_content(message)}<|im_end|>\n")
        elif role == "assistant":
            pieces.append(hf_assistant(message, show_thinking=i > last_query, last=last))
        elif role == "tool":
            start = "<|im_start|>user" if i == 0 or roles[i - 1] != "tool" else ""
            end = "<|im_end|>\n" if last or roles[i + 1] != "tool" else ""
            pieces.append(f"{start}\n<tool_response>\n{hf_content(message)}\n</tool_response>{end}")
    pieces.append("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if think is False else ""))
    return pieces
