"""The pure parts of intake.dispatch (the dispatcher itself runs against a real relay and a
real database in tests/adapters)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from intake.dispatch import PendingWait, acknowledgement_state, pending_wait


@pytest.mark.parametrize(
    ("ack_status", "delivery", "shown"),
    [
        ("queued", None, "queued"),  # no outbox row read (or none written yet)
        ("queued", "pending", "queued"),  # waiting for its first try, or for a retry
        ("queued", "sent", "sent"),  # what `tickets show` said "queued" for, before
        ("queued", "failed", "failed"),
        ("queued", "undeliverable", "undeliverable"),  # its recipient's server bounced it
        ("suppressed: auto-reply", None, "suppressed: auto-reply"),
        (None, None, "queued"),
    ],
)
def test_the_acknowledgement_state_follows_the_outbox(ack_status: str | None, delivery: str | None, shown: str) -> None:
    assert acknowledgement_state(ack_status, delivery) == shown


def test_a_pending_note_says_what_it_waits_for() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    held = pending_wait(now - timedelta(minutes=5), "waiting: email unavailable since 11:55: relay down", now)
    assert held == PendingWait("held", None, "waiting: email unavailable since 11:55: relay down")
    # Due by now (a time past is not a "next attempt"): the outbox sends it on its next turn.
    assert pending_wait(now - timedelta(seconds=40), "relay unreachable", now) == PendingWait(
        "due", now - timedelta(seconds=40), "relay unreachable"
    )
    assert pending_wait(now + timedelta(minutes=1), "", now) == PendingWait("retry", now + timedelta(minutes=1), None)
