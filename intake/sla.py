"""Response clocks: warn the team before a first-response target is missed, and when it is.

The policies' clocks start when the customer writes; every ticket stores its due times at
intake. :class:`SlaWatcher` looks, every ``interval`` seconds, for open tickets with no staff
response whose first-response target is within the lead time or past, and queues one "about
to miss" and one "missed" notice per ticket to the triage address and channel. The clock is a
port, so tests drive time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from intake.acknowledgement import Outbound, TemplateBook, render_sla_notice
from intake.errors import StorageUnavailableError
from intake.model import OutgoingChat
from intake.policy import Policy
from intake.ports import Clock, OutboxEntry, Recorder, SlaCandidate, Store, TicketChange, UnitOfWork

log = logging.getLogger("intake.sla")

ABOUT_TO_MISS = "About to miss the response target"
MISSED = "Response target missed"


@dataclass(slots=True, kw_only=True)
class SlaWatcher:
    store: Store
    policy: Policy
    templates: TemplateBook
    outbound: Outbound
    clock: Clock
    triage_email: str | None = None
    triage_chat: str | None = None
    interval: float = 30.0
    batch: int = 200
    recorder: Recorder = field(default_factory=Recorder)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except StorageUnavailableError as exc:
                log.warning("response clocks: storage unavailable (%s)", exc)
            except Exception:
                log.exception("response clocks: unexpected error; continuing")
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Queue the notices that are due now. Returns how many were queued."""
        now = self.clock.now()
        return await self.store.transact(lambda uow: self._check(uow, now))

    def _check(self, uow: UnitOfWork, now: datetime) -> int:
        queued = 0
        for cand in uow.sla_candidates(due_before=now + self.policy.about_to_miss, limit=self.batch):
            ticket = cand.ticket
            if ticket.response_due <= now and cand.missed_at is None:
                queued += self._notify(uow, cand, MISSED, now)
                uow.update_ticket(ticket.id, TicketChange(sla_missed_at=now, sla_warned_at=cand.warned_at or now))
                self.recorder.inc("sla_missed")
            elif ticket.response_due > now and cand.warned_at is None:
                queued += self._notify(uow, cand, ABOUT_TO_MISS, now)
                uow.update_ticket(ticket.id, TicketChange(sla_warned_at=now))
                self.recorder.inc("sla_warned")
        return queued

    def _notify(self, uow: UnitOfWork, cand: SlaCandidate, what: str, now: datetime) -> int:
        ticket = cand.ticket
        target = next(iter(ticket.targets), "initial_response")
        notice = partial(
            render_sla_notice,
            templates=self.templates.get(None),
            policy=self.policy,
            what=what,
            ticket=ticket,
            requester=ticket.requester,
            target=target,
            due=ticket.response_due,
        )
        n = 0
        if self.triage_email:
            subject, text = notice()
            email = self.outbound.staff_email(
                to=self.triage_email, subject=subject, body=text, reference=ticket.reference
            )
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="sla", payload=email, created_at=now))
            n += 1
        if self.triage_chat:
            _, chat_text = notice(chat=True)
            uow.enqueue(
                OutboxEntry(
                    ticket_id=ticket.id,
                    kind="sla",
                    payload=OutgoingChat(channel=self.triage_chat, text=chat_text),
                    created_at=now,
                )
            )
            n += 1
        uow.update_ticket(ticket.id, TicketChange(add_notes=(f"{what} ({target.replace('_', ' ')})",), updated_at=now))
        return n
