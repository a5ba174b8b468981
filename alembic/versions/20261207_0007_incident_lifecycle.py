"""The incident lifecycle: what an incident hits (a service or a site, and the services the status
page names), its severity level, its source (the watch, an alert, a manual run), its state (open,
detected, decided, executing, restored, closed) and labels; and ``incident_events``, one chained
record per moment of the lifecycle and per status message published.

The new incident columns are nullable: incidents recorded before this revision keep their rows and
hashes as they were (NULL columns are left out of a record's hash).

On PostgreSQL an incident's identity (id, creation, title, target, services, source) never changes;
its impact start, state, level and labels may, and a closed incident stays closed. Incident events
are never updated, deleted or truncated.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 04:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

INCIDENT_GUARD = """
CREATE OR REPLACE FUNCTION dr_refuse_incident_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.created_by IS DISTINCT FROM OLD.created_by OR NEW.declared_at IS DISTINCT FROM OLD.declared_at
       OR NEW.title IS DISTINCT FROM OLD.title OR NEW.recorded_at IS DISTINCT FROM OLD.recorded_at
       OR NEW.target_kind IS DISTINCT FROM OLD.target_kind OR NEW.target_name IS DISTINCT FROM OLD.target_name
       OR NEW.services::text IS DISTINCT FROM OLD.services::text OR NEW.source IS DISTINCT FROM OLD.source THEN
        RAISE EXCEPTION 'evidence is append-only: only the impact start, state, level and labels of incident % '
                        'may change', OLD.id USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.state = 'closed' AND NEW.state IS DISTINCT FROM OLD.state THEN
        RAISE EXCEPTION 'incident % is closed', OLD.id USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
"""

# Revision 0006's guard, put back by the downgrade.
PREVIOUS_INCIDENT_GUARD = """
CREATE OR REPLACE FUNCTION dr_refuse_incident_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
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

EVENT_TRIGGERS = ("dr_guard_update", "dr_guard_delete", "dr_guard_truncate")


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("target_kind", sa.String(length=10), nullable=True,
                                   comment="service | site; None: opened by a run"))
        batch.add_column(sa.Column("target_name", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("services", sa.JSON(), nullable=True,
                                   comment="the services it hits, as the status page names them"))
        batch.add_column(sa.Column("level", sa.String(length=200), nullable=True,
                                   comment="the inventory's severity level"))
        batch.add_column(sa.Column("source", sa.String(length=50), nullable=True,
                                   comment="watch | alert:alertmanager | alert:webhook | manual run"))
        batch.add_column(sa.Column("state", sa.String(length=20), nullable=True,
                                   comment="open | detected | decided | executing | restored | closed"))
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch.create_index(op.f("ix_incidents_target_kind_target_name_state"), ["target_kind", "target_name", "state"])
    op.create_table(
        "incident_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("incident_id", sa.String(length=64), nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"], name=op.f("fk_incident_events_incident_id_incidents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incident_events")),
    )
    op.create_index(op.f("ix_incident_events_incident_id_at"), "incident_events", ["incident_id", "at"])
    op.create_index(op.f("ix_incident_events_kind_at"), "incident_events", ["kind", "at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(INCIDENT_GUARD)
        op.execute("CREATE TRIGGER dr_guard_update BEFORE UPDATE ON incident_events FOR EACH ROW "
                   "EXECUTE FUNCTION dr_refuse_change()")
        op.execute("CREATE TRIGGER dr_guard_delete BEFORE DELETE ON incident_events FOR EACH ROW "
                   "EXECUTE FUNCTION dr_refuse_change()")
        op.execute("CREATE TRIGGER dr_guard_truncate BEFORE TRUNCATE ON incident_events FOR EACH STATEMENT "
                   "EXECUTE FUNCTION dr_refuse_change()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger in EVENT_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON incident_events")
        op.execute(PREVIOUS_INCIDENT_GUARD)
    op.drop_index(op.f("ix_incident_events_kind_at"), table_name="incident_events")
    op.drop_index(op.f("ix_incident_events_incident_id_at"), table_name="incident_events")
    op.drop_table("incident_events")
    with op.batch_alter_table("incidents") as batch:
        batch.drop_index(op.f("ix_incidents_target_kind_target_name_state"))
        for column in ("labels", "state", "source", "level", "services", "target_name", "target_kind"):
            batch.drop_column(column)
