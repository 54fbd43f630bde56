"""The outbox records the outcomes of sends that finish together in one commit, and loses none."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from intake.errors import StorageUnavailableError
from storage.store import SqlStore
from storage.tables import outbox
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, running_intake, settings_for


class OutcomeStore:
    """The real store, with ``recording(results)`` called each time a transaction records outbox
    outcomes (it may raise, as storage would), and ``committed(counts)`` after the transaction:
    how many outcomes each of its recordings held."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def recording(self, results: Any) -> None:
        pass

    def committed(self, counts: list[int]) -> None:
        pass

    async def transact(self, fn: Any) -> Any:
        counts: list[int] = []

        def hooked(uow: Any) -> Any:
            finish = uow.finish_outbox

            def finish_outbox(results: Any, **kw: Any) -> Any:
                self.recording(results)
                counts.append(len(results))
                return finish(results, **kw)

            uow.finish_outbox = finish_outbox
            try:
                return fn(uow)
            finally:
                del uow.finish_outbox

        result = await self._store.transact(hooked)
        self.committed(counts)
        return result


class CountingStore(OutcomeStore):
    """The real store, counting the transactions that record outbox outcomes."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.outcome_commits: list[int] = []  # outcomes recorded by each such transaction

    def committed(self, counts: list[int]) -> None:
        self.outcome_commits.extend(counts)


async def test_outcomes_that_arrive_together_share_one_commit(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    smtp_relay.reject_recipient("mallory@acme.com")  # one permanent failure among the successes
    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    async with running_intake(settings) as h:
        dispatcher = h.app.dispatcher
        counting = CountingStore(dispatcher.store)
        dispatcher.store = counting  # type: ignore[assignment]
        dispatcher.record_every = 0.5
        senders = [f"user{i}@acme.com" for i in range(11)] + ["mallory@acme.com"]
        replies = await asyncio.gather(
            *(h.send(mail(subject=f"Export {i} fails", sender=s), mail_from=s) for i, s in enumerate(senders))
        )
        assert [r.code for r in replies] == [250] * 12
        stats = await h.outbox_settled()
        captured = await smtp_relay.wait_for(11)

    assert stats["outbox"] == {"pending": 0, "sent": 11, "failed": 1, "undeliverable": 0}
    assert sorted(m.rcpt_tos[0] for m in captured) == sorted(senders[:11])
    # Every outcome recorded exactly once, in fewer commits than outcomes.
    assert sum(counting.outcome_commits) == 12
    assert len(counting.outcome_commits) < 12, counting.outcome_commits


async def test_a_stored_note_that_cannot_be_read_fails_alone(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A note the outbox cannot read (stored by another version, say) fails on its own, with the
    reason, and the acknowledgements queued after it still go out. When the notes were read
    inside the claim, every claim took that note (the oldest due) and failed, and nothing left
    the outbox again."""
    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    setup = SqlStore(settings.storage.url, create=True)
    now = datetime.now(UTC)
    try:
        with setup.engine.begin() as conn:
            conn.execute(
                insert(outbox).values(
                    kind="acknowledgement",
                    channel="email",
                    recipient="old@acme.com",
                    payload={"to": ["old@acme.com"], "subject": "no body, no Message-ID: not a note of ours"},
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    finally:
        await setup.close()
    async with running_intake(settings) as h:
        senders = [f"user{i}@acme.com" for i in range(3)]
        replies = await asyncio.gather(
            *(h.send(mail(subject=f"Export {i} fails", sender=s), mail_from=s) for i, s in enumerate(senders))
        )
        assert [r.code for r in replies] == [250] * 3
        stats = await h.outbox_settled()
        captured = await smtp_relay.wait_for(3)

    assert stats["outbox"] == {"pending": 0, "sent": 3, "failed": 1, "undeliverable": 0}
    assert sorted(m.rcpt_tos[0] for m in captured) == senders
    with contextlib.closing(sqlite3.connect(tmp_path / "intake.db")) as db:
        rows = db.execute("SELECT status, last_error FROM outbox WHERE recipient = 'old@acme.com'").fetchall()
    assert len(rows) == 1 and rows[0][0] == "failed"
    assert rows[0][1].startswith("stored note unreadable: KeyError"), rows


class FullDiskStore(OutcomeStore):
    """The real store, whose commits of outbox outcomes fail ``failures`` times, as on a full disk."""

    def __init__(self, store: Any, failures: int) -> None:
        super().__init__(store)
        self.failures = failures

    def recording(self, results: Any) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageUnavailableError("database or disk is full")


async def test_outcomes_not_recorded_are_kept_until_they_are(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A full disk fails the commit of "sent": the dispatcher keeps the outcomes and records them
    before it claims anything again. When it dropped them, the notes stayed claimed and were sent
    a second time when their lease ran out."""
    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    async with running_intake(settings) as h:
        dispatcher = h.app.dispatcher
        failing = FullDiskStore(dispatcher.store, failures=2)
        dispatcher.store = failing  # type: ignore[assignment]
        dispatcher.lease = timedelta(seconds=0.5)  # outlived by the failures (1 s, then 2 s apart)
        senders = [f"user{i}@acme.com" for i in range(3)]
        replies = await asyncio.gather(
            *(h.send(mail(subject=f"Export {i} fails", sender=s), mail_from=s) for i, s in enumerate(senders))
        )
        assert [r.code for r in replies] == [250] * 3
        stats = await h.outbox_settled()
        await asyncio.sleep(1.5)  # three leases more: a second copy would have gone by now
        captured = list(smtp_relay.messages)

    assert failing.failures == 0
    assert stats["outbox"] == {"pending": 0, "sent": 3, "failed": 0, "undeliverable": 0}
    assert sorted(m.rcpt_tos[0] for m in captured) == senders  # each acknowledgement once


class RefusingStore(OutcomeStore):
    """The real store, whose recording of the outcome of note ``poison`` always fails, and not
    for want of storage (a fault in recording it)."""

    def __init__(self, store: Any, poison: int) -> None:
        super().__init__(store)
        self.poison = poison

    def recording(self, results: Any) -> None:
        if any(r.id == self.poison for r in results):
            raise ValueError("an outcome this build cannot write")


async def test_an_outcome_storage_refuses_does_not_stop_the_outbox(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """Held outcomes are recorded before the next claim. While storage is unavailable they
    wait (test above); a failure of another kind would come back on every try and hold the
    channel for good: those outcomes are dropped with an error, and the outbox goes on."""
    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    async with running_intake(settings) as h:
        dispatcher = h.app.dispatcher
        dispatcher.store = RefusingStore(dispatcher.store, poison=1)  # type: ignore[assignment]
        first = await h.send(mail(subject="Export fails", sender="user0@acme.com"), mail_from="user0@acme.com")
        assert first.code == 250
        await smtp_relay.wait_for(1)
        later = await h.send(mail(subject="One more", sender="user9@acme.com"), mail_from="user9@acme.com")
        assert later.code == 250
        await smtp_relay.wait_for(2, timeout=20)  # the outbox goes on
        for _ in range(100):
            stats = h.stats()
            if stats["outbox"]["sent"] == 1:
                break
            await asyncio.sleep(0.1)
    assert stats["outbox"] == {"pending": 1, "sent": 1, "failed": 0, "undeliverable": 0}  # note 1: leased, goes again
    assert any("cannot be recorded (ValueError" in r.getMessage() for r in caplog.records)


async def test_a_relay_reply_that_is_not_utf8_is_recorded_with_the_note(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A relay's reply is read as UTF-8 with the bytes that are not kept as lone surrogates
    (aiosmtplib's and our reply reader's choice), and no database takes a lone surrogate in
    text: a refusal in Latin-1 must still be recorded, or the note would stay pending and go
    again at every lease. The sender's excerpt of the reply and the store's error text both
    replace such bytes."""
    smtp_relay.reject_recipient("mallory@acme.com", b"550 5.1.1 <mallory@acme.com>: bo\xeete inconnue")  # type: ignore[arg-type]
    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    async with running_intake(settings) as h:
        for sender in ["mallory@acme.com", "alice@acme.com"]:
            reply = await h.send(mail(subject=f"Export fails for {sender}", sender=sender), mail_from=sender)
            assert reply.code == 250
        stats = await h.outbox_settled()
        [captured] = await smtp_relay.wait_for(1)

    assert captured.rcpt_tos == ("alice@acme.com",)
    assert stats["outbox"] == {"pending": 0, "sent": 1, "failed": 1, "undeliverable": 0}
    with contextlib.closing(sqlite3.connect(tmp_path / "intake.db")) as db:
        [(error,)] = db.execute("SELECT last_error FROM outbox WHERE recipient = 'mallory@acme.com'").fetchall()
    assert "bo\ufffdte inconnue" in error, error
