"""Drill runs (each expectation met or missed, the cleanup state, the verdict, the runs they made)
and the notifications sent about them. On PostgreSQL, the same guards as the other evidence:
drill runs change only until finished, expectations and notifications never, nothing is deleted.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 03:33:26

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# (table, function refusing its updates); the functions come from revision 0002.
GUARDS = (
    ("drill_runs", "dr_refuse_finished_update"),
    ("drill_expectations", "dr_refuse_change"),
    ("notifications", "dr_refuse_change"),
)


def upgrade() -> None:
    op.create_table(
        "drill_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("drill_name", sa.String(length=200), nullable=False),
        sa.Column("scenario", sa.String(length=50), nullable=False, comment="site_loss | service_failure | cyber_attack | ..."),
        sa.Column("trigger", sa.String(length=50), nullable=False, comment="manual | schedule"),
        sa.Column("scheduled_for", UTC_TIMESTAMP, nullable=True, comment="the fire time a scheduled drill ran for"),
        sa.Column("state", sa.String(length=20), nullable=False, comment="running | finished | aborted | interrupted | missed"),
        sa.Column("verdict", sa.String(length=20), nullable=True, comment="passed | failed; None until finished"),
        sa.Column("started_by", sa.String(length=200), nullable=False),
        sa.Column("orchestrator_host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("incident_at", UTC_TIMESTAMP, nullable=True, comment="when the fault was injected"),
        sa.Column("drill_path", sa.Text(), nullable=False),
        sa.Column("drill_sha256", sa.String(length=64), nullable=False),
        sa.Column("drill_text", sa.Text(), nullable=False),
        sa.Column("inventory_path", sa.Text(), nullable=False),
        sa.Column("fault_run_id", sa.String(length=36), nullable=True),
        sa.Column("failover_run_id", sa.String(length=36), nullable=True),
        sa.Column("checks_run_id", sa.String(length=36), nullable=True),
        sa.Column("restore_run_id", sa.String(length=36), nullable=True),
        sa.Column("failback_run_id", sa.String(length=36), nullable=True),
        sa.Column("cleanup_run_id", sa.String(length=36), nullable=True),
        sa.Column("cleanup_state", sa.String(length=20), nullable=True, comment="done | incomplete | none"),
        sa.Column("cleanup_left", sa.JSON(), nullable=False, comment="cleanup steps that did not succeed"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drill_runs")),
        sa.UniqueConstraint("drill_name", "scheduled_for", name=op.f("uq_drill_runs_drill_name_scheduled_for")),
    )
    op.create_index(op.f("ix_drill_runs_started_at"), "drill_runs", ["started_at"])
    op.create_index(op.f("ix_drill_runs_state"), "drill_runs", ["state"])

    op.create_table(
        "drill_expectations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("drill_run_id", sa.String(length=36), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False, comment="rto | rpo | health | data"),
        sa.Column("check_id", sa.String(length=200), nullable=True, comment="the check step, for health and data"),
        sa.Column("target", sa.Float(), nullable=True, comment="seconds, for rto and rpo"),
        sa.Column("measured", sa.Float(), nullable=True, comment="seconds; None: not measured"),
        sa.Column("met", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=True, comment="the run the value comes from"),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["drill_run_id"], ["drill_runs.id"], name=op.f("fk_drill_expectations_drill_run_id_drill_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drill_expectations")),
    )
    op.create_index(op.f("ix_drill_expectations_drill_run_id"), "drill_expectations", ["drill_run_id"])

    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("drill_run_id", sa.String(length=36), nullable=True),
        sa.Column("event", sa.String(length=30), nullable=False, comment="started | expectation_missed | failed | completed | missed"),
        sa.Column("channel", sa.String(length=20), nullable=False, comment="webhook | email"),
        sa.Column("target", sa.Text(), nullable=False, comment="where to, secrets left out"),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False, comment="delivered, or given up"),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("tries", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["drill_run_id"], ["drill_runs.id"], name=op.f("fk_notifications_drill_run_id_drill_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    op.create_index(op.f("ix_notifications_at"), "notifications", ["at"])
    op.create_index(op.f("ix_notifications_drill_run_id"), "notifications", ["drill_run_id"])

    if op.get_bind().dialect.name == "postgresql":
        for table, on_update in GUARDS:
            op.execute(f"CREATE TRIGGER dr_guard_update BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {on_update}()")
            op.execute(f"CREATE TRIGGER dr_guard_delete BEFORE DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION dr_refuse_change()")
            op.execute(f"CREATE TRIGGER dr_guard_truncate BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION dr_refuse_change()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, _ in GUARDS:
            for trigger in ("dr_guard_update", "dr_guard_delete", "dr_guard_truncate"):
                op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
    op.drop_table("notifications")
    op.drop_table("drill_expectations")
    op.drop_table("drill_runs")
