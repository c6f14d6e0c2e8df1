"""Gateway and GPU samples at one-minute resolution, request rollups for the dashboard (issue 8).

`metric_samples` keeps what the background sampler saw each minute and each hour (30 days); `request_rollups` and
`timing_rollups` hold finished requests counted and timed per minute, 10 minutes and hour, rebuilt from
`requests` by `clawdbot.rollups`; `rollup_state` is how far that has read. `ix_requests_finished_at` serves
the rebuilds and "refused in the last minute".

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 13:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The models' UTCDateTime stores as DateTime(timezone=True) (migrations must not import code that may change).
_AT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "metric_samples",
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("at", _AT, nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("peak", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("metric", "bucket_s", "at", "source", name=op.f("pk_metric_samples")),
    )
    with op.batch_alter_table("metric_samples", schema=None) as batch_op:
        batch_op.create_index("ix_metric_samples_at", ["at"], unique=False)
    op.create_table(
        "request_rollups",
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("bucket_start", _AT, nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "bucket_s", "bucket_start", "agent", "model", "status", name=op.f("pk_request_rollups")
        ),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "timing_rollups",
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("bucket_start", _AT, nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Text(), nullable=False),
        sa.Column("ttft_ms", sa.Text(), nullable=False),
        sa.Column("tokens_per_s", sa.Text(), nullable=False),
        sa.Column("latency_p50", sa.Float(), nullable=True),
        sa.Column("latency_p95", sa.Float(), nullable=True),
        sa.Column("latency_p99", sa.Float(), nullable=True),
        sa.Column("ttft_p50", sa.Float(), nullable=True),
        sa.Column("ttft_p95", sa.Float(), nullable=True),
        sa.Column("decode_p50", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("bucket_s", "bucket_start", name=op.f("pk_timing_rollups")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "rollup_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_rollup_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollup_state")),
    )
    op.execute("INSERT INTO rollup_state (id, seq) VALUES (1, 0)")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index("ix_requests_finished_at", ["finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_finished_at")
    op.drop_table("rollup_state")
    op.drop_table("timing_rollups")
    op.drop_table("request_rollups")
    with op.batch_alter_table("metric_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_metric_samples_at")
    op.drop_table("metric_samples")
