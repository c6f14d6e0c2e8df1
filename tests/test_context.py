"""Context planning: the budget is never exceeded, the instructions are never lost, nothing is cut silently."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from clawdbot.admission import Admission
from clawdbot.audit import AuditStore
from clawdbot.backends import BackendSelector
from clawdbot.chain import verify_chain
from clawdbot.context import CUT_MARKER, ContextPlan, plan_context
from clawdbot.db import Database
from clawdbot.gateway import ChatRequest, ContextPlanned, Finished, Gateway
from clawdbot.models import Request
from clawdbot.ratelimit import RateLimiter
from clawdbot.settings import load_settings
from clawdbot.tokens import QwenCounter, counter_for
from tests.ollama_sim import OllamaSimulator

BUDGET = 7500
SYSTEM = {"role": "system", "content": "You are the contracts agent. Always answer in formal English."}
TEXTS = [
    "Please summarise the indemnity clause in section 4.2 and list the parties it binds.",
    "请总结第四条的赔偿条款，并列出受其约束的各方。这份合同在上海签署，适用中国法律。",
    "def total(rows):\n    return sum(r['amount'] for r in rows if r.get('status') == 'paid')\n",
    "Deadline moved 🚀🎉 — can we ship by Friday? 👍🏽 Thanks! 🙏",
]


@pytest.fixture(scope="module")
def qwen() -> QwenCounter:
    counter = counter_for("qwen3:32b", "ollama")
    assert isinstance(counter, QwenCounter)
    return counter


def conversation(turns: int, seed: int = 7) -> list[dict[str, Any]]:
    """User and assistant turns in English, Chinese, code and emoji, with a tool call every tenth turn."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"[{turn}] " + rng.choice(TEXTS) * rng.randint(1, 4)})
        if turn % 10 == 5:
            call = {"function": {"name": "query_table", "arguments": {"sheet": "sales", "top": 3}}}
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            messages.append(
                {"role": "tool", "content": "Shanghai 120; Berlin 95; Austin 80", "tool_name": "query_table"}
            )
        messages.append({"role": "assistant", "content": rng.choice(TEXTS) * rng.randint(1, 3)})
    return messages


def plan(counter: QwenCounter, history: list[dict[str, Any]], new: str, budget: int = BUDGET) -> ContextPlan:
    return plan_context(counter, SYSTEM, history, {"role": "user", "content": new}, budget)


def test_a_short_conversation_is_sent_whole(qwen: QwenCounter) -> None:
    history = conversation(3)
    result = plan(qwen, history, "And the next step?")
    assert result.messages == [SYSTEM, *history, {"role": "user", "content": "And the next step?"}]
    assert not result.truncated and result.tokens_before == result.tokens_after
    assert result.tokens_after == qwen.count_messages(result.messages)
    assert result.notice() == ""


def test_a_long_conversation_keeps_its_instructions_and_stays_within_the_budget(qwen: QwenCounter) -> None:
    history = conversation(200)
    new = "What did we agree about the deadline?"
    result = plan(qwen, history, new)
    assert result.tokens_before == qwen.count_messages([SYSTEM, *history, {"role": "user", "content": new}])
    assert result.tokens_before > BUDGET
    assert result.tokens_after == qwen.count_messages(result.messages) <= BUDGET
    assert result.messages[0] == SYSTEM and result.messages[-1] == {"role": "user", "content": new}
    kept = result.messages[1:-1]
    # Oldest first and whole turns: what is kept is exactly the tail of the history, starting at a user turn.
    assert history[len(history) - len(kept) :] == kept and kept[0]["role"] == "user"
    assert result.dropped == history[: len(history) - len(kept)]
    assert result.audit_fields() == {
        "prompt_tokens": result.tokens_after,
        "context_tokens_before": result.tokens_before,
        "context_tokens_after": result.tokens_after,
        "dropped_messages": len(result.dropped),
        "truncated": True,
    }
    assert result.notice().startswith(f"{len(result.dropped)} earlier messages not sent")
    # Not wastefully: the turn just before the kept ones would not have fitted... within one chunk.
    assert result.tokens_after > BUDGET - BUDGET // 4 - 600


def test_a_tool_call_and_its_result_are_dropped_or_kept_together(qwen: QwenCounter) -> None:
    history = conversation(120, seed=3)
    for turns in range(60, 121, 7):
        result = plan(qwen, history[: len(conversation(turns, seed=3))], "next")
        kept = result.messages[1:-1]
        for index, message in enumerate(kept):
            if message["role"] == "tool":
                assert index > 0 and kept[index - 1].get("tool_calls"), "a tool result lost its call"
            if message.get("tool_calls"):
                assert index + 1 < len(kept) and kept[index + 1]["role"] == "tool", "a call lost its result"


def test_turns_are_dropped_in_chunks_so_the_kept_prefix_stays_stable(qwen: QwenCounter) -> None:
    history = conversation(260, seed=11)
    user_starts = [i for i, m in enumerate(history) if m["role"] == "user"]
    first_kept = []
    for end in user_starts[150:230]:
        result = plan(qwen, history[:end], "next")
        first_kept.append(len(result.dropped))
    changes = sum(1 for a, b in itertools.pairwise(first_kept) if a != b)
    # Dropping one turn at a time would move the start on almost every turn; chunks move it rarely.
    assert changes <= len(first_kept) // 4, first_kept


@pytest.mark.parametrize("text", TEXTS)
def test_a_message_larger_than_the_budget_is_cut_with_a_marker(qwen: QwenCounter, text: str) -> None:
    huge = text * 3000  # an attachment's worth of text in every script
    result = plan(qwen, conversation(4), huge)
    assert result.tokens_after <= BUDGET
    assert result.messages[0] == SYSTEM
    sent = result.messages[-1]["content"]
    assert huge.startswith(sent.split("\n[…")[0])
    removed = qwen.count_text(huge) - qwen.count_text(sent.split("\n[…")[0])
    assert sent.endswith(CUT_MARKER.format(n=removed))
    assert result.cut == ["user"] and result.truncated
    assert "your message was cut" in result.notice()


def test_a_system_prompt_and_message_too_large_together_are_both_cut(qwen: QwenCounter) -> None:
    system = {"role": "system", "content": TEXTS[0] * 2000}
    result = plan_context(qwen, system, [], {"role": "user", "content": TEXTS[1] * 2000}, BUDGET)
    assert result.tokens_after <= BUDGET
    assert result.cut == ["user", "system"]
    assert result.messages[0]["role"] == "system" and "were cut to fit" in result.messages[0]["content"]


# -- through the gateway, checked by what the simulator received --------------------------------------


@pytest.fixture
def sim(qwen: QwenCounter) -> Iterator[OllamaSimulator]:
    with OllamaSimulator() as simulator:
        simulator.count_tokens = lambda messages, tools: qwen.count_messages(messages, tools or None)
        yield simulator


def make_gateway(db: Database, sim: OllamaSimulator) -> Gateway:
    settings = load_settings(
        database_url=db.url, ollama_host=sim.url, backend="ollama", rate_limit="", retries=0
    )
    return Gateway(
        settings,
        AuditStore(db),
        BackendSelector(settings),
        Admission(settings.max_concurrent, settings.queue_size, settings.queue_timeout),
        RateLimiter(""),
    )


def test_the_model_never_receives_more_than_the_budget(
    db: Database, sim: OllamaSimulator, qwen: QwenCounter, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway(db, sim)
    history = conversation(150)
    request = ChatRequest(
        user="alice",
        messages=[SYSTEM, *history, {"role": "user", "content": "Where were we?"}],
        model="qwen3:32b",
        prompt="Where were we?",
        context_budget=BUDGET,
        max_output_tokens=1024,
    )
    with caplog.at_level(logging.WARNING, logger="clawdbot.gateway"):
        events = list(gateway.stream(request))
    planned = [e for e in events if isinstance(e, ContextPlanned)]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.status == "ok"
    assert len(planned) == 1 and planned[0].plan.dropped

    received = sim.requests[-1]["body"]
    assert received["messages"][0] == SYSTEM
    assert qwen.count_messages(received["messages"]) <= BUDGET
    assert received["options"]["num_ctx"] == BUDGET + 1024
    assert not sim.requests[-1]["truncated"]
    with db.read() as session:
        record = session.scalars(select(Request)).one()
    assert record.truncated and record.dropped_messages == len(planned[0].plan.dropped)
    assert record.context_tokens_before is not None and record.context_tokens_before > BUDGET
    assert record.context_tokens_after == record.prompt_tokens == qwen.count_messages(received["messages"])
    assert record.prompt_eval_count == record.prompt_tokens  # the server counted what we counted
    # So nothing was cut out of sight: no warning, and the record says so.
    assert record.server_truncated is False and finished.server_truncated is False
    assert not [r for r in caplog.records if "may have cut" in r.getMessage()]


def test_a_server_that_counts_more_than_we_do_is_reported(
    db: Database, sim: OllamaSimulator, qwen: QwenCounter, caplog: pytest.LogCaptureFixture
) -> None:
    # A server whose tokenizer disagrees with ours (three times the tokens) cuts the prompt out of sight.
    sim.count_tokens = lambda messages, tools: 3 * qwen.count_messages(messages, tools or None)
    gateway = make_gateway(db, sim)
    request = ChatRequest(
        user="alice",
        messages=[SYSTEM, *conversation(30), {"role": "user", "content": "Go on."}],
        model="qwen3:32b",
        context_budget=BUDGET,
        max_output_tokens=512,
    )
    with caplog.at_level(logging.WARNING, logger="clawdbot.gateway"):
        events = list(gateway.stream(request))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.status == "ok"
    assert not any(isinstance(e, ContextPlanned) for e in events)  # by our count, everything fitted
    assert sim.requests[-1]["truncated"]
    warnings = [r for r in caplog.records if "may have cut the front of the prompt" in r.getMessage()]
    assert len(warnings) == 1 and f"request {finished.request_id}:" in warnings[0].getMessage()
    assert finished.server_truncated is True
    with db.read() as session:
        record = session.scalars(select(Request)).one()
    assert record.server_truncated is True and not record.truncated
    assert record.prompt_eval_count == sim.requests[-1]["prompt_eval_count"]
    assert record.prompt_tokens is not None and record.prompt_eval_count is not None
    assert record.prompt_eval_count > record.prompt_tokens * 1.05 + 16
    # The flag is part of the hashed record, and the chain holding it verifies.
    result = verify_chain(db)
    assert result.ok and result.checked == 1, result.first_break
