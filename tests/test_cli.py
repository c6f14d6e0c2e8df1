"""The `clawdbot` command as a real process: outputs, exit codes, and one line per error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from clawdbot.db import Database
from clawdbot.models import Event, Request
from clawdbot.users import Users
from tests.cli_helpers import CLAWDBOT, clean_env, free_port, run_cli


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and text in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_db_upgrade_then_users_and_agents(db_url: str, tmp_path: Path) -> None:
    assert run_cli(["db", "upgrade"], db_url, tmp_path).returncode == 0
    added = run_cli(["user", "add", "bob", "--role", "staff"], db_url, tmp_path)
    assert added.returncode == 0, added.stderr
    password = added.stdout.split("password: ")[1].strip()
    assert Users(Database(db_url)).authenticate("bob", password) is not None

    piped = run_cli(
        ["user", "add", "carol", "--role", "auditor", "--role", "staff", "--password-stdin"],
        db_url,
        tmp_path,
        stdin="correct horse battery\n",
    )
    assert piped.returncode == 0 and "password:" not in piped.stdout
    assert Users(Database(db_url)).authenticate("carol", "correct horse battery") is not None

    listed = run_cli(["user", "list"], db_url, tmp_path)
    assert listed.stdout.splitlines() == ["bob\tstaff\tactive", "carol\tauditor,staff\tactive"]
    assert run_cli(["user", "disable", "bob"], db_url, tmp_path).returncode == 0
    assert "bob\tstaff\tdisabled" in run_cli(["user", "list"], db_url, tmp_path).stdout

    made = run_cli(
        [
            "agent",
            "add",
            "helper",
            "--model",
            "qwen3:32b",
            "--system-prompt",
            "Be brief.",
            "--tool",
            "make_chart",
            "--fallback-model",
            "qwen3:0.6b",
        ],
        db_url,
        tmp_path,
    )
    assert made.returncode == 0, made.stderr
    assert run_cli(["agent", "list"], db_url, tmp_path).stdout == "helper\tv1\tqwen3:32b\ttools=make_chart\n"

    with Database(db_url).read() as session:
        actions = session.scalars(select(Event.action).order_by(Event.seq)).all()
        actors = set(session.scalars(select(Event.actor)))
    assert actions == ["user.create", "user.create", "user.disable", "agent.create"]
    assert all(a.startswith("cli:") for a in actors)


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["user", "add", "eve", "--role", "boss"], 2, "unknown role 'boss'"),
        (["user", "add"], 2, "Missing argument"),
        (["user", "add", "eve", "--rol", "staff"], 2, "No such option: --rol"),
        (["user", "disable", "nobody"], 2, "no user named 'nobody'"),
        (
            ["agent", "add", "a", "--model", "m", "--system-prompt", "s", "--tool", "rm"],
            2,
            "unknown tool 'rm'",
        ),
        (["agent", "add", "a", "--model", "m", "--system-prompt", "s", "--context-budget", "9"], 2, "budget"),
        (["audit", "export", "--format", "pdf", "-o", "x.pdf"], 2, "unknown export format 'pdf'"),
        (["user", "add", "eve", "--role", "staff", "--password-stdin"], 2, "no password on standard input"),
        (["port", "--x"], 2, "No such command"),
    ],
)
def test_each_error_is_one_line(db_url: str, tmp_path: Path, args: list[str], code: int, text: str) -> None:
    assert run_cli(["db", "upgrade"], db_url, tmp_path).returncode == 0
    _one_error_line(run_cli(args, db_url, tmp_path, stdin=""), code, text)


def test_commands_refuse_an_unmigrated_database_with_what_to_run(db_url: str, tmp_path: Path) -> None:
    _one_error_line(run_cli(["user", "list"], db_url, tmp_path), 1, "run `clawdbot db upgrade`")


def test_bad_setting_stops_the_command_with_one_line(tmp_path: Path) -> None:
    result = run_cli(["user", "list"], f"sqlite:///{tmp_path}/x.db", tmp_path, CLAWDBOT_MAX_CONCURRENT="0")
    _one_error_line(
        result, 2, "invalid setting CLAWDBOT_MAX_CONCURRENT=0: expected a whole number from 1 to 256"
    )


def test_unreachable_database_is_one_line_without_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://clawdbot:s3cret-pw@127.0.0.1:1/nowhere"
    result = run_cli(["db", "upgrade"], url, tmp_path)
    _one_error_line(result, 1, "cannot reach the database")
    assert "s3cret-pw" not in result.stderr


def test_verify_reports_a_break_and_exits_1(db_url: str, tmp_path: Path) -> None:
    run_cli(["db", "upgrade"], db_url, tmp_path)
    run_cli(["user", "add", "bob", "--role", "staff"], db_url, tmp_path)
    ok = run_cli(["audit", "verify"], db_url, tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("chain intact: 1 records")
    db = Database(db_url)
    with db.write() as session:
        event = session.scalars(select(Event).order_by(Event.seq)).first()
        assert event is not None
        event.target = "mallory"
    broken = run_cli(["audit", "verify"], db_url, tmp_path)
    assert broken.returncode == 1
    assert (
        broken.stderr
        == "chain broken: event 1 at chain position 1: its content was changed after it was recorded\n"
    )
    as_json = run_cli(["audit", "verify", "--json"], db_url, tmp_path)
    assert as_json.returncode == 1 and '"ok": false' in as_json.stdout


def _wait_for_health(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "clawdbot run exited early"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the app did not answer in time")


def test_run_upgrades_creates_the_first_admin_once_sweeps_and_serves(db_url: str, tmp_path: Path) -> None:
    # A request left `started` by a process that has since exited.
    code = (
        "import sys; from clawdbot.audit import AuditStore; from clawdbot.db import Database; "
        "from clawdbot import migrate; db = Database(sys.argv[1]); migrate.upgrade(db); "
        "AuditStore(db).start_request(user='bob', prompt='left behind')"
    )
    subprocess.run([sys.executable, "-c", code, db_url], check=True, timeout=60)

    def serve() -> tuple[str, str]:
        port = free_port()
        proc = subprocess.Popen(
            [CLAWDBOT, "run", "--port", str(port)], cwd=tmp_path, env=clean_env(db_url, tmp_path / "data"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _wait_for_health(port, proc)
            # A browser without a session is sent to the sign-in form, served by the same process.
            page = httpx.get(f"http://127.0.0.1:{port}/chat", timeout=5)
            assert page.status_code == 303 and page.headers["location"].startswith("/signin")
            assert "Sign in" in httpx.get(f"http://127.0.0.1:{port}/signin", timeout=5).text
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            assert health["database"]["status"] == "ok"
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
        return out, err

    out, err = serve()
    password = [line for line in out.splitlines() if line.startswith("password: ")]
    assert len(password) == 1
    assert Users(Database(db_url)).authenticate("admin", password[0].removeprefix("password: ")) is not None
    assert "marked 1 unfinished request(s)" in err
    with Database(db_url).read() as session:
        status, error = session.execute(select(Request.status, Request.error)).one()
    assert status == "abandoned" and "stopped before it finished" in error

    out, err = serve()
    assert "password:" not in out and "marked" not in err
