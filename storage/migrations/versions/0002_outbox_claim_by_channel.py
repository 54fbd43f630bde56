"""outbox: claim by channel

The dispatcher claims the due entries of one channel at a time, so that a channel held while
it is unavailable (its entries piling up) costs the other channel's claim nothing:
ix_outbox_due (status, next_attempt_at) becomes ix_outbox_channel_due (status, channel,
next_attempt_at).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 17:05:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_channel_due", ["status", "channel", "next_attempt_at"], unique=False)
        batch_op.drop_index("ix_outbox_due")


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_due", ["status", "next_attempt_at"], unique=False)
        batch_op.drop_index("ix_outbox_channel_due")
