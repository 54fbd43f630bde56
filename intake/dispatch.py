"""Delivers the outbox: acknowledgements, IRT alerts and notices, with retries and back-off.

Every outgoing note was committed in the outbox together with the ticket it belongs to. The
dispatcher claims due entries with a lease (so that, with several instances, each entry is
sent by one of them, and an entry whose claimer died is taken again when its lease ends),
sends them, and records the outcome. A relay that is down delays notes; a restart loses none.
An entry is re-sent after a crash between the relay's 250 and our commit: it keeps its
Message-ID, so mail clients fold the two copies into one.

A channel that is down as a whole (the sender raises ChannelUnavailableError: the SMTP relay
unreachable or refusing our login, Slack unreachable or refusing our token) is held, as an
MTA marks a dead destination: its notes are no longer claimed or tried one by one (each would
fail the same way, log a line, take a turn at the write lock and push its own retry further
out), the other channel goes on, and the sender's ``check`` is called on a back-off of its own
(``backoff_base`` doubling up to ``check_cap``). A check that passes does not prove that mail
goes (a relay may greet and then answer 421 to every MAIL, Slack may accept our token and
refuse the post), so the channel then sends one note alone; when it goes, or when any send of
the channel succeeds, the channel is back and its notes go at once, instead of each at the end
of the back-off its failures had grown to during the outage. When the probe fails too, the
outage goes on with its back-off where it was.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from intake.errors import ChannelUnavailableError, PermanentSendError, StorageUnavailableError, TransientSendError
from intake.model import OutgoingChat, OutgoingEmail
from intake.ports import CHANNELS, WAITING, ChatSender, Clock, EmailSender, OutboxItem, Recorder, SendResult, Store

log = logging.getLogger("intake.dispatch")


@dataclass(frozen=True, slots=True)
class PendingWait:
    """Why a pending note has not gone yet, for people reading the ticket (CLI, web page).

    ``kind``: ``"held"`` (its channel is unavailable: ``error`` says since when and why),
    ``"due"`` (due since ``at``: the outbox sends it on its next turn, or when its channel is
    back), or ``"retry"`` (its own next attempt, ``at``, is ahead). ``error``: its last error.
    """

    kind: str
    at: datetime | None
    error: str | None


def pending_wait(next_attempt_at: datetime, last_error: str | None, now: datetime) -> PendingWait:
    if (last_error or "").startswith(WAITING):
        return PendingWait("held", None, last_error)
    return PendingWait("due" if next_attempt_at <= now else "retry", next_attempt_at, last_error or None)


def acknowledgement_state(ack_status: str | None, delivery: str | None) -> str:
    """What became of a ticket's acknowledgement, for people reading the ticket.

    ``ack_status`` is the ticket's, set at intake: ``"queued"``, or ``"suppressed: <why>"``
    when none was sent (an auto-reply, a list, the flood limit...). ``delivery`` is the
    status of its latest acknowledgement in the outbox (``pending``, ``sent``, ``failed``,
    ``undeliverable``), None when there is none. Returns ``"suppressed: <why>"``, ``"queued"``
    (not sent yet), or the outbox's final status.
    """
    status = ack_status or "queued"
    if status.startswith("suppressed"):
        return status
    if delivery in (None, "", "pending"):
        return "queued"
    return delivery


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Exponential back-off with jitter: base, 2 base, 4 base, ... up to cap seconds."""
    delay: float = min(cap, base * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.8, 1.2)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass(slots=True, kw_only=True)
class _Outage:
    """A channel found unavailable: its notes wait unclaimed until a check of it passes."""

    since: datetime  # when a send found it down
    reason: str  # what the last failure said
    started: float  # time.monotonic() then
    next_check: float  # time.monotonic() of the next check
    checks: int = 0  # checks that failed
    checking: asyncio.Task[None] | None = None
    probing: bool = False  # a check passed: one note goes alone to see whether mail does
    warned: float = 0.0  # time.monotonic() of the last warning logged
    explained: datetime | None = None  # the waiting notes due before this were told why

    def why(self, channel: str) -> str:
        return f"{WAITING}{channel} unavailable since {self.since:%Y-%m-%d %H:%M:%S} UTC: {self.reason}"


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
    # Seconds between checks of an unavailable channel, at most (from backoff_base, doubling):
    # how long its notes may wait after it is back.
    check_cap: float = 60.0
    storage_retry: float = 1.0  # seconds before trying storage again, doubling up to storage_retry_cap
    storage_retry_cap: float = 10.0
    warn_every: float = 600.0  # seconds between "still unavailable" warnings of one outage
    _wakes: dict[str, asyncio.Event] = field(default_factory=lambda: {c: asyncio.Event() for c in CHANNELS})
    _stopping: bool = False
    _outages: dict[str, _Outage] = field(default_factory=dict)
    # Outcomes known but not recorded: their commit failed (the disk full, the database down).
    # They are recorded before anything is claimed again. Dropped, their notes stayed claimed
    # and went a second time once their lease ran out (a disk-full run sent three
    # acknowledgements twice, two minutes apart).
    # Kept by the channels of the loop that sent them: each loop records its own before its
    # next claim (see _record_held).
    _held: dict[tuple[str, ...], list[SendResult]] = field(default_factory=dict)

    def wake(self) -> None:
        """Something was committed: claim what is due now. Without a chat sender the chat
        loop is not woken (it polls), so that no empty claim follows every email."""
        for channel, event in self._wakes.items():
            if channel == "email" or self.chat is not None:
                event.set()

    def stop(self) -> None:
        self._stopping = True
        for event in self._wakes.values():
            event.set()

    def unavailable(self) -> dict[str, str]:
        """The channels held now, with what their last failure said."""
        return {channel: outage.reason for channel, outage in self._outages.items()}

    async def run(self) -> None:
        """Deliver until stopped: a loop a channel, so that a relay that hangs (each send
        waiting for its timeout) does not keep Slack notes, IRT alerts among them, waiting for
        the email batch to end, and the other way round."""
        log.info("outbox dispatcher started (owner %s)", self.owner)
        try:
            await asyncio.gather(*(self._run(channel) for channel in CHANNELS))
        finally:
            checks = [o.checking for o in self._outages.values() if o.checking is not None]
            for check in checks:
                check.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
            for key in list(self._held):  # a last try: what stays unrecorded goes again after its lease
                try:
                    await self._record_held(key)
                except Exception as exc:
                    log.warning(
                        "outbox: the outcomes of %d sent note(s) could not be recorded (%s); they will be sent again",
                        len(self._held.get(key, ())),
                        exc,
                    )

    async def _record_held(self, key: tuple[str, ...]) -> None:
        """Record the outcomes a failed commit left (see ``_held``).

        While storage is unavailable (a full disk, a database down or slow) they stay held,
        however long: dropped, their notes would go a second time. Any other failure is a fault
        in recording them, not in storage, and would come back on every try: they are dropped
        with an error (their notes go again after the lease) so that the channel goes on.
        """
        batch = self._held.get(key)
        if not batch:
            return
        try:
            await self._finish(batch)
        except StorageUnavailableError:
            raise
        except Exception as exc:
            del self._held[key]
            log.error(
                "outbox: the outcomes of %d sent note(s) cannot be recorded (%s: %s); dropped, they go again",
                len(batch),
                type(exc).__name__,
                exc,
            )
            return
        del self._held[key]
        log.info("outbox: recorded the outcomes of %d note(s) held while storage was unavailable", len(batch))

    async def _finish(self, results: list[SendResult]) -> None:
        await self.store.transact(lambda uow: uow.finish_outbox(results, now=self.clock.now()))

    async def _run(self, channel: str) -> None:
        wake = self._wakes[channel]
        failures = 0  # storage found unavailable in a row
        while not self._stopping:
            try:
                sent = await self.run_once((channel,))
                failures = 0
            except StorageUnavailableError as exc:
                # Again soon (outcomes may be held, notes due), not after an idle wait; the
                # pause doubles so that a full disk does not fill the log too.
                delay = min(self.storage_retry * 2**failures, self.storage_retry_cap)
                failures += 1
                log.warning("outbox: storage unavailable (%s); retrying in %s", exc, _duration(delay))
                await asyncio.sleep(delay)
                continue
            except Exception:
                log.exception("outbox: unexpected error; continuing")
                sent = 0
                await asyncio.sleep(1.0)
            if sent == 0 and not self._stopping:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=self._idle_wait(channel))
                except TimeoutError:
                    continue
                if self.coalesce and not self._stopping:
                    await asyncio.sleep(self.coalesce)

    async def run_once(self, channels: Sequence[str] = CHANNELS) -> int:
        """Claim the due entries of ``channels``, send them, record the outcomes. Returns how
        many were tried."""
        key = tuple(channels)
        await self._record_held(key)  # before any claim: a held note must not be claimed and sent again
        channels = self._open_channels(channels)
        if not channels:
            return 0
        now = self.clock.now()
        probing = any(c in self._outages for c in channels)  # a probe goes alone
        limit = 1 if probing else self.batch
        items: list[OutboxItem] = await self.store.transact(
            lambda uow: uow.claim_outbox(
                now=now, owner=self.owner, lease_until=now + self.lease, limit=limit, channels=channels
            )
        )
        if not items:
            return 0
        # A gate a channel: a relay that hangs holds its own sends, not Slack's.
        gates = {channel: asyncio.Semaphore(self.concurrency) for channel in {item.channel for item in items}}
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
            try:
                await self._finish(batch)
            except BaseException:
                self._held.setdefault(key, []).extend(batch)  # recorded before the next claim (see _held)
                raise

        async def one(item: OutboxItem) -> SendResult:
            nonlocal flush
            async with gates[item.channel]:
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

    # -- channels found unavailable ----------------------------------------------------------

    def _open_channels(self, channels: Sequence[str]) -> list[str]:
        """Those of ``channels`` whose notes may be claimed now; starts the due check of a held one."""
        now = time.monotonic()
        open_channels = []
        for channel in channels:
            outage = self._outages.get(channel)
            if outage is None or outage.probing:
                open_channels.append(channel)
            elif outage.checking is None and now >= outage.next_check:
                outage.checking = asyncio.create_task(self._check(channel, outage))
        return open_channels

    def _idle_wait(self, channel: str) -> float:
        """Seconds the channel's loop sleeps when idle: until the next poll, or its next check."""
        outage = self._outages.get(channel)
        if outage is None or outage.probing or outage.checking is not None:
            return self.idle_poll
        return min(self.idle_poll, max(0.0, outage.next_check - time.monotonic()))

    def _check_delay(self, checks: int, retry_after: float | None) -> float:
        cap = min(self.backoff_cap, self.check_cap)
        if retry_after is not None:
            return min(retry_after, cap)
        return backoff(checks + 1, base=self.backoff_base, cap=cap)

    def _found_unavailable(self, channel: str, exc: ChannelUnavailableError) -> None:
        now = time.monotonic()
        outage = self._outages.get(channel)
        if outage is not None:
            if outage.probing:  # a check passed, and mail still does not go: the outage goes on
                outage.probing = False
                self._still_down(channel, outage, str(exc), exc.retry_after)
            return  # else another send of the batch found it first
        delay = self._check_delay(0, exc.retry_after)
        self._outages[channel] = _Outage(
            since=self.clock.now(), reason=str(exc), started=now, next_check=now + delay, warned=now
        )
        self.recorder.inc("outbox_outages", channel)
        log.warning("outbox: %s unavailable: %s; its notes wait, first check in %.0fs", channel, exc, delay)

    def _still_down(self, channel: str, outage: _Outage, reason: str, retry_after: float | None) -> None:
        """A check, or the probe after one, failed: the outage goes on, its back-off growing."""
        now = time.monotonic()
        outage.checks += 1
        outage.reason = reason
        outage.next_check = now + self._check_delay(outage.checks, retry_after)
        if now - outage.warned >= self.warn_every:
            outage.warned = now
            log.warning(
                "outbox: %s still unavailable after %s (%d checks): %s",
                channel,
                _duration(now - outage.started),
                outage.checks,
                reason,
            )
        else:
            log.debug("outbox: %s still unavailable: %s", channel, reason)

    async def _check(self, channel: str, outage: _Outage) -> None:
        sender = self.email if channel == "email" else self.chat
        try:
            if sender is not None:  # a chat channel is found down only by a chat sender
                await sender.check()
        except Exception as exc:
            if not isinstance(exc, ChannelUnavailableError):
                log.exception("outbox: unexpected error checking %s", channel)
            if self._outages.get(channel) is not outage:
                return  # a send of the channel went meanwhile: it is back (_back)
            retry_after = exc.retry_after if isinstance(exc, TransientSendError) else None
            self._still_down(channel, outage, str(exc) or type(exc).__name__, retry_after)
            await self._explain(channel, outage)
            return
        finally:
            outage.checking = None
        if self._outages.get(channel) is outage:
            outage.probing = True  # one note alone, then all of them (_back)
            self._wakes[channel].set()

    def _back(self, channel: str) -> None:
        """A note of ``channel`` went: if it was held, it is back, and its notes go now."""
        outage = self._outages.pop(channel, None)
        if outage is None:
            return
        log.warning(
            "outbox: %s available again after %s; its waiting notes go now",
            channel,
            _duration(time.monotonic() - outage.started),
        )
        self._wakes[channel].set()

    async def _explain(self, channel: str, outage: _Outage) -> None:
        """Tell the notes that wait unclaimed why (``intake tickets show`` reads it)."""
        now = self.clock.now()
        try:
            await self.store.transact(
                lambda uow: uow.explain_waiting(
                    channel=channel, why=outage.why(channel), due_since=outage.explained, now=now
                )
            )
        except StorageUnavailableError as exc:
            log.warning("outbox: could not record why %s notes wait: %s", channel, exc)
            return
        except Exception:  # a bug here must not end the check that called it
            log.exception("outbox: unexpected error recording why %s notes wait", channel)
            return
        # A note is due from when its message was received, and committed a little later
        # (at most the store's commit timeout, 10 s by default): the next call looks that far back.
        outage.explained = now - timedelta(seconds=10)

    # -- one note -----------------------------------------------------------------------------

    async def _send(self, item: OutboxItem) -> SendResult:
        outage = self._outages.get(item.channel)
        if outage is not None and not outage.probing:  # found down by a send before this one's turn
            return SendResult(id=item.id, ok=False, attempted=False, error=outage.why(item.channel))
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
            if isinstance(exc, ChannelUnavailableError):
                self._found_unavailable(item.channel, exc)
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
            # A channel found down was logged once, above, not for every note it held up.
            level = logging.INFO if isinstance(exc, ChannelUnavailableError) else logging.WARNING
            log.log(level, "outbox %s #%d: will retry in %.0fs: %s", item.kind, item.id, delay, exc)
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
        self._back(item.channel)
        return SendResult(id=item.id, ok=True)
