"""Attachment storage details (issue 6, files): no schema change.

The `attachments` table of 0001 already holds what the files work needs (name, sha256, size, pages or rows,
the path of the extracted content, request and conversation), so this revision only keeps its place in the
chain that was reserved for it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 13:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
