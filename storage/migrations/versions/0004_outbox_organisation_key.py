"""outbox: the organisation of an IRT alert

IRT alerts are limited per organisation as well as in all (intake.paging): each alert and
summary to the IRT lead records whose share it counts against, in a new nullable column. No
new index: the hour's notes to the lead are found by ix_outbox_recent (kind, recipient,
created_at), at most the global ceiling's worth of rows, and counted per organisation there.
Adding a nullable column without a default rewrites nothing on PostgreSQL, and is a plain
ALTER TABLE ... ADD COLUMN on SQLite (Alembic's batch mode moves no rows for it). The alerts
stored before it have no organisation: they count towards the global ceiling only.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("organisation_key", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("organisation_key")
