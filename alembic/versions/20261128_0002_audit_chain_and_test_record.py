"""The audit hash chain, the DR test record's fields (test type, scenario, failback link, retention),
approvals, reconciliations, findings and audit events; on PostgreSQL, triggers that refuse UPDATE of
finished evidence and any DELETE or TRUNCATE. Rows written before this revision are chained here.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:40:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

# As in 0001: timezone-aware UTC, fixed-width ISO-8601 text on SQLite.
UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Tables whose rows never change once written, and those that change until finished.
INSERT_ONLY = (
    "run_services",
    "probes",
    "markers",
    "measurements",
    "action_events",
    "service_results",
    "approvals",
    "reconciliations",
    "findings",
    "finding_closures",
    "audit_events",
    "audit_chain",
)
FINISHABLE = ("steps", "attempts")
GUARDED = ("runs", *FINISHABLE, *INSERT_ONLY)

POSTGRES_FUNCTIONS = """
CREATE FUNCTION dr_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'evidence is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE FUNCTION dr_refuse_finished_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'evidence is append-only: UPDATE of finished % row % refused', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION dr_refuse_final_run_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An interrupted run may still be resumed; succeeded, failed and aborted runs are final.
    IF OLD.finished_at IS NOT NULL AND OLD.state IN ('succeeded', 'failed', 'aborted') THEN
        RAISE EXCEPTION 'evidence is append-only: UPDATE of finished run % refused', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
"""


def _postgres_guards() -> None:
    op.execute(POSTGRES_FUNCTIONS)
    for table in GUARDED:
        if table == "runs":
            on_update = "dr_refuse_final_run_update"
        elif table in FINISHABLE:
            on_update = "dr_refuse_finished_update"
        else:
            on_update = "dr_refuse_change"
        op.execute(
            f"CREATE TRIGGER dr_guard_update BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {on_update}()"
        )
        op.execute(f"CREATE TRIGGER dr_guard_delete BEFORE DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION dr_refuse_change()")
        op.execute(
            f"CREATE TRIGGER dr_guard_truncate BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION dr_refuse_change()"
        )


def _drop_postgres_guards() -> None:
    for table in GUARDED:
        for trigger in ("dr_guard_update", "dr_guard_delete", "dr_guard_truncate"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
    for function in ("dr_refuse_change", "dr_refuse_finished_update", "dr_refuse_final_run_update"):
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("test_type", sa.String(length=50), nullable=True, comment="planned switchover rehearsal, ..."))
        batch.add_column(sa.Column("scenario", sa.Text(), nullable=True, comment="the fault injected"))
        batch.add_column(sa.Column("failback_of", sa.String(length=36), nullable=True, comment="the run this one fails back"))
        batch.add_column(sa.Column("retain_until", UTC_TIMESTAMP, nullable=True, comment="keep the record at least until then"))
        batch.create_foreign_key(op.f("fk_runs_failback_of_runs"), "runs", ["failback_of"], ["id"])
        batch.create_index(op.f("ix_runs_failback_of"), ["failback_of"])

    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=True, comment="None: the run as a whole"),
        sa.Column("decision", sa.String(length=20), nullable=False, comment="approved | rejected"),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_approvals_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
    )
    op.create_index(op.f("ix_approvals_run_id"), "approvals", ["run_id"])

    op.create_table(
        "reconciliations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=True, comment="None: every service in the run's scope"),
        sa.Column("source", sa.Text(), nullable=False, comment="e.g. load-generator ledger"),
        sa.Column("acknowledged_writes", sa.Integer(), nullable=False),
        sa.Column("missing_writes", sa.Integer(), nullable=False),
        sa.Column("window_start", UTC_TIMESTAMP, nullable=True, comment="the period reconciled"),
        sa.Column("window_end", UTC_TIMESTAMP, nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_reconciliations_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliations")),
    )
    op.create_index(op.f("ix_reconciliations_run_id"), "reconciliations", ["run_id"])

    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("severity", sa.String(length=10), nullable=False, comment="low | medium | high | critical"),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("due", sa.Date(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_findings_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    op.create_index(op.f("ix_findings_run_id"), "findings", ["run_id"])

    op.create_table(
        "finding_closures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("finding_id", sa.Integer(), nullable=False),
        sa.Column("closed_by", sa.String(length=200), nullable=False),
        sa.Column("closed_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("evidence_run_id", sa.String(length=36), nullable=True, comment="a run proving the fix"),
        sa.Column("evidence_text", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["finding_id"], ["findings.id"], name=op.f("fk_finding_closures_finding_id_findings")),
        sa.ForeignKeyConstraint(["evidence_run_id"], ["runs.id"], name=op.f("fk_finding_closures_evidence_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finding_closures")),
        sa.UniqueConstraint("finding_id", name=op.f("uq_finding_closures_finding_id")),
    )

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=200), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])

    op.create_table(
        "audit_chain",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("table_name", sa.String(length=64), nullable=False),
        sa.Column("record_id", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=10), nullable=False, comment="insert | update | adopt"),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("prev_sha256", sa.String(length=64), nullable=False),
        sa.Column("entry_sha256", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_chain")),
        sa.UniqueConstraint("entry_sha256", name=op.f("uq_audit_chain_entry_sha256")),
    )
    op.create_index(op.f("ix_audit_chain_table_name_record_id"), "audit_chain", ["table_name", "record_id"])

    # Evidence written before the chain existed is chained now, as it stands.
    from dr_orchestrator.evidence.chain import adopt_unchained

    adopt_unchained(op.get_bind())

    if op.get_bind().dialect.name == "postgresql":
        _postgres_guards()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _drop_postgres_guards()
    op.drop_table("audit_chain")
    op.drop_table("audit_events")
    op.drop_table("finding_closures")
    op.drop_table("findings")
    op.drop_table("reconciliations")
    op.drop_table("approvals")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index(op.f("ix_runs_failback_of"))
        batch.drop_constraint(op.f("fk_runs_failback_of_runs"), type_="foreignkey")
        batch.drop_column("retain_until")
        batch.drop_column("failback_of")
        batch.drop_column("scenario")
        batch.drop_column("test_type")
