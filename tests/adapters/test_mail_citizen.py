"""A good mail citizen: flood limits, no backscatter, our own loops, IRT alert ceiling, once-only alerts."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, ref_of, running_intake, settings_for

BREACH = "We think there was a data breach: unauthorized access to our admin account last night."


async def test_acknowledgements_per_sender_are_limited_with_one_last_notice(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    extra = "[limits]\nacks_per_sender = 3\ntickets_per_sender = 100\nack_period_minutes = 90\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        for i in range(6):
            assert (await h.send(mail(subject=f"problem {i}"))).code == 250
        await h.outbox_settled()
        acks = await smtp_relay.wait_for(3)
        assert "last automatic reply" in acks[2].message.get_content()
        # It says for how long, as configured (it said "today" of a 60-minute window).
        assert "will follow for up to 90 minutes." in " ".join(acks[2].message.get_content().split())
        assert "last automatic reply" not in acks[0].message.get_content()
        tickets = h.tickets()
        assert len(tickets) == 6  # still stored, each its own ticket
        suppressed = [t for t in tickets if t["ack_status"].startswith("suppressed: flood limit")]
        assert len(suppressed) == 3
        # Another sender is not affected.
        await h.send(mail(sender="bob@acme.com"))
        await smtp_relay.wait_for(4)


async def test_new_tickets_per_sender_are_limited(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[limits]\ntickets_per_sender = 2\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        refs = [ref_of((await h.send(mail(sender="flood@acme.com", subject=f"spam {i}"))).text) for i in range(5)]
        assert len(set(refs)) == 2  # the flood became two tickets' worth of noise
        assert refs[2:] == [refs[1]] * 3
        detail = h.detail(refs[1])
        assert [m["route"] for m in detail["messages"]] == ["new", "flood", "flood", "flood"]
        assert "flood limit" in detail["messages"][1]["route_note"]
        await h.outbox_settled()
        await smtp_relay.wait_for(2)  # no acknowledgement for the flood


async def test_reply_to_is_not_identity(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[limits]\nacks_per_sender = 1\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        await h.send(mail(sender="eve@acme.com", headers={"Reply-To": "a@acme.com"}))
        await h.send(mail(sender="eve@acme.com", headers={"Reply-To": "b@acme.com"}))
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)  # the limit counts the From address, whatever Reply-To says
        assert ack.rcpt_tos == ("eve@acme.com",)


AUTH = '[email]\ntrusted_authserv_ids = ["mx.example.com"]\n'


async def test_no_backscatter_to_forged_senders(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=AUTH)) as h:
        # Unauthenticated stranger: a ticket, no acknowledgement, and the ticket says why.
        r1 = await h.send(mail(sender="forged@victim.example"))
        # A forged Authentication-Results from outside (wrong authserv-id) counts for nothing.
        r2 = await h.send(
            mail(
                sender="forged2@victim.example",
                headers={"Authentication-Results": "evil.example; spf=pass smtp.mailfrom=victim.example"},
            )
        )
        # SPF pass reported by our own MTA: acknowledged.
        r3 = await h.send(
            mail(
                sender="real@partner.example",
                headers={"Authentication-Results": "mx.example.com; spf=pass smtp.mailfrom=partner.example"},
            )
        )
        # A known customer organisation (configured domain) is acknowledged without authentication.
        r4 = await h.send(mail(sender="alice@acme.com"))
        await h.outbox_settled()
        acks = await smtp_relay.wait_for(2)
        assert sorted(a.rcpt_tos[0] for a in acks) == ["alice@acme.com", "real@partner.example"]
        for r in (r1, r2):
            status = h.detail(ref_of(r.text))["ack_status"]
            assert status.startswith("suppressed: sender not authenticated"), status
        assert h.detail(ref_of(r3.text))["ack_status"] == "queued"
        assert h.detail(ref_of(r4.text))["ack_status"] == "queued"


async def test_an_earlier_participant_counts_as_known(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=AUTH)) as h:
        authed = {"Authentication-Results": "mx.example.com; dkim=pass header.d=partner.example"}
        await h.send(mail(sender="carol@partner.example", headers=authed))
        await h.outbox_settled()
        await smtp_relay.wait_for(1)
        # Later, her mail arrives without a usable Authentication-Results: she is a known participant.
        await h.send(mail(sender="carol@partner.example", subject="another thing"))
        await h.outbox_settled()
        await smtp_relay.wait_for(2)


async def test_our_own_loop_marker_is_never_acknowledged(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail())
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        # Our acknowledgement comes back (a forwarding loop): stored, not acknowledged.
        reply = await h.send(ack.content, mail_from="alice@acme.com")
        assert reply.code == 250
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(1)
        # Mail "from" our own support address is never answered either.
        await h.send(mail(sender="support@example.com", subject="hello"), mail_from="support@example.com")
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(1)


async def test_security_alert_once_per_ticket_and_raised_by_follow_up(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail(subject="Export is slow", message_id="<s1@acme.com>"))).text)
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        assert h.detail(ref)["severity"] == 3
        # A follow-up newly reports a breach: Severity 1, alert once (and the customer told once).
        await h.send(mail(subject=f"Re: Export is slow [{ref}]", body=BREACH))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(3)
        [alert] = [m for m in msgs[1:] if m.rcpt_tos == ("irt-lead@example.com",)]
        assert [m.rcpt_tos for m in msgs[1:] if m is not alert] == [("alice@acme.com",)]
        assert ref in alert.message["Subject"] and "SECURITY" in alert.message["Subject"]
        body = alert.message.get_content()
        assert "unauthorized access" in body.lower() and "intake tickets show " + ref in body
        detail = h.detail(ref)
        assert detail["severity"] == 1 and detail["security"]
        # More matching follow-ups, and a reply quoting our Severity 1 words: no new page.
        await h.send(mail(subject=f"Re: [{ref}]", body="Also: ransomware note found on one server."))
        quoted = "Thanks.\n\n> " + ack.message.get_content().replace("\n", "\n> ")
        await h.send(mail(subject=f"Re: [{ref}]", body=quoted, in_reply_to=ack.message["Message-ID"]))
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(3)
        # Severity is never lowered by a quiet follow-up.
        await h.send(mail(subject=f"Re: [{ref}]", body="All good now, thanks."))
        assert h.detail(ref)["severity"] == 1


async def test_new_security_ticket_acknowledges_severity_1_and_alerts(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        reply = await h.send(mail(subject="Posible brecha de seguridad", body="Hubo acceso no autorizado a la cuenta."))
        ref = ref_of(reply.text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(2)
        ack = next(m for m in msgs if m.rcpt_tos == ("alice@acme.com",))
        alert = next(m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",))
        # Written in Spanish, so answered in Spanish.
        text = " ".join(ack.message.get_content().split())
        assert "Severidad 1" in text and "Equipo de Respuesta a Incidentes (IRT)" in text
        assert ref in alert.message["Subject"]
        [t] = h.tickets()
        assert t["severity"] == 1 and t["security"]


async def test_irt_alert_ceiling_sends_one_summary(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[limits]\nirt_alerts_per_hour = 2\nacks_per_sender = 100\ntickets_per_sender = 100\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        for i in range(5):
            await h.send(mail(sender=f"user{i}@acme.com", subject=f"data breach {i}", body=BREACH))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(5 + 3)  # five acknowledgements, two alerts, one summary
        to_irt = [m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",)]
        assert len(to_irt) == 3
        assert sum("ceiling reached" in m.message["Subject"] for m in to_irt) == 1
        assert all(t["security"] and t["severity"] == 1 for t in h.tickets())


async def test_a_follow_up_that_raises_its_ticket_to_severity_1_is_answered_once(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """The policy: "If you suspect a security or data incident please highlight this issue
    directly on the ticket or email. The IRT lead will reach out directly." A follow-up that
    reports one raises its ticket to Severity 1 and alerts the lead; the customer, who got no
    acknowledgement for a follow-up, is now told so once, threaded under their message, and the
    alert says truly whether they were (it said "The customer was told" also when they were
    not). An automated follow-up raises and alerts, but is not answered."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail(sender="Bob <bob@acme.com>", subject="Data breach", body=BREACH))
        ref = ref_of((await h.send(mail(subject="Export is slow"))).text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(3)
        [new_alert] = [m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",)]
        new_text = " ".join(new_alert.message.get_content().split())
        assert "The customer was told that the IRT lead will reach out directly." in new_text

        follow_up = mail(subject=f"Re: Export is slow [{ref}]", body=BREACH, message_id="<raise-1@acme.com>")
        await h.send(follow_up)
        await h.outbox_settled()
        later = (await smtp_relay.wait_for(5))[3:]
        [raised] = [m for m in later if m.rcpt_tos == ("irt-lead@example.com",)]
        [notice] = [m for m in later if m.rcpt_tos == ("alice@acme.com",)]
        text = " ".join(raised.message.get_content().split())
        assert "The customer was told that the IRT lead will reach out directly." in text
        told = notice.message
        assert told["In-Reply-To"] == "<raise-1@acme.com>" and ref in told["Subject"]
        assert told["Auto-Submitted"] == "auto-replied"
        body = " ".join(told.get_content().split())
        assert f"ticket {ref}" in body and "Severity 1" in body and "will reach out to you directly" in body
        # Each piece of evidence marks a cut with one ellipsis, not "...…" nor "…...".
        for alert_text in (new_text, text):
            assert "unauthorized access" in alert_text
            assert "...…" not in alert_text and "…..." not in alert_text

        # Once: a second report on the ticket, already Severity 1, is neither alerted nor answered.
        await h.send(mail(subject=f"Re: Export is slow [{ref}]", body=BREACH + "\nStill going on.\n"))
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        assert len(smtp_relay.messages) == 5

        # An automated follow-up (an out-of-office reply quoting nothing of ours) raises and
        # alerts, and is not answered; the alert says why.
        other = ref_of((await h.send(mail(subject="Report layout", sender="carol@acme.com"))).text)
        await smtp_relay.wait_for(6)
        auto = mail(
            subject=f"Automatic reply: Report layout [{other}]",
            body=BREACH,
            sender="carol@acme.com",
            headers={"Auto-Submitted": "auto-replied"},
        )
        await h.send(auto)
        await h.outbox_settled()
        [alert3] = (await smtp_relay.wait_for(7))[6:]
        assert alert3.rcpt_tos == ("irt-lead@example.com",)
        text3 = " ".join(alert3.message.get_content().split())
        assert "The customer has not been told that the IRT lead will reach out (automated mail" in text3
        await asyncio.sleep(0.3)
        assert len(smtp_relay.messages) == 7


async def test_our_irt_alert_coming_back_joins_its_ticket_and_pages_no_one(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail(subject="help", body=BREACH))).text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(2)
        alert = next(m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",))
        # The IRT lead's mailbox redirects mail to a shared inbox that is support: our own alert
        # (its words are a security incident's) comes back, Message-ID and loop marker intact.
        reply = await h.send(alert.content, mail_from="irt-lead@example.com")
        assert reply.code == 250 and ref in reply.text
        # The lead answers the alert: a follow-up on the ticket, no page about their own words.
        answer = mail(
            sender="IRT Lead <irt-lead@example.com>",
            subject="Re: " + alert.message["Subject"],
            body="On it: is this a data breach of the EU tenant?",
            in_reply_to=alert.message["Message-ID"],
        )
        reply = await h.send(answer, mail_from="irt-lead@example.com")
        assert reply.code == 250 and ref in reply.text
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(2)  # no new page: an alert loop would page on every turn
        [ticket] = h.tickets()
        assert ticket["reference"] == ref
        # (the lead is one of our own: their answer joins by the reference in its subject)
        assert [m["route"] for m in h.detail(ref)["messages"]] == ["new", "header", "reference"]


async def test_an_alert_held_by_the_ceiling_then_sent_does_not_say_what_it_cannot_know(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A ticket that opened as a security incident while the hourly alert ceiling held its page
    is alerted by the customer's next security follow-up. Whether the customer was told then
    depends on its acknowledgement: the alert says to look, and no second notice goes."""
    from tests.adapters.test_policy import DrivenClock

    clock = DrivenClock()
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra="[limits]\nirt_alerts_per_hour = 1\n")
    async with running_intake(settings, clock=clock) as h:
        await h.send(mail(sender="bob@acme.com", subject="Data breach", body=BREACH))
        ref = ref_of((await h.send(mail(sender="carol@acme.com", subject="Breach too", body=BREACH))).text)
        await h.outbox_settled()
        held = await smtp_relay.wait_for(4)  # Bob's ack and alert, Carol's ack, the ceiling's summary
        assert sum(m.rcpt_tos == ("irt-lead@example.com",) for m in held) == 2
        clock.advance(hours=2)
        await h.send(mail(sender="carol@acme.com", subject=f"Re: Breach too [{ref}]", body="Ransomware note found."))
        await h.outbox_settled()
        [alert] = (await smtp_relay.wait_for(5))[4:]
        assert alert.rcpt_tos == ("irt-lead@example.com",) and ref in alert.message["Subject"]
        text = " ".join(alert.message.get_content().split())
        assert "The ticket was a security incident before this message, and no alert went then" in text
        assert "The customer was told" not in text and "has not been told" not in text
        await asyncio.sleep(0.3)
        assert len(smtp_relay.messages) == 5  # no security notice to Carol: she was a security ticket already
