"""Delivers the outbox: acknowledgements, IRT alerts and notices, with retries and back-off.

Every outgoing note was committed in the outbox together with the ticket it belongs to. The
dispatcher claims due entries with a lease (so that, with several instances, each entry is
sent by one of them, and an entry whose claimer died is taken again when its lease ends),
sends them, and records the outcome. A relay that is down delays notes; a restart loses none.
An entry is re-sent after a crash between the relay's 250 and our commit: it keeps its
Message-ID, so mail clients fold the two copies into one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from intake.errors import PermanentSendError, StorageUnavailableError, TransientSendError
from intake.model import OutgoingChat, OutgoingEmail
from intake.ports import ChatSender, Clock, EmailSender, OutboxItem, Recorder, SendResult, Store

log = logging.getLogger("intake.dispatch")


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Exponential back-off with jitter: base, 2 base, 4 base, ... up to cap seconds."""
    delay: float = min(cap, base * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.8, 1.2)


@dataclass(slots=True, kw_only=True)
class Dispatcher:
    store: Store
    email: EmailSender
    clock: Clock
    owner: str
    chat: ChatSender | None = None
    recorder: Recorder = field(default_factory=Recorder)
    batch: int = 50
    concurrency: int = 10
    lease: timedelta = timedelta(minutes=2)
    idle_poll: float = 5.0  # seconds between polls when nothing woke us
    # After a wake-up, gather what else commits in this many seconds: one claim for a burst of
    # acknowledgements instead of one per message (fewer transactions competing with intake).
    coalesce: float = 0.05
    # Outcomes of sends that finish within this many seconds are recorded in one commit (each
    # commit is a turn at the write lock the listener waits for: 20 ms -> 100 ms took the Slack
    # benchmark from 631 to 716 events/s, four interleaved pairs).
    record_every: float = 0.1
    backoff_base: float = 5.0
    backoff_cap: float = 3600.0
    max_attempts: int = 48  # about two days at the cap
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        log.info("outbox dispatcher started (owner %s)", self.owner)
        while not self._stopping:
            try:
                sent = await self.run_once()
            except StorageUnavailableError as exc:
                log.warning("outbox: storage unavailable (%s); retrying shortly", exc)
                sent = 0
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("outbox: unexpected error; continuing")
                sent = 0
                await asyncio.sleep(1.0)
            if sent == 0 and not self._stopping:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.idle_poll)
                except TimeoutError:
                    continue
                if self.coalesce and not self._stopping:
                    await asyncio.sleep(self.coalesce)

    async def run_once(self) -> int:
        """Claim due entries, send them, record the outcomes. Returns how many were tried."""
        now = self.clock.now()
        items: list[OutboxItem] = await self.store.transact(
            lambda uow: uow.claim_outbox(now=now, owner=self.owner, lease_until=now + self.lease, limit=self.batch)
        )
        if not items:
            return 0
        gate = asyncio.Semaphore(self.concurrency)
        # Outcomes are recorded as they come, gathered over ``record_every`` seconds: one
        # commit for the sends that finish together instead of one each (each commit is an
        # fsync and, on SQLite, a turn at the write lock that intake's listener waits for). A
        # crash re-sends only the entries whose outcome was not yet recorded, never the whole
        # claimed batch; a re-sent note keeps its Message-ID, so mail clients fold the copies.
        unrecorded: list[SendResult] = []
        flushes: list[asyncio.Task[None]] = []
        flush: asyncio.Task[None] | None = None

        async def record_later() -> None:
            nonlocal flush
            await asyncio.sleep(self.record_every)
            batch = unrecorded.copy()
            unrecorded.clear()
            flush = None  # an outcome from now on schedules the next commit
            await self.store.transact(lambda uow: uow.finish_outbox(batch, now=self.clock.now()))

        async def one(item: OutboxItem) -> SendResult:
            nonlocal flush
            async with gate:
                result = await self._send(item)
            unrecorded.append(result)
            if flush is None:
                flush = asyncio.create_task(record_later())
                flushes.append(flush)
            return result

        try:
            results: Sequence[SendResult] = await asyncio.gather(*(one(i) for i in items))
        finally:
            # Every outcome known is recorded, even when a send raised: the flushes scheduled
            # hold them all (the last one takes what came in before its delay ended).
            done = await asyncio.gather(*flushes, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(results)

    async def _send(self, item: OutboxItem) -> SendResult:
        try:
            payload = item.payload
        except Exception as exc:  # sending it again would not make it readable
            log.error("outbox %s #%d (%s): the stored note cannot be read: %r", item.kind, item.id, item.ticket_id, exc)
            self.recorder.inc("outbox_failed", item.kind)
            return SendResult(
                id=item.id, ok=False, permanent=True, error=f"stored note unreadable: {type(exc).__name__}: {exc}"
            )
        try:
            if isinstance(payload, OutgoingEmail):
                await self.email.send(payload)
            elif isinstance(payload, OutgoingChat):
                if self.chat is None:
                    raise TransientSendError("no chat sender configured")
                await self.chat.send(payload)
            else:  # pragma: no cover - payloads are one of the two
                raise PermanentSendError(f"unknown payload {type(payload).__name__}")
        except PermanentSendError as exc:
            log.error("outbox %s #%d (%s): permanent failure: %s", item.kind, item.id, item.ticket_id, exc)
            self.recorder.inc("outbox_failed", item.kind)
            return SendResult(id=item.id, ok=False, permanent=True, error=str(exc))
        except TransientSendError as exc:
            attempts = item.attempts + 1
            if attempts >= self.max_attempts:
                self.recorder.inc("outbox_failed", item.kind)
                return SendResult(
                    id=item.id, ok=False, permanent=True, error=f"gave up after {attempts} attempts: {exc}"
                )
            delay = (
                exc.retry_after
                if exc.retry_after is not None
                else backoff(attempts, base=self.backoff_base, cap=self.backoff_cap)
            )
            log.warning("outbox %s #%d: will retry in %.0fs: %s", item.kind, item.id, delay, exc)
            self.recorder.inc("outbox_retry", item.kind)
            return SendResult(
                id=item.id, ok=False, error=str(exc), retry_at=self.clock.now() + timedelta(seconds=delay)
            )
        except Exception as exc:  # a bug in a sender must not stop the dispatcher
            log.exception("outbox %s #%d: unexpected error", item.kind, item.id)
            delay = backoff(item.attempts + 1, base=self.backoff_base, cap=self.backoff_cap)
            return SendResult(
                id=item.id,
                ok=False,
                error=f"unexpected {type(exc).__name__}",
                retry_at=self.clock.now() + timedelta(seconds=delay),
            )
        self.recorder.inc("outbox_sent", item.kind)
        return SendResult(id=item.id, ok=True)
