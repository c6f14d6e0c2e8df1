"""Applies the Alembic migrations in `migrations/` to a database (`clawdbot db upgrade`, and `clawdbot run`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import OperationalError

from clawdbot.db import Database
from clawdbot.errors import DatabaseUnavailableError

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the functions: most commands only check the revision, and start faster without it.

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(db: Database) -> Config:
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise DatabaseUnavailableError(
            f"the migrations are missing from {MIGRATIONS_DIR}: install clawdbot from its source tree "
            "with `pip install -e .`"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    return config


def _run(db: Database, operation: str, revision: str) -> None:
    from alembic import command

    db.check()
    config = alembic_config(db)
    try:
        with db.engine.begin() as connection:
            config.attributes["connection"] = connection
            getattr(command, operation)(config, revision)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailableError(f"migration failed on {db.safe_url}: {reason}") from None


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default)."""
    _run(db, "upgrade", revision)


def downgrade(db: Database, revision: str = "base") -> None:
    """Take the schema back to `revision`; `base` removes every table."""
    _run(db, "downgrade", revision)


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(db: Database) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(db)).get_current_head()


def ensure_current(db: Database) -> None:
    """Refuse to work on a database whose schema is not the one this code expects."""
    current, head = current_revision(db), head_revision(db)
    if current != head:
        raise DatabaseUnavailableError(
            f"the database {db.safe_url} is at schema {current or 'none'}, this clawdbot needs {head}: "
            "run `clawdbot db upgrade`"
        )
