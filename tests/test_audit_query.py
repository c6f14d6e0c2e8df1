"""The audit explorer's queries on SQLite and PostgreSQL: filters, keyset pages, counts, search, who sees what."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text

from clawdbot.audit import AuditStore
from clawdbot.audit_query import SORTABLE, AuditExplorer, Cursor, Sort
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Event, Request, Role
from clawdbot.records import AuditFilter
from clawdbot.users import UserInfo

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
AUDITOR = UserInfo(1, "aud", frozenset({Role.AUDITOR}), False, False)
ADMIN = UserInfo(2, "root", frozenset({Role.ADMIN}), False, False)


def staff(name: str) -> UserInfo:
    return UserInfo(3, name, frozenset({Role.STAFF}), False, False)


@dataclass(frozen=True)
class Rec:
    user: str
    agent: str
    version: int
    model: str
    status: str
    prompt: str
    response: str
    latency: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    truncated: bool = False
    fallback: bool = False
    ip: str = "10.0.0.1"
    conversation: int | None = None


RECORDS = (
    Rec("alice", "contract", 1, "qwen3:32b", "ok", "请总结这份合同的付款条款", "付款期限为三十天", 120.0, 40, 10,
        conversation=7),
    Rec("alice", "contract", 2, "qwen3:32b", "ok", "What is the termination clause?", "Ninety days notice.",
        300.0, 80, 20, truncated=True, conversation=7),
    Rec("bob", "helper", 1, "qwen3:8b", "error", "Translate 你好 into English", "", None, 15, None,
        fallback=True, ip="10.0.1.5"),
    Rec("bob", "helper", 1, "qwen3:8b", "ok", "天气怎么样", "今天天气晴朗 sunny", 120.0, 12, 8, ip="10.0.1.6"),
    Rec("carol", "contract", 2, "qwen3:32b", "timeout", "Summarise the REPORT", "", None, None, None,
        ip="192.168.1.9"),
    Rec("carol", "helper", 1, "qwen3:8b", "ok", "hello world", "Hello there, 世界", 120.0, 5, 3),
    Rec("alice", "helper", 1, "qwen3:8b", "ok", "report 100% done?", "yes", 50.0, 9, 1, ip="10.0.0.2"),
)  # fmt: skip


@pytest.fixture
def ids(store: AuditStore) -> list[int]:
    out = []
    for n, rec in enumerate(RECORDS):
        request_id = store.start_request(
            started_at=T0 + timedelta(hours=n),
            user=rec.user,
            agent=rec.agent,
            agent_version=rec.version,
            model_requested=rec.model,
            prompt=rec.prompt,
            client_ip=rec.ip,
            conversation_id=rec.conversation,
        )
        store.finish_request(
            request_id,
            rec.status,
            finished_at=T0 + timedelta(hours=n, seconds=2),
            model_used=rec.model,
            response=rec.response,
            latency_ms=rec.latency,
            prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            truncated=rec.truncated,
            fallback_used=rec.fallback,
        )
        out.append(request_id)
    return out


def every_id(explorer: AuditExplorer, audit_filter: AuditFilter, viewer: UserInfo = AUDITOR) -> list[int]:
    page = explorer.page(viewer, audit_filter, Sort("id", descending=False), limit=500)
    return [row["id"] for row in page.rows]


def where(ids: list[int], test: Any) -> list[int]:
    return [i for i, rec in zip(ids, RECORDS, strict=True) if test(rec)]


FILTERS = [
    pytest.param(AuditFilter(since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=4)),
                 lambda r: r in RECORDS[2:4], id="time range"),
    pytest.param(AuditFilter(users=("alice", "carol")), lambda r: r.user in ("alice", "carol"), id="users"),
    pytest.param(AuditFilter(agents=("contract",)), lambda r: r.agent == "contract", id="agents"),
    pytest.param(AuditFilter(agent_versions=(("contract", 2),)),
                 lambda r: (r.agent, r.version) == ("contract", 2), id="agent version"),
    pytest.param(AuditFilter(agents=("helper",), agent_versions=(("contract", 1),)),
                 lambda r: r.agent == "helper" or (r.agent, r.version) == ("contract", 1), id="agent or version"),
    pytest.param(AuditFilter(models=("qwen3:8b",)), lambda r: r.model == "qwen3:8b", id="models"),
    pytest.param(AuditFilter(statuses=("error", "timeout")), lambda r: r.status in ("error", "timeout"),
                 id="statuses"),
    pytest.param(AuditFilter(truncated=True), lambda r: r.truncated, id="truncated"),
    pytest.param(AuditFilter(truncated=False), lambda r: not r.truncated, id="not truncated"),
    pytest.param(AuditFilter(fallback_used=True), lambda r: r.fallback, id="fallback"),
    pytest.param(AuditFilter(min_latency_ms=100, max_latency_ms=120),
                 lambda r: r.latency is not None and 100 <= r.latency <= 120, id="latency range"),
    pytest.param(AuditFilter(min_prompt_tokens=10, max_prompt_tokens=40),
                 lambda r: r.prompt_tokens is not None and 10 <= r.prompt_tokens <= 40, id="prompt tokens"),
    pytest.param(AuditFilter(max_completion_tokens=8),
                 lambda r: r.completion_tokens is not None and r.completion_tokens <= 8, id="completion tokens"),
    pytest.param(AuditFilter(client_ip="10.0.1.*"), lambda r: r.ip.startswith("10.0.1."), id="ip prefix"),
    pytest.param(AuditFilter(client_ip="10.0.0.1"), lambda r: r.ip == "10.0.0.1", id="ip exact"),
    pytest.param(AuditFilter(conversation_id=7), lambda r: r.conversation == 7, id="conversation"),
    pytest.param(AuditFilter(search="付款条款"), lambda r: "付款条款" in r.prompt, id="search chinese in prompt"),
    pytest.param(AuditFilter(search="天气晴朗"), lambda r: "天气晴朗" in r.response, id="search chinese response"),
    pytest.param(AuditFilter(search="天气"), lambda r: "天气" in r.prompt + r.response, id="search 2 cjk chars"),
    pytest.param(AuditFilter(search="你"), lambda r: "你" in r.prompt + r.response, id="search 1 cjk char"),
    pytest.param(AuditFilter(search="report"), lambda r: "report" in (r.prompt + r.response).lower(),
                 id="search english any case"),
    pytest.param(AuditFilter(search="termination clause"), lambda r: "termination clause" in r.prompt,
                 id="search phrase"),
    pytest.param(AuditFilter(search="100%"), lambda r: "100%" in r.prompt, id="search literal percent"),
    pytest.param(AuditFilter(search='say "hi"'), lambda r: False, id="search quotes"),
    pytest.param(AuditFilter(users=("alice",), search="条款", statuses=("ok",)),
                 lambda r: r.user == "alice" and "条款" in r.prompt, id="combined"),
]  # fmt: skip


@pytest.mark.parametrize(("audit_filter", "test"), FILTERS)
def test_each_filter_selects_exactly_its_records(
    db: Database, ids: list[int], audit_filter: AuditFilter, test: Any
) -> None:
    explorer = AuditExplorer(db)
    expected = where(ids, test)
    assert every_id(explorer, audit_filter) == expected
    assert explorer.count(AUDITOR, audit_filter) == len(expected)


def test_search_uses_the_full_text_index(db: Database, ids: list[int]) -> None:
    """The index itself answers: emptied, a long search finds nothing, while a short one (LIKE) still does."""
    if not db.is_sqlite:
        # PostgreSQL: the trigram index serves ILIKE (the planner is made to prefer it over a scan of a tiny table).
        with db.engine.connect() as conn:
            conn.execute(text("SET enable_seqscan = off"))
            plan = " ".join(
                str(row[0])
                for row in conn.execute(
                    text(
                        "EXPLAIN SELECT id FROM requests WHERE prompt ILIKE '%付款条款%' OR response ILIKE '%付款条款%'"
                    )
                )
            )
        assert "ix_requests_prompt_trgm" in plan and "ix_requests_response_trgm" in plan, plan
        return
    explorer = AuditExplorer(db)
    assert every_id(explorer, AuditFilter(search="付款条款")) == [ids[0]]
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO requests_fts (requests_fts) VALUES ('delete-all')"))
    assert every_id(explorer, AuditFilter(search="付款条款")) == []
    assert every_id(explorer, AuditFilter(search="付款")) == [ids[0]]
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO requests_fts (requests_fts) VALUES ('rebuild')"))
    assert every_id(explorer, AuditFilter(search="付款条款")) == [ids[0]]


def test_a_started_request_is_searchable_and_indexed_once_finalized(db: Database, store: AuditStore) -> None:
    explorer = AuditExplorer(db)
    request_id = store.start_request(user="dan", prompt="审计日志的检索")
    assert every_id(explorer, AuditFilter(search="日志的检")) == [request_id]
    store.finish_request(request_id, "ok", response="found it")
    assert every_id(explorer, AuditFilter(search="日志的检")) == [request_id]
    assert every_id(explorer, AuditFilter(search="found it")) == [request_id]
    if db.is_sqlite:
        with db.engine.connect() as conn:
            hits = conn.execute(
                text("SELECT rowid FROM requests_fts WHERE requests_fts MATCH '\"found it\"'")
            )
            assert [row[0] for row in hits] == [request_id]


@pytest.mark.parametrize("column", sorted(SORTABLE))
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_keyset_pages_forward_and_back_cover_every_row_once(
    db: Database, store: AuditStore, column: str, descending: bool
) -> None:
    """Many ties in the sort column (and NULLs in the nullable ones): pages of 3 walk the same total order."""
    for n in range(11):
        request_id = store.start_request(
            started_at=T0 + timedelta(minutes=n // 4),  # ties of 4
            user=f"u{n % 3}",
            agent=f"a{n % 2}",
            prompt=f"p{n}",
        )
        store.finish_request(
            request_id,
            ["ok", "error"][n % 2],
            model_used=f"m{n % 3}",
            latency_ms=None if n % 4 == 0 else float(n % 3),
            ttft_ms=float(n % 2),
            prompt_tokens=None if n % 5 == 0 else n % 2,
            completion_tokens=n % 3 or None,
        )
    explorer = AuditExplorer(db)
    sort = Sort(column, descending)
    everything = explorer.page(AUDITOR, AuditFilter(), sort, limit=500).rows
    assert len(everything) == 11
    expected = [row["id"] for row in everything]
    # The order is the sort column (NULLs last ascending, first descending), then id in the same direction.
    keys = [
        ((row[column] is None), row[column] if row[column] is not None else 0, row["id"])
        for row in everything
    ]
    assert keys == sorted(keys, reverse=descending)

    pages: list[list[int]] = []
    cursor: Cursor | None = None
    while True:
        page = explorer.page(AUDITOR, AuditFilter(), sort, cursor, "next", limit=3)
        pages.append([row["id"] for row in page.rows])
        assert page.has_previous == (cursor is not None)
        if not page.has_next:
            break
        cursor = page.last
    assert [i for p in pages for i in p] == expected
    assert [len(p) for p in pages] == [3, 3, 3, 2]

    back = [pages[-1]]
    first = page.first
    while True:
        page = explorer.page(AUDITOR, AuditFilter(), sort, first, "previous", limit=3)
        back.insert(0, [row["id"] for row in page.rows])
        assert page.has_next
        if not page.has_previous:
            break
        first = page.first
    assert back == pages


def test_paging_respects_the_filter_and_count(db: Database, ids: list[int]) -> None:
    explorer = AuditExplorer(db)
    audit_filter = AuditFilter(agents=("helper",))
    first = explorer.page(AUDITOR, audit_filter, Sort("latency_ms", descending=True), limit=2)
    second = explorer.page(AUDITOR, audit_filter, Sort("latency_ms", descending=True), first.last, limit=2)
    seen = [row["id"] for row in first.rows + second.rows]
    assert sorted(seen) == where(ids, lambda r: r.agent == "helper")
    assert not second.has_next and explorer.count(AUDITOR, audit_filter) == 4
    assert first.rows[0]["latency_ms"] is None  # NULLs first when descending


def test_staff_see_only_their_own_records_and_no_events(db: Database, ids: list[int]) -> None:
    explorer = AuditExplorer(db)
    bob = staff("bob")
    assert every_id(explorer, AuditFilter(), bob) == where(ids, lambda r: r.user == "bob")
    assert every_id(explorer, AuditFilter(users=("alice",)), bob) == []
    assert explorer.count(bob, AuditFilter()) == 2
    assert explorer.count(ADMIN, AuditFilter()) == 0  # an admin is no auditor
    with pytest.raises(NotFoundError):
        explorer.detail(bob, ids[0])
    assert explorer.detail(bob, ids[2]).request["user"] == "bob"
    assert explorer.conversation(staff("carol"), 7) == []
    assert [t["id"] for t in explorer.conversation(staff("alice"), 7)] == ids[:2]
    with pytest.raises(UsageError, match="only auditors"):
        explorer.events(bob, AuditFilter())
    disabled = UserInfo(9, "gone", frozenset({Role.AUDITOR}), True, False)
    assert explorer.count(disabled, AuditFilter()) == 0


def test_detail_has_everything_sent_and_the_agent_version(db: Database, store: AuditStore) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO agents (name, archived, created_at) VALUES ('contract', false, :t)"), {"t": T0}
        )
        conn.execute(
            text(
                "INSERT INTO agent_versions (agent_id, version, model, fallback_model, system_prompt, tools, "
                "context_budget, max_output_tokens, think, created_at, created_by) "
                "SELECT id, 3, 'qwen3:32b', '', '你是合同助手', '[]', 7500, 1024, true, :t, 'root' FROM agents"
            ),
            {"t": T0},
        )
        version_id = conn.execute(text("SELECT id FROM agent_versions")).scalar_one()
    context = '[{"role": "system", "content": "你是合同助手"}, {"role": "user", "content": "<b>hi</b>"}]'
    request_id = store.start_request(
        user="alice", agent="contract", agent_version=3, agent_version_id=version_id, prompt="<b>hi</b>",
        context=context,
    )  # fmt: skip
    store.finish_request(
        request_id, "ok", response="hello", thinking="想一想", tool_calls='[{"function": {"name": "search"}}]',
        attachments='[{"name": "a.pdf"}]', ttft_ms=12.5, latency_ms=99.0, queue_ms=1.0,
    )  # fmt: skip
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO attachments (request_id, name, media_type, sha256, size, text_path, created_at) "
                "VALUES (:r, 'a.pdf', 'application/pdf', :h, 1234, '', :t)"
            ),
            {"r": request_id, "h": "ab" * 32, "t": T0},
        )
    detail = AuditExplorer(db).detail(AUDITOR, request_id)
    assert detail.request["context"] == context  # exactly as stored, byte for byte
    assert (detail.request["thinking"], detail.request["ttft_ms"], detail.request["queue_ms"]) == (
        "想一想",
        12.5,
        1.0,
    )
    assert detail.request["hash"] and detail.request["prev_hash"]
    assert "owner" not in detail.request
    assert detail.agent_version is not None
    assert (detail.agent_version["agent"], detail.agent_version["version"]) == ("contract", 3)
    assert detail.agent_version["system_prompt"] == "你是合同助手"
    assert detail.attachments == [
        {"name": "a.pdf", "media_type": "application/pdf", "sha256": "ab" * 32, "size": 1234}
    ]
    with pytest.raises(NotFoundError):
        AuditExplorer(db).detail(AUDITOR, request_id + 100)


def test_events_newest_first_by_keyset(db: Database, store: AuditStore) -> None:
    event_ids = [
        store.record_event("root" if n % 2 else "aud", f"user.add{n}", "x", {"n": n}) for n in range(7)
    ]
    explorer = AuditExplorer(db)
    first = explorer.events(AUDITOR, AuditFilter(), limit=4)
    assert [e["id"] for e in first] == event_ids[::-1][:4]
    rest = explorer.events(AUDITOR, AuditFilter(), before_id=first[-1]["id"], limit=4)
    assert [e["id"] for e in rest] == event_ids[::-1][4:]
    assert [e["id"] for e in explorer.events(AUDITOR, AuditFilter(users=("root",)))] == event_ids[1::2][::-1]
    assert [e["id"] for e in explorer.events(AUDITOR, AuditFilter(search="user.add3"))] == [event_ids[3]]


@pytest.fixture
def statements(db: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    yield seen
    event.remove(db.engine, "before_cursor_execute", record)


def test_the_explorer_never_writes(db: Database, ids: list[int], statements: list[str]) -> None:
    explorer = AuditExplorer(db)
    with db.engine.connect() as conn:
        before = conn.execute(text("SELECT seq, hash FROM chain_head")).one()
        events_before = conn.execute(select(Event.id)).all()
    statements.clear()
    for column in SORTABLE:
        page = explorer.page(AUDITOR, AuditFilter(search="report"), Sort(column))
        explorer.page(AUDITOR, AuditFilter(), Sort(column), page.first, "previous")
    explorer.count(AUDITOR, AuditFilter(search="天气"))
    explorer.detail(AUDITOR, ids[0])
    explorer.conversation(AUDITOR, 7)
    explorer.events(AUDITOR, AuditFilter())
    explorer.choices()
    # Only SELECTs, in read transactions (SQLite's plain BEGIN; a write would begin IMMEDIATE).
    assert statements and all(s.lstrip().startswith("SELECT") or s == "BEGIN" for s in statements), statements
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT seq, hash FROM chain_head")).one() == before
        assert conn.execute(select(Event.id)).all() == events_before
        assert conn.execute(select(Request.id)).all() == [(i,) for i in ids]


def test_unknown_sort_or_bad_range_is_refused() -> None:
    with pytest.raises(UsageError, match="cannot sort by 'prompt'"):
        Sort("prompt")
    with pytest.raises(UsageError, match="nothing can match"):
        AuditFilter(min_latency_ms=5, max_latency_ms=1)
    with pytest.raises(UsageError, match="unknown status"):
        AuditFilter(statuses=("done",))


@pytest.mark.parametrize("column", ["started_at", "id"])
def test_a_search_pages_forward_and_back_through_every_match_running_requests_included(
    db: Database, store: AuditStore, column: str
) -> None:
    """On SQLite the page walks the full-text index in arrival order; the pages must still be the filter's rows."""
    explorer = AuditExplorer(db)
    expected = []
    for i in range(11):
        user = "erin" if i % 3 else "finn"
        prompt = f"invoice {i}" if i % 2 else f"发票 {i}"
        request_id = store.start_request(user=user, prompt=prompt)
        response = "the invoice total" if i % 4 == 0 else "done"
        if i != 7:  # one is still running: not in the index yet
            store.finish_request(request_id, "ok", response=response)
        found = "invoice" in prompt or (i != 7 and "invoice" in response)
        if user == "erin" and found:
            expected.append(request_id)
    expected.sort(reverse=True)
    audit_filter = AuditFilter(search="Invoice", users=("erin",))
    assert explorer.count(AUDITOR, audit_filter) == len(expected) > 3

    pages = [explorer.page(AUDITOR, audit_filter, Sort(column), limit=3)]
    while pages[-1].has_next:
        pages.append(explorer.page(AUDITOR, audit_filter, Sort(column), pages[-1].last, limit=3))
    assert [row["id"] for page in pages for row in page.rows] == expected
    assert not pages[0].has_previous and all(page.has_previous for page in pages[1:])
    back = explorer.page(AUDITOR, audit_filter, Sort(column), pages[-1].first, "previous", limit=3)
    assert [row["id"] for row in back.rows] == [row["id"] for row in pages[-2].rows]
    oldest_first = explorer.page(AUDITOR, audit_filter, Sort(column, descending=False), limit=100)
    assert [row["id"] for row in oldest_first.rows] == expected[::-1]
