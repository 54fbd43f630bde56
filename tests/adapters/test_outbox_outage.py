"""A channel that is down as a whole is held, checked, and its notes sent once it is back.

Real things over loopback: intake's listener and store, the SMTP relay stand-in taken down and
brought back, a socket that accepts and never answers (a hung relay), and the fake Slack Web
API answering 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapters.cli import main
from adapters.email.sender import SmtpRelaySender
from adapters.slack.sender import SlackChatSender
from intake.dispatch import Dispatcher
from intake.model import OutgoingChat, OutgoingEmail
from intake.ports import OutboxEntry
from intake.service import SystemClock
from storage.store import SqlStore
from tests.adapters.conftest import RelayStandIn
from tests.adapters.fake_slack import BOT_TOKEN, FakeSlack
from tests.adapters.harness import Harness, mail, ref_of, running_intake, settings_for, wait_until


def outage_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "intake.dispatch" and text in r.getMessage()]


def ack_of(h: Harness, ref: str) -> dict[str, Any]:
    [note] = [n for n in h.detail(ref)["outbox"] if n["kind"] == "acknowledgement"]
    return note


async def test_a_relay_found_down_holds_the_email_and_sends_it_all_once_it_is_back(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.dispatch")
    smtp_relay.stop()
    # Checks back off from retry_base_seconds (0.2) to retry_cap_seconds (0.5) in these settings.
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        first = ref_of((await h.send(mail(sender="a0@acme.com"))).text)
        await wait_until(lambda: ack_of(h, first)["attempts"] == 1)
        assert h.app.dispatcher.unavailable().keys() == {"email"}
        later = [ref_of((await h.send(mail(sender=f"a{n}@acme.com"))).text) for n in range(1, 6)]
        await asyncio.sleep(1.5)  # several checks, each refused

        # The first note was tried once; the ones that came during the outage were not tried at
        # all, and none of them grew a back-off of its own.
        assert ack_of(h, first)["attempts"] == 1
        assert ack_of(h, first)["status"] == "pending" and "unreachable" in ack_of(h, first)["last_error"]
        # The note in flight when the relay went down is due again, and waits with the others:
        # its own attempt's error gave way to why it waits (tickets show said "next attempt" and
        # a time past).
        assert ack_of(h, first)["last_error"].startswith("waiting: email unavailable since")
        for ref in later:
            note = ack_of(h, ref)
            assert note["attempts"] == 0 and note["status"] == "pending"
            # `intake tickets show` says why it waits.
            assert note["last_error"].startswith("waiting: email unavailable since")
            assert "unreachable" in note["last_error"]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        shown = CliRunner().invoke(main, ["--config", str(cfg), "tickets", "show", later[0]])
        assert shown.exit_code == 0, shown.output
        expected = "acknowledgement to a1@acme.com: pending after 0 attempt(s) - waiting: email unavailable since"
        assert expected in shown.output
        # One warning for the outage, not one a note.
        assert len(outage_lines(caplog, "email unavailable")) == 1
        assert outage_lines(caplog, "will retry") == [outage_lines(caplog, "will retry")[0]]

        smtp_relay.start()
        acks = await smtp_relay.wait_for(6, timeout=3.0)
        assert sorted(a.rcpt_tos[0] for a in acks) == sorted(f"a{n}@acme.com" for n in range(6))
        await h.outbox_settled()
        assert h.app.dispatcher.unavailable() == {}
        assert len(outage_lines(caplog, "email available again")) == 1
        for ref in [first, *later]:
            assert ack_of(h, ref)["status"] == "sent"
        await asyncio.sleep(0.5)
        await smtp_relay.wait_for(6)  # each exactly once


async def test_a_relay_that_answers_421_is_held_then_probed_with_one_note(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="intake.dispatch")
    smtp_relay.fail_next("421 4.3.2 too busy, closing", stage="MAIL", count=1)
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail())).text)
        [ack] = await smtp_relay.wait_for(1)
        assert ack.rcpt_tos == ("alice@acme.com",)
        await h.outbox_settled()
        note = ack_of(h, ref)
        assert note["status"] == "sent" and note["attempts"] == 2
    assert len(outage_lines(caplog, "email unavailable: relay")) == 1
    assert "421" in outage_lines(caplog, "email unavailable: relay")[0]
    assert len(outage_lines(caplog, "email available again")) == 1


async def test_a_relay_that_greets_but_refuses_every_message_costs_one_note_a_check(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's check (connect, EHLO) passes while every MAIL gets 421: after the first
    batch, each check lets one note go alone, and the outage's back-off keeps growing."""
    caplog.set_level(logging.INFO, logger="intake.dispatch")
    smtp_relay.fail_next("421 4.7.0 too many messages, slow down", stage="MAIL", count=10_000)
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        refs = [ref_of((await h.send(mail(sender=f"b{n}@acme.com"))).text) for n in range(20)]
        await asyncio.sleep(3.0)  # checks every 0.2, 0.4, then 0.5 s (these settings' cap)
        tried = sum(ack_of(h, ref)["attempts"] for ref in refs)
        # At most the batches in flight when the relay first refused, then one note a check
        # (a note sent on a kept connection that gets 421 is tried again on a fresh one).
        assert 1 <= tried <= 10 + 3.0 / 0.2 + 2, tried
        assert smtp_relay.transactions <= 2 * tried
        assert len(outage_lines(caplog, "email unavailable")) == 1
        assert outage_lines(caplog, "available again") == []
        smtp_relay.clear_failures()
        await smtp_relay.wait_for(20, timeout=5.0)
        await h.outbox_settled()
        assert all(ack_of(h, ref)["status"] == "sent" for ref in refs)
    assert len(outage_lines(caplog, "email available again")) == 1


# -- the dispatcher alone, with both channels -------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    s = SqlStore(f"sqlite:///{tmp_path}/outbox.db", create=True)
    s.start()
    try:
        yield s
    finally:
        await s.close()
        s.dispose()


def email(n: int) -> OutgoingEmail:
    return OutgoingEmail(
        to=(f"c{n}@customer.example",),
        subject=f"s{n}",
        body="b",
        message_id=f"m{n}@intake.example",
        from_address="support@example.com",
    )


async def enqueue(store: SqlStore, *payloads: OutgoingEmail | OutgoingChat) -> None:
    now = datetime.now(UTC)
    for payload in payloads:
        await store.transact(
            lambda uow, p=payload: uow.enqueue(OutboxEntry(ticket_id=None, kind="notice", payload=p, created_at=now))
        )


def outbox_rows(store: SqlStore) -> dict[str, list[tuple[int, str, str | None]]]:
    """(attempts, status, last_error) of every entry, by channel."""
    from sqlalchemy import select

    from storage.tables import outbox

    query = select(outbox.c.channel, outbox.c.attempts, outbox.c.status, outbox.c.last_error).order_by(outbox.c.id)
    rows: dict[str, list[tuple[int, str, str | None]]] = {}
    for channel, attempts, status, error in store.run_sync(lambda uow: uow.conn.execute(query).all()):
        rows.setdefault(channel, []).append((attempts, status, error))
    return rows


def relay_sender(host: str, port: int, timeout: float) -> SmtpRelaySender:
    return SmtpRelaySender(host=host, port=port, timeout=timeout, local_hostname="intake.test")


def slack_sender(fake: FakeSlack) -> SlackChatSender:
    return SlackChatSender(token=BOT_TOKEN, api_url=fake.api_url, timeout=2.0)


def dispatcher_for(
    store: SqlStore, relay: SmtpRelaySender, chat: SlackChatSender | None = None, **knobs: Any
) -> Dispatcher:
    """A dispatcher on the system clock; ``knobs``: its back-off, poll and concurrency."""
    return Dispatcher(store=store, email=relay, chat=chat, clock=SystemClock(), owner="t", **knobs)


async def test_a_hung_relay_holds_up_neither_slack_nor_the_email_it_never_tried(
    store: SqlStore, silent_listener: tuple[str, int], fake: FakeSlack
) -> None:
    host, port = silent_listener
    chat_sender = slack_sender(fake)
    dispatcher = dispatcher_for(
        store, relay_sender(host, port, 3.0), chat_sender, concurrency=10, backoff_base=30.0, check_cap=30.0
    )
    # Twelve emails, then a Slack post: more emails than sends at once, so that a gate shared by
    # both channels would keep the post waiting behind sends that hang.
    await enqueue(store, *(email(n) for n in range(12)), OutgoingChat(channel="C0IRT", text="Severity 1"))
    try:
        await hung_relay_outage(dispatcher, store, fake)
    finally:
        await chat_sender.close()


async def hung_relay_outage(dispatcher: Dispatcher, store: SqlStore, fake: FakeSlack) -> None:
    started = time.monotonic()
    run = asyncio.create_task(dispatcher.run_once())
    [post] = await fake.wait_posts(1, timeout=2.0)  # before the relay's 3 s timeout
    assert post.params["channel"] == "C0IRT" and time.monotonic() - started < 2.0
    assert await run == 13
    rows = outbox_rows(store)
    assert rows["slack"] == [(1, "sent", None)]
    # The ten sent at once timed out and were tried once; the two behind them were not tried.
    tried = [(status, err or "") for attempts, status, err in rows["email"] if attempts == 1]
    waiting = [(status, err or "") for attempts, status, err in rows["email"] if attempts == 0]
    assert len(tried) == 10 and all(status == "pending" and "unreachable" in err for status, err in tried)
    assert len(waiting) == 2
    assert all(status == "pending" and err.startswith("waiting: email unavailable since") for status, err in waiting)
    # While the email channel is held, a new Slack post still goes, and no email is claimed.
    await enqueue(store, email(12), OutgoingChat(channel="C0IRT", text="second"))
    assert await dispatcher.run_once() == 1
    await fake.wait_posts(2)
    assert [r[0] for r in outbox_rows(store)["email"]] == [1] * 10 + [0, 0, 0]


async def test_a_slack_note_that_comes_while_email_sends_hang_goes_at_once(
    store: SqlStore, silent_listener: tuple[str, int], fake: FakeSlack
) -> None:
    host, port = silent_listener
    email_sender = relay_sender(host, port, 5.0)
    chat_sender = slack_sender(fake)
    dispatcher = dispatcher_for(store, email_sender, chat_sender, idle_poll=0.1, backoff_base=30.0, check_cap=30.0)
    await enqueue(store, *(email(n) for n in range(3)))
    runner = asyncio.create_task(dispatcher.run())
    try:
        await wait_until(lambda: emails_claimed(store), timeout=2.0)
        # The email batch waits for the relay's 5 s timeout; an IRT alert for Slack comes now.
        await enqueue(store, OutgoingChat(channel="U0IRTLEAD", text="Severity 1: data breach"))
        dispatcher.wake()
        started = time.monotonic()
        [post] = await fake.wait_posts(1, timeout=3.0)
        assert post.params["channel"] == "U0IRTLEAD" and time.monotonic() - started < 3.0
        assert outbox_rows(store)["email"] == [(0, "pending", None)] * 3  # still hanging, untried
    finally:
        dispatcher.stop()
        await runner
        await chat_sender.close()


def emails_claimed(store: SqlStore) -> bool:
    """The email loop has claimed its batch (the leases are out) and is sending it."""
    from sqlalchemy import func, select

    from storage.tables import outbox

    query = select(func.count()).where(outbox.c.channel == "email", outbox.c.claimed_until.is_not(None))
    return bool(store.run_sync(lambda uow: uow.conn.execute(query).scalar()))


async def test_slack_failing_is_held_checked_with_auth_test_and_delivered_when_back(
    store: SqlStore, smtp_relay: RelayStandIn, fake: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.dispatch")
    chat_sender = slack_sender(fake)
    email_sender = relay_sender(smtp_relay.host, smtp_relay.port, 2.0)
    dispatcher = dispatcher_for(store, email_sender, chat_sender, idle_poll=0.1, backoff_base=0.1, check_cap=0.2)
    fake.fail_next("chat.postMessage", status=500, error="internal_error", retry_after=None)
    fake.fail_next("auth.test", count=2, status=503, error="service_unavailable", retry_after=None)
    await enqueue(store, OutgoingChat(channel="C0A", text="one"), email(1))
    runner = asyncio.create_task(dispatcher.run())
    try:
        await smtp_relay.wait_for(1)  # email goes on while Slack is held
        await enqueue(store, OutgoingChat(channel="C0A", text="two"))
        dispatcher.wake()
        posts = await fake.wait_posts(2, timeout=5.0)
        assert sorted(p.params["text"] for p in posts) == ["one", "two"]
        assert fake.count("auth.test") == 3  # two refused checks, then the one that passed
    finally:
        dispatcher.stop()
        await runner
        await chat_sender.close()
        await email_sender.close()
    assert len(outage_lines(caplog, "slack unavailable")) == 1
    assert len(outage_lines(caplog, "slack available again")) == 1
    assert [r[:2] for r in outbox_rows(store)["slack"]] == [(2, "sent"), (1, "sent")]


async def test_stopping_while_a_check_waits_on_a_hung_relay_returns_at_once(
    store: SqlStore, silent_listener: tuple[str, int]
) -> None:
    host, port = silent_listener
    email_sender = relay_sender(host, port, 0.3)
    dispatcher = dispatcher_for(store, email_sender, idle_poll=0.05, backoff_base=0.05, check_cap=0.05)
    await enqueue(store, email(0))
    runner = asyncio.create_task(dispatcher.run())
    await wait_until(lambda: "email" in dispatcher.unavailable(), timeout=3.0)
    email_sender.timeout = 30.0  # the checks from now on hang for as long as the relay lets them
    await asyncio.sleep(0.3)  # a check is under way
    started = time.monotonic()
    dispatcher.stop()
    await asyncio.wait_for(runner, timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert [t for t in asyncio.all_tasks() if "Dispatcher._check" in repr(t.get_coro())] == []
