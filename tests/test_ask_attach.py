"""`clawdbot ask --attach FILE…` as a real process against the Ollama simulator.

Contract: exit 0 answered, 2 bad usage or rejected input, with one `error:` line on stderr saying what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clawdbot.agents import AgentConfig, Agents
from clawdbot.db import Database
from clawdbot.users import Users
from tests import hostile_files as hostile
from tests.helpers import MODEL, all_requests
from tests.ollama_sim import OllamaSimulator
from tests.test_ask import ask, one_error


@pytest.fixture
def setup(db: Database) -> Database:
    Users(db).add("test", "bob", ["staff"], "correct horse battery")
    Agents(db).add("test", "helper", AgentConfig(model=MODEL, system_prompt="Be brief.", think=False))
    return db


def test_attached_files_reach_the_model_and_the_record(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    (tmp_path / "sales.xlsx").write_bytes(hostile.macro_workbook())
    (tmp_path / "notes.txt").write_text("Berlin had a strike in May.", encoding="utf-8")
    sim.script("Berlin sold most.")
    result = ask(
        setup, sim, tmp_path, "Which city sold most?", "--user", "bob", "--agent", "helper",
        "--attach", "sales.xlsx", "--attach", str(tmp_path / "notes.txt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Berlin sold most.\n"
    assert "note: sales.xlsx: this workbook contains macros: they were ignored" in result.stderr
    sent = sim.requests[0]["body"]["messages"][-1]["content"]
    assert sent.startswith("Which city sold most?\n\n")
    assert "Berlin | 120" in sent and "Berlin had a strike in May." in sent
    [record] = all_requests(setup)
    assert record.status == "ok"
    assert '"name": "sales.xlsx"' in record.attachments and '"name": "notes.txt"' in record.attachments
    stored = [p for p in (tmp_path / "data" / "attachments").rglob("*") if p.is_file()]
    assert len(stored) == 4  # two files, each with its extracted content, named by hash


def test_a_rejected_attachment_exits_2_with_the_reason_and_is_recorded(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    (tmp_path / "secret.pdf").write_bytes(hostile.encrypted_pdf())
    result = ask(
        setup, sim, tmp_path, "Summarise", "--user", "bob", "--agent", "helper", "--attach", "secret.pdf"
    )
    one_error(result, 2, "secret.pdf: this PDF is password-protected", "without a password")
    assert result.stdout == ""
    [record] = all_requests(setup)
    assert (record.status, record.user) == ("rejected_input", "bob")
    assert sim.requests == []


def test_a_file_over_the_size_limit_is_refused_without_being_read(
    setup: Database, sim: OllamaSimulator, tmp_path: Path
) -> None:
    with (tmp_path / "huge.csv").open("wb") as fh:
        fh.truncate(3 * 1024 * 1024)  # sparse: 3 MB that cost no disk
    result = ask(
        setup, sim, tmp_path, "Rows?", "--user", "bob", "--agent", "helper", "--attach", "huge.csv",
        CLAWDBOT_MAX_UPLOAD_MB="1",
    )  # fmt: skip
    one_error(result, 2, "huge.csv: the file is 3.0 MB; the limit is 1 MB per file (CLAWDBOT_MAX_UPLOAD_MB)")
    [record] = all_requests(setup)
    assert '"size": 3145728' in record.attachments and '"sha256": ""' in record.attachments


def test_a_missing_file_is_bad_usage(setup: Database, sim: OllamaSimulator, tmp_path: Path) -> None:
    result = ask(setup, sim, tmp_path, "Hi", "--user", "bob", "--agent", "helper", "--attach", "nope.pdf")
    one_error(result, 2, "cannot attach nope.pdf: there is no such file")
    assert all_requests(setup) == []
