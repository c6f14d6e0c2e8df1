"""Full-text search over the prompts and responses of finalized requests, for the audit explorer.

SQLite: an FTS5 table `requests_fts` with the `trigram` tokenizer, whose content is the `requests` table itself
(nothing is stored twice but the index). Trigrams need no word boundaries, so a Chinese word is found inside a
sentence with no spaces exactly like an English one; queries shorter than three characters have no trigram and
fall back to LIKE (see `clawdbot.records`). Triggers add a request to the index when it is finalized (its status
leaves `started`), so the write that calls the model never pays for it, and keep the index equal to the table if
a finalized row is changed or deleted by hand (which the chain then reports anyway).

PostgreSQL: GIN indexes with pg_trgm's `gin_trgm_ops` on `prompt` and on `response`, which serve the explorer's
plain `ILIKE '%text%'` for any text of three characters or more, Chinese included (pg_trgm hashes multibyte
trigrams; it needs a database whose LC_CTYPE counts CJK characters as letters, as C.UTF-8 and any xx_XX.UTF-8
locale do). A tsvector with the `simple` configuration was not chosen: it splits on spaces only, so it cannot find
a Chinese word inside an unspaced sentence. The extension is created in `public` when that schema exists, so
that one database-wide extension outlives any schema dropped later.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Kept in step with clawdbot.records.SEARCH_OBJECTS (migrations must not import code that may change later).
FTS_TABLE = "requests_fts"
PG_INDEXES = ("ix_requests_prompt_trgm", "ix_requests_response_trgm")
_TRIGGERS = (
    "requests_fts_finalized",
    "requests_fts_inserted",
    "requests_fts_changed",
    "requests_fts_deleted",
)


def _sqlite_upgrade() -> None:
    op.execute(
        f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5("
        "prompt, response, content='requests', content_rowid='id', tokenize='trigram')"
    )
    add_new = f"INSERT INTO {FTS_TABLE} (rowid, prompt, response) VALUES (new.id, new.prompt, new.response);"
    remove_old = (
        f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, prompt, response) "
        "VALUES ('delete', old.id, old.prompt, old.response);"
    )
    op.execute(
        f"CREATE TRIGGER requests_fts_finalized AFTER UPDATE ON requests "
        f"WHEN old.status = 'started' AND new.status <> 'started' BEGIN {add_new} END"
    )
    op.execute(
        f"CREATE TRIGGER requests_fts_inserted AFTER INSERT ON requests "
        f"WHEN new.status <> 'started' BEGIN {add_new} END"
    )
    op.execute(
        f"CREATE TRIGGER requests_fts_changed AFTER UPDATE OF prompt, response, status ON requests "
        f"WHEN old.status <> 'started' BEGIN {remove_old} "
        f"INSERT INTO {FTS_TABLE} (rowid, prompt, response) "
        "SELECT new.id, new.prompt, new.response WHERE new.status <> 'started'; END"
    )
    op.execute(
        f"CREATE TRIGGER requests_fts_deleted AFTER DELETE ON requests "
        f"WHEN old.status <> 'started' BEGIN {remove_old} END"
    )
    op.execute(
        f"INSERT INTO {FTS_TABLE} (rowid, prompt, response) "
        "SELECT id, prompt, response FROM requests WHERE status <> 'started'"
    )


def _postgresql_upgrade() -> None:
    bind = op.get_bind()
    schema = bind.exec_driver_sql(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_trgm'"
    ).scalar()
    if schema is None:
        has_public = bind.exec_driver_sql("SELECT 1 FROM pg_namespace WHERE nspname = 'public'").scalar()
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm" + (" SCHEMA public" if has_public else ""))
        schema = bind.exec_driver_sql(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'pg_trgm'"
        ).scalar_one()
    # Qualified, because the extension's schema need not be on the search path.
    opclass = f'"{schema}".gin_trgm_ops'
    for index, column in zip(PG_INDEXES, ("prompt", "response"), strict=True):
        op.execute(f'CREATE INDEX {index} ON requests USING gin ("{column}" {opclass})')


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_upgrade()
    else:
        _postgresql_upgrade()


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in _TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(f"DROP TABLE IF EXISTS {FTS_TABLE}")
    else:
        # The extension stays: other schemas of the database may use it.
        for index in PG_INDEXES:
            op.execute(f"DROP INDEX IF EXISTS {index}")
