"""`clawdbot ask` as a real process against the Ollama simulator: streaming, exit codes and messages.

The contract's exit codes: 0 answered; 2 rejected input or bad usage; 3 busy; 4 rate limited; 5 model
unavailable after retries and fallback; 6 timed out. Every failure is one line on stderr saying what happened
and what to do.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from clawdbot.agents import AgentConfig, Agents
from clawdbot.conversations import Conversations
from clawdbot.db import Database
from clawdbot.models import Message
from clawdbot.ratelimit import RateLimiter
from clawdbot.users import Users
from tests.cli_helpers import CLAWDBOT, clean_env, run_cli
from tests.helpers import MODEL, all_requests, require_redis
from tests.ollama_sim import OllamaSimulator


@pytest.fixture
def setup(db: Database) -> Database:
    """Users bob and carol and the agent `helper` (no fallback model), created in-process to save time."""
    users = Users(db)
    users.add("test", "bob", ["staff"], "correct horse battery")
    users.add("test", "carol", ["staff"], "correct horse battery")
    Agents(db).add("test", "helper", AgentConfig(model=MODEL, system_prompt="Be brief.", think=False))
    return db


def ask(
    db: Database, sim: OllamaSimulator, cwd: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    settings = {
        "OLLAMA_HOST": sim.url,
        "CLAWDBOT_BACKEND": "ollama",
        "CLAWDBOT_RETRIES": "0",
        "CLAWDBOT_RATE_LIMIT": "",
        "CLAWDBOT_CONNECT_TIMEOUT": "2",
        **env,
    }
    return run_cli(["ask", *args], db.url, cwd, **settings)


def one_error(result: subprocess.CompletedProcess[str], code: int, *texts: str) -> str:
    """The single `error: …` line of a failed command, checked for its exit code and words."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def test_the_answer_streams_to_stdout_as_it_is_generated(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    sim.script("one two three four five six")
    sim.tokens_per_s = 4.0  # the last token comes 1.25 s after the first
    process = subprocess.Popen(
        [CLAWDBOT, "ask", "count for me", "--user", "bob", "--agent", "helper"],
        cwd=tmp_path,
        env=clean_env(
            setup.url,
            tmp_path / "data",
            OLLAMA_HOST=sim.url,
            CLAWDBOT_BACKEND="ollama",
            CLAWDBOT_RATE_LIMIT="",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = os.read(process.stdout.fileno(), 1024)
        assert first.startswith(b"one ")
        assert process.poll() is None  # the rest is still being generated
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert (first + rest).decode() == "one two three four five six\n"
    assert stderr.decode().strip() == "conversation 1: continue it with --conversation 1"
    [record] = all_requests(setup)
    assert (record.status, record.user, record.agent, record.response) == (
        "ok",
        "bob",
        "helper",
        "one two three four five six",
    )
    assert record.ttft_ms is not None and record.tokens_per_s is not None and record.latency_ms is not None


def test_think_shows_the_thinking_on_stderr_only(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    sim.script("Paris.", thinking="The capital of France is Paris.")
    result = ask(setup, sim, tmp_path, "Capital of France?", "--user", "bob", "--agent", "helper", "--think")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Paris.\n"
    assert result.stderr.startswith("The capital of France is Paris.\n")
    assert sim.requests[0]["body"]["think"] is True

    sim.script("Rome.", thinking="Italy's capital is Rome.")
    quiet = ask(setup, sim, tmp_path, "Capital of Italy?", "--user", "bob", "--agent", "helper", "--no-think")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "Rome.\n" and "Rome" not in quiet.stderr
    assert sim.requests[1]["body"]["think"] is False


def test_conversation_continues_with_the_earlier_turns(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    sim.script("Paris.")
    first = ask(setup, sim, tmp_path, "Capital of France?", "--user", "bob", "--agent", "helper")
    assert first.returncode == 0, first.stderr
    match = re.search(r"continue it with --conversation (\d+)", first.stderr)
    assert match is not None, first.stderr
    conversation = match.group(1)

    sim.script("Rome.")
    second = ask(setup, sim, tmp_path, "And Italy?", "--user", "bob", "--conversation", conversation)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "Rome.\n"
    assert sim.requests[1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
    ]
    with setup.read() as session:
        stored = session.scalars(select(Message.content).order_by(Message.id)).all()
    assert stored == ["Capital of France?", "Paris.", "And Italy?", "Rome."]


def test_unknown_or_foreign_conversation_is_exit_2(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    carols = Conversations(setup).create("carol", "helper")
    for conversation in ("999", str(carols)):
        result = ask(setup, sim, tmp_path, "hello", "--user", "bob", "--conversation", conversation)
        # The same answer whether it does not exist or is someone else's.
        one_error(result, 2, f"bob has no conversation {conversation}")
        assert result.stdout == ""
    assert sim.requests == []


def test_unknown_agent_is_exit_2(setup: Database, sim: OllamaSimulator, tmp_path: Path) -> None:
    result = ask(setup, sim, tmp_path, "hello", "--user", "bob", "--agent", "nobody")
    one_error(result, 2, "there is no agent named 'nobody'", "clawdbot agent list")
    assert sim.requests == [] and all_requests(setup) == []


def test_an_empty_prompt_is_rejected_with_exit_2_and_recorded(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    result = ask(setup, sim, tmp_path, "   ", "--user", "bob", "--agent", "helper")
    one_error(result, 2, "the message is empty: type a question or instruction")
    assert result.stdout == ""
    assert sim.requests == []
    assert [(r.status, r.user) for r in all_requests(setup)] == [("rejected_input", "bob")]


def test_ollama_busy_is_exit_3(setup: Database, sim: OllamaSimulator, tmp_path: Path) -> None:
    sim.fail_next("http_503", count=2)
    result = ask(setup, sim, tmp_path, "hello", "--user", "bob", "--agent", "helper", CLAWDBOT_RETRIES="1")
    one_error(result, 3, f"Ollama at {sim.url} is busy", "try again shortly", "after 1 retries")
    assert len(sim.requests) == 2
    assert [r.status for r in all_requests(setup)] == ["busy"]


def test_rate_limited_is_exit_4(setup: Database, sim: OllamaSimulator, tmp_path: Path) -> None:
    redis_url = require_redis()
    # Each `clawdbot ask` is its own process: the limit holds across them through Redis. A user name of
    # its own keeps this test's counters apart from any other run.
    user = f"rl{uuid.uuid4().hex[:12]}"
    Users(setup).add("test", user, ["staff"], "correct horse battery")
    env = {"CLAWDBOT_RATE_LIMIT": "1/minute", "CLAWDBOT_REDIS_URL": redis_url}
    try:
        assert ask(setup, sim, tmp_path, "first", "--user", user, "--agent", "helper", **env).returncode == 0
        result = ask(setup, sim, tmp_path, "second", "--user", user, "--agent", "helper", **env)
    finally:
        limiter = RateLimiter("1/minute", redis_url)
        limiter.reset(user)
        limiter.close()
    one_error(result, 4, "you have sent 1 request in the last minute, the most allowed; try again in")
    assert len(sim.requests) == 1
    assert [r.status for r in all_requests(setup)] == ["ok", "rate_limited"]


@pytest.mark.parametrize("fault", ["server down", "model not found"])
def test_model_unavailable_after_retries_and_fallback_is_exit_5(
    setup: Database, sim: OllamaSimulator, tmp_path: Path, fault: str
) -> None:
    env = {"CLAWDBOT_RETRIES": "1"}
    if fault == "server down":
        sim.stop()
        texts = [f"cannot reach Ollama at {sim.url}", "start it with `ollama serve` or check OLLAMA_HOST"]
    else:
        env["CLAWDBOT_FALLBACK_MODEL"] = "gone:1b"
        Agents(setup).add("test", "lost", AgentConfig(model="nosuch:7b"))
        # Both names: the model the agent asks for and the fallback, each with the command that installs it.
        texts = [
            "the model nosuch:7b is not on the Ollama server: run `ollama pull nosuch:7b`; "
            "the fallback model gone:1b failed too: "
            "the model gone:1b is not on the Ollama server: run `ollama pull gone:1b`"
        ]
    agent = "helper" if fault == "server down" else "lost"
    began = time.monotonic()
    result = ask(setup, sim, tmp_path, "hello", "--user", "bob", "--agent", agent, **env)
    one_error(result, 5, *texts)
    assert result.stdout == ""
    [record] = all_requests(setup)
    assert record.status == "error" and record.error
    if fault == "server down":
        assert record.retries == 1 and time.monotonic() - began >= 0.45
    else:
        assert [r["model"] for r in sim.requests] == ["nosuch:7b", "gone:1b"]  # no retry for a missing model
        assert record.fallback_used


def test_silence_longer_than_the_read_timeout_is_exit_6(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    sim.fail_next("stall", after_chunks=0, seconds=10)
    result = ask(
        setup, sim, tmp_path, "hello", "--user", "bob", "--agent", "helper", CLAWDBOT_READ_TIMEOUT="0.5"
    )
    one_error(result, 6, "the model sent nothing for 0.5 s (CLAWDBOT_READ_TIMEOUT)", "overloaded or stuck")
    assert [r.status for r in all_requests(setup)] == ["timeout"]
