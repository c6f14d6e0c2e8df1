"""Requests record whether the model server may have cut the prompt (`server_truncated`).

Existing rows get false through the server default, and a record whose `server_truncated` is false hashes exactly
as before this column existed (see `clawdbot.chain`), so chains written before this revision still verify.

Both directions alter the table in place, never by copying it (SQLite batch mode's default for a default given as
an expression, and for dropping a column): copying `requests` would drop it, and with SQLite's foreign keys on,
dropping it sets `messages.request_id` and `attachments.request_id` to NULL; it would also cost a full copy of
the audit log. SQLite drops a column in place from 3.35 on (Debian 12, the oldest with Python 3.11, has 3.40).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None, recreate="never") as batch_op:
        batch_op.add_column(
            sa.Column("server_truncated", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("server_truncated")
