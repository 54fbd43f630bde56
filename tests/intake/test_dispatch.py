"""The pure parts of intake.dispatch (the dispatcher itself runs against a real relay and a
real database in tests/adapters)."""

from __future__ import annotations

import pytest

from intake.dispatch import acknowledgement_state


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
