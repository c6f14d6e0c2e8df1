"""Charts drawn by tools are kept with the answer they belong to (`messages.charts`, issue 6, tools).

Admin-defined HTTP tools need no change: the `tools` table of 0001 already holds name, description, parameter
schema, URL, method, headers, timeout and response cap. Existing messages get an empty list through the server
default. The column is added and dropped in place (`recreate="never"`), never by copying `messages`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 13:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("charts", sa.Text(), server_default="[]", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("charts")
