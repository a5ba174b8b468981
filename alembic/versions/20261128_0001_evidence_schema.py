"""The evidence schema: runs, the services in their scope, steps, attempts, probes, markers,
measurements, action events and per-service RTO/RPO results.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 03:08:33.594203

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# Timezone-aware UTC with microseconds: PostgreSQL's timestamptz; on SQLite fixed-width ISO-8601 text
# (dr_orchestrator.evidence.types.UTCDateTime writes and reads it). Spelt out here so that this
# migration keeps meaning the same schema whatever later happens to the package's types.
UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("runbook_name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("trigger", sa.String(length=50), nullable=False),
        sa.Column("started_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("orchestrator_host", sa.String(length=200), nullable=False),
        sa.Column("incident_at", UTC_TIMESTAMP, nullable=True, comment="declared incident time; None: the run's start"),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("runbook_path", sa.Text(), nullable=False),
        sa.Column("runbook_sha256", sa.String(length=64), nullable=False),
        sa.Column("runbook_text", sa.Text(), nullable=False),
        sa.Column("inventory_name", sa.String(length=200), nullable=False),
        sa.Column("inventory_path", sa.Text(), nullable=False),
        sa.Column("inventory_sha256", sa.String(length=64), nullable=False),
        sa.Column("inventory_text", sa.Text(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("parameters_sha256", sa.String(length=64), nullable=False),
        sa.Column("sites", sa.JSON(), nullable=False, comment="sites in scope"),
        sa.Column("targets", sa.JSON(), nullable=False, comment="every inventory service's targets as they stood"),
        sa.Column("forced", sa.JSON(), nullable=False, comment="safety checks the engineer overrode"),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_started_at"), "runs", ["started_at"])

    op.create_table(
        "action_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=200), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_action_events_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_action_events")),
    )
    op.create_index(op.f("ix_action_events_run_id_at"), "action_events", ["run_id", "at"])

    op.create_table(
        "markers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("marker", sa.String(length=200), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=True, comment="None: every service in the run's scope"),
        sa.Column("site", sa.String(length=200), nullable=True),
        sa.Column("at", UTC_TIMESTAMP, nullable=False, comment="the moment the mark stands for"),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_markers_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_markers")),
    )
    op.create_index(op.f("ix_markers_run_id_marker"), "markers", ["run_id", "marker"])

    op.create_table(
        "measurements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=True, comment="None: every service in the run's scope"),
        sa.Column("metric", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("raw", sa.JSON(), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_measurements_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_measurements")),
    )
    op.create_index(op.f("ix_measurements_run_id_metric"), "measurements", ["run_id", "metric"])
    op.create_index(op.f("ix_measurements_service_metric"), "measurements", ["service", "metric"])

    op.create_table(
        "probes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False, comment="when the probe was sent"),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_probes_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_probes")),
    )
    op.create_index(op.f("ix_probes_run_id_at"), "probes", ["run_id", "at"])

    op.create_table(
        "run_services",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=False),
        sa.Column("rto_target_s", sa.Float(), nullable=True),
        sa.Column("rpo_target_s", sa.Float(), nullable=True),
        sa.Column("tier", sa.String(length=50), nullable=True),
        sa.Column("criticality", sa.String(length=50), nullable=True),
        sa.Column("sites", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_services_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_services")),
        sa.UniqueConstraint("run_id", "service", name=op.f("uq_run_services_run_id_service")),
    )
    op.create_index(op.f("ix_run_services_service_run_id"), "run_services", ["service", "run_id"])

    op.create_table(
        "service_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=False),
        sa.Column("incident_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("run_started_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("restored_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("detection_s", sa.Float(), nullable=True),
        sa.Column("decision_s", sa.Float(), nullable=True),
        sa.Column("execution_s", sa.Float(), nullable=True),
        sa.Column("rto_s", sa.Float(), nullable=True),
        sa.Column("rto_target_s", sa.Float(), nullable=True),
        sa.Column("rto_met", sa.Boolean(), nullable=True, comment="None: no target to compare with"),
        sa.Column("rto_method", sa.Text(), nullable=False),
        sa.Column("rpo_s", sa.Float(), nullable=True, comment="None: not measured (never assumed)"),
        sa.Column("rpo_target_s", sa.Float(), nullable=True),
        sa.Column("rpo_met", sa.Boolean(), nullable=True, comment="None: not measured or no target"),
        sa.Column("rpo_method", sa.Text(), nullable=False),
        sa.Column("raw", sa.JSON(), nullable=False, comment="the timestamps and records the figures come from"),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_service_results_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_results")),
        sa.UniqueConstraint("run_id", "service", name=op.f("uq_service_results_run_id_service")),
    )
    op.create_index(op.f("ix_service_results_service_run_id"), "service_results", ["service", "run_id"])

    op.create_table(
        "steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("phase", sa.String(length=10), nullable=False, comment="forward | rollback"),
        sa.Column("action", sa.String(length=200), nullable=True),
        sa.Column("service", sa.String(length=200), nullable=True),
        sa.Column("site", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("rendered", sa.JSON(), nullable=True, comment="parameters after templating, redacted"),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_steps_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steps")),
    )
    op.create_index(op.f("ix_steps_run_id_step_id_phase"), "steps", ["run_id", "step_id", "phase"])

    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_pk", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("phase", sa.String(length=10), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True, comment="monotonic clock"),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_attempts_run_id_runs")),
        sa.ForeignKeyConstraint(["step_pk"], ["steps.id"], name=op.f("fk_attempts_step_pk_steps")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
        sa.UniqueConstraint("step_pk", "attempt", name=op.f("uq_attempts_step_pk_attempt")),
    )
    op.create_index(op.f("ix_attempts_run_id"), "attempts", ["run_id"])


def downgrade() -> None:
    """Drop the evidence schema (indexes go with their tables)."""
    op.drop_table("attempts")
    op.drop_table("steps")
    op.drop_table("service_results")
    op.drop_table("run_services")
    op.drop_table("probes")
    op.drop_table("measurements")
    op.drop_table("markers")
    op.drop_table("action_events")
    op.drop_table("runs")
