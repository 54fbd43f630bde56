"""message: edits

An edit of a stored message (Slack's message_changed) is stored as a message row of its own,
the edited row kept as it was; ``edit_of`` names the row it changes, indexed so that the latest
version of a message is found without a scan. A nullable column with no default: adding it
rewrites no existing row on either database, and existing rows are messages, not edits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("edit_of", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_message_edit_of"), ["edit_of"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_message_edit_of"))
        batch_op.drop_column("edit_of")
