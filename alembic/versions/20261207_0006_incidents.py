"""Incidents: one disruption from impact start on, linking its runs (attempts, retries, failback).
``runs.incident_id`` names the incident a run belongs to; runs recorded before this revision keep
none (their rows and hashes are left as they were: no UPDATE of finished runs, which PostgreSQL's
guards of revision 0002 would refuse anyway).

On PostgreSQL an incident is never deleted or truncated, and only its impact start (and how it was
determined) may change, as earlier failures become known.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 01:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

POSTGRES_GUARD = """
CREATE FUNCTION dr_refuse_incident_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.created_by IS DISTINCT FROM OLD.created_by OR NEW.declared_at IS DISTINCT FROM OLD.declared_at
       OR NEW.title IS DISTINCT FROM OLD.title OR NEW.recorded_at IS DISTINCT FROM OLD.recorded_at THEN
        RAISE EXCEPTION 'evidence is append-only: only the impact start of incident % may change', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("impact_start", UTC_TIMESTAMP, nullable=True, comment="the earliest impact known; None: no run yet"),
        sa.Column("impact_start_method", sa.Text(), nullable=True, comment="how impact_start was determined"),
        sa.Column("declared_at", UTC_TIMESTAMP, nullable=True,
                  comment="the incident time declared when it was created"),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    op.create_index(op.f("ix_incidents_created_at"), "incidents", ["created_at"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("incident_id", sa.String(length=64), nullable=True,
                                   comment="the incident this run belongs to"))
        batch.create_foreign_key(op.f("fk_runs_incident_id_incidents"), "incidents", ["incident_id"], ["id"])
        batch.create_index(op.f("ix_runs_incident_id"), ["incident_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_GUARD)
        op.execute("CREATE TRIGGER dr_guard_update BEFORE UPDATE ON incidents FOR EACH ROW "
                   "EXECUTE FUNCTION dr_refuse_incident_rewrite()")
        op.execute("CREATE TRIGGER dr_guard_delete BEFORE DELETE ON incidents FOR EACH ROW "
                   "EXECUTE FUNCTION dr_refuse_change()")
        op.execute("CREATE TRIGGER dr_guard_truncate BEFORE TRUNCATE ON incidents FOR EACH STATEMENT "
                   "EXECUTE FUNCTION dr_refuse_change()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger in ("dr_guard_update", "dr_guard_delete", "dr_guard_truncate"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON incidents")
        op.execute("DROP FUNCTION IF EXISTS dr_refuse_incident_rewrite()")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index(op.f("ix_runs_incident_id"))
        batch.drop_constraint(op.f("fk_runs_incident_id_incidents"), type_="foreignkey")
        batch.drop_column("incident_id")
    op.drop_index(op.f("ix_incidents_created_at"), table_name="incidents")
    op.drop_table("incidents")
