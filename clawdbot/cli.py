"""The `clawdbot` command. Every failure is one line on stderr and a non-zero exit code (see errors.py)."""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from sqlalchemy.exc import SQLAlchemyError
from typer.exceptions import TyperException

from clawdbot.agents import AgentConfig
from clawdbot.api_keys import ApiKeys
from clawdbot.attachments import upload_from_path
from clawdbot.backends import ContentDelta, ThinkingDelta
from clawdbot.chain import verify_chain
from clawdbot.chat import TurnStarted
from clawdbot.errors import ClawdbotError, UsageError
from clawdbot.export import FORMATS, KINDS, export_records
from clawdbot.gateway import Finished, Queued
from clawdbot.models import Status
from clawdbot.records import AuditFilter, parse_time
from clawdbot.runtime import Runtime

# The ASGI wrapper around app.py: the UI and the HTTP routes served by one process.
SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "asgi.py"

app = typer.Typer(
    name="clawdbot",
    help="Self-hosted AI-agent control center.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
user_app = typer.Typer(help="Local user accounts.", no_args_is_help=True)
agent_app = typer.Typer(help="Agents.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log: verify the hash chain, export records.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(agent_app, name="agent")
app.add_typer(audit_app, name="audit")
key_app = typer.Typer(help="API keys for the HTTP API (/v1/...).", no_args_is_help=True)
app.add_typer(key_app, name="key")


def cli_actor() -> str:
    """Who did it, for events written from the command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


@app.command()
def run(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8501,
) -> None:
    """Upgrade the database, create the first admin if there is no user, and serve the app."""
    runtime = Runtime.open(upgrade=True)
    swept = runtime.store.sweep_abandoned()
    if swept:
        typer.echo(f"marked {swept} unfinished request(s) from a stopped process as abandoned", err=True)
    password = runtime.users.ensure_first_admin()
    if password is not None:
        typer.echo("created the admin user 'admin'; sign in with this one-time password and change it:")
        typer.echo(f"password: {password}")
    max_upload_mb = runtime.settings.max_upload_mb
    runtime.close()
    if not SERVER_SCRIPT.is_file():
        raise ClawdbotError(f"the app is missing at {SERVER_SCRIPT}: install clawdbot from its source tree")
    typer.echo(f"serving clawdbot on http://{host}:{port}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [  # noqa: S606 - the app replaces this process
        sys.executable, "-m", "streamlit", "run", str(SERVER_SCRIPT),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        # No traceback or developer menu in front of users; uploads capped before our own checks run.
        "--client.showErrorDetails", "none", "--client.toolbarMode", "viewer",
        "--server.maxUploadSize", str(max_upload_mb),
    ])  # fmt: skip


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the migrations the database lacks."""
    runtime = Runtime.open(upgrade=True)
    typer.echo(f"database {runtime.db.safe_url} is up to date")


def _read_password_stdin() -> str:
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise UsageError(
            'no password on standard input: pipe one line, e.g. `echo "$PW" | clawdbot user add …`'
        )
    return line


@user_app.command("add")
def user_add(
    name: str,
    role: Annotated[list[str], typer.Option("--role", help="staff, admin or auditor; repeat for several.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
) -> None:
    """Create a user. Without --password-stdin a one-time password is generated and printed once."""
    password = _read_password_stdin() if password_stdin else None
    user, secret = Runtime.open().users.add(cli_actor(), name, role, password)
    typer.echo(f"created user {user.name} ({', '.join(sorted(r.value for r in user.roles))})")
    if password is None:
        typer.echo(f"password: {secret}")


@user_app.command("list")
def user_list() -> None:
    """List users with their roles."""
    for user in Runtime.open().users.all():
        state = "disabled" if user.disabled else "active"
        typer.echo(f"{user.name}\t{','.join(sorted(r.value for r in user.roles))}\t{state}")


@user_app.command("disable")
def user_disable(name: str) -> None:
    """Disable a user: they can no longer sign in or use API keys."""
    Runtime.open().users.set_disabled(cli_actor(), name)
    typer.echo(f"disabled user {name}")


@agent_app.command("list")
def agent_list(
    archived: Annotated[bool, typer.Option("--archived", help="Include archived agents.")] = False,
) -> None:
    """List agents with their current version and model."""
    for agent in Runtime.open().agents.all(include_archived=archived):
        tools = ",".join(agent.config.tools) or "-"
        flag = "\tarchived" if agent.archived else ""
        typer.echo(f"{agent.name}\tv{agent.version}\t{agent.config.model}\ttools={tools}{flag}")


@agent_app.command("add")
def agent_add(
    name: str,
    model: Annotated[str, typer.Option("--model", help="Model name, e.g. qwen3:32b.")],
    system_prompt: Annotated[str, typer.Option("--system-prompt", help="The agent's instructions.")],
    tool: Annotated[
        list[str] | None, typer.Option("--tool", help="A tool the agent may call; repeatable.")
    ] = None,
    fallback_model: Annotated[str, typer.Option("--fallback-model", help="Used when the model fails.")] = "",
    context_budget: Annotated[int | None, typer.Option(help="Tokens of context sent at most.")] = None,
    max_output_tokens: Annotated[int, typer.Option(help="Tokens the model may write.")] = 2048,
) -> None:
    """Create an agent (version 1)."""
    runtime = Runtime.open()
    config = AgentConfig(
        model=model,
        system_prompt=system_prompt,
        tools=tuple(tool or ()),
        fallback_model=fallback_model,
        context_budget=context_budget or runtime.settings.context_budget,
        max_output_tokens=max_output_tokens,
    )
    agent = runtime.agents.add(cli_actor(), name, config)
    typer.echo(f"created agent {agent.name} (version {agent.version}, model {agent.config.model})")


@key_app.command("create")
def key_create(
    user: Annotated[str, typer.Option("--user", help="The user the key acts as.")],
    label: Annotated[str, typer.Option("--label", help="What the key is for, e.g. the script's name.")] = "",
) -> None:
    """Create an API key for a user; the key is printed once and cannot be shown again."""
    created = ApiKeys(Runtime.open().db).create(cli_actor(), user, label)
    typer.echo(
        f"created API key {created.info.id} for {created.info.user}; it is shown only this once:", err=True
    )
    typer.echo(created.secret)


@key_app.command("list")
def key_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's keys.")] = None,
) -> None:
    """List API keys (never the keys themselves): id, user, first characters, label, state, last use."""
    runtime = Runtime.open()
    if user is not None:
        runtime.users.get(user)  # an unknown name is an error, not an empty list
    for key in ApiKeys(runtime.db).all(user):
        state = "active" if key.active else f"revoked {key.revoked_at:%Y-%m-%dT%H:%M:%SZ}"
        used = f"{key.last_used_at:%Y-%m-%dT%H:%M:%SZ}" if key.last_used_at else "never used"
        typer.echo(f"{key.id}\t{key.user}\t{key.shown}\t{key.label or '-'}\t{state}\t{used}")


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[int, typer.Argument(metavar="ID", help="The key's id (see `key list`).")],
) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    key = ApiKeys(Runtime.open().db).revoke(cli_actor(), key_id)
    typer.echo(f"revoked API key {key.id} ({key.shown}) of {key.user}")


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The message to send.")],
    user: Annotated[str, typer.Option("--user", help="Who asks; the request is recorded as theirs.")],
    agent: Annotated[str | None, typer.Option("--agent", help="The agent to ask.")] = None,
    conversation: Annotated[
        int | None, typer.Option("--conversation", help="Continue this conversation.")
    ] = None,
    think: Annotated[
        bool | None,
        typer.Option("--think/--no-think", help="Ask for thinking (shown on stderr); default: the agent's."),
    ] = None,
    attach: Annotated[
        list[Path] | None,
        typer.Option(
            "--attach",
            metavar="FILE",
            help="Attach a PDF, Excel workbook, CSV or text file (repeat for more).",
        ),
    ] = None,
) -> None:
    """One turn through the same gateway as the UI: the answer streams to stdout and is recorded."""
    runtime = Runtime.open()
    asker = runtime.users.get(user)
    if asker.disabled:
        raise UsageError(f"the user {user!r} is disabled")
    limit = runtime.settings.max_upload_mb * 1024 * 1024
    uploads = [upload_from_path(path, limit) for path in attach or []]
    finished: Finished | None = None
    wrote_thinking = wrote_content = False
    last_position = 0
    turn = runtime.chat.turn(
        user, prompt, agent=agent, conversation_id=conversation, think=think, attachments=uploads
    )
    for event in turn:
        if isinstance(event, ContentDelta):
            if wrote_thinking and not wrote_content:
                sys.stderr.write("\n")
            sys.stdout.write(event.text)
            sys.stdout.flush()
            wrote_content = True
        elif isinstance(event, ThinkingDelta):
            if think:
                sys.stderr.write(event.text)
                sys.stderr.flush()
                wrote_thinking = True
        elif isinstance(event, Queued) and event.position != last_position:
            last_position = event.position
            typer.echo(f"waiting for the model: number {event.position} in the queue", err=True)
        elif isinstance(event, Finished):
            finished = event
        elif isinstance(event, TurnStarted):
            for note in event.notes:
                typer.echo(f"note: {note}", err=True)
            if conversation is None:
                conversation = event.conversation_id
    if wrote_content:
        sys.stdout.write("\n")
    runtime.close()
    if finished is None:
        raise ClawdbotError("the answer ended without an outcome")
    if finished.status is not Status.OK:
        typer.echo(f"error: {finished.message}", err=True)
    elif conversation is not None:
        typer.echo(f"conversation {conversation}: continue it with --conversation {conversation}", err=True)
    if finished.exit_code:
        raise typer.Exit(finished.exit_code)


@audit_app.command("verify")
def audit_verify(
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check the whole hash chain; exit 1 naming the first record that breaks it."""
    runtime = Runtime.open()
    result = verify_chain(runtime.db)
    details = {
        "ok": result.ok,
        "checked": result.checked,
        "head_seq": result.head_seq,
        "first_break": result.first_break.describe() if result.first_break else None,
    }
    runtime.store.record_event(cli_actor(), "audit.verify", "chain", details)
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    elif result.first_break is None:
        typer.echo(f"chain intact: {result.checked} records, head {result.head_hash}")
    else:
        typer.echo(f"chain broken: {result.first_break.describe()}", err=True)
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    fmt: Annotated[str, typer.Option("--format", help=f"One of {', '.join(FORMATS)}.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    kind: Annotated[str, typer.Option("--kind", help=f"One of {', '.join(KINDS)}.")] = "requests",
    since: Annotated[str | None, typer.Option(help="ISO time; records at or after it.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time; records before it.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user (the actor, for events).")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    search: Annotated[str | None, typer.Option(help="Text in the prompt or response.")] = None,
) -> None:
    """Export audit records to CSV, XLSX or JSONL with the contract's columns."""
    audit_filter = AuditFilter(
        since=parse_time(since, "--since") if since else None,
        until=parse_time(until, "--until") if until else None,
        user=user,
        agent=agent,
        status=status,
        search=search,
    )
    runtime = Runtime.open()
    count = export_records(
        runtime.db, output, fmt, kind, audit_filter, actor=cli_actor(), store=runtime.store
    )
    typer.echo(f"exported {count} {kind} to {output}")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def main() -> None:
    """Entry point: run the command and turn every failure into one line and an exit code."""
    # Warnings reach the user as the command's own one-line messages; only errors are logged on top.
    logging.basicConfig(level=logging.ERROR, format="clawdbot: %(levelname)s: %(message)s")
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="clawdbot", standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        _fail("interrupted", 130)
    except TyperException as exc:
        # Typer's own usage errors (it vendors click): unknown option, missing argument, bad value.
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise SystemExit(2) from None  # typer has printed the help
        where = ctx.command_path if ctx is not None else "clawdbot"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"{message} (see `{where} --help`)", int(getattr(exc, "exit_code", 2)))
    except ClawdbotError as exc:
        _fail(exc.message, exc.exit_code)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        _fail(f"database error: {reason}", 1)
    except OSError as exc:
        _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    # Without standalone mode, `typer.Exit(n)` inside a command comes back as the return value.
    if isinstance(code, int) and code:
        raise SystemExit(code)
