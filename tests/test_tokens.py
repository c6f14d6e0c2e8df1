"""Tests of token counting: Qwen3's vocabulary and chat templates, the embedded model's tokenizer, the
conservative estimate, and the per-message cache.

Golden ids come from outside this code: "Hello world" -> [9707, 1879] is Qwen2/Qwen3's well-known encoding,
and the cases in `HF_GOLDEN` were generated with transformers' Qwen3-0.6B AutoTokenizer
(add_special_tokens=False) and published as a tokenizer test in a public C++ repository. A second,
independent route checks the vocabulary file itself: a plain-Python BPE (no tiktoken) over the same ranks.
"""

from __future__ import annotations

import base64
import itertools
import random
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any, cast

import pytest
import regex

from clawdbot import tokens
from clawdbot.backends import plain_messages
from clawdbot.tokens import (
    QWEN3_SPECIAL_TOKENS,
    QWEN_PAT_STR,
    EmbeddedCounter,
    EstimateCounter,
    QwenCounter,
    TokenCounter,
    counter_for,
    is_qwen_model,
)

HELLO_WORLD = [9707, 1879]

# (text, ids) from transformers' Qwen3-0.6B tokenizer, which NFC-normalizes (see the module docstring).
HF_GOLDEN: list[tuple[str, list[int]]] = [
    ("Hello, Qwen3!", [9707, 11, 1207, 16948, 18, 0]),
    ("你好，世界！", [108386, 3837, 99489, 6313]),
    ("🙂🚀 café", [145080, 145836, 51950]),
    ("cafe\u0301", [924, 58858]),
    ("e\u0301 é E\u0301", [963, 3958, 28024]),
    ("1234567890 2026", [16, 17, 18, 19, 20, 21, 22, 23, 24, 15, 220, 17, 15, 17, 21]),
    ("  hello\tworld\r\n\n  ", [220, 23811, 76508, 80823, 256]),
    ("I'm WE'RE can't she'd", [40, 2776, 19677, 94153, 646, 944, 1340, 4172]),
    ("a\u00a0b\u2003c\u0085d", [64, 4102, 65, 378, 225, 66, 126, 227, 67]),
    ("👩\u200d💻🇨🇳", [145233, 378, 235, 145851, 145793, 145754]),
    ("한글 한글", [23573, 83291, 61298, 83291]),
    (
        "<|im_start|>user\n你好<think>思考</think><|im_end|>",
        [151644, 872, 198, 108386, 151667, 104107, 151668, 151645],
    ),
    (
        '<tool_call>{"name":"x"}</tool_call><tool_response>ok</tool_response>',
        [151657, 4913, 606, 3252, 87, 9207, 151658, 151665, 562, 151666],
    ),
    ("a<|im_start|>b<|endoftext|>c", [64, 151644, 65, 151643, 66]),
]
NFC_CHANGES = {"cafe\u0301", "e\u0301 é E\u0301"}

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; don't panic!",
    "chinese": "我爱北京天安门。今天的天气真不错，我们去公园散步吧！人工智能正在改变世界。",
    "code": 'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    "emoji": "🤖👍🏽 🇯🇵 👨\u200d👩\u200d👧\u200d👦 🎉🎉🎉 ❤️‍🔥 😀😃😄",
    "mixed": "Résumé: naïve café — 東京 🗼 (ĀĒĪŌŪ) ∑x² ≤ ∞ \t\n\n  end",
}


@cache
def qwen(dialect: tokens.Dialect = "ollama") -> QwenCounter:
    return QwenCounter(dialect)


@cache
def embedded() -> EmbeddedCounter:
    return EmbeddedCounter()


# -- Qwen's vocabulary -------------------------------------------------------------------------------------


def test_hello_world_has_the_known_qwen_ids() -> None:
    for dialect in ("ollama", "hf"):
        assert qwen(dialect).encode("Hello world") == HELLO_WORLD
        assert qwen(dialect).count_text("Hello world") == 2


@pytest.mark.parametrize(("text", "ids"), HF_GOLDEN, ids=[repr(t)[:24] for t, _ in HF_GOLDEN])
def test_golden_ids_from_transformers(text: str, ids: list[int]) -> None:
    assert qwen("hf").encode(text) == ids
    assert qwen("hf").decode(ids) == unicodedata.normalize("NFC", text)
    ollama = qwen("ollama").encode(text)
    if text in NFC_CHANGES:
        # Ollama does not NFC-normalize: a decomposed accent stays two code points.
        assert ollama != ids
        assert qwen("ollama").decode(ollama) == text
    else:
        assert ollama == ids


def test_special_tokens_have_qwen3s_ids() -> None:
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<tool_call>": 151657,
        "</tool_call>": 151658,
        "<tool_response>": 151665,
        "</tool_response>": 151666,
        "<think>": 151667,
        "</think>": 151668,
    }
    assert {k: QWEN3_SPECIAL_TOKENS[k] for k in expected} == expected
    assert len(QWEN3_SPECIAL_TOKENS) == 26 and max(QWEN3_SPECIAL_TOKENS.values()) == 151668
    for text, token in QWEN3_SPECIAL_TOKENS.items():
        assert qwen().encode(text) == [token]
        assert qwen().decode([token]) == text


@cache
def _ranks() -> dict[bytes, int]:
    path = tokens._qwen_vocab_path()
    lines = (line.split() for line in path.read_bytes().splitlines() if line)
    return {base64.b64decode(token): int(rank) for token, rank in lines}


def _reference_bpe(text: str) -> list[int]:
    """Textbook byte-level BPE straight from the vocabulary file: split on added tokens, pre-tokenize with
    Qwen's regex, then merge the adjacent pair of lowest rank until none is in the vocabulary."""
    ranks = _ranks()
    specials = "|".join(regex.escape(s) for s in sorted(QWEN3_SPECIAL_TOKENS, key=len, reverse=True))
    ids: list[int] = []
    for part in regex.split(f"({specials})", text):
        if part in QWEN3_SPECIAL_TOKENS:
            ids.append(QWEN3_SPECIAL_TOKENS[part])
            continue
        for piece in regex.findall(QWEN_PAT_STR, part):
            symbols = [bytes([b]) for b in piece.encode("utf-8")]
            while len(symbols) > 1:
                pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
                known = [(rank, i) for rank, i in pairs if rank is not None]
                if not known:
                    break
                _, i = min(known)
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            ids.extend(ranks[s] for s in symbols)
    return ids


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_tiktoken_agrees_with_a_plain_bpe_over_the_vocabulary_file(name: str) -> None:
    text = SAMPLES[name]
    assert qwen().encode(text) == _reference_bpe(text)


def test_chinese_and_emoji_ids_by_both_routes() -> None:
    for text, ids in (("你好，世界！", [108386, 3837, 99489, 6313]), ("🙂🚀 café", [145080, 145836, 51950])):
        assert qwen().encode(text) == ids == _reference_bpe(text)
    assert _reference_bpe("Hello world") == HELLO_WORLD


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_counts_are_the_length_of_the_ids_and_ids_round_trip(name: str) -> None:
    text = SAMPLES[name]
    for counter in (qwen("ollama"), qwen("hf"), embedded()):
        ids = counter.encode(text)
        assert counter.count_text(text) == len(ids) > 0
        assert counter.decode(ids) == text


# -- chat templates ----------------------------------------------------------------------------------------

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string", "description": "City name, e.g. 北京"}},
            },
        },
    }
]
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in 北京?"},
    {
        "role": "assistant",
        "content": "",
        "thinking": "Need the tool.",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"},
    {"role": "assistant", "content": "21 °C.", "thinking": "Answer now."},
    {"role": "user", "content": "Thanks 😀"},
]
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)

# Ollama's qwen3 template (with Ollama's Go JSON for tools and arguments; thinking of turns before the
# last user message dropped; " /think" on the last user message; think unset counts as on).
OLLAMA_RENDERING = (
    "<|im_start|>system\n\nYou are terse.\n\n" + TOOLS_BLOCK + '{"type": "function", "function": '
    '{"name":"get_weather","description":"Current weather in a city","parameters":{"type":"object",'
    '"required":["city"],"properties":{"city":{"type":"string","description":"City name, e.g. 北京"}}}}}'
    + TOOLS_TAIL
    + "<|im_start|>user\nWeather in 北京?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city":"北京"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n21 °C.<|im_end|>\n"
    "<|im_start|>user\nThanks 😀 /think<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# The official Jinja template (transformers' tojson; thinking kept only after the last user query).
HF_RENDERING = (
    "<|im_start|>system\nYou are terse.\n\n" + TOOLS_BLOCK + '{"type": "function", "function": '
    '{"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", '
    '"required": ["city"], "properties": {"city": {"type": "string", "description": "City name, e.g. 北京"}}}}}'
    + TOOLS_TAIL
    + "<|im_start|>user\nWeather in 北京?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n21 °C.<|im_end|>\n"
    "<|im_start|>user\nThanks 😀<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.parametrize(("dialect", "rendering"), [("ollama", OLLAMA_RENDERING), ("hf", HF_RENDERING)])
def test_a_conversation_counts_as_its_hand_rendered_template(dialect: tokens.Dialect, rendering: str) -> None:
    counter = qwen(dialect)
    assert counter.render_prompt(CONVERSATION, TOOLS) == rendering
    ids = counter.encode(rendering)
    assert counter.count_messages(CONVERSATION, TOOLS) == len(ids)
    assert ids[0] == QWEN3_SPECIAL_TOKENS["<|im_start|>"]
    assert ids[-3:] == [QWEN3_SPECIAL_TOKENS["<|im_start|>"], 77091, 198]  # "assistant", "\n"
    # Twice in the tool instructions, once for the call.
    assert ids.count(QWEN3_SPECIAL_TOKENS["<tool_call>"]) == 3


def test_ollama_template_details() -> None:
    counter = qwen("ollama")
    user = {"role": "user", "content": "Hi"}
    assert counter.render_prompt([user], think=False) == (
        "<|im_start|>user\nHi /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Thinking after the last user message stays; a final assistant message is a prefill (no <|im_end|>).
    after = [user, {"role": "assistant", "content": "A", "thinking": "T"}]
    assert (
        counter.render_prompt(after)
        == "<|im_start|>user\nHi /think<|im_end|>\n<|im_start|>assistant\n<think>T</think>\nA"
    )
    # Ollama merges consecutive messages of one role and hoists every system message to the top.
    merged = [user, {"role": "user", "content": "there"}, {"role": "system", "content": "S"}]
    assert counter.render_prompt(merged) == (
        "<|im_start|>system\n\nS<|im_end|>\n<|im_start|>user\nHi\n\nthere /think<|im_end|>\n<|im_start|>assistant\n"
    )
    # Go's json.Marshal escapes <, > and & in tool-call arguments.
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": {"q": "<a&b>"}}}],
    }
    assert '{"q":"\\u003ca\\u0026b\\u003e"}' in counter.render_prompt([user, call])


def test_hf_template_groups_tool_results_and_can_turn_thinking_off() -> None:
    counter = qwen("hf")
    results = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    assert counter.render_prompt([{"role": "user", "content": "q"}, *results], think=False) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n"
        "<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def _random_text(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return " ".join(
            rng.choice(["the", "model", "token", "count", "Hello", "world.", "don't", "42"])
            for _ in range(rng.randint(0, 30))
        )
    if kind == 1:
        return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(0, 40)))
    if kind == 2:
        return "".join(
            rng.choice(["def ", "f(x):", "\n    ", "return ", "x", " + ", "1", "{}", "[]", "\t", "\n\n"])
            for _ in range(rng.randint(0, 30))
        )
    if kind == 3:
        return "".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(rng.randint(0, 20)))
    if kind == 4:  # any code point except surrogates, combining marks and controls included
        return "".join(
            chr(c)
            for c in (rng.randint(0, 0x10FFFF) for _ in range(rng.randint(0, 20)))
            if not 0xD800 <= c < 0xE000
        )
    return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 30)))


def _random_conversation(rng: random.Random, length: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for _ in range(length):
        role = rng.choice(["system", "user", "user", "assistant", "assistant", "tool"])
        message: dict[str, Any] = {"role": role, "content": _random_text(rng)}
        if role == "assistant" and rng.random() < 0.5:
            message["thinking"] = _random_text(rng)
        if role == "assistant" and rng.random() < 0.3:
            message["content"] = ""
            message["tool_calls"] = [
                {"function": {"name": "get_weather", "arguments": {"city": _random_text(rng)}}}
            ]
        messages.append(message)
    return messages


@pytest.mark.parametrize("dialect", ["ollama", "hf"])
def test_pieces_add_up_to_the_count_of_the_whole_rendering(dialect: tokens.Dialect) -> None:
    counter = qwen(dialect)
    rng = random.Random(11)
    for _ in range(200):
        messages = _random_conversation(rng, rng.randint(0, 8))
        tools = TOOLS if rng.random() < 0.3 else None
        think = rng.choice([None, True, False])
        whole = counter.render_prompt(messages, tools, think=think)
        assert counter.count_messages(messages, tools, think=think) == len(counter.encode(whole))


# -- the embedded model ------------------------------------------------------------------------------------


def test_embedded_counter_matches_llama_cpps_own_tokenization() -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    counter = embedded()
    llama = Llama(model_path=str(counter.path), vocab_only=True, verbose=False)
    template = llama.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    rng = random.Random(5)
    conversations = [CONVERSATION, CONVERSATION[1:]] + [
        _random_conversation(rng, rng.randint(1, 6)) for _ in range(30)
    ]
    for messages in conversations:
        prompt = formatter(messages=cast(Any, plain_messages(messages))).prompt
        ids = list(llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
        assert counter.render_prompt(messages) == prompt
        assert counter.count_messages(messages, TOOLS) == len(ids)
        assert counter.encode(prompt) == ids
    llama.close()
    assert counter.count_tools(TOOLS) == 0  # the embedded backend does not send tools
    assert counter.encode("<|im_start|>") == [1]


# -- the conservative estimate -----------------------------------------------------------------------------


def test_the_estimate_never_counts_fewer_than_qwen_or_smollm2() -> None:
    estimate = EstimateCounter()
    exact: list[tokens._PieceCounter] = [qwen("ollama"), qwen("hf"), embedded()]
    rng = random.Random(2024)
    texts = [*SAMPLES.values(), *(t for t, _ in HF_GOLDEN), *(_random_text(rng) for _ in range(400))]
    for text in texts:
        bound = estimate.count_text(text)
        for counter in exact:
            assert bound >= counter.count_text(text), (counter.name, text)
    for _ in range(150):
        messages = _random_conversation(rng, rng.randint(1, 10))
        tools = TOOLS if rng.random() < 0.5 else None
        for counter in exact:
            for think in (None, False):
                assert estimate.count_messages(messages, tools) >= counter.count_messages(
                    messages, tools, think=think
                )
            for message in messages:
                assert estimate.count_message(message) >= counter.count_message(message)
        assert estimate.count_tools(tools) >= qwen("hf").count_tools(tools)


def test_the_estimate_is_bytes_and_has_no_ids() -> None:
    estimate = counter_for("llama3.1:8b", "ollama")
    assert isinstance(estimate, EstimateCounter) and not estimate.exact
    assert estimate.count_text("") == 0
    assert estimate.count_text("你好") == 7  # 6 UTF-8 bytes + 1
    with pytest.raises(NotImplementedError):
        estimate.encode("x")


# -- the per-message cache ---------------------------------------------------------------------------------


class CountingQwen(QwenCounter):
    """Counts every call to the tokenizer."""

    def __init__(self, dialect: tokens.Dialect = "ollama", **kwargs: Any) -> None:
        super().__init__(dialect, **kwargs)
        self.calls = 0
        self.tokenized: list[str] = []

    def _tokenize(self, text: str) -> list[int]:
        self.calls += 1
        self.tokenized.append(text)
        return super()._tokenize(text)


def _long_conversation(length: int) -> list[dict[str, Any]]:
    rng = random.Random(99)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful assistant."}]
    for i in range(length - 1):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"turn {i}: {SAMPLES[rng.choice(sorted(SAMPLES))]}"})
    return messages


@pytest.mark.parametrize("dialect", ["ollama", "hf"])
def test_a_second_count_of_200_messages_tokenizes_nothing(dialect: tokens.Dialect) -> None:
    counter = CountingQwen(dialect)
    messages = _long_conversation(200)
    first = counter.count_messages(messages, TOOLS)
    assert counter.calls > 0
    counter.calls = 0
    assert counter.count_messages(messages, TOOLS) == first
    assert counter.calls == 0
    assert first == len(counter.encode(counter.render_prompt(messages, TOOLS)))


def test_the_next_turn_tokenizes_only_what_changed() -> None:
    counter = CountingQwen("ollama")
    messages = _long_conversation(200)
    counter.count_messages(messages)
    counter.calls, counter.tokenized = 0, []
    turn = [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "next question"}]
    counter.count_messages(turn)
    # The old last user message (it loses " /think"), the new answer, the new question, the generation prompt.
    assert counter.calls <= 4
    assert all("turn 1:" not in text for text in counter.tokenized)


def test_count_message_is_cached_and_the_cache_is_bounded() -> None:
    counter = CountingQwen("ollama", cache_size=8)
    message = {"role": "user", "content": "a message"}
    assert counter.count_message(message) == counter.count_message(dict(message)) == 7
    assert counter.calls == 1
    for i in range(20):
        counter.count_message({"role": "user", "content": f"m{i}"})
    assert len(counter._cache) == 8
    counter.count_message(message)
    assert counter.calls == 22  # evicted, so tokenized again


# -- choosing a counter ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "qwen_counted"),
    [
        ("qwen3:32b", True),
        ("qwen3:0.6b", True),
        ("qwen2.5:7b", True),
        ("qwen2.5-coder:7b", True),
        ("qwq:32b", True),
        ("hf.co/Qwen/Qwen3-32B-GGUF:Q4_K_M", True),
        ("Qwen3-32B", True),
        ("qwen3-coder:30b", False),
        ("qwen3-vl:8b", False),
        ("qwen3.5:9b", False),
        ("qwen3-embedding:0.6b", False),
        ("llama3.1:8b", False),
        ("gpt-oss:20b", False),
    ],
)
def test_counter_for_ollama_models(model: str, qwen_counted: bool) -> None:
    assert is_qwen_model(model) is qwen_counted
    counter = counter_for(model, "ollama")
    assert isinstance(counter, QwenCounter if qwen_counted else EstimateCounter)
    assert counter.exact is qwen_counted
    assert isinstance(counter, TokenCounter)


def test_counter_for_the_embedded_backend_and_sharing() -> None:
    counter = counter_for("anything", "embedded")
    assert isinstance(counter, EmbeddedCounter) and counter.exact
    assert counter_for("other", "embedded") is counter
    assert counter_for("qwen3:32b", "ollama") is counter_for("qwen3:0.6b", "ollama")
    assert isinstance(counter_for("qwen3:32b", "something-else"), EstimateCounter)


def test_counter_for_a_missing_embedded_model_falls_back_to_the_estimate(tmp_path: Path) -> None:
    counter = counter_for("x", "embedded", model_path=tmp_path / "missing.gguf")
    assert isinstance(counter, EstimateCounter)


def test_the_counters_fit_context_planning() -> None:
    from clawdbot.context import plan_context

    counter = qwen("ollama")
    history = _long_conversation(60)[1:]
    plan = plan_context(
        counter, {"role": "system", "content": "S"}, history, {"role": "user", "content": "Q"}, 600
    )
    assert plan.tokens_after <= 600 < plan.tokens_before
    assert plan.tokens_after == counter.count_messages(plan.messages)
