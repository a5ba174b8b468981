"""API tokens for `dr serve`: name (the actor in the audit chain), role, SHA-256 of the token, expiry
and revocation. Operational state, not evidence: neither chained nor guarded; creating and revoking a
token is recorded as an audit event instead.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 04:10:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

UTC_TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite")

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False, comment="the actor named in the audit chain"),
        sa.Column("role", sa.String(length=20), nullable=False, comment="compliance | engineer | admin"),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("expires_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("revoked_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("revoked_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
