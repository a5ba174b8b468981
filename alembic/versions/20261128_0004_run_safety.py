"""Safety of runs: who pre-approved a run's gates, the process running each run with its heartbeat
(crash detection and resume), and the services and sites live runs hold (one failover at a time).
The last two are operational state, not evidence: they are neither chained nor guarded.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 04:05:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("pre_approved_by", sa.String(length=200), nullable=True,
                                   comment="who pre-approved every gate (a drill)"))
    op.create_table(
        "run_processes",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_start", sa.String(length=40), nullable=True, comment="tells a reused pid apart (Linux)"),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_processes")),
    )
    op.create_table(
        "run_locks",
        sa.Column("resource", sa.String(length=250), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("mode", sa.String(length=10), nullable=False, comment="exclusive | shared"),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("resource", "run_id", name=op.f("pk_run_locks")),
    )


def downgrade() -> None:
    op.drop_table("run_locks")
    op.drop_table("run_processes")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("pre_approved_by")
