"""Audit page (auditors): filter and page through every request, read one in full, export, verify, events.

Text from users and models is untrusted: it is shown through st.code, st.text and st.json, never as Markdown or
HTML. The queries live in `clawdbot.audit_query`; this page keeps only the filter and the paging state.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import streamlit as st

from clawdbot.audit_query import (
    SORTABLE,
    AuditExplorer,
    Cursor,
    Page,
    Sort,
    pretty_json,
    record_download,
    record_verification,
)
from clawdbot.errors import ClawdbotError
from clawdbot.export import FORMATS, export_records
from clawdbot.models import Status
from clawdbot.records import AuditFilter
from ui.markdown import escape
from ui.session import require_page, runtime

identity = require_page("audit")
st.title("Audit")

PAGE_SIZE = 50
_FILTER, _SORT, _CURSOR, _PAGE, _OPEN = (
    "audit_filter",
    "audit_sort",
    "audit_cursor",
    "audit_page",
    "audit_open",
)
_EVENTS_BEFORE, _EXPORTED = "audit_events_before", "audit_exported"
_MIME = {
    "csv": "text/csv",
    "jsonl": "application/x-ndjson",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}

rt = runtime()
explorer = AuditExplorer(rt.db)
viewer = identity.user


def _restart_paging() -> None:
    st.session_state[_CURSOR] = None


def _day_start(day: date | None) -> datetime | None:
    return None if day is None else datetime.combine(day, time(), tzinfo=UTC)


def _either(choice: str) -> bool | None:
    return {"yes": True, "no": False}.get(choice)


def _filter_form(choices: dict[str, list[Any]]) -> None:
    with st.form("audit_filters"):
        left, middle, right = st.columns(3)
        since = left.date_input("From (UTC)", value=None, key="f_since")
        until = left.date_input("To (UTC, inclusive)", value=None, key="f_until")
        users = middle.multiselect("Users", choices["users"], key="f_users")
        agents = middle.multiselect("Agents (every version)", choices["agents"], key="f_agents")
        versions = middle.multiselect(
            "Agent versions",
            choices["agent_versions"],
            format_func=lambda v: f"{v[0]} v{v[1]}",
            key="f_versions",
        )
        models = right.multiselect("Models", choices["models"], key="f_models")
        statuses = right.multiselect("Statuses", [s.value for s in Status], key="f_statuses")
        search = right.text_input("Text in prompt or response", key="f_search")
        with st.expander("More filters"):
            a, b, c, d = st.columns(4)
            truncated = a.selectbox("Truncated", ["any", "yes", "no"], key="f_truncated")
            fallback = a.selectbox("Fallback used", ["any", "yes", "no"], key="f_fallback")
            min_latency = b.number_input("Latency from (ms)", min_value=0.0, value=None, key="f_min_latency")
            max_latency = b.number_input("Latency to (ms)", min_value=0.0, value=None, key="f_max_latency")
            min_prompt = c.number_input("Prompt tokens from", min_value=0, value=None, key="f_min_prompt")
            max_prompt = c.number_input("Prompt tokens to", min_value=0, value=None, key="f_max_prompt")
            min_out = d.number_input("Completion tokens from", min_value=0, value=None, key="f_min_out")
            max_out = d.number_input("Completion tokens to", min_value=0, value=None, key="f_max_out")
            client_ip = a.text_input("Client IP (end with * for a prefix)", key="f_ip")
        submitted = st.form_submit_button("Apply filters", icon=":material/filter_alt:")
    if not submitted:
        return
    until_day = _day_start(until)
    try:
        st.session_state[_FILTER] = AuditFilter(
            since=_day_start(since),
            until=until_day + timedelta(days=1) if until_day else None,
            users=tuple(users),
            agents=tuple(agents),
            agent_versions=tuple((str(a), int(v)) for a, v in versions),
            models=tuple(models),
            statuses=tuple(statuses),
            truncated=_either(truncated),
            fallback_used=_either(fallback),
            min_latency_ms=min_latency,
            max_latency_ms=max_latency,
            min_prompt_tokens=None if min_prompt is None else int(min_prompt),
            max_prompt_tokens=None if max_prompt is None else int(max_prompt),
            min_completion_tokens=None if min_out is None else int(min_out),
            max_completion_tokens=None if max_out is None else int(max_out),
            client_ip=client_ip.strip() or None,
            search=search.strip() or None,
        )
    except ClawdbotError as exc:
        st.error(exc.message)
        return
    _restart_paging()
    st.session_state.pop(_EXPORTED, None)


def _move(direction: str) -> None:
    page: Page | None = st.session_state.get(_PAGE)
    if page is None:
        return
    cursor = page.last if direction == "next" else page.first
    st.session_state[_CURSOR] = None if cursor is None else (cursor, direction)


def _requests_table(audit_filter: AuditFilter) -> None:
    left, right, count_column = st.columns([2, 1, 2])
    column = left.selectbox("Sort by", list(SORTABLE), index=1, key="sort_column", on_change=_restart_paging)
    descending = right.toggle(
        "Newest / largest first", value=True, key="sort_desc", on_change=_restart_paging
    )
    sort = Sort(column, descending)
    total = explorer.count(viewer, audit_filter)
    count_column.metric("Matching records", f"{total:,}")
    position: tuple[Cursor, str] | None = st.session_state.get(_CURSOR)
    cursor, direction = position if position else (None, "next")
    page = explorer.page(
        viewer, audit_filter, sort, cursor, "previous" if direction == "previous" else "next"
    )
    st.session_state[_PAGE] = page
    selection = st.dataframe(
        page.rows,
        hide_index=True,
        # One key per page, so a row picked on one page is not taken for the same row of the next.
        key=f"audit_rows_{page.first.id if page.first else 0}",
        on_select="rerun",
        selection_mode="single-row",
        column_config={
            "started_at": st.column_config.DatetimeColumn("started (UTC)", format="YYYY-MM-DD HH:mm:ss"),
            "prompt": st.column_config.TextColumn("prompt", width="large"),
        },
    )
    rows = selection.selection.rows if selection is not None else []
    if rows and rows[0] < len(page.rows):
        st.session_state[_OPEN] = int(page.rows[rows[0]]["id"])
    back, forward, _ = st.columns([1, 1, 4])
    back.button("Previous page", disabled=not page.has_previous, on_click=_move, args=("previous",))
    forward.button("Next page", disabled=not page.has_next, on_click=_move, args=("next",))


def _export(audit_filter: AuditFilter) -> None:
    st.subheader("Export the current filter")
    fmt_column, button_column = st.columns([1, 3])
    fmt = fmt_column.selectbox("Format", FORMATS, key="export_format")
    if button_column.button("Export", icon=":material/download:", key="export"):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = Path(rt.settings.data_dir) / "exports" / f"audit-{viewer.name}-{stamp}.{fmt}"
        try:
            with st.spinner("Exporting…"):
                count = export_records(
                    rt.db, path, fmt, "requests", audit_filter, actor=viewer.name, store=rt.store
                )
        except (ClawdbotError, OSError) as exc:
            st.error(f"The export failed: {exc}")
        else:
            st.session_state[_EXPORTED] = (str(path), count, fmt)
    exported = st.session_state.get(_EXPORTED)
    if exported:
        path_text, count, fmt = exported
        path = Path(path_text)
        st.caption(f"{count:,} records exported (recorded as an event).")
        if path.is_file():
            st.download_button(
                f"Download {path.name}",
                path.read_bytes(),
                file_name=path.name,
                mime=_MIME[fmt],
                key="download",
            )


def _attachment_downloads(request_id: int, attachments: list[dict[str, Any]]) -> None:
    """A download button per attached file kept on this server; each download is an audit event."""
    for index, attachment in enumerate(attachments):
        data = rt.chat.attachments.original(attachment["sha256"])
        if data is None:
            st.caption(f"{escape(attachment['name'])}: the file itself is not kept on this server.")
            continue
        st.download_button(
            f"Download {escape(attachment['name'])}",
            data,
            file_name=attachment["name"],
            mime="application/octet-stream",
            key=f"attachment_{request_id}_{index}",
            on_click=record_download,
            args=(rt.store, viewer.name, request_id, attachment),
        )


def _detail(request_id: int) -> None:
    try:
        record = explorer.detail(viewer, request_id)
    except ClawdbotError as exc:
        st.error(exc.message)
        return
    r = record.request
    st.subheader(f"Request {request_id}")
    a, b, c, d = st.columns(4)
    a.metric("Status", r["status"])
    b.metric("User", r["user"])
    c.metric("Agent", f"{r['agent']} v{r['agent_version']}" if r["agent_version"] else r["agent"] or "—")
    d.metric("Model used", r["model_used"] or "—")
    st.text(
        f"started {r['started_at']} · finished {r['finished_at']} · client {r['client_ip'] or '—'} · "
        f"backend {r['backend'] or '—'} · model requested {r['model_requested'] or '—'} · "
        f"fallback used {r['fallback_used']} · retries {r['retries']}"
    )
    if r["error"]:
        st.text(f"error: {r['error']}")
    timing = {k: r[k] for k in ("queue_ms", "ttft_ms", "latency_ms", "tokens_per_s")}
    tokens = {
        k: r[k]
        for k in ("prompt_tokens", "prompt_eval_count", "completion_tokens", "context_tokens_before",
                  "context_tokens_after", "truncated", "dropped_messages", "server_truncated")
    }  # fmt: skip
    left, right = st.columns(2)
    left.caption("Timings")
    left.json(timing)
    right.caption("Tokens and truncation")
    right.json(tokens)
    st.caption("Prompt")
    st.code(r["prompt"], language=None, wrap_lines=True)
    st.caption("Context exactly as sent to the model")
    st.json(pretty_json(r["context"]), expanded=1)
    st.caption("Response")
    st.code(r["response"], language=None, wrap_lines=True)
    if r["thinking"]:
        with st.expander("Thinking"):
            st.code(r["thinking"], language=None, wrap_lines=True)
    st.caption("Tool calls")
    st.json(pretty_json(r["tool_calls"]), expanded=2)
    st.caption("Attachments")
    st.dataframe(record.attachments or pretty_json(r["attachments"]), hide_index=True)
    _attachment_downloads(request_id, record.attachments)
    if record.agent_version:
        version = record.agent_version
        with st.expander(f"Agent {version['agent']} version {version['version']}: model {version['model']}"):
            st.caption("System prompt")
            st.code(version["system_prompt"], language=None, wrap_lines=True)
            st.json({k: v for k, v in version.items() if k != "system_prompt"}, expanded=False)
    st.caption("Chain position, previous hash and hash")
    st.code(f"seq       {r['seq']}\nprev_hash {r['prev_hash']}\nhash      {r['hash']}", language=None)
    if r["conversation_id"] is not None:
        with st.expander(f"Conversation {r['conversation_id']}: every turn"):
            for turn in explorer.conversation(viewer, int(r["conversation_id"])):
                st.caption(
                    f"Request {turn['id']} · {turn['started_at']} · {turn['status']} · {turn['model_used']}"
                )
                with st.chat_message("user"):
                    st.text(turn["prompt"])
                with st.chat_message("assistant"):
                    st.text(turn["response"])


def _verify() -> None:
    st.write("Walk the whole hash chain and report the first record that breaks it. The check is an event.")
    if st.button("Verify the chain", icon=":material/verified:", key="verify"):
        bar = st.progress(0.0, text="Verifying…")

        def progress(checked: int, total: int) -> None:
            bar.progress(
                min(1.0, checked / total) if total else 1.0, text=f"{checked:,} of {total:,} records"
            )

        result = record_verification(rt.db, rt.store, viewer.name, progress)
        bar.progress(1.0, text=f"{result.checked:,} records checked")
        if result.first_break is None:
            st.success(f"The chain is intact: {result.checked:,} records, head {result.head_hash}.")
        else:
            st.error(f"The chain is broken: {result.first_break.describe()}")


def _events() -> None:
    with st.form("event_filters"):
        left, right = st.columns(2)
        actor = left.text_input("Actor", key="e_actor")
        text = right.text_input("Text in action, target or details", key="e_search")
        if st.form_submit_button("Show events"):
            st.session_state[_EVENTS_BEFORE] = None
    audit_filter = AuditFilter(users=(actor.strip(),) if actor.strip() else (), search=text.strip() or None)
    before: int | None = st.session_state.get(_EVENTS_BEFORE)
    events = explorer.events(viewer, audit_filter, before_id=before, limit=PAGE_SIZE)
    st.dataframe(events, hide_index=True, key="event_rows")
    newer, older, _ = st.columns([1, 1, 4])
    if newer.button("Newest events", disabled=before is None, key="events_newest"):
        st.session_state[_EVENTS_BEFORE] = None
        st.rerun()
    if older.button("Older events", disabled=len(events) < PAGE_SIZE, key="events_older"):
        st.session_state[_EVENTS_BEFORE] = int(events[-1]["id"])
        st.rerun()


requests_tab, events_tab, verify_tab = st.tabs(["Requests", "Events", "Verify"])
with requests_tab:
    _filter_form(explorer.choices())
    current: AuditFilter = st.session_state.get(_FILTER) or AuditFilter()
    _requests_table(current)
    with st.form("open_record", border=False):
        wanted = st.number_input("Open record by id", min_value=1, step=1, value=None, key="open_id")
        if st.form_submit_button("Open record") and wanted is not None:
            st.session_state[_OPEN] = int(wanted)
    _export(current)
    opened = st.session_state.get(_OPEN)
    if opened is not None:
        st.divider()
        _detail(int(opened))
with events_tab:
    _events()
with verify_tab:
    _verify()
